"""End to end on the synthetic world: readers -> mixture -> detection-to-grounding -> transforms -> batches."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import glip_data as gd

TINY = gd.SynthConfig(num_detection=6, num_grounding=6, num_captions=0, num_val=0, min_size=64, max_size=128)


class Prepare:
    """What a training loader does per sample: prompts for detection data, then the training transforms."""

    def __init__(self, categories, tokenizer):
        self.to_grounding = gd.DetectionToGrounding(categories, tokenizer, rng=0)
        self.transforms = gd.train_transforms(min_sizes=(96,), max_size=160, rng=0)
        self.tokenizer = tokenizer

    def __call__(self, samples):
        ready = []
        for s in samples:
            if s.metadata["task"] == "detection":
                s = self.to_grounding(s)
            ready.append(self.transforms(s))
        return gd.collate_grounding(ready, self.tokenizer)


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


def test_synthetic_world_to_training_batches(tmp_path, tokenizer):
    world = gd.generate_world(tmp_path / "w", seed=5, config=TINY)
    det = gd.COCODetection(world.detection_train, world.image_root, load_image=True)
    ground = gd.MDETRGrounding(world.grounding_train, world.image_root, load_image=True)
    mix = gd.MixtureDataset({"det": det, "ground": ground}, weights=[1, 1], num_samples=8, seed=0)
    loader = DataLoader(mix, batch_size=4, num_workers=2, collate_fn=Prepare(det.categories, tokenizer))
    boxes = 0
    for batch in loader:
        assert batch.images.shape[0] == 4 and batch.images.shape[-1] % 32 == 0
        assert batch.positive_map.dtype == torch.bool
        assert batch.positive_map.any(dim=1).all()  # every box grounds to at least one token
        boxes += batch.positive_map.shape[0]
    expected = sum(mix[i].num_boxes for i in range(len(mix)))
    assert boxes == expected
