"""Cross-rank checks, in one place: the agreement protocol, what each call must agree on, and when it
is checked (docs/DESIGN.md §13).

Every CP collective has shapes that follow from the call's arguments. If one rank's input is bad (it
would raise there alone) or ranks pass different arguments, the others would wait forever in the
next collective. So before the first collective of a call, every rank sends a short int64 vector of
the call's *fields* (shapes, dtypes, flags, the split) plus an error flag in one tiny all_gather
(`check_agreement`), and every rank raises the same ValueError when any rank is wrong.

When the checks run (the policy; docs/DESIGN.md §13):
    op, layer, context, unshard   every call with `verify_agreement=True` (their default): direct users
                                  of these building blocks get the full guarantee per call.
    the model's forward           only when the call's *signature* (the fields that are host metadata:
                                  shapes, dtypes, flags, layout, length of the split, whether a cache is
                                  continued, grad mode) is not among the last ones every rank agreed on
                                  (`AgreedSignatures`), or under the debug switch. Such a *full check* also
                                  runs the content checks (token ids and labels in range, the same global
                                  data on every rank: content codes; the padding mask), each a host sync on
                                  a GPU. In steady state (shapes that recur) the forward makes no checking
                                  collective and no host sync, except a global padding mask's check for
                                  holes (one sync; every rank holds the same mask and raises alike). Values
                                  out of range on one rank's shard then make the global loss NaN on every
                                  rank instead of raising there alone (`usable_labels`, `_embed_or_nan`).
    sync_gradients                its check (which parameters have a gradient) likewise per signature.
    generate                      once per call (prompt and settings); its decode steps share one
                                  signature, checked at the first.
The debug switch, `FLA_CP_DEBUG=1` in the environment or `fla_cp.checks.debug_checks()` (a context
manager; `set_debug_checks(True)` to switch on for good), runs every check on every call. In steady state
only it catches ranks fed different data of the same shapes (different `cu_seqlens` among them, which
can hang a collective), a rank whose shapes change while the others' do not, and names the rank holding
an out-of-range id or label (rather than a NaN loss).
"""
from __future__ import annotations

import contextlib
import os
import struct
import zlib

import torch
import torch.distributed as dist

from fla_cp.ops import comm

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------ policy
_DEBUG = os.environ.get("FLA_CP_DEBUG", "0") not in ("", "0", "false", "False")


def debug_checks_enabled() -> bool:
    """Whether every check runs on every call (`FLA_CP_DEBUG=1`, `set_debug_checks`, `debug_checks`)."""
    return _DEBUG


def set_debug_checks(enabled: bool) -> None:
    """Run every cross-rank check on every call (True), or only for new call signatures (False)."""
    global _DEBUG
    _DEBUG = bool(enabled)


@contextlib.contextmanager
def debug_checks(enabled: bool = True):
    """`with debug_checks(): ...` runs every check on every call inside (every rank must enter it alike)."""
    global _DEBUG
    before, _DEBUG = _DEBUG, bool(enabled)
    try:
        yield
    finally:
        _DEBUG = before


def signature_of(fields: dict[str, list]) -> tuple:
    """A hashable copy of host-side agreement fields."""
    return tuple((name, tuple(values)) for name, values in fields.items())


