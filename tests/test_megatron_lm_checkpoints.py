"""Checkpoints written by Megatron-LM's own training code (tests/fixtures/megatron_lm/), merged.

Every fixture holds Megatron-LM's iterations 1 and 2; each is merged (SMA, weights 1/2) once per
module and compared with a reference computed here from the inputs alone: torch's own DCP reader
(``merge_reference``) for torch_dist, plain ``torch.load`` of the rank files for legacy ``torch``,
combined with plain torch ops. Fast, single process.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from merge_reference import load_full, model_keys, reference_merge
from megatron_merge import cli
from megatron_merge.formats.distributed_optimizer import PARAM_ALIGNMENT, is_bucket_master_key
from megatron_merge.formats.dcp import TorchDistCheckpoint
from megatron_merge.offline import merge_checkpoints

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "megatron_lm"
TORCH_DIST = [
    "torch_dist_tp2_bf16_distopt",
    "torch_dist_tp2_fp32",
    "torch_dist_dp2_bf16_distopt",
    "torch_dist_dp2_bf16_distopt_fully_reshardable",
]
LEGACY = ["torch_pp2_bf16_distopt", "torch_pp2_vpp2_bf16", "torch_ep2_moe_bf16_distopt"]
WEIGHTS = [0.5, 0.5]


def inputs(case: str) -> list[Path]:
    return [FIXTURES / case / "iter_0000001", FIXTURES / case / "iter_0000002"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """case -> merged output directory (merged once per module)."""
    root = tmp_path_factory.mktemp("megatron-lm-merged")
    done: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in done:
            merge_checkpoints(inputs(case), root / case)
            done[case] = root / case
        return done[case]

    return get


def _average(tensors: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for tensor, weight in zip(tensors, WEIGHTS):
        acc = acc + tensor.to(torch.float32) * weight
    return acc.to(tensors[0].dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of fp32 tensors (the gaps of a bucket may hold NaN bit patterns)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _tensor_keys(path: Path) -> dict[str, TensorStorageMetadata]:
    md = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: m for k, m in md.items() if isinstance(m, TensorStorageMetadata)}


# ================================================================================================
# torch_dist
# ================================================================================================


@pytest.mark.parametrize("case", TORCH_DIST)
def test_torch_dist_model_weights_equal_an_independent_average(merged, case):
    out = merged(case)
    keys = model_keys(inputs(case)[-1])
    assert any("linear_qkv.weight" in k for k in keys)
    for key in keys:
        assert torch.equal(load_full(out, key), reference_merge(inputs(case), key, WEIGHTS)), key


@pytest.mark.parametrize("case", ["torch_dist_tp2_bf16_distopt", "torch_dist_dp2_bf16_distopt"])
def test_dp_reshardable_bucket_masters_are_merged_and_moments_come_from_the_newest(merged, case):
    out = merged(case)
    newest = inputs(case)[-1]
    buckets = [k for k in _tensor_keys(newest) if is_bucket_master_key(k)]
    assert buckets, "the fixture has no dp_reshardable buckets"
    ckpt = TorchDistCheckpoint(newest)
    for key in buckets:
        result = load_full(out, key)
        expected = _average([load_full(p, key) for p in inputs(case)])
        newest_values = load_full(newest, key)
        for chunk in ckpt.chunks(key):
            (start,), (size,) = chunk.offsets, chunk.sizes
            piece = slice(start, start + size)
            # parameter pieces start 64-aligned (or continue one across a DP shard); gaps do not
            if start % PARAM_ALIGNMENT == 0:
                assert torch.equal(result[piece], expected[piece]), (key, start)
        assert not torch.equal(result, newest_values), "bucket masters were copied, not merged"
        for moment in ("exp_avg", "exp_avg_sq"):
            moment_key = key[: -len("param")] + moment
            assert _same_bits(load_full(out, moment_key), load_full(newest, moment_key))
    record = json.loads((out / "merge.json").read_text())
    assert sorted(record["optimizer_merged"]) == sorted(buckets)


def test_bucket_gaps_are_exactly_the_elements_that_hold_no_parameter(merged):
    """DP=2, TP=1: the merged (non-gap) bucket elements add up to the model's parameter count,
    and every gap is copied from the newest input bit for bit."""
    case = "torch_dist_dp2_bf16_distopt"
    out, newest = merged(case), inputs(case)[-1]
    from megatron_merge.formats.distributed_optimizer import bucket_gap_chunks

    ckpt = TorchDistCheckpoint(newest)
    (key,) = [k for k in ckpt.keys() if is_bucket_master_key(k)]
    gaps = bucket_gap_chunks(ckpt, key)
    parameter_elements = sum(c.sizes[0] for c in ckpt.chunks(key) if c.offsets not in gaps)
    model_elements = sum(m.size.numel() for k, m in _tensor_keys(newest).items()
                         if k in model_keys(newest))
    assert gaps and parameter_elements == model_elements
    result, newest_values = load_full(out, key), load_full(newest, key)
    for start, in gaps:
        size = ckpt.chunk_at(key, (start,)).sizes[0]
        assert _same_bits(result[start:start + size], newest_values[start:start + size])


def test_fully_reshardable_masters_equal_the_merged_weights_and_moments_come_from_the_newest(merged):
    case = "torch_dist_dp2_bf16_distopt_fully_reshardable"
    out, newest = merged(case), inputs(case)[-1]
    keys = _tensor_keys(newest)
    masters = [k for k in keys if k.startswith("optimizer.state.param.")]
    assert masters
    for key in masters:
        assert torch.equal(load_full(out, key), reference_merge(inputs(case), key, WEIGHTS)), key
        # Megatron-LM's bf16 weight is its fp32 master rounded: the merged pair still agrees
        weight = key[len("optimizer.state.param."):]
        assert torch.allclose(load_full(out, key).to(torch.bfloat16).float(),
                              load_full(out, weight).float(), atol=1e-2, rtol=1e-2), weight
    for key in (k for k in keys if k.startswith("optimizer.state.exp_avg")):
        assert torch.equal(load_full(out, key), load_full(newest, key)), key
    record = json.loads((out / "merge.json").read_text())
    assert sorted(record["optimizer_merged"]) == sorted(masters)


def test_different_bucket_layouts_are_refused_with_the_key_named(tmp_path, capsys):
    """A DP=2 run's buckets cannot be matched element by element with a TP=2 run's."""
    older = inputs("torch_dist_dp2_bf16_distopt")[0]
    newest = inputs("torch_dist_tp2_bf16_distopt")[-1]
    out = tmp_path / "out"
    code = cli.main([str(older), str(newest), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    assert "error:" in err and "bucket layout differs" in err and "bucket_idx_0.param" in err


def test_torch_dist_model_only(tmp_path):
    out = tmp_path / "out"
    merge_checkpoints(inputs("torch_dist_tp2_bf16_distopt"), out, model_only=True)
    assert not any(k.startswith("optimizer.") for k in _tensor_keys(out))


# ================================================================================================
# legacy torch
# ================================================================================================


def _load(path: Path) -> dict:
    # Our own committed fixtures, read by the reference only: Megatron-LM pickles an
    # argparse.Namespace with enums into every rank file.
    return torch.load(path, map_location="cpu", weights_only=False)


def _rank_files(checkpoint: Path, name: str) -> list[Path]:
    return sorted(p.relative_to(checkpoint) for p in checkpoint.glob(f"mp_rank_*/{name}"))


@pytest.mark.parametrize("case", LEGACY)
def test_legacy_model_weights_equal_an_independent_average(merged, case):
    out = merged(case)
    files = _rank_files(inputs(case)[-1], "model_optim_rng.pt")
    assert len(files) == 2
    checked = 0
    for name in files:
        result, sources = _load(out / name), [_load(p / name) for p in inputs(case)]
        entries = [k for k in result if k.startswith("model")]
        if case == "torch_pp2_vpp2_bf16":
            assert entries == ["model0", "model1"]
        for entry in entries:
            for key, value in result[entry].items():
                if not (isinstance(value, torch.Tensor) and value.dtype.is_floating_point):
                    continue
                assert torch.equal(value, _average([s[entry][key] for s in sources])), (name, key)
                checked += 1
        assert result["iteration"] == 2
    assert checked > 10


@pytest.mark.parametrize("case", ["torch_pp2_bf16_distopt", "torch_ep2_moe_bf16_distopt"])
def test_legacy_distrib_optim_masters_are_merged_and_moments_come_from_the_newest(merged, case):
    out = merged(case)
    files = _rank_files(inputs(case)[-1], "distrib_optim.pt")
    assert len(files) == 2
    checked = 0
    for name in files:
        result, sources = _load(out / name), [_load(p / name) for p in inputs(case)]
        if case == "torch_ep2_moe_bf16_distopt":  # chained: dense and expert optimizers
            assert isinstance(result, list) and len(result) == 2
        # [optimizer][gbuf][dtype] -> {"param", "exp_avg", "exp_avg_sq", ...}
        for o, optimizer in enumerate(result if isinstance(result, list) else [result]):
            source_optimizers = [s[o] if isinstance(s, list) else s for s in sources]
            if optimizer is None:  # state gathered on another data-parallel rank's file
                assert all(s is None for s in source_optimizers)
                continue
            for gbuf in (k for k in optimizer if isinstance(k, int)):
                for dtype, state in optimizer[gbuf].items():
                    inputs_state = [s[gbuf][dtype] for s in source_optimizers]
                    assert torch.equal(state["param"], _average([s["param"] for s in inputs_state]))
                    assert not torch.equal(state["param"], inputs_state[-1]["param"])
                    for moment in ("exp_avg", "exp_avg_sq"):
                        assert torch.equal(state[moment], inputs_state[-1][moment]), name
                    checked += 1
    assert checked >= 2
    record = json.loads((out / "merge.json").read_text())
    assert {n: s for n, s in record["optimizer_merged"].items() if n.endswith("distrib_optim.pt")}
    assert not any(n.endswith("model_optim_rng.pt") for n in record["optimizer_merged"])


def test_legacy_model_only_leaves_out_the_distributed_optimizer(tmp_path):
    case = "torch_pp2_bf16_distopt"
    out = tmp_path / "out"
    merge_checkpoints(inputs(case), out, model_only=True)
    assert not list(out.glob("mp_rank_*/distrib_optim.pt"))
    for name in _rank_files(inputs(case)[-1], "model_optim_rng.pt"):
        result = _load(out / name)
        assert "optimizer" not in result and "model" in result


def test_fixtures_are_megatron_lm_checkpoints():
    """The fixtures are what Megatron-LM writes: tracker file, iter_* directories, its args."""
    for case in TORCH_DIST + LEGACY:
        assert (FIXTURES / case / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    args = _load(inputs("torch_pp2_bf16_distopt")[0] / "mp_rank_00_000" / "model_optim_rng.pt")["args"]
    assert args.use_distributed_optimizer and args.bf16 and args.pipeline_model_parallel_size == 2


# ================================================================================================
# pretrain resumes Megatron-LM's checkpoints (torchrun, 2 processes)
# ================================================================================================

# The fixtures' model in `pretrain`'s config: Megatron-LM's GPT defaults (learned positions,
# LayerNorm, GELU, biases, tied embeddings) and the fixtures' shape; vocabulary 257 padded as
# Megatron-LM pads it (128 * TP).
MEGATRON_LM_MODEL = (
    "model.num_layers=2", "model.hidden_size=16", "model.num_attention_heads=2",
    "model.ffn_hidden_size=32", "model.position_embedding_type=learned_absolute",
    "model.normalization=LayerNorm", "model.activation=gelu", "model.add_bias_linear=true",
    "model.untie_embeddings_and_output_weights=false",
    "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
    "train.train_iters=4", "train.eval_interval=null", "train.precision=bf16",
    "optimizer.lr=1e-3", "optimizer.min_lr=1e-4", "scheduler.style=cosine", "scheduler.warmup_iters=1",
    "logging.log_interval=1", "checkpoint.save_interval=null", "merge.enabled=false",
)


def _resume(tmp_path, case: str, *overrides: str, check: bool = True):
    from helpers import run_pretrain

    return run_pretrain(tmp_path / "run", 2, [*MEGATRON_LM_MODEL, f"checkpoint.load={FIXTURES / case}",
                                              *overrides], fast=False, check=check, timeout=300)


def test_pretrain_resumes_a_megatron_lm_torch_dist_checkpoint(tmp_path):
    """TP=2, bf16, dp_reshardable distributed optimizer: iteration, consumed samples (Megatron-LM's
    args.consumed_train_samples), RNG and optimizer come back; training continues finitely."""
    run = _resume(tmp_path, "torch_dist_tp2_bf16_distopt", "parallel.tensor_model_parallel_size=2",
                  "parallel.use_distributed_optimizer=true", "model.make_vocab_size_divisible_by=512")
    (resume,) = [r for r in run.metrics if r.get("event") == "resume"]
    assert resume["iteration"] == 2 and resume["consumed_samples"] == 8
    assert resume["written_by"] == "Megatron-LM" and resume["optimizer_sharding"] == "dp_reshardable"
    assert resume["rng_restored"] and resume["optimizer_restored"]
    steps = [r for r in run.metrics if "loss" in r]
    assert [r["iteration"] for r in steps] == [3, 4]
    assert all(0 < r["loss"] < 10 for r in steps), steps


def test_pretrain_resumes_a_megatron_lm_checkpoint_at_another_tp(tmp_path):
    """Saved by Megatron-LM at TP=2 (fp32), resumed at TP=1, DP=2: megatron-core reshards;
    the RNG is not restored (another layout), the data position and optimizer are."""
    run = _resume(tmp_path, "torch_dist_tp2_fp32", "train.precision=fp32",
                  "model.make_vocab_size_divisible_by=512")
    (resume,) = [r for r in run.metrics if r.get("event") == "resume"]
    assert resume["iteration"] == 2 and resume["consumed_samples"] == 8
    assert resume["written_by"] == "Megatron-LM" and resume["optimizer_restored"]
    assert not resume["rng_restored"]
    steps = [r for r in run.metrics if "loss" in r]
    assert [r["iteration"] for r in steps] == [3, 4]
    assert all(0 < r["loss"] < 10 for r in steps), steps


def test_pretrain_resumes_megatron_lm_fully_reshardable_optimizer_state_at_another_tp(tmp_path):
    """Saved at DP=2 with --dist-ckpt-optim-fully-reshardable, resumed at TP=2: the distributed
    optimizer's model-space state is resharded along with the weights."""
    run = _resume(tmp_path, "torch_dist_dp2_bf16_distopt_fully_reshardable",
                  "parallel.tensor_model_parallel_size=2", "parallel.use_distributed_optimizer=true",
                  "model.make_vocab_size_divisible_by=128")
    (resume,) = [r for r in run.metrics if r.get("event") == "resume"]
    assert resume["iteration"] == 2 and resume["consumed_samples"] == 8
    assert resume["optimizer_sharding"] == "fully_reshardable" and resume["optimizer_restored"]
    steps = [r for r in run.metrics if "loss" in r]
    assert [r["iteration"] for r in steps] == [3, 4]
    assert all(0 < r["loss"] < 10 for r in steps), steps


