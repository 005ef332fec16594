"""Offline merging of real DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 checkpoints, in DeepSpeed's format.

Fixtures are written by DeepSpeed itself (``engine.save_checkpoint``) in 2 gloo processes on
DeepSpeed's CPU accelerator (this file run as a script): a small model with two parameter
groups and odd sizes (so the flat ZeRO partitions are padded), trained a few steps between saves
at steps 2, 4 and 6.

The reference is independent of the package: each input is consolidated by DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` and the consolidated tensors are averaged with plain
torch ops. The merged checkpoint is then loaded by DeepSpeed's own ``load_checkpoint`` in fresh
engines, its weights compared bit for bit, and training continues from it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port, run_cli
from pretrain.platform import process_group_teardown

WORLD_SIZE = 2
SAVE_STEPS = (2, 4, 6)
STAGES = (1, 2, 3)

# DeepSpeed on CPUs: its CPU accelerator, and no JIT build of its shared-memory allreduce op
# (a C++ compile of ~90 s on first use; gloo does the collectives instead).
DS_ENV = {"DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


# ================================================================================================
# Spawned DeepSpeed processes (this file run as a script)
# ================================================================================================


def _net(width: int = 13):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Embedding(11, 6),
        torch.nn.Linear(6, width),
        torch.nn.LayerNorm(width),
        torch.nn.GELU(),
        torch.nn.Linear(width, 11),
    )
    net.register_buffer("temperature", torch.full((3,), 0.75))
    return net


def _param_groups(net):
    decay = [p for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1]
    no_decay = [p for n, p in net.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def _engine(stage: int, width: int = 13):
    import deepspeed

    net = _net(width)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 3e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**6,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=net, model_parameters=_param_groups(net), config=config)
    return engine


def _step(engine, step: int) -> float:
    gen = torch.Generator().manual_seed(1000 * step + engine.global_rank)
    tokens = torch.randint(0, 11, (4, 5), generator=gen)
    logits = engine(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
    engine.backward(loss)
    engine.step()
    return float(loss)


def _full_params(engine, stage: int) -> dict:
    """The engine's module parameters and buffers, whole (gathered under ZeRO-3)."""
    import deepspeed

    module = engine.module
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _init(rank: int, port: int) -> None:
    os.environ.update(DS_ENV)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")


@process_group_teardown()
def _save_worker(rank: int, port: int, jobs: list) -> None:
    _init(rank, port)
    for save_dir, stage, width in jobs:
        engine = _engine(stage, width)
        for step in range(1, SAVE_STEPS[-1] + 1):
            _step(engine, step)
            if step in SAVE_STEPS:
                engine.save_checkpoint(save_dir)


@process_group_teardown()
def _load_worker(rank: int, port: int, jobs: list) -> None:
    """Load merged checkpoints with DeepSpeed's own load_checkpoint, then train on."""
    _init(rank, port)
    for load_dir, tag, stage, result_file, options in jobs:
        engine = _engine(stage)
        path, client = engine.load_checkpoint(load_dir, tag=tag, **options)
        assert path is not None, f"DeepSpeed did not load {load_dir}/{tag}"
        loaded = _full_params(engine, stage)
        steps_before = engine.global_steps
        losses = [_step(engine, 100 + i) for i in range(3)]
        result = {"loaded": loaded, "after": _full_params(engine, stage), "losses": losses,
                  "global_steps": (steps_before, engine.global_steps)}
        if rank == 0:
            torch.save(result, result_file)


def _run_spawned(mode: str, jobs: list, timeout: int = 300) -> None:
    spec = json.dumps({"mode": mode, "jobs": jobs})
    proc = subprocess.run([sys.executable, __file__, spec], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **DS_ENV})
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

deepspeed = pytest.importorskip("deepspeed")

from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402

from megatron_merge.errors import MergeError  # noqa: E402
from megatron_merge.offline import merge_checkpoints  # noqa: E402
from helpers import assert_same_bytes, merge_every_way  # noqa: E402

