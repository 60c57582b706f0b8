"""Training data: readers -> mixture -> per-sample preparation -> batches the network takes.

Every random choice of a sample (the mixture draw, negative classes of a detection prompt, packed negative
captions, the resize and the flip) is a pure function of ``(seed, epoch, index)``, and the sampler hands each process
its slice of a seeded global order. So a run is reproducible, a resumed run sees exactly the batches it would have
seen, and N processes with batch b see the same global batches as one process with batch N·b.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

import glip_data as gd
from glip_data.packing import num_caption_negatives, pack_captions
from glip_data.sampling import few_shot_indices

from .config import DETECTION_KINDS, DataConfig, DatasetConfig

__all__ = ["build_sources", "TrainingSamples", "GlobalBatchSampler", "TrainBatch", "to_train_batch"]


class _Subset(Dataset):
    """The ``indices`` of ``dataset`` (few-shot), keeping the attributes the pipeline reads."""

    def __init__(self, dataset: Any, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)
        self.task = getattr(dataset, "task", "grounding")
        self.dataset_name = getattr(dataset, "dataset_name", None)
        self.categories = getattr(dataset, "categories", None)
        self.stats = getattr(dataset, "stats", Counter())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]


def _reader(spec: DatasetConfig, load_image: bool, max_text_len: int):
    common = dict(load_image=load_image, on_bad_image="skip" if load_image else "raise", errors="drop")
    if spec.kind == "coco":
        return gd.COCODetection(spec.annotations, spec.images, skip_empty=True, **common)
    if spec.kind == "objects365":
        return gd.Objects365Detection(spec.annotations, spec.images, skip_empty=True, **common)
    if spec.kind == "lvis":
        return gd.LVISDetection(spec.annotations, spec.images, skip_empty=True, **common)
    if spec.kind == "mdetr":
        return gd.MDETRGrounding(spec.annotations, spec.images, skip_empty=True, **common)
    if spec.kind == "odvg":
        return gd.ODVGReader(spec.annotations, spec.images, skip_empty=True, **common)
    return gd.CaptionReader(spec.annotations, spec.images, score_threshold=spec.min_score,
                            min_boxes=max(1, spec.min_boxes), **common)


WORLD_PREFIX = "world:"


def ensure_world(config: DataConfig, create: bool = True) -> Any:
    """The synthetic world of ``data.world`` (generated when its folder has no ``world.json`` and ``create``)."""
    if config.world is None:
        return None
    options = dict(config.world)
    folder = Path(options.pop("dir"))
    if not (folder / "world.json").is_file():
        if not create:
            raise FileNotFoundError(f"synthetic world {folder} has not been generated yet")
        known = {f.name for f in dataclasses.fields(gd.SynthConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"data.world: unknown SynthConfig fields {unknown}; known: {sorted(known)}")
        synth = gd.SynthConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
        gd.generate_world(folder, config=synth)
    return gd.SynthWorld.load(folder)


def resolve_world_file(annotations: str, images: str | None, world: Any, where: str) -> tuple[str, str | None]:
    """``world:<file>`` -> ``(the world's file, images or the world's image folder)``; other paths pass through."""
    if not str(annotations).startswith(WORLD_PREFIX):
        return annotations, images
    if world is None:
        raise ValueError(f"{where}.annotations {annotations!r} names a synthetic-world file but data.world is not set")
    name = str(annotations)[len(WORLD_PREFIX):]
    path = getattr(world, name, None)
    if not isinstance(path, Path) or name in ("root", "image_root", "manifest"):
        raise ValueError(f"{where}.annotations: the synthetic world has no file {name!r} (detection_train, "
                         "grounding_train, captions_train, captions_train_gt, coco_val, lvis_val)")
    return str(path), images or str(world.image_root)


def resolve_world_paths(spec: DatasetConfig, world: Any, where: str) -> DatasetConfig:
    """``annotations: world:<file>`` -> the world's file (and its image folder unless ``images`` is set)."""
    annotations, images = resolve_world_file(spec.annotations, spec.images, world, where)
    if annotations == spec.annotations:
        return spec
    return dataclasses.replace(spec, annotations=annotations, images=images)


