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


def case_no_grad_on_one_rank(rank):
    # rank 1 would skip the backward all_gather the others enter: caught in the forward instead
    x = {n: t.requires_grad_() for n, t in _inputs().items()}
    with torch.set_grad_enabled(rank != 1):
        _call(rank, x, build_cp_context(None, seq_len=T))


def case_key_head_dim_over_256(rank):
    _call(rank, _inputs(K=264), build_cp_context(None, seq_len=T))


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
    case_no_grad_on_one_rank: ["records a graph", "differs between ranks", "rank 0 has [1], rank 1 has [0]"],
    case_key_head_dim_over_256: ["K=264 exceeds 256", "rank 0", "rank 1"],
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


def test_single_process_messages_speak_of_the_call():
    """Without cp_context the messages name q and cu_seqlens, not a context the caller never built."""
    x = _inputs(T_loc=100)
    args = [x[n] for n in ("q", "k", "v", "g", "beta")]
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\]=99 does not match q's length 100") as e:
        chunk_cp_gated_delta_rule(*args, cu_seqlens=torch.tensor([0, 50, 99]))
    assert "cp_context" not in str(e.value) and "rank" not in str(e.value)
    with pytest.raises(ValueError, match="q has no tokens") as e:
        chunk_cp_gated_delta_rule(*(a[:, :0] for a in args))
    assert "cp_context" not in str(e.value)
    with pytest.raises(ValueError, match="strictly increasing") as e:
        chunk_cp_gated_delta_rule(*args, cu_seqlens=torch.tensor([0, 50, 50, 100]))
    assert "build_cp_context" not in str(e.value)
    with pytest.raises(ValueError, match="key head dim K=264 exceeds 256"):
        chunk_cp_gated_delta_rule(*(a[:, :8] for a in _inputs(T_loc=8, K=264).values()))
    # V is not limited: FLA's default GatedDeltaNet has V = 512
    y = _inputs(T_loc=8, K=16, V=512)
    o, _ = chunk_cp_gated_delta_rule(y["q"], y["k"], y["v"], y["g"], y["beta"], backend="torch")
    assert o.shape == (1, 8, 2, 512)


def _triton_off_cuda_worker(rank, world_size):
    messages = []
    for backends in (("triton", "triton"), ("torch", "triton")):
        try:
            _call(rank, _inputs(), build_cp_context(None, seq_len=T), backend=backends[rank])
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    o, _ = _call(rank, _inputs(), build_cp_context(None, seq_len=T), backend="torch")   # still in step
    # one process's call runs no summary kernel: the triton backend of our kernels' CPU tests
    # (`summary_kernels_backend`) computes it locally with torch, as always
    from _interpret import summary_kernels_backend
    x = _inputs(T_loc=T)
    single = [chunk_cp_gated_delta_rule(*x.values(), backend=b, cu_seqlens=torch.tensor([0, 5, T]))[0]
              for b in (summary_kernels_backend(), "torch")]
    assert torch.equal(single[0], single[1]), "backend='triton' on one process off CUDA differs from torch"
    return messages, tuple(o.shape)


@pytest.mark.timeout(200)
def test_triton_backend_off_cuda_without_interpreter(monkeypatch):
    """backend='triton' on CPU tensors with the kernels compiled (TRITON_INTERPRET unset when FLA and ours
    were imported) raises on every rank before any collective; it once raised '0 active drivers' on one
    rank inside the summary while another waited in the summary all_gather. A one-process call of the
    summary kernels' test backend, which runs no summary kernel, still works there."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the spawned ranks import our kernels afresh
    for rank, (messages, shape) in enumerate(run_ranks(_triton_off_cuda_worker, P, (), timeout=150)):
        assert shape == (1, T // P, 2, 8)
        for msg, bad in zip(messages, ("rank 0", "rank 1")):
            assert msg is not None, f"rank {rank} raised nothing"
            for words in (bad, "backend='triton' needs CUDA tensors", "TRITON_INTERPRET=1", "backend='torch'"):
                assert words in msg, f"{words!r} not in rank {rank}'s message: {msg}"
        assert "rank 0" not in messages[1]   # only rank 1 asked for triton there


def _out_of_step_worker(rank, world_size):
    """Two ways for ranks to fall out of step. HV=2, K=V=8, B=1: the state all_gathers carry 128 fp32,
    as many bytes as the op's agreement vector (64 int64), so gloo pairs them instead of aborting."""
    torch.manual_seed(0)
    x = {n: t.requires_grad_() for n, t in _inputs(HV=2).items()}
    ctx = build_cp_context(None, seq_len=T)
    seen = []
    # verify_agreement on rank 0 only: its check meets rank 1's summary all_gather
    try:
        _call(rank, x, ctx, verify_agreement=rank == 0)
        seen.append(None)
    except ValueError as e:
        seen.append(str(e))
    # rank 1 records a graph but skips the backward: its next check meets rank 0's backward all_gather
    o, _ = _call(rank, x, ctx)
    try:
        if rank == 0:
            o.square().sum().backward()
        else:
            _call(rank, x, ctx)
        seen.append(None)
    except ValueError as e:
        seen.append(str(e))
    return seen


@pytest.mark.timeout(120)
def test_ranks_in_different_collectives_are_told():
    """A gathered row without the agreement tag raises on the rank that sees it, instead of reporting
    garbage field differences (the rank in the state collective receives the vector as data)."""
    (verify0, skip0), (verify1, skip1) = run_ranks(_out_of_step_worker, P, (), timeout=100)
    for msg, rank in ((verify0, 0), (skip1, 1)):
        assert msg is not None and "ranks are in different collectives" in msg, msg
        assert f"rank {rank}:" in msg and "skipped the backward" in msg and "differs" not in msg.split(":")[1], msg
    assert verify1 is None and skip0 is None


def _different_checks_worker(rank, world_size):
    ctx = build_cp_context(None, seq_len=T)
    try:
        if rank == 0:
            ctx.unshard(torch.zeros(1, ctx.local_len, 3), dim=1)
        else:
            _call(rank, _inputs(), ctx)
    except ValueError as e:
        return str(e)


def test_ranks_in_different_agreement_checks():
    """Agreement vectors have a fixed size: two ranks in different checks meet and say so, rather than
    gloo aborting on a size mismatch."""
    for rank, msg in enumerate(run_ranks(_different_checks_worker, P, (), timeout=100)):
        assert msg is not None and "ranks are in different collectives" in msg, msg
        assert "rank 0 is in CPContext.unshard's agreement check" in msg, msg
        assert "rank 1 in chunk_cp_gated_delta_rule's" in msg, msg
