"""Ready-made run configs: fine-tuning on a COCO-format dataset in one command.

:func:`coco_finetune_config` is the official COCO fine-tuning recipe (``docs/official_model.md#training-recipe``):
every class in id order as the prompt (the evaluation prompt), base and language LR 1e-5, 24 epochs, LR x0.1 at 67 %
and 89 % of the run, AMP on a GPU, the model's own architecture. Any field can still be overridden
(``glip train --coco train.json --init W data.batch_size=4 schedule.epochs=12``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .build import SHIPPED_INIT

__all__ = ["coco_finetune_config"]


def coco_finetune_config(train: str, *, init: str, images: str | None = None, val: str | None = None,
                         val_images: str | None = None, output_dir: str | None = None) -> dict[str, Any]:
    """Plain config data (for :func:`glip_train.training.load_train_config`) of an official COCO fine-tuning."""
    import torch

    train_path = Path(train)
    if not train_path.is_file():
        raise FileNotFoundError(f"--coco: annotation file not found: {train_path}")
    # the other inputs too, in the options' words, before any model is built
    for option, path, folder in (("--images", images, True), ("--val", val, False),
                                 ("--val-images", val_images, True)):
        if path is not None and not (Path(path).is_dir() if folder else Path(path).is_file()):
            raise FileNotFoundError(f"{option} {path}: no such {'folder' if folder else 'file'}")
    if init != SHIPPED_INIT and not Path(init).exists():
        raise FileNotFoundError(f"--init {init}: no such file or folder (or '{SHIPPED_INIT}' for the shipped model)")
    data: dict[str, Any] = {
        "train": [{"kind": "coco", "annotations": str(train_path.resolve()),
                   "images": str(Path(images).resolve()) if images else None, "prompt": "fixed"}],
        "batch_size": 2,
    }
    if val is not None:
        data["val"] = {"annotations": str(Path(val).resolve()),
                       "images": str(Path(val_images or Path(val).parent).resolve())}
    return {
        "output_dir": output_dir or f"runs/finetune_{train_path.stem}",
        "init": init,
        "mode": "full",
        "data": data,
        "optim": {"lr": 1e-5, "language_lr": 1e-5},
        "schedule": {"epochs": 24, "kind": "multistep", "steps": [0.67, 0.89]},
        "amp": "fp16" if torch.cuda.is_available() else "none",
        "checkpoint_every": 1000,
    }