BUFFER = "temperature"


def tag_dir(run: Path, step: int) -> Path:
    return run / f"global_step{step}"


def consolidated(tag: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own fp32 consolidation of a tag directory (reference only)."""
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)


def reference_merge(tags: list[Path], weights: list[float] | None = None,
                    ema_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Over DeepSpeed's consolidated fp32 weights, oldest first: sum_i w_i * x_i, or with
    ``ema_alpha`` the paper's recursion M = a * x_i + (1 - a) * M from M = x_1."""
    states = [consolidated(t) for t in tags]
    merged = {}
    for key in states[-1]:
        xs = [state[key].to(torch.float32) for state in states]
        if ema_alpha is not None:
            a, keep = torch.tensor(ema_alpha), torch.tensor(1 - ema_alpha)
            acc = xs[0]
            for x in xs[1:]:
                acc = x * a + acc * keep
        else:
            acc = torch.zeros(xs[-1].shape, dtype=torch.float32)
            for x, weight in zip(xs, weights):
                acc = acc + x * weight
        merged[key] = acc
    return merged


def load_raw(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)



def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.name}.*")], "temporary output left behind"


@pytest.fixture(scope="session")
def ds_runs(tmp_path_factory):
    """z1/, z2/, z3/: DeepSpeed save directories with tags global_step2, 4, 6; and other_model/."""
    root = tmp_path_factory.mktemp("deepspeed_ckpts")
    jobs = [[str(root / f"z{stage}"), stage, 13] for stage in STAGES]
    jobs.append([str(root / "other_model"), 2, 14])  # a different width: for mismatch errors
    _run_spawned("save", jobs)
    return root


# ================================================================================================
# Correctness, DeepSpeed loads the result, training continues
# ================================================================================================


@pytest.fixture(scope="session")
def merged_runs(ds_runs, tmp_path_factory):
    """Each stage's three tags merged with EMA (alpha 0.3) via the CLI, and ZeRO-2's last two
    with --model-only; then all loaded by DeepSpeed (one spawn: DeepSpeed starts slowly)."""
    out_root = tmp_path_factory.mktemp("deepspeed_merged")
    jobs = []
    for stage in STAGES:
        out = out_root / f"z{stage}" / "merged"
        code, err = run_cli(["--method", "ema", "--alpha", "0.3", "--last", "3", "--verify",
                             "--out", out, ds_runs / f"z{stage}"])
        assert code == 0, err
        jobs.append([str(out.parent), out.name, stage, str(out_root / f"loaded_z{stage}.pt"), {}])
    out = out_root / "model_only" / "merged"
    merge_checkpoints([tag_dir(ds_runs / "z2", s) for s in SAVE_STEPS[1:]], out, "sma", model_only=True)
    jobs.append([str(out.parent), out.name, 2, str(out_root / "loaded_model_only.pt"), {"load_module_only": True}])
    # --as-run-dir: DeepSpeed finds the merge through `latest` (no tag given)
    code, err = run_cli(["--method", "ema", "--alpha", "0.3", "--last", "3", "--as-run-dir",
                         "--out", out_root / "as_run", ds_runs / "z2"])
    assert code == 0, err
    jobs.append([str(out_root / "as_run"), None, 2, str(out_root / "loaded_as_run.pt"), {}])
    _run_spawned("load", jobs)
    return out_root


