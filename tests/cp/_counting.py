"""Count the collectives and host syncs a piece of code makes, and which fla_cp function made each.

    from _counting import count_costs          # tests/cp on sys.path (tests/cp/conftest.py puts it there)

    with count_costs(device_data=(model, input_ids, labels)) as c:
        with c.phase("forward"):
            loss = model(input_ids=input_ids, labels=labels).loss
        with c.phase("backward"):
            loss.backward()
    c.collectives                 # Counter({'all_gather': 3, 'all_reduce': 2, ...}) torch.distributed calls
    c.collective_callers          # Counter({('all_gather', 'check_agreement'): 1, ...})
    c.by_caller("collectives")    # Counter({'check_agreement': 1, '_gather_payload': 2, ...})
    c.device_syncs                # Counter({'Tensor.tolist': 2, ...}) syncs that would block a GPU's host
    c.host_syncs                  # Counter of every sync-prone op, on device or host data
    c.sync_callers                # Counter({('Tensor.tolist', '_token_ids_check', True): 1, ...})
    c.h2d, c.wire                 # host-to-device copies; backend collective ops (see below)
    c.events                      # every Event (kind, name, caller, via, device, phase, site, chain)
    c.by_caller(what, phase=...)  # what: collectives | wire | host_syncs | device_syncs | host_only_syncs | h2d
    print(c.report())             # Markdown tables: name, count, callers;  c.summary(): the same as a dict
    c.mark_device(t)              # declare more device data (see below)

Process-local: use it inside each rank's function (e.g. under `_dist.run_ranks`); nothing is shared
between ranks. Nesting works (an outer counter sees everything an inner one sees).

What is counted
---------------
collectives   Python calls of the `torch.distributed` collectives (all_gather, all_gather_into_tensor,
              all_gather_object, all_reduce, broadcast, broadcast_object_list, reduce_scatter_tensor,
              reduce_scatter_single, reduce_scatter, all_to_all(_single), barrier, send/recv/isend/irecv,
              gather, scatter, ... whatever of `COLLECTIVES` this torch has), by wrapping the functions
              on `torch.distributed` AND on `torch.distributed.distributed_c10d` for the duration.
              Only the outermost call counts (all_gather_object calling all_gather is one call).
              `torch.distributed.nn.functional` looks its functions up on `torch.distributed` at call
              time, so its calls are counted under the `dist` name they use. DeviceMesh is only
              bookkeeping (`mesh.get_group()` then `dist.*`); what goes through functional collectives
              instead (DTensor, `torch.distributed._functional_collectives`) never calls `dist.*` and is
              counted from the dispatcher as `funcol.<op>` (`c10d.<op>` for a ProcessGroup method
              called directly).
wire          Every backend op (`c10d.*`, `_c10d_functional.*`) the dispatcher runs, wherever it came
              from: the ground truth for how many collectives really went out (all_gather_object is
              2 `c10d.allgather_`; `wait_tensor` is not counted).
host_syncs    Ops that make the host wait for a GPU (on CUDA tensors), counted on any tensor:
                - at the dispatcher (a `TorchDispatchMode`): `aten._local_scalar_dense` (what `.item()`,
                  `int(t)`, `bool(t)`, `float(t)` reach), `aten.nonzero` (also under `argwhere`,
                  `where(cond)`), `aten.equal`, `aten.is_nonzero`, `aten.allclose`, `aten.masked_select`,
                  `aten._unique`/`_unique2`/`unique_dim`/`unique_consecutive`/..., `aten.bincount`,
                  `aten.repeat_interleave` with tensor repeats and no `output_size`, and
                  `aten.index`/`index_put_` with a boolean mask (`x[mask]`, `x[mask] = v`).
                  `nonzero_static` is not counted (it is the sync-free variant).
                - in Python: `Tensor.tolist` (it never reaches the dispatcher on CPU), `Tensor.item`,
                  `bool(t)`, `int(t)`, `float(t)`, `t.__index__()` are wrapped on `torch.Tensor` so that
                  they get their own names (the `_local_scalar_dense` under them is not counted again),
                  and `Tensor.cpu()` / `Tensor.to("cpu")` of device data (a blocking device-to-host
                  copy on a GPU).
                - `dist.*_object` collectives (they pickle through the host: a sync under NCCL).
              Ops inside a collective's own implementation are not counted (its wire ops are).
h2d           Copies of host data to the device: on CUDA a copy with `non_blocking=False` is
              `cudaMemcpyAsync` + `cudaStreamSynchronize` (`at::cuda::memcpy_and_sync`), so the host also
              waits for every kernel queued before it. Seen as
                - `torch.tensor` / `as_tensor` / `asarray` of Python values or host data with an explicit
                  `device=` naming the compute device (e.g. `device=x.device` of device data),
                - `Tensor.to(<device>)` of host data (to the compute device, as below, or to a
                  device-data tensor's device and dtype),
                - host data handed to a collective as its input (under NCCL it must have been copied to
                  the GPU first; inferred, counted once per collective call).

Device data and host data (the rule behind `device_syncs`)
-----------------------------------------------------------
On a CPU-only machine every tensor is a CPU tensor, so "would this block a GPU run's host?" is modelled:
a tensor is *device data* (it would live on the GPU in a GPU run with NCCL) when it is
    - a parameter (any `nn.Parameter`), or given in `device_data=`/`mark_device()` (modules: their
      parameters and buffers; the step's inputs: input_ids, labels, attention_mask, cu_seqlens, ...),
    - a buffer a collective read or wrote (NCCL's buffers are on the GPU),
    - made by a factory (`torch.zeros`, `empty`, `ones`, `full`, `arange`, `eye`, `tensor`, `as_tensor`,
      ...) with an explicit `device=` naming the compute device, or by `Tensor.to(<device>)`: any device
      but the string "cpu" and `.device` of host data (while counting, `t.device` of host data returns a
      CPU device object of this module's own, so `torch.arange(n, device=x.device)` follows `x`;
      `device=comm.collective_device(group)` is the GPU in a GPU run with NCCL),
    - or the output of any op with a device-data input (views share their base's storage: tracked per
      storage, so `x[0]`, `x.flatten()`, `x.detach()` of device data are device data),
and *host data* otherwise: tensors built from Python values (`torch.tensor([...])`), factory outputs
(`torch.arange(n)`, `torch.zeros(...)`), and whatever is computed from host data only. `t.cpu()` of
device data is counted as a sync and returns a fresh host copy (on CPU `.cpu()` would return `t`
itself; the copy is what a GPU run gets and it lets what follows count as host work); likewise
`Tensor.to(<device>)` of host data returns a fresh copy that is device data.
Every event records whether its input was device data: `host_syncs` counts all (the honest CPU rule),
`device_syncs` those on device data. What is device data is remembered per storage for the whole
process (across counters: a tensor memoised in step 1 is still device data in step 3); a tensor made
before any counter ran is host data unless it is a parameter or marked. Known blind spots, so read
the callers of "host" entries: the factories are wrapped as attributes of the `torch` module
(`torch.zeros(...)`; a name imported with `from torch import zeros` is not seen), an explicit
`torch.device("cpu")` (or a device rebuilt from a host tensor's, `torch.device(x.device)`) counts as
the compute device (fla_cp's `collective_device` returns one under gloo and CUDA under NCCL), and a
factory without `device=` is host data even where a GPU run would pass a CUDA default device. Which
backend runs also matters: on CPU fla_cp uses its torch backend, on a GPU the Triton one, whose host work differs (a CPU count says nothing about syncs inside GPU kernels' glue).

Callers
-------
Each event records the innermost frame in the measured fla_cp package (the one `import fla_cp` finds)
that is not plumbing (whose name goes to `via`): the thin collective wrappers of `fla_cp/ops/comm.py`
(`check_agreement` in `fla_cp/checks.py` and other `*check*` functions count as callers) and the checksum helpers
(`content_code`, `content_sum`, `checksum`), e.g. caller `check_agreement` via `all_gather`, caller
`sync_gradients` via `content_code`. `package=` may name another package or a directory (tests use
their own directory). Events with no fla_cp frame name the innermost frame outside this file and
torch's dispatch machinery as `<file>:<function>` (e.g. `optimizer.py:_get_value`, or the test
function itself).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import os
import sys
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# name -> the parameter holding what the collective reads (None: nothing worth checking)
COLLECTIVES: dict[str, str | None] = {
    "all_gather": "tensor", "all_gather_into_tensor": "input_tensor", "all_gather_single": "input_tensor",
    "_all_gather_base": "input_tensor", "all_gather_coalesced": "input_tensor_list",
    "all_gather_object": None,
    "all_reduce": "tensor", "all_reduce_coalesced": "tensors",
    "broadcast": "tensor", "broadcast_object_list": None, "_broadcast_coalesced": None,
    "reduce": "tensor",
    "reduce_scatter": "input_list", "reduce_scatter_tensor": "input", "reduce_scatter_single": "input",
    "_reduce_scatter_base": "input",
    "all_to_all": "input_tensor_list", "all_to_all_single": "input",
    "barrier": None, "monitored_barrier": None,
    "send": "tensor", "recv": None, "isend": "tensor", "irecv": None, "batch_isend_irecv": None,
    "send_object_list": None, "recv_object_list": None,
    "gather": "tensor", "gather_object": None, "scatter": "scatter_list", "scatter_object_list": None,
}
OBJECT_COLLECTIVES = {"all_gather_object", "broadcast_object_list", "send_object_list", "recv_object_list",
                      "gather_object", "scatter_object_list"}
_DIST_MODULES = ("torch.distributed", "torch.distributed.distributed_c10d")

# aten overload packets that block the host on CUDA inputs (see the module docstring)
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "allclose", "masked_select",
            "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount"}
_BOOL_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"}
_WIRE_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")
_WIRE_SKIP = {"wait_tensor", "_wrap_tensor_autograd"}
# factories of the torch module: wrapped to see an explicit device= (positional index of `device`, if any)
FACTORIES = {"tensor": None, "as_tensor": 2, "asarray": None, "zeros": None, "ones": None, "empty": None,
             "full": None, "arange": None, "eye": None, "linspace": None, "logspace": None, "rand": None,
             "randn": None, "randint": None, "randperm": None, "empty_strided": None, "scalar_tensor": None,
             "tril_indices": None, "triu_indices": None}
_COPYING_FACTORIES = {"tensor", "as_tensor", "asarray"}
# Python-level wrappers on torch.Tensor: attribute -> event name
_TENSOR_SYNCS = {"item": "Tensor.item", "tolist": "Tensor.tolist", "__bool__": "bool(Tensor)",
                 "__int__": "int(Tensor)", "__float__": "float(Tensor)", "__index__": "Tensor.__index__"}
# plumbing: an event's caller is the package function above these (they go to `via`): the functions of
# these files (relative to the package) except `*check*` ones, and functions of these names anywhere
HELPER_FILES = (os.path.join("ops", "comm.py"),)
HELPER_FUNCTIONS = {"content_code", "content_sum", "checksum", "_checksum"}

_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
# frames of torch's own dispatch machinery, never named as a caller
_MACHINERY = tuple(os.path.join(_TORCH_DIR, p) for p in
                   ("_dynamo" + os.sep, "_ops.py", "overrides.py", "_compile.py",
                    os.path.join("utils", "_python_dispatch.py")))

# Device data, per storage, for the whole process: what one counter learned stays true in the next
# (memoised index tensors, optimizer state, caches built in step 1 are still device data in step 3).
# StorageImpl address -> weakref to its Python storage (torch keeps that object alive as long as the
# storage lives); an entry goes away with its storage.
_DEVICE: dict[int, weakref.ref] = {}


def _forget(key, ref) -> None:
    if _DEVICE.get(key) is ref:
        del _DEVICE[key]


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str            # "collective" | "wire" | "sync" | "h2d"
    name: str            # "all_gather", "c10d.allgather_", "Tensor.tolist", ...
    caller: str          # fla_cp function (qualified name), or "<file>:<function>" outside fla_cp
    via: str | None      # the comm.py wrapper it went through, if any
    device: bool | None  # (syncs, h2d) whether the input was device data; None for collectives
    phase: str | None    # the `phase()` it happened in
    site: str            # file:line of the innermost fla_cp frame (or of the caller)
    chain: tuple         # the non-helper fla_cp callers, innermost first (up to 4)


def _package_dir(package: str) -> str | None:
    if os.sep in package or package.startswith("."):          # a directory (a bare name is a package)
        return os.path.abspath(package) + os.sep
    mod = sys.modules.get(package)
    origin = getattr(mod, "__file__", None) if mod is not None else None
    if origin is None:
        spec = importlib.util.find_spec(package)
        origin = spec.origin if spec is not None else None
    return os.path.dirname(os.path.abspath(origin)) + os.sep if origin else None


def _tensors(obj) -> list[torch.Tensor]:
    return [x for x in tree_flatten(obj)[0] if isinstance(x, torch.Tensor)]


def _is_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else None
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class CostCounter:
    """What `count_costs()` yields; see the module docstring. Counters fill in while the context runs."""

    def __init__(self, package: str = "fla_cp", helper_files=HELPER_FILES, helper_functions=HELPER_FUNCTIONS):
        self.package = package
        self.package_dir = _package_dir(package)
        self.helper_files, self.helper_functions = tuple(helper_files), frozenset(helper_functions)
        self.events: list[Event] = []
        self.collectives: collections.Counter = collections.Counter()
        self.wire: collections.Counter = collections.Counter()
        self.host_syncs: collections.Counter = collections.Counter()
        self.device_syncs: collections.Counter = collections.Counter()
        self.h2d: collections.Counter = collections.Counter()
        self.collective_callers: collections.Counter = collections.Counter()   # (name, caller) -> n
        self.sync_callers: collections.Counter = collections.Counter()         # (name, caller, device) -> n
        self._phase: str | None = None
        self._tls = threading.local()

    # ------------------------------------------------------------------ device data
    def _storage(self, t):
        try:
            return t.untyped_storage()
        except Exception:  # noqa: BLE001 - sparse, nested, fake tensors: no storage to track
            return None

    def mark_device(self, *objs) -> None:
        """Declare tensors (or modules' parameters and buffers, or lists/dicts of them) device data."""
        for o in objs:
            if isinstance(o, torch.nn.Module):
                self.mark_device(*o.parameters(), *o.buffers())
            elif isinstance(o, torch.Tensor):
                st = self._storage(o)
                if st is not None:
                    key = st._cdata
                    if key not in _DEVICE or _DEVICE[key]() is not st:
                        _DEVICE[key] = weakref.ref(st, functools.partial(_forget, key))
            elif isinstance(o, dict):
                self.mark_device(*o.values())
            elif isinstance(o, (list, tuple)):
                self.mark_device(*o)

    def _unmark(self, t) -> None:
        st = self._storage(t)
        if st is not None:
            _DEVICE.pop(st._cdata, None)

    def is_device(self, t) -> bool:
        """Whether `t` counts as device data (see the module docstring)."""
        if isinstance(t, torch.nn.Parameter):
            self.mark_device(t)
            return True
        st = self._storage(t)
        if st is None:
            return False
        ref = _DEVICE.get(st._cdata)
        return ref is not None and ref() is st

    # ------------------------------------------------------------------ recording
    @contextlib.contextmanager
    def phase(self, name: str):
        """Tag the events inside with `name` (e.g. "forward", "backward")."""
        old, self._phase = self._phase, name
        try:
            yield self
        finally:
            self._phase = old

    def _depth(self, key) -> int:
        return getattr(self._tls, key, 0)

    @contextlib.contextmanager
    def _inside(self, key):
        setattr(self._tls, key, self._depth(key) + 1)
        try:
            yield
        finally:
            setattr(self._tls, key, self._depth(key) - 1)

    def _where(self):
        """(caller, via, site, chain) of the code running now."""
        pkg = self.package_dir
        f = sys._getframe(2)
        via, chain, site, first = None, [], None, None
        while f is not None:
            fn = f.f_code.co_filename
            name = getattr(f.f_code, "co_qualname", f.f_code.co_name)
            here = f"{os.path.basename(fn)}:{f.f_lineno}"
            if pkg and fn.startswith(pkg):
                helper = (fn[len(pkg):] in self.helper_files and "check" not in name) \
                    or name.rpartition(".")[2] in self.helper_functions
                if helper:
                    if not chain:              # the innermost plumbing under the caller
                        via = via or name
                else:
                    chain.append(name)
                    site = site or here
                    if len(chain) == 4:
                        break
            elif fn != _THIS_FILE and first is None and not fn.startswith(_MACHINERY):
                first = (f"{os.path.basename(fn)}:{name}", here)
            f = f.f_back
        if chain:
            return chain[0], via, site, tuple(chain)
        caller, site = first or ("<unknown>", "?")
        return caller, via, site, ()

    def _record(self, kind: str, name: str, device: bool | None = None) -> None:
        caller, via, site, chain = self._where()
        self.events.append(Event(kind, name, caller, via, device, self._phase, site, chain))
        if kind == "collective":
            self.collectives[name] += 1
            self.collective_callers[(name, caller)] += 1
        elif kind == "wire":
            self.wire[name] += 1
        elif kind == "sync":
            self.host_syncs[name] += 1
            if device:
                self.device_syncs[name] += 1
            self.sync_callers[(name, caller, bool(device))] += 1
        elif kind == "h2d":
            self.h2d[name] += 1

    # ------------------------------------------------------------------ queries
    def select(self, kind: str, device: bool | None = None, phase: str | None = None) -> list[Event]:
        """Events of a kind ("collective", "wire", "sync", "h2d"), optionally only on device (or host)
        data, optionally of one phase."""
        return [e for e in self.events if e.kind == kind and (device is None or e.device == device)
                and (phase is None or e.phase == phase)]

    _KINDS = {"collectives": ("collective", None), "wire": ("wire", None), "host_syncs": ("sync", None),
              "device_syncs": ("sync", True), "host_only_syncs": ("sync", False), "h2d": ("h2d", None)}

    def by_caller(self, what: str = "collectives", phase: str | None = None) -> collections.Counter:
        """Counter caller -> count for "collectives", "wire", "host_syncs", "device_syncs",
        "host_only_syncs" (syncs on host data) or "h2d"."""
        kind, device = self._KINDS[what]
        return collections.Counter(e.caller for e in self.select(kind, device, phase))

    def by_name_and_caller(self, what: str = "collectives", phase: str | None = None) -> collections.Counter:
        """Counter (name, caller) -> count; `what` as in `by_caller`."""
        kind, device = self._KINDS[what]
        return collections.Counter((e.name, e.caller) for e in self.select(kind, device, phase))

    def summary(self) -> dict:
        """JSON-able counts: per name, and per "name @ caller", for every kind."""
        out = {}
        for what in ("collectives", "wire", "device_syncs", "host_only_syncs", "h2d"):
            kind, device = self._KINDS[what]
            evs = self.select(kind, device)
            out[what] = dict(collections.Counter(e.name for e in evs).most_common())
            out[what + "_by_caller"] = {f"{n} @ {c}": k for (n, c), k in
                                        self.by_name_and_caller(what).most_common()}
        return out

    def report(self, title: str | None = None) -> str:
        """A Markdown table per kind: name, count, callers (most frequent first)."""
        sections = [("collectives", "torch.distributed calls"),
                    ("wire", "backend collective ops seen by the dispatcher"),
                    ("device_syncs", "host syncs on device data (would block the host on a GPU)"),
                    ("host_only_syncs", "sync-prone ops on host data (no GPU sync; see the callers)"),
                    ("h2d", "host-to-device copies of host data (a stream sync each on CUDA)")]
        lines = [f"### {title}", ""] if title else []
        for what, heading in sections:
            kind, device = self._KINDS[what]
            evs = self.select(kind, device)
            lines.append(f"**{heading}: {len(evs)}**")
            if not evs:
                lines.append("")
                continue
            lines += ["", "| name | count | callers |", "|---|---:|---|"]
            per = collections.defaultdict(collections.Counter)
            for e in evs:
                per[e.name][e.caller + (f" (via {e.via})" if e.via else "")] += 1
            for name, callers in sorted(per.items(), key=lambda kv: -sum(kv[1].values())):
                who = ", ".join(f"{c}: {n}" for c, n in callers.most_common())
                lines.append(f"| {name} | {sum(callers.values())} | {who} |")
            lines.append("")
        return "\n".join(lines)


class _Mode(TorchDispatchMode):
    def __init__(self, counter: CostCounter):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        ns, packet = func.namespace, func.overloadpacket.__name__
        if ns in _WIRE_NAMESPACES:
            if packet not in _WIRE_SKIP:
                c._record("wire", f"{ns}.{packet}")
                if c._depth("coll") == 0:       # not under a dist.* call: funcol / a direct PG call
                    c._record("collective", f"{'funcol' if ns != 'c10d' else 'c10d'}.{packet}")
            out = func(*args, **kwargs)
            c.mark_device(_tensors((args, kwargs)), _tensors(out))
            return out
        inputs = _tensors((args, kwargs))
        dev = any(c.is_device(t) for t in inputs)
        if c._depth("coll") == 0 and c._depth("pysync") == 0:
            name = None
            if packet in SYNC_OPS:
                name = f"aten.{packet}"
            elif packet == "repeat_interleave" and func.overloadpacket is torch.ops.aten.repeat_interleave \
                    and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) \
                    and "Tensor" in func._overloadname:
                name = "aten.repeat_interleave (no output_size)"
            elif packet in _BOOL_INDEX_OPS and _is_bool_index(args):
                name = f"aten.{packet} (bool mask)"
            if name is not None:
                c._record("sync", name, dev)
        out = func(*args, **kwargs)
        if dev:
            c.mark_device(_tensors(out))
        return out


