"""A CPU stand-in for flash-attn (`flash_attn_func`, `flash_attn_varlen_func`) with its documented semantics.

fp64 inside, any dtype and device, differentiable by autograd. Query i of a sequence of Tq queries over
Tk keys sees keys i + Tk - Tq - left .. i + Tk - Tq + right (bottom-right aligned; -1: unlimited;
causal: right = 0); GQA head h reads key head h // (H // Hkv); the scale defaults to D ** -0.5. A query
that sees no key outputs 0 (its gradient is not defined here: NaN; flash-attn's is 0).

    monkeypatch.setattr(attention_kernels, "_FLASH_VARLEN", flash_attn_varlen_func)
    fla.layers.attn.flash_attn_func = flash_attn_func
"""
from __future__ import annotations

import itertools

import torch


def flash_stand_in(q, k, v, causal, window_size, softmax_scale=None):
    """One sequence: q `[Tq, H, D]`, k/v `[Tk, Hkv, D]` -> `[Tq, H, Dv]` in q's dtype."""
    Tq, Tk = q.shape[0], k.shape[0]
    r = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * (softmax_scale or q.shape[-1] ** -0.5)
    i = torch.arange(Tq)[:, None] + Tk - Tq
    j = torch.arange(Tk)[None, :]
    left, right = window_size
    right = 0 if causal else right
    ok = torch.ones(Tq, Tk, dtype=torch.bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    p = torch.softmax(s.masked_fill(~ok.to(s.device), float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, vv).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
    """`[B, Tq, H, D]` batches of equal lengths."""
    return torch.stack([flash_stand_in(q[b], k[b], v[b], causal, window_size, softmax_scale)
                        for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
    """Packed `[total, H, D]` sequences given by int32 cu_seqlens_q / cu_seqlens_k."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    # flash-attn sizes its grid by max_seqlen: a smaller one than a sequence's length drops rows
    assert max_seqlen_q is None or max_seqlen_q >= max(b - a for a, b in itertools.pairwise(cq))
    assert max_seqlen_k is None or max_seqlen_k >= max(b - a for a, b in itertools.pairwise(ck))
    return torch.cat([flash_stand_in(q[a:b], k[c:d], v[c:d], causal, window_size, softmax_scale)
                      for a, b, c, d in zip(cq, cq[1:], ck, ck[1:])])
