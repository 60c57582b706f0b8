"""What an export traces: GLIP's network from padded pixels and tokens to the head's outputs, in forms every runtime
runs (no Python branch on a tensor value or on a size, no fused kernel, no custom operator).

The processor (image transform, tokenization, post-processing, NMS) is not in the graph: it stays in Python and
:class:`~glip_train.export.ExportedGLIP` reuses it unchanged.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from glip_fusion import BiMultiHeadAttention
from glip_fusion.dyconv import ModulatedDeformConv3x3

from ..model_config import NUM_LEVELS

__all__ = ["INPUT_NAMES", "OUTPUT_GROUPS", "DEFORM_CHOICES", "NetworkGraph", "output_names", "portable_network",
           "attention_form", "dynamic_shapes", "example_inputs"]

#: the graph's inputs, in order: ``pixel_values (B, 3, H, W)`` float32, ``input_ids (B, M)`` int64,
#: ``attention_mask (B, M)`` int64, ``image_sizes (B, 2)`` int64 (``(h, w)`` before padding)
INPUT_NAMES = ("pixel_values", "input_ids", "attention_mask", "image_sizes")
#: the head's outputs, one per FPN level each: ``box_regression_l (B, 4, H_l, W_l)``, ``centerness_l (B, 1, H_l,
#: W_l)``, ``token_logits_l (B, H_l * W_l, M)``
OUTPUT_GROUPS = ("box_regression", "centerness", "token_logits")
#: the deformable convolution in the graph: "grid_sample" (GridSample + MatMul, every runtime) or "torchvision"
#: (the ONNX ``DeformConv`` operator, opset 19: onnxruntime only; OpenVINO cannot read it)
DEFORM_CHOICES = ("grid_sample", "torchvision")


def output_names(num_levels: int = NUM_LEVELS) -> list[str]:
    """``box_regression_0 .. box_regression_4, centerness_0 .., token_logits_0 ..``: the graph's outputs in order."""
    return [f"{group}_{level}" for group in OUTPUT_GROUPS for level in range(num_levels)]


class NetworkGraph(nn.Module):
    """The traced module: :meth:`glip_train.GLIP.encode_images` then :meth:`glip_train.GLIP.text_and_head`.

    ``forward(pixel_values (B, 3, H, W), input_ids (B, M), attention_mask (B, M), image_sizes (B, 2))`` returns the
    15 head outputs of :func:`output_names` as a flat tuple. A prompt-tuning table or a linear probe loaded into the
    model is part of the weights, so adapters export with it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.encode_images(pixel_values)
        head, _, _ = self.model.text_and_head(features, input_ids, attention_mask, image_sizes)
        return (*head.box_regression, *head.centerness, *head.token_logits)


def attention_form(model: nn.Module) -> str:
    """How the graph computes the X-MHA: ``"factored"`` when the model's longest text is at most a head's width
    (the factored form then needs fewer FLOPs for every prompt the model takes: ``6 N C H M`` against
    ``6 N C E + 4 N E M`` with ``E = H d`` and ``M <= d``; GLIP-T: d = 256, texts <= 256 tokens), else
    ``"reference"`` (the projected form with the reference attention). Both apply GLIP's clamps unconditionally
    (the official numerics); neither needs a check of the logits' size that SDPA would."""
    heads = [m for m in model.modules() if isinstance(m, BiMultiHeadAttention)]
    if not heads:
        return "none"
    return "factored" if model.config.max_text_len <= min(m.head_dim for m in heads) else "reference"


@contextlib.contextmanager
def portable_network(model: nn.Module, deform: str = "grid_sample") -> Iterator[str]:
    """Switch ``model`` to the forms the exported graph uses; restore every setting afterwards.

    * X-MHA: :func:`attention_form` (factored or the reference backend; never the fused Triton kernel, never SDPA
      with its data-dependent clamp check);
    * deformable convolutions: ``deform`` (:data:`DEFORM_CHOICES`);
    * eval mode.

    Yields the attention form.
    """
    if deform not in DEFORM_CHOICES:
        raise ValueError(f"deform must be one of {DEFORM_CHOICES}; got {deform!r}")
    form = attention_form(model)
    attention = [m for m in model.modules() if isinstance(m, BiMultiHeadAttention)]
    convs = [m for m in model.modules() if isinstance(m, ModulatedDeformConv3x3)]
    saved = ([(m.backend, m.factored) for m in attention], [m.impl for m in convs], model.training)
    try:
        for m in attention:
            m.backend, m.factored = "reference", form == "factored"
        for m in convs:
            m.impl = deform
        model.eval()
        yield form
    finally:
        for m, (backend, factored) in zip(attention, saved[0]):
            m.backend, m.factored = backend, factored
        for m, impl in zip(convs, saved[1]):
            m.impl = impl
        model.train(saved[2])


def _padded(size: int, divisor: int) -> int:
    return -(-size // divisor) * divisor


def example_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: 2 images of 288x480 (padded to the size divisibility), 11 tokens (3 of them padding in
    the second text), one image smaller than the padded batch.

    The sizes keep every count the graph computes from them at 2 or more and the height's apart from the width's:
    every FPN level at least 2x2 and, for a Swin backbone (window 7 or 12), at least 2 windows each way in every
    stage. A count of 1 is a special case to the tracer (size-1 dimensions broadcast), and a traced 1 is
    specialised: at 224x288, GLIP-T's last stage has one window row, and the graph held only for inputs that
    have one too."""
    config = model.config
    height, width = _padded(288, config.size_divisibility), _padded(480, config.size_divisibility)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, height, width, generator=generator)
    vocab = int(config.text_encoder.get("vocab_size", 1000))
    length = min(11, config.max_text_len)
    input_ids = torch.randint(1, vocab, (2, length), generator=generator)
    attention_mask = torch.ones(2, length, dtype=torch.int64)
    attention_mask[1, length - 3:] = 0
    image_sizes = torch.tensor([[height, width], [height - 20, width - 31]], dtype=torch.int64)
    return pixel_values, input_ids, attention_mask, image_sizes


def dynamic_shapes(model: nn.Module) -> dict[str, dict[int, object]]:
    """The dynamic axes: batch, image height and width (multiples of the size divisibility, at least the backbone's
    stride of 32) and text length (2 .. ``max_text_len``)."""
    from torch.export import Dim

    config = model.config
    divisor = config.size_divisibility
    least = math.ceil(32 / divisor)
    batch = Dim("batch", min=1, max=1024)
    height = Dim("height_units", min=least, max=16384 // divisor)
    width = Dim("width_units", min=least, max=16384 // divisor)
    text = Dim("text_length", min=2, max=config.max_text_len)
    return {
        "pixel_values": {0: batch, 2: divisor * height, 3: divisor * width},
        "input_ids": {0: batch, 1: text},
        "attention_mask": {0: batch, 1: text},
        "image_sizes": {0: batch},
    }