def _collective_wrapper(c: CostCounter, name: str, orig):
    param = COLLECTIVES.get(name)
    try:
        sig = inspect.signature(orig) if param else None
    except (TypeError, ValueError):
        sig = None

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        if c._depth("coll") == 0:
            c._record("collective", name)
            if name in OBJECT_COLLECTIVES:
                c._record("sync", f"dist.{name} (pickles through the host)", True)
            if sig is not None:
                try:
                    given = sig.bind_partial(*args, **kwargs).arguments.get(param)
                except TypeError:
                    given = None
                if any(not c.is_device(t) for t in _tensors(given)):
                    c._record("h2d", f"host data sent by dist.{name}", False)
        with c._inside("coll"):
            out = orig(*args, **kwargs)
        c.mark_device(_tensors((args, kwargs)))
        return out
    return wrapper


def _tensor_wrapper(c: CostCounter, name: str, orig):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        if c._depth("pysync") == 0 and c._depth("coll") == 0:
            c._record("sync", name, c.is_device(self))
        with c._inside("pysync"):
            return orig(self, *args, **kwargs)
    return wrapper


def _cpu_wrapper(c: CostCounter, orig):
    @functools.wraps(orig)
    def cpu(self, *args, **kwargs):
        dev = c._depth("coll") == 0 and c.is_device(self)
        if dev and c._depth("pysync") == 0:
            c._record("sync", "Tensor.cpu (device to host copy)", True)
        with c._inside("pysync"):
            out = orig(self, *args, **kwargs)
            if dev:
                if c._storage(out) is c._storage(self):
                    out = out.clone()          # a GPU run gets a host copy, not `self`
                c._unmark(out)
        return out
    return cpu


