"""The one image loader: any supported source -> a PIL RGB image, or one :class:`ImageLoadError` naming the source.

The official pre-processing starts from a PIL RGB image (docs/official_model.md#preprocessing). Everything that
reaches the model goes through :func:`load_image` first — a file, a dataset shard member, a user's array — so
every input gets the same conversions and every failure the same exception.

The pixel frame (whether the EXIF orientation is applied) is decided here, once, by an :class:`ImageFrame`: upright
for a user's photos (detect, ground), or the frame whose size the annotation records (evaluation, training
readers, shards). The image returned says which frame it is in, and any later :func:`load_image` of it (the
processor's, ``TestTransform``'s) takes it as it is.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

__all__ = ["FRAMES", "ImageFrame", "ImageLoadError", "MAX_ASPECT_RATIO", "MAX_IMAGE_PIXELS", "load_image"]

#: Images with more pixels are refused before decoding (2**28, a 16384 x 16384 image). Files are also subject to
#: PIL's own decompression-bomb check, which refuses more than ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (about 179
#: million by default) already when the file is opened.
MAX_IMAGE_PIXELS = 2**28

#: Images whose long side exceeds this many times the short side are refused. No photograph comes close (wide
#: panoramas reach about 10:1), and the official resize, which caps the long side at 1333, can shrink up to
#: 2666:1 before the short side rounds to zero pixels (``glip_data.get_resize_size`` raises there).
MAX_ASPECT_RATIO = 1000

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transposition that shows the image upright (EXIF 2.3, tag 274).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# orientations whose upright image has the stored image's width and height swapped
_SWAPS_SIDES = (5, 6, 7, 8)
# info keys that carry an orientation; dropped once the frame is decided so that nothing applies it later
_ORIENTATION_CARRIERS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

#: The two pixel frames of an image: ``"upright"`` (its EXIF orientation applied, as viewers show it) and
#: ``"stored"`` (the pixels as the file stores them, as the official loader reads every image).
FRAMES = ("upright", "stored")


class ImageLoadError(OSError):
    """An image that cannot be loaded: missing or unreadable file, undecodable or truncated data, a decompression
    bomb, an unsupported array, zero or absurd size. The message names the source and the reason."""


@dataclass(frozen=True)
class ImageFrame:
    """Which pixel frame :func:`load_image` reads an image in.

    ``ImageFrame("upright")`` and ``ImageFrame("stored")`` fix the frame. :meth:`matching` ``(width, height)``
    takes it from an annotation: an image whose upright (EXIF-displayed) size is the recorded one is read upright,
    one whose stored size is the recorded one is read as stored. When the size does not tell — both frames have the
    recorded size (a square image, or an orientation such as 3, upside down, that keeps the sides), or neither has
    it (a resized copy) and the recorded width/height do not pick one frame by their landscape/portrait shape —
    ``ambiguous`` decides: ``"stored"`` by default, the frame the official loader reads (it ignores EXIF).

    Attributes:
        frame: ``"upright"``, ``"stored"`` or ``"match"`` (built by :meth:`matching`).
        width, height: the recorded size (``"match"`` only).
        ambiguous: the frame when the recorded size does not tell (``"match"`` only).
    """

    frame: str = "upright"
    width: Union[int, None] = None
    height: Union[int, None] = None
    ambiguous: str = "stored"

    def __post_init__(self) -> None:
        if self.frame not in (*FRAMES, "match"):
            raise ValueError(f"ImageFrame.frame must be one of {FRAMES} or 'match', got {self.frame!r}")
        if self.ambiguous not in FRAMES:
            raise ValueError(f"ImageFrame.ambiguous must be one of {FRAMES}, got {self.ambiguous!r}")
        sized = self.width is not None or self.height is not None
        if self.frame == "match":
            for name in ("width", "height"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ValueError(f"ImageFrame.{name} must be a positive integer (the recorded size), "
                                     f"got {value!r}")
        elif sized:
            raise ValueError("ImageFrame.width/height belong to frame='match'; use ImageFrame.matching(w, h)")

    @classmethod
    def matching(cls, width: Any, height: Any, *, ambiguous: str = "stored") -> "ImageFrame":
        """The frame whose size is ``(width, height)``, the size an annotation records."""
        return cls("match", int(width), int(height), ambiguous)

    def choose(self, stored_size: tuple[int, int], orientation: int) -> tuple[str, str]:
        """``(frame, why)`` for an image stored ``stored_size`` ``(w, h)`` with EXIF ``orientation``.

        ``why`` is ``"fixed"`` (frame ``"upright"``/``"stored"``), ``"size"`` (the recorded size is one frame's
        only), ``"shape"`` (neither frame's size, but the recorded landscape/portrait shape is one frame's only) or
        ``"default"`` (the size does not tell: the ``ambiguous`` frame).
        """
        if self.frame != "match":
            return self.frame, "fixed"
        w, h = stored_size
        upright = (h, w) if orientation in _SWAPS_SIDES else (w, h)
        recorded = (self.width, self.height)
        fits = [f for f, size in (("upright", upright), ("stored", (w, h))) if size == recorded]
        if len(fits) == 1:
            return fits[0], "size"
        if not fits and self.width != self.height and w != h and orientation in _SWAPS_SIDES:
            landscape = self.width > self.height
            return ("upright" if (upright[0] > upright[1]) == landscape else "stored"), "shape"
        return self.ambiguous, "default"


FrameLike = Union[str, ImageFrame]


def _as_frame(frame: FrameLike) -> ImageFrame:
    if isinstance(frame, ImageFrame):
        return frame
    if isinstance(frame, str) and frame in FRAMES:
        return ImageFrame(frame)
    raise ValueError(f"frame must be one of {FRAMES} or an ImageFrame (e.g. ImageFrame.matching(width, height)), "
                     f"got {frame!r}")


def load_image(source: Any, *, where: str | None = None, frame: FrameLike = "upright") -> Image.Image:
    """Load an image as an 8-bit PIL RGB image in the pixel frame ``frame`` decides (upright by default).

    Sources:

    * a path (``str`` or ``os.PathLike``) or encoded bytes (``bytes``, ``bytearray``, ``memoryview``: e.g. a shard
      member), in any format PIL reads;
    * a PIL image of any mode (a lazily opened one is decoded here);
    * a numpy array ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA of dtype ``uint8``,
      ``uint16`` (full 16-bit range) or ``float32``/``float64`` with values in ``[0, 1]``.

    Conversions:

    * **EXIF orientation** is applied when the frame is upright: a phone photo stored 480x320 with orientation 6
      comes out 320x480 (``frame="stored"`` keeps it 480x320). The result records its frame:
      ``image.info["exif_orientation"]`` (the tag found, 1 when there is none) and ``image.info["exif_applied"]``
      (whether the pixels were turned by it); the EXIF/XMP blocks that carry an orientation are dropped. An image
      :func:`load_image` returned is **taken as it is** when it comes back (its frame was decided then), so nothing
      rotates it twice or undoes a decision to keep it as stored. (The official loader ignores EXIF; the
      checkpoints' evaluation images carry no orientation, so parity is unaffected.)
    * **16-bit** images (modes ``I;16``, ``I;16B``, ``I``, ``uint16`` arrays) are scaled to 8 bits,
      ``round(v * 255 / 65535)``, not clipped (which would turn most of a 16-bit photo white); mode ``I`` values
      must lie in ``0..65535``. **Float** images (mode ``F``, float arrays) must lie in ``[0, 1]`` and are scaled by
      255 and rounded.
    * Other modes go through PIL's ``convert("RGB")``: ``L``, ``1``, ``P`` (with transparency via ``RGBA``),
      ``LA``/``RGBA``/``PA`` (alpha dropped, not composited, as the official loader), ``CMYK``, ``YCbCr``.

    An RGB PIL image without an orientation is returned as is (its ``info`` gains the two keys); anything else is
    a new image, and a file is closed before returning.

    Args:
        source: the image (see above).
        where: how to name the image in an error when it is not a path (e.g. ``"shard-000003.tar#000042.jpg"``);
            added in parentheses after a path.
        frame: ``"upright"`` (default), ``"stored"``, or an :class:`ImageFrame`, e.g.
            ``ImageFrame.matching(width, height)`` for an image whose boxes an annotation gives (the frame of the
            annotation wins). With ``"match"`` the decision is also recorded in ``image.info["frame_reason"]``
            (see :meth:`ImageFrame.choose`).

    Raises:
        ImageLoadError: for every failure (an ``OSError``): no such file, undecodable or truncated data, an
            unsupported source type, dtype, shape or value range, zero width or height, more than
            :data:`MAX_IMAGE_PIXELS` pixels, an aspect ratio beyond :data:`MAX_ASPECT_RATIO`.
    """
    name = _describe(source, where)
    frame = _as_frame(frame)
    try:
        return _load(source, name, frame)
    except ImageLoadError:
        raise
    except Exception as err:  # decoders of untrusted bytes raise many types (OSError, SyntaxError, struct.error...)
        raise ImageLoadError(f"cannot load image {name}: {type(err).__name__}: {err}") from err


def _describe(source: Any, where: str | None) -> str:
    """How an error names ``source``: the path (and ``where``), else ``where``, else a short description."""
    if isinstance(source, (str, os.PathLike)):
        return f"{os.fspath(source)} ({where})" if where else str(os.fspath(source))
    if where:
        return str(where)
    if isinstance(source, np.ndarray):
        return f"<array {tuple(source.shape)} {source.dtype}>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{memoryview(source).nbytes} bytes>"
    return f"<{type(source).__name__}>"


def _fail(name: str, reason: str) -> ImageLoadError:
    return ImageLoadError(f"cannot load image {name}: {reason}")


def _load(source: Any, name: str, frame: ImageFrame) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source))
        if not path.is_file():
            raise _fail(name, "no such file" if not path.exists() else "not a regular file")
        with Image.open(path) as image:
            return _finish(image, name, owned=True, frame=frame)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise _fail(name, "no data (0 bytes)")
        with Image.open(io.BytesIO(data)) as image:
            return _finish(image, name, owned=True, frame=frame)
    if isinstance(source, Image.Image):
        return _finish(source, name, owned=False, frame=frame)
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    raise _fail(name, f"unsupported source type {type(source).__name__}; pass a path, bytes, a PIL image or a "
                      "numpy array")


def _check_size(width: int, height: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise _fail(name, f"zero-area image ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise _fail(name, f"{width}x{height} = {width * height} pixels is more than the limit of "
                          f"{MAX_IMAGE_PIXELS} (glip_data.images.MAX_IMAGE_PIXELS)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise _fail(name, f"{width}x{height} has an aspect ratio beyond {MAX_ASPECT_RATIO}:1 "
                          "(glip_data.images.MAX_ASPECT_RATIO); it cannot be resized for the model")


def _finish(image: Image.Image, name: str, *, owned: bool, frame: ImageFrame) -> Image.Image:
    """Decode, read the orientation, convert to 8-bit RGB, put in ``frame``. ``owned``: the caller closes ``image``,
    so the result must not be ``image`` itself."""
    _check_size(*image.size, name)
    image.load()
    rgb = _to_rgb(image, name)
    if not owned and "exif_applied" in image.info:  # returned by load_image before: its frame is decided
        for key in ("exif_orientation", "exif_applied"):
            rgb.info[key] = image.info[key]
        return rgb
    orientation = _orientation(image, name)
    chosen, why = frame.choose(image.size, orientation)
    applied = chosen == "upright" and orientation in _UPRIGHT
    if applied:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    elif rgb is image and (owned or orientation != 1):
        rgb = image.copy()  # the caller's image keeps its EXIF block; ours drops it below
    if orientation != 1:
        for key in _ORIENTATION_CARRIERS:
            rgb.info.pop(key, None)
    rgb.info["exif_orientation"] = orientation
    rgb.info["exif_applied"] = applied
    if frame.frame == "match":
        rgb.info["frame_reason"] = why
    return rgb


def _orientation(image: Image.Image, name: str) -> int:
    """The EXIF orientation (1..8; 1 when absent, invalid or unreadable)."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as err:  # a damaged EXIF block does not make the pixels unreadable
        warnings.warn(f"{name}: unreadable EXIF data ({type(err).__name__}: {err}); orientation ignored",
                      stacklevel=4)
        return 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _gray_to_rgb(_sixteen_to_eight(np.asarray(image), name))
    if mode == "F":
        return _gray_to_rgb(_float_to_eight(np.asarray(image), name))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    elif mode == "La":
        image = image.convert("LA")  # PIL has no direct La -> RGB conversion
    return image.convert("RGB")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray), "L").convert("RGB")


