"""Merges of saved checkpoints inside a run (merge.storage: disk, PMA-init, loss-spike recovery)
equal the offline tool's merge of the same directories, bit for bit.

Two spawned gloo ranks (this file run as a script) build the tiny dense GPT with megatron-core,
write checkpoints of it with perturbed weights through pretrain's own checkpoint writer (TP=2),
and merge them through :class:`megatron_merge.online.PartitionMerger`, each rank its own
partition, at two layouts: TP=2 (each rank a shard) and DP=2 (whole tensors split between
owners and broadcast to the replica). Each merge is installed into the model and saved with
megatron-core; here those are compared with ``megatron_merge.offline.merge_checkpoints`` output,
read back through torch's own DCP reader.

Failures: a NaN in one rank's TP shard, or a directory missing on one rank, fail the merge on
both ranks with the finding rank's message; under ``torchrun -m pretrain`` (PMA-init) the user
reads it once, at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import FAST, TINY_DENSE, free_port, run_pretrain
from pretrain.platform import process_group_teardown

ITERATIONS = (10, 20, 30)
ALPHA = 0.3
VOCAB = 256
LAYOUTS = {"tp2": 2, "dp2": 1}  # name -> tensor-parallel size (2 ranks: the rest is DP)
NAN_PARAM = "decoder.layers.0.mlp.linear_fc1.weight"  # split over TP: at TP=2 only rank 1 holds the NaN
NAN_RANK = 1
# merge -> (offline method, offline options); the online side of each is in _merge_online
CASES = {
    "pma-sma": ("sma", {}),
    "pma-wma": ("wma", {}),
    "pma-ema": ("ema", {"alpha": ALPHA}),
    "disk-wma": ("wma", {}),
    "ema-fp64": ("ema", {"alpha": ALPHA, "accumulate_dtype": "fp64"}),
}


def it_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


# ================================================================================================
# Spawned megatron-core processes (this file run as a script)
# ================================================================================================


def _perturb(model_chunks, iteration: int, nan: bool = False) -> None:
    """Give every parameter values of its own for ``iteration`` (the same on every replica);
    with ``nan``, a NaN in TP rank NAN_RANK's shard of NAN_PARAM only."""
    from megatron.core import parallel_state

    with torch.no_grad():
        for index, (name, param) in enumerate(p for chunk in model_chunks for p in chunk.named_parameters()):
            gen = torch.Generator().manual_seed(1000 * iteration + index)
            param.add_(torch.randn(param.shape, generator=gen) * 0.01 + 0.001 * iteration)
            if nan and name.endswith(NAN_PARAM) and parallel_state.get_tensor_model_parallel_rank() == NAN_RANK:
                param[3] = float("nan")


def _merge_online(case, model_chunks, directories, run_dir) -> None:
    """Merge ``directories`` into the model the way the run does for ``case``."""
    from megatron_merge.online import OnlineMergeSpec
    from pretrain.config import MergeSelection
    from pretrain.merging import install_merged_checkpoints, partition_merger

    if case.startswith("pma-"):  # PMA-init and loss-spike recovery
        selection = MergeSelection(method=case[4:], window=len(directories), ema_alpha=ALPHA)
        install_merged_checkpoints(model_chunks, None, directories, selection)
    elif case == "disk-wma":  # merge.storage: disk, the window read back from the run's checkpoints
        spec = OnlineMergeSpec(method="wma", window=len(ITERATIONS), interval=10, storage="disk")
        merger = partition_merger(spec, model_chunks, run_dir=str(run_dir))
        for iteration in ITERATIONS:
            assert merger.maybe_snapshot(iteration)
        merger.install(merger.merged_owned())
    else:
        spec = OnlineMergeSpec(method="ema", window=len(ITERATIONS), interval=1, ema_alpha=ALPHA, storage="disk")
        merger = partition_merger(spec, model_chunks, run_dir=None)
        merger.install(merger.merge_checkpoints(directories, spec.weights_for(len(directories)), ema_alpha=ALPHA,
                                                accumulate_dtype="fp64"))


