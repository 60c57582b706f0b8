"""Draw a :class:`~glip_data.sample.GroundingSample`: its boxes, and for each box the text it grounds to."""
from __future__ import annotations

from typing import Any

from glip_data.sample import GroundingSample

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40), (128, 0, 0)]


def render_sample(sample: GroundingSample, image: Any = None, caption: bool = True) -> Any:
    """A PIL RGB picture of the sample: each box outlined and labelled with its phrase (or category name).

    Args:
        sample: the sample; its ``image`` (or ``image``) must be a PIL image (load it with the reader first).
        image: a PIL image to draw on instead of ``sample.image``.
        caption: add a strip under the picture with the caption.
    """
    from PIL import Image, ImageDraw

    base = image if image is not None else sample.image
    if base is None:
        raise ValueError(f"{sample.image_path}: the sample has no image loaded; use reader.load_image(sample)")
    if not isinstance(base, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(base).__name__}")
    pic = base.convert("RGB").copy()
    draw = ImageDraw.Draw(pic)
    phrases = sample.phrases()
    for k, box in enumerate(sample.boxes.tolist()):
        color = _PALETTE[int(sample.labels[k]) % len(_PALETTE)] if sample.metadata.get("task") == "detection" \
            else _PALETTE[k % len(_PALETTE)]
        x1, y1, x2, y2 = box
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        text = phrases[k].strip() or "?"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1 + 1
        draw.rectangle([x1, ty, x1 + (right - left) + 3, ty + (bottom - top) + 2], fill=color)
        draw.text((x1 + 2, ty), text, fill=(255, 255, 255))
    if not caption:
        return pic
    text = sample.caption if len(sample.caption) <= 300 else sample.caption[:297] + "..."
    width = pic.width
    lines, line = [], ""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if probe.textlength(trial) > width - 8 and line:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    strip = 14 * len(lines) + 6
    out = Image.new("RGB", (width, pic.height + strip), (255, 255, 255))
    out.paste(pic, (0, 0))
    d = ImageDraw.Draw(out)
    for i, ln in enumerate(lines):
        d.text((4, pic.height + 3 + 14 * i), ln, fill=(0, 0, 0))
    return out


__all__ = ["render_sample"]
