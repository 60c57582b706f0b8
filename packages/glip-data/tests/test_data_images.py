"""glip_data.load_image: every source kind, EXIF orientation, 16-bit and float scaling, modes, and one error type."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from glip_data import ImageLoadError, load_image
from glip_data.images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS


def _png_bytes(image: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **params)
    return buf.getvalue()


def _stored_with_orientation(orientation: int) -> tuple[Image.Image, bytes]:
    """A 480x320 (W x H) image, a red 10x10 block at its stored top-left corner, saved as PNG with an EXIF
    orientation."""
    arr = np.zeros((320, 480, 3), dtype=np.uint8)
    arr[:10, :10] = (255, 0, 0)
    stored = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return stored, _png_bytes(stored, exif=exif)


def _red_corner(image: Image.Image) -> str:
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    corners = {"top-left": arr[2, 2], "top-right": arr[2, w - 3], "bottom-left": arr[h - 3, 2],
               "bottom-right": arr[h - 3, w - 3]}
    (name,) = [k for k, v in corners.items() if v[0] > 200 and v[1] < 50]
    return name


@pytest.mark.parametrize(
    "orientation, size, corner",
    [
        # EXIF 2.3: 6 = row 0 is the visual right side, column 0 the visual top -> stored (0, 0) shows top-right
        (6, (320, 480), "top-right"),
        (8, (320, 480), "bottom-left"),  # row 0 on the visual left, column 0 at the bottom
        (3, (480, 320), "bottom-right"),  # upside down
        (2, (480, 320), "top-right"),  # mirrored
        (1, (480, 320), "top-left"),
    ],
)
def test_exif_orientation_is_applied_and_recorded(orientation, size, corner):
    _, data = _stored_with_orientation(orientation)
    image = load_image(data)
    assert image.mode == "RGB" and image.size == size
    assert _red_corner(image) == corner
    assert image.info["exif_orientation"] == orientation
    again = load_image(image)  # upright now: nothing is rotated twice and the record survives
    assert again.size == size and _red_corner(again) == corner and again.info["exif_orientation"] == orientation


def test_exif_orientation_from_a_path_and_from_a_pil_image(tmp_path):
    _, data = _stored_with_orientation(6)
    (tmp_path / "phone.png").write_bytes(data)
    assert load_image(tmp_path / "phone.png").size == (320, 480)
    assert load_image(str(tmp_path / "phone.png")).size == (320, 480)
    with Image.open(tmp_path / "phone.png") as lazy:
        assert load_image(lazy).size == (320, 480)
    stored = load_image(data, frame="stored")
    assert stored.size == (480, 320) and _red_corner(stored) == "top-left"
    assert stored.info["exif_orientation"] == 6 and stored.info["exif_applied"] is False and "exif" not in stored.info


# The displayed (upright) image as the stored pixels for each EXIF orientation, written from the EXIF 2.3 table of
# where the stored row 0 / column 0 are shown (independently of PIL's transpose names): stored[r, c] = shown[...]
_STORED_FROM_SHOWN = {
    1: lambda d: d,
    2: lambda d: d[:, ::-1],  # mirrored: row 0 at the top, column 0 on the right
    3: lambda d: d[::-1, ::-1],  # upside down
    4: lambda d: d[::-1],  # row 0 at the bottom, column 0 on the left
    5: lambda d: d.transpose(1, 0, 2),  # row 0 on the left, column 0 at the top
    6: lambda d: d[:, ::-1].transpose(1, 0, 2),  # row 0 on the right, column 0 at the top
    7: lambda d: d[::-1, ::-1].transpose(1, 0, 2),  # row 0 on the right, column 0 at the bottom
    8: lambda d: d[::-1].transpose(1, 0, 2),  # row 0 on the left, column 0 at the bottom
}


def _shown_and_file(orientation: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    """A 60x40 (W x H) shown image with a box drawn at x 5..14, y 8..11 (columns, rows), its stored pixels for
    ``orientation`` and the PNG file holding them with the tag."""
    shown = np.zeros((40, 60, 3), dtype=np.uint8)
    shown[8:12, 5:15] = (255, 0, 0)
    stored = np.ascontiguousarray(_STORED_FROM_SHOWN[orientation](shown))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return shown, stored, _png_bytes(Image.fromarray(stored), exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_puts_a_box_annotated_on_the_shown_image_in_place(orientation):
    from glip_data import ImageFrame

    shown, stored, data = _shown_and_file(orientation)
    # annotated on the shown image (its size; shown where the size cannot tell, orientations 1-4)
    upright = load_image(data, frame=ImageFrame.matching(60, 40, ambiguous="upright"))
    ys, xs = np.nonzero(np.asarray(upright)[..., 0] > 200)
    assert upright.size == (60, 40) and (xs.min(), xs.max(), ys.min(), ys.max()) == (5, 14, 8, 11)
    assert (np.asarray(upright) == shown).all()
    assert upright.info["exif_applied"] is (orientation != 1)
    assert upright.info["frame_reason"] == ("size" if orientation >= 5 else "default")
    as_stored = load_image(data, frame="stored")
    assert (np.asarray(as_stored) == stored).all() and as_stored.info["exif_orientation"] == orientation
    assert (np.asarray(load_image(data)) == shown).all()  # the default frame is upright


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_the_annotated_size_picks_the_frame(orientation):
    from glip_data import ImageFrame

    shown, stored, data = _shown_and_file(orientation)  # stored 40x60, shown 60x40
    cases = [(ImageFrame.matching(60, 40), shown, "size", True),  # annotated on the shown image
             (ImageFrame.matching(40, 60), stored, "size", False),  # annotated on the stored pixels (official)
             (ImageFrame.matching(120, 80), shown, "shape", True),  # a resized annotation, landscape as shown
             (ImageFrame.matching(80, 120), stored, "shape", False)]
    for frame, expected, why, applied in cases:
        image = load_image(data, frame=frame)
        assert (np.asarray(image) == expected).all(), frame
        assert image.info["frame_reason"] == why and image.info["exif_applied"] is applied


@pytest.mark.parametrize("orientation", [2, 3, 4])
def test_a_size_that_cannot_tell_follows_the_default_frame(orientation):
    from glip_data import ImageFrame

    shown, stored, data = _shown_and_file(orientation)  # both frames are 60x40
    default = load_image(data, frame=ImageFrame.matching(60, 40))
    assert (np.asarray(default) == stored).all() and default.info["frame_reason"] == "default"
    chosen = load_image(data, frame=ImageFrame.matching(60, 40, ambiguous="upright"))
    assert (np.asarray(chosen) == shown).all() and chosen.info["exif_applied"] is True
    square = np.zeros((30, 30, 3), np.uint8)
    square[0, 29] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_image(_png_bytes(Image.fromarray(square), exif=exif), frame=ImageFrame.matching(30, 30))
    assert image.info["frame_reason"] == "default" and np.asarray(image)[0, 29, 0] == 255  # square: as stored


def test_an_image_load_image_returned_keeps_its_frame():
    from glip_data import ImageFrame, TestTransform

    shown, stored, data = _shown_and_file(6)
    as_stored = load_image(data, frame=ImageFrame.matching(40, 60))
    again = load_image(as_stored)  # the default frame is upright, but the frame was decided: not rotated now
    assert again.size == (40, 60) and (np.asarray(again) == stored).all()
    assert TestTransform(min_size=60, max_size=100)(as_stored).shape == (3, 90, 60)  # 40x60 kept, scaled 1.5
    upright = load_image(data)
    assert load_image(upright, frame="stored").size == (60, 40)  # nor turned back
    with Image.open(io.BytesIO(data)) as raw:  # a PIL image not from load_image: upright by default
        assert load_image(raw).size == (60, 40)


def test_image_frame_is_validated():
    from glip_data import ImageFrame

    with pytest.raises(ValueError, match="frame"):
        load_image(np.zeros((2, 2), np.uint8), frame="sideways")
    with pytest.raises(ValueError, match="ImageFrame.width"):
        ImageFrame.matching(0, 10)
    with pytest.raises(ValueError, match="ambiguous"):
        ImageFrame.matching(10, 10, ambiguous="match")


def test_sixteen_bit_png_is_scaled_not_clipped():
    # round(v * 255 / 65535) = round(v / 257): 0 -> 0, 128 -> 0 (0.498), 129 -> 1 (0.502), 25700 -> 100,
    # 32896 -> 128, 65535 -> 255
    values = np.array([[0, 128, 129, 25700, 32896, 65535]], dtype=np.uint16)
    expected = [0, 0, 1, 100, 128, 255]
    for source in (_png_bytes(Image.fromarray(values)), values, values.astype(">u2"), values[..., None]):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (6, 1)
        assert np.asarray(image)[0, :, 0].tolist() == expected
        assert (np.asarray(image)[..., 0] == np.asarray(image)[..., 2]).all()
    mode_i = Image.fromarray(values.astype(np.int32))  # what older PIL made of 16-bit PNGs
    assert mode_i.mode == "I" and np.asarray(load_image(mode_i))[0, :, 0].tolist() == expected


def test_sixteen_bit_photo_does_not_turn_white():
    rng = np.random.default_rng(0)
    photo = rng.integers(1000, 60000, (32, 48)).astype(np.uint16)
    image = np.asarray(load_image(_png_bytes(Image.fromarray(photo))))
    assert 60 < image.mean() < 200  # PIL's convert("RGB") would clip nearly every pixel to 255


def test_float_arrays_are_scaled():
    arr = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    # rint(v * 255): 0, 63.75 -> 64, 127.5 -> 128 (halves to even), 255
    for source in (arr, arr.astype(np.float64), Image.fromarray(arr, "F")):
        assert np.asarray(load_image(source))[0, :, 1].tolist() == [0, 64, 128, 255]
    rgba = np.zeros((2, 2, 4), dtype=np.float64)
    rgba[..., 0] = 1.0
    assert load_image(rgba).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_uint8_arrays(shape):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    image = load_image(arr)
    assert image.mode == "RGB" and image.size == (7, 5) and image.info["exif_orientation"] == 1
    rgb = np.asarray(image)
    if len(shape) == 2 or shape[2] == 1:
        gray = arr.reshape(5, 7)
        assert all((rgb[..., c] == gray).all() for c in range(3))
    else:
        assert (rgb == arr[..., :3]).all()  # alpha dropped, not composited
    assert (np.asarray(load_image(arr[:, ::-1])) == rgb[:, ::-1]).all()  # a strided view


@pytest.mark.parametrize("mode", ["L", "1", "P", "LA", "RGBA", "CMYK", "YCbCr", "PA"])
def test_pil_modes_convert_like_pil(mode):
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).convert(mode)
    out = load_image(image)
    assert out.mode == "RGB" and out.size == (9, 6)
    assert (np.asarray(out) == np.asarray(image.convert("RGB"))).all()


def test_palette_with_transparency_keeps_the_palette_colours_without_warning():
    image = Image.new("P", (4, 2))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_image(_png_bytes(image))
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((1, 0)) == (200, 100, 50)


def test_rgb_pil_image_is_returned_as_is_and_files_are_closed(tmp_path):
    image = Image.new("RGB", (3, 2), (1, 2, 3))
    assert load_image(image) is image
    Image.new("RGB", (3, 2), (1, 2, 3)).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    (tmp_path / "a.png").unlink()  # nothing still reads the file
    assert loaded.getpixel((2, 1)) == (1, 2, 3)
    assert load_image(bytearray(_png_bytes(image))).size == load_image(memoryview(_png_bytes(image))).size == (3, 2)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (8-bit RGB) and whose data is one empty compressed block."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_every_failure_is_one_error_type_naming_the_source(tmp_path):
    good = _png_bytes(Image.new("RGB", (40, 30), (9, 9, 9)))
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 30)).save(jpeg, "JPEG")
    (tmp_path / "broken.png").write_bytes(good[: len(good) // 2])
    cases = [
        (tmp_path / "missing.jpg", r"missing\.jpg: no such file"),
        (tmp_path, "not a regular file"),
        (str(tmp_path / "broken.png"), r"broken\.png"),
        (b"", "no data"),
        (b"not an image at all", "UnidentifiedImageError"),
        (jpeg.getvalue()[:300], "<300 bytes>"),  # truncated JPEG
        (_png_header(20000, 20000), "DecompressionBomb"),  # 400 million pixels: refused before decoding
        (_png_header(10, 10), "truncated"),  # header fine, no pixel data
        (np.zeros((0, 4, 3), np.uint8), r"<array \(0, 4, 3\) uint8>: zero-area"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((2, 2, 2, 3), np.uint8), "shape"),
        (np.zeros((4, 4), np.int32), "uint8, uint16, or float32/float64"),
        (np.zeros((4, 4), bool), "uint8, uint16, or float32/float64"),
        (np.full((4, 4), 2.0), r"must lie in \[0, 1\]"),
        (np.full((4, 4), np.nan, np.float32), "NaN"),
        (np.zeros((1, MAX_ASPECT_RATIO + 1), np.uint8), "aspect ratio"),
        (np.broadcast_to(np.uint8(0), (16385, 16385)), f"more than the limit of {MAX_IMAGE_PIXELS}"),
        (Image.new("RGB", (0, 5)), "zero-area"),
        (Image.new("I", (2, 2), -5), "0..65535"),
        (12, "unsupported source type int"),
        (None, "unsupported source type NoneType"),
    ]
    for source, needle in cases:
        with pytest.raises(ImageLoadError, match=needle) as err:
            load_image(source)
        assert isinstance(err.value, OSError)
    assert load_image(np.zeros((1, MAX_ASPECT_RATIO), np.uint8)).size == (MAX_ASPECT_RATIO, 1)
    with pytest.raises(ImageLoadError, match=r"^cannot load image shard-3\.tar#7\.jpg: UnidentifiedImageError"):
        load_image(b"junk", where="shard-3.tar#7.jpg")
    with pytest.raises(ImageLoadError, match=r"missing\.jpg \(coco\.json, image id 7\): no such file"):
        load_image(tmp_path / "missing.jpg", where="coco.json, image id 7")
