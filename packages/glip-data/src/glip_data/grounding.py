"""Detection → grounding for training: a prompt of positive and sampled negative class names per image.

Reproduces the official Objects365 pipeline (``CocoDetectionTSV`` + ``od_to_grounding``;
docs/official_model.md#detection-to-grounding):

1. clip boxes to the image (legacy ``[0, W-1] x [0, H-1]``) and drop empty ones;
2. **positive overflow check** — shuffle the image's positive labels and keep them while the running token count of
   ``clean_name(name) + ". "`` stays ``<= max_len - 2``; boxes of the other labels are dropped (and reported);
3. **negatives** — with ``control_probabilities = (p_one_negative, p_one_positive, p_full, p_drop_positive)``
   (official ``(0.0, 0.0, 0.5, 0.0)``): with probability ``p_full`` draw ``full_negative = min(85, #candidates)``
   labels, otherwise a uniform number in ``1..full_negative``; candidates are **all** label ids, background (0,
   named ``__background__``, cleaned to ``" background "``) included (docs/official_model.md#quirks item 16);
   the draw is without replacement and positives drawn are discarded, so fewer negatives may remain;
4. negatives are shuffled and kept while they fit the token budget left by the positives;
5. negatives + positives are shuffled and joined with ``". "``; each kept box grounds to its class name's span.

All randomness comes from one seeded source (``rng``), so a conversion is reproducible.
"""
from __future__ import annotations

import random
import warnings
from collections.abc import Mapping, MutableSequence, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .boxes import clip_boxes, nonempty_boxes
from .prompts import clean_name, detection_prompt
from .sample import GroundingSample

BACKGROUND_NAME = "__background__"
OFFICIAL_CONTROL_PROBABILITIES = (0.0, 0.0, 0.5, 0.0)


class RandomSource:
    """One interface over ``random.Random``, ``numpy.random.Generator``, an int seed, or None.

    ``None`` uses the global :mod:`random` module, which PyTorch's DataLoader re-seeds in every worker — a shared
    ``random.Random`` instance would instead be copied into each worker and repeat the same draws there.
    """

    def __init__(self, source: Any = None) -> None:
        if isinstance(source, RandomSource):
            source = source.source
        if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
            source = random.Random(int(source))
        if source is not None and not isinstance(source, (random.Random, np.random.Generator)):
            raise TypeError(
                f"rng must be None, an int seed, random.Random or numpy.random.Generator, got {type(source).__name__}"
            )
        self.source = source

    def random(self) -> float:
        """A float in [0, 1)."""
        if isinstance(self.source, np.random.Generator):
            return float(self.source.random())
        return (self.source or random).random()

    def randint(self, low: int, high: int) -> int:
        """An int in [low, high], both included."""
        if isinstance(self.source, np.random.Generator):
            return int(self.source.integers(low, high + 1))
        return (self.source or random).randint(low, high)

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.randint(0, len(seq) - 1)]

    def shuffle(self, items: MutableSequence[Any]) -> None:
        """Shuffle ``items`` in place."""
        if isinstance(self.source, np.random.Generator):
            order = self.source.permutation(len(items))
            items[:] = [items[i] for i in order]
        else:
            (self.source or random).shuffle(items)

    def sample(self, population: Sequence[Any], k: int) -> list[Any]:
        """``k`` distinct elements of ``population`` (without replacement), in random order."""
        if isinstance(self.source, np.random.Generator):
            return [population[i] for i in self.source.choice(len(population), size=k, replace=False)]
        return (self.source or random).sample(list(population), k)


def _check_control_probabilities(p: Sequence[float]) -> tuple[float, float, float, float]:
    if len(p) != 4:
        raise ValueError(f"control_probabilities must have 4 values, got {p!r}")
    p = tuple(float(v) for v in p)
    if any(v < 0 or v > 1 for v in p) or sum(p[:3]) > 1 + 1e-9:
        raise ValueError(f"control_probabilities must be probabilities summing to <= 1, got {p!r}")
    if p[3] != 0:
        # The official code asserts this too: dropping positives was abandoned and is not implemented.
        raise ValueError(f"control_probabilities[3] (drop positives) must be 0, got {p[3]}")
    return p  # type: ignore[return-value]


