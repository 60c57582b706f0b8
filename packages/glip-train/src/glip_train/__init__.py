"""glip-train: the GLIP detector — assembly, ATSS head, post-processing, official checkpoints, detect/ground API and
the ``glip`` command line."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names resolve lazily so that light submodules (``glip_train.recipe``, ``glip_train.box_ops``) import without
# building the whole model stack.
_LAZY = {
    "GLIP": "modeling_glip",
    "GLIPOutput": "modeling_glip",
    "GLIPProcessor": "processing_glip",
    "GLIPConfig": "model_config",
    "PostProcessConfig": "model_config",
    "CheckpointError": "official_checkpoint",
    "ExportedGLIP": "export",
    "export_model": "export",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'glip_train' has no attribute {name!r}")
