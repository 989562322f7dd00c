"""tests/cp/_counting.py counts what it claims: known collectives and host syncs, on 2 gloo ranks, with
their callers and the device/host split; everything it patches is restored (also after an exception)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.utils._python_dispatch import _get_current_dispatch_mode

from _counting import COLLECTIVES, FACTORIES, count_costs
from _dist import run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))   # callers: the functions of this directory


def _collect(group):
    """3 all_gather + 2 all_reduce + 1 all_gather_object (which calls all_gather twice inside)."""
    x = torch.arange(4.0)
    for _ in range(3):
        dist.all_gather([torch.empty(4) for _ in range(2)], x, group=group)
    for _ in range(2):
        dist.all_reduce(x, group=group)
    out = [None, None]
    dist.all_gather_object(out, {"rank": dist.get_rank()}, group=group)
    return x


def _syncs(dev):
    """On device data: 2 .item(), 1 .tolist(), 1 nonzero; on host data: 1 .tolist()."""
    dev[0].item()
    (dev.sum() > 0).item()
    dev.tolist()
    dev.nonzero()
    torch.tensor([1, 2, 3]).tolist()


def _wrapper(t, group):
    """Plumbing (a helper function for the counter): its collectives are reported for its caller."""
    dist.all_reduce(t, group=group)


def _through_other_paths(group):
    """all_reduce by torch.distributed.nn.functional (counts as dist.all_reduce), by functional
    collectives (counted from the dispatcher as funcol.all_reduce) and through a helper."""
    import torch.distributed._functional_collectives as funcol
    import torch.distributed.nn.functional as dnnf
    dnnf.all_reduce(torch.ones(2), group=group)
    funcol.wait_tensor(funcol.all_reduce(torch.ones(2), "sum", group))
    _wrapper(torch.ones(3), group)


def _worker(rank, world):
    group = dist.group.WORLD
    res = {}
    dev = torch.tensor([0, 3, 0, 5])
    with count_costs(device_data=[dev], package=HERE) as c:
        with c.phase("collect"):
            gathered = _collect(group)
        with c.phase("syncs"):
            _syncs(dev)
    res["collectives"] = c.collectives
    res["collective_callers"] = c.collective_callers
    res["wire"] = c.wire
    res["host_syncs"] = c.host_syncs
    res["device_syncs"] = c.device_syncs
    res["sync_callers"] = c.sync_callers
    res["phases"] = {e.phase for e in c.events}
    res["gathered"] = gathered
    res["report"] = c.report()
    # the collective's buffer is device data (NCCL's buffers are on the GPU): a sync on it counts
    with count_costs() as c2:
        buf = torch.zeros(2)                       # host-built: its all_reduce input is an h2d copy
        dist.all_reduce(buf, group=group)
        buf.tolist()
    res["buffer"] = (c2.device_syncs, c2.h2d)
    with count_costs(package=HERE, helper_functions={"_wrapper"}) as c3:
        _through_other_paths(group)
    res["other"] = (c3.collectives, c3.wire, [(e.name, e.caller, e.via) for e in c3.select("collective")])
    return res


def test_counts_known_calls_on_two_ranks():
    for rank, res in enumerate(run_ranks(_worker, 2, timeout=120)):
        tag = f"rank {rank}"
        assert res["collectives"] == {"all_gather": 3, "all_reduce": 2, "all_gather_object": 1}, tag
        assert res["collective_callers"] == {("all_gather", "_collect"): 3, ("all_reduce", "_collect"): 2,
                                             ("all_gather_object", "_collect"): 1}, tag
        # what went out: all_gather_object is two allgathers (sizes, then the pickled bytes)
        assert res["wire"] == {"c10d.allgather_": 5, "c10d.allreduce_": 2}, (tag, res["wire"])
        assert res["device_syncs"] == {"Tensor.item": 2, "Tensor.tolist": 1, "aten.nonzero": 1,
                                       "dist.all_gather_object (pickles through the host)": 1}, (tag, res["report"])
        assert res["host_syncs"]["Tensor.tolist"] == 2 and sum(res["host_syncs"].values()) == 6, tag
        assert res["sync_callers"][("Tensor.item", "_syncs", True)] == 2
        assert res["sync_callers"][("Tensor.tolist", "_syncs", True)] == 1
        assert res["sync_callers"][("Tensor.tolist", "_syncs", False)] == 1
        assert res["sync_callers"][("aten.nonzero", "_syncs", True)] == 1
        assert res["phases"] == {"collect", "syncs"}
        assert torch.equal(res["gathered"], torch.arange(4.0) * 4)     # the wrapped calls still work
        assert "| all_gather | 3 | _collect: 3 |" in res["report"], res["report"]
        device_syncs, h2d = res["buffer"]
        assert device_syncs == {"Tensor.tolist": 1} and h2d == {"host data sent by dist.all_reduce": 1}, tag
        collectives, wire, events = res["other"]
        assert collectives == {"all_reduce": 2, "funcol.all_reduce": 1}, (tag, collectives)
        assert wire == {"c10d.allreduce_": 2, "_c10d_functional.all_reduce": 1}, (tag, wire)
        assert ("all_reduce", "_through_other_paths", "_wrapper") in events, events
        assert ("all_reduce", "_through_other_paths", None) in events, events


def _patched_now():
    return ({(m.__name__, n): getattr(m, n) for m in (dist, c10d) for n in COLLECTIVES if hasattr(m, n)},
            {n: vars(torch.Tensor).get(n) for n in ("item", "tolist", "cpu", "to", "device", "__bool__", "__int__",
                                                     "__float__", "__index__")},
            {n: getattr(torch, n) for n in FACTORIES if hasattr(torch, n)})


def test_everything_is_restored_also_after_an_exception():
    before = _patched_now()
    with count_costs() as c:
        assert _patched_now() != before and _get_current_dispatch_mode() is not None
        torch.tensor([1]).item()
    assert _patched_now() == before and _get_current_dispatch_mode() is None
    assert c.host_syncs == {"Tensor.item": 1} and not c.device_syncs
    with pytest.raises(ValueError, match="boom"):
        with count_costs():
            with count_costs():                     # nested, both unwound
                raise ValueError("boom")
    assert _patched_now() == before and _get_current_dispatch_mode() is None
    torch.tensor([2]).item()                        # nothing counts after exit
    assert c.host_syncs == {"Tensor.item": 1}


def test_device_rule_and_nesting_single_process():
    dev = torch.arange(6)
    with count_costs(device_data=dev) as outer:
        with count_costs() as inner:
            int(dev[1])                             # a view of device data: device
            bool(dev[2] > 1)
            dev[dev > 2]                            # boolean mask: a nonzero inside
            host = dev.cpu()                        # device -> host copy: a sync, then host data
            host.tolist()
            torch.tensor([1, 2], device=dev.device).tolist()   # an explicit device: an h2d copy, then device
            torch.repeat_interleave(torch.tensor([1, 2]))      # host data, no output_size
            torch.arange(3, device=host.device).nonzero()      # follows host.device: host
            torch.arange(3, device=dev.device).nonzero()       # follows dev.device: device
            assert host.device == dev.device == torch.device("cpu")
    assert inner.device_syncs == {"int(Tensor)": 1, "bool(Tensor)": 1, "aten.index (bool mask)": 1,
                                  "Tensor.cpu (device to host copy)": 1, "Tensor.tolist": 1, "aten.nonzero": 1}, \
        inner.report()
    assert inner.host_syncs - inner.device_syncs == {"Tensor.tolist": 1, "aten.repeat_interleave (no output_size)": 1,
                                                     "aten.nonzero": 1}
    assert inner.h2d == {"torch.tensor(host data, device=...)": 1}
    assert outer.host_syncs == inner.host_syncs and outer.h2d == inner.h2d
    assert {e.caller for e in inner.events} == {"test_counting.py:test_device_rule_and_nesting_single_process"}