@pytest.mark.parametrize("stage", STAGES)
def test_merged_weights_are_bit_exact_and_deepspeed_loads_them(ds_runs, merged_runs, stage):
    tags = [tag_dir(ds_runs / f"z{stage}", s) for s in SAVE_STEPS]
    out = merged_runs / f"z{stage}" / "merged"
    expected = reference_merge(tags, ema_alpha=0.3)
    params = {"0.weight", "1.weight", "1.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert set(expected) == params | {BUFFER}  # the float buffer merges too

    # The merged fp32 master partitions, consolidated by DeepSpeed, are the reference bit for bit.
    merged = consolidated(out)
    newest = consolidated(tags[-1])
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key
        assert key == BUFFER or not torch.equal(value, newest[key]), key  # it did merge

    # DeepSpeed's load_checkpoint puts exactly those weights into a fresh engine ...
    result = torch.load(merged_runs / f"loaded_z{stage}.pt", weights_only=False)
    for key, value in expected.items():
        assert torch.equal(result["loaded"][key], value), key
    # ... and training continues from the newest input's step count.
    assert result["global_steps"] == (SAVE_STEPS[-1], SAVE_STEPS[-1] + 3)
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert not torch.equal(result["after"]["1.weight"], expected["1.weight"])

    if stage in (1, 2):
        # Module weights (mp_rank_00_model_states.pt) and master weights hold the same values.
        module = load_raw(out / "mp_rank_00_model_states.pt")["module"]
        for key, value in expected.items():
            assert torch.equal(module[key], value), key


def test_as_run_dir_is_found_by_deepspeed_through_latest(ds_runs, merged_runs):
    run = merged_runs / "as_run"
    tag = f"global_step{SAVE_STEPS[-1]}"
    assert sorted(p.name for p in run.iterdir()) == [tag, "latest"]
    assert (run / "latest").read_text().strip() == tag
    expected = reference_merge([tag_dir(ds_runs / "z2", s) for s in SAVE_STEPS], ema_alpha=0.3)
    result = torch.load(merged_runs / "loaded_as_run.pt", weights_only=False)
    for key, value in expected.items():
        assert torch.equal(result["loaded"][key], value), key


def test_file_layout_record_and_copied_state(ds_runs, merged_runs):
    tags = [tag_dir(ds_runs / "z2", s) for s in SAVE_STEPS]
    out = merged_runs / "z2" / "merged"
    names = sorted(p.name for p in tags[-1].iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "merge.json"])
    record = json.loads((out / "merge.json").read_text())
    assert record["format"] == "deepspeed" and record["method"] == "ema" and record["alpha"] == 0.3
    assert [i["iteration"] for i in record["inputs"]] == list(SAVE_STEPS)
    assert record["layout"] == {"zero_stage": 2, "dp_world_size": 2, "mp_world_size": 1}
    optim = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert set(record["merged"][optim]) == {
        "optimizer_state_dict/single_partition_of_fp32_groups/0",
        "optimizer_state_dict/single_partition_of_fp32_groups/1",
    }
    assert f"module/{BUFFER}" in record["merged"]["mp_rank_00_model_states.pt"]
    assert any("optimizer_state_dict" in c for c in record["copied_from_newest"][optim])
    # Adam moments, step, loss scaler, engine counters: the newest input's, unchanged.
    new, src = load_raw(out / optim), load_raw(tags[-1] / optim)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        for group in (0, 1):
            assert torch.equal(new["optimizer_state_dict"]["base_optimizer_state"]["state"][group][key],
                               src["optimizer_state_dict"]["base_optimizer_state"]["state"][group][key])
    assert type(new["optimizer_state_dict"]["loss_scaler"]) is type(src["optimizer_state_dict"]["loss_scaler"])
    assert new["optimizer_state_dict"]["zero_stage"] == src["optimizer_state_dict"]["zero_stage"]
    assert load_raw(out / "mp_rank_00_model_states.pt")["global_steps"] == SAVE_STEPS[-1]


@pytest.mark.slow  # 2 spawned workers and 4 torchrun ranks, each importing torch and DeepSpeed
def test_every_way_of_running_writes_the_same_bytes(ds_runs, tmp_path):
    """One process, --workers 2 and torchrun on 2 simulated nodes x 2 ranks (one rank idle:
    ZeRO-2 at world size 2 has 3 files)."""
    tags = [tag_dir(ds_runs / "z2", s) for s in SAVE_STEPS]
    outputs = merge_every_way(["--method", "ema", "--alpha", "0.3", *tags], tmp_path)
    one = outputs.pop("one_process")
    for out in outputs.values():
        assert_same_bytes(one, out)


