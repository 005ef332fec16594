"""Dense GPT training with real torchrun processes on gloo: TP, PP, DP, resume, resharding."""

import re
import shutil

import pytest
import yaml

from helpers import run_pretrain
from pretrain.checkpoint import TRACKER_FILE

pytestmark = pytest.mark.slow

ITERS = 24


def banner_parameters(output: str) -> tuple[int, int]:
    """(the model's parameters, rank 0's) from the start-up banner."""
    line = next(line for line in output.splitlines() if line.strip().startswith("parameters"))
    total, local = (int(x.replace(",", "")) for x in re.findall(r"[\d,]{2,}", line))
    return total, local


# helpers.FAST's dense GPT counted by hand: untied embedding and output layer (vocabulary 257 padded
# to 384), per layer QKV + projection + SwiGLU MLP + 2 RMSNorms, a final RMSNorm.
H, FFN, LAYERS, VOCAB = 64, 128, 4, 384
FAST_PARAMETERS = 2 * VOCAB * H + LAYERS * (3 * H * H + H * H + H * 2 * FFN + FFN * H + 2 * H) + H


def falls(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    """TP=2, saving at 12 and 24, validating every 12."""
    run_dir = tmp_path_factory.mktemp("tp2")
    return run_pretrain(run_dir, 2, [f"train.train_iters={ITERS}", "parallel.tensor_model_parallel_size=2",
                                     "checkpoint.save_interval=12", "train.eval_interval=12"])


def test_tp2_trains_logs_and_saves(tp2_run):
    run = tp2_run
    assert len(run.losses) == ITERS and falls(run.losses), run.losses
    steps = [r for r in run.metrics if "loss" in r]
    for field in ("iteration", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples"):
        assert all(field in r for r in steps), field
    assert [r["iteration"] for r in steps] == list(range(1, ITERS + 1))
    assert steps[-1]["consumed_samples"] == ITERS * 8
    assert [it for it, _ in run.val_losses] == [12, 24]
    assert run.val_losses[1][1] < run.val_losses[0][1]
    # Megatron layout, tracker, resolved config beside each checkpoint.
    assert (run.run_dir / TRACKER_FILE).read_text().strip() == str(ITERS)
    for it in (12, 24):
        d = run.run_dir / f"iter_{it:07d}"
        assert (d / "metadata.json").is_file() and (d / "common.pt").is_file() and (d / ".metadata").is_file()
        saved = yaml.safe_load((d / "run_config.yaml").read_text())
        assert saved["parallel"]["tensor_model_parallel_size"] == 2
    assert "run summary" in run.output and "validation" in run.output
    total, local = banner_parameters(run.output)  # TP=2: rank 0 holds half of each matrix, all of each norm
    assert total == FAST_PARAMETERS and local == (FAST_PARAMETERS - (2 * LAYERS + 1) * H) // 2 + (2 * LAYERS + 1) * H
    assert "world 2 = TP 2 x PP 1 x DP 1" in run.output and "ETA " in run.output


@pytest.mark.parametrize("layout", [["parallel.pipeline_model_parallel_size=2"], []], ids=["pp2", "dp2"])
def test_pp2_and_dp2_train(tmp_path, layout, tp2_run):
    run = run_pretrain(tmp_path / "run", 2, [f"train.train_iters={ITERS}", *layout])
    assert falls(run.losses), run.losses
    # PP=2, DP=2 (TP=1) and TP=2 start from the same weights and see the same data.
    assert run.losses[0] == pytest.approx(tp2_run.losses[0], rel=1e-5)
    assert banner_parameters(run.output)[0] == FAST_PARAMETERS  # the same model at every layout


def test_resume_continues_exactly(tmp_path, tp2_run):
    """12 iterations, stop, resume to 24: the same losses as the uninterrupted TP=2 run."""
    first = run_pretrain(tmp_path / "run", 2, [f"train.train_iters={ITERS}", "parallel.tensor_model_parallel_size=2",
                                               "checkpoint.save_interval=12", "checkpoint.exit_after_save=true",
                                               "train.eval_interval=12"])
    assert len(first.losses) == 12
    resumed = run_pretrain(tmp_path / "run", 2, [f"train.train_iters={ITERS}", "parallel.tensor_model_parallel_size=2",
                                                 "checkpoint.save_interval=12", f"checkpoint.load={tmp_path / 'run'}",
                                                 "train.eval_interval=12"])
    assert resumed.losses == tp2_run.losses  # the metrics file was appended to
    assert resumed.val_losses == tp2_run.val_losses


def test_distributed_optimizer_resume_and_load_at_another_layout(tmp_path, tp2_run):
    """A TP=2 checkpoint loads at PP=2 with the distributed optimizer state path, and vice versa."""
    src = tp2_run.run_dir / "iter_0000012"
    pp2 = run_pretrain(tmp_path / "pp2", 2, [f"train.train_iters={ITERS}", "parallel.pipeline_model_parallel_size=2",
                                             f"checkpoint.load={src}"])
    # Same weights, optimizer state and data position: iteration 13 sees the same loss.
    assert pp2.losses[0] == pytest.approx(tp2_run.losses[12], rel=1e-5)
    assert pp2.losses[-1] == pytest.approx(tp2_run.losses[-1], rel=1e-3)

    dist = run_pretrain(tmp_path / "do", 2, ["train.train_iters=12", "parallel.use_distributed_optimizer=true",
                                             "checkpoint.save_interval=6"])
    again = run_pretrain(tmp_path / "do2", 2, ["train.train_iters=12", "parallel.use_distributed_optimizer=true",
                                               f"checkpoint.load={tmp_path / 'do' / 'iter_0000006'}"])
    assert again.losses == dist.losses[6:]
    tp = run_pretrain(tmp_path / "do-tp2", 2, ["train.train_iters=12", "parallel.use_distributed_optimizer=true",
                                               "parallel.tensor_model_parallel_size=2",
                                               f"checkpoint.load={tmp_path / 'do' / 'iter_0000006'}"])
    assert tp.losses[0] == pytest.approx(dist.losses[6], rel=1e-5)


def test_bad_checkpoint_load_fails_clearly(tmp_path, tp2_run):
    broken = tmp_path / "broken"
    shutil.copytree(tp2_run.run_dir / "iter_0000012", broken / "iter_0000012")
    (broken / TRACKER_FILE).write_text("12\n")
    (broken / "iter_0000012" / "__0_0.distcp").write_bytes(b"garbage")
    run = run_pretrain(tmp_path / "out", 2, ["train.train_iters=14", f"checkpoint.load={broken}"], check=False)
    assert run.returncode != 0
    assert "iter_0000012" in run.output and "error:" in run.output
    empty = tmp_path / "empty"
    empty.mkdir()
    run = run_pretrain(tmp_path / "out2", 1, ["train.train_iters=14", f"checkpoint.load={empty}"], check=False)
    assert run.returncode != 0 and "latest_checkpointed_iteration.txt" in run.output


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path):
    import subprocess
    import sys

    from helpers import FAST, REPO, TINY_DENSE, free_port

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            str(REPO / "tests" / "scripts" / "crash_during_save.py"), str(TINY_DENSE), *FAST,
            f"checkpoint.save={run_dir}", "train.train_iters=12", "checkpoint.save_interval=6"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (run_dir / TRACKER_FILE).read_text().strip() == "6"
    assert not (run_dir / "iter_0000012").exists()
    assert (run_dir / "iter_0000012.incomplete").exists()
    # Resuming picks up the last complete checkpoint and finishes the run.
    resumed = run_pretrain(run_dir, 2, ["train.train_iters=12", "checkpoint.save_interval=6",
                                        f"checkpoint.load={run_dir}"])
    assert [r["iteration"] for r in resumed.metrics if "loss" in r][-6:] == list(range(7, 13))
    assert (run_dir / TRACKER_FILE).read_text().strip() == "12"
    assert not (run_dir / "iter_0000012.incomplete").exists()


def test_bf16_with_distributed_optimizer_resumes_exactly_and_merges_master_weights(tmp_path):
    """bf16 keeps fp32 master weights in the optimizer: resume is exact, and an offline merge
    merges the masters too, so training from the merged checkpoint starts from merged weights."""
    import subprocess
    import sys

    import torch

    from helpers import REPO
    from merge_reference import load_full, reference_merge

    common = ["train.precision=bf16", "parallel.use_distributed_optimizer=true", "train.train_iters=12",
              "checkpoint.save_interval=4"]
    whole = run_pretrain(tmp_path / "whole", 2, common)
    run_pretrain(tmp_path / "split", 2, [*common, "checkpoint.exit_after_save=true"])
    resumed = run_pretrain(tmp_path / "split", 2, [*common, f"checkpoint.load={tmp_path / 'split'}"])
    assert resumed.losses == whole.losses and falls(whole.losses)

    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "megatron_merge", "--no-progress", "--last", "3", "--out", str(out),
                           str(tmp_path / "whole")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    inputs = [tmp_path / "whole" / f"iter_{i:07d}" for i in (4, 8, 12)]
    key = "decoder.layers.mlp.linear_fc2.weight"
    master = f"optimizer.state.param.{key}"
    assert load_full(out, key).dtype == torch.bfloat16 and load_full(out, master).dtype == torch.float32
    assert torch.equal(load_full(out, master), reference_merge(inputs, master, [1 / 3] * 3))
    # Loaded with its optimizer state, the merged checkpoint trains on from the merged master
    # weights, not from the newest input's: one step later they are still next to the merge.
    run_pretrain(tmp_path / "cont", 2, [*common, "train.train_iters=13", f"checkpoint.load={out}"])
    saved = load_full(tmp_path / "cont" / "iter_0000013", master)
    assert (saved - load_full(out, master)).abs().max() < 0.1  # one small step from the merge
    assert (saved - load_full(inputs[-1], master)).abs().max() > (saved - load_full(out, master)).abs().max()


def test_summary_counts_the_iterations_this_run_made(capsys):
    """A continued run (init_keep_iteration, resume) reports what it ran, not the iteration it ended at."""
    from pretrain.config import RunConfig
    from pretrain.summary import print_summary
    from pretrain.train import RunSummary

    print_summary(RunConfig(), RunSummary(iterations=480, start_iteration=400, first_loss=2.0, last_loss=1.5, seconds=3))
    assert "iterations        80 (iterations 400 -> 480) in 3.0 s" in capsys.readouterr().out
    print_summary(RunConfig(), RunSummary(iterations=50, first_loss=2.0, last_loss=1.5, seconds=3))
    assert "iterations        50 in 3.0 s" in capsys.readouterr().out
