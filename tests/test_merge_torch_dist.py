"""Offline merging of real megatron-core torch_dist checkpoints.

Fixtures are written by megatron-core's own ``dist_checkpointing.save`` in 2 spawned gloo
processes (this file run as a script), at two layouts of the same global tensors:

* TP=2: matrices split across the 2 ranks (column- and row-parallel), biases and norms
  replicated with ``replica_id``;
* TP=1 (DP=2): every tensor whole on rank 0, rank 1 a replica.

The reference merge here is independent of the package: whole tensors are loaded with torch's
own DCP loader and combined with plain torch ops, then compared bit for bit (``torch.equal``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import free_port, peak_rss_of_merge, run_cli
from pretrain.platform import process_group_teardown

WORLD_SIZE = 2
ITERATIONS = (10, 20, 30, 40)
OPTIMIZER = "optimizer.state."

# key -> (global shape, dtype, tensor-parallel split dim or None for replicated)
TENSORS = {
    "embedding.word_embeddings.weight": ((16, 6), torch.bfloat16, 0),
    "decoder.layers.0.mlp.linear_fc1.weight": ((8, 6), torch.float32, 0),
    "decoder.layers.0.mlp.linear_fc1.bias": ((8,), torch.float32, 0),
    "decoder.layers.0.mlp.linear_fc2.weight": ((6, 8), torch.float32, 1),
    "decoder.final_layernorm.weight": ((6,), torch.float32, None),
    "decoder.layers.0.self_attention.step": ((5,), torch.int64, None),
    "optimizer.state.exp_avg.decoder.layers.0.mlp.linear_fc1.weight": ((8, 6), torch.float32, 0),
    "optimizer.state.fp32_param.embedding.word_embeddings.weight": ((16, 6), torch.float32, 0),
}
MASTER_WEIGHTS = "optimizer.state.fp32_param."  # fp32 master copies: merged like the weights
MERGED_KEYS = [k for k, (_, dtype, _) in TENSORS.items()
               if dtype.is_floating_point and (not k.startswith(OPTIMIZER) or k.startswith(MASTER_WEIGHTS))]
EXTRA_STATE = "decoder.layers.0.self_attention.linear_qkv._extra_state"


def global_tensors(iteration: int, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The global (unsharded) tensors of the checkpoint saved at ``iteration``."""
    tensors = {}
    for position, (key, (shape, dtype, _)) in enumerate(TENSORS.items()):
        gen = torch.Generator().manual_seed(1000 * iteration + position)
        if dtype.is_floating_point:
            value = torch.randn(shape, generator=gen) * 0.02 + 0.001 * iteration
        else:
            value = torch.arange(int(torch.tensor(shape).prod())).reshape(shape) + iteration
        tensors[key] = value.to(dtype)
    if variant == "missing_key":
        del tensors["decoder.final_layernorm.weight"]
    elif variant == "shape":
        tensors["decoder.layers.0.mlp.linear_fc1.weight"] = torch.zeros(10, 6)
    elif variant == "dtype":
        tensors["decoder.layers.0.mlp.linear_fc1.bias"] = tensors["decoder.layers.0.mlp.linear_fc1.bias"].bfloat16()
    elif variant == "nan":
        tensors["decoder.layers.0.mlp.linear_fc2.weight"][2, 7] = float("nan")
    return tensors


# ================================================================================================
# Spawned megatron-core processes (this file run as a script)
# ================================================================================================


def _init_gloo(rank: int, port: int) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    if not torch.cuda.is_available():
        # megatron-core 0.16.1's torch_dist save assumes CUDA in two places that mean nothing on
        # a CPU: FileSystemWriterAsync.preload_tensors calls torch.cuda.synchronize(), and
        # save_state_dict_async_finalize makes its failure flag on torch.cuda.current_device().
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.cuda.current_device = lambda: "cpu"