def _sixteen_to_eight(values: np.ndarray, name: str) -> np.ndarray:
    """Integers in 0..65535 -> uint8, ``round(v * 255 / 65535)``; 65535 / 255 = 257, and ``(v + 128) // 257`` is
    that rounding exactly for integers."""
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise _fail(name, f"16-bit values must lie in 0..65535, got {values.min()}..{values.max()}")
    return ((values + 128) // 257).astype(np.uint8)


def _float_to_eight(values: np.ndarray, name: str) -> np.ndarray:
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise _fail(name, "float image holds NaN or infinite values")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise _fail(name, f"float images must lie in [0, 1], got {values.min():g}..{values.max():g} "
                          "(divide 0-255 data by 255, or pass uint8)")
    return np.rint(values * 255).astype(np.uint8)


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise _fail(name, "numpy images must have shape (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA")
    _check_size(array.shape[1], array.shape[0], name)
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "u" and size == 1:
        eight = array
    elif kind == "u" and size == 2:
        eight = _sixteen_to_eight(array, name)
    elif kind == "f" and size in (4, 8):
        eight = _float_to_eight(array, name)
    else:
        raise _fail(name, "numpy images must be uint8, uint16, or float32/float64 in [0, 1]")
    image = Image.fromarray(np.ascontiguousarray(eight))  # L, RGB or RGBA from the shape
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    rgb.info.update(exif_orientation=1, exif_applied=False)
    return rgb