def test_pretrain_resumes_a_megatron_lm_legacy_distributed_optimizer_checkpoint(tmp_path):
    """PP=2 with distrib_optim.pt: the distributed optimizer's state is read from it."""
    run = _resume(tmp_path, "torch_pp2_bf16_distopt", "parallel.pipeline_model_parallel_size=2",
                  "parallel.use_distributed_optimizer=true", "model.make_vocab_size_divisible_by=128")
    (resume,) = [r for r in run.metrics if r.get("event") == "resume"]
    assert resume["iteration"] == 2 and resume["consumed_samples"] == 8
    steps = [r for r in run.metrics if "loss" in r]
    assert [r["iteration"] for r in steps] == [3, 4]
    assert all(0 < r["loss"] < 10 for r in steps), steps


def test_pretrain_refuses_distrib_optim_without_the_distributed_optimizer(tmp_path):
    run = _resume(tmp_path, "torch_pp2_bf16_distopt", "parallel.pipeline_model_parallel_size=2",
                  "model.make_vocab_size_divisible_by=128", check=False)
    assert run.returncode != 0
    assert "distrib_optim.pt holds the distributed optimizer's state" in run.output
    assert "parallel.use_distributed_optimizer=true" in run.output


# ================================================================================================
# the merge as a run directory: what Megatron-LM's --load and pretrain's checkpoint.load read
# ================================================================================================