@process_group_teardown()
def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on shared cores
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_merge.errors import MergeError
    from megatron_merge.online import OnlineMergeSpec
    from pretrain import checkpoint as ckpt
    from pretrain.config import load_config
    from pretrain.merging import partition_merger
    from pretrain.model import build_model
    from pretrain.platform import init_distributed

    root = Path(root)
    run_dir = root / "run"
    errors = {}
    for layout, tp in LAYOUTS.items():
        cfg = load_config(TINY_DENSE, [*FAST, f"parallel.tensor_model_parallel_size={tp}", f"checkpoint.save={run_dir}"])
        platform = init_distributed(cfg)
        torch.manual_seed(1234)
        model_parallel_cuda_manual_seed(1234)
        model = build_model(cfg, platform, VOCAB)
        raw = [p.detach().clone() for chunk in model for p in chunk.parameters()]
        if layout == "tp2":  # the inputs: checkpoints of a TP=2 run, and one with a NaN
            for iteration in ITERATIONS:
                _perturb(model, iteration)
                sd = {**ckpt.model_sharded_state_dict(model), **ckpt.common_entries(cfg, ckpt.TrainState(iteration))}
                ckpt.write_checkpoint(sd, run_dir, iteration, cfg)
            _perturb(model, ITERATIONS[-1] + 10, nan=True)
            sd = {**ckpt.model_sharded_state_dict(model), **ckpt.common_entries(cfg, ckpt.TrainState(ITERATIONS[-1]))}
            ckpt.write_checkpoint(sd, root / "nan", ITERATIONS[-1], cfg)
        directories = [it_dir(run_dir, i) for i in ITERATIONS]
        for case in CASES:
            _merge_online(case, model, directories, run_dir)
            out = root / "online" / layout / case
            if rank == 0:
                out.mkdir(parents=True)
            dist.barrier()
            dist_checkpointing.save(ckpt.model_sharded_state_dict(model), str(out))
            dist.barrier()
            with torch.no_grad():  # back to the raw weights: no merge may depend on the previous one
                for p, r in zip((p for chunk in model for p in chunk.parameters()), raw):
                    p.copy_(r)
        if layout == "tp2":  # failures on one rank only fail the merge on both, before the next load
            spec = OnlineMergeSpec(method="sma", window=3, interval=1, storage="disk")
            merger = partition_merger(spec, model, run_dir=None)
            errors["nan_key"] = next(s.sharded.key for s in merger.owned if s.name.endswith(NAN_PARAM))
            bad = [it_dir(root / "nan", ITERATIONS[-1]), *directories[1:]]  # the NaN read first
            missing = [directories[0], root / "missing" if rank == 1 else directories[1]]
            for name, inputs in (("nan", bad), ("missing", missing)):
                try:  # without the shared failure, rank 0 would wait in the next load until the job times out
                    merger.merge_checkpoints(inputs, spec.weights_for(len(inputs)))
                except MergeError as exc:
                    errors[name] = str(exc)
            allowed = merger.merge_checkpoints(bad, spec.weights_for(3), allow_nonfinite=True)
            errors["allowed_nan"] = sum(int(t.isnan().sum()) for t in allowed.values())
            # In-memory snapshots (storage: host): the newest holds the NaN on rank 1 only.
            merger = partition_merger(OnlineMergeSpec(method="sma", window=2, interval=1), model, run_dir=None)
            merger.maybe_snapshot(1)
            _perturb(model, 1, nan=True)
            merger.maybe_snapshot(2)
            try:
                merger.merged_owned()
            except MergeError as exc:
                errors["snapshot_nan"] = str(exc)
        parallel_state.destroy_model_parallel()
    (root / f"errors.rank{rank}.json").write_text(json.dumps(errors))


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(free_port(), sys.argv[1]), nprocs=2)
    sys.exit(0)


# ================================================================================================
# Tests
# ================================================================================================

from megatron_merge.offline import merge_checkpoints  # noqa: E402
from merge_reference import load_full, model_keys  # noqa: E402


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """The spawned ranks' inputs, online merges and error messages, and the offline merges."""
    root = tmp_path_factory.mktemp("online_disk")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, str(root)], capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"spawned ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    inputs = [it_dir(root / "run", i) for i in ITERATIONS]
    offline = {}
    for method, options in {(m, json.dumps(o, sort_keys=True)) for m, o in CASES.values()}:
        out = root / "offline" / f"{method}-{options}"
        merge_checkpoints(inputs, out, method, **json.loads(options))
        offline[method, options] = out
    return root, inputs, offline


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_online_merge_of_saved_checkpoints_equals_offline(merged, case, layout):
    root, inputs, offline = merged
    method, options = CASES[case]
    expected = offline[method, json.dumps(options, sort_keys=True)]
    online = root / "online" / layout / case
    keys = model_keys(online)
    assert keys == model_keys(expected) and len(keys) >= 8  # layers stacked per key
    for key in keys:
        assert torch.equal(load_full(online, key), load_full(expected, key)), key
    key = next(k for k in keys if k.endswith("linear_fc1.weight"))
    assert not torch.equal(load_full(online, key), load_full(inputs[-1], key))  # it did merge


