"""In-training merging: each rank merges its own partition; bit-exact against the offline tool."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, TINY_DENSE, run_pretrain
from merge_reference import load_full, model_keys

pytestmark = pytest.mark.slow

ITERS, INTERVAL, WINDOW = 16, 4, 3
MERGE = ["merge.enabled=true", f"merge.interval={INTERVAL}", f"merge.window={WINDOW}",
         f"checkpoint.save_interval={INTERVAL}", f"train.train_iters={ITERS}", "train.eval_interval=8"]


def offline_merge(run_dir, out, method, iterations, alpha=None):
    args = [sys.executable, "-m", "megatron_merge", "--no-progress", "--method", method,
            "--iterations", ",".join(map(str, iterations)), "--out", str(out), str(run_dir)]
    if alpha is not None:
        args[4:4] = ["--alpha", str(alpha)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def assert_same_model(a, b):
    keys = model_keys(a)
    assert keys == model_keys(b) and keys
    for key in keys:
        assert torch.equal(load_full(a, key), load_full(b, key)), key


TINY_MOE = REPO / "configs" / "tiny-moe.yaml"
MOE = ["moe.num_experts=4", "moe.ffn_hidden_size=64", "parallel.expert_model_parallel_size=2"]
LAYOUTS = {
    "tp2-sma": (["parallel.tensor_model_parallel_size=2"], "sma"),
    "pp2-ema": (["parallel.pipeline_model_parallel_size=2"], "ema"),
    # DP=2: each parameter's snapshots live on one replica; merged values are broadcast.
    "dp2-wma": ([], "wma"),
    # MoE at EP=2: each rank merges its own experts; dense parameters are shared over DP=2.
    "ep2-sma": (MOE, "sma"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One merging run per layout/method, shared by the tests below."""
    root = tmp_path_factory.mktemp("online")
    return {name: run_pretrain(root / name, 2, [*MERGE, f"merge.method={method}", "merge.ema_alpha=0.3", *layout],
                               config=TINY_MOE if name.startswith("ep") else TINY_DENSE)
            for name, (layout, method) in LAYOUTS.items()}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_in_training_merge_equals_offline_merge(runs, tmp_path, name):
    run, method = runs[name], LAYOUTS[name][1]
    merged = run.run_dir / "merged" / f"iter_{ITERS:07d}"
    record = json.loads((merged / "merge.json").read_text())
    if method == "ema":  # a running EMA over every snapshot
        iterations = list(range(INTERVAL, ITERS + 1, INTERVAL))
    else:
        iterations = list(range(ITERS - INTERVAL * (WINDOW - 1), ITERS + 1, INTERVAL))
    assert [i["iteration"] for i in record["inputs"]] == iterations
    offline = offline_merge(run.run_dir, tmp_path / "offline", method, iterations,
                            alpha=0.3 if method == "ema" else None)
    assert_same_model(merged, offline)
    # The merged checkpoint differs from the raw newest one and is logged at each evaluation.
    key = next(k for k in model_keys(merged) if "linear_fc2" in k)
    assert not torch.equal(load_full(merged, key), load_full(run.run_dir / f"iter_{ITERS:07d}", key))
    evals = [r for r in run.metrics if "val_loss" in r]
    assert all("val_loss_merged" in r and r["merge_method"] == method for r in evals)
    assert evals[-1]["merge_n"] == len(iterations) and evals[-1]["merge_span"] == [iterations[0], iterations[-1]]
    assert "val_loss_merged" in run.output  # the closing summary


def test_resume_mid_window_gives_the_uninterrupted_merge(runs, tmp_path):
    """Stop at 4, resume: the 3-snapshot windows at 8 and 12 hold the snapshot taken before the
    stop (restored from the checkpoint's merge state); the merges equal the tp2-sma run's."""
    whole = runs["tp2-sma"]
    part = [*MERGE, "parallel.tensor_model_parallel_size=2"]
    split = tmp_path / "split"
    run_pretrain(split, 2, [*part, "checkpoint.exit_after_save=true"])  # 0 -> 4
    resumed = run_pretrain(split, 2, [*part, f"checkpoint.load={split}"])  # 4 -> 16
    assert resumed.losses == whole.losses
    for it in (8, 12, 16):
        assert_same_model(whole.run_dir / "merged" / f"iter_{it:07d}", split / "merged" / f"iter_{it:07d}")


def test_disk_storage_merges_like_host_storage(runs, tmp_path):
    host = runs["dp2-wma"]
    disk = run_pretrain(tmp_path / "disk", 2, [*MERGE, "merge.method=wma", "merge.storage=disk"])
    assert host.losses == disk.losses
    assert [r["val_loss_merged"] for r in host.metrics if "val_loss_merged" in r] == \
           [r["val_loss_merged"] for r in disk.metrics if "val_loss_merged" in r]
    assert_same_model(host.run_dir / "merged" / f"iter_{ITERS:07d}", tmp_path / "disk" / "merged" / f"iter_{ITERS:07d}")


def test_evaluating_merged_weights_leaves_training_unchanged(runs, tmp_path):
    merged = runs["tp2-sma"]
    plain = run_pretrain(tmp_path / "plain", 2, [f"train.train_iters={ITERS}", "train.eval_interval=8",
                                                 "parallel.tensor_model_parallel_size=2"])
    assert merged.losses == plain.losses
    assert [r["val_loss"] for r in merged.metrics if "val_loss" in r] == \
           [r["val_loss"] for r in plain.metrics if "val_loss" in r]
    assert all(r["val_loss_merged"] != r["val_loss"] for r in merged.metrics if "val_loss" in r)


def test_merged_checkpoint_loads_into_pretrain_and_megatron_merge(runs, tmp_path):
    merged_run = runs["tp2-sma"].run_dir / "merged"
    cont = run_pretrain(tmp_path / "cont", 2, ["train.train_iters=20", f"checkpoint.load={merged_run}",
                                               "parallel.pipeline_model_parallel_size=2"])
    assert len(cont.losses) == 4 and all(l == l for l in cont.losses)
    out = offline_merge(merged_run, tmp_path / "of_merged", "sma", [12, 16])
    assert (out / "merge.json").is_file()