@pytest.mark.parametrize("case", ["torch_dist_tp2_bf16_distopt", "torch_pp2_bf16_distopt"])
def test_as_run_dir_writes_iter_n_and_the_tracker_that_megatron_lm_and_pretrain_read(tmp_path, case):
    from pretrain.checkpoint import resolve_checkpoint

    out = tmp_path / "merged-run"
    code = cli.main([str(FIXTURES / case), "--last", "2", "--as-run-dir", "--out", str(out),
                     "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    # Megatron-LM's read_metadata: int(tracker text); then <load>/iter_{N:07d}
    assert int((out / "latest_checkpointed_iteration.txt").read_text().strip()) == 2
    assert (out / "iter_0000002" / "merge.json").is_file()
    assert resolve_checkpoint(out) == (out / "iter_0000002", 2)
    # the checkpoint inside is the merge (same as merging without --as-run-dir)
    plain = tmp_path / "plain"
    merge_checkpoints(inputs(case), plain)
    for a, b in zip(sorted(plain.rglob("*")), sorted((out / "iter_0000002").rglob("*"))):
        assert a.relative_to(plain) == b.relative_to(out / "iter_0000002")
        if a.is_file() and a.name != "merge.json" and a.suffix != ".metadata" and a.name != ".metadata":
            assert a.read_bytes() == b.read_bytes(), a.name


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_SRC"),
                    reason="needs Megatron-LM's source (MEGATRON_LM_SRC, tag core_v0.16.1) and triton")
@pytest.mark.parametrize("case, extra", [
    ("torch_dist_tp2_fp32", []),
    # Megatron-LM itself cannot load distributed-optimizer state on CPUs without TE or apex
    # (DistributedOptimizer.state_dict asserts one Adam step before any step), so these two:
    ("torch_dist_tp2_bf16_distopt", ["--finetune"]),
    ("torch_dist_tp2_bf16_distopt", ["--no-load-optim"]),
], ids=["resume", "finetune", "no-load-optim"])
def test_megatron_lm_loads_the_merge_with_its_own_load(tmp_path, case, extra):
    """Megatron-LM's own pretrain_gpt.py --load OUT (a --as-run-dir merge) continues training."""
    sys.path.insert(0, str(FIXTURES))
    from generate import CASES, COMMON, run_megatron_lm

    out = tmp_path / "merged-run"
    assert cli.main([str(FIXTURES / case), "--last", "2", "--as-run-dir", "--out", str(out), "--no-progress"]) == 0
    flags = [*COMMON, *CASES[case], "--load", str(out), "--exit-on-missing-checkpoint",
             "--train-iters", "4", "--override-opt-param-scheduler", *extra]  # a longer run
    proc = run_megatron_lm(Path(os.environ["MEGATRON_LM_SRC"]), flags, capture_output=True, text=True,
                           timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"successfully loaded checkpoint from {out}" in log
    losses = [float(m) for m in re.findall(r"lm loss: ([0-9.E+-]+)", log)]
    first = 1 if extra == ["--finetune"] else 3
    assert re.search(rf"iteration\s+{first}/\s+4", log) and losses and all(0 < x < 10 for x in losses)