class AgreedSignatures:
    """The call signatures every rank of a group agreed on lately, per check name and group (one instance
    per model, kept on it).

    `needs_check(what, group, signature)` is False only when this rank's signature is among the last
    `keep` ones agreed on (or skipped) for `what` in that group and the debug switch is off: then every rank whose
    input has not changed skips the check together, with no communication (ranks fed the same calls keep
    the same history: a check passes, and is recorded, on every rank or on none). Several are kept so
    that alternating calls (training steps and evaluation, two sequence lengths) stay unchecked.
    `agreed(...)` records a check that passed."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._agreed = {}

    def needs_check(self, what: str, group, signature: tuple) -> bool:
        entry = self._agreed.get((what, id(group)))
        if _DEBUG or entry is None or entry[0] is not group or signature not in entry[1]:
            return True
        entry[1].remove(signature)            # the most recently used last (every rank alike)
        entry[1].append(signature)
        return False

    def agreed(self, what: str, group, signature: tuple) -> None:
        entry = self._agreed.get((what, id(group)))
        recent = entry[1] if entry is not None and entry[0] is group else []
        recent = ([s for s in recent if s != signature] + [signature])[-self.keep:]
        self._agreed[(what, id(group))] = (group, recent)     # the group kept alive: its id is not reused

    def forget(self) -> None:
        self._agreed.clear()


# --------------------------------------------------------------------- the protocol
class _NameCode(int):
    """An agreement-field integer that stands for a name (a dtype, a device type): mismatch messages
    print the names back."""


# every name a rank may send, so that a message can name the other rank's value too
_CODE_NAMES = {zlib.crc32(str(x).encode()): str(x) for x in
               [*{v for v in vars(torch).values() if isinstance(v, torch.dtype)},
                "cpu", "cuda", "meta", "mps", "xpu", "hpu", "mtia", "privateuseone"]}


def dtype_code(dtype: torch.dtype | str | None) -> int:
    """The same integer for the same dtype (or device type) in every process, for agreement fields;
    0 for None. Mismatch messages show the name."""
    if dtype is None:
        return _NameCode(0)
    code = zlib.crc32(str(dtype).encode())
    _CODE_NAMES.setdefault(code, str(dtype))
    return _NameCode(code)


def _shown(n: int, local_value) -> object:
    """A gathered field value as a message shows it (decoded like the local value it sits beside)."""
    if isinstance(local_value, float):
        return _bits_float(n)
    if isinstance(local_value, _NameCode):
        return "None" if n == 0 else _CODE_NAMES.get(n, n)
    return n


def content_code(t: torch.Tensor) -> int:
    """A position-weighted checksum of an integer (or 0/1) tensor, for agreement fields: equal on ranks
    holding the same values (int64 arithmetic is exact everywhere), different for almost any change.
    One host sync."""
    return int(content_sum(t))


def content_sum(t: torch.Tensor) -> torch.Tensor:
    """`content_code` as a 0-d int64 tensor on `t`'s device, to be read in one sync with other values."""
    x = t.reshape(-1).long()
    # distinct per-position multipliers, so that moving a value changes the sum
    return (x * (torch.arange(x.numel(), device=x.device) * 2654435761 % 2147483647 + 1)).sum()


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(n: int) -> float:
    return struct.unpack("<d", struct.pack("<q", n))[0]


def _to_int64(v) -> int:
    """A field value as one int64: floats by their bits, ints beyond int64 by a hash (still equal
    exactly when equal), so packing never raises on one rank only."""
    if isinstance(v, float):
        return _float_bits(v)
    v = int(v)
    return v if -2 ** 63 <= v < 2 ** 63 else zlib.crc32(str(v).encode())


def records_graph(*tensors) -> bool:
    """Whether an op on `tensors` joins an autograd graph here (grad mode on and an input requires
    grad): then its backward will run, and for a CP op that backward is a collective every rank of
    the group must join. A cheap agreement field: a rank under `no_grad` while the others record a
    graph raises in the forward instead of leaving them in a backward collective alone."""
    return torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in tensors)


# First slot of every agreement vector: a rank whose gathered row lacks it sent something else, i.e. it
# is in another collective (a state all_gather) whose bytes happened to pair with this one.
_AGREEMENT_TAG = 0x464C_4143_5041_4752   # "FLACPAGR"
# Agreement vectors are padded to a multiple of this many int64 slots, so that the usual checks (far
# fewer fields) all gather the same size: two ranks in different checks then meet in one all_gather
# and the header tells them so, instead of gloo aborting on a size mismatch.
_AGREEMENT_SLOTS = 64
_NAME_SLOTS = 8   # the check's name, its first 64 bytes as text (for messages: another rank's name)
_HEADER = 4 + _NAME_SLOTS   # tag, name code, name text, number of field values, error flag


def _name_slots(what: str) -> list[int]:
    raw = what.encode()[:8 * _NAME_SLOTS].ljust(8 * _NAME_SLOTS, b"\0")
    return list(struct.unpack(f"<{_NAME_SLOTS}q", raw))


def _slots_name(slots: list[int]) -> str:
    return struct.pack(f"<{_NAME_SLOTS}q", *slots).rstrip(b"\0").decode(errors="replace")


