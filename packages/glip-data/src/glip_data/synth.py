"""The synthetic grounding world: seeded images of coloured shapes, written in the real dataset formats.

Objects are defined by **shape × colour × size × texture** and drawn with PIL on varied backgrounds. One call to
:func:`generate_world` (CLI: ``glip-data synth --out DIR --seed N``) writes::

    DIR/world.json                  what was generated: config, vocabularies, files, counts
    DIR/images/<split>/NNNNNN.jpg   the images (image root of every file below)
    DIR/detection_train.json        COCO detection, labelled with only the *detection shapes*
    DIR/grounding_train.json        MDETR grounding: captions ("a small red circle left of a blue star.") whose
                                    phrases use attributes and every shape, also those never labelled for detection
    DIR/captions_train.jsonl        caption-only lines (entities with spans, no boxes) for pseudo-labelling
    DIR/captions_train_gt.jsonl     the same lines with their true boxes (score 1.0), to grade pseudo-labels
    DIR/coco_val.json               COCO evaluation set with every shape
    DIR/lvis_val.json               LVIS v1 evaluation set on the same images, fine-grained colour_shape categories
                                    with r/c/f frequency from the training counts, neg / not-exhaustive ids

Guarantees:

* **Exact boxes.** A box is the pixel extent of the object's own mask (objects never overlap: they are placed with a
  gap of at least ``gap`` pixels). COCO/MDETR/LVIS ``bbox`` is ``[x, y, w, h]`` with ``w`` the number of pixel
  columns, so the official reading ``x2 = x + w - 1`` is the last column of the object; xyxy files (captions) hold the
  continuous box ``x + w``.
* **Learnable tasks.** Colours are saturated and far from the muted backgrounds (a minimum RGB distance is
  enforced); sizes are relative to the image; every phrase names its shape; relations ("left of", "above", ...) are
  true of the boxes (strict separation).
* **Reproducible.** Every image and annotation is a function of ``(seed, split, index)``; the same seed gives
  byte-identical files (same Pillow/libjpeg), and changing one split's size does not change the others.

Frequencies follow LVIS's definition on the training images (detection + grounding sets): ``r`` fewer than 10
images, ``c`` 10-99, ``f`` 100 or more. Colour×shape pairs are drawn from a seeded Zipf-like distribution
Shapes are close to balanced (``shape_skew``: the detection and evaluation tasks stay learnable) while each shape
has its own seeded, strongly skewed colour distribution (``color_skew``), so the colour_shape categories form a long
tail and, at the default sizes, all three groups occur.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 30),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
#: Object extent as a fraction of the image's shorter side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.13, 0.19), "medium": (0.23, 0.30), "large": (0.34, 0.42)}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

_SPLIT_IDS = {"detection": 1, "grounding": 2, "captions": 3, "val": 4, "world": 5}


@dataclass(frozen=True)
class SynthConfig:
    """Everything that shapes the world. Defaults generate 560 images in a few seconds.

    Attributes:
        seed: the seed of everything.
        num_detection, num_grounding, num_captions, num_val: images per split.
        min_size, max_size: image width and height are drawn uniformly in this range (pixels).
        max_objects: objects per image are 1..max_objects.
        captions_per_image: grounding sentences per image (MDETR entries share the image, ``sentence_id`` 0..).
        shapes: the shape vocabulary; detection_shapes: the subset labelled in the detection set (the others appear
            only in captions and evaluation).
        colors, sizes, textures: the attribute vocabularies (names must be keys of COLORS / SIZES / TEXTURES).
        background: ``"varied"`` (noise, gradients, stripes, checks) or ``"plain"`` (one flat colour).
        color_jitter: per-channel jitter of object colours (0 for exact colours).
        image_format: ``"jpg"`` or ``"png"`` (lossless).
        jpeg_quality: JPEG quality (4:4:4 sampling, so colours stay clean).
        gap: minimum pixels between two objects' boxes.
        shape_skew: Zipf exponent of the shape distribution over a seeded ranking (0 = uniform).
        color_skew: Zipf exponent of each shape's colour distribution (its own seeded ranking; 0 = uniform).
        not_exhaustive_prob: chance that an LVIS image marks a category with several instances as not exhaustively
            annotated (and leaves one of its instances out).
        num_neg_categories: verified-absent categories listed per LVIS image.
    """

    seed: int = 0
    num_detection: int = 200
    num_grounding: int = 200
    num_captions: int = 64
    num_val: int = 96
    min_size: int = 128
    max_size: int = 320
    max_objects: int = 4
    captions_per_image: int = 2
    shapes: tuple[str, ...] = SHAPES
    detection_shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
    colors: tuple[str, ...] = tuple(COLORS)
    sizes: tuple[str, ...] = tuple(SIZES)
    textures: tuple[str, ...] = TEXTURES
    background: str = "varied"
    color_jitter: int = 10
    image_format: str = "jpg"
    jpeg_quality: int = 92
    gap: int = 3
    shape_skew: float = 0.4
    color_skew: float = 2.2
    not_exhaustive_prob: float = 0.15
    num_neg_categories: int = 4

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field of an inconsistent configuration."""
        for name in ("num_detection", "num_grounding", "num_captions", "num_val"):
            if getattr(self, name) < 0:
                raise ValueError(f"SynthConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 48 <= self.min_size <= self.max_size:
            raise ValueError(f"SynthConfig needs 48 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.max_objects < 1 or self.captions_per_image < 1:
            raise ValueError("SynthConfig.max_objects and captions_per_image must be >= 1")
        for attr, vocab in (("shapes", SHAPES), ("colors", COLORS), ("sizes", SIZES), ("textures", TEXTURES)):
            values = getattr(self, attr)
            unknown = [v for v in values if v not in vocab]
            if not values or unknown or len(set(values)) != len(values):
                raise ValueError(f"SynthConfig.{attr} must be distinct values of {tuple(vocab)}, got {values}")
        if not self.detection_shapes or not set(self.detection_shapes) <= set(self.shapes):
            raise ValueError(f"SynthConfig.detection_shapes must be a non-empty subset of shapes, "
                             f"got {self.detection_shapes}")
        if self.background not in ("varied", "plain"):
            raise ValueError(f"SynthConfig.background must be 'varied' or 'plain', got {self.background!r}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"SynthConfig.image_format must be 'jpg' or 'png', got {self.image_format!r}")


@dataclass
class SynthObject:
    """One drawn object. ``box`` is ``(x1, y1, x2, y2)`` in pixels, ``x2``/``y2`` exclusive (the mask's extent)."""

    shape: str
    color: str
    size: str
    texture: str
    box: tuple[int, int, int, int]
    area: int = 0

    @property
    def category(self) -> str:
        """The fine-grained (LVIS) category name, e.g. ``red_circle``."""
        return f"{self.color}_{self.shape}"

    def xywh(self) -> list[int]:
        x1, y1, x2, y2 = self.box
        return [x1, y1, x2 - x1, y2 - y1]

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "texture": self.texture}


@dataclass
class SynthScene:
    width: int
    height: int
    objects: list[SynthObject]
    image: Any = None  # PIL image once rendered


@dataclass
class SynthWorld:
    """Where :func:`generate_world` wrote everything (paths are absolute)."""

    root: Path
    image_root: Path
    detection_train: Path
    grounding_train: Path
    captions_train: Path
    captions_train_gt: Path
    coco_val: Path
    lvis_val: Path
    manifest: Path
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str | os.PathLike) -> SynthWorld:
        """The world previously written to ``root`` (reads ``world.json``)."""
        root = Path(root).resolve()
        manifest = json.loads((root / "world.json").read_text())
        files = {k: root / v for k, v in manifest["files"].items()}
        return cls(root=root, manifest=root / "world.json", counts=manifest["counts"], **files)


def world_image_root(path: str | os.PathLike) -> Path | None:
    """The image folder of a synthetic world that holds the file ``path`` (``world.json`` beside it), else None
    (readers then default to the annotation file's own folder)."""
    path = Path(path)
    manifest = path.parent / "world.json"
    if not (path.is_file() and manifest.is_file()):
        return None
    try:
        root = json.loads(manifest.read_text())["files"]["image_root"]
    except (ValueError, KeyError, TypeError):
        return None
    return path.parent / root


# ---------------------------------------------------------------------------------------------------------------------
# drawing


def _shape_mask(shape: str, s: int) -> Any:
    """A binary ``s x s`` PIL "L" mask of ``shape`` filling most of the square."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    c = (s - 1) / 2.0
    r = (s - 1) / 2.0
    if shape == "circle":
        draw.ellipse([0, 0, s - 1, s - 1], fill=255)
    elif shape == "square":
        inset = round(0.08 * s)
        draw.rectangle([inset, inset, s - 1 - inset, s - 1 - inset], fill=255)
    elif shape == "triangle":
        draw.polygon([(c, 0), (s - 1, s - 1), (0, s - 1)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else 0.42 * r
            pts.append((c + rad * math.cos(ang), c + rad * math.sin(ang)))
        draw.polygon(pts, fill=255)
    elif shape == "hexagon":
        draw.polygon([(c + r * math.cos(k * math.pi / 3), c + r * math.sin(k * math.pi / 3)) for k in range(6)],
                     fill=255)
    elif shape == "diamond":
        draw.polygon([(c, 0), (c + 0.62 * r, c), (c, s - 1), (c - 0.62 * r, c)], fill=255)
    elif shape == "cross":
        t = 0.17 * s
        draw.rectangle([c - t, 0, c + t, s - 1], fill=255)
        draw.rectangle([0, c - t, s - 1, c + t], fill=255)
    elif shape == "ring":
        inset = 0.27 * s
        draw.ellipse([0, 0, s - 1, s - 1], fill=255)
        draw.ellipse([inset, inset, s - 1 - inset, s - 1 - inset], fill=0)
    else:  # pragma: no cover - validated by SynthConfig
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _texture_layer(color: tuple[int, int, int], texture: str, s: int, phase: int) -> Any:
    """An ``s x s`` RGB tile of ``color`` with the texture drawn in a contrasting shade of it."""
    from PIL import Image, ImageDraw

    layer = Image.new("RGB", (s, s), color)
    if texture == "solid":
        return layer
    lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    shade = tuple(int(v * 0.45) for v in color) if lum > 90 else tuple(int(v + (255 - v) * 0.55) for v in color)
    draw = ImageDraw.Draw(layer)
    step = max(5, s // 5)
    if texture == "striped":
        width = max(2, step // 2)
        for k in range(-s, 2 * s, step):
            x = k + phase % step
            draw.line([(x, 0), (x + s, s)], fill=shade, width=width)
    elif texture == "dotted":
        rad = max(1, step // 4)
        for y in range(step // 2, s, step):
            for x in range(step // 2 + (phase % 2) * (step // 2), s, step):
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=shade)
    return layer


def _background(rng: np.random.Generator, width: int, height: int, mode: str,
                avoid: list[tuple[int, int, int]]) -> np.ndarray:
    """``(H, W, 3)`` uint8 muted background whose base colour is far from every colour in ``avoid``."""
    for _ in range(64):
        hue = rng.random()
        sat = rng.uniform(0.0, 0.22)
        val = rng.uniform(0.38, 0.68)
        base = np.array(_hsv_to_rgb(hue, sat, val)) * 255.0
        if all(np.linalg.norm(base - np.array(c, dtype=np.float64)) > 90 for c in avoid):
            break
    # Built from separable (H, 1) and (1, W) terms and int16 noise: this is the hot loop of the generator.
    pattern = np.zeros((height, width), dtype=np.float32)
    img = np.empty((height, width, 3), dtype=np.int16)
    img[...] = np.rint(base).astype(np.int16)
    if mode == "varied":
        kind = int(rng.integers(4))
        ys = np.arange(height, dtype=np.float32)[:, None]
        xs = np.arange(width, dtype=np.float32)[None, :]
        if kind == 1:  # gradient
            direction = rng.uniform(0, 2 * math.pi)
            amp = rng.uniform(20, 45)
            pattern = pattern + (math.cos(direction) * (xs / width - 0.5)
                                 + math.sin(direction) * (ys / height - 0.5)) * amp
        elif kind == 2:  # soft stripes
            period, slant = rng.uniform(12, 40), rng.uniform(-1, 1)
            pattern = pattern + np.sin((2 * math.pi / period) * (xs + ys * slant)) * 10
        elif kind == 3:  # faint checks
            cell = int(rng.integers(10, 32))
            pattern = pattern + (((xs // cell + ys // cell) % 2) * 18 - 9)
        img += np.rint(pattern).astype(np.int16)[..., None]
        img += rng.integers(-9, 10, size=(height, width, 3), dtype=np.int8)
    return np.clip(img, 0, 255).astype(np.uint8)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


# ---------------------------------------------------------------------------------------------------------------------
# scenes


class _World:
    """The seeded vocabularies and distributions shared by all splits."""

    def __init__(self, cfg: SynthConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, _SPLIT_IDS["world"]])
        self.pairs = [(c, s) for s in cfg.shapes for c in cfg.colors]  # shape-major: LVIS ids follow this order
        # p(colour, shape) = p(shape) p(colour | shape): near-balanced shapes, a long tail of colours per shape.
        shape_rank = rng.permutation(len(cfg.shapes))
        p_shape = 1.0 / (shape_rank + 1.0) ** cfg.shape_skew
        weights = []
        for s_idx in range(len(cfg.shapes)):
            color_rank = rng.permutation(len(cfg.colors))
            p_color = 1.0 / (color_rank + 1.0) ** cfg.color_skew
            weights.extend(p_shape[s_idx] * p_color / p_color.sum())
        weights = np.asarray(weights)
        self.pair_weights = weights / weights.sum()

    def pair_probs(self, shapes: tuple[str, ...]) -> np.ndarray:
        allowed = np.array([s in shapes for _, s in self.pairs])
        p = np.where(allowed, self.pair_weights, 0.0)
        return p / p.sum()

    def scene(self, rng: np.random.Generator, shapes: tuple[str, ...]) -> SynthScene:
        """Sample and render one scene with objects of ``shapes``."""
        from PIL import Image

        cfg = self.cfg
        width = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        height = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        short = min(width, height)
        n = int(rng.integers(1, cfg.max_objects + 1))
        probs = self.pair_probs(shapes)
        placed: list[tuple[SynthObject, int, int, int, tuple[int, int, int]]] = []
        for _ in range(n):
            color, shape = self.pairs[int(rng.choice(len(self.pairs), p=probs))]
            size = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
            texture = cfg.textures[int(rng.integers(len(cfg.textures)))]
            lo, hi = SIZES[size]
            s = max(12, int(round(rng.uniform(lo, hi) * short)))
            mask = _shape_mask(shape, s)
            l, t, r, b = mask.getbbox()
            for _attempt in range(40):
                x0 = int(rng.integers(-l, width - r + 1))
                y0 = int(rng.integers(-t, height - b + 1))
                box = (x0 + l, y0 + t, x0 + r, y0 + b)
                if all(_separated(box, other.box, cfg.gap) for other, *_ in placed):
                    break
            else:
                continue  # no room left for this object
            jitter = rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, size=3) if cfg.color_jitter else (0, 0, 0)
            rgb = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLORS[color], jitter))
            area = int(np.count_nonzero(np.asarray(mask)))
            placed.append((SynthObject(shape, color, size, texture, box, area), x0, y0, s, rgb))
        if not placed:  # pragma: no cover - the first object always fits
            raise RuntimeError("could not place any object")
        bg = _background(rng, width, height, cfg.background, [COLORS[o.color] for o, *_ in placed])
        image = Image.fromarray(bg, "RGB")
        for obj, x0, y0, s, rgb in placed:
            mask = _shape_mask(obj.shape, s)
            layer = _texture_layer(rgb, obj.texture, s, int(rng.integers(1000)))
            image.paste(layer, (x0, y0), mask)
        return SynthScene(width, height, [p[0] for p in placed], image)


def _separated(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def true_relations(a: SynthObject, b: SynthObject) -> list[str]:
    """The relations of :data:`RELATIONS` that hold for "a <relation> b" (strict separation of the boxes)."""
    out = []
    if a.box[2] <= b.box[0]:
        out.append("left of")
    if b.box[2] <= a.box[0]:
        out.append("right of")
    if a.box[3] <= b.box[1]:
        out.append("above")
    if b.box[3] <= a.box[1]:
        out.append("below")
    return out


def _phrase(rng: np.random.Generator, obj: SynthObject) -> str:
    words = []
    if rng.random() < 0.5:
        words.append(obj.size)
    if obj.texture != "solid" and rng.random() < 0.6:
        words.append(obj.texture)
    if rng.random() < 0.85:
        words.append(obj.color)
    words.append(obj.shape)
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}"


def make_caption(rng: np.random.Generator, objects: list[SynthObject]) -> tuple[str, list[int], list[tuple[int, int]]]:
    """Describe every object once, in a random order, with true relations between neighbours in the sentence.

    Returns:
        ``(caption, order, spans)``: ``order[k]`` is the object mentioned k-th and ``spans[k]`` its phrase's
        ``[start, end)`` in the caption.
    """
    order = [int(i) for i in rng.permutation(len(objects))]
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    cursor = 0

    def add(text: str, is_phrase: bool = False) -> None:
        nonlocal cursor
        if is_phrase:
            spans.append((cursor, cursor + len(text)))
        parts.append(text)
        cursor += len(text)

    k = 0
    while k < len(order):
        if parts:
            add(". ")
        a = objects[order[k]]
        if k + 1 < len(order) and rng.random() < 0.75:
            b = objects[order[k + 1]]
            rels = true_relations(a, b)
            add(_phrase(rng, a), True)
            add(f" {rels[int(rng.integers(len(rels)))]} " if rels else " and ")
            add(_phrase(rng, b), True)
            k += 2
        else:
            if rng.random() < 0.4:
                add("there is ")
            add(_phrase(rng, a), True)
            k += 1
    add(".")
    caption = "".join(parts)
    return caption, order, spans


# ---------------------------------------------------------------------------------------------------------------------
# writing


def _encode(image: Any, cfg: SynthConfig) -> bytes:
    buf = io.BytesIO()
    if cfg.image_format == "jpg":
        image.save(buf, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)
    else:
        image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")


def _polygon(box: tuple[int, int, int, int]) -> list[list[float]]:
    x1, y1, x2, y2 = box
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def _scenes(world: _World, split: str, count: int, shapes: tuple[str, ...], out: Path, progress: Any):
    """Yield ``(index, relative_image_path, rng, scene)`` and write each image."""
    cfg = world.cfg
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for i in progress(range(count), desc=f"synth {split}"):
        rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], i])
        scene = world.scene(rng, shapes)
        rel = f"{split}/{i:06d}.{cfg.image_format}"
        (out / "images" / rel).write_bytes(_encode(scene.image, cfg))
        scene.image = None
        yield i, rel, rng, scene


def generate_world(out_dir: str | os.PathLike, seed: int | None = None, config: SynthConfig | None = None,
                   progress: bool = False) -> SynthWorld:
    """Generate the synthetic grounding world into ``out_dir`` (created if needed; files are overwritten).

    Args:
        out_dir: the output folder.
        seed: overrides ``config.seed`` when given.
        config: sizes and vocabularies (:class:`SynthConfig`); default sizes take a few seconds.
        progress: show tqdm progress bars.

    Returns:
        A :class:`SynthWorld` with the paths of every file.
    """
    from glip_data.readers.captions import caption_record

    cfg = config or SynthConfig()
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=int(seed))
    world = _World(cfg)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if progress:
        from tqdm import tqdm as bar
    else:
        def bar(it, **_):
            return it

    shape_ids = {s: i + 1 for i, s in enumerate(cfg.shapes)}
    pair_ids = {f"{c}_{s}": i + 1 for i, (c, s) in enumerate(world.pairs)}
    train_images = {p: 0 for p in pair_ids}
    train_instances = {p: 0 for p in pair_ids}

    def count_training(scene: SynthScene) -> None:
        for cat in {o.category for o in scene.objects}:
            train_images[cat] += 1
        for o in scene.objects:
            train_instances[o.category] += 1

    # -- detection set: only the detection shapes, labelled with their shape ---------------------------------------------
    det_images, det_anns = [], []
    for i, rel, _rng, scene in _scenes(world, "detection", cfg.num_detection, cfg.detection_shapes, out, bar):
        count_training(scene)
        det_images.append({"id": i + 1, "file_name": rel, "width": scene.width, "height": scene.height})
        for obj in scene.objects:
            det_anns.append({"id": len(det_anns) + 1, "image_id": i + 1, "category_id": shape_ids[obj.shape],
                             "bbox": obj.xywh(), "area": obj.area, "iscrowd": 0,
                             "segmentation": _polygon(obj.box), "attributes": obj.attributes()})
    det_cats = [{"id": shape_ids[s], "name": s, "supercategory": "shape"}
                for s in cfg.shapes if s in cfg.detection_shapes]
    _dump(out / "detection_train.json", {"info": {"description": "glip-data synthetic world: detection",
                                                  "seed": cfg.seed},
                                         "images": det_images, "annotations": det_anns, "categories": det_cats})

    # -- grounding set: every shape, MDETR entries (one per sentence) ---------------------------------------------------
    g_images, g_anns = [], []
    for i, rel, rng, scene in _scenes(world, "grounding", cfg.num_grounding, cfg.shapes, out, bar):
        count_training(scene)
        for sentence in range(cfg.captions_per_image):
            caption, order, spans = make_caption(rng, scene.objects)
            entry_id = len(g_images) + 1
            g_images.append({
                "id": entry_id, "file_name": rel, "width": scene.width, "height": scene.height,
                "caption": caption, "dataset_name": "synth", "tokens_negative": [[0, len(caption)]],
                "sentence_id": sentence, "original_img_id": i + 1,
                "tokens_positive_eval": [[list(span)] for span in spans],
            })
            for k, span in zip(order, spans):
                obj = scene.objects[k]
                g_anns.append({"id": len(g_anns) + 1, "image_id": entry_id, "category_id": 1, "bbox": obj.xywh(),
                               "area": obj.area, "iscrowd": 0, "tokens_positive": [list(span)],
                               "phrase_ids": (i + 1) * 100 + k, "attributes": obj.attributes()})
    _dump(out / "grounding_train.json", {"info": {"description": "glip-data synthetic world: grounding",
                                                  "seed": cfg.seed},
                                         "images": g_images, "annotations": g_anns,
                                         "categories": [{"id": 1, "name": "object", "supercategory": "object"}]})

    # -- caption-only set (and its ground truth) -------------------------------------------------------------------------
    cap_lines, gt_lines = [], []
    for i, rel, rng, scene in _scenes(world, "captions", cfg.num_captions, cfg.shapes, out, bar):
        caption, order, spans = make_caption(rng, scene.objects)
        entities = [{"phrase": caption[s:e], "tokens_positive": [[s, e]]} for s, e in spans]
        cap_lines.append(caption_record(rel, scene.width, scene.height, caption, entities, image_id=i + 1))
        gt_entities = [{**ent, "boxes": [list(scene.objects[k].box)], "scores": [1.0]}
                       for ent, k in zip(entities, order)]
        gt_lines.append(caption_record(rel, scene.width, scene.height, caption, gt_entities, box_convention="exact",
                                       image_id=i + 1))
    for name, lines in (("captions_train.jsonl", cap_lines), ("captions_train_gt.jsonl", gt_lines)):
        (out / name).write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines),
                                encoding="utf-8")

    # -- evaluation: COCO (every shape) and LVIS (colour_shape) on the same images ---------------------------------------
    coco_images, coco_anns, lvis_images, lvis_anns = [], [], [], []
    url_root = "http://synth.glip.invalid/"
    for i, rel, rng, scene in _scenes(world, "val", cfg.num_val, cfg.shapes, out, bar):
        coco_images.append({"id": i + 1, "file_name": rel, "width": scene.width, "height": scene.height})
        for obj in scene.objects:
            coco_anns.append({"id": len(coco_anns) + 1, "image_id": i + 1, "category_id": shape_ids[obj.shape],
                              "bbox": obj.xywh(), "area": obj.area, "iscrowd": 0,
                              "segmentation": _polygon(obj.box), "attributes": obj.attributes()})
        present = sorted({pair_ids[o.category] for o in scene.objects})
        absent = [c for c in range(1, len(pair_ids) + 1) if c not in present]
        neg = sorted(int(c) for c in rng.choice(absent, size=min(cfg.num_neg_categories, len(absent)),
                                                replace=False)) if absent else []
        objects = list(scene.objects)
        not_exhaustive: list[int] = []
        multi = sorted({o.category for o in objects if sum(p.category == o.category for p in objects) > 1})
        if multi and rng.random() < cfg.not_exhaustive_prob:
            cat = multi[int(rng.integers(len(multi)))]
            not_exhaustive = [pair_ids[cat]]
            last = max(k for k, o in enumerate(objects) if o.category == cat)
            objects.pop(last)  # the annotation left out: "not exhaustively annotated"
        lvis_images.append({"id": i + 1, "coco_url": url_root + rel, "width": scene.width, "height": scene.height,
                            "neg_category_ids": neg, "not_exhaustive_category_ids": not_exhaustive,
                            "license": 0, "flickr_url": url_root + rel, "date_captured": "2020-01-01 00:00:00"})
        for obj in objects:
            lvis_anns.append({"id": len(lvis_anns) + 1, "image_id": i + 1, "category_id": pair_ids[obj.category],
                              "bbox": obj.xywh(), "area": obj.area, "segmentation": _polygon(obj.box)})
    _dump(out / "coco_val.json", {"info": {"description": "glip-data synthetic world: evaluation", "seed": cfg.seed},
                                  "images": coco_images, "annotations": coco_anns,
                                  "categories": [{"id": shape_ids[s], "name": s, "supercategory": "shape"}
                                                 for s in cfg.shapes]})
    lvis_cats = []
    for name, cid in pair_ids.items():
        n_img = train_images[name]
        freq = "r" if n_img < 10 else ("c" if n_img < 100 else "f")
        color, shape = name.split("_", 1)
        lvis_cats.append({"id": cid, "name": name, "synonyms": [name], "synset": f"{name}.n.01",
                          "def": f"a {color} {shape}", "frequency": freq, "image_count": n_img,
                          "instance_count": train_instances[name]})
    _dump(out / "lvis_val.json", {"info": {"description": "glip-data synthetic world: LVIS-style evaluation",
                                           "seed": cfg.seed},
                                  "images": lvis_images, "annotations": lvis_anns, "categories": lvis_cats,
                                  "licenses": [{"id": 0, "name": "synthetic", "url": ""}]})

    files = {"image_root": "images", "detection_train": "detection_train.json",
             "grounding_train": "grounding_train.json", "captions_train": "captions_train.jsonl",
             "captions_train_gt": "captions_train_gt.jsonl", "coco_val": "coco_val.json", "lvis_val": "lvis_val.json"}
    counts = {"detection_images": len(det_images), "detection_boxes": len(det_anns),
              "grounding_images": cfg.num_grounding, "grounding_entries": len(g_images),
              "grounding_boxes": len(g_anns), "caption_images": len(cap_lines), "val_images": len(coco_images),
              "val_boxes": len(coco_anns), "lvis_val_boxes": len(lvis_anns),
              **{f"lvis_categories_{f}": sum(c["frequency"] == f for c in lvis_cats) for f in "rcf"}}
    manifest = {
        "generator": "glip-data synth",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "shapes": list(cfg.shapes),
        "detection_shapes": list(cfg.detection_shapes),
        "unseen_shapes": [s for s in cfg.shapes if s not in cfg.detection_shapes],
        "colors": {c: list(COLORS[c]) for c in cfg.colors},
        "sizes": {s: list(SIZES[s]) for s in cfg.sizes},
        "textures": list(cfg.textures),
        "relations": list(RELATIONS),
        "notes": "captions use left/right: a horizontal flip must swap them (docs/official_model.md#quirks item 17)",
        "files": files,
        "counts": counts,
    }
    _dump(out / "world.json", manifest)
    return SynthWorld.load(out)


__all__ = ["COLORS", "RELATIONS", "SHAPES", "SIZES", "TEXTURES", "SynthConfig", "SynthObject", "SynthWorld",
           "generate_world", "make_caption", "true_relations", "world_image_root"]