def test_fp64_accumulation_is_used(merged):
    root, _, _ = merged
    fp32, fp64 = root / "online" / "tp2" / "pma-ema", root / "online" / "tp2" / "ema-fp64"
    assert any(not torch.equal(load_full(fp32, k), load_full(fp64, k)) for k in model_keys(fp32))


def _errors(root: Path, rank: int) -> dict:
    return json.loads((root / f"errors.rank{rank}.json").read_text())


def test_nan_on_one_rank_fails_the_merge_on_every_rank(merged):
    """Only rank 1's TP shard holds the NaN: both ranks raise its message, at once (rank 0 does
    not go on to load the next checkpoint), and the advice names no megatron-merge flag."""
    root, _, _ = merged
    ranks = [_errors(root, rank) for rank in (0, 1)]
    message = ranks[0]["nan"]
    assert ranks[1]["nan"] == message
    key = ranks[NAN_RANK]["nan_key"]
    assert message.startswith(f"rank {NAN_RANK} of 2: non-finite values (NaN/Inf) in "), message
    assert f"{it_dir(root / 'nan', ITERATIONS[-1])} (key {key!r})" in message, message
    assert "--" not in message and "no config key overrides" in message, message
    assert ranks[NAN_RANK]["allowed_nan"] > 0 and ranks[1 - NAN_RANK]["allowed_nan"] == 0  # allow_nonfinite merges it


def test_nan_in_one_rank_snapshot_fails_the_merge_on_every_rank(merged):
    root, _, _ = merged
    messages = [_errors(root, rank)["snapshot_nan"] for rank in (0, 1)]
    assert messages[0] == messages[1], messages
    assert messages[0].startswith(f"rank {NAN_RANK} of 2: non-finite values (NaN/Inf) in snapshot of "), messages
    assert NAN_PARAM in messages[0] and "--" not in messages[0] and "training had diverged" in messages[0]


def test_missing_checkpoint_on_one_rank_fails_every_rank_before_any_load(merged):
    root, _, _ = merged
    messages = [_errors(root, rank)["missing"] for rank in (0, 1)]
    assert messages[0] == messages[1] == (f"rank 1 of 2: {root / 'missing'}: missing or not a torch_dist checkpoint "
                                          f"(no metadata.json; needed for merging)")


def test_pma_init_from_a_nan_on_one_rank_is_reported_once_promptly(merged, tmp_path):
    """torchrun -m pretrain with PMA-init over a run whose newest checkpoint has a NaN in rank 1's
    shard only: one ``error:`` line, rank 1's finding with the run-config advice, said by rank 0
    at once (before: rank 0 went on into training and rank 1 spoke after its grace period)."""
    root, _, _ = merged
    source = tmp_path / "source"
    for iteration in ITERATIONS[:-1]:
        shutil.copytree(it_dir(root / "run", iteration), it_dir(source, iteration))
    shutil.copytree(it_dir(root / "nan", ITERATIONS[-1]), it_dir(source, ITERATIONS[-1]))
    run = run_pretrain(tmp_path / "run", 2, ["parallel.tensor_model_parallel_size=2", f"checkpoint.init_from={source}",
                                              "checkpoint.init_merge.enabled=true", "checkpoint.init_merge.window=3",
                                              "train.train_iters=8"],
                       timeout=300, check=False, env={"PRETRAIN_ERROR_GRACE_S": "120"})
    errors = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert run.returncode != 0 and len(errors) == 1, run.output[-4000:]
    assert errors[0].startswith(f"error: rank {NAN_RANK} of 2: non-finite values (NaN/Inf) in "
                                f"{it_dir(source, ITERATIONS[-1])} (key "), errors
    assert errors[0].endswith("(checkpoint.init_merge.iterations, or a smaller checkpoint.init_merge.window)"), errors
    assert "(reported by rank" not in errors[0]  # rank 0 said it: no rank waited out the grace period
