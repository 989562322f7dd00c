"""`attend_flash` (flash-attn replaced by the CPU stand-in of `_flash_stand_in.py`) and `attend_sdpa` vs
`fla_cp.ops.attention._attend`, the torch kernel, on the parts `attention_cp` builds: outputs and the
gradients of q, k, v, fp32 (rel <= TOL) and fp64, plus `resolve_attention_kernel`.

A case is one local part of a global stream: its queries at positions [p0, p1), its keys as
`attention_cp` gathers them (full: from the start of the first query's document; window: the W - 1
halo rows before the part, rows before the stream belonging to no document, then the part's own
rows; cache: KV-cache keys at positions -Lp .. -1 continuing the first document), documents from
cu_seqlens, padding from a per-row [B, T] mask.
"""
from __future__ import annotations

import pytest
import torch
from _flash_stand_in import flash_attn_varlen_func

from fla_cp.ops import attention_kernels as ak
from fla_cp.ops.attention import _attend
from fla_cp.ops.attention_kernels import (
    attend_flash,
    attend_sdpa,
    flash_layout,
    resolve_attention_kernel,
)

# worst measured over seeds 0-19 on every case, outputs and gradients: fp32 flash (stand-in) 2.7e-7,
# sdpa 4.8e-7 relative and 1.2e-6 absolute (packed_w1's dq, dk: 0 in exact arithmetic); fp64 7.6e-16
TOL = 1e-5
TOL64 = 1e-12
SEEDS = [0, 1, 2, 3]

PACKED = [0, 5, 6, 30, 41, 48]     # part [8, 36): document [6, 30) starts before it, [30, 41) runs past it

CASES = [
    {"name": "packed_full_gqa", "cu": PACKED, "part": (8, 36), "H": 4, "Hkv": 2},
    {"name": "packed_full_mqa_dv", "cu": PACKED, "part": (8, 36), "H": 4, "Hkv": 1, "D": 8, "Dv": 6},
    {"name": "packed_non_causal", "cu": PACKED, "part": (8, 36), "H": 4, "Hkv": 2, "causal": False},
    {"name": "packed_w1", "cu": PACKED, "part": (8, 36), "H": 4, "Hkv": 2, "W": 1},
    {"name": "packed_w3", "cu": PACKED, "part": (8, 36), "H": 4, "Hkv": 1, "W": 3},
    {"name": "packed_w_large", "cu": PACKED, "part": (8, 36), "H": 2, "Hkv": 2, "W": 100},
    {"name": "stream_start_w5_halo_outside", "cu": PACKED, "part": (0, 12), "H": 4, "Hkv": 2, "W": 5},
    {"name": "packed_last_part_full", "cu": PACKED, "part": (36, 48), "H": 4, "Hkv": 2},
    # keys beyond what attention_cp gathers: to the end of the last document (causal), and from the
    # start of the first with a window; attend_flash drops the keys no query may see
    {"name": "causal_keys_past_the_part", "cu": PACKED, "part": (8, 36), "H": 4, "Hkv": 2, "keys": "doc_end"},
    {"name": "w3_over_all_document_keys", "cu": PACKED, "part": (12, 36),
     "H": 4, "Hkv": 2, "W": 3, "keys": "doc_end"},
    {"name": "dense_pad_full", "B": 2, "T": 30, "part": (10, 30), "H": 4, "Hkv": 1, "pad": (13, 6)},
    {"name": "dense_pad_full_first_part", "B": 2, "T": 30, "part": (0, 15),
     "H": 4, "Hkv": 2, "D": 6, "Dv": 8, "pad": (13, 6)},
    {"name": "dense_pad_w4", "B": 2, "T": 30, "part": (10, 30), "H": 4, "Hkv": 2, "W": 4, "pad": (13, 6)},
    {"name": "dense_pad_w4_mid_part", "B": 2, "T": 30, "part": (12, 20), "H": 4, "Hkv": 2, "W": 4, "pad": (14, 9)},
    {"name": "dense_pad_non_causal", "B": 2, "T": 30, "part": (10, 22),
     "H": 4, "Hkv": 2, "causal": False, "pad": (13, 6)},
    {"name": "cache_full", "cu": [0, 7, 20], "cache": 6, "part": (0, 20), "H": 4, "Hkv": 2},
    {"name": "cache_w4_dense", "B": 2, "T": 16, "cache": 6, "part": (0, 16), "H": 4, "Hkv": 1, "W": 4},
    {"name": "cache_right_pad_full", "B": 2, "T": 16, "cache": 5, "part": (0, 16), "H": 4, "Hkv": 2, "pad": (0, 4)},
    # the first query of document [30, 41) is valid but its own key is padded: it sees no key
    {"name": "query_sees_nothing", "cu": PACKED, "part": (8, 36), "H": 4, "Hkv": 2, "drop_keys": (30,)},
    {"name": "query_sees_nothing_w3", "cu": PACKED, "part": (8, 36), "H": 4, "Hkv": 2, "W": 3, "drop_keys": (30,)},
]

