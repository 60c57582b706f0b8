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
:class:`~glip_fusion.BiAttentionBlock` then runs the whole block through :func:`factored_bi_attention_block`.

Without autograd the image tokens go in chunks of :data:`CHUNK_TOKENS` (a chunk's logits, updates and, in the
block, its layer norm and residual stay in the cache): the image direction is complete per chunk; the text
direction's softmax over all image tokens is accumulated online (running column maximum, rescaled sums and
``P_l v`` products). The second clamp acts on the logits minus the *final* column maximum, which an online pass
does not know; it is invisible where ``exp(-clamp)`` underflows to 0 (GLIP's 50000, any dtype), else the tokens go
in one chunk.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["factored_bi_mha", "factored_bi_attention_block", "factored_pays", "CHUNK_TOKENS"]


def factored_pays(num_text_tokens: int, head_dim: int) -> bool:
    """Whether the factored form needs fewer FLOPs than the projected one (text shorter than a head)."""
    return num_text_tokens < head_dim


#: image tokens per chunk without autograd (the chunk's logits and updates stay in the cache; measured on GLIP-T at
#: 800x1216, one core: 1024..8192 within 5%, the block 1.8x faster than unchunked with the LN and residual inside)
CHUNK_TOKENS = 4096


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
    return _factored(attn, v, l, text_mask, image_mask)


def factored_bi_attention_block(block, v: torch.Tensor, l: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                                image_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`glip_fusion.BiAttentionBlock.forward` of ``block`` with its X-MHA in the factored order:
    ``(LN_v(v) + gamma_v * delta_v, LN_l(l) + gamma_l * delta_l)``, the image side's layer norm and residual done
    chunk by chunk.

    Args: as :func:`factored_bi_mha`, with ``block`` a :class:`~glip_fusion.BiAttentionBlock`.
    Returns: ``(v' (B, N, v_dim), l' (B, M, l_dim))``.
    """
    l = block.layer_norm_l(l)
    v_out, delta_l = _factored(block.attn, v, l, text_mask, image_mask, norm_v=block.layer_norm_v,
                               gamma_v=block.gamma_v)
    return v_out, l + block.gamma_l * delta_l


def _softmax_last(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Softmax over the last dim (a prompt's few tokens), ``exp(x - max) / sum`` stated directly: several times
    faster than ``torch.softmax`` on a last dim of ~10, equal to float rounding."""
    e = x - x.amax(-1, keepdim=True)
    if inplace:
        return e.exp_().div_(e.sum(-1, keepdim=True))
    e = e.exp()
    return e / e.sum(-1, keepdim=True)


def _factored(attn, v, l, text_mask, image_mask, norm_v=None, gamma_v=None):
    """The factored X-MHA; with ``norm_v`` / ``gamma_v`` the image side returns ``norm_v(v) + gamma_v * delta_v``."""
    if attn.training and attn.dropout > 0:
        raise ValueError("factored_bi_mha has no attention dropout: call it in eval mode or with dropout=0")
    text_mask, image_mask = attn.check_inputs(v, l, text_mask, image_mask)
    B, N, Cv = v.shape
    M = l.shape[1]
    H, d = attn.num_heads, attn.head_dim
    HM = H * M
    clamp = attn.clamp
    grad = torch.is_grad_enabled()  # in-place steps and chunks only without autograd
    # an online softmax cannot see the second clamp (relative to the final maximum): invisible when it underflows
    clamp_invisible = clamp is None or float(torch.tensor(-clamp, dtype=v.dtype).exp()) == 0.0
    # a traced graph (export) keeps N symbolic: one chunk, no loop over a size it does not know
    chunked = not grad and clamp_invisible and not torch.compiler.is_compiling() and N > CHUNK_TOKENS

    k = attn.l_proj(l).view(B, M, H, d)
    w_q = attn.v_proj.weight.view(H, d, Cv)
    a = torch.einsum("hdc,bmhd->bchm", w_q, k).reshape(B, Cv, HM) * attn.scale
    c = (torch.einsum("hd,bmhd->bhm", attn.v_proj.bias.view(H, d), k) * attn.scale).reshape(B, 1, HM)
    v_l = attn.values_l_proj(l).view(B, M, H, d)
    u = torch.einsum("bmhd,chd->bhmc", v_l, attn.out_v_proj.weight.view(Cv, H, d)).reshape(B, HM, Cv)
    neg_inf = torch.tensor(float("-inf"), dtype=v.dtype, device=v.device)

    # image direction: softmax over the valid text tokens of each head
    text_keep = has_text = None
    if text_mask is not None:
        has_text = text_mask.any(-1)
        text_keep = (text_mask | ~has_text[:, None])[:, None, None, :]
        # unconditional (times 1 is exact): a traced export has no data-dependent branch
        has_text = has_text[:, None, None, None].to(v.dtype)
    # text direction: softmax over the image tokens (the columns of the logits)
    image_keep = None  # (B, N, 1): the image tokens a text token may attend to
    keep_rows = None  # (B, 1, H*M) 1 where the text row keeps its output
    if image_mask is not None:
        has_image = image_mask.any(-1)
        image_keep = (image_mask | ~has_image[:, None])[:, :, None]
        keep_rows = has_image[:, None, None].expand(B, 1, HM)

    out = None
    col_max = sums = g = None  # running column maximum (B, 1, H*M), sums (B, 1, H*M), P_l v (B, H*M, Cv)
    bounds = [(n0, min(N, n0 + CHUNK_TOKENS)) for n0 in range(0, N, CHUNK_TOKENS)] if chunked else [(0, N)]
    for n0, n1 in bounds:
        vc = v[:, n0:n1] if norm_v is None else norm_v(v[:, n0:n1])
        s = torch.baddbmm(c, vc, a)  # (B, n, H*M): the logits of every head, column h*M + m
        if clamp is not None:
            s = s.clamp(-clamp, clamp) if grad else s.clamp_(-clamp, clamp)
        s_v = s.view(B, n1 - n0, H, M)
        if text_keep is not None:
            s_v = torch.where(text_keep, s_v, neg_inf)
        p_v = _softmax_last(s_v, inplace=not grad)
        if has_text is not None:
            p_v = p_v * has_text  # no valid token: o_v = 0
        dv = torch.baddbmm(attn.out_v_proj.bias.view(1, 1, Cv), p_v.view(B, n1 - n0, HM), u)
        if gamma_v is not None:
            dv = vc + (dv * gamma_v if grad else dv.mul_(gamma_v))
        if not chunked:
            out = dv
        else:
            if out is None:
                out = v.new_empty(B, N, Cv)
            out[:, n0:n1] = dv

        s_l = s if image_keep is None else torch.where(image_keep[:, n0:n1], s, neg_inf)
        new_max = s_l.amax(1, keepdim=True) if col_max is None else torch.maximum(col_max, s_l.amax(1, keepdim=True))
        # a column without a kept token so far has max -inf: shift by 0 instead (its exps are 0 either way)
        new_max = torch.where(new_max == float("-inf"), 0.0, new_max) if image_keep is not None else new_max
        s_l = s_l - new_max
        if clamp is not None:  # GLIP's second clamp, after subtracting the max over the image tokens
            s_l = s_l.clamp(-clamp, clamp) if grad else s_l.clamp_(-clamp, clamp)
            if image_keep is not None:  # the clamp lifted the masked -inf entries: mask them again
                s_l = torch.where(image_keep[:, n0:n1], s_l, neg_inf)
        e = s_l.exp() if grad else s_l.exp_()
        part_sums, part_g = e.sum(1, keepdim=True), torch.bmm(e.transpose(1, 2), vc)
        if col_max is None:
            sums, g = part_sums, part_g
        else:  # rescale what was summed under the previous maximum
            scale = (col_max - new_max).exp_()
            sums = sums * scale + part_sums
            g = g * scale.transpose(1, 2) + part_g
        col_max = new_max
    g = g / sums.transpose(1, 2)  # (B, H*M, Cv) = P_l,h v
    row_sums = None  # the probabilities' row sums: 1, or 0 for zeroed rows
    if attn.skip_masked_text and text_mask is not None:
        keep_text = text_mask[:, None, None, :].expand(B, 1, H, M).reshape(B, 1, HM)
        keep_rows = keep_text if keep_rows is None else keep_rows & keep_text
    if keep_rows is not None:
        row_sums = keep_rows.to(g.dtype)
        g = g * row_sums.transpose(1, 2)
    o_l = torch.einsum("bhmc,hdc->bmhd", g.view(B, H, M, Cv), attn.values_v_proj.weight.view(H, d, Cv))
    b_vv = attn.values_v_proj.bias.view(H, d)
    o_l = o_l + (b_vv if row_sums is None else row_sums.view(B, H, M).transpose(1, 2)[..., None] * b_vv)
    delta_l = attn.out_l_proj(o_l.reshape(B, M, H * d))
    return out, delta_l
