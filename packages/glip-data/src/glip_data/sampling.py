"""Few-shot subsets of a detection dataset, by the official greedy image rule.

Images are visited in order (the dataset's image-id order, or a seeded shuffle of it); an image is kept when at
least one of its classes still needs examples, and then counts once for **every** class it contains (an image-level
count, as the official ODinW few-shot protocol does). So each class ends with at least ``shots`` images when the
dataset has them, and some classes get more.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

__all__ = ["few_shot_indices"]


def few_shot_indices(label_sets: Sequence[Iterable[int]], shots: int, seed: int | None = None) -> list[int]:
    """Indices of the images a ``shots``-shot subset keeps (ascending).

    Args:
        label_sets: the class labels present in each image, in the dataset's order.
        shots: examples wanted per class (>= 1).
        seed: None visits the images in order (official); an int shuffles the visiting order first.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive integer; got {shots!r}")
    sets = [set(int(c) for c in labels) for labels in label_sets]
    order = list(range(len(sets)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    needed: dict[int, int] = {c: shots for labels in sets for c in labels}
    kept = []
    for i in order:
        if any(needed[c] > 0 for c in sets[i]):
            kept.append(i)
            for c in sets[i]:
                needed[c] -= 1
    return sorted(kept)