@pytest.mark.slow  # spawns worker processes, each importing torch and DeepSpeed
def test_workers_and_explicit_tags_give_the_same_result(ds_runs, tmp_path):
    tags = [tag_dir(ds_runs / "z3", s) for s in SAVE_STEPS]
    merge_checkpoints(tags, tmp_path / "one", "wma")
    merge_checkpoints(tags, tmp_path / "two", "wma", workers=2)
    for name in sorted(p.name for p in (tmp_path / "one").glob("*.pt")):
        a, b = load_raw(tmp_path / "one" / name), load_raw(tmp_path / "two" / name)
        assert str(a) == str(b), name


def test_model_only_drops_zero_optimizer_files_and_deepspeed_loads_the_module(ds_runs, merged_runs):
    tags = [tag_dir(ds_runs / "z2", s) for s in SAVE_STEPS[1:]]
    out = merged_runs / "model_only" / "merged"
    assert not list(out.glob("*optim_states.pt"))
    record = json.loads((out / "merge.json").read_text())
    assert record["model_only"]
    assert set(record["dropped"]) == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    loaded = torch.load(merged_runs / "loaded_model_only.pt", weights_only=False)
    for key, value in reference_merge(tags, [0.5, 0.5]).items():
        assert torch.equal(loaded["loaded"][key], value), key
    assert all(torch.isfinite(torch.tensor(loaded["losses"])))


def _pipeline_moe_tag(path: Path, step: int) -> Path:
    """A tag directory shaped like PipelineEngine + MoE saves (no DeepSpeed run needed): the
    model-states file holds no module, the layers and experts have their own files."""
    gen = torch.Generator().manual_seed(step)
    path.mkdir(parents=True)
    torch.save({"module": None, "buffer_names": [], "optimizer": None, "global_steps": step,
                "dp_world_size": 1, "mp_world_size": 1, "param_shapes": None},
               path / "mp_rank_00_model_states.pt")
    for layer in (0, 1):
        torch.save({"weight": torch.randn(4, 3, generator=gen).bfloat16(), "bias": torch.randn(4, generator=gen),
                    "steps": torch.tensor([step])}, path / f"layer_{layer:02d}-model_00-model_states.pt")
    torch.save({"deepspeed_moe.experts.deepspeed_experts.0.w": torch.randn(5, generator=gen)},
               path / "layer_1_expert_0_mp_rank_00_model_states.pt")
    return path


def test_pipeline_layer_and_expert_files_merge(tmp_path):
    tags = [_pipeline_moe_tag(tmp_path / "run" / f"global_step{s}", s) for s in (10, 20)]
    out = tmp_path / "merged"
    merge_checkpoints(tags, out, "wma", verify=True)
    weights = [1 / 3, 2 / 3]
    for name, key in [("layer_00-model_00-model_states.pt", "weight"), ("layer_01-model_00-model_states.pt", "bias"),
                      ("layer_1_expert_0_mp_rank_00_model_states.pt", "deepspeed_moe.experts.deepspeed_experts.0.w")]:
        values = [load_raw(t / name)[key] for t in tags]
        acc = torch.zeros(values[0].shape)
        for value, weight in zip(values, weights):
            acc = acc + value.float() * weight
        assert torch.equal(load_raw(out / name)[key], acc.to(values[0].dtype)), name
    assert torch.equal(load_raw(out / "layer_00-model_00-model_states.pt")["steps"], torch.tensor([20]))
    assert load_raw(out / "mp_rank_00_model_states.pt")["global_steps"] == 20


