"""Image padding and grounding-batch collation."""
from __future__ import annotations

import pytest
import torch

from glip_data import pad_images


def test_pad_images_sizes_mask_and_zero_padding():
    a = torch.randn(3, 50, 70)
    b = torch.randn(3, 64, 33)
    batch, sizes, mask = pad_images([a, b], size_divisibility=32)
    assert batch.shape == (2, 3, 64, 96)  # max (64, 70) -> rounded up to (64, 96)
    assert sizes.dtype == torch.int64 and sizes.tolist() == [[50, 70], [64, 33]]
    assert mask.dtype == torch.bool and mask.shape == (2, 64, 96)
    assert torch.equal(batch[0, :, :50, :70], a) and torch.equal(batch[1, :, :64, :33], b)
    assert mask[0].sum() == 50 * 70 and mask[0, :50, :70].all()
    assert mask[1].sum() == 64 * 33 and mask[1, :, :33].all()
    assert torch.count_nonzero(batch[0, :, 50:, :]) == 0 and torch.count_nonzero(batch[0, :, :, 70:]) == 0
    assert torch.count_nonzero(batch[1, :, :, 33:]) == 0


def test_pad_images_without_divisibility():
    batch, sizes, mask = pad_images([torch.ones(3, 5, 7)], size_divisibility=0)
    assert batch.shape == (1, 3, 5, 7) and mask.all()


def test_pad_images_errors():
    with pytest.raises(ValueError, match="at least one"):
        pad_images([])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        pad_images([torch.zeros(3, 4, 4), torch.zeros(4, 4)])
    with pytest.raises(ValueError, match=r"images\[1\] has 1 channels"):
        pad_images([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)])


# --- collate_grounding ------------------------------------------------------------------------------------------

from transformers import BertTokenizerFast  # noqa: E402

from glip_data import GroundingCollator, GroundingSample, build_positive_map, collate_grounding  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return BertTokenizerFast.from_pretrained(str(minilm_dir), do_lower_case=True)


def _sample(h, w, caption, spans, boxes, labels=None):
    return GroundingSample(image_path=f"{caption}.png", width=w, height=h, boxes=boxes, caption=caption,
                           tokens_positive=spans, labels=labels or [1] * len(boxes), image=torch.randn(3, h, w))


def _two_samples():
    a = _sample(40, 50, "a red car. a dog", [[(2, 9)], [(11, 16)], [(11, 16)]], [[0, 0, 5, 5], [1, 1, 6, 6],
                                                                               [2, 2, 9, 9]], [3, 7, 7])
    b = _sample(64, 20, "person", [[(0, 6)]], [[3, 3, 10, 10]], [1])
    return a, b


def test_collate_grounding_max_padding(tokenizer):
    a, b = _two_samples()
    batch = collate_grounding([a, b], tokenizer, max_len=256)
    assert batch.images.shape == (2, 3, 64, 64)
    assert batch.image_sizes.tolist() == [[40, 50], [64, 20]]
    assert batch.input_ids.shape == (2, 256) and batch.input_ids.dtype == torch.int64
    assert batch.attention_mask.sum(1).tolist() == [8, 3]  # [CLS] a red car . a dog [SEP] / [CLS] person [SEP]
    assert batch.input_ids[1, :3].tolist() == tokenizer("person")["input_ids"]
    assert batch.positive_map.shape == (4, 256) and batch.positive_map.dtype == torch.bool
    expected = torch.cat([build_positive_map(tokenizer, s.caption, s.tokens_positive) for s in (a, b)])
    assert torch.equal(batch.positive_map, expected)
    assert batch.positive_map[:, :8].nonzero().tolist() == [[0, 2], [0, 3], [1, 5], [1, 6], [2, 5], [2, 6], [3, 1]]
    assert [t.labels.tolist() for t in batch.targets] == [[3, 7, 7], [1]]
    assert torch.equal(batch.targets[0].boxes, a.boxes) and batch.targets[1].image_size == (64, 20)
    assert torch.equal(batch.targets[0].positive_map, batch.positive_map[:3])


def test_collate_grounding_longest_padding_cuts_maps(tokenizer):
    a, b = _two_samples()
    batch = GroundingCollator(tokenizer, pad_text_to="longest")([a, b])
    assert batch.input_ids.shape == (2, 8)
    assert batch.positive_map.shape == (4, 8)
    full = collate_grounding([a, b], tokenizer)
    assert torch.equal(batch.positive_map, full.positive_map[:, :8])


def test_collate_grounding_uses_and_checks_precomputed_maps(tokenizer):
    a, b = _two_samples()
    b.positive_map = torch.zeros(1, 256, dtype=torch.bool)
    b.positive_map[0, 1] = True
    assert collate_grounding([a, b], tokenizer).positive_map[3].nonzero().tolist() == [[1]]
    b.positive_map[0, 100] = True  # beyond the longest caption
    with pytest.raises(ValueError, match=r"person.png: the positive map has positives at token >= 8"):
        collate_grounding([a, b], tokenizer, pad_text_to="longest")


def test_collate_grounding_errors(tokenizer):
    a, _ = _two_samples()
    a.image = None
    with pytest.raises(TypeError, match="ToModelTensor"):
        collate_grounding([a], tokenizer)
    with pytest.raises(ValueError, match="pad_text_to"):
        collate_grounding([a], tokenizer, pad_text_to="min")
