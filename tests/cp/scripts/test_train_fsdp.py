"""train_cp_real.py --fsdp: FSDP2 over the flattened dp x cp mesh with sharded (DCP) checkpoints.

The FSDP2 run trains the replicated run's losses (the same reduction: sum over CP, mean over DP); a run
saved at step k and resumed continues the uninterrupted one bit for bit; a sharded checkpoint resumes
resharded (another dp x cp split) and without --fsdp, a replicated one with --fsdp; the checkpoint
directory loads with `AutoModelForCausalLM.from_pretrained`, and its HF copy equals the DCP shards.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from test_scripts import TRAIN_ARGS, _losses, _train_rank   # tests/cp/scripts is on sys.path under pytest

# fp32 on CPU: the FSDP2 reduce-scatter sums in another order than sync_gradients' all-reduce
REL = 1e-5


def _run(world: int, runs: list[list[str]], timeout: float = 240) -> list[str]:
    """train_cp_real.main(argv) for each argv, one after the other on `world` spawned gloo ranks; asserts
    that every run exited 0 on every rank and returns rank 0's output of each."""
    from _dist import run_ranks
    ranks = run_ranks(_train_rank, world, args=(runs,), timeout=timeout)
    codes = [[code for code, _ in rank] for rank in ranks]
    assert codes == [[0] * len(runs)] * world, "\n\n".join(text for _, text in ranks[0])
    return [text for _, text in ranks[0]]


def _close(run: list[tuple[int, float]], ref: list[tuple[int, float]], rel: float = REL) -> None:
    assert [s for s, _ in run] == [s for s, _ in ref], (run, ref)
    assert [loss for _, loss in run] == pytest.approx([loss for _, loss in ref], rel=rel), (run, ref)


