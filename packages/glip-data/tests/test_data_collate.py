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
