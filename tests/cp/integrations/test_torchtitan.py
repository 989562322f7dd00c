"""fla_cp's torchtitan plugin (fla_cp.integrations.torchtitan): CP runs of torchtitan's Trainer match one process.

The end-to-end cases launch `torchrun -m torchtitan.train --module fla_cp.integrations.torchtitan` (gloo on
CPU) through `fla_cp.integrations.torchtitan.check`, the same code as `scripts/torchtitan_check.sh`:
a seed checkpoint, one process, then CP runs from it, compared on the logged loss and grad norm.
"""
import json
import subprocess
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchtitan", reason="the torchtitan extra is not installed (pip install -e '.[torchtitan]')")

from fla_cp import data as fla_cp_data  # noqa: E402
from fla_cp.integrations.torchtitan import check  # noqa: E402
from fla_cp.integrations.torchtitan.batch import CPBatch, as_cp_batch, build_cp_batch, document_boundaries  # noqa: E402
from fla_cp.integrations.torchtitan.data import IGNORE_INDEX, PackedTextDataset, piece_sample  # noqa: E402


# ------------------------------------------------------------------ the batch and the data (no torchrun)
def test_document_boundaries_mark_documents_and_rows():
    positions = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])     # row 2 starts mid-document: a new piece
    assert document_boundaries(positions) == [0, 3, 5, 7, 10]
    assert document_boundaries(torch.arange(6).expand(2, 6)) == [0, 6, 12]


def test_single_process_batch_and_errors():
    batch = build_cp_batch(torch.tensor([[0, 1, 0, 1, 2]]), group=None, layout="zigzag", verify_agreement=False)
    assert batch.cp is None and batch.cu_seqlens.tolist() == [0, 2, 5]
    assert as_cp_batch(batch.masks(), "x") is batch
    with pytest.raises(ValueError, match="CPLayer: attention_masks must be an fla_cp CPBatch"):
        as_cp_batch({"deltanet": None}, "CPLayer")
    assert isinstance(as_cp_batch(batch, "x"), CPBatch)


def test_piece_sample_never_labels_across_documents():
    inputs, labels = piece_sample([5, 6, 7, 8, 9, 10], [2, 3, 1])
    assert inputs["input"].tolist() == [5, 6, 7, 8, 9, 10]
    assert inputs["positions"].tolist() == [0, 1, 0, 1, 2, 0]
    assert labels.tolist() == [6, IGNORE_INDEX, 8, 9, IGNORE_INDEX, IGNORE_INDEX]


def _batches(dataset, B, steps):
    it = iter(dataset)
    return [[next(it) for _ in range(B)] for _ in range(steps)]


def test_dp_ranks_share_one_global_batch_and_resume():
    """dp rank i gets rows [iB, (i+1)B) of the batch one process with dp·B rows gets; the state resumes."""
    corpus, tok = fla_cp_data.Corpus(None), fla_cp_data.ByteTokenizer()
    one = _batches(PackedTextDataset(corpus, tok, 64, 4, 0, 1), 4, 3)
    ranks = [_batches(PackedTextDataset(corpus, tok, 64, 2, r, 2), 2, 3) for r in range(2)]
    for step in range(3):
        together = ranks[0][step] + ranks[1][step]
        for (x, y), (xr, yr) in zip(one[step], together):
            assert torch.equal(x["input"], xr["input"]) and torch.equal(y, yr)
    first = PackedTextDataset(corpus, tok, 64, 2, 1, 2)
    _batches(first, 2, 1)
    resumed = PackedTextDataset(corpus, tok, 64, 2, 1, 2)
    resumed.load_state_dict(first.state_dict())
    for (x, y), (xr, yr) in zip(_batches(resumed, 2, 2)[1], ranks[1][2]):
        assert torch.equal(x["input"], xr["input"]) and torch.equal(y, yr)