def _sharded_state_dict(iteration, tp, rank, variant=None, model_only=False, with_data=True):
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    state = {}
    for key, full in global_tensors(iteration, variant).items():
        if model_only and key.startswith(OPTIMIZER):
            continue
        split_dim = TENSORS[key][2]
        if tp == 1 or split_dim is None:
            local = full.clone() if with_data else torch.empty_like(full)
            state[key] = ShardedTensor.from_rank_offsets(key, local, replica_id=rank)
        else:
            local = full.chunk(tp, dim=split_dim)[rank].clone()
            local = local if with_data else torch.empty_like(local)
            state[key] = ShardedTensor.from_rank_offsets(key, local, (split_dim, rank, tp))
    state["rng_state"] = ShardedObject(
        "rng_state", {"rank": rank, "iteration": iteration} if with_data else None, (WORLD_SIZE,), (rank,)
    )
    state["extra_state"] = ShardedObject(
        EXTRA_STATE, io.BytesIO(b"te-extra-%d" % iteration) if with_data else None, (1,), (0,),
        replica_id=rank,
    )
    if with_data:
        state["iteration"] = iteration
        state["args"] = {"tensor_model_parallel_size": tp}
        # non-sharded optimizer entries, as Megatron-LM and pretrain put them in common.pt
        state["opt_param_scheduler"] = {"num_steps": iteration}
        state["optimizer"] = {"param_groups": [{"lr": 1e-3, "params": [0, 1]}]}
    return state


@process_group_teardown()
def _save_worker(rank, port, jobs):
    import torch.distributed as dist

    _init_gloo(rank, port)
    from megatron.core import dist_checkpointing

    for path, iteration, tp, variant in jobs:
        if rank == 0:
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(_sharded_state_dict(iteration, tp, rank, variant), path)
        dist.barrier()


@process_group_teardown()
def _load_worker(rank, port, jobs):
    """Load merged checkpoints with megatron-core at a given layout; save each rank's tensors."""
    _init_gloo(rank, port)
    from megatron.core import dist_checkpointing

    for path, tp, model_only, result_file in jobs:
        template = _sharded_state_dict(ITERATIONS[0], tp, rank, model_only=model_only, with_data=False)
        loaded = dist_checkpointing.load(template, path)
        extra = loaded["extra_state"]
        result = {
            "tensors": {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)},
            "rng_state": loaded["rng_state"],
            "extra_state": extra.getvalue() if isinstance(extra, io.BytesIO) else extra,
            "iteration": loaded.get("iteration"),
        }
        torch.save(result, f"{result_file}.rank{rank}")


