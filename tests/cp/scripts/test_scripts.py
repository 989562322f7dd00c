"""Tests of the user scripts and their helpers: corpus / tokenizer / packing (documents never leak),
the loss log, checkpoint + resume (an interrupted-and-resumed run has the loss curve of an
uninterrupted one), and small end-to-end runs of train_cp_real.py and benchmark_memory.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fla_cp.data import ByteTokenizer, Corpus, Packer, load_tokenizer
from fla_cp.utils.metrics_log import MetricsLog, read_log

ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = Path(__file__).resolve().parents[1]   # tests/cp: the user scripts


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def letter_corpus(tmp_path: Path, lengths: list[int]) -> Path:
    """Document i is one letter repeated lengths[i] times: any mixing shows in a piece."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i, n in enumerate(lengths):
        (d / f"doc{i:02d}.txt").write_text(chr(ord("a") + i) * n)
    return d


def check_batch(batch, eos: int):
    ids, labels, cu = batch.input_ids[0], batch.labels[0], batch.cu_seqlens
    assert cu[0] == 0 and cu[-1] == ids.numel() and bool((cu[1:] > cu[:-1]).all())
    pieces = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        piece = ids[s:e]
        body = piece[piece != eos]
        assert body.unique().numel() <= 1, f"piece [{s}, {e}) mixes documents: {piece.tolist()}"
        # EOS only ever ends a piece: a document ends where a piece ends
        assert bool((piece[:-1] != eos).all()), f"a document ends inside piece [{s}, {e})"
        assert labels[s] == -100
        assert torch.equal(labels[s + 1:e], ids[s + 1:e])
        pieces.append(piece)
    return pieces


def test_packing_never_mixes_documents_and_reproduces_the_corpus(tmp_path):
    lengths = [5, 40, 1, 130, 7, 64, 63, 2, 200, 9]
    corpus = Corpus(letter_corpus(tmp_path, lengths))
    tok = ByteTokenizer()
    packer = Packer(corpus, tok, seq_len=32, seed=3)
    stream = []
    for _ in range(30):                      # > one epoch: 531 tokens, 30 * 3 * 32 = 2880
        batch = packer.next_batch(3)
        assert batch.input_ids.shape == (1, 96)
        assert set(batch.cu_seqlens.tolist()) >= {0, 32, 64, 96}, "a piece crosses a sequence boundary"
        stream += [t for p in check_batch(batch, tok.eos_token_id) for t in p.tolist()]
    # the stream is the documents in each epoch's order, each followed by EOS
    expected = []
    for epoch in range(6):
        order = __import__("numpy").random.default_rng(3 + epoch).permutation(len(lengths))
        for i in order:
            expected += [ord("a") + int(i)] * lengths[i] + [tok.eos_token_id]
    assert stream == expected[:len(stream)]
    assert packer.epoch >= 5


def test_packing_position_resumes_exactly(tmp_path):
    corpus = Corpus(letter_corpus(tmp_path, [17, 300, 3, 45]))
    a = Packer(corpus, ByteTokenizer(), seq_len=24, seed=0)
    for _ in range(7):
        a.next_batch(2)
    state = json.loads(json.dumps(a.state_dict()))     # survives serialisation
    b = Packer(corpus, ByteTokenizer(), seq_len=24, seed=0)
    b.load_state_dict(state)
    for _ in range(20):
        x, y = a.next_batch(2), b.next_batch(2)
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.cu_seqlens, y.cu_seqlens)
    with pytest.raises(ValueError):
        Packer(corpus, ByteTokenizer(), seq_len=24, seed=1).load_state_dict(state)


