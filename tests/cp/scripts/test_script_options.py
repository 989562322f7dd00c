"""Options and failure modes of the command-line scripts, checked without long runs: benchmark_memory.py
compares and plots only runs measured with the same settings, test_numerical_correctness.py refuses
what it cannot check, bench_cpu.py fails when the two implementations disagree, and the scripts under
scripts/ run from a checkout where fla_cp is not installed."""
from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

import benchmark_memory as bm                 # tests/cp is on sys.path (conftest.py)
from fla_cp.utils.configs import model_config_kwargs
import test_numerical_correctness as nc

ROOT = Path(__file__).resolve().parents[3]


# ----------------------------------------------------------------------------------------------
# benchmark_memory.py
# ----------------------------------------------------------------------------------------------
def fake_run(cp_size: int, argv: list[str], saved_bytes: int, layout: str = "contiguous", date: str = "2026-01-01"):
    """A results file's content as main() writes it, for the options `argv`, without measuring."""
    args = bm.get_args(["--cp_size", str(cp_size), "--cp_layout", layout, *argv])
    row = {"seq_len": 256, "local_len": 256 // cp_size, "status": "OK", "params": 1000, "model_bytes": 4000,
           "peak_bytes": 10 * saved_bytes, "step_peak_bytes": 2 * saved_bytes, "saved_bytes": saved_bytes}
    return {"cp_size": cp_size, "cp_layout": layout, "world_size": cp_size, "model_config": args.model_config,
            "params": 1000, "dtype": args.dtype, "batch_size": args.batch_size, "device_type": "cpu",
            "device_name": "CPU test", "settings": bm.run_settings(args, "CPU test"), "date": date, "results": [row]}


def save(run: dict, results_dir: Path) -> Path:
    path = bm.results_path(results_dir, run["device_type"], run["cp_size"], run["cp_layout"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))
    return path


def test_benchmark_memory_reduction_only_against_the_same_settings(tmp_path, capsys):
    """The reduction column needs a cp_size=1 run of the same resolved model (vocab and the content of a
    JSON config included), dtype and batch; otherwise one note says which settings differ."""
    tiny = ["--model_config", "tiny"]
    save(fake_run(1, tiny, 4000), tmp_path)
    baseline, note = bm.load_baseline(tmp_path, fake_run(2, tiny, 2000))
    assert baseline is not None and note is None
    bm.print_table(fake_run(2, tiny, 2000), baseline, note)
    assert "2.00x act, 2.00x peak" in capsys.readouterr().out

    for other, differs in [(["--vocab_size", "20000"], "model.vocab_size 257 vs 20000"),
                           (["--dtype", "bf16"], "dtype fp32 vs bf16"),
                           (["--batch_size", "2"], "batch_size 1 vs 2")]:
        run = fake_run(2, tiny + other, 2000)
        baseline, note = bm.load_baseline(tmp_path, run)
        assert baseline is None and differs in note, note
        bm.print_table(run, baseline, note)
        out = capsys.readouterr().out
        notes = [line for line in out.splitlines() if line.startswith("(")]
        assert len(notes) == 1 and differs in notes[0] and "x act" not in out, out     # one note, the right one

    # the same JSON file name, edited between the runs
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**model_config_kwargs("tiny", 257), "hidden_size": 64}))
    save(fake_run(1, ["--model_config", str(config)], 4000), tmp_path)
    config.write_text(json.dumps({**model_config_kwargs("tiny", 257), "hidden_size": 128}))
    _, note = bm.load_baseline(tmp_path, fake_run(2, ["--model_config", str(config)], 2000))
    assert "model.hidden_size 64 vs 128" in note

    old = fake_run(1, tiny, 4000)
    del old["settings"]                       # saved before settings were recorded
    save(old, tmp_path)
    assert "older version" in bm.load_baseline(tmp_path, fake_run(2, tiny, 2000))[1]
    (tmp_path / "memory_cpu_cp1.json").unlink()
    assert "no saved cp_size=1 results" in bm.load_baseline(tmp_path, fake_run(2, tiny, 2000))[1]


