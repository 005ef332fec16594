"""kill -9 during training saves and during merges: whatever a killed process leaves behind never
blocks the next run, and is cleaned up.

One single-process ``python -m pretrain`` run (merging in training, a training and a merged
checkpoint every iteration) is killed with SIGKILL the moment a save's staging directory
(``iter_N.incomplete`` or ``merged/iter_N.incomplete``) appears, then resumed from its own save
directory, several times; a leftover ``iter_N.old`` (a kill inside the replace of a checkpoint)
is planted before the last resume. Then ``megatron-merge`` is killed while it writes its
temporary output, several times, and the next merge to the same OUT removes what they left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FAST, REPO, TINY_DENSE

KILLS_DURING_SAVES = 3
KILLS_DURING_MERGES = 4
TRAIN = [*FAST, "model.num_layers=2", "train.global_batch_size=4", "train.train_iters=10",
         "checkpoint.save_interval=1", "merge.enabled=true", "merge.interval=1", "merge.window=2",
         "merge.eval=false"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}


def _leftovers(save: Path) -> list[Path]:
    return sorted([*save.glob("iter_*.incomplete"), *save.glob("iter_*.old"),
                   *save.glob("merged/iter_*.incomplete"), *save.glob("merged/iter_*.old")])


def _start_training(save: Path, log: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "pretrain", "--config", str(TINY_DENSE), *TRAIN, f"checkpoint.save={save}"]
    if resume:
        args.append(f"checkpoint.load={save}")
    return subprocess.Popen(args, cwd=REPO, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 240) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    raise AssertionError("timed out waiting for the kill point")


@pytest.fixture(scope="module")
def killed_training(tmp_path_factory):
    """The run, killed during saves and resumed; returns (save dir, logs, what each kill left)."""
    root = tmp_path_factory.mktemp("kill9")
    save = root / "run"
    logs, left = [], []
    for attempt in range(KILLS_DURING_SAVES):
        log = root / f"attempt{attempt}.log"
        logs.append(log)
        proc = _start_training(save, log, resume=attempt > 0)
        merged_only = attempt % 2 == 1  # alternate: training staging, merged staging
        pattern = "merged/iter_*.incomplete" if merged_only else "iter_*.incomplete"
        tracker = save / "latest_checkpointed_iteration.txt"  # a checkpoint to resume from exists
        assert _kill_when(proc, lambda: tracker.exists() and any(save.glob(pattern))), log.read_text()[-3000:]
        left.append(_leftovers(save))
    # A kill inside publish_checkpoint's replace leaves a non-empty iter_N.old beside iter_N.
    newest = sorted(p for p in save.glob("iter_???????") if p.is_dir())[-1]
    shutil.copytree(newest, newest.with_name(newest.name + ".old"))
    log = root / "final.log"
    logs.append(log)
    proc = _start_training(save, log, resume=True)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    return save, logs, left


def test_every_kill_left_a_staging_directory(killed_training):
    _, _, left = killed_training
    assert all(any(p.name.endswith(".incomplete") for p in found) for found in left), left


def test_resumes_after_kills_clean_up_and_finish_the_run(killed_training):
    save, logs, _ = killed_training
    assert _leftovers(save) == []
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert (save / "merged" / "iter_0000010").is_dir()
    for log in logs[1:]:  # every resume found and removed what the kill before it left
        text = log.read_text()
        assert "checkpoint leftovers: removed" in text, text[-3000:]
    assert "interrupted replace" in logs[-1].read_text()
    assert "was not written" in logs[2].read_text()  # the merged save killed in attempt 1


def test_kill_9_during_merges_leaves_nothing_the_next_merge_does_not_remove(killed_training, tmp_path):
    save, _, _ = killed_training
    inputs = [str(save / f"iter_{i:07d}") for i in (8, 9, 10)]
    out = tmp_path / "merged"
    siblings = lambda: sorted(tmp_path.glob(f".{out.name}.merging-*"))  # noqa: E731
    killed = []
    for _ in range(4 * KILLS_DURING_MERGES):
        if len(killed) == KILLS_DURING_MERGES:
            break
        proc = subprocess.Popen([sys.executable, "-m", "megatron_merge", "--no-progress", "--out", str(out), *inputs],
                                cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mine = lambda: [p for p in siblings() if f"-{proc.pid}-" in p.name]  # noqa: E731
        if _kill_when(proc, lambda: bool(mine()), timeout=120):
            killed.append(proc.pid)
            # each merge removed the sibling of the one killed before it: one is left
            assert [p for p in siblings()] == mine(), siblings()
        elif out.exists():
            shutil.rmtree(out)  # it finished before the kill: try again
    assert len(killed) == KILLS_DURING_MERGES
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-m", "megatron_merge", "--no-progress", "--out", str(out), *inputs],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"earlier merge (pid {killed[-1]})" in proc.stderr, proc.stderr
    assert siblings() == [] and (out / "merge.json").is_file()


def test_a_live_merges_temporary_output_is_left_alone(tmp_path):
    from megatron_merge.atomic_output import _HOST, remove_stale_siblings

    out = tmp_path / "merged"
    live = tmp_path / f".merged.merging-{_HOST}-{os.getpid()}-abcdef12"
    other_host = tmp_path / f".merged.merging-elsewhere-1-abcdef12"
    dead = tmp_path / f".merged.merging-{_HOST}-999999999-abcdef12"
    for path in (live, other_host, dead):
        path.mkdir()
    assert remove_stale_siblings(out) == [dead]
    assert live.exists() and other_host.exists()


@pytest.mark.parametrize("state", ["replaced", "between_renames", "only_old"])
def test_every_state_a_kill_inside_publish_can_leave_is_recovered(tmp_path, state):
    """publish_checkpoint replaces iter_N by renaming it to iter_N.old, the new save into place,
    then removing iter_N.old: a kill between any two steps leaves one of these states."""
    from pretrain.checkpoint import recover_interrupted_saves

    final, old, staging = tmp_path / "iter_0000005", tmp_path / "iter_0000005.old", tmp_path / "iter_0000005.incomplete"
    old.mkdir()
    (old / "what").write_text("previous")
    if state == "replaced":
        final.mkdir()
        (final / "what").write_text("new")
    elif state == "between_renames":
        staging.mkdir()
        (staging / "what").write_text("new")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4\n")
    actions = recover_interrupted_saves(tmp_path)
    assert len(actions) == 1, actions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005", "latest_checkpointed_iteration.txt"]
    assert (final / "what").read_text() == ("previous" if state == "only_old" else "new")
    expected_tracker = "5" if state == "between_renames" else "4"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == expected_tracker