CASE = {case["name"]: case for case in CASES}


def doc_of(cu: list[int], pos: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(torch.tensor(cu), pos, right=True) - 1


def make_case(case: dict, seed: int, dtype=torch.float32):
    """The part's inputs: q, k, v (leaves), positions, documents, masks, loss weights."""
    gen = torch.Generator().manual_seed(seed)
    B = case.get("B", 1)
    T = case["cu"][-1] if "cu" in case else case["T"]
    cu = case.get("cu", [0, T])
    causal, W, Lp = case.get("causal", True), case.get("W"), case.get("cache", 0)
    p0, p1 = case["part"]
    qpos = torch.arange(p0, p1)
    if Lp:                                              # a KV cache before the call, then the stream
        kpos = torch.arange(-Lp, p1)
    elif W is not None and not case.get("keys"):       # the halo (rows before the stream: no document)
        kpos = torch.arange(p0 - min(W - 1, T - 1), p1)
    else:
        k0 = cu[int(doc_of(cu, torch.tensor([p0])))]
        k1 = p1 if causal and not case.get("keys") else cu[int(doc_of(cu, torch.tensor([p1 - 1]))) + 1]
        kpos = torch.arange(k0, k1)
    qdoc = doc_of(cu, qpos)
    kdoc = doc_of(cu, kpos.clamp_min(0))
    if not Lp:
        kdoc = torch.where(kpos < 0, torch.full_like(kdoc, -1), kdoc)
    valid = torch.ones(B, T, dtype=torch.bool)          # the stream's padding mask
    if case.get("pad"):
        left, right = case["pad"]
        valid[0, :left] = False
        valid[B - 1, T - right:] = False
    kvalid = torch.ones(B, kpos.numel(), dtype=torch.bool)
    inside = (kpos >= 0) & (kpos < T)
    kvalid[:, inside] = valid[:, kpos[inside]]
    if not Lp:
        kvalid[:, kpos < 0] = False                     # the halo's zero rows
    for p in case.get("drop_keys", ()):
        kvalid[:, kpos == p] = False
    qvalid = valid[:, qpos]
    masked = bool(case.get("pad")) or bool(case.get("drop_keys"))      # else no mask, as attention_cp passes
    n, m = qpos.numel(), kpos.numel()
    H, Hkv, D = case["H"], case["Hkv"], case.get("D", 8)
    Dv = case.get("Dv", D)
    q = torch.randn(B, n, H, D, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(B, m, Hkv, D, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(B, m, Hkv, Dv, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(B, n, H, Dv, generator=gen).to(dtype)
    return {"q": q, "k": k, "v": v, "w": w, "qpos": qpos, "kpos": kpos, "qdoc": qdoc, "kdoc": kdoc,
            "key_valid": kvalid if masked else None, "query_valid": qvalid if masked else None,
            "causal": causal, "window": W, "scale": D ** -0.5}


def allowed_of(c: dict) -> torch.Tensor:
    """`[n, m]`: same document (kdoc >= 0), causal, window, from positions (`_allowed`'s rule)."""
    qpos, kpos, qdoc, kdoc = c["qpos"], c["kpos"], c["qdoc"], c["kdoc"]
    ok = (qdoc[:, None] == kdoc[None, :]) & (kdoc[None, :] >= 0)
    if c["causal"]:
        ok &= kpos[None, :] <= qpos[:, None]
    if c["window"] is not None:
        ok &= qpos[:, None] - kpos[None, :] < c["window"]
    return ok


def run(kernel: str, c: dict):
    """o and the gradients of q, k, v of sum(o * w) through one kernel."""
    q, k, v = c["q"], c["k"], c["v"]
    B, m, Hkv, D = k.shape
    Dv = v.shape[-1]
    if kernel == "torch":
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        kv = torch.cat([k.reshape(B, m, Hkv * D), v.reshape(B, m, Hkv * Dv)], -1)
        o = _attend(q, kv, allowed_of(c), c["key_valid"], c["query_valid"], Hkv, D, Dv, c["scale"], cdt).to(q.dtype)
    elif kernel == "sdpa":
        o = attend_sdpa(q, k, v, allowed_of(c), c["key_valid"], c["query_valid"], c["scale"])
    else:
        o = attend_flash(q, k, v, c["qpos"], c["kpos"], c["qdoc"], c["kdoc"], c["key_valid"], c["query_valid"],
                         c["causal"], c["window"], c["scale"])
    assert o.dtype == q.dtype and o.shape == (*q.shape[:3], Dv)
    grads = torch.autograd.grad((o * c["w"]).sum(), (q, k, v))
    return (o.detach(), *grads)


def rel_err(a, b) -> float:
    """Relative error in norm; absolute (max) where the reference is 0 up to rounding: W=1 gives each
    query one key, so its dq and dk are 0 and only rounding noise is left to compare."""
    a, b = a.double(), b.double()
    if b.norm() <= 1e-6 * b.numel() ** 0.5:
        return (a - b).abs().max().item() if b.numel() else 0.0
    return ((a - b).norm() / b.norm()).item()


def errors(kernel: str, case: dict, seed: int, dtype) -> list[float]:
    c = make_case(case, seed, dtype)
    got, ref = run(kernel, c), run("torch", c)
    for x in got:
        assert torch.isfinite(x).all()
    if c["query_valid"] is not None:                     # padded queries output exactly 0
        assert (got[0][~c["query_valid"]] == 0).all()
    return [rel_err(a, b) for a, b in zip(got, ref)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: with several intra-op threads on a busy machine, OpenMP's waits cost 100x the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stand_in(monkeypatch):
    calls = []

    def counted(*args, **kw):
        calls.append(kw)
        return flash_attn_varlen_func(*args, **kw)
    monkeypatch.setattr(ak, "_FLASH_VARLEN", counted)
    return calls


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL), (torch.float64, TOL64)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kernel", ["flash", "sdpa"])
def test_kernel_matches_torch(kernel, dtype, tol, stand_in):
    for case in CASES:
        for seed in SEEDS:
            errs = errors(kernel, case, seed, dtype)
            assert max(errs) <= tol, f"{kernel} {case['name']} seed={seed}: rel err (o, dq, dk, dv) {errs}"
    if kernel == "flash":
        assert len(stand_in) == len(CASES) * len(SEEDS)          # one varlen call per forward


def test_flash_varlen_sequences(stand_in):
    """The sequences handed to flash-attn: one per (row, document) of the valid queries, keys trimmed to
    those some query may see, exact max_seqlen."""
    seen = []

    def record(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):
        seen.append((cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), max_seqlen_q, max_seqlen_k, kw))
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw)
    ak._FLASH_VARLEN = record
    # packed part [8, 36) of PACKED, full causal: documents [6, 30) (22 queries, keys from 6: 24) and
    # [30, 41) (6 queries, keys 30..35)
    run("flash", make_case(CASE["packed_full_gqa"], 0))
    assert seen[-1][:4] == ([0, 22, 28], [0, 24, 30], 22, 24)
    assert seen[-1][4]["causal"] is True and seen[-1][4]["window_size"] == (-1, -1)
    # window 3: the halo holds 2 keys of the first document
    run("flash", make_case(CASE["packed_w3"], 0))
    assert seen[-1][:4] == ([0, 22, 28], [0, 24, 30], 22, 24) and seen[-1][4]["window_size"] == (2, 0)
    # non-causal: document [30, 41) keys to its end
    run("flash", make_case(CASE["packed_non_causal"], 0))
    assert seen[-1][:4] == ([0, 22, 28], [0, 24, 35], 22, 24)
    # dense B=2, part [10, 30), row 0 left-padded 13, row 1 right-padded 6
    run("flash", make_case(CASE["dense_pad_full"], 0))
    assert seen[-1][:4] == ([0, 17, 31], [0, 17, 41], 17, 24)
    # keys [6, 41) for part [8, 36): causal keeps 6..35
    run("flash", make_case(CASE["causal_keys_past_the_part"], 0))
    assert seen[-1][:2] == ([0, 22, 28], [0, 24, 30])
    # keys [6, 41) for part [12, 36), window 3: 10..29 (the first query is at 12) and 30..35
    run("flash", make_case(CASE["w3_over_all_document_keys"], 0))
    assert seen[-1][:2] == ([0, 18, 24], [0, 20, 26]) and seen[-1][4]["window_size"] == (2, 0)
    # the layout caches the unpadded indices: no padding, same B, one build
    c = make_case(CASE["packed_full_gqa"], 0)
    lay = flash_layout(c["qpos"], c["kpos"], c["qdoc"], c["kdoc"], True, None)
    for _ in range(2):
        o = attend_flash(c["q"], c["k"], c["v"], None, None, None, None, None, None, True, None, c["scale"],
                         layout=lay)
    assert len(lay._cache) == 1 and torch.equal(o, run("flash", c)[0])


def test_fully_masked_rows_are_zero_with_finite_gradients(stand_in):
    """Queries that see no key (all keys padded, or no key of their document) output 0, gradients finite."""
    case = {"name": "x", "cu": PACKED, "part": (8, 36), "H": 4, "Hkv": 2}
    for kernel in ("flash", "sdpa", "torch"):
        c = make_case(case, 3)
        c["key_valid"] = torch.zeros(1, c["kpos"].numel(), dtype=torch.bool)
        c["query_valid"] = torch.ones(1, c["qpos"].numel(), dtype=torch.bool)
        o, dq, dk, dv = run(kernel, c)
        assert (o == 0).all() and (dq == 0).all() and (dk == 0).all() and (dv == 0).all(), kernel
        # only document [30, 41)'s keys are padded: its queries output 0, the others are untouched
        c = make_case(case, 3)
        c["key_valid"] = (c["kpos"] < 30)[None]
        c["query_valid"] = torch.ones(1, c["qpos"].numel(), dtype=torch.bool)
        got, ref = run(kernel, c), run("torch", c)
        assert (got[0][0, 22:] == 0).all() and all(torch.isfinite(x).all() for x in got), kernel
        assert max(rel_err(a, b) for a, b in zip(got, ref)) <= TOL, kernel


def test_flash_refuses_what_it_cannot_align(stand_in):
    # a padding hole inside a window: flash-attn would count the window in unpadded tokens
    c = make_case({"cu": [0, 30], "part": (10, 30), "H": 2, "Hkv": 1, "W": 4}, 0)
    hole = torch.ones(1, c["kpos"].numel(), dtype=torch.bool)
    hole[0, 5] = False                                   # position 12
    c["key_valid"], c["query_valid"] = hole, hole[:, 3:]
    with pytest.raises(ValueError, match="padding hole inside a window of 4"):
        run("flash", c)
    # without a window the hole is exact (the unpadded causal order is the stream's)
    c["window"] = None
    got, ref = run("flash", c), run("torch", c)
    assert max(rel_err(a, b) for a, b in zip(got, ref)) <= TOL
    # a valid query whose own key is padded while an earlier key of its document is visible
    c = make_case({"cu": [0, 30], "part": (10, 30), "H": 2, "Hkv": 1}, 0)
    c["key_valid"] = torch.ones(1, c["kpos"].numel(), dtype=torch.bool)
    c["key_valid"][0, 15] = False
    with pytest.raises(ValueError, match="bottom-right"):
        run("flash", c)
    with pytest.raises(ValueError, match="causal=True"):
        attend_flash(c["q"], c["k"], c["v"], c["qpos"], c["kpos"], c["qdoc"], c["kdoc"], None, None, False, 4, 1.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        attend_flash(c["q"], c["k"], c["v"], c["qpos"].flip(0), c["kpos"], c["qdoc"], c["kdoc"], None, None, True,
                     None, 1.0)
    lay = flash_layout(c["qpos"], c["kpos"], c["qdoc"], c["kdoc"], True, 4)
    with pytest.raises(ValueError, match="layout was built for"):
        attend_flash(c["q"], c["k"], c["v"], None, None, None, None, None, None, True, None, 1.0, layout=lay)


def test_flash_missing(monkeypatch):
    monkeypatch.setattr(ak, "_FLASH_VARLEN", None)
    c = make_case(CASE["packed_full_gqa"], 0)
    with pytest.raises(RuntimeError, match="flash-attn is not installed"):
        run("flash", c)


def test_resolve_attention_kernel(monkeypatch):
    cpu32 = torch.zeros(1, 2, 2, 8)
    cpu16 = cpu32.to(torch.bfloat16)
    monkeypatch.setattr(ak, "_FLASH_VARLEN", None)
    assert resolve_attention_kernel("auto", cpu32) == "torch"
    assert resolve_attention_kernel("auto", cpu16) == "torch"
    assert resolve_attention_kernel("torch", cpu32) == "torch"
    assert resolve_attention_kernel("sdpa", cpu32) == "sdpa"
    with pytest.raises(ValueError, match="backend='flash' cannot run: q is on cpu"):
        resolve_attention_kernel("flash", cpu16)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_attention_kernel("triton", cpu32)

    class Fake:
        """What the choice reads of q, claiming CUDA (no GPU here)."""
        def __init__(self, dtype, D=64):
            self.device, self.dtype, self.shape = torch.device("cuda", 0), dtype, (1, 4, 2, D)

    assert resolve_attention_kernel("auto", Fake(torch.bfloat16)) == "sdpa"      # not installed
    with pytest.raises(ValueError, match="flash-attn is not installed"):
        resolve_attention_kernel("flash", Fake(torch.float16))
    monkeypatch.setattr(ak, "_FLASH_VARLEN", flash_attn_varlen_func)
    assert resolve_attention_kernel("auto", Fake(torch.bfloat16)) == "flash"
    assert resolve_attention_kernel("auto", Fake(torch.float16)) == "flash"
    assert resolve_attention_kernel("flash", Fake(torch.bfloat16)) == "flash"
    assert resolve_attention_kernel("auto", Fake(torch.float32)) == "sdpa"
    assert resolve_attention_kernel("auto", Fake(torch.bfloat16, D=512)) == "sdpa"
    assert resolve_attention_kernel("auto", Fake(torch.bfloat16), head_dim_v=320) == "sdpa"
    with pytest.raises(ValueError, match="float32 and flash-attn computes in float16/bfloat16 only"):
        resolve_attention_kernel("flash", Fake(torch.float32))
    with pytest.raises(ValueError, match="head dim 512 > 256"):
        resolve_attention_kernel("flash", Fake(torch.bfloat16, D=512))
    assert resolve_attention_kernel("sdpa", Fake(torch.float32)) == "sdpa"


def test_flash_attn_varlen_import_is_lazy_and_cached(monkeypatch):
    monkeypatch.setattr(ak, "_FLASH_VARLEN", ak._UNSET)
    first = ak.flash_attn_varlen()
    try:
        import flash_attn  # noqa: F401
        installed = True
    except Exception:  # noqa: BLE001 - as flash_attn_varlen() sees it: any failure is "not installed"
        installed = False
    assert (first is not None) == installed and ak._FLASH_VARLEN is first and ak.flash_attn_varlen() is first