def test_benchmark_memory_layouts_do_not_overwrite_and_plot_keeps_its_peers(tmp_path, capsys):
    """zigzag and contiguous results live in separate files (cp_size=1's serves both); --plot into a
    missing folder creates it and draws only the runs with the settings of the latest one."""
    tiny = ["--model_config", "tiny"]
    paths = {save(fake_run(1, tiny, 4000), tmp_path), save(fake_run(2, tiny, 2000), tmp_path),
             save(fake_run(2, tiny, 2100, layout="zigzag"), tmp_path),
             save(fake_run(4, tiny + ["--vocab_size", "999"], 1000, date="2025-01-01"), tmp_path)}
    assert len(paths) == 4
    assert bm.results_path(tmp_path, "cpu", 1, "zigzag") == bm.results_path(tmp_path, "cpu", 1)

    out = tmp_path / "new" / "dir" / "mem.png"
    plotted = bm.plot(tmp_path, "cpu", str(out), latest=fake_run(2, tiny, 2000))
    assert out.stat().st_size > 10_000
    assert [(r["cp_size"], r["cp_layout"]) for r in plotted] == [(1, "contiguous"), (2, "contiguous"), (2, "zigzag")]
    (left_out,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("left out of the plot")]
    assert left_out.endswith(": memory_cpu_cp4.json"), left_out

    # --plot alone: the newest saved run (by its date) picks the peers
    save(fake_run(4, tiny + ["--vocab_size", "999"], 1000, date="2027-01-01"), tmp_path)
    plotted = bm.plot(tmp_path, "cpu", str(out))
    assert [r["cp_size"] for r in plotted] == [4]


def test_benchmark_memory_warmup_is_the_same_share_for_every_cp_size():
    """The warm-up step is the same fraction of each rank's measured tokens whatever cp_size, and never
    the whole measured length (it used to be 64 tokens per rank: all of a 101-token sequence on 3 ranks)."""
    for seq_len in (101, 256, 4096):
        for cp in (1, 2, 3, 4):
            local = -(-seq_len // cp)
            warm = bm.warmup_len(seq_len, cp)
            assert warm % cp == 0 and warm // cp >= 2
            assert warm // cp == max(2, local // bm.WARMUP_DIV), (seq_len, cp, warm)
            assert warm < seq_len


def one_rank_env(monkeypatch):
    """The environment of a one-rank group, undone after the test (init_distributed fills it in)."""
    from fla_cp.utils.dist import free_port
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)


def test_benchmark_memory_exits_1_on_a_failed_measurement_and_keeps_the_saved_run(tmp_path, monkeypatch, capsys):
    """A measurement that raised is no result: exit 1 (so run_cp_tests.sh / gpu_check.sh report FAIL) and
    the saved run stays as it was. Out of memory is a result: exit 0, saved, with the model's params."""
    one_rank_env(monkeypatch)
    tiny = ["--model_config", "tiny"]
    saved = save(fake_run(1, tiny, 4000), tmp_path)
    good = saved.read_text()
    measured = {"params": 2_500_000, "model_bytes": 10**7, "peak_bytes": 10**8, "step_peak_bytes": 10**7,
                "saved_bytes": 10**6, "step_time_s": 0.1}
    outcome = {256: {"status": "OK", **measured}, 512: {"status": "FAILED: RuntimeError: boom", "params": 2_500_000}}
    monkeypatch.setattr(bm, "run_child", lambda args, seq_len, port: outcome[seq_len])
    argv = ["--cp_size", "1", "--seq_lens", "256,512", *tiny, "--results_dir", str(tmp_path),
            "--plot", str(tmp_path / "mem.png")]
    assert bm.main(argv) == 1
    out, err = capsys.readouterr()
    assert "1 of 2 measurements failed (seq_len 512): not saved" in err, err
    assert saved.read_text() == good and not (tmp_path / "mem.png").exists()
    assert "(2.50M params)" in out and "FAILED: RuntimeError: boom" in out, out

    outcome = {256: {"status": "OOM", "params": 2_500_000}, 512: {"status": "OOM (killed)"}}
    assert bm.main(argv[:-2]) == 0
    run = json.loads(saved.read_text())
    assert run["params"] == 2_500_000 and [r["status"] for r in run["results"]] == ["OOM", "OOM (killed)"]
    assert "(2.50M params)" in capsys.readouterr().out