def check_agreement(group, local_error: str | None, fields: dict[str, list[int | float]], what: str) -> None:
    """Raise the same ValueError on every rank if any rank found bad input or ranks disagree.

    One tiny int64 all_gather carries a header (a tag, the check's name, the number of values, an error
    flag) plus each field's values, padded to a fixed size; the messages of the failing ranks travel only
    when something is wrong. Floats travel as their exact bits (no rounding: 0.0 and 1e-12 differ).
    Call it before any collective whose shapes depend on the checked fields, so bad input never turns
    into a hang.

    Ranks out of step (one skipped a backward, or passed `verify_agreement` differently, so this
    all_gather meets another collective on some rank): when the sizes happen to match, a gathered row
    without the tag, or from another check, raises "ranks are in different collectives" on the ranks
    that see it (the rank in the other collective receives this vector as its data and cannot tell);
    when they differ, gloo aborts or the collective hangs, which no check can prevent.
    """
    rank = dist.get_rank(group) if group is not None else 0
    if comm.world_size(group) == 1:
        if local_error:
            raise ValueError(f"{what}: rank {rank}: {local_error}")
        return
    values = [_to_int64(v) for vals in fields.values() for v in vals]
    flat = [_AGREEMENT_TAG, zlib.crc32(what.encode()), *_name_slots(what), len(values), 1 if local_error else 0]
    flat += values
    flat += [0] * (-len(flat) % _AGREEMENT_SLOTS)
    gathered = comm.all_gather(torch.tensor(flat, dtype=torch.long, device=comm.collective_device(group)),
                               group).cpu()
    stray = (gathered[:, 0] != _AGREEMENT_TAG).nonzero().flatten().tolist()
    if stray:
        raise ValueError(f"{what}: rank {rank}: ranks are in different collectives (a rank skipped the "
                         f"backward, verify_agreement differs between ranks, or ranks called different "
                         f"functions): rank {stray[0]} sent "
                         f"something other than an agreement check")
    count = _HEADER - 2
    other = ((gathered[:, 1] != gathered[0, 1]) | (gathered[:, count] != gathered[0, count])).nonzero()
    if other.numel():
        r = int(other[0])
        names = [_slots_name(gathered[i, 2:count].tolist()) for i in (0, r)]
        raise ValueError(f"{what}: rank {rank}: ranks are in different collectives (a rank skipped the "
                         f"backward, verify_agreement differs between ranks, or ranks called different "
                         f"functions): rank 0 is in {names[0]}'s "
                         f"agreement check with {int(gathered[0, count])} values, rank {r} in {names[1]}'s "
                         f"with {int(gathered[r, count])}")
    if gathered[:, _HEADER - 1].any():
        messages = [None] * dist.get_world_size(group)
        dist.all_gather_object(messages, local_error, group=group)
        bad = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m)
        raise ValueError(f"{what}: {bad}")
    offset = _HEADER
    for name, vals in fields.items():
        cols = gathered[:, offset:offset + len(vals)]
        offset += len(vals)
        differ = (cols != cols[0]).any(dim=1).nonzero().flatten().tolist()
        if differ:
            r = differ[0]
            shown = [[_shown(n, v) for n, v in zip(row.tolist(), vals)]
                     for row in (cols[0], cols[r])]
            raise ValueError(f"{what}: {name} differs between ranks: rank 0 has {shown[0]}, "
                             f"rank {r} has {shown[1]} (seen on rank {rank})")


# ------------------------------------------------------------- what each call must agree on
# Each builder returns the same keys and the same number of values on every rank, also for a rank
# whose input is bad (`ok=False`: zeros), so that every rank sends a vector of the same length.

def op_fields(cp, ok: bool, q, k, v, g, beta, initial_state, output_final_state, l2norm_qk, scale) -> dict:
    """`chunk_cp_gated_delta_rule`: the state collectives' shapes follow from these, the rest decides
    what they compute."""
    return {
        # the backward is collective: a rank under no_grad while the others record a graph would
        # leave them in its all_gather (or pair it with this rank's next collective)
        "records a graph (grad mode on and an input requires grad; the backward is collective)":
            [records_graph(q, k, v, g, beta, initial_state) if ok else 0],
        "B/H/K/HV/V of q, k, v": [q.shape[0], q.shape[2], q.shape[3], v.shape[2], v.shape[3]] if ok else [0] * 5,
        "dtype and device type of q, k, v": [dtype_code(q.dtype if ok else None),
                                             dtype_code(q.device.type if ok else None)],
        "initial_state (given, dtype)": [initial_state is not None if ok else 0,
                                         dtype_code(initial_state.dtype if ok and initial_state is not None
                                                    else None)],
        "output_final_state": [output_final_state if ok else 0],
        "use_qk_l2norm_in_kernel": [l2norm_qk if ok else 0],
        "scale (after defaulting to K ** -0.5)": [float(scale) if ok else 0.0],
        "cp_context (world size, layout, cu_seqlens)": cp.fingerprint(),
    }


