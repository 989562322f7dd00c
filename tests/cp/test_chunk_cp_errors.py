"""Bad input raises the same clear ValueError on every rank, naming the argument and the rank; never a
hang (run_ranks kills ranks that outlive their timeout and fails the test)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fla_cp.ops import build_cp_context, chunk_cp_gated_delta_rule

from _dist import run_ranks

P = 2
T = 64


def _inputs(B=1, T_loc=T // P, H=2, HV=2, K=8, V=8, dtype=torch.float32):
    q = torch.randn(B, T_loc, H, K, dtype=dtype)
    return dict(q=q, k=torch.randn_like(q), v=torch.randn(B, T_loc, HV, V, dtype=dtype),
                g=-torch.rand(B, T_loc, HV), beta=torch.rand(B, T_loc, HV))


def _call(rank, x, ctx, **kw):
    return chunk_cp_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cp_context=ctx, **kw)


def case_k_shape_on_one_rank(rank):
    x = _inputs()
    if rank == 1:
        x["k"] = x["k"][..., :4]
    _call(rank, x, build_cp_context(None, seq_len=T))


def case_head_dim_differs_between_ranks(rank):
    _call(rank, _inputs(K=8 if rank == 0 else 16), build_cp_context(None, seq_len=T))


def case_dtype_differs_between_ranks(rank):
    _call(rank, _inputs(dtype=torch.float32 if rank == 0 else torch.bfloat16), build_cp_context(None, seq_len=T))


def case_cu_seqlens_differ_between_ranks(rank):
    build_cp_context(None, cu_seqlens=torch.tensor([0, 10, T] if rank == 0 else [0, 11, T]))


def case_cu_seqlens_not_increasing(rank):
    build_cp_context(None, cu_seqlens=torch.tensor([0, 30, 30, T]))


def case_local_token_count(rank):
    ctx = build_cp_context(None, cu_seqlens=torch.tensor([0, 10, T]))
    _call(rank, _inputs(T_loc=T // P + (rank == 0)), ctx)


def case_batch_with_cu_seqlens(rank):
    _call(rank, _inputs(B=2), build_cp_context(None, cu_seqlens=torch.tensor([0, 10, T])))


def case_hv_not_multiple_of_h(rank):
    _call(rank, _inputs(H=2, HV=3), build_cp_context(None, seq_len=T))


def case_context_for_other_group_size(rank):
    ctx = dataclasses.replace(build_cp_context(None, seq_len=T), world_size=4)
    _call(rank, _inputs(), ctx)


def case_initial_state_shape(rank):
    ctx = build_cp_context(None, cu_seqlens=torch.tensor([0, 10, T]))
    _call(rank, _inputs(), ctx, initial_state=torch.zeros(1, 2, 8, 8))   # 2 sequences, not 1


def case_sequence_shorter_than_group(rank):
    build_cp_context(None, seq_len=3, layout="zigzag")


def case_mismatched_cu_seqlens_argument(rank):
    ctx = build_cp_context(None, cu_seqlens=torch.tensor([0, 10, T]))
    _call(rank, _inputs(), ctx, cu_seqlens=torch.tensor([0, 12, T]))


# A bad argument on ONE rank only: that rank must not raise before the agreement check (the others
# would wait in it forever), so these are the cases that used to hang.
def case_scale_nan_on_one_rank(rank):
    _call(rank, _inputs(), build_cp_context(None, seq_len=T), scale=float("nan") if rank == 1 else None)


def case_scale_zero_vs_default(rank):   # 0.0 must not pass as "no scale"
    _call(rank, _inputs(), build_cp_context(None, seq_len=T), scale=0.0 if rank == 1 else None)


def case_cu_seqlens_int_on_one_rank(rank):
    _call(rank, _inputs(), build_cp_context(None, seq_len=T), cu_seqlens=T if rank == 1 else None)


def case_backend_misspelled_on_one_rank(rank):
    _call(rank, _inputs(), build_cp_context(None, seq_len=T), backend="Torch" if rank == 1 else "torch")


def case_initial_state_int_on_one_rank(rank):
    h0 = torch.ones(1, 2, 8, 8)
    _call(rank, _inputs(), build_cp_context(None, seq_len=T), initial_state=h0.long() if rank == 1 else h0)


def case_initial_state_dtype_differs(rank):
    h0 = torch.ones(1, 2, 8, 8)
    _call(rank, _inputs(), build_cp_context(None, seq_len=T), initial_state=h0.bfloat16() if rank == 1 else h0)


def case_build_seq_len_not_int_on_one_rank(rank):
    build_cp_context(None, seq_len=float(T) if rank == 1 else T)


def case_build_cu_seqlens_2d_on_one_rank(rank):
    build_cp_context(None, cu_seqlens=torch.tensor([[0, 10, T]] if rank == 1 else [0, 10, T]))


def case_build_cu_seqlens_float_on_one_rank(rank):   # used to be truncated silently
    build_cp_context(None, cu_seqlens=[0, 10.5, T] if rank == 1 else [0, 10, T])


def case_scale_huge_int_on_one_rank(rank):   # math.isfinite(10**400) overflows
    _call(rank, _inputs(), build_cp_context(None, seq_len=T), scale=10 ** 400 if rank == 1 else None)


def case_zero_heads_on_one_rank(rank):
    _call(rank, _inputs(H=0 if rank == 1 else 2), build_cp_context(None, seq_len=T))


def case_flag_array_on_one_rank(rank):
    _call(rank, _inputs(), build_cp_context(None, seq_len=T),
          output_final_state=torch.tensor([True, False]) if rank == 1 else True)


def case_meta_device_on_one_rank(rank):
    x = _inputs()
    if rank == 1:
        x = {n: t.to("meta") for n, t in x.items()}
    _call(rank, x, build_cp_context(None, seq_len=T))


def case_build_huge_seq_len_on_one_rank(rank):
    build_cp_context(None, seq_len=2 ** 63 if rank == 1 else T)


# case -> words the message must contain
CASES = {
    case_k_shape_on_one_rank: ["rank 1", "k has shape"],
    case_head_dim_differs_between_ranks: ["differs between ranks", "rank 1", "B/H/K/HV/V"],
    case_dtype_differs_between_ranks: ["differs between ranks", "dtype", "torch.float32", "torch.bfloat16"],
    case_cu_seqlens_differ_between_ranks: ["cu_seqlens", "differs between ranks", "rank 1"],
    case_cu_seqlens_not_increasing: ["cu_seqlens", "strictly increasing", "rank 0", "rank 1"],
    case_local_token_count: ["rank 0", "tokens", "cp_context"],
    case_batch_with_cu_seqlens: ["batch size 1", "B=2", "rank 0"],
    case_hv_not_multiple_of_h: ["HV=3", "H=2", "rank 0"],
    case_context_for_other_group_size: ["cp_context", "4 ranks", "has 2"],
    case_initial_state_shape: ["initial_state", "N=2", "rank 0"],
    case_sequence_shorter_than_group: ["seq_len=3", "zigzag"],
    case_mismatched_cu_seqlens_argument: ["cu_seqlens differs", "rank 1"],
    case_scale_nan_on_one_rank: ["rank 1", "scale must be a finite number"],
    case_scale_zero_vs_default: ["scale", "differs between ranks", "0.0"],
    case_cu_seqlens_int_on_one_rank: ["rank 1", "cu_seqlens must be", "int"],
    case_backend_misspelled_on_one_rank: ["rank 1", "backend must be one of", "'Torch'"],
    case_initial_state_int_on_one_rank: ["rank 1", "initial_state must be a floating", "int64"],
    case_initial_state_dtype_differs: ["initial_state (given, dtype)", "differs between ranks", "torch.bfloat16"],
    case_build_seq_len_not_int_on_one_rank: ["build_cp_context", "rank 1", "seq_len must be a positive int"],
    case_build_cu_seqlens_2d_on_one_rank: ["build_cp_context", "rank 1", "1-D integer tensor"],
    case_build_cu_seqlens_float_on_one_rank: ["build_cp_context", "rank 1", "must hold integers"],
    case_scale_huge_int_on_one_rank: ["rank 1", "OverflowError"],
    case_zero_heads_on_one_rank: ["rank 1", "must be >= 1", "H=0"],
    case_flag_array_on_one_rank: ["rank 1", "output_final_state must be a bool"],
    case_meta_device_on_one_rank: ["dtype and device type", "differs between ranks", "'cpu'", "'meta'"],
    case_build_huge_seq_len_on_one_rank: ["cu_seqlens/seq_len/layout", "differs between ranks"],
}


def _explicit_default_scale(rank):
    """scale=K ** -0.5 on one rank and None on the other is the same call: it must run."""
    torch.manual_seed(0)
    x = _inputs()
    o, _ = _call(rank, x, build_cp_context(None, seq_len=T), scale=8 ** -0.5 if rank == 1 else None)
    return o


def _worker(rank, world_size, cases):
    messages = []
    for case in cases:
        try:
            case(rank)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    # a working call afterwards: the group is still in step after every error
    x = _inputs()
    o, _ = _call(rank, x, build_cp_context(None, seq_len=T))
    return messages, tuple(o.shape), _explicit_default_scale(rank)


@pytest.mark.timeout(240)
def test_bad_input_raises_on_every_rank():
    results = run_ranks(_worker, P, (list(CASES),), timeout=180)
    for rank, (messages, shape, o) in enumerate(results):
        assert shape == (1, T // P, 2, 8)
        assert torch.isfinite(o).all() and o.abs().sum() > 0
        for (case, words), msg in zip(CASES.items(), messages):
            assert msg is not None, f"{case.__name__}: rank {rank} raised nothing"
            for w in words:
                assert w in msg, f"{case.__name__}: {w!r} not in rank {rank}'s message: {msg}"


def test_single_process_errors():
    x = _inputs(T_loc=T)
    with pytest.raises(ValueError, match="backend must be one of"):
        chunk_cp_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="cuda")
    with pytest.raises(ValueError, match="or an object with the methods"):   # not a backend: no kept()
        chunk_cp_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], backend=object())
    with pytest.raises(ValueError, match="g has shape"):
        chunk_cp_gated_delta_rule(x["q"], x["k"], x["v"], x["g"][:, :, :1], x["beta"])
    with pytest.raises(ValueError, match="layout must be one of"):
        build_cp_context(None, seq_len=T, layout="ring")
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        build_cp_context(None, seq_len=T + 0.5)
    with pytest.raises(TypeError, match="cp_context must be a CPContext"):
        chunk_cp_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cp_context="world")


def test_double_backward_raises_instead_of_a_wrong_answer():
    x = {n: t.requires_grad_() for n, t in _inputs(T_loc=T).items()}
    o, _ = chunk_cp_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="torch")
    (dq,) = torch.autograd.grad(o.square().sum(), x["q"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dq.sum().backward()
