"""Runs that behave like Megatron-LM runs on a cluster: auto-resume from checkpoint.save, never
overwriting a run silently, a clean stop on a signal or a budget, retention of checkpoints.

The launches are real torchrun jobs of ``python -m pretrain`` (2 gloo ranks, DP=2), with a
constant LR so that the losses of a run do not depend on its length: an interrupted and resumed
run must give the losses of an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import FAST, REPO, TINY_DENSE, free_port, run_pretrain
from pretrain import metrics as metrics_mod
from pretrain.checkpoint import TRACKER_FILE, read_tracker
from pretrain.config import ConfigError, load_config, validate
from pretrain.checkpoint import recover_interrupted_saves
from pretrain.resume import newest_complete_iteration
from pretrain.retention import iterations_to_delete, prune, saved_iterations, still_needed
from pretrain.stopping import StopConditions

CONSTANT = ("scheduler.style=constant", "checkpoint.save_interval=2")


def iteration_records(run_dir: Path) -> list[dict]:
    return [r for r in metrics_mod.read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 10-iteration run."""
    run = run_pretrain(tmp_path_factory.mktemp("reference") / "run", 2, [*CONSTANT, "train.train_iters=10"])
    return {r["iteration"]: r["loss"] for r in iteration_records(run.run_dir)}