def test_dry_run_prints_the_plan_and_writes_nothing(ds_runs, tmp_path, capsys):
    out = tmp_path / "merged"
    code, err = run_cli(["--dry-run", "--iterations", "2,6", "--out", out, ds_runs / "z3"])
    assert code == 0, err
    printed = capsys.readouterr().out
    assert "format: deepspeed (zero_stage=3" in printed and "projected peak memory" in printed
    assert_no_output(out)


# ================================================================================================
# Bad input: an error line naming the file and key, non-zero exit, nothing written
# ================================================================================================


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    obj = load_raw(path)
    with torch.no_grad():
        edit(obj)
    torch.save(obj, path)


@pytest.mark.parametrize(
    "case", ["truncated", "other_model", "other_stage", "missing_file", "malicious", "nan",
             "model_only_zero3", "save_dir_not_tag", "format_override"],
)
def test_bad_input_is_refused(ds_runs, tmp_path, case):
    older, newest = tag_dir(ds_runs / "z2", 4), tag_dir(ds_runs / "z2", 6)
    optim = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    out = tmp_path / "merged"
    extra = []
    if case == "truncated":
        bad = _copy(older, tmp_path / "global_step4")
        with open(bad / optim, "r+b") as f:
            f.truncate((bad / optim).stat().st_size // 2)
        inputs, expect = [bad, newest], [str(bad / optim), "corrupt or truncated"]
    elif case == "other_model":
        bad = tag_dir(ds_runs / "other_model", 4)
        inputs, expect = [bad, newest], [str(bad / "mp_rank_00_model_states.pt"), "param_shapes", "1.weight"]
    elif case == "other_stage":
        bad = tag_dir(ds_runs / "z1", 4)
        inputs, expect = [bad, newest], [str(bad), "zero_stage=1", "zero_stage=2"]
    elif case == "missing_file":
        bad = _copy(older, tmp_path / "global_step4")
        (bad / optim).unlink()
        inputs, expect = [bad, newest], [str(bad / optim), "missing"]
    elif case == "malicious":
        bad = _copy(older, tmp_path / "global_step4")
        torch.save({"optimizer_state_dict": os.getpid}, bad / optim)  # any global outside the allowlist
        inputs, expect = [bad, newest], [str(bad / optim), "refusing to unpickle posix.getpid"]
    elif case == "nan":
        bad = _copy(older, tmp_path / "global_step4")

        def poison(obj):
            obj["optimizer_state_dict"]["single_partition_of_fp32_groups"][0][3] = float("nan")

        _rewrite(bad / optim, poison)
        key = "optimizer_state_dict/single_partition_of_fp32_groups/0"
        inputs, expect = [bad, newest], [str(bad / optim), key, "NaN", "--allow-nonfinite"]
    elif case == "model_only_zero3":
        inputs = [tag_dir(ds_runs / "z3", 4), tag_dir(ds_runs / "z3", 6)]
        extra, expect = ["--model-only"], ["ZeRO-3", "fp32_flat_groups", "optim_states.pt"]
    elif case == "save_dir_not_tag":
        inputs, expect = [ds_runs / "z2"], ["run directory", "--last"]
    elif case == "format_override":
        extra, inputs = ["--format", "torch"], [older, newest]
        expect = [str(older), "no mp_rank_* directories"]
    code, err = run_cli([*extra, "--out", out, *inputs])
    assert code == 1, err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, err
    for text in expect:
        assert text in error_lines[0], (text, error_lines[0])
    assert_no_output(out)


def test_verify_catches_a_wrong_merge(ds_runs, tmp_path, monkeypatch):
    import megatron_merge.formats.rank_files as rank_files

    real = rank_files.merge_piece
    monkeypatch.setattr(rank_files, "merge_piece", lambda *a, **k: real(*a, **k) + 1)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="verify failed"):
        merge_checkpoints([tag_dir(ds_runs / "z1", s) for s in SAVE_STEPS[1:]], out, verify=True)
    assert_no_output(out)
