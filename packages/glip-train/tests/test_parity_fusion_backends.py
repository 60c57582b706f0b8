"""The fusion tower on every ``bi_attention`` backend against the official GLIP-T tower outputs.

The fixture stores the full FPN maps fed to the tower and every tower module's output. Its BERT hidden states hold
only the first 64 of 256 tokens; feeding those with the first 64 mask entries is exact for the recorded outputs (all
real tokens are < 64, padded tokens are masked as keys everywhere, and a text token's output depends only on itself
and the real keys). Without a GPU the Triton backend runs in Triton's CPU interpreter.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # must precede the (lazy) definition of the Triton kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import glip_fusion  # noqa: E402
from glip_fusion import FusionEncoder  # noqa: E402
from glip_train.recipe import build_recipe_state_dict  # noqa: E402
from glip_train.testing import relative_error  # noqa: E402

pytestmark = pytest.mark.parity
PREFIX = "rpn.head.dyhead_tower."
BACKENDS = ["reference", "sdpa", "triton"]


@pytest.fixture(scope="module")
def tower_weights(parity_dir):
    state = build_recipe_state_dict(parity_dir / "weights_recipe.json", prefix=PREFIX)
    return {k[len(PREFIX):]: v for k, v in state.items()}


def _run(parity_dir, parity_index, tower_weights, backend, num_blocks, case_names, tol):
    if backend not in glip_fusion.available_backends():
        pytest.fail(f"backend {backend!r} is not available here: {glip_fusion.available_backends()}")
    encoder = FusionEncoder.glip_t(num_blocks=num_blocks, backend=backend).eval()
    weights = {k: v for k, v in tower_weights.items() if int(k.split(".")[0]) < 3 * num_blocks}
    encoder.load_state_dict(weights, strict=True)
    failures = []
    for name in case_names:
        data = np.load(parity_dir / parity_index["cases"][name]["file"])
        feats = [torch.from_numpy(data[f"fpn/p{level}"]) for level in range(3, 8)]
        lang = torch.from_numpy(data["lang/hidden_t64"])
        mask = torch.from_numpy(data["lang/masks"])
        assert int(mask[:, lang.shape[1]:].sum()) == 0, "real tokens beyond the recorded 64"
        with torch.no_grad():
            out = encoder(feats, lang, mask[:, : lang.shape[1]], output_intermediates=True)
        for (got_feats, got_lang), module in zip(out.intermediates, parity_index["tower_modules"]):
            changes = parity_index["tower_module_changes"][module]
            refs = []
            if changes["visual"]:
                refs += [(got_feats[level - 3], f"tower/{module}/visual_p{level}_c32") for level in range(3, 8)]
            if changes["lang"]:
                refs.append((got_lang, f"tower/{module}/lang_hidden_t32"))
            for got, key in refs:
                ref = torch.from_numpy(data[key])
                err = relative_error(got[:, : ref.shape[1]], ref)
                if err > tol:
                    failures.append(f"{backend} {name} {key}: {err:.3g} > {tol:g}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_fusion_block_on_every_backend(parity_dir, parity_index, tower_weights, backend):
    """The first [VLFuse, BertEncoderLayer, DyConv] on the fixture's largest batch (padding in image and text)."""
    largest = max(parity_index["cases"], key=lambda n: parity_index["cases"][n]["batch_size"])
    _run(parity_dir, parity_index, tower_weights, backend, 1, [largest], tol=1e-4)


@pytest.mark.slow
def test_full_tower_on_the_triton_backend(parity_dir, parity_index, tower_weights):
    """All 18 modules of every case with the fused kernel (interpreted on CPU: about a minute per case)."""
    _run(parity_dir, parity_index, tower_weights, "triton", 6, list(parity_index["cases"]), tol=1e-3)