@pytest.mark.slow
def test_exit_interval_then_auto_resume_equals_uninterrupted_run(tmp_path, reference):
    """Saved asynchronously, resumed automatically: the losses of the uninterrupted (synchronous) run."""
    run_dir = tmp_path / "run"
    args = [*CONSTANT, "train.train_iters=10", "checkpoint.keep_last=2", "checkpoint.async_save=true"]
    first = run_pretrain(run_dir, 2, [*args, "train.exit_interval=6"])
    assert first.output.count("stopped at iteration 6 (train.exit_interval=6 reached)") == 1, first.output[-3000:]
    assert read_tracker(run_dir) == 6
    assert saved_iterations(run_dir) == [4, 6]  # keep_last=2: iter_2 deleted after iter_6 was published

    second = run_pretrain(run_dir, 2, args)  # the same command again: it continues
    assert "resuming at iteration 6" in second.output and "(auto-resume)" in second.output
    records = iteration_records(run_dir)
    assert [r["iteration"] for r in records] == list(range(1, 11))  # one record per iteration
    assert {r["iteration"]: r["loss"] for r in records} == reference
    resume = [r for r in second.metrics if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["automatic"] is True and resume[0]["iteration"] == 6
    assert saved_iterations(run_dir) == [8, 10]

    # Starting where later checkpoints exist would replace them: refused before any step.
    refused = run_pretrain(run_dir, 2, [*args, f"checkpoint.load={run_dir / 'iter_0000008'}"], check=False)
    assert refused.returncode != 0
    assert "checkpoint.overwrite=true" in refused.output and "iter_0000010" in refused.output
    assert saved_iterations(run_dir) == [8, 10] and read_tracker(run_dir) == 10


def _workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(launcher.pid).children(recursive=False)


def _wait_for_iteration(run_dir: Path, iteration: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and any(json.loads(line).get("iteration", 0) >= iteration and "loss" in line
                                  for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.2)
    raise AssertionError(f"{path}: no iteration {iteration} within {timeout} s")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_saves_and_resumes(tmp_path):
    """SLURM's SIGTERM before the time limit: the ranks agree, save (with the merge state), exit 0."""
    run_dir = tmp_path / "run"
    merge = ("merge.enabled=true", "merge.interval=1", "merge.window=2", "merge.save=false", "merge.eval=false")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(free_port()), "-m", "pretrain", "--config", str(TINY_DENSE), *FAST, f"checkpoint.save={run_dir}",
            "scheduler.style=constant", "train.train_iters=100000", *merge]
    launcher = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_iteration(run_dir, 3)
        ranks = {int(p.environ()["RANK"]): p for p in _workers(launcher)}
        ranks[1].send_signal(signal.SIGTERM)  # not the logging rank: the decision must travel
        signalled = time.monotonic()
        output, _ = launcher.communicate(timeout=120)
        took = time.monotonic() - signalled
    finally:
        for process in psutil.Process(os.getpid()).children(recursive=True):
            if process.pid == launcher.pid or process.ppid() == launcher.pid:
                process.kill()
    assert launcher.returncode == 0, output[-4000:]
    assert output.count("(SIGTERM): saved") == 1, output[-4000:]
    assert "Traceback" not in output
    stopped = read_tracker(run_dir)
    assert stopped is not None and stopped >= 3 and f"stopped at iteration {stopped} (SIGTERM)" in output
    assert took < 60

    resumed = run_pretrain(run_dir, 2, ["scheduler.style=constant", f"train.train_iters={stopped + 2}", *merge])
    resume = [r for r in resumed.metrics if r.get("event") == "resume"]
    assert resume[-1]["iteration"] == stopped and resume[-1]["merge_snapshots"] == 2
    assert [r["iteration"] for r in iteration_records(run_dir)] == list(range(1, stopped + 3))


@pytest.mark.slow
def test_kill_9_during_saves_and_at_random_resumes_exactly():
    """bench/fault_bench.py at a small count: 2 kills (one during a save), merging on."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "fault_bench.py"), "--kills", "2", "--iters", "8",
                           "--formats", "torch_dist", "--json"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kills"] == 2 and result["during_save"] == 1, result
    assert result["tracker_complete_after_every_kill"] and result["each_iteration_once"], result
    assert result["losses_equal_uninterrupted"], result


# ---------------------------------------------------------------------------------------------
# Single-process pieces


def test_async_save_publishes_only_when_written(tmp_path):
    import torch
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import ShardedTensor

    from pretrain import cpu_compat
    from pretrain.async_save import AsyncCheckpointSaver
    from pretrain.checkpoint import is_complete, write_checkpoint
    from pretrain.platform import process_group_teardown

    cpu_compat.enable()
    cfg = load_config(None, [f"checkpoint.save={tmp_path}"])
    with process_group_teardown():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rv'}", rank=0, world_size=1)
        saver = AsyncCheckpointSaver()
        for iteration in (1, 2):
            sd = {"w": ShardedTensor.from_rank_offsets("w", torch.full((4, 3), float(iteration))),
                  "iteration": iteration}
            final = write_checkpoint(sd, tmp_path, iteration, cfg, saver=saver)
            # Scheduled, not published: the tracker still names the previous complete checkpoint.
            assert read_tracker(tmp_path) == (iteration - 1 or None) and not final.exists()
            assert (tmp_path / f"iter_{iteration:07d}.incomplete").is_dir()
            saver.wait()
            assert read_tracker(tmp_path) == iteration and is_complete(final)
        saver.close()


def test_signal_is_deferred_once_then_kills(tmp_path):
    cfg = load_config(None, ["train.exit_signals=[SIGUSR1]"])
    stop = StopConditions(cfg.train)
    try:
        assert stop.reason(1) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.reason(2) == "SIGUSR1"
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # a second SIGUSR1 is not deferred
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_budgets():
    cfg = load_config(None, ["train.exit_interval=5", "train.exit_duration_mins=0.0001",
                             "train.exit_signal_handler=false"])
    stop = StopConditions(cfg.train, started=time.monotonic())
    time.sleep(0.01)
    assert stop.reason(3) == "train.exit_duration_mins=0.0001 reached"
    stop = StopConditions(load_config(None, ["train.exit_interval=5", "train.exit_signal_handler=false"]).train)
    assert [stop.reason(i) for i in (4, 5)] == [None, "train.exit_interval=5 reached"]
    for bad, key in (("train.exit_signals=[SIGKILL]", "train.exit_signals"), ("train.exit_interval=0", "exit_interval"),
                     ("checkpoint.keep_last=0", "checkpoint.keep_last")):
        with pytest.raises(ConfigError, match=key):
            validate(load_config(None, [bad, "checkpoint.save=/tmp/x"]))


def test_retention_rules():
    saved = [10, 20, 30, 40, 50, 60]
    assert iterations_to_delete(saved, None, None) == []
    assert iterations_to_delete(saved, 2, None) == [10, 20, 30, 40]
    assert iterations_to_delete(saved, 1, 20) == [10, 30, 50]
    assert iterations_to_delete(saved, 1, None, protected=[20]) == [10, 30, 40, 50]
    assert iterations_to_delete([70], 1, 1000) == []  # the newest is always kept


def test_still_needed_by_disk_merge_and_recovery():
    # recovery.window: the key before recovery.merge.window, still read
    cfg = load_config(None, ["recovery.enabled=true", "recovery.window=2", "recovery.patience=3"])

    class DiskMerger:
        class spec:
            storage, method = "disk", "sma"
        iterations = [20, 40]

    saved = [10, 20, 30, 40, 50, 60]
    # a spike may have begun at 56 (patience 3): 56..60 saved after it, the 2 before it are good
    assert still_needed(cfg, DiskMerger, 60, saved) == {20, 40, 50, 60}


def test_prune_renames_then_deletes(tmp_path):
    for i in (2, 4, 6):
        (tmp_path / f"iter_{i:07d}").mkdir()
        (tmp_path / f"iter_{i:07d}" / "x").write_text("x")
    assert prune(tmp_path, keep_last=1, keep_every=None) == [2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006"]
    (tmp_path / "iter_0000004.deleting").mkdir()  # a kill during a deletion
    assert any("iter_0000004.deleting" in action for action in recover_interrupted_saves(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006"]


def test_newest_complete_checkpoint_beyond_a_stale_tracker(tmp_path):
    for i in (2, 4):
        (tmp_path / f"iter_{i:07d}").mkdir()
        (tmp_path / f"iter_{i:07d}" / "metadata.json").write_text("{}")
        (tmp_path / f"iter_{i:07d}" / "common.pt").write_bytes(b"")
    (tmp_path / "iter_0000006").mkdir()  # no metadata: not a complete checkpoint
    (tmp_path / TRACKER_FILE).write_text("2\n")
    assert newest_complete_iteration(tmp_path) == 4  # killed between the rename and the tracker update
    (tmp_path / TRACKER_FILE).write_text("4\n")
    assert newest_complete_iteration(tmp_path) == 4


def test_metrics_roll_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"iteration": i, "loss": float(i)} for i in range(1, 6)] + [{"iteration": 4, "event": "save"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"iteration": 6, "lo')  # cut by a kill
    assert metrics_mod.roll_back(path, keep_through=3) == 4
    assert [r["iteration"] for r in metrics_mod.read_metrics(path)] == [1, 2, 3]
    rolled = (tmp_path / "metrics.rolled_back.jsonl").read_text().splitlines()
    assert json.loads(rolled[0])["event"] == "rolled_back" and json.loads(rolled[0])["records"] == 4
    assert len(rolled) == 5 and rolled[-1] == '{"iteration": 6, "lo'  # kept as it was, not lost
    assert metrics_mod.roll_back(path, keep_through=None) == 3 and metrics_mod.read_metrics(path) == []