def _run_spawned(mode: str, jobs: list, timeout: int = 300) -> None:
    """Run ``_save_worker`` / ``_load_worker`` on 2 gloo ranks in a fresh interpreter."""
    spec = json.dumps({"mode": mode, "jobs": jobs})
    proc = subprocess.run(
        [sys.executable, __file__, spec], capture_output=True, text=True, timeout=timeout,
    )
    # Any non-zero exit fails, an abort after all results were written included: never retried.
    if proc.returncode != 0:
        raise AssertionError(f"spawned {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


if __name__ == "__main__":
    import torch.multiprocessing as mp

    spec = json.loads(sys.argv[1])
    worker = {"save": _save_worker, "load": _load_worker}[spec["mode"]]
    mp.spawn(worker, args=(free_port(), spec["jobs"]), nprocs=WORLD_SIZE)
    sys.exit(0)


# ================================================================================================
# Test helpers
# ================================================================================================

from torch.distributed.checkpoint import FileSystemReader  # noqa: E402

from megatron_merge.errors import MergeError  # noqa: E402
from megatron_merge.offline import merge_checkpoints  # noqa: E402
from megatron_merge.weights import merge_weights  # noqa: E402
from merge_reference import load_full, reference_merge  # noqa: E402


def it_dir(run: Path, iteration: int) -> Path:
    return run / f"iter_{iteration:07d}"


def stored_bytes(path: Path, key: str) -> bytes:
    """Raw bytes of a bytes item (an opaque object) as stored."""
    metadata = FileSystemReader(str(path)).read_metadata()
    (info,) = [v for k, v in metadata.storage_data.items() if k.fqn.split("/shard_")[0] == key]
    with open(path / info.relative_path, "rb") as f:
        f.seek(info.offset)
        return f.read(info.length)



def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.name}.*")], "temporary output left behind"


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Real megatron-core checkpoints: run_tp2/, run_tp1/ (iterations 10..40) and bad variants."""
    root = tmp_path_factory.mktemp("megatron_ckpts")
    jobs = []
    for iteration in ITERATIONS:
        jobs.append([str(it_dir(root / "run_tp2", iteration)), iteration, 2, None])
        jobs.append([str(it_dir(root / "run_tp1", iteration)), iteration, 1, None])
    for variant in ("missing_key", "shape", "dtype", "nan"):
        jobs.append([str(root / "bad" / variant), 30, 2, variant])
    _run_spawned("save", jobs)
    return root


# ================================================================================================
# Correctness
# ================================================================================================


@pytest.mark.parametrize(
    "method, options",
    [("sma", {}), ("ema", {"alpha": 0.1}), ("wma", {}), ("wsm-minus-sqrt", {}),
     ("weights", {"weights": [3, 1, 2]})],
)
def test_merge_is_bit_exact_against_reference(ckpts, tmp_path, method, options):
    inputs = [it_dir(ckpts / "run_tp2", i) for i in (10, 20, 30)]
    out = tmp_path / "merged"
    result = merge_checkpoints(inputs, out, method, **options)
    weights = merge_weights(method, 3, **options)
    assert result.plan.weights == weights
    for key in MERGED_KEYS:
        expected = reference_merge(inputs, key, weights, ema_alpha=options.get("alpha"))
        merged = load_full(out, key)
        assert merged.dtype == TENSORS[key][1]
        assert torch.equal(merged, expected), key
        assert not torch.equal(merged, load_full(inputs[-1], key)), key  # it did merge
    # Not model weights: taken from the newest input unchanged.
    for key in TENSORS:
        if key not in MERGED_KEYS:
            assert torch.equal(load_full(out, key), load_full(inputs[-1], key)), key
    assert stored_bytes(out, EXTRA_STATE) == stored_bytes(inputs[-1], EXTRA_STATE)


def test_fp64_accumulation(ckpts, tmp_path):
    inputs = [it_dir(ckpts / "run_tp2", i) for i in (10, 20, 30, 40)]
    merge_checkpoints(inputs, tmp_path / "m", "ema", alpha=0.3, accumulate_dtype="fp64")
    weights = merge_weights("ema", 4, alpha=0.3)
    for key in MERGED_KEYS:
        expected = reference_merge(inputs, key, weights, acc_dtype=torch.float64, ema_alpha=0.3)
        assert torch.equal(load_full(tmp_path / "m", key), expected), key


def test_output_has_the_newest_inputs_layout_and_files(ckpts, tmp_path):
    inputs = [it_dir(ckpts / "run_tp2", i) for i in (20, 30, 40)]
    out = tmp_path / "merged"
    merge_checkpoints(inputs, out, "sma")
    newest = inputs[-1]
    src_md = FileSystemReader(str(newest)).read_metadata()
    out_md = FileSystemReader(str(out)).read_metadata()
    assert out_md.state_dict_metadata == src_md.state_dict_metadata  # same chunking and dtypes

    def files(md):  # which items live in which file, in order
        by_file = {}
        for index, info in sorted(md.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
            by_file.setdefault(info.relative_path, []).append((index.fqn, index.offset))
        return by_file

    assert files(out_md) == files(src_md)
    assert sorted(p.name for p in out.glob("*.distcp")) == sorted(p.name for p in newest.glob("*.distcp"))
    for name in ("common.pt", "metadata.json"):
        assert (out / name).read_bytes() == (newest / name).read_bytes()

    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "sma"
    assert [i["iteration"] for i in record["inputs"]] == [20, 30, 40]
    assert record["weights"] == pytest.approx([1 / 3] * 3)
    assert set(record["merged"]) == set(MERGED_KEYS)  # master weights included
    assert record["merged"]["embedding.word_embeddings.weight"] == "torch.bfloat16"
    assert "optimizer state" in record["copied_from_newest"][
        "optimizer.state.exp_avg.decoder.layers.0.mlp.linear_fc1.weight"]
    assert "non-float" in record["copied_from_newest"]["decoder.layers.0.self_attention.step"]
    assert record["copied_from_newest"][f"{EXTRA_STATE}/shard_0_1"] == "opaque object"
    assert record["version"] and record["dropped"] == {}
    # inputs untouched
    assert [p.name for p in sorted(inputs[0].iterdir())] == [p.name for p in sorted(inputs[1].iterdir())]


def test_layout_invariance_tp1_and_tp2_merge_identically(ckpts, tmp_path):
    tp2 = [it_dir(ckpts / "run_tp2", i) for i in (10, 20, 30)]
    tp1 = [it_dir(ckpts / "run_tp1", i) for i in (10, 20, 30)]
    merge_checkpoints(tp2, tmp_path / "m2", "wma")
    merge_checkpoints(tp1, tmp_path / "m1", "wma")
    chunks = lambda p, k: len(FileSystemReader(str(p)).read_metadata().state_dict_metadata[k].chunks)  # noqa: E731
    assert chunks(tmp_path / "m2", "decoder.layers.0.mlp.linear_fc1.weight") == 2
    assert chunks(tmp_path / "m1", "decoder.layers.0.mlp.linear_fc1.weight") == 1
    for key in MERGED_KEYS:
        assert torch.equal(load_full(tmp_path / "m1", key), load_full(tmp_path / "m2", key)), key


def test_inputs_saved_under_different_layouts_merge(ckpts, tmp_path):
    mixed = [it_dir(ckpts / "run_tp1", 10), it_dir(ckpts / "run_tp2", 20), it_dir(ckpts / "run_tp1", 30)]
    result = merge_checkpoints(mixed, tmp_path / "mixed", "ema", alpha=0.4)
    assert result.plan.format_plan.inputs_with_other_layout == [str(mixed[1])]
    merge_checkpoints([it_dir(ckpts / "run_tp2", i) for i in (10, 20, 30)], tmp_path / "tp2", "ema", alpha=0.4)
    for key in MERGED_KEYS:
        assert torch.equal(load_full(tmp_path / "mixed", key), load_full(tmp_path / "tp2", key)), key
    # and the other way round: the newest input is TP=2, older ones TP=1
    mixed = [it_dir(ckpts / "run_tp1", 10), it_dir(ckpts / "run_tp1", 20), it_dir(ckpts / "run_tp2", 30)]
    merge_checkpoints(mixed, tmp_path / "mixed2", "ema", alpha=0.4)
    for key in MERGED_KEYS:
        assert torch.equal(load_full(tmp_path / "mixed2", key), load_full(tmp_path / "tp2", key)), key


def test_model_only_drops_optimizer_state(ckpts, tmp_path):
    inputs = [it_dir(ckpts / "run_tp2", i) for i in (30, 40)]
    merge_checkpoints(inputs, tmp_path / "m", "sma", model_only=True)
    md = FileSystemReader(str(tmp_path / "m")).read_metadata()
    assert not [k for k in md.state_dict_metadata if k.startswith("optimizer.")]
    assert not [i for i in md.storage_data if i.fqn.startswith("optimizer.")]
    assert all(i.index.fqn in md.state_dict_metadata for plan in md.all_local_plans for i in plan.items)
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert record["model_only"] and len(record["dropped"]) == 2
    assert record["dropped_from_common_pt"] == ["optimizer", "opt_param_scheduler"]
    common = torch.load(tmp_path / "m" / "common.pt", weights_only=True)
    assert common["iteration"] == 40 and common["args"] == {"tensor_model_parallel_size": 2}
    assert "optimizer" not in common and "opt_param_scheduler" not in common
    for key in MERGED_KEYS:
        if not key.startswith(OPTIMIZER):
            assert torch.equal(load_full(tmp_path / "m", key), reference_merge(inputs, key, [0.5, 0.5]))


def test_workers_split_files_and_give_the_same_result(ckpts, tmp_path):
    inputs = [it_dir(ckpts / "run_tp2", i) for i in (10, 20, 30)]
    merge_checkpoints(inputs, tmp_path / "one", "sma", workers=1)
    merge_checkpoints(inputs, tmp_path / "two", "sma", workers=2)
    for key in TENSORS:
        assert torch.equal(load_full(tmp_path / "one", key), load_full(tmp_path / "two", key)), key


def test_megatron_core_loads_the_merged_checkpoint_at_another_layout(ckpts, tmp_path):
    tp2_inputs = [it_dir(ckpts / "run_tp2", i) for i in (20, 30, 40)]
    tp1_inputs = [it_dir(ckpts / "run_tp1", i) for i in (20, 30, 40)]
    merge_checkpoints(tp2_inputs, tmp_path / "from_tp2", "sma")
    merge_checkpoints(tp1_inputs, tmp_path / "from_tp1", "sma", model_only=True)
    jobs = [
        [str(tmp_path / "from_tp2"), 1, False, str(tmp_path / "at_tp1")],  # TP=2 saved, TP=1 load
        [str(tmp_path / "from_tp1"), 2, True, str(tmp_path / "at_tp2")],  # TP=1 saved, TP=2 load
    ]
    _run_spawned("load", jobs)
    weights = [1 / 3] * 3
    for rank in range(WORLD_SIZE):
        at_tp1 = torch.load(f"{tmp_path / 'at_tp1'}.rank{rank}", weights_only=False)
        at_tp2 = torch.load(f"{tmp_path / 'at_tp2'}.rank{rank}", weights_only=False)
        for key, (_, _, split_dim) in TENSORS.items():
            if key in MERGED_KEYS:
                full = reference_merge(tp2_inputs, key, weights)
            else:
                full = load_full(tp2_inputs[-1], key)
            assert torch.equal(at_tp1["tensors"][key], full), key
            if key.startswith(OPTIMIZER):
                assert key not in at_tp2["tensors"]
                continue
            local = full if split_dim is None else full.chunk(2, dim=split_dim)[rank]
            assert torch.equal(at_tp2["tensors"][key], local), key
        assert at_tp1["rng_state"] == {"rank": rank, "iteration": 40}
        assert at_tp1["extra_state"] == b"te-extra-40"
        assert at_tp1["iteration"] == at_tp2["iteration"] == 40


# ================================================================================================
# CLI
# ================================================================================================


def test_cli_run_directory_last_every_verify(ckpts, tmp_path):
    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_merge", "--method", "ema", "--alpha", "0.2", "--last", "2",
         "--every", "2", "--verify", "--no-progress", "--out", str(out), str(ckpts / "run_tp2")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "merge.json").read_text())
    assert [i["iteration"] for i in record["inputs"]] == [20, 40]
    assert "verified" in proc.stderr and ".merging-" not in proc.stderr  # no staging-directory names
    inputs = [it_dir(ckpts / "run_tp2", i) for i in (20, 40)]
    key = "decoder.layers.0.mlp.linear_fc2.weight"
    assert torch.equal(load_full(out, key), reference_merge(inputs, key, merge_weights("ema", 2, alpha=0.2), ema_alpha=0.2))


def test_cli_dry_run_prints_plan_and_writes_nothing(ckpts, tmp_path, capsys):
    out = tmp_path / "merged"
    code, _ = run_cli(["--dry-run", "--iterations", "10,30", "--method", "wma", "--out", out, ckpts / "run_tp2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "projected peak memory" in printed and "weight 0.333333" in printed and "weight 0.666667" in printed
    assert_no_output(out)
    # An existing --out does not stop a dry run (nothing is written); it is only reported.
    out.mkdir()
    code, _ = run_cli(["--dry-run", "--iterations", "10,30", "--out", out, ckpts / "run_tp2"])
    assert code == 0 and "it exists: the merge needs --force" in capsys.readouterr().out
    assert list(out.iterdir()) == []


def test_cli_method_weights_without_weights_names_the_flag(tmp_path, capsys):
    code, err = run_cli(["--method", "weights", "--out", tmp_path / "m", tmp_path])
    assert code == 2 and "--method weights needs --weights" in err


def test_cli_weights_flag_implies_weights_method(ckpts, tmp_path):
    inputs = [it_dir(ckpts / "run_tp2", i) for i in (10, 20)]
    code, err = run_cli(["--weights", "1,3", "--out", tmp_path / "m", *inputs])
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "merge.json").read_text())["weights"] == [0.25, 0.75]


def test_verify_catches_a_wrong_merge(ckpts, tmp_path, monkeypatch):
    import megatron_merge.formats.torch_dist as torch_dist

    real = torch_dist.merge_piece
    monkeypatch.setattr(torch_dist, "merge_piece", lambda *a, **k: real(*a, **k) + 1)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="verify failed"):
        merge_checkpoints([it_dir(ckpts / "run_tp2", i) for i in (10, 20)], out, verify=True)
    assert_no_output(out)


def test_existing_output_needs_force(ckpts, tmp_path):
    inputs = [it_dir(ckpts / "run_tp2", i) for i in (10, 20)]
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old").write_text("x")
    code, err = run_cli(["--out", out, *inputs])
    assert code == 1 and f"error: {out}: already exists" in err
    assert (out / "old").exists()
    code, err = run_cli(["--force", "--out", out, *inputs])
    assert code == 0, err
    assert not (out / "old").exists() and (out / "merge.json").exists()
    assert not list(tmp_path.glob(".merged.*"))


# ================================================================================================
# Bad input: non-zero exit, an error line naming the file and key, no output
# ================================================================================================


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _item(path: Path, key: str):
    md = FileSystemReader(str(path)).read_metadata()
    return next(v for k, v in md.storage_data.items() if k.fqn == key)


@pytest.mark.parametrize(
    "case", ["missing_input", "not_a_checkpoint", "single_input", "missing_key", "shape", "dtype",
             "nan", "truncated", "corrupt_item", "corrupt_metadata", "malicious_metadata",
             "missing_distcp", "output_inside_input"],
)
def test_bad_input_is_refused(ckpts, tmp_path, case):
    good = it_dir(ckpts / "run_tp2", 20)
    older = it_dir(ckpts / "run_tp2", 10)
    out = tmp_path / "merged"
    key = "decoder.layers.0.mlp.linear_fc2.weight"
    if case == "missing_input":
        inputs, expect = [tmp_path / "nope", good], [str(tmp_path / "nope"), "no such checkpoint"]
    elif case == "not_a_checkpoint":
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "notes.txt").write_text("hi")
        inputs, expect = [tmp_path / "junk", good], [str(tmp_path / "junk"), "no metadata.json"]
    elif case == "single_input":
        inputs, expect = [good], ["at least 2 checkpoints"]
    elif case in ("missing_key", "shape", "dtype"):
        bad = ckpts / "bad" / case
        key = {"missing_key": "decoder.final_layernorm.weight",
               "shape": "decoder.layers.0.mlp.linear_fc1.weight",
               "dtype": "decoder.layers.0.mlp.linear_fc1.bias"}[case]
        inputs, expect = [older, bad], [str(older), key]
        if case == "missing_key":  # the key is missing in the newest: the older one has an extra key
            inputs, expect = [bad, good], [str(bad), key]
    elif case == "nan":
        bad = ckpts / "bad" / "nan"
        inputs, expect = [older, bad], [str(bad), key, "NaN", "--allow-nonfinite"]
    elif case == "truncated":
        bad = _copy(older, tmp_path / "iter_0000010")
        info = _item(bad, key)
        with open(bad / info.relative_path, "r+b") as f:
            f.truncate(info.offset + info.length // 2)
        inputs, expect = [bad, good], [str(bad / info.relative_path), key, "truncated"]
    elif case == "corrupt_item":
        bad = _copy(older, tmp_path / "iter_0000010")
        info = _item(bad, key)
        with open(bad / info.relative_path, "r+b") as f:
            f.seek(info.offset)
            f.write(b"\0" * 64)
        inputs, expect = [bad, good], [str(bad / info.relative_path), key, "corrupt"]
    elif case == "corrupt_metadata":
        bad = _copy(older, tmp_path / "iter_0000010")
        (bad / ".metadata").write_bytes(b"not a pickle")
        inputs, expect = [bad, good], [str(bad / ".metadata")]
    elif case == "malicious_metadata":
        bad = _copy(older, tmp_path / "iter_0000010")
        (bad / ".metadata").write_bytes(pickle.dumps(os.getpid))  # any non-DCP global is refused
        inputs, expect = [bad, good], [str(bad / ".metadata"), "refusing to load posix.getpid"]
    elif case == "missing_distcp":
        bad = _copy(older, tmp_path / "iter_0000010")
        info = _item(bad, key)
        (bad / info.relative_path).unlink()
        inputs, expect = [bad, good], [str(bad / info.relative_path), "missing"]
    elif case == "output_inside_input":
        out = tmp_path / "iter_0000020" / "merged"
        inputs = [older, _copy(good, tmp_path / "iter_0000020")]
        expect = ["overlaps input"]
    code, err = run_cli(["--out", out, *inputs])
    assert code == 1, err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, err
    for text in expect:
        assert text in error_lines[0], (text, error_lines[0])
    assert_no_output(out)


def test_allow_nonfinite_merges_nan(ckpts, tmp_path):
    inputs = [it_dir(ckpts / "run_tp2", 10), ckpts / "bad" / "nan"]
    code, err = run_cli(["--allow-nonfinite", "--out", tmp_path / "m", *inputs])
    assert code == 0, err
    merged = load_full(tmp_path / "m", "decoder.layers.0.mlp.linear_fc2.weight")
    assert torch.isnan(merged[2, 7]) and torch.isfinite(merged).sum() == merged.numel() - 1


def test_inputs_are_never_modified(ckpts, tmp_path):
    inputs = [it_dir(ckpts / "run_tp2", i) for i in (10, 20)]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for d in inputs for p in d.iterdir()}
    merge_checkpoints(inputs, tmp_path / "m", "sma", verify=True)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for d in inputs for p in d.iterdir()}
    assert before == after


# ================================================================================================
# Memory: bounded by the largest chunk, not by the model
# ================================================================================================

_CHUNK_ELEMS = 1 << 21  # 8 MiB of fp32
_N_CHUNKS = 40


def _write_plain_dcp(path: Path, seed: int, n_chunks: int, chunk_elems: int) -> None:
    """A DCP checkpoint with megatron-core's side files, written by torch's own saver."""
    import torch.distributed.checkpoint as dcp

    gen = torch.Generator().manual_seed(seed)
    state = {f"decoder.layers.{i}.weight": torch.randn(chunk_elems // 1024, 1024, generator=gen)
             for i in range(n_chunks)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                    "common_backend": "torch", "common_backend_version": 1}))
    torch.save({"iteration": seed}, path / "common.pt")


# VmHWM is this process's own peak RSS (ru_maxrss would include the forking parent's).
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_is_bounded_by_the_largest_chunk(tmp_path):
    small = [tmp_path / f"small/iter_000000{i}" for i in (1, 2)]
    big = [tmp_path / f"big/iter_000000{i}" for i in (1, 2)]
    for i, path in enumerate(small):
        _write_plain_dcp(path, i + 1, n_chunks=2, chunk_elems=1024)
    for i, path in enumerate(big):
        _write_plain_dcp(path, i + 1, n_chunks=_N_CHUNKS, chunk_elems=_CHUNK_ELEMS)
    chunk_bytes = _CHUNK_ELEMS * 4
    input_bytes = sum(f.stat().st_size for p in big for f in p.glob("*.distcp"))
    assert input_bytes >= 2 * _N_CHUNKS * chunk_bytes

    baseline = peak_rss_of_merge(small, tmp_path / "small_out")
    peak = peak_rss_of_merge(big, tmp_path / "big_out")
    growth = peak - baseline
    # The working set is ~4 chunks (accumulator, converted term, loaded chunk, read buffers);
    # glibc keeps some freed 8 MiB blocks (below its mmap threshold) resident, so allow 12.
    # Anything proportional to the model (80 input chunks, 40 output chunks) would be far over.
    assert growth < 12 * chunk_bytes, f"RSS grew {growth / 2**20:.0f} MiB merging {input_bytes / 2**20:.0f} MiB"
    key = "decoder.layers.7.weight"
    assert torch.equal(load_full(tmp_path / "big_out", key), reference_merge(big, key, [0.5, 0.5]))
