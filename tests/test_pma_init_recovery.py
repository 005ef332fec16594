"""PMA-init (a new phase from merged weights) and automatic loss-spike recovery."""

import subprocess
import sys

import pytest
import torch

from helpers import REPO, TINY_DENSE, run_pretrain
from merge_reference import load_full, model_keys, reference_merge

pytestmark = pytest.mark.slow

LR, WD, BETA1, BETA2, EPS = 3e-3, 0.1, 0.9, 0.95, 1e-8


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A constant-LR TP=2 run saving every 4 iterations: the checkpoints PMA-init merges."""
    run_dir = tmp_path_factory.mktemp("source")
    run_pretrain(run_dir, 2, ["train.train_iters=12", "checkpoint.save_interval=4",
                              "parallel.tensor_model_parallel_size=2", "scheduler.style=constant"])
    merged = run_dir.parent / "offline-merged"
    proc = subprocess.run([sys.executable, "-m", "megatron_merge", "--no-progress", "--last", "3", "--out",
                           str(merged), str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run_dir, merged


def test_pma_init_loads_exactly_the_merged_weights_then_trains(source_run, tmp_path):
    run_dir, offline = source_run
    init = ["parallel.tensor_model_parallel_size=2", f"checkpoint.init_from={run_dir}",
            "checkpoint.init_merge.enabled=true", "checkpoint.init_merge.method=sma", "checkpoint.init_merge.window=3",
            "scheduler.warmup_iters=0", "scheduler.style=constant"]
    # train_iters=0: the run saves what it starts from, at iteration 0.
    start = run_pretrain(tmp_path / "start", 2, [*init, "train.train_iters=0"])
    event = next(r for r in start.metrics if r.get("event") == "init")
    assert event["iterations"] == [4, 8, 12] and event["method"] == "sma" and event["iteration"] == 0
    for key in model_keys(offline):
        assert torch.equal(load_full(tmp_path / "start" / "iter_0000000", key), load_full(offline, key)), key

    # One step with a fresh optimizer is a fresh AdamW step from those weights.
    one = run_pretrain(tmp_path / "one", 2, [*init, "train.train_iters=1"])
    assert one.metrics[0]["event"] == "init" and len(one.losses) == 1
    after = tmp_path / "one" / "iter_0000001"
    key = next(k for k in model_keys(offline) if k.endswith("linear_fc2.weight"))
    p0, p1 = load_full(offline, key).double(), load_full(after, key).double()
    m, v = (load_full(after, f"optimizer.state.{name}.{key}").double() for name in ("exp_avg", "exp_avg_sq"))
    g = m / (1 - BETA1)  # step 1: m = (1 - b1) g, v = (1 - b2) g^2
    torch.testing.assert_close(v, (1 - BETA2) * g * g, rtol=1e-5, atol=1e-12)
    expected = p0 * (1 - LR * WD) - LR * (m / (1 - BETA1)) / ((v / (1 - BETA2)).sqrt() + EPS)
    torch.testing.assert_close(p1, expected, rtol=1e-5, atol=1e-7)
    assert not torch.equal(p1, p0)


def test_pma_init_with_explicit_weights_on_chosen_iterations(source_run, tmp_path):
    """checkpoint.init_merge takes weights like merge.*: 1:3 over iterations 4 and 12."""
    run_dir, _ = source_run
    run = run_pretrain(tmp_path / "w", 2, ["parallel.tensor_model_parallel_size=2", f"checkpoint.init_from={run_dir}",
                                           "checkpoint.init_merge.enabled=true", "checkpoint.init_merge.method=weights",
                                           "checkpoint.init_merge.iterations=[4, 12]",
                                           "checkpoint.init_merge.weights=[1, 3]", "train.train_iters=0",
                                           "scheduler.warmup_iters=0", "scheduler.style=constant"])
    event = next(r for r in run.metrics if r.get("event") == "init")
    assert event["iterations"] == [4, 12] and event["method"] == "weights" and event["weights"] == [0.25, 0.75]
    inputs = [run_dir / "iter_0000004", run_dir / "iter_0000012"]
    for key in model_keys(inputs[0]):
        assert torch.equal(load_full(tmp_path / "w" / "iter_0000000", key),
                           reference_merge(inputs, key, [0.25, 0.75])), key


def test_resume_with_a_fresh_optimizer_under_the_old_key(source_run, tmp_path):
    """checkpoint.no_load_optim=true (now checkpoint.resume_optimizer=fresh): the resumed step is a
    first Adam step (moments of one gradient), not the saved run's ninth."""
    run_dir, _ = source_run
    run = run_pretrain(tmp_path / "fresh", 2, ["parallel.tensor_model_parallel_size=2", "scheduler.style=constant",
                                               f"checkpoint.load={run_dir / 'iter_0000008'}",
                                               "checkpoint.no_load_optim=true", "train.train_iters=9"])
    assert [r["iteration"] for r in run.metrics if "loss" in r] == [9]
    key = next(k for k in model_keys(run_dir / "iter_0000008") if k.endswith("linear_fc2.weight"))
    after = tmp_path / "fresh" / "iter_0000009"
    m, v = (load_full(after, f"optimizer.state.{name}.{key}").double() for name in ("exp_avg", "exp_avg_sq"))
    g = m / (1 - BETA1)
    torch.testing.assert_close(v, (1 - BETA2) * g * g, rtol=1e-5, atol=1e-12)