# what `t.device` returns for host data while counting (`_device_property`): a CPU device object of our
# own, so that a factory given `device=host_tensor.device` can tell it from the compute device
_HOST_DEVICE = torch.device("cpu")


def _is_device_target(c: CostCounter, d) -> bool | None:
    """True: `d` names the compute device; False: the host (the string "cpu", or `.device` of host data);
    None: no device given."""
    if d is None:
        return None
    if d is _HOST_DEVICE:
        return False
    if isinstance(d, torch.Tensor):
        return c.is_device(d)
    if isinstance(d, str):
        return d.split(":")[0] != "cpu"
    return isinstance(d, (torch.device, int))


def _factory_wrapper(c: CostCounter, name: str, orig):
    pos = FACTORIES[name]

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        d = kwargs.get("device", args[pos] if pos is not None and len(args) > pos else None)
        target = _is_device_target(c, d) if not isinstance(d, torch.Tensor) else None
        if target and name in _COPYING_FACTORIES and c._depth("coll") == 0:
            data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
            if not (isinstance(data, torch.Tensor) and c.is_device(data)):
                c._record("h2d", f"torch.{name}(host data, device=...)", False)
        out = orig(*args, **kwargs)
        if target:
            c.mark_device(out)
        return out
    return wrapper


def _to_wrapper(c: CostCounter, orig):
    @functools.wraps(orig)
    def to(self, *args, **kwargs):
        d = kwargs.get("device", kwargs.get("other"))
        if d is None and args and isinstance(args[0], (str, torch.device, int, torch.Tensor)):
            d = args[0]
        target = _is_device_target(c, d) if c._depth("coll") == 0 else None
        src_dev = c.is_device(self) if target is not None else None
        moves = target is not None and target != src_dev
        if moves:
            if target:
                c._record("h2d", "Tensor.to(device) of host data", False)
            elif c._depth("pysync") == 0:
                c._record("sync", "Tensor.to('cpu') (device to host copy)", True)
        with c._inside("pysync"):
            out = orig(self, *args, **kwargs)
            if moves:
                if isinstance(out, torch.Tensor) and c._storage(out) is c._storage(self):
                    out = out.clone()          # a GPU run gets a copy on the other side, not `self`
                (c.mark_device if target else c._unmark)(out)
        return out
    return to