def split_fields(cu: list[int] | None, layout_index: int, packed: bool) -> dict:
    """`build_cp_context`: every rank must describe the same split (None: this rank's is bad)."""
    return {"cu_seqlens/seq_len/layout": [len(cu), cu[-1], checksum(cu), layout_index, packed]
            if cu is not None else [0] * 5}


def unshard_fields(cp, x, dim, grad, ok: bool) -> dict:
    """`CPContext.unshard`: the gathered shape (all dims but `dim`), dtype, the gradient rule, the split."""
    ndim = x.ndim if ok else 0
    d = dim % ndim if ok else 0
    # the shape with the gathered dim blanked, in a fixed number of slots (so that every rank sends as
    # many values whatever its ndim)
    shape = [n if i != d else -1 for i, n in enumerate(x.shape)] if ok else []
    shape = (shape + [0] * 8)[:8] if len(shape) <= 8 else [-2, checksum([n + 1 for n in shape])] + [0] * 6
    return {
        "ndim and gathered dim": [ndim, d],
        "shape (gathered dim as -1)": shape,
        "dtype and device type": [dtype_code(x.dtype if ok else None), dtype_code(x.device.type if ok else None)],
        "grad ('mean')": [grad == "mean"],
        "records a graph (the backward is collective)": [records_graph(x) if ok else 0],
        "cp_context (world size, layout, cu_seqlens)": cp.fingerprint(),
    }


def layer_fields(hidden, cp, attention_mask, use_cache, sizes: list[int], content: bool = False) -> dict:
    """A CP layer call (or a model forward, for all its layers): the shapes of every collective in the
    layer (conv halo, states, cache gather) follow from these and the layer's `sizes`. `hidden` is the
    layer input `[B, T_loc, D]`, or `(B, dtype, device)` of the one a model is about to compute. Host
    metadata, plus with `content` the global mask's content code (one sync; 0 otherwise)."""
    if torch.is_tensor(hidden):
        batch, dtype, device = (hidden.shape[0], hidden.dtype, hidden.device) if hidden.dim() == 3 else (0, None, "cpu")
    else:
        batch, dtype, device = hidden if hidden is not None else (0, None, "cpu")
    # cp None: a model-level check of a step without a split (decode, or this rank's split failed). A packed
    # split's boundaries change every step of packed training: they are content, not signature
    split = cp.fingerprint() + [bool(cp.packed)] if cp is not None else [0] * 6
    if cp is not None and cp.packed and not content:
        split[3:5] = [0, 0]
    device_type = torch.device(device).type
    autocast = torch.is_autocast_enabled(device_type)
    mask_code = 0
    if content and torch.is_tensor(attention_mask) and attention_mask.dim() == 2 and (
            cp is None or attention_mask.shape[1] >= cp.total_len):
        # a global mask must also be the same mask on every rank (a rank-local one differs by design)
        mask_code = content_code(attention_mask)
    mask_shape = list(attention_mask.shape) if torch.is_tensor(attention_mask) else []
    return {
        "batch size and dtype of hidden_states": [batch, dtype_code(dtype)],
        "autocast (enabled, dtype)": [autocast,
                                      dtype_code(torch.get_autocast_dtype(device_type) if autocast else None)],
        "use_cache": [bool(use_cache)],
        "attention_mask (given, content)": [attention_mask is not None, mask_code],
        # (a rank-local mask [B, T_loc] may differ in length between ranks: this rank's own, for its signature)
        "attention_mask shape on this rank": [checksum([len(mask_shape), *mask_shape])] if not content else [0],
        # 16 slots: one size list per kind of layer (GDN 6, attention 5, ...); beyond that a checksum
        "layer sizes (per kind of layer, then the kinds' order)":
            (list(sizes) + [0] * 16)[:16] if len(sizes) <= 16 else [*sizes[:15], checksum(sizes[15:])],
        "cp_context (world size, layout, cu_seqlens, packed)": split,
    }