def test_parallelize_refuses_what_it_does_not_support():
    from fla_cp.integrations.torchtitan.parallelize import cp_module_error, unsupported_parallelism
    dims = dict(tp_enabled=False, pp_enabled=False, ep_enabled=False, dp_replicate_enabled=False)
    ok = SimpleNamespace(spmd_backend="partial_dtensor")
    assert unsupported_parallelism(SimpleNamespace(**dims), ok) is None
    other_backend = SimpleNamespace(spmd_backend="spmd_types")
    assert "spmd_backend='spmd_types'" in unsupported_parallelism(SimpleNamespace(**dims), other_backend)
    for key in dims:
        error = unsupported_parallelism(SimpleNamespace(**dict(dims, **{key: True})), ok)
        assert error and "not supported" in error
    # torchtitan's own Qwen3.5 modules (its GatedDeltaNet, flex attention) are refused: they can't split
    from fla_cp.integrations.torchtitan.qwen3_5 import FLAVORS, with_cp_layers
    own = FLAVORS["tiny"]()
    with torch.device("meta"):
        gdn_block, attention_block = own.layers[0].build(), own.layers[3].build()
        ours = with_cp_layers(own).layers
        cp_blocks = torch.nn.ModuleList([ours[0].build(), ours[3].build()])
    assert "not fla_cp's CPGatedDeltaNet" in cp_module_error(gdn_block)
    assert "not fla_cp's CPInnerAttention" in cp_module_error(attention_block)
    assert cp_module_error(cp_blocks) is None


# ------------------------------------------------------------------ torchtitan's Trainer under torchrun
def _assert_rows(rows):
    ok = check.print_table(rows)
    assert ok, "see the table above"


# the default run checks Qwen3.5 here and the hybrid GatedDeltaNet at CP = 2 against the HF model
# (test_torchtitan_gdn_model.py); the slow run does all three configs at CP = 2 and dp2 x CP2
@pytest.mark.parametrize("config", ["qwen3_5_tiny"])
def test_cp2_matches_one_process(config, tmp_path):
    _assert_rows(check.check_config(config, tmp_path, runs=("cp2",), steps=2))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["qwen3_5_tiny", "gdn_tiny", "gdn_hybrid_tiny"])
def test_cp2_and_dp2xcp2_match_one_process(config, tmp_path):
    _assert_rows(check.check_config(config, tmp_path, runs=("cp2", "dp2cp2"), steps=3))


@pytest.mark.slow
def test_layouts_checkpointing_and_compile_match_one_process(tmp_path):
    """CP=2 with the contiguous layout, full / selective activation checkpointing (the CP collectives
    re-run on recompute) and per-token compile (aot_eager: no C++ toolchain needed) vs plain one process."""
    seed = check.seed_checkpoint("qwen3_5_tiny", tmp_path)
    reference = check.train_from_seed("one", "qwen3_5_tiny", seed, tmp_path, 2, 2)
    for extra in (["--cp_layout", "contiguous"], ["activation-checkpoint:full"], ["activation-checkpoint:selective"],
                  ["--compile.enable", "--compile.backend", "aot_eager"]):
        run = check.train_from_seed("cp2", "qwen3_5_tiny", seed, tmp_path, 2, 2, extra)
        ok, e1, e2 = check.compare(run, reference)
        assert ok, f"{extra}: step-1 error {e1}, later {e2}; log {run.log}"


