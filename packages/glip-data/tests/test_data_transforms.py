"""The official test transform (resize rules, BGR x255 normalisation) and the training transforms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from glip_data import ImageLoadError, TestTransform, get_resize_size, pad_images
from glip_data.transforms import PIXEL_MEAN_BGR, PIXEL_STD_BGR


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


def test_get_resize_size_refuses_a_zero_side():
    # 1 x 4000: the cap makes s = round(1333 * 1 / 4000) = round(0.33) = 0 -> a 0-pixel side
    with pytest.raises(ValueError, match=r"\(w, h\) = \(1, 4000\).*zero side"):
        get_resize_size((1, 4000), 800, 1333)
    # 1 x 2665: s = round(1333 / 2665) = round(0.50019) = 1, long side int(1 * 2665): the most elongated that fits
    assert get_resize_size((1, 2665), 800, 1333) == (1, 2665)
    with pytest.raises(ValueError, match="zero side"):
        get_resize_size((5332, 2), 800, 1333)  # s = round(0.5) = 0 (halves go to even)


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
    with pytest.raises(ImageLoadError, match=r"float images must lie in \[0, 1\]"):
        TestTransform(10, 100)(arr.astype(np.float32))  # 0-255 data in a float array
    with pytest.raises(ImageLoadError, match=r"<array \(4, 4, 2\) uint8>.*shape"):
        TestTransform(10, 100)(np.zeros((4, 4, 2), dtype=np.uint8))
    # float data in [0, 1] is scaled, as the same uint8 image
    torch.testing.assert_close(TestTransform(10, 100)(arr.astype(np.float32) / 255), out, rtol=0, atol=0)


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


# --- training transforms ----------------------------------------------------------------------------------------

from glip_data import (  # noqa: E402
    GroundingSample,
    RandomHorizontalFlip,
    RandomResize,
    ToModelTensor,
    swap_left_right,
    train_transforms,
)


def _grounding_sample(image, boxes, caption="a dog on the left", spans=None):
    w, h = image.size
    spans = spans if spans is not None else [[(2, 5)] for _ in boxes]
    return GroundingSample(image_path="x.png", width=w, height=h, boxes=boxes, caption=caption,
                           tokens_positive=spans, labels=[1] * len(boxes), image=image)


def test_random_resize_scales_boxes_and_records_size():
    image = Image.new("RGB", (40, 30))
    sample = _grounding_sample(image, [[4, 3, 20, 15]])
    out = RandomResize(min_sizes=(60,), max_size=1000, rng=0)(sample)
    assert out.image.size == (80, 60) and (out.width, out.height) == (80, 60)
    assert out.boxes.tolist() == [[8, 6, 40, 30]]
    assert out.metadata["orig_size"] == (40, 30)
    assert sample.boxes.tolist() == [[4, 3, 20, 15]]  # input untouched


def test_random_resize_draws_from_the_sizes_reproducibly():
    image = Image.new("RGB", (40, 30))
    sizes = [
        RandomResize((30, 45, 60), max_size=None, rng=seed)(_grounding_sample(image, [[0, 0, 1, 1]])).height
        for seed in range(30)
    ]
    assert set(sizes) == {30, 45, 60}
    again = [
        RandomResize((30, 45, 60), max_size=None, rng=seed)(_grounding_sample(image, [[0, 0, 1, 1]])).height
        for seed in range(30)
    ]
    assert sizes == again


def test_flip_moves_pixels_with_inclusive_box_convention():
    # White pixels in columns 10..19 (inclusive, the legacy box [10, y, 19, y2]); after flipping a 50-wide image
    # they are in columns 30..39, which is exactly the legacy flipped box.
    arr = np.zeros((20, 50, 3), dtype=np.uint8)
    arr[5:15, 10:20] = 255
    sample = _grounding_sample(Image.fromarray(arr), [[10, 5, 19, 14]])
    out = RandomHorizontalFlip(prob=1.0)(sample)
    cols = np.nonzero(np.asarray(out.image)[10, :, 0])[0]
    assert (cols.min(), cols.max()) == (30, 39)
    assert out.boxes.tolist() == [[30, 5, 39, 14]]
    assert out.caption == sample.caption  # official: the caption is not touched
    assert out.metadata["hflip"] is True


def test_flip_probability_zero_is_identity():
    sample = _grounding_sample(Image.new("RGB", (10, 10)), [[1, 1, 4, 4]])
    assert RandomHorizontalFlip(prob=0.0)(sample) is sample


def test_swap_left_right_moves_spans():
    caption = "the left dog and the Right cat. LEFT leftover rightmost left-handed"
    spans = [[(4, 12)], [(21, 30)], [(32, 36)], [(37, 45), (46, 55)], [(56, 67)]]
    assert [caption[s:e] for s, e in (sp[0] for sp in spans)] == ["left dog", "Right cat", "LEFT", "leftover",
                                                                  "left-handed"]
    new, new_spans = swap_left_right(caption, spans)
    assert new == "the right dog and the Left cat. RIGHT leftover rightmost right-handed"
    assert [[new[s:e] for s, e in sp] for sp in new_spans] == [
        ["right dog"], ["Left cat"], ["RIGHT"], ["leftover", "rightmost"], ["right-handed"],
    ]


def test_flip_with_swap_updates_caption_and_drops_positive_map():
    caption = "a dog on the left and a cat"
    sample = _grounding_sample(Image.new("RGB", (10, 10)), [[1, 1, 4, 4], [5, 5, 8, 8]], caption=caption,
                               spans=[[(2, 5)], [(22, 27)]])
    sample.positive_map = torch.zeros(2, 256, dtype=torch.bool)
    out = RandomHorizontalFlip(prob=1.0, swap_left_right=True)(sample)
    assert out.caption == "a dog on the right and a cat"
    assert [out.caption[s:e] for (s, e), in out.tokens_positive] == ["dog", "a cat"]
    assert out.positive_map is None


def test_train_transforms_pipeline_outputs_model_tensor():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    sample = _grounding_sample(image, [[4, 3, 20, 15]])
    out = train_transforms(min_sizes=(60,), max_size=1000, flip_prob=0.0, rng=0)(sample)
    assert isinstance(out.image, torch.Tensor) and out.image.shape == (3, 60, 80)
    expected = TestTransform(60, 1000)(image)  # same resize + normalisation as the test transform
    torch.testing.assert_close(out.image, expected)


def test_to_model_tensor_checks_image_size():
    sample = _grounding_sample(Image.new("RGB", (10, 10)), [[1, 1, 4, 4]])
    sample.width = 12
    with pytest.raises(ValueError, match="x.png: the image is 10x10 but the sample records width=12"):
        ToModelTensor()(sample)
    sample.image = None
    with pytest.raises(ValueError, match="no decoded image"):
        ToModelTensor()(sample)


def test_to_model_tensor_does_not_rotate_behind_the_boxes_back():
    # a sample built by hand from a file that still carries EXIF orientation 6: the boxes refer to the stored
    # pixels, so the training transforms keep them (readers load images upright in the first place)
    import io

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "PNG", exif=exif)
    stored = Image.open(io.BytesIO(buf.getvalue()))
    out = ToModelTensor()(_grounding_sample(stored, [[1, 1, 5, 5]]))
    assert out.image.shape == (3, 30, 40)
    assert TestTransform(30, 1000)(stored).shape == (3, 40, 30)  # inference loads it upright