def build_sources(config: DataConfig, max_text_len: int = 256, world: Any = None) -> dict[str, Any]:
    """The training readers, by name (``"<index>:<file stem>"``), few-shot subsets applied.

    Raises:
        FileNotFoundError / glip_data.ReaderError: naming the annotation file of a source that cannot be read.
        ValueError: a source that holds no usable sample.
    """
    sources: dict[str, Any] = {}
    for i, spec in enumerate(config.train):
        spec = resolve_world_paths(spec, world, f"data.train.{i}")
        reader = _reader(spec, load_image=True, max_text_len=max_text_len)
        if spec.few_shot:
            if spec.kind not in DETECTION_KINDS:
                raise ValueError(f"data.train.{i}: few_shot needs a detection source (coco, objects365, lvis), "
                                 f"not {spec.kind!r}")
            labels = _reader(spec, load_image=False, max_text_len=max_text_len)
            label_sets = [set(labels[j].labels.tolist()) for j in range(len(labels))]
            reader = _Subset(reader, few_shot_indices(label_sets, spec.few_shot, spec.few_shot_seed))
        if len(reader) == 0:
            raise ValueError(f"data.train.{i}: {spec.annotations} holds no usable training sample "
                             f"({getattr(reader, 'stats', {})})")
        sources[f"{i}:{getattr(reader, 'dataset_name', None) or spec.kind}"] = reader
    return sources


class TrainingSamples(Dataset):
    """Prepared training samples of a mixture: ``dataset[(epoch, index)]`` -> a sample with its ``(3, H, W)`` input.

    Args:
        sources: readers by name (:func:`build_sources`).
        specs: their configs, in the same order.
        config: the data config (sizes, flip, epoch size).
        tokenizer: the model's tokenizer (prompt budgets, caption packing).
        max_text_len: the model's text length (256).
        seed: the run's seed.
    """

    def __init__(self, sources: dict[str, Any], specs: Sequence[DatasetConfig], config: DataConfig, tokenizer: Any,
                 max_text_len: int, seed: int):
        self.names = list(sources)
        self.sources = list(sources.values())
        self.specs = list(specs)
        self.seed = int(seed)
        self.max_text_len = max_text_len
        self.tokenizer = tokenizer
        self.mixture = gd.MixtureDataset(sources, weights=[s.weight for s in self.specs],
                                         num_samples=config.epoch_size, seed=seed)
        self.to_grounding = {}
        for name, source, spec in zip(self.names, self.sources, self.specs):
            if spec.kind in DETECTION_KINDS and spec.prompt == "sampled":
                self.to_grounding[name] = gd.DetectionToGrounding(source.categories, tokenizer, max_len=max_text_len,
                                                                  random_sample_negative=spec.negatives)
            elif spec.kind in DETECTION_KINDS:
                self._check_fixed_prompt(name, source)
        self.transforms = gd.train_transforms(min_sizes=config.min_sizes, max_size=config.max_size,
                                              flip_prob=config.flip_prob, swap_left_right=config.swap_left_right)
        self._captions: dict[str, list[str]] = {}

    def _check_fixed_prompt(self, name: str, source: Any) -> None:
        names = [source.categories[k] for k in sorted(source.categories)]
        prompt, _ = gd.detection_prompt(names)
        n = len(self.tokenizer(prompt, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])
        if n > self.max_text_len:
            raise ValueError(f"source {name}: the fixed prompt of its {len(names)} classes needs {n} tokens, more "
                             f"than {self.max_text_len}; use prompt: sampled (positives + sampled negatives)")

    def __len__(self) -> int:
        return len(self.mixture)

    def _rng(self, epoch: int, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index, stream])

    def _negative_captions(self, name: str, source: Any, rng: np.random.Generator, count: int) -> list[str]:
        if name not in self._captions:  # caption texts of the source, read once per process
            inner = source.dataset if isinstance(source, _Subset) else source
            self._captions[name] = inner.caption_texts()
        texts = self._captions[name]
        return [texts[int(i)] for i in rng.integers(0, len(texts), size=count)]

    def __getitem__(self, key: tuple[int, int]) -> gd.GroundingSample:
        epoch, index = key
        self.mixture.set_epoch(epoch)
        sample = self.mixture[index]
        name = sample.metadata["mixture_source"]
        k = self.names.index(name)
        spec, source = self.specs[k], self.sources[k]
        if name in self.to_grounding:
            converter = self.to_grounding[name]
            converter.rng = gd.RandomSource(self._rng(epoch, index, 1))
            with warnings.catch_warnings():  # positive-overflow drops are counted in the sample's metadata
                warnings.simplefilter("ignore")
                sample = converter(sample)
        if spec.kind == "captions" and spec.pack_captions:
            rng = self._rng(epoch, index, 2)
            count = num_caption_negatives(rng)
            if count:
                sample = pack_captions(sample, self._negative_captions(name, source, rng, count), self.tokenizer,
                                       self.max_text_len, rng=rng)
        source_rng = gd.RandomSource(self._rng(epoch, index, 3))
        for transform in self.transforms.transforms:
            if hasattr(transform, "rng"):
                transform.rng = source_rng
        return self.transforms(sample)


