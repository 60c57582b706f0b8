"""Seeded fuzzing of the input boundaries: only the documented exception types may escape.

* :func:`glip_data.load_image` raises :class:`~glip_data.ImageLoadError` and nothing else, whatever it is given:
  random bytes (some behind real format signatures), truncated and corrupted real PNG/JPEG/GIF/BMP/TIFF files,
  random array shapes, dtypes and values, other objects;
* the prompt pieces (:func:`clean_name`, :func:`detection_prompt`, :func:`find_phrase_spans`,
  :func:`find_noun_phrases`, :func:`spans_to_tokens` with a real tokenizer) raise only ``TypeError``/``ValueError``
  on random unicode (emoji, combining marks, right-to-left, zero-width, lone surrogates), empty strings, separators
  only, and malformed spans.

A few seconds in all; every case is reproducible from its seed.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

import glip_data.images
from glip_data import (
    ImageLoadError,
    clean_name,
    detection_prompt,
    find_noun_phrases,
    find_phrase_spans,
    load_image,
    spans_to_tokens,
)

SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF",
              b"\x00\x00\x01\x00"]


def _check_image(source, where):
    try:
        image = load_image(source)
    except ImageLoadError:
        return
    except Exception as err:  # the property under test: nothing else escapes
        pytest.fail(f"{where}: load_image raised {type(err).__name__}: {err}")
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.width > 0 and image.height > 0, where


def _real_files(rng) -> list[bytes]:
    arr = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    files = []
    for fmt, image in (("PNG", Image.fromarray(arr)), ("JPEG", Image.fromarray(arr)), ("GIF", Image.fromarray(arr)),
                       ("BMP", Image.fromarray(arr)), ("TIFF", Image.fromarray(arr)),
                       ("PNG", Image.fromarray((arr[..., 0].astype(np.uint16) * 257))),
                       ("PNG", Image.fromarray(arr).convert("P")), ("WEBP", Image.fromarray(arr))):
        buf = io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = int(rng.integers(0, 10))  # valid and invalid orientations
        try:
            image.save(buf, fmt, exif=exif) if fmt in ("PNG", "JPEG", "WEBP") else image.save(buf, fmt)
        except (OSError, KeyError):  # a PIL build without that encoder
            continue
        files.append(buf.getvalue())
    return files


@pytest.fixture
def small_pixel_limit(monkeypatch):
    # a random header may claim a large image: keep what a fuzz case can allocate small
    monkeypatch.setattr(glip_data.images, "MAX_IMAGE_PIXELS", 1 << 20)


def test_load_image_fuzz_bytes(small_pixel_limit):
    rng = np.random.default_rng(1234)
    files = _real_files(rng)
    assert len(files) >= 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for data in files:
            _check_image(data, "intact file")
            for cut in sorted(set(rng.integers(0, len(data), 40).tolist())):
                _check_image(data[:cut], f"truncated at {cut}")
            for trial in range(40):
                corrupt = bytearray(data)
                for pos in rng.integers(0, len(data), int(rng.integers(1, 8))):
                    corrupt[pos] = int(rng.integers(0, 256))
                _check_image(bytes(corrupt), f"corrupted #{trial}")
        for trial in range(600):
            body = rng.integers(0, 256, int(rng.integers(0, 600)), dtype=np.uint8).tobytes()
            if trial % 2:
                body = SIGNATURES[trial % len(SIGNATURES)] + body
            _check_image(body, f"random bytes #{trial}")


def _pick(rng, options):
    return options[int(rng.integers(0, len(options)))]


def _random_array(rng):
    dtype = _pick(rng, ["uint8", "uint16", "float32", "float64", "int8", "int32", "int64", "float16", "bool",
                        "complex64", "object", "U3"])
    ndim = int(rng.integers(0, 5))
    shape = tuple(_pick(rng, [0, 1, 2, 3, 4, 5, 17]) for _ in range(ndim))
    if dtype == "object":
        return np.empty(shape, dtype=object)
    if dtype == "U3":
        return np.full(shape, "abc")
    values = rng.normal(0.5, 2.0, shape) if rng.random() < 0.5 else rng.random(shape)
    if rng.random() < 0.2 and values.size:
        values.flat[int(rng.integers(0, values.size))] = _pick(rng, [np.nan, np.inf, -np.inf])
    with np.errstate(all="ignore"):
        if dtype.startswith(("int", "uint")):
            values = np.nan_to_num(values * 300, nan=0, posinf=0, neginf=0)
        return values.astype(dtype)


def test_load_image_fuzz_arrays_and_objects(small_pixel_limit):
    rng = np.random.default_rng(99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for trial in range(1000):
            _check_image(_random_array(rng), f"array #{trial}")
        for other in (None, 3, 2.5, [1, 2], {"a": 1}, object(), "", "no/such/file.png", b"\x00", memoryview(b""),
                      np.float32(1.0), Image.new("RGB", (0, 0)), Image.new("L", (3, 3)).convert("F")):
            _check_image(other, repr(other))


# --- text -------------------------------------------------------------------------------------------------------------

_ALPHABETS = [
    (0x20, 0x7E),  # ASCII
    (0xA0, 0x17F),  # Latin-1, Latin Extended-A
    (0x300, 0x36F),  # combining marks
    (0x590, 0x5FF), (0x600, 0x6FF),  # Hebrew, Arabic (right to left)
    (0x4E00, 0x4E80),  # CJK
    (0x1F300, 0x1F64F),  # emoji
    (0x200B, 0x200F),  # zero-width spaces and joiners, direction marks
    (0xD800, 0xD805),  # lone surrogates (not encodable as UTF-8)
]
_SEPARATORS = [". ", " . ", ".", " ", "\t", "\n", "_", "(", ")", "  ", ""]


def _random_text(rng, max_len=20) -> str:
    kind = rng.random()
    if kind < 0.1:
        return ""
    if kind < 0.25:
        return "".join(_pick(rng, _SEPARATORS) for _ in range(int(rng.integers(1, 6))))
    chars = []
    for _ in range(int(rng.integers(1, max_len))):
        lo, hi = _pick(rng, _ALPHABETS) if rng.random() < 0.5 else _ALPHABETS[0]
        chars.append(chr(int(rng.integers(lo, hi + 1))))
    return "".join(chars)


def _random_spans(rng, text: str, valid: list):
    """Mostly valid spans, sometimes malformed ones of every kind."""
    r = rng.random()
    if r < 0.5:
        return valid
    n = len(text)
    junk = [-1, 0, 1, n, n + 1, 2**70, 1.5, float("nan"), float("inf"), "3", None, True]
    pick = lambda: _pick(rng, junk)  # noqa: E731
    if r < 0.7:
        return [[(pick(), pick())] for _ in range(int(rng.integers(0, 4)))]
    if r < 0.8:
        return [(pick(), pick())]
    if r < 0.9:
        return [[pick()]] if rng.random() < 0.5 else pick()
    return [[(int(rng.integers(0, n + 1)), int(rng.integers(0, n + 2)))] for _ in range(3)]


def _only(allowed, fn, *args, where="", **kwargs):
    try:
        return fn(*args, **kwargs)
    except allowed:
        return None
    except Exception as err:
        pytest.fail(f"{where}: {fn.__name__} raised {type(err).__name__}: {err}")


def test_prompt_pieces_fuzz(minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    rng = np.random.default_rng(2024)
    allowed = (TypeError, ValueError)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for trial in range(250):
            where = f"trial {trial}"
            names = [_random_text(rng) for _ in range(int(rng.integers(0, 5)))]
            if rng.random() < 0.1:
                names.append(_pick(rng, [None, 3, b"bytes"]))
            for name in names:
                cleaned = _only(allowed, clean_name, name, where=where)
                assert cleaned is None or isinstance(cleaned, str)
            built = _only(allowed, detection_prompt, names, where=where)
            caption, valid = built if built is not None else (_random_text(rng, 60), [])
            phrases = []
            for _ in range(int(rng.integers(0, 4))):
                if caption and rng.random() < 0.5:
                    a = int(rng.integers(0, len(caption)))
                    phrases.append(caption[a: a + int(rng.integers(1, 8))])
                elif rng.random() < 0.3:
                    phrases.append([_random_text(rng, 5) for _ in range(int(rng.integers(0, 3)))])
                else:
                    phrases.append(_random_text(rng, 8))
            if rng.random() < 0.1:
                phrases = _pick(rng, [caption, None, [None], [[1]]])
            for ignore_case in (True, False):
                found = _only(allowed, find_phrase_spans, caption, phrases, ignore_case=ignore_case, where=where)
                for spans in found or []:
                    assert all(0 <= s < e <= len(caption) for s, e in spans), where
            noun_phrases = _only(allowed, find_noun_phrases, caption, where=where)
            assert noun_phrases is None or all(p in caption for p in noun_phrases)
            spans = _random_spans(rng, caption, valid)
            max_length = _pick(rng, [256, 8, None])
            tokens = _only(allowed, spans_to_tokens, tokenizer, caption, spans, max_length=max_length, where=where)
            if tokens is not None:
                assert len(tokens) == len(spans) and all(isinstance(t, int) for toks in tokens for t in toks)
