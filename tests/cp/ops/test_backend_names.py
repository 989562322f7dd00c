"""One kernel vocabulary, `backend = "auto" | "triton" | "torch"`, for the op, the short conv, the layer
and the config; the names it replaced still work for one release, with a FutureWarning naming the
replacement, and select the same kernels; bad names raise a ValueError naming the argument.

Replaced: the layer's / config's `kernel_backend=` and `conv_backend=` (conv's "fla" is "triton"),
`causal_conv(backend="fla")`, `TritonBackend(local_kernels=...)`.

This process imported FLA compiled, so off CUDA anything that runs FLA's kernels is refused here; such
paths are compared by the refusal they get (the same one as the new name's).
"""
from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch

# FLA imported compiled, as the suite's other modules import it; then our kernels, interpreted on CPU
from fla_cp.layers import GatedDeltaNetCP
from fla_cp.layers.short_conv_cp import causal_conv, resolve_conv_backend
from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM
from fla_cp.ops import chunk_cp_gated_delta_rule
from fla_cp.ops.backends import BACKENDS, get_backend
from fla_cp.ops.backends.torch_backend import TorchBackend

from _interpret import load_kernels, summary_kernels_backend

load_kernels()  # before anything else imports them (triton_backend does)

from fla_cp.ops.backends.triton_backend import TritonBackend  # noqa: E402

CUDA = torch.cuda.is_available()
LAYER = dict(hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0, conv_size=4, layer_idx=0)
SMALL = dict(hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0, num_hidden_layers=2,
             vocab_size=64, hidden_ratio=2, norm_eps=1e-6)


def deprecated(match: str):
    """pytest.warns for the FutureWarning of a replaced name."""
    return pytest.warns(FutureWarning, match=match)


@contextlib.contextmanager
def no_warnings():
    """Fail on any FutureWarning inside (the new names warn about nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        yield


def fla_refused() -> bool:
    """Whether FLA's kernels are refused off CUDA here: no GPU, and FLA imported compiled (as the
    pytest process imports it)."""
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_kernel_h_blockdim64 as kernel

    from fla_cp.utils.triton_interpreter import is_interpreted
    return not CUDA and not is_interpreted(kernel)


# ------------------------------------------------------------------------------------------- op
def op_inputs(seed=0, T=70):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, T, 2, 16, generator=g) for _ in range(2))
    v = torch.randn(1, T, 2, 16, generator=g)
    gate = -torch.rand(1, T, 2, generator=g)
    beta = torch.rand(1, T, 2, generator=g)
    return q, k, v, gate, beta


def run_op(backend):
    o, ht = chunk_cp_gated_delta_rule(*op_inputs(), backend=backend, cu_seqlens=torch.tensor([0, 30, 70]),
                                      output_final_state=True)
    return o, ht


def test_op_backend_names():
    assert BACKENDS == ("auto", "torch", "triton")
    cpu = torch.device("cpu")
    assert isinstance(get_backend("auto", cpu), TorchBackend) and isinstance(get_backend("torch", cpu), TorchBackend)
    ref = run_op("torch")
    for same in ("auto", TorchBackend(), summary_kernels_backend()):   # one process off CUDA: torch compute
        assert all(torch.equal(a, b) for a, b in zip(run_op(same), ref)), same
    for bad in ("fla", "cuda", "Torch", None):
        with pytest.raises(ValueError, match=r"chunk_cp_gated_delta_rule: backend must be one of"):
            run_op(bad)


def test_triton_backend_local_kernels_deprecated():
    """`local_kernels=` warns, naming the replacement, and maps onto the private `_local`: "fla" is
    `TritonBackend()` (backend="triton"), "auto" the summary kernels' test backend."""
    with no_warnings():
        new = TritonBackend()
        assert new._local == "triton" and summary_kernels_backend()._local == "auto"
    for old, local in (("fla", "triton"), ("auto", "auto"), ("torch", "torch")):
        with deprecated(r"local_kernels=.*deprecated.*TritonBackend\(\) / backend='triton'"):
            be = TritonBackend(32, local_kernels=old)
        assert be._local == local and be.chunk_size == 32
    with pytest.raises(ValueError, match="local_kernels must be one of"):
        TritonBackend(local_kernels="triton")
    # the same kernels: "auto" computes like the test backend, "fla" is refused like backend="triton"
    with deprecated("local_kernels"):
        old_auto, old_fla = TritonBackend(local_kernels="auto"), TritonBackend(local_kernels="fla")
    assert all(torch.equal(a, b) for a, b in zip(run_op(old_auto), run_op(summary_kernels_backend())))
    if fla_refused():
        errors = []
        for backend in (old_fla, "triton", TritonBackend()):
            with pytest.raises(ValueError) as info:
                run_op(backend)
            errors.append(str(info.value))
        assert errors[0] == errors[1] == errors[2] and "backend='triton' needs CUDA tensors" in errors[0], errors
    elif CUDA:
        assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(
            chunk_cp_gated_delta_rule(*(x.cuda() for x in op_inputs()), backend=old_fla),
            chunk_cp_gated_delta_rule(*(x.cuda() for x in op_inputs()), backend="triton")))