class GlobalBatchSampler(Sampler):
    """Yields this process's ``(epoch, index)`` keys: the seeded global order, cut into global micro-batches.

    Epoch e's order is a permutation of ``range(length)`` seeded by ``(seed, e)``; global micro-batch g holds
    positions ``g * B * W ... (g + 1) * B * W`` (B = batch size per process, W = processes; an incomplete last one is
    dropped) and process r takes ``B`` of them, ``r * B ... (r + 1) * B``. ``start`` skips the micro-batches already
    consumed (resume). The sampler never ends: epochs follow each other.
    """

    def __init__(self, length: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0, start: int = 0):
        self.length, self.batch_size, self.seed = int(length), int(batch_size), int(seed)
        self.world_size, self.rank, self.start = int(world_size), int(rank), int(start)
        self.per_epoch = self.length // (self.batch_size * self.world_size)
        if self.per_epoch == 0:
            raise ValueError(f"the training data has {self.length} samples per epoch, fewer than one global batch of "
                             f"{self.batch_size * self.world_size}; lower data.batch_size or add data")

    def position(self, micro_batch: int) -> tuple[int, int]:
        """``(epoch, micro-batch within the epoch)`` of a global micro-batch counter."""
        return divmod(micro_batch, self.per_epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        micro = self.start
        while True:
            epoch, g = self.position(micro)
            order = np.random.default_rng([self.seed, epoch, 77]).permutation(self.length)
            for g in range(g, self.per_epoch):
                base = g * self.batch_size * self.world_size + self.rank * self.batch_size
                for position in range(base, base + self.batch_size):
                    yield epoch, int(order[position])
                micro += 1

    def __len__(self) -> int:  # an endless stream; DataLoader only needs a number
        return 2 ** 62


@dataclass
class TrainBatch:
    """One process's micro-batch in the network's terms.

    Attributes:
        images: ``(B, 3, H, W)``; image_sizes: ``(h, w)`` before padding; input_ids, attention_mask: ``(B, M)``;
        targets: per image ``{"boxes": (n, 4), "positive_map": (n, M) bool}``; num_empty: images without a box;
        sources: the mixture source of each image.
    """

    images: torch.Tensor
    image_sizes: list[tuple[int, int]]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    num_empty: int
    sources: list[str]

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(self.images.to(device), self.image_sizes, self.input_ids.to(device),
                          self.attention_mask.to(device),
                          [{k: v.to(device) for k, v in t.items()} for t in self.targets], self.num_empty,
                          self.sources)


def to_train_batch(batch: gd.GroundingBatch) -> TrainBatch:
    """A collated glip-data batch as network inputs and loss targets."""
    targets = [{"boxes": t.boxes.float(), "positive_map": t.positive_map.bool()} for t in batch.targets]
    return TrainBatch(
        images=batch.images,
        image_sizes=[(int(h), int(w)) for h, w in batch.image_sizes.tolist()],
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        targets=targets,
        num_empty=sum(int(t["boxes"].shape[0] == 0) for t in targets),
        sources=[str(m.get("mixture_source", "")) for m in batch.metadata],
    )


class Collator:
    """DataLoader ``collate_fn``: glip-data collation, then :func:`to_train_batch`."""

    def __init__(self, tokenizer: Any, max_len: int, pad_text_to: str, size_divisibility: int):
        self.collator = gd.GroundingCollator(tokenizer, max_len=max_len, pad_text_to=pad_text_to,
                                             size_divisibility=size_divisibility)

    def __call__(self, samples):
        with warnings.catch_warnings():  # truncated / unmappable spans are reported by the readers' stats
            warnings.simplefilter("ignore")
            return to_train_batch(self.collator(samples))


def micro_batches_per_epoch(length: int, batch_size: int, world_size: int) -> int:
    return max(1, length // (batch_size * world_size))


def epochs_of(steps: int, accumulation: int, per_epoch: int) -> float:
    return steps * accumulation / per_epoch if per_epoch else math.inf