def model_fields(*, cache_len: int, new_tokens: int, inputs_field: list, records: bool, num_layers: int,
                 vocab: int, recomputes: bool, content: bool = False) -> dict:
    """A model forward's own fields, beyond its layers' and its loss's. The cache length is content: it
    grows at every decode step and shapes no collective (the cache's shapes are checked locally), so the
    signature (`content=False`) holds only whether there is a cache."""
    return {"continuation (cache length, new tokens)": [cache_len if content else bool(cache_len),
                                                        new_tokens if cache_len else 0],
            "input_ids (given, inputs_are_sharded, length along dim 1, content)": inputs_field,
            # a rank under no_grad would leave the others alone in the backward's collectives
            "records a graph (grad mode on, parameters or inputs requiring grad)": [records],
            "layers, vocab": [num_layers, vocab],
            "gradient checkpointing (recomputes collectives in backward)": [recomputes]}


def layer_input_error(hidden_states, hidden_size: int, cp) -> str | None:
    """A CP layer's input `[B, T_loc, D]` on this rank: its shape, dtype and split (`cp.input_error`), or
    None. Nothing communicates (the layers' `_cp_input_error` start with it)."""
    if not torch.is_tensor(hidden_states) or hidden_states.dim() != 3:
        got = tuple(hidden_states.shape) if torch.is_tensor(hidden_states) else type(hidden_states).__name__
        return f"hidden_states must be [B, T_loc, D], got {got}"
    B, T, D = hidden_states.shape
    if D != hidden_size:
        return f"hidden_states has D={D} but the layer's hidden_size is {hidden_size}"
    if not hidden_states.is_floating_point():
        return f"hidden_states must be floating, got {hidden_states.dtype}"
    return cp.input_error(B, T, "hidden_states")


def padding_mask_error(attention_mask) -> str | None:
    """Why a `[B, T]` mask is not a padding mask (only 0/1; each row's ones one contiguous run), or
    None. One host sync (more only to word an error)."""
    ones = attention_mask != 0
    nonbinary = (ones & (attention_mask != 1)).any(-1)
    runs = ones[:, :1].sum(-1) + (ones[:, 1:] & ~ones[:, :-1]).sum(-1)
    bad = nonbinary | (runs > 1)
    if not bool(bad.any()):
        return None
    b = int(bad.nonzero()[0])
    if nonbinary[b]:
        values = sorted(set(attention_mask[b].tolist()))
        return f"attention_mask must be a 0/1 padding mask; row {b} holds {values[:6]}"
    pos = ones[b].nonzero().flatten().tolist()
    i, j = next((i, j) for i, j in zip(pos, pos[1:]) if j > i + 1)
    return (f"attention_mask row {b} has a hole (padding at positions {i + 1}..{j - 1} between tokens): only "
            f"left or right padding is supported (each row's 1s must be contiguous)")


def token_ids_check(input_ids: torch.Tensor, vocab_size: int) -> tuple[str | None, int]:
    """(why `input_ids` can't be embedded, or None; its content code). One host sync."""
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        return f"input_ids must be an integer tensor, got {input_ids.dtype}", 0
    if input_ids.numel() == 0:
        return None, 0
    x = input_ids.long()
    lo, hi, code = torch.stack([x.min(), x.max(), content_sum(x)]).tolist()
    if lo < 0 or hi >= vocab_size:
        return f"input_ids holds ids in [{lo}, {hi}], outside the vocabulary [0, {vocab_size})", 0
    return None, code


def labels_metadata_error(name: str, y, inputs) -> str | None:
    """Why `labels`/`shift_labels` can't go into the loss, from its type and shape alone (no sync)."""
    if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool \
            or y.dim() != 2:
        got = f"{y.dtype} of shape {tuple(y.shape)}" if torch.is_tensor(y) else type(y).__name__
        return f"{name} must be an integer [B, T] tensor, got {got}"
    if inputs is not None and tuple(y.shape) != tuple(inputs.shape[:2]):
        return f"{name} has shape {tuple(y.shape)}; it must match the inputs' [B, T] = {list(inputs.shape[:2])}"
    return None


