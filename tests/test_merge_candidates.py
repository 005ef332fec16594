"""Merge candidates: many merges from one snapshot store, bit-exact against the offline tool."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, free_port, run_pretrain
from test_merge_online import assert_same_model, offline_merge

ITERS, INTERVAL = 8, 2
CANDIDATES = {  # name -> (slug, method, alpha, iterations merged at ITERS)
    "sma:3": ("sma_3", "sma", None, [4, 6, 8]),
    "wma:4": ("wma_4", "wma", None, [2, 4, 6, 8]),
    "ema:0.3": ("ema_0.3", "ema", 0.3, [2, 4, 6, 8]),
    "sma:2/every2": ("sma_2_every2", "sma", None, [4, 8]),
}
RUN = ["merge.enabled=true", f"merge.interval={INTERVAL}", "merge.window=3", f"checkpoint.save_interval={INTERVAL}",
       f"train.train_iters={ITERS}", "train.eval_interval=4", f"scheduler.decay_iters={ITERS}",
       f"merge.candidates=[{','.join(CANDIDATES)}]", "merge.save_candidates=true", "merge.keep_last=2",
       "parallel.tensor_model_parallel_size=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pretrain(tmp_path_factory.mktemp("candidates") / "run", 2, RUN)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CANDIDATES))
def test_each_candidate_equals_the_offline_merge(run, tmp_path, name):
    slug, method, alpha, iterations = CANDIDATES[name]
    merged = run.run_dir / "merged_candidates" / slug / f"iter_{ITERS:07d}"
    record = json.loads((merged / "merge.json").read_text())
    assert record["candidate"] == name and [i["iteration"] for i in record["inputs"]] == iterations
    assert_same_model(merged, offline_merge(run.run_dir, tmp_path / "offline", method, iterations, alpha=alpha))
    last = [r for r in run.metrics if "val_loss" in r][-1]
    assert last["candidate_merges"][name] == {"n": len(iterations), "span": [iterations[0], iterations[-1]]}


@pytest.mark.slow
def test_candidates_are_logged_at_every_evaluation(run):
    evals = [r for r in run.metrics if "val_loss" in r]
    assert [r["iteration"] for r in evals] == [4, 8]
    # At 4 the store holds snapshots 2 and 4: sma:2/every2 has one snapshot only and waits.
    assert sorted(evals[0]["val_loss_candidates"]) == ["ema:0.3", "sma:3", "wma:4"]
    assert sorted(evals[1]["val_loss_candidates"]) == sorted(CANDIDATES)
    for r in evals:  # the primary merge (sma over 3) is the sma:3 candidate: the same weights
        assert r["val_loss_candidates"]["sma:3"] == r["val_loss_merged"]
        assert len(set(r["val_loss_candidates"].values()) | {r["val_loss"]}) == len(r["val_loss_candidates"]) + 1
    assert "merge candidates  iteration" in run.output and "noise level" in run.output  # the summary's table
    assert "merge store: 4 snapshot(s) + 1 fp32 EMA accumulator(s)" in run.output  # stated at start-up
    assert (run.run_dir / "merge_candidates.png").stat().st_size > 10_000
    # merge.keep_last=2 keeps exactly two merged checkpoints, applied after each save's merges exist
    assert sorted(p.name for p in (run.run_dir / "merged").glob("iter_*")) == ["iter_0000006", "iter_0000008"]
    for slug, *_ in CANDIDATES.values():  # merge.keep_last applies to each candidate's merges too
        assert sorted(p.name for p in (run.run_dir / "merged_candidates" / slug).glob("iter_*")) == \
               ["iter_0000006", "iter_0000008"]


@pytest.mark.slow
def test_candidates_leave_training_unchanged(run, tmp_path):
    """The raw weights are restored bit-exactly after the candidates' evaluations and saves."""
    plain = run_pretrain(tmp_path / "plain", 2, [o for o in RUN if not o.startswith(("merge.candidates",
                                                                                      "merge.save_candidates"))])
    assert plain.losses == run.losses and plain.val_losses == run.val_losses
    assert "val_loss_candidates" not in plain.metrics[-2]


@pytest.mark.slow
def test_resume_keeps_every_candidate_state(run, tmp_path):
    """Stop at 6 (mid-window, the EMAs three snapshots in), resume: the candidates at 8 equal the
    uninterrupted run's bit for bit."""
    split = tmp_path / "split"
    run_pretrain(split, 2, [*RUN, "train.exit_interval=6"])
    resumed = run_pretrain(split, 2, RUN)
    assert "resuming at iteration 6" in resumed.output
    assert resumed.losses == run.losses  # one metrics file: iterations 1-6, then 7-8 resumed
    assert [r for r in resumed.metrics if r.get("iteration") == 8 and "val_loss" in r][0]["val_loss_candidates"] == \
           [r for r in run.metrics if r.get("iteration") == 8 and "val_loss" in r][0]["val_loss_candidates"]
    for slug, *_ in CANDIDATES.values():
        assert_same_model(run.run_dir / "merged_candidates" / slug / f"iter_{ITERS:07d}",
                          split / "merged_candidates" / slug / f"iter_{ITERS:07d}")


