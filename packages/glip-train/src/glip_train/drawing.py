"""Pictures of detections: boxes and labels drawn on the image (``glip detect`` / ``glip ground`` write them)."""
from __future__ import annotations

from typing import IO, Any

__all__ = ["PALETTE", "draw_detections", "label_groups"]

PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40), (128, 0, 0), (128, 128, 0), (0, 0, 128),
]


def label_groups(result: dict, same_box_iou: float = 0.9) -> list[tuple[list[float], int, str]]:
    """``[(box, label of the best score, caption)]``: detections of (nearly) the same box -- GLIP scores every class
    for every anchor, so one object can pass the threshold under several names -- share one box, their names in
    score order (``"square 0.59, triangle 0.53"``), so no caption hides another.

    ``result``: ``"boxes"`` ``(K, 4)`` xyxy, ``"scores"`` ``(K,)``, ``"labels"`` ``(K,)``, ``"text_labels"`` (K
    names).
    """
    import torch

    from glip_data import box_iou

    order = torch.as_tensor(result["scores"]).argsort(descending=True, stable=True).tolist()
    boxes = torch.as_tensor(result["boxes"], dtype=torch.float32).reshape(-1, 4)
    iou = box_iou(boxes, boxes, legacy=False)
    groups: list[tuple[int, list[int]]] = []  # (index of the group's box, members)
    for i in order:
        for anchor, members in groups:
            if iou[anchor, i].item() >= same_box_iou:
                members.append(i)
                break
        else:
            groups.append((i, [i]))
    scores, labels = result["scores"], result["labels"]
    return [(boxes[anchor].tolist(), int(labels[anchor]),
             ", ".join(f"{result['text_labels'][i]} {float(scores[i]):.2f}" for i in members))
            for anchor, members in groups]


def draw_detections(image: Any, result: dict, path: str | IO[bytes]) -> None:
    """Save ``image`` (PIL) with the result's boxes and labels drawn as a JPEG (``path``: a file path or a binary
    stream)."""
    from PIL import ImageDraw, ImageFont

    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(2, round(max(canvas.size) / 400))
    for box, label, caption in label_groups(result):
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((box[0], box[1]), caption, font=font)
        y = box[1] - (bottom - top) - 2 if box[1] - (bottom - top) - 2 >= 0 else box[1]
        x = max(0, min(box[0], canvas.width - (right - left) - 4))  # a long caption moves left to stay readable
        draw.rectangle((x, y, x + right - left + 4, y + bottom - top + 2), fill=colour)
        draw.text((x + 2, y), caption, fill=(255, 255, 255), font=font)
    canvas.save(path, format="JPEG", quality=92)