def test_benchmark_memory_child_reports_params_when_the_step_fails(monkeypatch):
    """The params are known before the step: a step that raises still reports them (they were null)."""
    import torch

    from fla_cp.models import GatedDeltaNetCPForCausalLM
    one_rank_env(monkeypatch)
    threads = torch.get_num_threads()

    def boom(self, *args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(GatedDeltaNetCPForCausalLM, "forward", boom)
    try:
        result = bm.measure(bm.get_args(["--_child", "--_seq_len", "64", "--cp_size", "1", "--model_config", "tiny",
                                         "--threads", "1"]))
    finally:
        torch.set_num_threads(threads)
    assert result["status"] == "FAILED: RuntimeError: boom", result
    assert result["params"] > 0 and result["model_bytes"] == 4 * result["params"]


def test_benchmark_memory_rejects_bad_seq_lens(capsys):
    for bad in ("256,x", "0,256"):
        with pytest.raises(SystemExit) as e:
            bm.get_args(["--seq_lens", bad])
        assert e.value.code == 2 and "argument --seq_lens" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# train_cp_real.py
# ----------------------------------------------------------------------------------------------
def test_train_cli_bad_argument_combinations_are_usage_errors(tmp_path, capsys):
    """Each ended in a traceback (or did nothing) after start-up: now `error: ...` and exit 2 at once."""
    import train_cp_real
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "a_file").write_text("")
    cases = [(["--resume"], "--resume without a checkpoint path resumes --save_dir's latest checkpoint"),
             (["--resume", str(tmp_path)], f"--resume {tmp_path}: not a checkpoint directory"),
             (["--save_every", "2"], "--save_every needs --save_dir"),
             (["--steps", "5", "--stop_at", "10"], "--stop_at 10 is past the end of the run (--steps 5)"),
             (["--log_file", str(tmp_path / "loss.txt")], "must end in .csv or .jsonl"),
             (["--log_file", str(tmp_path / "dir.jsonl")], "dir.jsonl is a directory"),
             (["--data", str(tmp_path / "nope")], "nope does not exist"),
             (["--save_dir", str(tmp_path / "a_file")], "a_file is a file, not a directory"),
             (["--steps", "0"], "argument --steps: must be >= 1"),
             (["--save_every", "-1"], "argument --save_every: must be >= 0"),
             (["--stop_at", "0"], "argument --stop_at: must be >= 1")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            train_cp_real.get_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and ": error: " in err and message in " ".join(err.split()), (argv, err)
    # what stays allowed: --resume DIR without --save_dir, --stop_at == --steps, a .csv log
    step = tmp_path / "step_0000001"
    step.mkdir()
    (step / "trainer_state.pt").write_bytes(b"")
    train_cp_real.get_args(["--resume", str(step), "--steps", "4", "--stop_at", "4", "--log_file", "x/loss.csv"])


def test_train_cli_unusable_tokenizer_data_or_model_config_exit_2(tmp_path, monkeypatch, capsys):
    """What --tokenizer, --data and --model_config name is loaded after start-up: a clean error there too."""
    import torch
    import train_cp_real
    one_rank_env(monkeypatch)
    (tmp_path / "empty").mkdir()
    (tmp_path / "doc.txt").write_text("a document")
    (tmp_path / "bad.json").write_text("{not json")
    base = ["--threads", str(torch.get_num_threads()), "--model_config", "tiny", "--data", str(tmp_path / "doc.txt")]
    for argv, message in [(["--tokenizer", str(tmp_path / "tok")], "error: --tokenizer"),
                          (["--data", str(tmp_path / "empty")], "no documents found (looked for .txt, .md"),
                          (["--model_config", "nope"], "error: --model_config 'nope': not a preset"),
                          (["--model_config", str(tmp_path / "bad.json")], "error: Expecting property name")]:
        assert train_cp_real.main(base + argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_train_cli_help_names_the_data_suffixes_and_the_default_log(capsys):
    import train_cp_real

    from fla_cp.data import DATA_SUFFIXES, TEXT_SUFFIXES
    with pytest.raises(SystemExit) as e:
        train_cp_real.get_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and set(TEXT_SUFFIXES) < set(DATA_SUFFIXES)
    assert f"a directory of {'/'.join(DATA_SUFFIXES)} files" in out, out
    assert "default: SAVE_DIR/loss.jsonl, or runs/train_cp_real/loss.jsonl without --save_dir" in out, out


# ----------------------------------------------------------------------------------------------
# test_numerical_correctness.py as a command
# ----------------------------------------------------------------------------------------------
def test_numerical_cli_refuses_what_it_cannot_check(tmp_path, monkeypatch, capsys):
    # fp16 has no bounds and no reference: refused when parsing, not labelled fp32 results or a KeyError
    with pytest.raises(SystemExit) as e:
        nc.get_args(["--mode", "single", "--dtypes", "fp32,fp16", "--save_ref"])
    assert e.value.code == 2 and "unsupported ['fp16']" in capsys.readouterr().err
    # cp mode in one process would compare cp_size=1 with itself and pass
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert nc.main(["--mode", "cp", "--ref", str(tmp_path / "ref.pt")]) == 2
    assert "needs at least 2 ranks" in capsys.readouterr().err
    # the training count of a cp run: the reference's, or 0 to skip
    assert [nc.cp_train_steps(k, 3) for k in (None, 3, 0)] == [3, 3, 0]
    with pytest.raises(ValueError, match="the reference has 3 training steps"):
        nc.cp_train_steps(2, 3)


# ----------------------------------------------------------------------------------------------
# scripts/bench_cpu.py
# ----------------------------------------------------------------------------------------------
def test_bench_cpu_fails_when_the_outputs_disagree(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "scripts" / "bench_cpu.py")
    bench_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_cpu)
    tiny = ["--T", "64", "--H", "1", "--K", "16", "--V", "16", "--repeats", "1"]
    assert bench_cpu.main(tiny) == 0
    theirs = bench_cpu.theirs
    monkeypatch.setattr(bench_cpu, "theirs", lambda *xs: theirs(*xs) * 1.001)    # 0.1% off
    assert bench_cpu.main(tiny) == 1
    assert "FAIL: the outputs disagree" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# scripts/*.py from a checkout, and their option checks
# ----------------------------------------------------------------------------------------------
# Loads each script as `python scripts/X.py` would (not as __main__), checks that fla_cp is then
# importable, and calls its main() with bad options. Before each script the checkout leaves sys.path
# and fla_cp leaves sys.modules, so every script has to find the package by itself.
DRIVER = r"""
import contextlib, importlib, io, json, runpy, sys
root, runs = sys.argv[1], json.loads(sys.argv[2])
out = []
for script, argv in runs:
    sys.path[:] = [p for p in sys.path if p != root]
    for name in [m for m in sys.modules if m.split(".")[0] == "fla_cp"]:
        del sys.modules[name]
    ns = runpy.run_path(f"{root}/scripts/{script}")
    importlib.import_module("fla_cp.ops")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = ns["main"](argv)
        except SystemExit as e:
            code = e.code
    out.append([script, code, err.getvalue()])
print(json.dumps(out))
"""


def test_scripts_run_from_a_checkout_and_check_their_options(tmp_path):
    """`python -S` with only site-packages on the path: the editable install's .pth is not read, so
    fla_cp is importable only through the scripts' own sys.path line (a plain clone). Bad options
    end in a usage error (exit 2), not a KeyError or StatisticsError."""
    paths = [*site.getsitepackages(), site.getusersitepackages()]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if os.path.isdir(p))
    runs = [("bench_cpu.py", ["--repeats", "0"]), ("kernel_resources.py", ["--shapes", "main,bogus"]),
            ("kernel_resources.py", ["--dtypes", "fp16"]), ("bench_op.py", ["--P", "0"])]
    proc = subprocess.run([sys.executable, "-S", "-c", DRIVER, str(ROOT), json.dumps(runs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = ["must be >= 1, got 0", "unknown ['bogus'] (choose from main, fla, small)",
                "unknown ['fp16'] (choose from bf16, fp32)", "T and P must be >= 1"]
    for (script, code, err), message in zip(results, expected):
        assert code == 2 and message in err, (script, code, err)


# ----------------------------------------------------------------------------------------------
# hybrid presets (fla_cp/utils/configs.py) and benchmark_memory.py's split by layer kind
# ----------------------------------------------------------------------------------------------
def test_hybrid_presets_are_3_to_1_with_integer_attention_head_dims():
    """Every hybrid preset: the widths of its GDN preset, attention on layers 3, 7, ... (3:1), GQA with
    hidden_size / num_heads an integer; one preset mixes windowed and full attention layers; the resolved
    config (what a resume compares) holds attn and survives JSON."""
    from fla_cp.utils.configs import PRESETS, preset_help, resolved_model_config
    hybrids = [name for name in PRESETS if name.startswith("hybrid-")]
    assert {"hybrid-tiny", "hybrid-small", "hybrid-base"} <= set(hybrids) and preset_help() == "|".join(PRESETS)
    windows = set()
    for name in hybrids:
        fields = model_config_kwargs(name, 257)
        gdn = PRESETS[name.removeprefix("hybrid-").removesuffix("-swa")]
        assert all(fields[k] == v for k, v in gdn.items() if k != "num_hidden_layers"), name
        specs = fields["attn"] if isinstance(fields["attn"], list) else [fields["attn"]]
        layers = sorted(i for spec in specs for i in spec["layers"])
        assert layers == [i for i in range(fields["num_hidden_layers"]) if i % 4 == 3], (name, layers)
        for spec in specs:
            assert fields["hidden_size"] % spec["num_heads"] == 0 and spec["num_heads"] % spec["num_kv_heads"] == 0
            assert spec["num_kv_heads"] < spec["num_heads"], name                   # GQA
            windows.add(spec.get("window_size"))
        resolved = resolved_model_config(name, 257)
        assert resolved["attn"] and json.loads(json.dumps(resolved)) == resolved
        fields["attn"] = None                      # model_config_kwargs hands out copies: PRESETS untouched
        assert resolved_model_config(name, 257)["attn"]
    assert None in windows and len(windows) > 1, windows             # full and windowed layers


def test_benchmark_memory_splits_a_hybrids_activations_by_layer_kind(tmp_path, capsys):
    """A hybrid run prints the second table (attention vs GDN layers, the K/V gather, the CP cache, and the
    ratio to one device / P against the saved baseline); a GDN-only run does not. The K/V gather figure is
    B*T*Hkv*(D+Dv)*bytes of the largest full-attention layer, the halo rows for a windowed one."""
    from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM
    hybrid = ["--model_config", "hybrid-tiny"]

    def with_split(run, attn, gdn, other):
        run["results"][0].update(layer_kinds=["gdn", "gdn", "gdn", "attn"], saved_attn_bytes=attn,
                                 saved_gdn_bytes=gdn, saved_other_bytes=other, kv_gather_bytes=65536,
                                 cp_cache_bytes=1024, saved_bytes=attn + gdn + other)
        return run
    save(with_split(fake_run(1, hybrid, 0), 2000, 6000, 2000), tmp_path)
    run = with_split(fake_run(2, hybrid, 0), 1000, 3000, 1100)
    bm.print_table(run, *bm.load_baseline(tmp_path, run))
    out = capsys.readouterr().out
    assert "attn layers (1) | GDN layers (3)" in out and "1000 B (20%)" in out and "1.020x" in out, out
    assert "1.96x act, " in out, out
    bm.print_table(fake_run(2, ["--model_config", "tiny"], 2000), None)
    assert "by layer kind" not in capsys.readouterr().out

    model = GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**model_config_kwargs("hybrid-tiny", 257)))
    assert bm.layer_kinds(model) == ["gdn", "gdn", "gdn", "attn"]
    # hybrid-tiny's attention: Hkv=1, head_dim 32: K and V are 64 values per token
    assert bm.kv_gather_bytes(model, 2, 1024, 2, "contiguous", 4) == 2 * 1024 * 64 * 4
    assert bm.kv_gather_bytes(model, 2, 1024, 1, "contiguous", 4) == 0
    windowed = GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**{
        **model_config_kwargs("hybrid-tiny", 257), "attn": {"layers": [3], "num_heads": 2, "num_kv_heads": 1,
                                                              "window_size": 16}}))
    assert bm.kv_gather_bytes(windowed, 1, 1024, 4, "zigzag", 2) == (4 * 2 * 15 + 1) * 64 * 2


