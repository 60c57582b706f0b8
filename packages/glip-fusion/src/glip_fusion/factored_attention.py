"""X-MHA with the image-side projections folded into the text side (a reassociation, not an approximation).

GLIP's X-MHA projects every image token to ``E = 2048`` channels three times (queries, image values, and back
through ``out_v_proj``): at 800x1333 (N = 22400 tokens) that is ~70 GFLOP per block, while the prompt has only
M ~ 10-200 tokens. Per head h (d = E / H channels) the same outputs follow from products with the text side first:

* logits: ``S_h = s (v W_q,h^T + b_q,h) k_h^T = v A_h + c_h`` with ``A_h = s W_q,h^T k_h^T (C_v, M)`` and
  ``c_h = s b_q,h k_h^T``; all heads at once: ``S = v @ A (B, N, H*M)``;
* image update: ``out_v_proj(concat_h P_v,h v_l,h) = sum_h P_v,h U_h + b`` with ``U_h = v_l,h W_out_v,h^T (M, C_v)``;
* text update: ``P_l,h v_v,h = (P_l,h v) W_vv,h^T + (P_l,h 1) b_vv,h``; the row sums are 1 (0 for a row that is
  zeroed, see below).

Cost per block ~ ``6 N C_v H M`` instead of ``6 N C_v E + 4 N E M``: about 20x fewer FLOPs at M = 11, 1.3x at
M = 195; it stops paying when M reaches d (256 for GLIP). Same semantics as
:class:`~glip_fusion.BiMultiHeadAttention` with the reference backend (clamp of S and the text direction's second
clamp, text padding masked, optional image mask, zero outputs for rows without a single valid key,
``skip_masked_text``); results equal to float rounding (~1e-6 relative in float32). Attention dropout is not
supported (the probabilities would need the reference's masks).

:class:`~glip_fusion.BiMultiHeadAttention` uses it by itself (``factored=None``, the default) where it was
measured to pay: on CPU, with no gradient being recorded, while the prompt is shorter than a head; ``factored=True``
/ ``False`` on the module forces the choice (True still refuses attention dropout in training).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["factored_bi_mha", "factored_pays"]


def factored_pays(num_text_tokens: int, head_dim: int) -> bool:
    """Whether the factored form needs fewer FLOPs than the projected one (text shorter than a head)."""
    return num_text_tokens < head_dim


def factored_bi_mha(attn, v: torch.Tensor, l: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                    image_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`glip_fusion.BiMultiHeadAttention.forward` of ``attn`` computed in the factored order.

    Args:
        attn: a :class:`~glip_fusion.BiMultiHeadAttention` (its weights, heads, scale, clamp and
            ``skip_masked_text`` are used; its backend is not).
        v: ``(B, N, v_dim)``; l: ``(B, M, l_dim)``; text_mask: ``(B, M)`` bool or 0/1, True = real;
        image_mask: ``(B, N)`` bool or None (official: padding attended to).
    Returns:
        ``(delta_v (B, N, v_dim), delta_l (B, M, l_dim))``.
    """
    if attn.training and attn.dropout > 0:
        raise ValueError("factored_bi_mha has no attention dropout: call it in eval mode or with dropout=0")
    text_mask, image_mask = attn.check_inputs(v, l, text_mask, image_mask)
    B, N, Cv = v.shape
    M = l.shape[1]
    H, d = attn.num_heads, attn.head_dim

    k = attn.l_proj(l).view(B, M, H, d)
    w_q = attn.v_proj.weight.view(H, d, Cv)
    a = torch.einsum("hdc,bmhd->bchm", w_q, k).reshape(B, Cv, H * M) * attn.scale
    c = (torch.einsum("hd,bmhd->bhm", attn.v_proj.bias.view(H, d), k) * attn.scale).reshape(B, 1, H * M)
    s = torch.baddbmm(c, v, a)  # (B, N, H*M): the logits of every head, column h*M + m
    if attn.clamp is not None:
        s = s.clamp(min=-attn.clamp, max=attn.clamp)
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)

    # image direction: softmax over the valid text tokens of each head
    s_v = s.view(B, N, H, M)
    has_text = None
    if text_mask is not None:
        has_text = text_mask.any(-1)
        s_v = torch.where((text_mask | ~has_text[:, None])[:, None, None, :], s_v, neg_inf)
    p_v = torch.softmax(s_v, dim=-1)
    if has_text is not None:  # unconditional (times 1 is exact): a traced export has no data-dependent branch
        p_v = p_v * has_text[:, None, None, None].to(p_v.dtype)  # no valid token: o_v = 0
    v_l = attn.values_l_proj(l).view(B, M, H, d)
    u = torch.einsum("bmhd,chd->bhmc", v_l, attn.out_v_proj.weight.view(Cv, H, d)).reshape(B, H * M, Cv)
    delta_v = torch.baddbmm(attn.out_v_proj.bias.view(1, 1, Cv), p_v.view(B, N, H * M), u)

    # text direction: softmax over the image tokens (the columns of s)
    s_l = s
    image_keep = None  # (B, N, 1): the image tokens a text token may attend to
    keep_rows = None  # (B, 1, H*M) 1 where the text row keeps its output
    if image_mask is not None:
        has_image = image_mask.any(-1)
        image_keep = (image_mask | ~has_image[:, None])[:, :, None]
        s_l = torch.where(image_keep, s, neg_inf)
        keep_rows = has_image[:, None, None].expand(B, 1, H * M)
    if attn.clamp is not None:  # GLIP's second clamp, after subtracting the max over the image tokens
        s_l = (s_l - torch.max(s_l, dim=1, keepdim=True)[0]).clamp(min=-attn.clamp, max=attn.clamp)
        if image_keep is not None:  # the clamp lifted the masked -inf entries: mask them again
            s_l = torch.where(image_keep, s_l, neg_inf)
    if attn.skip_masked_text and text_mask is not None:
        keep_text = text_mask[:, None, None, :].expand(B, 1, H, M).reshape(B, 1, H * M)
        keep_rows = keep_text if keep_rows is None else keep_rows & keep_text
    p_l = torch.softmax(s_l, dim=1)  # (B, N, H*M)
    if keep_rows is not None:
        p_l = p_l * keep_rows.to(p_l.dtype)
    g = torch.bmm(p_l.transpose(1, 2), v).view(B, H, M, Cv)  # P_l,h v
    row_sums = p_l.sum(1).view(B, H, M)  # 1, or 0 for zeroed rows
    o_l = torch.einsum("bhmc,hdc->bmhd", g, attn.values_v_proj.weight.view(H, d, Cv))
    o_l = o_l + row_sums.transpose(1, 2)[..., None] * attn.values_v_proj.bias.view(H, d)
    delta_l = attn.out_l_proj(o_l.reshape(B, M, H * d))
    return delta_v, delta_l
