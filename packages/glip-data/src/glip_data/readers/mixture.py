"""A seeded, weighted mixture of map-style datasets (e.g. Objects365 + GoldG + captions for pre-training).

Semantics:

* ``weights`` are turned into sampling probabilities ``p_i = w_i / sum(w)`` (``reader.probabilities``). A zero
  weight leaves a dataset out; ``weights=None`` samples in proportion to the datasets' lengths.
* ``len(mixture)`` is the epoch length ``num_samples`` (default: the total length of the datasets with a positive
  weight — "one epoch draws as many samples as the sources hold together", in the proportions the weights ask for).
* For epoch ``e`` every position ``0..num_samples-1`` draws its source independently with probabilities ``p``
  (seeded by ``(seed, e)``); the positions given to a source walk through a seeded permutation of it, restarting
  with a fresh permutation when it runs out. So an under-sampled source yields distinct items and an over-sampled
  one repeats its items as evenly as possible.
* ``mixture[i]`` is a pure function of ``(seed, epoch, i)``: every process and DataLoader worker sees the same
  sample for the same index, so ``DistributedSampler`` and any number of workers work unchanged. Call
  :meth:`MixtureDataset.set_epoch` before creating each epoch's DataLoader iterator (like
  ``DistributedSampler.set_epoch``; with ``persistent_workers=True`` the workers keep the epoch they started with).
* Each sample's ``metadata["mixture_source"]`` names the dataset it came from.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset


class MixtureDataset(Dataset):
    """Weighted mixture of datasets; see the module doc for the exact sampling semantics.

    Args:
        datasets: a list of datasets, or a dict ``{name: dataset}`` (names are recorded in each sample's metadata).
        weights: one non-negative number per dataset, or ``None`` (proportional to lengths).
        num_samples: the epoch length (default: the total length of the datasets with a positive weight).
        seed: the seed of the draws.
    """

    def __init__(
        self,
        datasets: Sequence[Any] | Mapping[str, Any],
        weights: Sequence[float] | None = None,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(datasets, Mapping):
            self.names = [str(k) for k in datasets]
            self.datasets = list(datasets.values())
        else:
            self.datasets = list(datasets)
            self.names = [getattr(d, "dataset_name", None) or f"dataset{i}" for i, d in enumerate(self.datasets)]
        if not self.datasets:
            raise ValueError("MixtureDataset needs at least one dataset")
        lengths = [len(d) for d in self.datasets]
        if weights is None:
            weights = [float(n) for n in lengths]
        weights = [float(w) for w in weights]
        if len(weights) != len(self.datasets):
            raise ValueError(f"{len(self.datasets)} datasets but {len(weights)} weights")
        for name, w, n in zip(self.names, weights, lengths):
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {w}")
            if w > 0 and n == 0:
                raise ValueError(f"dataset {name!r} is empty but has weight {w}")
        total = sum(weights)
        if total <= 0:
            raise ValueError(f"the weights sum to zero: {weights}")
        self.weights = weights
        self.probabilities = [w / total for w in weights]
        self.num_samples = int(num_samples) if num_samples is not None else \
            sum(n for n, w in zip(lengths, weights) if w > 0)
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        self.seed = int(seed)
        self.epoch = 0
        self._plan_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Draw a different (seeded) sequence for ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(source (num_samples,), item (num_samples,))``: which dataset and which of its items each index is."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1], self._plan_cache[2]
        rng = np.random.default_rng([self.seed, epoch])
        source = rng.choice(len(self.datasets), size=self.num_samples, p=self.probabilities)
        item = np.zeros(self.num_samples, dtype=np.int64)
        for i, dataset in enumerate(self.datasets):
            positions = np.nonzero(source == i)[0]
            if len(positions) == 0:
                continue
            n = len(dataset)
            sub = np.random.default_rng([self.seed, epoch, i + 1])
            rounds = -(-len(positions) // n)
            item[positions] = np.concatenate([sub.permutation(n) for _ in range(rounds)])[: len(positions)]
        self._plan_cache = (epoch, source, item)
        return source, item

    def __getitem__(self, index: int) -> Any:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a mixture of length {self.num_samples}")
        source, item = self.plan()
        src = int(source[index])
        sample = self.datasets[src][int(item[index])]
        metadata = getattr(sample, "metadata", None)
        if isinstance(metadata, dict):
            metadata["mixture_source"] = self.names[src]
        return sample

    # pickling: the plan is cheap to redo and can be large, so workers rebuild it
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_plan_cache"] = None
        return state

    @property
    def stats(self) -> Counter:
        """The sources' ``stats``, keys prefixed with the source name."""
        out: Counter = Counter()
        for name, dataset in zip(self.names, self.datasets):
            for k, v in getattr(dataset, "stats", {}).items():
                out[f"{name}/{k}"] += v
        return out

    def report(self) -> str:
        lines = [f"MixtureDataset: {self.num_samples} samples per epoch, seed {self.seed}"]
        for name, dataset, w, p in zip(self.names, self.datasets, self.weights, self.probabilities):
            lines.append(f"  {name}: weight {w:g}, probability {p:.4f}, {len(dataset)} items")
        for dataset in self.datasets:
            if hasattr(dataset, "report"):
                lines.extend("  " + line for line in dataset.report().splitlines())
        return "\n".join(lines)


__all__ = ["MixtureDataset"]