# ----------------------------------------------------------------------------------------------
# scripts/bench_attention_comm.py
# ----------------------------------------------------------------------------------------------
def _bench_attention_comm():
    spec = importlib.util.spec_from_file_location("bench_attention_comm", ROOT / "scripts" / "bench_attention_comm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_attention_comm_small_size_matches_the_formula():
    """The script from the command line on one small size: full attention moves (P-1)/P x B*T*C elements
    each way forward and twice that backward, a window (P-1) x (W-1) x B*C; exit 0."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_attention_comm.py"), "--P", "2", "--T",
                          "256", "--W", "32"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "PASS: every measurement equals its formula" in res.stdout
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in res.stdout.splitlines() if line.startswith("| 2 |")]
    # C = Hkv*(D+Dv) = 16: full 1/2 x 256 x 16 = 2048; window 32: 31 x 16 = 496
    assert [(r[2], r[3], r[4]) for r in rows] == [("full", "2,048 / 2,048", "4,096 / 4,096"),
                                                  ("window 32", "496 / 496", "992 / 992")], rows


def test_bench_attention_comm_fails_when_a_measurement_disagrees(monkeypatch, capsys):
    """A formula one element off, and bad options: exit 1 naming the case, exit 2 (usage)."""
    bac = _bench_attention_comm()
    expected = bac.expected
    monkeypatch.setattr(bac, "expected", lambda P, T, W, *a: (expected(P, T, W, *a)[0] + (W is None),
                                                               expected(P, T, W, *a)[1]))
    assert bac.main(["--P", "2", "--T", "128", "--W", "16"]) == 1
    err = capsys.readouterr().err
    assert "P=2 T=128 full: forward moved 1,024 / 1,024 elements (sent / received), expected 1,025" in err, err
    assert "W=16" not in err
    for argv in (["--T", "1000", "--P", "3"], ["--P", "1"]):
        with pytest.raises(SystemExit) as e:
            bac.main(argv)
        assert e.value.code == 2
