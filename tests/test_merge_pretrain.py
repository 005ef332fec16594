"""megatron-merge on checkpoints from real `pretrain` runs (TP=2, PP=2, TP=1), and the merged
checkpoint loaded back into `pretrain` at the same and at another layout."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, run_pretrain
from merge_reference import load_full, model_keys, reference_merge
from megatron_merge.weights import merge_weights

pytestmark = pytest.mark.slow

LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "tp1": [],  # DP=2
}
SAVES = (4, 8, 12)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, layout in LAYOUTS.items():
        run_pretrain(root / name, 2, ["train.train_iters=12", "checkpoint.save_interval=4", *layout])
    return root


def merge_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_merge", "--no-progress", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method, alpha", [("sma", None), ("ema", 0.2), ("wma", None)])
def test_cli_merge_of_real_checkpoints_is_bit_exact(runs, tmp_path, layout, method, alpha):
    out = tmp_path / "merged"
    extra = ["--alpha", alpha] if alpha else []
    proc = merge_cli("--method", method, *extra, "--last", 3, "--out", out, runs / layout)
    assert proc.returncode == 0, proc.stderr
    inputs = [runs / layout / f"iter_{i:07d}" for i in SAVES]
    weights = merge_weights(method, 3, alpha=alpha)
    keys = model_keys(inputs[-1])
    assert any("linear_qkv.weight" in k for k in keys) and "embedding.word_embeddings.weight" in keys
    for key in keys:
        merged = load_full(out, key)
        assert merged.dtype == torch.float32
        assert torch.equal(merged, reference_merge(inputs, key, weights, ema_alpha=alpha)), key
    record = json.loads((out / "merge.json").read_text())
    assert [i["iteration"] for i in record["inputs"]] == list(SAVES)
    # Optimizer state comes from the newest input, unchanged (so training can resume).
    opt_key = next(k for k in _all_keys(inputs[-1]) if k.startswith("optimizer.state.exp_avg."))
    assert torch.equal(load_full(out, opt_key), load_full(inputs[-1], opt_key))


def _all_keys(path):
    from torch.distributed.checkpoint import FileSystemReader

    return sorted(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def test_same_run_saved_at_tp1_and_tp2_merges_identically(runs, tmp_path):
    """Re-save the TP=2 run's checkpoints at TP=1 (load, no training, save), merge both sets."""
    for it in SAVES:
        run_pretrain(tmp_path / "as_tp1", 1, [f"train.train_iters={it}", "scheduler.decay_iters=12",
                                              f"checkpoint.load={runs / 'tp2' / f'iter_{it:07d}'}"])
    for out, run in ((tmp_path / "m_tp2", runs / "tp2"), (tmp_path / "m_tp1", tmp_path / "as_tp1")):
        proc = merge_cli("--last", 3, "--out", out, run)
        assert proc.returncode == 0, proc.stderr
    for key in model_keys(tmp_path / "m_tp2"):
        assert torch.equal(load_full(tmp_path / "m_tp1", key), load_full(tmp_path / "m_tp2", key)), key
    # The layouts really differ on disk.
    assert len(list((tmp_path / "m_tp2").glob("*.distcp"))) != len(list((tmp_path / "m_tp1").glob("*.distcp")))


def test_merged_checkpoint_trains_on_at_same_and_other_layout(runs, tmp_path):
    merged = tmp_path / "merged" / "iter_0000012"
    proc = merge_cli("--method", "sma", "--out", merged, runs / "tp2" / "iter_0000004", runs / "tp2" / "iter_0000008",
                     runs / "tp2" / "iter_0000012")
    assert proc.returncode == 0, proc.stderr
    same = run_pretrain(tmp_path / "same", 2, ["train.train_iters=16", "parallel.tensor_model_parallel_size=2",
                                               f"checkpoint.load={merged}"])
    other = run_pretrain(tmp_path / "other", 2, ["train.train_iters=16", "parallel.pipeline_model_parallel_size=2",
                                                 f"checkpoint.load={merged}"])
    assert len(same.losses) == len(other.losses) == 4
    # The same merged weights at both layouts (that they are the merge, not the newest input, the
    # bit-exact test above checks on disk; resuming trains on from them).
    assert same.losses[0] == pytest.approx(other.losses[0], rel=1e-5)
    assert all(torch.isfinite(torch.tensor(same.losses + other.losses)))