def test_pma_init_from_a_merged_checkpoint_keeping_its_optimizer(source_run, tmp_path):
    run_dir, offline = source_run
    run = run_pretrain(tmp_path / "cont", 2, ["parallel.pipeline_model_parallel_size=2", f"checkpoint.init_from={offline}",
                                              "checkpoint.init_optimizer=checkpoint", "checkpoint.init_keep_iteration=true",
                                              "train.train_iters=16", "scheduler.style=constant"])
    event = next(r for r in run.metrics if r.get("event") == "init")
    assert event["iteration"] == 12 and event["iterations"] == [4, 8, 12] and event["optimizer"] == "checkpoint"
    assert [r["iteration"] for r in run.metrics if "loss" in r] == [13, 14, 15, 16]
    assert all(l == l and l < 6 for l in run.losses)


SPIKE = ["train.train_iters=44", "checkpoint.save_interval=4", "fault_injection.lr_spike_at=30",
         "fault_injection.lr_spike_factor=1000", "scheduler.warmup_iters=2", "scheduler.wsd_decay_iters=4",
         "recovery.baseline_window=10", "train.eval_interval=44"]


TINY_MOE = REPO / "configs" / "tiny-moe.yaml"
MODELS = {"dense": (TINY_DENSE, []),
          "moe": (TINY_MOE, ["moe.num_experts=4", "moe.ffn_hidden_size=64", "parallel.expert_model_parallel_size=2"])}


@pytest.mark.parametrize("model", list(MODELS))
def test_injected_spike_is_recovered_and_diverges_without_recovery(tmp_path, model):
    config, extra = MODELS[model]
    rec = run_pretrain(tmp_path / "rec", 2, [*SPIKE, *extra, "recovery.enabled=true"], config=config)
    events = [r for r in rec.metrics if r.get("event") == "recovery"]
    assert len(events) == 1, events
    event = events[0]
    # The update at 30 broke the weights; the loss of 31 shows it; 28 is the newest good checkpoint.
    assert event["spike_started_at"] == 31 and event["merged_iterations"] == [20, 24, 28]
    assert event["restored_iteration"] == 28 and event["optimizer"] == "fresh" and event["skipped_samples"] > 0
    losses = {r["iteration"]: r["loss"] for r in rec.metrics if "loss" in r}  # the last pass wins
    healthy_level = losses[28]
    assert losses[44] < healthy_level * 1.1 and losses[44] < losses[10]
    no = run_pretrain(tmp_path / "norec", 2, [*SPIKE, *extra], config=config)
    assert not [r for r in no.metrics if r.get("event") == "recovery"]
    assert no.val_losses[-1][1] > 5 * rec.val_losses[-1][1]


@pytest.mark.parametrize("model", list(MODELS))
def test_recovery_never_triggers_on_a_healthy_run(tmp_path, model):
    """The tiny configs' own schedule (warmup, constant LR, decay) with the default detector."""
    config, extra = MODELS[model]
    run = run_pretrain(tmp_path / "healthy", 2, [*extra, "recovery.enabled=true", "train.train_iters=120",
                                                 "scheduler.warmup_iters=12", "scheduler.wsd_decay_iters=24",
                                                 "checkpoint.save_interval=60", "logging.log_interval=40",
                                                 "merge.enabled=false"], config=config)
    assert len(run.losses) == 120
    assert not [r for r in run.metrics if r.get("event") == "recovery"]