@pytest.mark.slow
def test_the_check_fails_on_other_data(tmp_path):
    """The comparison can fail: CP=2 fed another document order differs from one process at step 1."""
    seed = check.seed_checkpoint("gdn_tiny", tmp_path)
    reference = check.train_from_seed("one", "gdn_tiny", seed, tmp_path, 2, 1)
    run = check.train_from_seed("cp2", "gdn_tiny", seed, tmp_path, 2, 1, ["--dataloader.seed", "1"])
    ok, e1, _ = check.compare(run, reference)
    assert run.ok and not ok and e1 > 1e-3


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    """CP=2 checkpoints at step 2 (model, optimizer, data position) and resumes: step 3 is the same."""
    seed = check.seed_checkpoint("qwen3_5_tiny", tmp_path)
    straight = check.train_from_seed("cp2", "qwen3_5_tiny", seed, tmp_path, 2, 3)
    ok, _ = check.torchtitan_train(2, "qwen3_5_tiny", [
        "--checkpoint.enable", "--checkpoint.initial_load_path", str(seed.resolve()), "--checkpoint.interval", "2",
        "--dump_folder", str(tmp_path / "resume"), "--training.steps", "2", "--training.local_batch_size", "4",
        "--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"],
        tmp_path / "first.log")
    assert ok
    metrics = tmp_path / "resumed.jsonl"
    ok, _ = check.torchtitan_train(2, "qwen3_5_tiny", [
        "--checkpoint.enable", "--checkpoint.interval", "2", "--dump_folder", str(tmp_path / "resume"),
        "--training.steps", "3", "--training.local_batch_size", "4", "--metrics_file", str(metrics),
        "--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"],
        tmp_path / "second.log")
    assert ok
    resumed = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0] == straight.metrics[2]


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--cp_layout", "diagonal"], "--cp_layout must be one of"),
    (["--cp_backend", "cuda"], "--cp_backend must be auto, triton or torch"),
    (["--validator.enable"], "--validator.enable is not supported"),
    (["--parallelism.spmd_backend", "spmd_types"], "spmd_backend='spmd_types'"),
])
def test_bad_settings_fail_on_every_rank_with_a_clear_error(flags, message, tmp_path):
    log = tmp_path / "bad.log"
    ok, _ = check.torchtitan_train(2, "qwen3_5_tiny", ["--parallelism.context_parallel_degree", "2",
                                                       "--dump_folder", str(tmp_path / "d"), *flags], log, timeout=300)
    text = log.read_text()
    assert not ok and text.count(message) >= 2, text[-3000:]       # both ranks raised it


def test_check_script_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        check.main(["--help"])
    assert exit_.value.code == 0 and "--configs" in capsys.readouterr().out
    script = (check.Path(__file__).parents[3] / "scripts" / "torchtitan_check.sh").read_text()
    assert "-m fla_cp.integrations.torchtitan.check" in script
    assert subprocess.run(["bash", "-n", str(check.Path(__file__).parents[3] / "scripts" / "torchtitan_check.sh")]
                          ).returncode == 0


def test_every_config_builds_with_the_cp_modules():
    """Each `--config` function gives a CPTrainer config whose model (built on meta, the 0.8B flavor too)
    holds only fla_cp's CP token mixers, with the settings parallelize_cp accepts."""
    from fla_cp.integrations.torchtitan import config_registry
    from fla_cp.integrations.torchtitan.parallelize import cp_module_error
    from fla_cp.integrations.torchtitan.trainer import CPTrainer
    names = ["qwen3_5_tiny", "qwen3_5_0_8b", "gdn_tiny", "gdn_hybrid_tiny"]
    for name in names:
        config = getattr(config_registry, name)()
        assert isinstance(config, CPTrainer.Config) and config.parallelism.spmd_backend == "partial_dtensor"
        assert not config.validator.enable
        with torch.device("meta"):
            model = config.model_spec.model.build()
        assert cp_module_error(model) is None, name
        assert config.loss.loss_fn.global_vocab_size == config.model_spec.model.vocab_size


def test_packed_loader_refuses_workers():
    from fla_cp.integrations.torchtitan.data import ByteTokenizer, PackedTextDataLoader
    config = PackedTextDataLoader.Config(num_workers=2)
    with pytest.raises(ValueError, match="--dataloader.num_workers must be 0"):
        PackedTextDataLoader(config, dp_world_size=1, dp_rank=0, tokenizer=ByteTokenizer(), seq_len=8,
                             local_batch_size=1)
