"""Training data: readers -> mixture -> per-sample preparation -> batches the network takes.

Every random choice of a sample (the mixture draw, negative classes of a detection prompt, packed negative
captions, the resize and the flip) is a pure function of ``(seed, epoch, index)``, and the sampler hands each process
its slice of a seeded global order. So a run is reproducible, a resumed run sees exactly the batches it would have
seen, and N processes with batch b see the same global batches as one process with batch N·b.

Nothing is left out silently: what the readers drop and the image files missing on disk are named in the run's
:class:`~glip_data.report.SkipReport` when the sources are built (before the model), and an image that cannot be
read during training is replaced by the next sample of its source and travels with its batch
(``TrainBatch.unreadable``) to the trainer's report.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

import glip_data as gd
from glip_data.packing import num_caption_negatives, pack_captions
from glip_data.report import SkipReport
from glip_data.sampling import few_shot_indices

from .config import DETECTION_KINDS, DataConfig, DatasetConfig, TrainConfig
from .distributed import any_rank

__all__ = ["build_sources", "build_data", "prepare_world", "TrainData", "TrainingSamples", "GlobalBatchSampler",
           "TrainBatch", "to_train_batch"]


class _Source(Dataset):
    """One training source: the usable ``indices`` of a reader (images present, few-shot subset), reading past the
    images that cannot be read.

    An image that fails to load at training time is replaced by the next sample of the same source whose image
    loads (a pure function of the index, so every process, worker and resumed run agrees); the failures travel in
    the sample's ``metadata["unreadable_images"]`` as ``(path, message)`` pairs for the trainer's skip report.
    """

    def __init__(self, dataset: Any, indices: Sequence[int] | None = None):
        self.dataset = dataset
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.task = getattr(dataset, "task", "grounding")
        self.dataset_name = getattr(dataset, "dataset_name", None)
        self.categories = getattr(dataset, "categories", None)
        self.stats = getattr(dataset, "stats", Counter())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        unreadable: list[tuple[str, str]] = []
        for attempt in range(len(self.indices)):
            j = int(self.indices[(i + attempt) % len(self.indices)])
            try:
                sample = self.dataset[j]
            except OSError as err:  # glip_data.ImageLoadError: missing, truncated, undecodable
                unreadable.append((str(self.dataset.image_path(j)), str(err)))
                continue
            if unreadable:
                sample.metadata["unreadable_images"] = unreadable
            return sample
        raise OSError(f"{getattr(self.dataset, 'ann_file', 'a training source')}: none of its images can be read "
                      f"(the first: {unreadable[0][1]})")

    def caption_texts(self) -> list[str]:
        return self.dataset.caption_texts()


def _reader(spec: DatasetConfig, load_image: bool):
    # unreadable images raise: _Source replaces them and reports them
    common = dict(load_image=load_image, on_bad_image="raise", errors="drop")
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


def prepare_world(config: DataConfig, is_main: bool, device: torch.device) -> Any:
    """The run's synthetic world (or None): generated once, by rank 0, while the other processes wait; a failure
    on rank 0 stops every process."""
    world, failed = None, None
    if is_main:
        try:
            world = ensure_world(config)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failed = exc
    if any_rank(failed is not None, device):  # also the barrier: the others read the world only once it exists
        if failed is not None:
            raise failed
        raise RuntimeError("rank 0 could not generate the synthetic world of data.world (its message says why)")
    return world if is_main else ensure_world(config, create=False)


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


def build_sources(config: DataConfig, world: Any = None, report: SkipReport | None = None) -> dict[str, _Source]:
    """The training sources, by name (``"<index>:<file stem>"``): each reader's usable samples (their image files
    present, few-shot subsets applied).

    What the readers drop (unknown category or image ids, boxes without area, ...: every record their
    :class:`~glip_data.readers.base.RecordChecker` names) and the images missing on disk are counted and named in
    ``report``.

    Raises:
        FileNotFoundError / glip_data.ReaderError: naming the annotation file of a source that cannot be read, or a
            source none of whose images exists.
        ValueError: a source that holds no usable sample.
    """
    report = report if report is not None else SkipReport("glip train", stream=None)
    sources: dict[str, _Source] = {}
    for i, spec in enumerate(config.train):
        where = f"data.train.{i}"
        spec = resolve_world_paths(spec, world, where)
        if spec.few_shot and spec.kind not in DETECTION_KINDS:
            raise ValueError(f"{where}: few_shot needs a detection source (coco, objects365, lvis), not {spec.kind!r}")
        reader = _reader(spec, load_image=True)
        report_reader_drops(reader, report)
        indices = present_images(reader, where, report)
        if spec.few_shot:
            labels = _reader(spec, load_image=False)
            label_sets = [set(labels[j].labels.tolist()) for j in indices]
            indices = [indices[k] for k in few_shot_indices(label_sets, spec.few_shot, spec.few_shot_seed)]
        source = _Source(reader, indices)
        if len(source) == 0:
            raise ValueError(f"{where}: {spec.annotations} holds no usable training sample "
                             f"({dict(reader.stats) or 'no box in any image'})")
        sources[f"{i}:{source.dataset_name or spec.kind}"] = source
    return sources


def report_reader_drops(reader: Any, report: SkipReport) -> None:
    """Count and name in ``report`` every record ``reader`` dropped (what its checker named, with the full counts
    of its ``stats``): ``glip train: skipped FILE annotations[3] (id=7, ...): unknown category id (...)``."""
    for reason, messages in sorted(reader.check.dropped.items()):
        phrase = reason.replace("_", " ")
        for message in messages:
            record, _, what = message.partition(": ")
            report.skip(phrase, f"{reader.ann_file} {record}", what or None)
        unnamed = reader.stats[reason] - len(messages)
        if unnamed > 0:
            report.merge({"by_reason": {phrase: unnamed}})


def present_images(reader: Any, where: str, report: SkipReport) -> list[int]:
    """The samples of ``reader`` whose image file exists; each missing file is named in ``report`` once.

    Each folder is listed once (not one ``stat`` per image), so checking a million images takes seconds.

    Raises:
        FileNotFoundError: not one image exists (a wrong image folder), naming the folder to fix.
    """
    paths = [reader.image_path(i) for i in range(len(reader))]
    listings: dict[Path, set[str]] = {}
    present = []
    for path in paths:
        names = listings.get(path.parent)
        if names is None:
            try:
                names = set(os.listdir(path.parent))
            except OSError:
                names = set()
            listings[path.parent] = names
        present.append(path.name in names)
    if paths and not any(present):
        raise FileNotFoundError(f"{where}: none of the {len(paths)} images of {reader.ann_file} exists under "
                                f"{reader.image_root} (the first: {paths[0]}); set {where}.images to their folder")
    named: set[Path] = set()
    for path, ok in zip(paths, present):
        if not ok and path not in named:
            named.add(path)
            report.skip("missing image file", path, reader.ann_file.name)
    return [i for i, ok in enumerate(present) if ok]


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
            self._captions[name] = source.caption_texts()
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
        sources: the mixture source of each image; unreadable: ``(path, message)`` of the images that could not be
        read and were replaced by the next sample of their source.
    """

    images: torch.Tensor
    image_sizes: list[tuple[int, int]]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    num_empty: int
    sources: list[str]
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def to(self, device: torch.device) -> "TrainBatch":
        return dataclasses.replace(self, images=self.images.to(device), input_ids=self.input_ids.to(device),
                                   attention_mask=self.attention_mask.to(device),
                                   targets=[{k: v.to(device) for k, v in t.items()} for t in self.targets])


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
        unreadable=[tuple(u) for m in batch.metadata for u in m.get("unreadable_images", ())],
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


