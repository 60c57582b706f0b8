"""The weighted mixture, and readers under DataLoader workers and DistributedSampler."""
from __future__ import annotations

import json
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from glip_data.readers import COCODetection, MDETRGrounding, MixtureDataset


def keep_list(batch):
    return batch


def coco_reader(tmp_path, n_images=6):
    images = [{"id": i + 1, "file_name": f"{i}.jpg", "width": 50, "height": 40} for i in range(n_images)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [i, i, 10, 10]} for i in range(n_images)]
    path = tmp_path / "det.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}))
    return COCODetection(path)


def mdetr_reader(tmp_path, n_images=4):
    images = [{"id": i, "file_name": f"g{i}.jpg", "width": 30, "height": 30, "caption": f"a box number {i}"}
              for i in range(n_images)]
    anns = [{"id": i, "image_id": i, "bbox": [1, 1, 5, 5], "tokens_positive": [[0, 5]]} for i in range(n_images)]
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return MDETRGrounding(path)


def test_weights_become_probabilities_and_length_semantics():
    a, b = list(range(3)), list(range(5))
    mix = MixtureDataset({"a": a, "b": b}, weights=[3, 1])
    assert mix.probabilities == [0.75, 0.25]
    assert len(mix) == 8  # default epoch: the sources' total length
    assert MixtureDataset([a, b]).probabilities == [3 / 8, 5 / 8]  # no weights: proportional to lengths
    assert len(MixtureDataset([a, b], [1, 1], num_samples=11)) == 11
    assert len(MixtureDataset([a, b], [0, 1])) == 5  # a zero weight leaves a dataset out of the epoch length


def test_empirical_frequencies_match_the_weights():
    a, b = [("a", i) for i in range(3)], [("b", i) for i in range(5)]
    n = 4000
    mix = MixtureDataset([a, b], weights=[3, 1], num_samples=n, seed=123)
    counts = Counter(mix[i][0] for i in range(n))
    sigma = (n * 0.25 * 0.75) ** 0.5
    assert abs(counts["b"] - n * 0.25) < 4 * sigma
    # over-sampled source: every item repeated as evenly as possible
    per_item = Counter(mix[i] for i in range(n) if mix[i][0] == "b")
    assert max(per_item.values()) - min(per_item.values()) <= 1 and len(per_item) == 5


def test_under_sampled_source_yields_distinct_items():
    big = list(range(1000))
    mix = MixtureDataset([big, ["x"]], weights=[1, 1], num_samples=600, seed=0)
    drawn = [mix[i] for i in range(600) if mix[i] != "x"]
    assert 0 < len(drawn) < 1000 and len(set(drawn)) == len(drawn)


def test_seeded_and_epoch_dependent():
    a, b = list(range(10)), list(range(100, 120))
    m1 = MixtureDataset([a, b], [1, 2], seed=5)
    m2 = pickle.loads(pickle.dumps(MixtureDataset([a, b], [1, 2], seed=5)))
    seq = [m1[i] for i in range(len(m1))]
    assert seq == [m2[i] for i in range(len(m2))]
    assert seq != [MixtureDataset([a, b], [1, 2], seed=6)[i] for i in range(len(m1))]
    m1.set_epoch(1)
    assert seq != [m1[i] for i in range(len(m1))]
    m1.set_epoch(0)
    assert seq == [m1[i] for i in range(len(m1))]


def test_bad_weights_are_errors():
    with pytest.raises(ValueError, match="2 datasets but 1 weights"):
        MixtureDataset([[1], [2]], [1])
    with pytest.raises(ValueError, match="weight of 'dataset1' must be a finite number >= 0"):
        MixtureDataset([[1], [2]], [1, -1])
    with pytest.raises(ValueError, match="is empty but has weight"):
        MixtureDataset([[1], []], [1, 1])
    with pytest.raises(ValueError, match="sum to zero"):
        MixtureDataset([[1], [2]], [0, 0])


def test_mixture_of_readers_with_workers_and_distributed_sampler(tmp_path):
    det, ground = coco_reader(tmp_path), mdetr_reader(tmp_path)
    mix = MixtureDataset({"det": det, "ground": ground}, weights=[1, 1], num_samples=12, seed=3)
    expected = [(mix[i].metadata["mixture_source"], mix[i].metadata["image_id"]) for i in range(len(mix))]
    assert {src for src, _ in expected} == {"det", "ground"}
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(mix, num_replicas=2, rank=rank, shuffle=False)
        loader = DataLoader(mix, batch_size=2, sampler=sampler, num_workers=2, collate_fn=keep_list)
        for batch in loader:
            for sample in batch:
                seen.append((sample.metadata["mixture_source"], sample.metadata["image_id"]))
    assert sorted(seen) == sorted(expected)  # every index exactly once over the ranks, same samples in workers
    assert "det/" not in "".join(mix.stats)  # nothing dropped in the sources
    assert "probability 0.5000" in mix.report()


def test_reader_in_worker_processes_matches_direct_access(tmp_path):
    det = coco_reader(tmp_path)
    loader = DataLoader(det, batch_size=3, num_workers=2, collate_fn=keep_list)
    got = [s for batch in loader for s in batch]
    assert len(got) == len(det)
    for i, s in enumerate(got):
        assert torch.equal(s.boxes, det[i].boxes) and s.caption == det[i].caption
    assert np.allclose(got[2].boxes.numpy(), [[2, 2, 11, 11]])