class DetectionToGrounding:
    """Turn a detection sample (boxes + category labels) into a grounding sample with a sampled prompt.

    Args:
        categories: ``{label id: name}`` of the dataset (contiguous ids, 1-based as the readers produce them). An
            entry 0 is treated as the background; without one, ``__background__`` is added as label 0 when
            ``include_background`` is True.
        tokenizer: the text model's tokenizer (``tokenizer.tokenize(text)`` counts tokens for the budget).
        max_len: the text length of the model; the prompt's budget is ``max_len - 2`` tokens ([CLS]/[SEP]).
        random_sample_negative: the most negatives per image (official 85); ``<= 0`` samples none.
        control_probabilities: ``(p_one_negative, p_one_positive, p_full, p_drop_positive)``; official
            ``(0.0, 0.0, 0.5, 0.0)``. ``p_drop_positive`` must be 0 (as in the official code).
        include_background: label 0 ``__background__`` is a negative candidate, giving the phrase
            ``" background "`` (official behaviour, docs/official_model.md#quirks item 16). False excludes it.
        shuffle: True (official pre-training): sampled negatives + positives in random order. False (official
            ``DISABLE_SHUFFLE``, COCO fine-tuning): every category except the background, in id order, no sampling.
        separator: between names (``DATASETS.SEPARATION_TOKENS = ". "``).
        clip_boxes: clip to ``[0, W-1] x [0, H-1]`` and drop empty boxes first, as the official dataset does.
        rng: the random source (see :class:`RandomSource`); an int seed makes the conversion reproducible.
    """

    def __init__(
        self,
        categories: Mapping[int, str],
        tokenizer: Any,
        *,
        max_len: int = 256,
        random_sample_negative: int = 85,
        control_probabilities: Sequence[float] = OFFICIAL_CONTROL_PROBABILITIES,
        include_background: bool = True,
        shuffle: bool = True,
        separator: str = ". ",
        clip_boxes: bool = True,
        rng: Any = None,
    ) -> None:
        if not categories:
            raise ValueError("categories is empty")
        self.categories = {int(k): str(v) for k, v in categories.items()}
        if include_background:
            self.categories.setdefault(0, BACKGROUND_NAME)
        else:
            self.categories.pop(0, None)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.random_sample_negative = random_sample_negative
        self.control_probabilities = _check_control_probabilities(control_probabilities)
        self.include_background = include_background
        self.shuffle = shuffle
        self.separator = separator
        self.clip_boxes = clip_boxes
        self.rng = RandomSource(rng)
        self._name_tokens: dict[int, int] = {}

    def _label_length(self, label: int) -> int:
        """Tokens of ``clean_name(name) + ". "`` (the official budget unit, whatever the separator)."""
        if label not in self._name_tokens:
            self._name_tokens[label] = len(self.tokenizer.tokenize(clean_name(self.categories[label]) + ". "))
        return self._name_tokens[label]

    def _keep_positives(self, positives: list[int]) -> tuple[list[int], int]:
        """Official ``check_for_positive_overflow``: returns (kept labels, running length).

        As in the official code the returned length includes the first label that did not fit.
        """
        self.rng.shuffle(positives)
        kept, length = [], 0
        for label in positives:
            length += self._label_length(label)
            if length > self.max_len - 2:
                break
            kept.append(label)
        return kept, length

    def _num_negatives(self, full_negative: int) -> int:
        p_one_neg, p_one_pos, p_full, _ = self.control_probabilities
        outer = self.rng.random()
        if outer < p_one_neg:
            return 1
        if outer < p_one_neg + p_one_pos:
            return 0
        if outer < p_one_neg + p_one_pos + p_full:
            return full_negative
        return self.rng.randint(1, max(1, full_negative))

    def _sample_negatives(self, positives: list[int], positive_length: int) -> list[int]:
        if self.random_sample_negative <= 0:
            return []
        candidates = sorted(self.categories)
        full_negative = min(self.random_sample_negative, len(candidates))
        num = min(self._num_negatives(full_negative), len(candidates))
        positive_set = set(positives)
        negatives = [label for label in self.rng.sample(candidates, num) if label not in positive_set]
        self.rng.shuffle(negatives)
        # Official pre-screen: keep negatives while the budget left by the positives stays > 0.
        budget = (self.max_len - 2) - positive_length
        screened = []
        for label in negatives:
            budget -= self._label_length(label)
            if budget <= 0:
                break
            screened.append(label)
        return screened

    def __call__(self, sample: GroundingSample) -> GroundingSample:
        boxes, labels = sample.boxes, sample.labels
        unknown = sorted({int(v) for v in labels.tolist()} - set(self.categories))
        if unknown:
            raise KeyError(f"{sample.image_path}: labels {unknown} are not in the category table")
        if 0 in labels.tolist():
            raise ValueError(f"{sample.image_path}: a box has label 0, the background id")

        keep = torch.ones(len(boxes), dtype=torch.bool)
        if self.clip_boxes:
            boxes = clip_boxes(boxes, height=sample.height, width=sample.width, legacy=True)
            keep = nonempty_boxes(boxes)

        positives = sorted({int(v) for v in labels[keep].tolist()})
        n_before = int(keep.sum())
        kept_positives, positive_length = self._keep_positives(positives)
        kept_set = set(kept_positives)
        keep &= torch.tensor([int(v) in kept_set for v in labels.tolist()], dtype=torch.bool)
        n_overflow = n_before - int(keep.sum())
        if n_overflow:
            warnings.warn(
                f"{sample.image_path}: removed {n_overflow} boxes of {len(positives) - len(kept_positives)} "
                f"classes because the positive class names overflow {self.max_len - 2} tokens",
                stacklevel=2,
            )

        if self.shuffle:
            negatives = self._sample_negatives(kept_positives, positive_length)
            label_list = negatives + list(kept_positives)
            self.rng.shuffle(label_list)
        else:
            negatives = []
            label_list = [label for label in sorted(self.categories) if label != 0]

        prompt, spans = detection_prompt([self.categories[label] for label in label_list], self.separator)
        label_to_span = {label: span[0] for label, span in zip(label_list, spans)}

        keep_idx = torch.nonzero(keep).flatten()
        new_labels = labels[keep_idx]
        metadata = dict(sample.metadata)
        metadata.update(
            label_to_span=label_to_span,
            positive_labels=list(kept_positives),
            negative_labels=negatives,
            removed_boxes_overflow=n_overflow,
        )
        return replace(
            sample,
            boxes=boxes[keep_idx],
            labels=new_labels,
            caption=prompt,
            tokens_positive=[[label_to_span[int(v)]] for v in new_labels.tolist()],
            positive_map=None,
            metadata=metadata,
        )


def detection_to_grounding(
    sample: GroundingSample, categories: Mapping[int, str], tokenizer: Any, **options: Any
) -> GroundingSample:
    """One-shot form of :class:`DetectionToGrounding` (same keyword options, ``rng`` included)."""
    return DetectionToGrounding(categories, tokenizer, **options)(sample)