def test_fsdp_cp2_matches_replicated_resumes_exactly_and_reshards(tmp_path):
    """World 2, CP=2, 6 steps: --fsdp == replicated (1e-5); saved at step 3 and resumed == uninterrupted
    (bit-identical losses); the step-3 shards resumed at DP=2 x CP=1 (resharded; == the replicated DP=2 run
    from the same shards, so the divide-by-dp is checked too), and without --fsdp; a replicated step-3
    checkpoint resumed with --fsdp. Then the HF copy in the checkpoint directory."""
    args = TRAIN_ARGS + ["--cp_size", "2"]
    names = ("rep", "full", "cut", "dp2", "dp2rep", "plain", "rep2fsdp")
    rep, full, cut, dp2, dp2rep, plain, rep2fsdp = (tmp_path / n for n in names)
    step3 = str(cut / "step_0000003")
    out = _run(2, [
        args + ["--save_dir", str(rep), "--save_every", "3"],                  # replicated reference
        args + ["--fsdp", "--save_dir", str(full)],
        args + ["--fsdp", "--save_dir", str(cut), "--stop_at", "3"],
        args + ["--fsdp", "--save_dir", str(cut), "--resume"],
        # the same sequences per step over DP=2 x CP=1: DCP reshards the step-3 shards over the new split
        TRAIN_ARGS + ["--fsdp", "--cp_size", "1", "--batch_size", "1", "--save_dir", str(dp2), "--resume", step3],
        TRAIN_ARGS + ["--cp_size", "1", "--batch_size", "1", "--save_dir", str(dp2rep), "--resume", step3],
        args + ["--save_dir", str(plain), "--resume", step3],                 # sharded -> replicated
        args + ["--fsdp", "--save_dir", str(rep2fsdp), "--resume", str(rep / "step_0000003")],  # and back
    ])
    assert "(FSDP2 over 2 ranks)" in out[1] and "FSDP2" not in out[0]
    reference, sharded = _losses(rep), _losses(full)
    assert [s for s, _ in reference] == list(range(1, 7)) and reference[-1][1] < reference[0][1]
    _close(sharded, reference)
    assert _losses(cut) == sharded, f"resumed {_losses(cut)}\nuninterrupted {sharded}"
    # the DP mean of per-replica means weighs tokens differently from the CP run's global mean (as without
    # FSDP in test_scripts.py): close, not equal
    _close(_losses(dp2), sharded[3:], rel=1e-2)
    _close(_losses(dp2), _losses(dp2rep))          # at DP=2 FSDP2 divides by dp: the replicated DP mean
    _close(_losses(plain), sharded[3:])
    _close(_losses(rep2fsdp), reference[3:])

    ckpt = full / "step_0000006"
    assert (full / "latest").read_text().strip() == ckpt.name
    assert {p.name for p in (ckpt / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["format"] == "dcp"
    assert torch.load(rep / "step_0000006" / "trainer_state.pt", weights_only=False)["format"] == "full"
    _check_hf_copy(ckpt)
    # the FSDP2 weights are the replicated run's (to fp32 rounding through 6 AdamW steps)
    from safetensors.torch import load_file
    a, b = load_file(ckpt / "model.safetensors"), load_file(rep / "step_0000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-4 * b[k].abs().max(), k


def _check_hf_copy(ckpt: Path) -> None:
    """The checkpoint directory loads with AutoModelForCausalLM (fla_cp imported), its weights equal the
    DCP model shards exactly, and it runs."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    import fla_cp  # noqa: F401  (registers the model with the Auto classes)
    from fla_cp.models import GatedDeltaNetCPForCausalLM
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["GatedDeltaNetCPForCausalLM"], config["architectures"]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert type(model) is GatedDeltaNetCPForCausalLM
    loaded = model.state_dict()
    shards = {k: torch.empty_like(v) for k, v in loaded.items()}
    with warnings.catch_warnings():          # "no process group: loading in a single process", as meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": shards}, checkpoint_id=str(ckpt / "dcp"))     # reads every rank's shards
    for k, v in loaded.items():
        assert torch.equal(v, shards[k]), k
    ids = torch.randint(0, config["vocab_size"], (1, 16))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.slow
def test_fsdp_dp2xcp2_matches_replicated(tmp_path):
    """World 4 = DP=2 x CP=2: --fsdp == replicated (1e-5) over 6 steps, 4 DCP shard files. (~25 s on 2 idle
    cores, 4 spawned ranks: slow, for the default suite's time; DP=2 and CP=2 are each checked by default above.)"""
    args = TRAIN_ARGS + ["--cp_size", "2", "--batch_size", "1"]
    rep, full = tmp_path / "rep", tmp_path / "full"
    out = _run(4, [args + ["--save_dir", str(rep)], args + ["--fsdp", "--save_dir", str(full)]], timeout=400)
    assert "world 4 = dp 2 x cp 2 (FSDP2 over 4 ranks)" in out[1], out[1]
    _close(_losses(full), _losses(rep))
    assert len(list((full / "step_0000006" / "dcp").glob("__*_0.distcp"))) == 4


@pytest.mark.slow
def test_fsdp_world4_resumes_exactly_and_reshards_from_world2(tmp_path):
    """Shards saved at world 2 (CP=2) resume at world 4 (DP=2 x CP=2, the same sequences per step); at
    world 4, saved at step 3 and resumed == uninterrupted, bit for bit. (1-2 min on 2 cores.)"""
    two = TRAIN_ARGS + ["--cp_size", "2", "--fsdp"]
    four = TRAIN_ARGS + ["--cp_size", "2", "--batch_size", "1", "--fsdp"]
    w2, w2to4, full, cut = (tmp_path / n for n in ("w2", "w2to4", "full", "cut"))
    _run(2, [two + ["--save_dir", str(w2), "--save_every", "3"]])
    _run(4, [four + ["--save_dir", str(w2to4), "--resume", str(w2 / "step_0000003")],
             four + ["--save_dir", str(full)],
             four + ["--save_dir", str(cut), "--stop_at", "3"],
             four + ["--save_dir", str(cut), "--resume"]], timeout=400)
    # the DP mean of per-replica means vs the CP run's global mean: close, not equal
    _close(_losses(w2to4), _losses(w2)[3:], rel=1e-2)
    assert _losses(cut) == _losses(full)


def test_bench_fsdp_memory_tiny_world4(tmp_path):
    """scripts/bench_fsdp_memory.py on the tiny preset, world 4 (2x2 and 4x1): FSDP2 holds about a quarter
    of the replicated parameters + gradients + AdamW state per rank, measured from the local shards; every
    parameter element is stored once over the ranks (the ratio is not met by dropping or mis-counting)."""
    import subprocess
    import sys
    ROOT = Path(__file__).resolve().parents[3]
    out = tmp_path / "mem.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_fsdp_memory.py"), "--model_config", "tiny",
                          "--splits", "2x2,4x1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "replicated: P + G + AdamW = total" in res.stdout and "| 2 x 2   |" in res.stdout, res.stdout
    rows = json.loads(out.read_text())
    assert [(r["dp"], r["cp"]) for r in rows] == [(2, 2), (4, 1)]
    for r in rows:
        rep, fs = r["replicated"], r["fsdp2"]
        assert rep["params"] == rep["grads"] == 4 * r["params"]            # fp32, everything on every rank
        assert rep["adamw"] >= 2 * rep["params"]                           # exp_avg, exp_avg_sq (+ step)
        assert r["fsdp2_param_elems_sum"] == r["params"]
        assert 0 < fs["params"] == fs["grads"] and fs["adamw"] >= 2 * fs["params"]
        assert 0.2 < r["ratio"] < 0.3, r
        assert max(r["fsdp2_total_per_rank"]) == r["fsdp2_total"]


@pytest.mark.slow
@pytest.mark.parametrize("preset, model_type, hf_class", [("qwen3_5-tiny", "qwen3_5_text", "Qwen3_5ForCausalLM"),
                                                          ("qwen3_next-tiny", "qwen3_next", "Qwen3NextForCausalLM")])
def test_qwen_trains_with_fsdp_and_resumes_exactly(tmp_path, preset, model_type, hf_class):
    """transformers' Qwen3.5 and Qwen3-Next (MoE) through the training script at CP=2: --fsdp trains the
    replicated run's losses, a sharded checkpoint resumes bit for bit, and the checkpoint directory is a
    transformers checkpoint (transformers' own class loads it; no CP field in its config.json)."""
    import fla_cp.models
    if fla_cp.models.QWEN_FAMILIES_MISSING:
        pytest.skip(fla_cp.models.QWEN_FAMILIES_MISSING)
    args = TRAIN_ARGS + ["--cp_size", "2", "--model_config", preset]
    rep, full, cut = (tmp_path / n for n in ("rep", "full", "cut"))
    _run(2, [args + ["--save_dir", str(rep)],
             args + ["--fsdp", "--save_dir", str(full)],
             args + ["--fsdp", "--save_dir", str(cut), "--stop_at", "3"],
             args + ["--fsdp", "--save_dir", str(cut), "--resume"]])
    reference, sharded = _losses(rep), _losses(full)
    assert reference[-1][1] < reference[0][1]
    _close(sharded, reference)
    assert _losses(cut) == sharded, f"resumed {_losses(cut)}\nuninterrupted {sharded}"
    ckpt = full / "step_0000006"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == model_type and not {"cp_size", "cp_layout", "backend"} & set(config)
    import transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = getattr(transformers, hf_class).from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