@dataclass
class TrainData:
    """What a run reads: the prepared samples, their collation and this process's share of the global batches.

    Attributes:
        samples: the mixture's prepared samples; collator: the DataLoader ``collate_fn``; batch_size: images per
        process and micro-batch; seed: the run's seed; rank, world_size: this process and how many there are;
        num_workers: DataLoader workers.
    """

    samples: TrainingSamples
    collator: Any
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0

    @property
    def micro_batches_per_epoch(self) -> int:
        """Global micro-batches in one epoch of the mixture (an incomplete last one is dropped)."""
        return len(self.samples) // (self.batch_size * self.world_size)

    def batches(self, start: int = 0) -> Iterator[TrainBatch]:
        """This process's micro-batches from global micro-batch ``start`` on (resume), endlessly."""
        sampler = GlobalBatchSampler(len(self.samples), self.batch_size, self.seed, self.world_size, self.rank,
                                     start=start)
        # the loader's own generator: creating it must not draw from the global RNG (dropout), or a resumed run
        # would see other dropout masks than an uninterrupted one (samples take their randomness from their keys)
        loader = torch.utils.data.DataLoader(
            self.samples, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collator,
            num_workers=self.num_workers, persistent_workers=False,
            prefetch_factor=2 if self.num_workers else None, generator=torch.Generator().manual_seed(self.seed))
        return iter(loader)


def build_data(config: TrainConfig, sources: dict[str, Any], model: Any, rank: int = 0,
               world_size: int = 1) -> TrainData:
    """The run's :class:`TrainData` over ``sources`` (:func:`build_sources`) for ``model``'s tokenizer and text
    length."""
    samples = TrainingSamples(sources, config.data.train, config.data, model.tokenizer, model.config.max_text_len,
                              config.seed)
    collator = Collator(model.tokenizer, model.config.max_text_len, config.data.pad_text_to,
                        model.config.size_divisibility)
    return TrainData(samples, collator, config.data.batch_size, config.seed, rank, world_size,
                     config.data.num_workers)