# ------------------------------------------------------------------------------------ short conv
def test_conv_backend_names():
    x, w = torch.randn(9, 4), torch.randn(4, 3)
    with no_warnings():
        assert resolve_conv_backend("auto", x) == "torch" and resolve_conv_backend("torch", x) == "torch"
        y = causal_conv(x, w, None, [(0, 4), (4, 9)], backend="torch")[0]
        assert torch.equal(causal_conv(x, w, None, [(0, 4), (4, 9)], backend="auto")[0], y)
    for bad in ("cuda", "Triton", None):
        with pytest.raises(ValueError, match="backend must be one of"):
            causal_conv(x, w, None, [(0, 9)], backend=bad)
    # "fla" is "triton": off CUDA (FLA compiled here) the same refusal, naming the new name
    if fla_refused():
        for backend in ("fla", "triton"):
            with warnings.catch_warnings(record=True) as seen, pytest.raises(
                    RuntimeError, match=r"causal_conv\(backend='triton'\) off CUDA"):
                warnings.simplefilter("always")
                causal_conv(x, w, None, [(0, 9)], backend=backend)
            assert [str(s.message) for s in seen if s.category is FutureWarning] == (
                ["causal_conv(backend='fla') is deprecated: use backend='triton' (the name is removed in the "
                 "next release)"] if backend == "fla" else [])
    elif CUDA:
        with deprecated(r"causal_conv\(backend='fla'\) is deprecated: use backend='triton'"):
            old = causal_conv(x.cuda(), w.cuda(), None, [(0, 4), (4, 9)], backend="fla")[0]
        assert torch.equal(old, causal_conv(x.cuda(), w.cuda(), None, [(0, 4), (4, 9)], backend="triton")[0])


# ----------------------------------------------------------------------------------------- layer
def make_layer(**kw) -> GatedDeltaNetCP:
    torch.manual_seed(0)
    return GatedDeltaNetCP(**LAYER, **kw)