def test_dp_split_keeps_boundaries(tmp_path):
    corpus = Corpus(letter_corpus(tmp_path, [10, 50, 3, 80]))
    batch = Packer(corpus, ByteTokenizer(), seq_len=16, seed=0).next_batch(4)
    parts = [batch.split(2, i) for i in range(2)]
    assert torch.equal(torch.cat([p.input_ids for p in parts], 1), batch.input_ids)
    for p in parts:
        assert p.input_ids.shape == (1, 32)
        check_batch(p, 256)
    joined = torch.cat([parts[0].cu_seqlens, parts[1].cu_seqlens[1:] + 32])
    assert torch.equal(joined, batch.cu_seqlens)


def test_jsonl_txt_and_default_corpus(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "first doc"}\n\n{"id": 3, "body": "second"}\n"third"\n')
    corpus = Corpus(f)
    assert [corpus[i] for i in range(len(corpus))] == ["first doc", "second", "third"]
    (tmp_path / "more.txt").write_text("héllo")
    assert sorted(Corpus(tmp_path)[i] for i in range(4)) == sorted(["first doc", "second", "third", "héllo"])
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo") + [tok.eos_token_id]) == "héllo"
    std = Corpus(None)
    assert len(std) > 100 and all(path.suffix == ".py" and "site-packages" not in path.parts for path, _ in std.entries)
    assert "def " in "".join(std[i] for i in range(20))
    with pytest.raises(FileNotFoundError):
        Corpus(tmp_path / "nope")


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n{bad json\n[1, 2]\n{"id": 3}\n')
    corpus = Corpus(f)
    assert corpus[0] == "ok"
    for i, (line, what) in enumerate([(3, "not valid JSON"), (4, "got list"), (5, "no text field")], start=1):
        with pytest.raises(ValueError, match=f"^{re.escape(str(f))}:{line}: .*{what}"):
            corpus[i]


def test_missing_tokenizer_is_not_a_download_error():
    with pytest.raises(FileNotFoundError, match="'nonexist_tok': not 'byte' and no such directory"):
        load_tokenizer("nonexist_tok")


def test_local_hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.eos_token_id == 1 and tok.vocab_size == 4
    assert tok.encode("hello world zzz") == [2, 3, 0]
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("hello world hello")
    batch = Packer(Corpus(corpus_file), tok, seq_len=8, seed=0).next_batch(1)
    assert batch.input_ids[0].tolist() == [2, 3, 2, 1, 2, 3, 2, 1]
    assert batch.cu_seqlens.tolist() == [0, 4, 8]


# ----------------------------------------------------------------------------------------------
# loss log
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_metrics_log_roundtrip_and_resume_truncation(tmp_path, suffix):
    path = tmp_path / f"loss{suffix}"
    log = MetricsLog(path)
    rows = [{"step": i, "loss": 1.0 / 3 + i, "lr": 1e-3} for i in range(1, 6)]
    for r in rows:
        log.write(r)
    assert read_log(path) == rows                 # floats round-trip exactly
    resumed = MetricsLog(path, resume_step=3)      # a resume at step 3 forgets steps 4, 5
    assert read_log(path) == rows[:3] == resumed.kept
    MetricsLog(path)                               # a fresh run starts a fresh file
    assert read_log(path) == []


# ----------------------------------------------------------------------------------------------
# train_cp_real.py: resume == uninterrupted, CLI smoke run, Ctrl-C
# ----------------------------------------------------------------------------------------------
TRAIN_ARGS = ["--model_config", "tiny", "--seq_len", "96", "--batch_size", "2", "--steps", "6", "--warmup", "2",
              "--lr", "3e-3", "--threads", "1"]


def _train_rank(rank, world_size, runs):
    """Several train_cp_real.main() runs, one after the other, in one spawned group (imports once):
    [(exit code, what the run printed)] per run."""
    import contextlib
    import io

    import train_cp_real
    results = []
    for argv in runs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = train_cp_real.main(argv)
        results.append((code, out.getvalue()))
    return results


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(run_dir / "loss.jsonl")]


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    """CP=2: 6 steps straight == 3 steps, stop, resume to 6 (losses and final weights bit-identical).
    Then what a resume may change (CP layout, CP size vs DP at the same sequences per step), what it
    refuses (arguments that differ from the checkpoint's) and when it has nothing to do."""
    from _dist import run_ranks
    args = TRAIN_ARGS + ["--cp_size", "2"]
    full, cut, zigzag, dp2 = (tmp_path / name for name in ("full", "cut", "zigzag", "dp2"))
    step3 = str(cut / "step_0000003")
    runs = [args + ["--save_dir", str(full)],
            args + ["--save_dir", str(cut), "--stop_at", "3"],
            args + ["--save_dir", str(cut), "--resume"],
            TRAIN_ARGS + ["--cp_size", "3"],                     # does not divide the world: exit 2
            args + ["--save_dir", str(cut), "--resume", "--optimizer", "sgd", "--seq_len", "64", "--steps", "4",
                    "--batch_size", "1", "--model_config", "small", "--cp_layout", "zigzag", "--stop_at", "4"],
            args + ["--save_dir", str(cut), "--resume"],                         # finished: nothing to do
            args + ["--save_dir", str(cut), "--resume", step3, "--stop_at", "2"],  # past --stop_at: same
            args + ["--save_dir", str(zigzag), "--resume", step3, "--cp_layout", "zigzag"],
            TRAIN_ARGS + ["--save_dir", str(dp2), "--resume", step3, "--cp_size", "1", "--batch_size", "1"]]
    ranks = run_ranks(_train_rank, 2, args=(runs,), timeout=300)
    assert [[code for code, _ in rank] for rank in ranks] == [[0, 0, 0, 2, 2, 0, 0, 0, 0]] * 2, ranks[0]
    out = [text for _, text in ranks[0]]
    assert (cut / "step_0000003" / "trainer_state.pt").is_file()
    assert (cut / "latest").read_text().strip() == "step_0000006"
    uninterrupted, resumed = _losses(full), _losses(cut)
    assert [s for s, _ in uninterrupted] == list(range(1, 7))
    assert resumed == uninterrupted, f"resumed {resumed}\nuninterrupted {uninterrupted}"
    assert uninterrupted[-1][1] < uninterrupted[0][1]
    from safetensors.torch import load_file
    a, b = load_file(full / "step_0000006" / "model.safetensors"), load_file(cut / "step_0000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run's summary and time_s continue the whole run's (the log holds steps 1-3)
    times = [r["time_s"] for r in read_log(cut / "loss.jsonl")]
    assert times == sorted(times), times
    assert "mean of the first 1 steps" in out[2] and "(6 steps," in out[2], out[2]
    # conflicting arguments: every one named with both values, nothing touched
    for line in ["--optimizer: checkpoint 'adamw', given 'sgd'", "--seq_len: checkpoint 96, given 64",
                 "--steps: checkpoint 6, given 4", "--model_config: checkpoint 'tiny' ({head_dim: 32",
                 "--batch_size x dp (sequences per step): checkpoint 2 x 1, given 1 x 1"]:
        assert line in out[4], out[4]
    assert "cp_layout" not in out[4] and "stop_at" not in out[4]
    assert "nothing to do" in out[5] and "--steps 6" in out[5] and ": saved " not in out[5]
    assert "nothing to do" in out[6] and "--stop_at 2" in out[6] and ": saved " not in out[6]
    assert _losses(cut) == uninterrupted and (cut / "latest").read_text().strip() == "step_0000006"
    # the command line's CP layout wins over the checkpoint's; CP=2 -> DP=2 keeps the sequences per step
    assert json.loads((zigzag / "step_0000006" / "config.json").read_text())["cp_layout"] == "zigzag"
    # (steps compared exactly, losses approximately: pytest >= 9.2's approx takes no nested pairs)
    for run, rel in ((zigzag, 1e-4), (dp2, 1e-2)):     # the DP mean weighs tokens differently
        steps, losses = zip(*_losses(run))
        assert list(steps) == [s for s, _ in uninterrupted[3:]], (run.name, steps)
        assert list(losses) == pytest.approx([loss for _, loss in uninterrupted[3:]], rel=rel), run.name
    assert "mean of the first 1 steps after step 3" in out[7] and "(3 steps," in out[7], out[7]
    # saved checkpoints end documents where the tokenizer does, so generate() stops there
    config = json.loads((full / "step_0000006" / "config.json").read_text())
    generation = json.loads((full / "step_0000006" / "generation_config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == generation["eos_token_id"] == 256
    assert generation["pad_token_id"] == 256 and config.get("pad_token_id") is None


def test_train_cli_rejects_a_cp_size_below_one(capsys):
    import train_cp_real
    with pytest.raises(SystemExit) as excinfo:
        train_cp_real.get_args(["--cp_size", "0"])
    assert excinfo.value.code == 2 and "argument --cp_size: must be >= 1, got 0" in capsys.readouterr().err


def test_model_config_from_a_checkpoint_dir_takes_cp_fields_from_the_caller(tmp_path):
    """A checkpoint's config.json holds cp_layout: the scripts' own --cp_size / --cp_layout win."""
    from fla_cp.models import GatedDeltaNetCPConfig
    from fla_cp.utils.configs import model_config_kwargs
    GatedDeltaNetCPConfig(**model_config_kwargs("tiny", 257), cp_size=2, cp_layout="zigzag").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["cp_layout"] == "zigzag"
    (tmp_path / "cfg.json").write_text(json.dumps({"hidden_size": 96, "cp_size": 4, "cp_layout": "zigzag"}))
    for spec in (tmp_path, tmp_path / "cfg.json"):
        config = GatedDeltaNetCPConfig(**model_config_kwargs(str(spec), 257), cp_size=1, cp_layout="contiguous")
        assert (config.cp_size, config.cp_layout) == (1, "contiguous")
    assert config.hidden_size == 96


def torchrun(script: str, nproc: int, *args, timeout=300, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(SCRIPTS / script), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def test_train_cli_torchrun_ctrl_c(tmp_path):
    """The CLI under torchrun (CP=2, gloo): trains with a progress bar and a loss log; SIGINT to the
    whole process group (what a terminal's Ctrl-C does) saves a checkpoint and exits cleanly."""
    import signal
    import time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPTS / "train_cp_real.py"), "--cp_size", "2", "--model_config", "tiny", "--seq_len", "64",
           "--steps", "100000", "--save_dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(read_log(tmp_path / "loss.jsonl")) < 3:
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "interrupted at step" in out, err[-3000:]
    assert "world 2 = dp 1 x cp 2 | backend gloo" in out
    assert "loss=" in err and "tok_s=" in err and "peak_mem=" in err          # tqdm on rank 0
    assert all(0 < r["loss"] < 10 for r in read_log(tmp_path / "loss.jsonl"))
    saved = (tmp_path / "latest").read_text().strip()
    step = int(saved.split("_")[1])
    assert step == read_log(tmp_path / "loss.jsonl")[-1]["step"]
    assert (tmp_path / saved / "model.safetensors").is_file() and (tmp_path / saved / "rng_rank1.pt").is_file()
    # torchrun itself reports the signal (SignalException); the training ranks must not crash
    assert "KeyboardInterrupt" not in err and 'train_cp_real.py", line' not in err, err[-3000:]


# ----------------------------------------------------------------------------------------------
# benchmark_memory.py
# ----------------------------------------------------------------------------------------------
def test_benchmark_memory_cp1_then_cp2(tmp_path):
    """cp_size=1 baseline (one length out of memory under an address-space cap), then CP=2 under
    torchrun: the table, the JSON, the reduction against the saved baseline, the plot."""
    res = tmp_path / "results"
    one = subprocess.run([sys.executable, str(SCRIPTS / "benchmark_memory.py"), "--cp_size", "1", "--seq_lens",
                          "256,262144", "--model_config", "tiny", "--mem_limit_gb", "3", "--results_dir", str(res)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    rows = json.loads((res / "memory_cpu_cp1.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["OK", "OOM"], rows
    assert rows[0]["saved_bytes"] > 0 and rows[0]["peak_bytes"] > rows[0]["step_peak_bytes"] > 0
    assert "Seq Len | Local Chunk | Model" in one.stdout and "| OOM " in one.stdout

    two = torchrun("benchmark_memory.py", 2, "--cp_size", "2", "--seq_lens", "256", "--model_config", "tiny",
                   "--results_dir", str(res), "--plot", str(tmp_path / "mem.png"))
    assert two.returncode == 0, two.stderr[-3000:]
    run = json.loads((res / "memory_cpu_cp2.json").read_text())
    (row,) = run["results"]
    assert row["status"] == "OK" and row["local_len"] == 128 and len(row["saved_bytes_per_rank"]) == 2
    reduction = rows[0]["saved_bytes"] / row["saved_bytes"]
    assert 1.8 < reduction < 2.2, reduction            # activations scale with the local chunk
    assert f"{reduction:.2f}x act" in two.stdout
    assert (tmp_path / "mem.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------
# bench_op.py
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow      # ~36 s on 2 cores; the Triton paths it runs are covered by the op tests
def test_bench_op_smoke():
    """bench_op.py --smoke: the GPU benchmark's code paths on CPU, FLA's chunk and CP kernels and ours
    in Triton's interpreter (~45 s on 2 cores). A row per (P, mode), FLA's CP column filled, err
    (outputs and gradients of every timed rank vs FLA's plain op on the whole T) within fp32 rounding."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_op.py"), "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert "MEAN NOTHING" in lines[0]                      # nobody mistakes the times for a benchmark
    header = max(i for i, line in enumerate(lines) if line.lstrip().startswith("shape |"))
    rows = [[c.strip() for c in line.split("|")] for line in lines[header + 2:] if "|" in line]
    assert sorted((r[2], r[3]) for r in rows) == sorted((P, m) for P in "124" for m in ("fwd", "fwd+bwd")), rows
    for shape, T, P, mode, t_full, t_ours, t_fla_cp, *_, err in rows:
        assert (shape, T) == ("tiny", "256")
        assert t_fla_cp != "n/a", res.stdout + res.stderr[-3000:]
        assert float(err) <= 1e-4, (P, mode, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for real")
@pytest.mark.slow      # ~14 s: gpu_check.sh's refusals (its groups are exercised on a GPU only)
def test_gpu_check_groups_and_no_gpu(tmp_path):
    """gpu_check.sh parses, refuses an unknown group before doing anything, and without CUDA says so
    and fails (exit 1) instead of reporting a pass."""
    script = str(ROOT / "scripts" / "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path)}
    bad = subprocess.run(["bash", script, "op", "benchmark"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown group 'benchmark'" in bad.stdout
    run = subprocess.run(["bash", script, "op"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "no CUDA device" in run.stdout, run.stdout + run.stderr


def test_summary_table_is_shared_and_fails_unless_every_step_passed():
    """gpu_check.sh and run_cp_tests.sh print their summary with scripts/_summary.sh: a row per step,
    and a non-zero status when any step did not pass (or none ran)."""
    for script in ("gpu_check.sh", "run_cp_tests.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert "source scripts/_summary.sh" in text and "summary_table " in text and "for i in" not in text
        assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=False).returncode == 0
    for statuses, code in [(["PASS", "PASS"], 0), (["PASS", "FAIL (exit 1)"], 1), (["TIMEOUT"], 1), ([], 1)]:
        names = " ".join(f"step_{i}" for i in range(len(statuses)))
        status = " ".join(f"'{s}'" for s in statuses)
        times = " ".join("3s" for _ in statuses)
        cmd = (f"source scripts/_summary.sh; NAMES=({names}); STATUS=({status}); TIMES=({times}); "
               f"summary_table 10; echo \"rc=$?\"")
        res = subprocess.run(["bash", "-uc", cmd], cwd=ROOT, capture_output=True, text=True, timeout=30,
                             check=False)
        assert res.stdout.rstrip().endswith(f"rc={code}") and res.stderr == "", res
        rows = [line for line in res.stdout.splitlines() if line.startswith("  step_")]
        assert [line.split(None, 1)[1].rsplit(None, 1)[0] for line in rows] == statuses, res.stdout
        assert all(line[2:12] == f"step_{i}".ljust(10) for i, line in enumerate(rows))


def test_resume_compares_what_model_tokenizer_and_data_stand_for(tmp_path):
    """--data / --model_config are compared by content on resume: the same corpus or model spelled
    another way resumes; another corpus under the same name, or another model, is refused."""
    import argparse

    import train_cp_real
    from fla_cp.models import GatedDeltaNetCPConfig
    from fla_cp.utils.configs import model_config_kwargs
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("one document " * 20)
    (tmp_path / "b" / "notes.txt").write_text("another, longer document " * 20)
    GatedDeltaNetCPConfig(**model_config_kwargs("tiny", 257), pad_token_id=3).save_pretrained(tmp_path / "ckpt")
    tok = ByteTokenizer()

    def identity(data, model_config="tiny"):
        args = argparse.Namespace(data=str(data), model_config=model_config)
        return args, train_cp_real.run_identity(args, tok, Corpus(args.data))

    saved_args, saved = identity(tmp_path / "a" / "notes.txt")
    extra = {"args": {**vars(saved_args), "tokenizer": "byte"}, "dp_size": 1, "identity": saved}

    def conflicts(data, model_config="tiny"):
        args, ident = identity(data, model_config)
        args = argparse.Namespace(**{**extra["args"], **vars(args)})
        return train_cp_real.resume_conflicts(extra, args, 1, ident)

    assert "pad_token_id" not in model_config_kwargs(str(tmp_path / "ckpt"), 257)   # the tokenizer decides
    assert conflicts(tmp_path / "b" / ".." / "a" / "notes.txt") == []          # same file, other spelling
    assert conflicts(tmp_path / "a" / "notes.txt", str(tmp_path / "ckpt")) == []   # tiny, saved as a checkpoint
    (msg,) = conflicts(tmp_path / "b" / "notes.txt")
    assert msg.startswith("--data:") and "1 documents, 260 bytes" in msg and "500 bytes" in msg, msg
    (msg,) = conflicts(tmp_path / "a" / "notes.txt", "small")
    assert msg.startswith("--model_config:") and "hidden_size: 64" in msg and "hidden_size: 256" in msg, msg


# ----------------------------------------------------------------------------------------------
# hybrid presets (GDN + softmax attention) in train_cp_real.py
# ----------------------------------------------------------------------------------------------
def test_train_cli_hybrid_tiny_cp2_trains_saves_and_resumes(tmp_path):
    """--model_config hybrid-tiny (3 GDN layers + 1 attention layer) trains under CP=2 and resumes from its
    checkpoint: the resume compares the resolved config, `attn` included."""
    from _dist import run_ranks
    args = ["--model_config", "hybrid-tiny", "--seq_len", "64", "--batch_size", "1", "--steps", "2", "--warmup", "1",
            "--threads", "1", "--cp_size", "2", "--save_dir", str(tmp_path)]
    ranks = run_ranks(_train_rank, 2, args=([args + ["--stop_at", "1"], args + ["--resume"]],), timeout=120)
    assert [[code for code, _ in rank] for rank in ranks] == [[0, 0]] * 2, ranks[0]
    assert "world 2 = dp 1 x cp 2" in ranks[0][0][1] and "resumed from" in ranks[0][1][1], ranks[0]
    losses = _losses(tmp_path)
    assert [s for s, _ in losses] == [1, 2] and all(0 < loss < 10 for _, loss in losses), losses
    config = json.loads((tmp_path / "step_0000002" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["attn"]["layers"] == [3], config["attn"]
