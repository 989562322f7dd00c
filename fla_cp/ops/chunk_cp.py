"""`chunk_cp_gated_delta_rule`: Gated DeltaNet with the sequence split over a CP group, exactly.

Forward (DESIGN.md §2): local prep -> summary `[H | M]` of each local part's last segment when its
sequence goes on into the next part -> one all_gather -> fold the summaries of earlier parts into the
incoming state of each local part's first segment -> the ordinary chunk forward.
Backward (§3): `[G | M]` of each local part's first segment when it came from the previous part ->
one all_gather -> fold from later parts backwards into the end-state gradient of each local part's
last segment -> the ordinary chunk backward. Only states cross ranks; everything else is local.

This file is the only place that knows about ranks; a backend (`backends/`) computes local pieces on
one flattened packed stream and never sees the group.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from fla_cp import checks
from fla_cp.ops import comm
from fla_cp.ops.backends import get_backend
from fla_cp.ops.backends.base import LocalBackend
from fla_cp.ops.context import CPContext, _boundaries, build_cp_context, parts_of_rank

MAX_HEAD_DIM = 256   # K only, as FLA's chunk kernels (and our summary kernels) hold K rows; V is tiled
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class _Plan:
    """Per-call bookkeeping: local segments of B rows flattened into one packed stream."""
    cp: CPContext
    B: int

    @property
    def per_row(self) -> int:
        return len(self.cp.segments)

    @property
    def num_states(self) -> int:
        """N of `initial_state` / `final_state`: rows (dense) or sequences (packed)."""
        return self.cp.num_seqs if self.cp.packed else self.B

    def flat_cu_seqlens(self, device) -> torch.Tensor:
        def build():
            row = self.cp.local_cu_seqlens()
            T = self.cp.local_len
            return torch.cat([row[:-1] + b * T for b in range(self.B)] + [torch.tensor([self.B * T])]).to(device)
        return self.cp.memo(("flat_cu_seqlens", self.B, str(device)), build)

    def all_segments(self):
        """(row, local segment) pairs of the flattened stream."""
        return [(b, i) for b in range(self.B) for i in range(self.per_row)]

    def flat(self, b: int, i: int) -> int:
        return b * self.per_row + i

    def state_id(self, b: int, i: int) -> int:
        return self.cp.segments[i].seq if self.cp.packed else b

    def seq_state_ids(self, seq: int) -> list[int]:
        """State indices of global sequence `seq` for every row (dense: one per row)."""
        return [seq] if self.cp.packed else list(range(self.B))

    def first_segment(self, slot: int) -> int:
        j = self.cp.local_parts[slot]
        return next(i for i, s in enumerate(self.cp.segments) if s.part == j)

    def last_segment(self, slot: int) -> int:
        j = self.cp.local_parts[slot]
        return max(i for i, s in enumerate(self.cp.segments) if s.part == j)

    def slot_of(self, part: int) -> tuple[int, int]:
        """(owner rank, slot in the owner's local parts) of a global part."""
        owner = self.cp.parts[part].owner
        return owner, parts_of_rank(self.cp.layout, owner, self.cp.world_size).index(part)

    def start_part(self, seq: int) -> int:
        start = int(self.cp.cu_seqlens[seq])
        return next(p.index for p in self.cp.parts if p.end > start)


def _gather_payload(plan: _Plan, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One all_gather of several tensors (same shapes on every rank): each back as [P, *shape]."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    gathered = comm.all_gather(flat, plan.cp.group)
    out, offset = [], 0
    for t in tensors:
        out.append(gathered[:, offset:offset + t.numel()].reshape(-1, *t.shape))
        offset += t.numel()
    return out


def _initial_states(plan: _Plan, initial_state, incoming, shape, device) -> torch.Tensor | None:
    """Start state of every flattened segment: `initial_state` where a sequence starts, the folded
    incoming state where a part continues a sequence, zero elsewhere (None if all zero)."""
    if initial_state is None and incoming is None:
        return None
    h0 = torch.zeros(plan.B * plan.per_row, *shape, device=device)
    if initial_state is not None:
        for b, i in plan.all_segments():
            if plan.cp.segments[i].starts_seq:
                h0[plan.flat(b, i)] = initial_state[plan.state_id(b, i)].float()
    if incoming is not None:
        for slot, j in enumerate(plan.cp.local_parts):
            if plan.cp.parts[j].from_prev:
                i = plan.first_segment(slot)
                for b in range(plan.B):
                    h0[plan.flat(b, i)] = incoming[slot, b]
    return h0


def _fold_forward(plan: _Plan, summaries: torch.Tensor, initial_state, V: int) -> torch.Tensor:
    """Incoming state of each local part's first segment: S <- M_i S + H_i over earlier parts.

    summaries: gathered `[P, slots, B, HV, K, V(+K)]`. Returns `[slots, B, HV, K, V]` fp32.
    """
    cp = plan.cp
    HV, K = summaries.shape[3], summaries.shape[4]
    incoming = summaries.new_zeros(len(cp.local_parts), plan.B, HV, K, V)
    for slot, j in enumerate(cp.local_parts):
        part = cp.parts[j]
        if not part.from_prev:
            continue
        state = None
        if initial_state is not None:
            state = initial_state[plan.seq_state_ids(part.first_seq)].float()
        for i in range(plan.start_part(part.first_seq), j):
            owner, s = plan.slot_of(i)
            summary = summaries[owner, s]
            h = summary[..., :V]
            state = h if state is None else h + summary[..., V:] @ state
        incoming[slot] = state
    return incoming


def _fold_backward(plan: _Plan, grads: torch.Tensor, dht: torch.Tensor | None, V: int) -> dict[int, torch.Tensor]:
    """End-state gradient of each local part's last segment that hands its state on:
    dS <- M_jᵀ dS + G_j over later parts, starting from the sequence's final-state gradient.

    grads: gathered `[P, slots, B, HV, K, V(+K)]`; dht: summed `[N, HV, K, V]` or None.
    Returns {slot: [B, HV, K, V]}.
    """
    cp = plan.cp
    out = {}
    for slot, i in enumerate(cp.local_parts):
        part = cp.parts[i]
        if not part.to_next:
            continue
        chain = [i + 1]
        while cp.parts[chain[-1]].first_seq == cp.parts[chain[-1]].last_seq and cp.parts[chain[-1]].to_next:
            chain.append(chain[-1] + 1)
        d = None
        if dht is not None:
            d = dht[plan.seq_state_ids(part.last_seq)]
        for j in reversed(chain):
            owner, s = plan.slot_of(j)
            gm = grads[owner, s]
            g = gm[..., :V]
            d = g if d is None else g + gm[..., V:].transpose(-1, -2) @ d
        out[slot] = d
    return out


def _local_summaries(plan: _Plan, slot_segment, compute, shape, device) -> torch.Tensor:
    """`[slots, B, *shape]` fp32: `compute(segments)` for the segment each local part names through
    `slot_segment(slot)` (None: zeros), so that every rank sends the same shape."""
    out = torch.zeros(len(plan.cp.local_parts), plan.B, *shape, dtype=torch.float32, device=device)
    segs, where = [], []
    for slot in range(len(plan.cp.local_parts)):
        i = slot_segment(slot)
        if i is not None:
            segs += [plan.flat(b, i) for b in range(plan.B)]
            where += [(slot, b) for b in range(plan.B)]
    if segs:
        for (slot, b), value in zip(where, compute(segs)):
            out[slot, b] = value
    return out


def _autocast_off(fn):
    """Run `fn` with autocast off on every device type (docs/DESIGN.md §12): the local compute keeps its
    own precision (fp32 chunk math and states, as FLA's Triton kernels, which autocast never reaches),
    so under bf16 autocast this op computes the same thing with and without CP (autocast would round the torch
    backend's matmuls, its fold and the saved incoming state to bf16, differently from the
    single-device path). Around it, a model's bf16 sums still round differently at rank boundaries
    (e.g. the conv halo's gradient adds two bf16 partial sums): bf16-level, not bit-identical."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)
    return wrapped


class ChunkCPGatedDeltaRuleFunction(torch.autograd.Function):

    @staticmethod
    @_autocast_off
    def forward(ctx, q, k, v, g, beta, initial_state, plan: _Plan, scale: float, output_final_state: bool, backend):
        cp = plan.cp
        HV, K, V = v.shape[2], q.shape[3], v.shape[3]
        flat = [x.reshape(1, -1, *x.shape[2:]) for x in (q, k, v, g, beta)]
        prep = backend.prepare(*flat, plan.flat_cu_seqlens(q.device), scale)

        incoming = None
        if any(p.to_next for p in cp.parts):
            # M of a span entered with a known-zero state is never used (DESIGN.md §2): a sending segment
            # starts from a nonzero state only in a part that passes one sequence through, or from
            # initial_state
            with_m = any(p.to_next and ((p.from_prev and p.first_seq == p.last_seq) or initial_state is not None)
                         for p in cp.parts)
            sends = lambda slot: plan.last_segment(slot) if cp.parts[cp.local_parts[slot]].to_next else None
            summaries = _local_summaries(plan, sends, lambda segs: backend.summarize(prep, segs, with_m),
                                         (HV, K, V + K * with_m), q.device)
            (gathered,) = _gather_payload(plan, [summaries])
            if any(cp.parts[j].from_prev for j in cp.local_parts):
                incoming = _fold_forward(plan, gathered, initial_state, V)

        o, ht = backend.forward(prep, _initial_states(plan, initial_state, incoming, (HV, K, V), q.device))

        final_state = None
        if output_final_state:
            final_state = ht.new_zeros(plan.num_states, HV, K, V)
            for b, i in plan.all_segments():
                if cp.segments[i].ends_seq:
                    final_state[plan.state_id(b, i)] = ht[plan.flat(b, i)]
            final_state = comm.all_reduce_sum(final_state, cp.group)

        ctx.save_for_backward(q, k, v, g, beta, initial_state, incoming, *backend.kept(prep))
        ctx.plan, ctx.scale, ctx.backend, ctx.output_final_state = plan, scale, backend, output_final_state
        return o.reshape(*v.shape), final_state

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: double backward raises, not lies
    @_autocast_off
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, incoming, *kept = ctx.saved_tensors
        plan, backend = ctx.plan, ctx.backend
        cp = plan.cp
        HV, K, V = v.shape[2], q.shape[3], v.shape[3]
        flat = [x.reshape(1, -1, *x.shape[2:]) for x in (q, k, v, g, beta)]
        do = do.reshape(1, -1, *do.shape[2:])
        prep = backend.prepare(*flat, plan.flat_cu_seqlens(q.device), ctx.scale, for_backward=True, kept=tuple(kept))

        # One gather carries [G | M] of the parts that received a state and, when final_state was
        # returned, every rank's gradient of it (replicated output: the true gradient is the sum).
        payload = []
        receives = any(p.from_prev for p in cp.parts)
        if receives:
            with_m = any(p.from_prev and ((p.first_seq == p.last_seq and p.to_next) or ctx.output_final_state)
                         for p in cp.parts)
            takes = lambda slot: plan.first_segment(slot) if cp.parts[cp.local_parts[slot]].from_prev else None
            payload.append(_local_summaries(plan, takes, lambda segs: backend.state_grad(prep, do, segs, with_m),
                                            (HV, K, V + K * with_m), q.device))
        if ctx.output_final_state:
            payload.append(torch.zeros(plan.num_states, HV, K, V, device=q.device) if dht is None else dht.float())
        gathered = _gather_payload(plan, payload) if payload else []
        dht = gathered[-1].sum(0) if ctx.output_final_state else None
        tail = _fold_backward(plan, gathered[0], dht, V) if receives else {}

        dht_local = None
        if dht is not None or tail:
            dht_local = torch.zeros(plan.B * plan.per_row, HV, K, V, device=q.device)
            for b, i in plan.all_segments():
                if cp.segments[i].ends_seq and dht is not None:
                    dht_local[plan.flat(b, i)] = dht[plan.state_id(b, i)]
            for slot, d in tail.items():
                for b in range(plan.B):
                    dht_local[plan.flat(b, plan.last_segment(slot))] = d[b]

        h0 = _initial_states(plan, initial_state, incoming, (HV, K, V), q.device)
        dq, dk, dv, dg, dbeta, dh0 = backend.backward(prep, h0, do, dht_local)

        d_initial = None
        if initial_state is not None and ctx.needs_input_grad[5]:
            # only the rank where a sequence starts sees its initial state: partial gradients
            d_initial = torch.zeros_like(initial_state)
            for b, i in plan.all_segments():
                if cp.segments[i].starts_seq:
                    d_initial[plan.state_id(b, i)] = dh0[plan.flat(b, i)].to(initial_state.dtype)
        grads = [d.reshape(x.shape).to(x.dtype) for d, x in zip((dq, dk, dv, dg, dbeta), (q, k, v, g, beta))]
        return (*grads, d_initial, None, None, None, None)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the head dim (FLA's l2norm; its Triton kernel on CUDA)."""
    if x.is_cuda:
        from fla.modules.l2norm import l2norm as fla_l2norm
        return fla_l2norm(x, eps=eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def _local_error(q, k, v, g, beta, cp: CPContext, initial_state, cu_seqlens, scale, single: bool = False) -> str | None:
    """First problem with this rank's arguments, or None. Nothing here communicates and nothing
    raises: a rank that raised before the agreement check would leave the others waiting in it.
    `single`: no cp_context was passed (`cp` is the one-rank context built from q and `cu_seqlens`),
    so messages speak of those rather than of a context the caller never saw."""
    named = dict(q=q, k=k, v=v, g=g, beta=beta)
    for name, x in named.items():
        if not torch.is_tensor(x):
            return f"{name} must be a tensor, got {type(x).__name__}"
        if x.ndim != (4 if name in "qkv" else 3):
            return f"{name} must be {'4' if name in 'qkv' else '3'}-D, got shape {tuple(x.shape)}"
        if x.dtype not in _DTYPES:
            return f"{name} must be a floating tensor, got {x.dtype}"
        if x.device != q.device:
            return f"{name} is on {x.device} but q is on {q.device}"
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if min(H, K, HV, V) < 1:
        return f"head counts and dims must be >= 1, got H={H}, K={K} (q) and HV={HV}, V={V} (v)"
    if k.shape != q.shape:
        return f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if v.shape[:2] != (B, T):
        return f"v has shape {tuple(v.shape)}; expected [B={B}, T={T}, HV, V]"
    if HV % H:
        return f"v has HV={HV} heads, not a multiple of H={H} (GVA needs HV % H == 0)"
    for name in ("g", "beta"):
        if named[name].shape != (B, T, HV):
            return f"{name} has shape {tuple(named[name].shape)}; expected [B, T, HV] = [{B}, {T}, {HV}]"
    if K > MAX_HEAD_DIM:
        return f"key head dim K={K} exceeds {MAX_HEAD_DIM} (the value head dim V is not limited)"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        return f"scale must be a finite number or None, got {scale!r}"
    error = cp.input_error(B, T, "q", single, cu_seqlens)
    if error:
        return error
    if initial_state is not None:
        N = cp.num_seqs if cp.packed else B
        if not torch.is_tensor(initial_state) or tuple(initial_state.shape) != (N, HV, K, V):
            got = tuple(initial_state.shape) if torch.is_tensor(initial_state) else type(initial_state).__name__
            return f"initial_state must have shape [N={N}, HV={HV}, K={K}, V={V}], got {got}"
        if initial_state.dtype not in _DTYPES:
            return f"initial_state must be a floating tensor, got {initial_state.dtype}"
        if initial_state.device != q.device:
            return f"initial_state is on {initial_state.device} but q is on {q.device}"
    return None


def _flag(x, name: str) -> bool:
    """A Python/NumPy bool or a one-element tensor as bool; anything else is an error (`bool()` of a
    multi-element array would raise on this rank only)."""
    if torch.is_tensor(x) or hasattr(x, "shape"):
        if getattr(x, "size", 1) != 1 and (not torch.is_tensor(x) or x.numel() != 1):
            raise ValueError(f"{name} must be a bool, got an array of shape {tuple(x.shape)}")
    return bool(x)


def chunk_cp_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cp_context: CPContext | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    backend: str | LocalBackend = "auto",
    cu_seqlens: torch.Tensor | None = None,
    verify_agreement: bool = True,
):
    r"""Gated DeltaNet over a sequence split across the ranks of a CP group; exact.

    Args:
        q, k: this rank's queries/keys `[B, T_loc, H, K]` (from `cp_context.shard`).
        v: values `[B, T_loc, HV, V]`; GVA when HV > H (value head i uses key head i // (HV // H)).
        g: log-decay `[B, T_loc, HV]` (<= 0).   beta: `[B, T_loc, HV]`.
        cp_context: from `build_cp_context`; None runs the ordinary single-device op (then
            `cu_seqlens`, global == local, may describe packed input).
        scale: defaults to K ** -0.5.
        initial_state: `[N, HV, K, V]`, N = B (dense) or the number of sequences (packed); global,
            the same tensor on every rank.
        output_final_state: return the final states `[N, HV, K, V]` fp32, identical on every rank
            (costs one all-reduce of that size).
        use_qk_l2norm_in_kernel: l2-normalise q and k over the head dim first.
        backend: "auto" (triton on CUDA, torch elsewhere) | "torch" (pure PyTorch, any device) |
            "triton" (our and FLA's Triton kernels; off CUDA only in Triton's interpreter, for tests), or
            a backend object (`fla_cp.ops.backends`), e.g. `TritonBackend(chunk_size=32)`.
        verify_agreement: check first (one tiny all_gather, `fla_cp.checks`) that every rank passes the
            same shapes, dtype, flags and context and that all or none record a graph, so that a mismatch
            raises instead of hanging. False skips that collective (this rank's own checks still run), for
            callers that checked the whole call already, as the CP model does; every rank must pass the
            same value.

    Returns:
        o `[B, T_loc, HV, V]` (q's dtype) and the final state (or None).

    Gradients: an input replicated across the group (`initial_state`) receives partial gradients whose
    sum over the group is the single-device gradient; the replicated `final_state` has its gradient
    summed over the group. Local inputs get exactly their single-device gradients. The backward is
    collective: every rank must backpropagate through this call's outputs. Double backward raises.

    Bad input raises ValueError on every rank, naming the argument and the rank. Compute is fp32 inside
    (states, summaries, chunk math); autocast does not reach inside. K <= 256; V is not limited.
    Contract, errors and what the group cannot be told: docs/ops.md; the math: docs/DESIGN.md §1-§4.
    """
    cp, single = cp_context, cp_context is None
    if single:
        T = q.shape[1] if torch.is_tensor(q) and q.ndim >= 2 else 0
        cp, error = _single_process_context(T, cu_seqlens)
        if error:
            raise ValueError(f"chunk_cp_gated_delta_rule: {error}")
    elif not isinstance(cp, CPContext):
        # no group to tell the other ranks through: this rank raises alone (see the docstring)
        raise TypeError(f"chunk_cp_gated_delta_rule: cp_context must be a CPContext from build_cp_context, "
                        f"got {type(cp).__name__}")
    impl = None
    try:
        error = _local_error(q, k, v, g, beta, cp, initial_state, cu_seqlens, scale, single)
        if error is None:
            output_final_state = _flag(output_final_state, "output_final_state")
            use_qk_l2norm_in_kernel = _flag(use_qk_l2norm_in_kernel, "use_qk_l2norm_in_kernel")
            if scale is None:
                scale = q.shape[-1] ** -0.5
            impl = get_backend(backend, q.device, cp.world_size)
    except Exception as e:  # noqa: BLE001 - whatever fails here must reach the other ranks, not strand them
        error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    if not verify_agreement or cp.world_size == 1:
        if error:
            where = "" if single else f"rank {cp.rank}: "
            raise ValueError(f"chunk_cp_gated_delta_rule: {where}{error}")
    else:
        checks.check_agreement(cp.group, error, checks.op_fields(cp, error is None, q, k, v, g, beta, initial_state,
                                                                 output_final_state, use_qk_l2norm_in_kernel, scale),
                               what="chunk_cp_gated_delta_rule")

    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    return ChunkCPGatedDeltaRuleFunction.apply(
        q, k, v, g, beta, initial_state, _Plan(cp, q.shape[0]), float(scale), bool(output_final_state), impl)


def single_process_context(T: int, cu_seqlens=None) -> CPContext:
    """A one-rank context: the ordinary single-device op."""
    if cu_seqlens is None:
        return build_cp_context(None, seq_len=max(T, 1), _single=True)
    return build_cp_context(None, cu_seqlens=cu_seqlens, _single=True)


def _single_process_context(T: int, cu_seqlens) -> tuple[CPContext | None, str | None]:
    """`single_process_context`, or the problem with `cu_seqlens` worded for a call without CP."""
    if cu_seqlens is not None:
        _, error = _boundaries(None, cu_seqlens)
        if error:
            return None, error
    return single_process_context(T, cu_seqlens), None