@pytest.mark.slow
def test_store_over_budget_is_refused(tmp_path):
    refused = run_pretrain(tmp_path / "budget", 1, [*RUN[:-1], "merge.max_store_mib=0.01"], check=False)
    assert refused.returncode != 0
    assert "error: merge.max_store_mib: the merge store needs" in refused.output
    assert not list((tmp_path / "budget").glob("iter_*"))


@pytest.mark.parametrize("entry, message", [
    ("foo", "'foo' is not a merge candidate; expected METHOD:N[/everyK]"),
    ("sma:1", "'sma:1': N must be >= 2"),
    ("ema:1.5", "'ema:1.5': ALPHA must be in (0, 1]"),
    ("wma:3/every0", "'wma:3/every0': K must be >= 1"),
    ("sma:3/every1", "'sma:3/every1' repeats candidate sma:3"),
])
def test_bad_candidate_strings_get_a_clear_error(capsys, entry, message):
    from pretrain.__main__ import main

    assert main(["--validate-only", "merge.enabled=true", "merge.interval=2", "merge.save=false",
                 f"merge.candidates=[sma:3,{entry}]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: merge.candidates[1]: ") and message in err, err


def _torchrun(*args):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


@pytest.mark.slow
def test_sweep_equals_evaluate_of_the_written_out_merge(run, tmp_path):
    """The sweep merges in memory (the run directory is left as it was); the best candidate's
    printed megatron-merge command writes a checkpoint whose pretrain.evaluate loss is the sweep's."""
    before = sorted(p.name for p in run.run_dir.iterdir())
    out = tmp_path / "sweep.jsonl"
    stdout = _torchrun("-m", "pretrain.evaluate", "--sweep", run.run_dir, "--methods", "sma,ema", "--last", "2,3",
                       "--every", "1,2", "--alphas", "0.3", "--end", "6", "8", "--out", out,
                       "--plot", tmp_path / "sweep.png")
    assert sorted(p.name for p in run.run_dir.iterdir()) == before
    records = [json.loads(line) for line in out.read_text().splitlines()]
    at8 = {r["candidate"]: r for r in records if r["end_iteration"] == 8}
    # sma:3/every2 needs 5 saved iterations at or before 8 (2, 4, 6, 8 are saved): left out.
    assert sorted(at8) == sorted(["raw", "sma:2", "sma:2/every2", "sma:3", "ema0.3:2", "ema0.3:2/every2", "ema0.3:3"])
    assert at8["sma:2/every2"]["iterations"] == [4, 8] and at8["sma:3"]["iterations"] == [4, 6, 8]
    logged = [r for r in run.metrics if r.get("iteration") == 8 and "val_loss" in r][0]
    assert at8["raw"]["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-6, abs=0)
    assert at8["sma:3"]["val_loss"] == pytest.approx(logged["val_loss_candidates"]["sma:3"], rel=1e-6, abs=0)
    assert "merge candidates  iteration" in stdout and (tmp_path / "sweep.png").stat().st_size > 10_000

    command = shlex.split(stdout.split("write it out with:\n")[1].splitlines()[0])
    assert command[0] == "megatron-merge"
    merged = Path(command[command.index("--out") + 1])
    subprocess.run([sys.executable, "-m", "megatron_merge", "--no-progress", *command[1:]], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    best = min((r for r in at8.values() if r["candidate"] != "raw"), key=lambda r: r["val_loss"])
    evaluated = tmp_path / "evaluated.jsonl"
    _torchrun("-m", "pretrain.evaluate", "--checkpoints", merged, "--out", evaluated)
    assert json.loads(evaluated.read_text())["val_loss"] == best["val_loss"]


@pytest.mark.slow
def test_an_ema_primary_keeps_a_store_for_window_candidates(tmp_path):
    """The primary merge is a running EMA (no window of its own): the store exists for the
    candidates alone, is saved with the EMA accumulator, and survives a resume at 6."""
    options = [o for o in RUN if not o.startswith("merge.candidates")] + ["merge.method=ema", "merge.ema_alpha=0.3",
                                                                          "merge.candidates=[wma:3]"]
    split = tmp_path / "ema"
    run_pretrain(split, 2, [*options, "train.exit_interval=6"])
    resumed = run_pretrain(split, 2, options)
    assert "merge store: 3 snapshot(s) + 1 fp32 EMA accumulator(s)" in resumed.output
    merged = split / "merged_candidates" / "wma_3" / f"iter_{ITERS:07d}"
    assert_same_model(merged, offline_merge(split, tmp_path / "offline", "wma", [4, 6, 8]))
    assert_same_model(split / "merged" / f"iter_{ITERS:07d}",
                      offline_merge(split, tmp_path / "offline_ema", "ema", [2, 4, 6, 8], alpha=0.3))