def _device_property(c: CostCounter, orig):
    def device(self):
        d = orig.__get__(self, type(self))
        return _HOST_DEVICE if d.type == "cpu" and not c.is_device(self) else d
    return property(device, doc=getattr(orig, "__doc__", None))


@contextlib.contextmanager
def count_costs(device_data=(), package: str = "fla_cp", helper_files=HELPER_FILES,
                helper_functions=HELPER_FUNCTIONS):
    """Count collectives and host syncs while the block runs; yields a `CostCounter`.

    `device_data`: tensors / modules (or lists of them) to treat as device data (module docstring).
    `package`: the package (name, or a directory) whose functions are reported as callers;
    `helper_files` (paths relative to it) and `helper_functions` (names): the plumbing reported as `via`.
    Everything patched is restored on exit, also when the block raises."""
    c = CostCounter(package, helper_files, helper_functions)
    c.mark_device(device_data)
    patched: list[tuple[object, str, bool, object]] = []   # (owner, attr, had own attr, original)

    def patch(owner, attr, new):
        had = attr in vars(owner)
        patched.append((owner, attr, had, getattr(owner, attr)))
        setattr(owner, attr, new)

    mode = _Mode(c)
    try:
        wrappers = {}
        for modname in _DIST_MODULES:
            mod = sys.modules.get(modname)
            if mod is None:
                continue
            for name in COLLECTIVES:
                orig = getattr(mod, name, None)
                if orig is None or not callable(orig):
                    continue
                if id(orig) not in wrappers:       # one wrapper per function, shared by both modules
                    wrappers[id(orig)] = _collective_wrapper(c, name, orig)
                patch(mod, name, wrappers[id(orig)])
        for attr, name in _TENSOR_SYNCS.items():
            patch(torch.Tensor, attr, _tensor_wrapper(c, name, getattr(torch.Tensor, attr)))
        patch(torch.Tensor, "cpu", _cpu_wrapper(c, torch.Tensor.cpu))
        patch(torch.Tensor, "to", _to_wrapper(c, torch.Tensor.to))
        patch(torch.Tensor, "device", _device_property(c, inspect.getattr_static(torch.Tensor, "device")))
        for name in FACTORIES:
            if hasattr(torch, name):
                patch(torch, name, _factory_wrapper(c, name, getattr(torch, name)))
        with mode:
            yield c
    finally:
        for owner, attr, had, orig in reversed(patched):
            if had:
                setattr(owner, attr, orig)
            else:
                delattr(owner, attr)


__all__ = ["COLLECTIVES", "CostCounter", "Event", "count_costs"]
