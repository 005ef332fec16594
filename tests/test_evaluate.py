"""pretrain.evaluate: validation loss of saved checkpoints equals what training logged."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, free_port, run_pretrain


@pytest.mark.slow
def test_evaluate_matches_the_val_loss_training_logged(tmp_path):
    run = run_pretrain(tmp_path / "run", 2, ["train.train_iters=8", "checkpoint.save_interval=4",
                                             "train.eval_interval=4", "scheduler.style=constant"])
    logged = dict(run.val_losses)
    assert sorted(logged) == [4, 8]

    out = tmp_path / "eval.jsonl"
    # No --config: the run config saved beside the first checkpoint.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "pretrain.evaluate", "--checkpoints", str(tmp_path / "run" / "iter_0000004"),
         str(tmp_path / "run"), "--out", str(out)],  # a run directory means its newest checkpoint
        cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [4, 8]
    assert [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")] == records  # stdout too
    for r in records:  # same weights, same batches, same layout: the same number
        assert r["val_loss"] == pytest.approx(logged[r["iteration"]], rel=1e-6, abs=0), r


def test_evaluate_refuses_missing_checkpoints(tmp_path, capsys):
    from pretrain.evaluate import main

    assert main(["--checkpoints", str(tmp_path / "nope"), "train.eval_iters=2"]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint" in err and "overrides go before --checkpoints" in err