def loss_fields(labels, shift_labels, gathers: bool, num_items_in_batch, inputs, vocab_size: int,
                sharded: bool, content: bool = False) -> tuple[dict, str | None]:
    """What the loss and logits add to a forward's check: (fields, this rank's error). The labels must
    be usable on every rank before any rank starts the loss all-reduce. With `content` (host syncs):
    labels in range, the same global labels on every rank (a content code; sharded labels differ by
    design), a tensor `num_items_in_batch`'s value."""
    items = 0.0     # its value changes every step (a token count): content, whether a tensor or a number
    if num_items_in_batch is not None and content:
        items = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    fields = {"labels given, shift_labels given, logits gathered":
              [labels is not None, shift_labels is not None, bool(gathers)],
              "num_items_in_batch (given, value)": [num_items_in_batch is not None, items],
              "labels (shape, dtype) on this rank": [0, 0],
              "labels content": [0]}
    error = None
    for name, y in (("labels", labels), ("shift_labels", shift_labels)):
        if y is None:
            continue
        if not content and torch.is_tensor(y):
            fields["labels (shape, dtype) on this rank"] = [checksum([y.dim(), *y.shape]), dtype_code(y.dtype)]
        error = labels_metadata_error(name, y, inputs)
        if error is None and content:
            bad = ((y != IGNORE_INDEX) & ((y < 0) | (y >= vocab_size))).any().long()
            bad, code = torch.stack([bad, content_sum(y) if not sharded else torch.zeros_like(bad)]).tolist()
            if bad:
                error = f"{name} holds values outside [0, {vocab_size}) other than {IGNORE_INDEX}"
            fields["labels content"] = [code]
        if error:
            break
    return fields, error


GENERATE_FIELDS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "num_beams",
                   "temperature", "top_k", "top_p", "eos_token_id")


def generate_fields(prompt, kwargs: dict, config) -> tuple[dict, str | None]:
    """`generate`: the prompt (shape, content) and the settings that decide how many decode steps each
    rank runs or which tokens it picks (a rank that stopped early would leave the others waiting)."""
    fields, error = {}, None
    try:
        fields["prompt (shape, content)"] = [*prompt.shape[:2], content_code(prompt)] \
            if torch.is_tensor(prompt) and prompt.dim() == 2 and not prompt.is_floating_point() else [0, 0, 0]
        for name in GENERATE_FIELDS:
            value = kwargs.get(name, getattr(config, name, None))
            value = value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value
            fields[name] = [value is not None, float(value) if isinstance(value, (int, float)) else 0.0]
    except (TypeError, ValueError, RuntimeError) as e:
        error = f"generate settings: {type(e).__name__}: {e}"
        fields = {"prompt (shape, content)": [0, 0, 0], **{n: [0, 0.0] for n in GENERATE_FIELDS}}
    return fields, error


def gradient_fields(has_grad: list[bool]) -> dict:
    """`sync_gradients`: the flattened buffers must line up (a rank missing one gradient would abort gloo,
    or sum one parameter's gradient into another's of the same size). Host metadata."""
    return {"parameters with a gradient (count, which)": [sum(has_grad), checksum([int(h) for h in has_grad])]}


def checksum(values: list[int]) -> int:
    """An order-sensitive hash of host integers (a split's boundaries, a shape), exact in int64."""
    h = 0
    for v in values:
        h = (h * 1000003 + v) % (1 << 61)
    return h


def attention_fields(cp, ok: bool, q, k, v, causal, window, scale, mask_given: bool, past=None) -> dict:
    """`attention_cp`: the K/V gather (full attention) or halo gather (window) and their backward follow
    from these; the rest decides what they compute. `window` 0 for None; `scale` after defaulting;
    `past`: (cached keys' length, past_mask given) of a continuation, or None."""
    return {
        "records a graph (grad mode on and an input requires grad; the backward is collective)":
            [records_graph(q, k, v) if ok else 0],
        "B/H/D of q, Hkv/Dv of v": [q.shape[0], q.shape[2], q.shape[3], v.shape[2], v.shape[3]] if ok else [0] * 5,
        "dtype and device type of q, k, v": [dtype_code(q.dtype if ok else None),
                                             dtype_code(q.device.type if ok else None)],
        "causal": [bool(causal) if ok else 0],
        "window_size (0: unlimited)": [int(window or 0) if ok else 0],
        "scale (after defaulting to D ** -0.5)": [float(scale) if ok else 0.0],
        "attention_mask given": [bool(mask_given) if ok else 0],
        "past_key_value (given, length, past_mask given)": [past is not None, *(past or (0, False))] if ok
        else [0, 0, 0],
        "cp_context (world size, layout, cu_seqlens)": cp.fingerprint(),
    }