def layer_out(layer) -> torch.Tensor:
    x = torch.randn(2, 11, LAYER["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return layer(x)[0]


def test_layer_backend_names():
    with no_warnings():
        new = make_layer(backend="torch")
        assert new.backend == "torch" and make_layer().backend == "auto"
    ref = layer_out(new)
    for old, backend in ((dict(kernel_backend="torch", conv_backend="torch"), "torch"),
                         (dict(kernel_backend="torch"), "torch"),
                         (dict(kernel_backend="torch", conv_backend="auto"), "torch"),
                         (dict(conv_backend="torch"), "torch"),
                         (dict(kernel_backend="auto", conv_backend="auto"), "auto"),
                         (dict(conv_backend="fla"), "triton"),
                         (dict(kernel_backend="triton", conv_backend="fla"), "triton"),
                         (dict(backend="torch", kernel_backend="torch"), "torch")):
        with deprecated(r"GatedDeltaNetCP: .*_backend=.* is deprecated: use backend="):
            layer = make_layer(**old)
        assert layer.backend == backend, old
        assert not hasattr(layer, "kernel_backend") and not hasattr(layer, "conv_backend")
        if backend != "triton":   # (triton: below) the same kernels, bitwise the same output ("auto": torch on CPU)
            assert torch.equal(layer_out(layer), layer_out(make_layer(backend=backend))), old
            assert torch.equal(layer_out(layer), ref), old
    # a backend object is the operator's (new and old name); the conv then runs "auto"
    obj = TorchBackend()
    with no_warnings():
        assert make_layer(backend=obj).backend is obj
    with deprecated("kernel_backend"):
        layer = make_layer(kernel_backend=obj)
    assert layer.backend is obj and torch.equal(layer_out(layer), ref)
    if fla_refused():   # "triton" / "fla" reach the conv: FLA compiled here, the same refusal for both
        for kw in (dict(backend="triton"), dict(conv_backend="fla")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                layer = make_layer(**kw)
            with pytest.raises(RuntimeError, match=r"GatedDeltaNetCP\(backend='triton'\) off CUDA"):
                layer_out(layer)


def test_layer_bad_backend_names():
    for kw, argument in ((dict(backend="cuda"), "backend"), (dict(backend="fla"), "backend"),
                         (dict(backend=None), "backend"), (dict(kernel_backend="fla"), "kernel_backend"),
                         (dict(conv_backend="cuda"), "conv_backend")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with pytest.raises(ValueError, match=f"^{argument} must be one of"):
                make_layer(**kw)
    # once two choices, one now: values other than "auto" must agree
    for kw in (dict(kernel_backend="torch", conv_backend="fla"), dict(backend="torch", conv_backend="triton"),
               dict(kernel_backend=TorchBackend(), conv_backend="torch")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with pytest.raises(ValueError, match="ask for different kernels; they are one choice now: pass backend="):
                make_layer(**kw)


# ---------------------------------------------------------------------------------------- config
def model_logits(model) -> torch.Tensor:
    ids = torch.randint(0, SMALL["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(ids).logits


def test_config_backend_names(tmp_path):
    with no_warnings():
        config = GatedDeltaNetCPConfig(**SMALL, backend="torch")
    assert config.backend == "torch" and GatedDeltaNetCPConfig().backend == "auto"
    assert "kernel_backend" not in config.to_dict() and "conv_backend" not in config.to_dict()
    for old, backend in ((dict(kernel_backend="torch"), "torch"), (dict(conv_backend="fla"), "triton"),
                         (dict(kernel_backend="torch", conv_backend="torch"), "torch")):
        with deprecated(r"GatedDeltaNetCPConfig: .*_backend=.* is deprecated: use backend="):
            c = GatedDeltaNetCPConfig(**SMALL, **old)
        assert c.backend == backend and "kernel_backend" not in c.to_dict()
    with deprecated(r"GatedDeltaNetCPConfig.from_fla: kernel_backend='triton' is deprecated"):
        assert GatedDeltaNetCPConfig.from_fla(config, kernel_backend="triton").backend == "triton"
    for kw, argument in ((dict(backend="fla"), "backend"), (dict(backend="cuda"), "backend"),
                         (dict(kernel_backend="cuda"), "kernel_backend"), (dict(conv_backend="cuda"), "conv_backend")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with pytest.raises(ValueError, match=f"^{argument} must be one of"):
                GatedDeltaNetCPConfig(**SMALL, **kw)

    # from_pretrained: the new keyword, and the old ones (warned, mapped), select the same kernels
    torch.manual_seed(0)
    GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**SMALL)).save_pretrained(tmp_path / "m")
    with no_warnings():
        new = GatedDeltaNetCPForCausalLM.from_pretrained(tmp_path / "m", backend="torch")
    assert new.config.backend == "torch" and all(block.attn.backend == "torch" for block in new.model.layers)
    ref = model_logits(new)
    with deprecated(r"from_pretrained: kernel_backend='torch', conv_backend='torch' is deprecated"):
        old = GatedDeltaNetCPForCausalLM.from_pretrained(tmp_path / "m", kernel_backend="torch",
                                                         conv_backend="torch")
    assert old.config.backend == "torch" and all(block.attn.backend == "torch" for block in old.model.layers)
    assert torch.equal(model_logits(old), ref)
    # with a config object (FLA's, as the Auto classes pass an FLA checkpoint's) the old names work too
    from fla.models import GatedDeltaNetConfig
    with deprecated("kernel_backend='torch' is deprecated"):
        old = GatedDeltaNetCPForCausalLM.from_pretrained(tmp_path / "m", config=GatedDeltaNetConfig(**SMALL),
                                                         kernel_backend="torch")
    assert old.config.backend == "torch" and torch.equal(model_logits(old), ref)

    # a config.json saved before `backend` (it held both old fields) loads quietly as the matching backend
    path = tmp_path / "m" / "config.json"
    saved = json.loads(path.read_text())
    assert saved["backend"] == "auto" and "kernel_backend" not in saved
    for fields, backend in (({"kernel_backend": "torch", "conv_backend": "auto"}, "torch"),
                            ({"kernel_backend": "auto", "conv_backend": "fla"}, "triton"),
                            ({"kernel_backend": "auto", "conv_backend": "auto"}, "auto")):
        legacy = {k: v for k, v in saved.items() if k != "backend"}
        path.write_text(json.dumps({**legacy, **fields}))
        with no_warnings():
            loaded = GatedDeltaNetCPConfig.from_pretrained(tmp_path / "m")
        assert loaded.backend == backend and "kernel_backend" not in loaded.to_dict(), fields
        if backend == "torch":
            with no_warnings():
                model = GatedDeltaNetCPForCausalLM.from_pretrained(tmp_path / "m")
            assert model.config.backend == "torch" and torch.equal(model_logits(model), ref)
            model.save_pretrained(tmp_path / "resaved")
            resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
            assert resaved["backend"] == "torch" and "kernel_backend" not in resaved and "conv_backend" not in resaved
