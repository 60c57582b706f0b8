"""The official test transform (resize rules, BGR x255 normalisation) and the training transforms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from glip_data import TestTransform, get_resize_size, pad_images
from glip_data.transforms import PIXEL_MEAN_BGR, PIXEL_STD_BGR, to_rgb_image


@pytest.mark.parametrize(
    "size, min_size, max_size, expected",
    [
        ((480, 320), 320, 480, (480, 320)),  # shorter side already 320: kept
        ((352, 256), 320, 480, (440, 320)),  # 320 * 352 / 256 = 440 (fixture case 2, image 1)
        ((640, 480), 800, 1333, (1066, 800)),  # int(800 * 640 / 480) = int(1066.67) -> truncation
        ((480, 640), 800, 1333, (800, 1066)),  # portrait
        ((2000, 500), 800, 1333, (1332, 333)),  # cap: round(1333 * 500 / 2000) = round(333.25) = 333
        ((1000, 1000), 800, 1333, (800, 800)),
        ((1333, 800), 800, 1333, (1333, 800)),  # exactly at the cap: size kept
        ((300, 100), 50, 125, (126, 42)),  # s = round(41.67) = 42; long side int(42 * 3) = 126 > cap (official)
    ],
)
def test_get_resize_size_rules(size, min_size, max_size, expected):
    assert get_resize_size(size, min_size, max_size) == expected


def test_get_resize_size_round_half_to_even():
    # long/short = 4: 4 * 5 > 18 -> s = round(18 * 10 / 40) = round(4.5) = 4 (Python rounds halves to even)
    assert get_resize_size((40, 10), 5, 18) == (16, 4)
    # 4 * 6 > 22 -> s = round(5.5) = 6 (even), long side int(6 * 40 / 10) = 24
    assert get_resize_size((40, 10), 6, 22) == (24, 6)


def test_get_resize_size_no_cap_and_bad_input():
    assert get_resize_size((100, 50), 800, None) == (1600, 800)
    with pytest.raises(ValueError, match="positive"):
        get_resize_size((0, 10), 800, 1333)


def _reference_tensor(pil):
    """Independent formulation: float64 numpy, (BGR*255 - mean) / std."""
    rgb = np.asarray(pil.convert("RGB"), dtype=np.float64) / 255.0
    bgr = rgb[..., ::-1] * 255.0
    out = (bgr - np.array(PIXEL_MEAN_BGR)) / np.array(PIXEL_STD_BGR)
    return torch.from_numpy(out.transpose(2, 0, 1).copy()).float()


def test_test_transform_formula_without_resize():
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    out = TestTransform(min_size=40, max_size=1000)(pil)
    assert out.shape == (3, 40, 60) and out.dtype == torch.float32
    torch.testing.assert_close(out, _reference_tensor(pil), rtol=0, atol=1e-5)


def test_test_transform_resizes_like_pil_bilinear():
    rng = np.random.default_rng(1)
    pil = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    out = TestTransform(min_size=45, max_size=1000)(pil)
    assert out.shape == (3, 45, 75)
    expected = _reference_tensor(pil.resize((75, 45), Image.BILINEAR))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK"])
def test_test_transform_accepts_other_modes(mode):
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    out = TestTransform(20, 100)(image)
    torch.testing.assert_close(out, _reference_tensor(image.convert("RGB")), rtol=0, atol=1e-5)


def test_numpy_input_and_errors():
    arr = np.zeros((10, 12, 3), dtype=np.uint8)
    arr[..., 0] = 255  # pure red
    out = TestTransform(10, 100)(arr)
    # BGR order: channel 2 is red.
    assert torch.allclose(out[2], torch.full((10, 12), (255 - PIXEL_MEAN_BGR[2]) / PIXEL_STD_BGR[2]))
    assert torch.allclose(out[0], torch.full((10, 12), -PIXEL_MEAN_BGR[0] / PIXEL_STD_BGR[0]))
    with pytest.raises(TypeError, match="uint8"):
        to_rgb_image(arr.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_image(np.zeros((4, 4, 2), dtype=np.uint8))


@pytest.mark.parity
def test_test_transform_matches_fixture(parity_dir, parity_index):
    transform = TestTransform(min_size=320, max_size=480)  # the fixture's INPUT.MIN/MAX_SIZE_TEST
    for name, case in parity_index["cases"].items():
        arrays = np.load(parity_dir / case["file"])
        official = torch.from_numpy(arrays["input/image_tensor"])
        sizes = arrays["input/image_sizes_hw"]
        images = [transform(Image.open(parity_dir / f)) for f in case["images"]]
        batch, image_sizes, mask = pad_images(images, size_divisibility=32)
        assert batch.shape == official.shape, name
        assert image_sizes.tolist() == sizes.tolist(), name
        for i, (h, w) in enumerate(sizes.tolist()):
            torch.testing.assert_close(images[i], official[i, :, :h, :w], rtol=1e-4, atol=1e-4)
            assert torch.count_nonzero(batch[i][:, ~mask[i]]) == 0
            assert torch.count_nonzero(official[i][:, ~mask[i]]) == 0
        torch.testing.assert_close(batch, official, rtol=1e-4, atol=1e-4)
