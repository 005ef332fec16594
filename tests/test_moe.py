"""Mixture-of-Experts training with real torchrun processes on gloo: expert parallelism, both token
dispatchers, expert tensor parallelism, metrics, exact resume and loading across EP sizes."""

import re

import pytest

from helpers import REPO, run_module, run_pretrain

pytestmark = pytest.mark.slow

TINY_MOE = REPO / "configs" / "tiny-moe.yaml"
ITERS = 12
# helpers.FAST's shape with MoE layers: 4 experts, top-2, a shared expert, z-loss (every run below).
MOE = ("moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64", "moe.shared_expert_intermediate_size=64",
       "moe.z_loss_coeff=0.001", "train.eval_interval=null", f"train.train_iters={ITERS}")
MOE_FIELDS = ("moe_load_balancing_loss", "moe_load_balancing_loss_per_layer", "moe_z_loss", "moe_z_loss_per_layer",
              "moe_tokens_per_expert_min", "moe_tokens_per_expert_max")


def moe_run(run_dir, *overrides, nproc=2, check=True):
    return run_pretrain(run_dir, nproc, [*MOE, *overrides], config=TINY_MOE, check=check)


def steps(run) -> list[dict]:
    return [r for r in run.metrics if "loss" in r]


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    """EP=2 (2 experts per process, DP=2), all-to-all dispatcher, checkpoints at 6 and 12."""
    return moe_run(tmp_path_factory.mktemp("ep2"), "parallel.expert_model_parallel_size=2", "checkpoint.save_interval=6")


@pytest.fixture(scope="module")
def ep1_run(tmp_path_factory):
    """The same model and data at EP=1 (every process holds all 4 experts)."""
    return moe_run(tmp_path_factory.mktemp("ep1"), "parallel.expert_model_parallel_size=1", "checkpoint.save_interval=6")


def test_ep2_trains_and_logs_moe_metrics(ep2_run):
    records = steps(ep2_run)
    losses = [r["loss"] for r in records]
    assert len(losses) == ITERS and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    tokens_per_step = 8 * 64 * 2  # global batch x sequence x top-k assignments
    for r in records:
        for field in MOE_FIELDS:
            assert field in r, field
        assert len(r["moe_load_balancing_loss_per_layer"]) == 4 and len(r["moe_tokens_per_expert_max"]) == 4
        # E * sum_i f_i P_i: 1 when perfectly balanced, at most E
        assert all(0.5 < v < 4 for v in r["moe_load_balancing_loss_per_layer"])
        assert r["moe_load_balancing_loss"] == pytest.approx(sum(r["moe_load_balancing_loss_per_layer"]) / 4)
        assert all(v > 0 for v in r["moe_z_loss_per_layer"])
        for low, high in zip(r["moe_tokens_per_expert_min"], r["moe_tokens_per_expert_max"]):
            assert 0 <= low <= tokens_per_step / 4 <= high <= tokens_per_step
    # Expert weights are in the same torch_dist checkpoint: one global [layer, expert, ...] tensor whose
    # expert slices each EP rank writes. The RNG objects, keyed by (PP, TP, DP) coordinates, stay one per
    # rank because EP is carved out of DP.
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(ep2_run.run_dir / "iter_0000006")).read_metadata().state_dict_metadata
    assert tuple(stored["decoder.layers.mlp.experts.experts.linear_fc1.weight"].size) == (4, 4, 2 * 64, 64)
    assert sorted(k for k in stored if k.startswith("rng_state/")) == [
        "rng_state/shard_0.0.0_1.1.2", "rng_state/shard_0.0.1_1.1.2"]


def test_ep1_and_ep2_start_from_the_same_model(ep1_run, ep2_run):
    """Experts are drawn from the same global master weights at every EP size, so EP only moves work."""
    first1, first2 = steps(ep1_run)[0], steps(ep2_run)[0]
    assert first2["loss"] == pytest.approx(first1["loss"], rel=1e-5)
    for field in MOE_FIELDS:  # and the routers make the same decisions, reduced to the same metrics
        assert first2[field] == pytest.approx(first1[field], rel=1e-4), field
    assert [r["loss"] for r in steps(ep2_run)] == pytest.approx([r["loss"] for r in steps(ep1_run)], rel=1e-3)


def test_ep2_resume_is_exact(tmp_path, ep2_run):
    """A new EP=2 job from the uninterrupted run's iteration-6 checkpoint (model, Adam state of the dense and
    the expert optimizers, RNG, data position) continues with the same losses and routing."""
    resumed = moe_run(tmp_path / "run", "parallel.expert_model_parallel_size=2",
                      f"checkpoint.load={ep2_run.run_dir / 'iter_0000006'}")
    assert resumed.losses == ep2_run.losses[6:]
    assert [r["moe_tokens_per_expert_max"] for r in steps(resumed)] == [r["moe_tokens_per_expert_max"]
                                                                         for r in steps(ep2_run)[6:]]
    assert "RNG states not restored" not in resumed.output


def test_checkpoints_load_across_expert_parallel_sizes(tmp_path, ep1_run, ep2_run):
    """An EP=2 checkpoint at EP=1 and an EP=1 checkpoint at EP=2, with the optimizer state:
    megatron-core chains separate dense and expert optimizers only at EP > 1, so the optimizer's
    structure changes; the weights and Adam moments reshard and iterations 7 and 8 see the
    saving run's losses (the second one depends on the Adam state: a fresh optimizer misses it)."""
    resumed = ["train.train_iters=8", f"scheduler.decay_iters={ITERS}"]
    at_ep1 = moe_run(tmp_path / "ep1", *resumed, "parallel.expert_model_parallel_size=1",
                     f"checkpoint.load={ep2_run.run_dir / 'iter_0000006'}")
    assert at_ep1.losses == pytest.approx(ep2_run.losses[6:8], rel=1e-5)
    assert "RNG states not restored" in at_ep1.output  # the saved parallel layout differs
    at_ep2 = moe_run(tmp_path / "ep2", *resumed, "parallel.expert_model_parallel_size=2",
                     f"checkpoint.load={ep1_run.run_dir / 'iter_0000006'}")
    assert at_ep2.losses == pytest.approx(ep1_run.losses[6:8], rel=1e-5)


def test_dp_reshardable_optimizer_state_across_the_ep_boundary_is_refused_clearly(tmp_path):
    """The distributed optimizer's dp_reshardable format keys state per optimizer of the chain,
    so it cannot cross EP=2 -> EP=1: a clear error naming the checkpoint, before training."""
    dist = ["train.train_iters=8", "checkpoint.save_interval=4", "parallel.use_distributed_optimizer=true",
            "checkpoint.optimizer_sharding=dp_reshardable"]
    moe_run(tmp_path / "ep2", *dist, "parallel.expert_model_parallel_size=2")
    run = moe_run(tmp_path / "ep1", *dist, "parallel.expert_model_parallel_size=1",
                  f"checkpoint.load={tmp_path / 'ep2' / 'iter_0000004'}", check=False)
    assert run.returncode != 0
    assert f"error: {tmp_path / 'ep2' / 'iter_0000004'}: distributed-optimizer state" in run.output
    assert "checkpoint.resume_optimizer=fresh" in run.output and not (tmp_path / "ep1" / "iter_0000008").exists()


def test_allgather_dispatcher_matches_alltoall(tmp_path, ep2_run):
    run = moe_run(tmp_path / "ag", "train.train_iters=4", f"scheduler.decay_iters={ITERS}",
                  "parallel.expert_model_parallel_size=2",
                  "moe.token_dispatcher=allgather")
    assert run.losses == pytest.approx(ep2_run.losses[:4], rel=1e-4)
    assert run.losses[-1] < run.losses[0]


def test_expert_tensor_parallelism_on_four_processes(tmp_path, ep1_run):
    """EP=2 x expert TP=2 (TP=1, DP=4): the all-to-all dispatcher gathers uneven token counts across
    expert-TP ranks, through the CPU layer's gloo gather; the first loss is the EP=1 run's."""
    run = moe_run(tmp_path / "etp", "train.train_iters=3", f"scheduler.decay_iters={ITERS}",
                  "parallel.expert_model_parallel_size=2",
                  "parallel.expert_tensor_parallel_size=2", "train.micro_batch_size=2", nproc=4)
    assert run.losses[0] == pytest.approx(ep1_run.losses[0], rel=1e-5)
    assert run.losses == pytest.approx(ep1_run.losses[:3], rel=1e-3)


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["moe.router_topk=9"], 2, "moe.router_topk: 9 must be between 1 and moe.num_experts=8"),
        (["moe.num_experts=6", "parallel.expert_model_parallel_size=4"], 4,
         "moe.num_experts: 6 is not divisible by parallel.expert_model_parallel_size=4"),
        (["parallel.tensor_model_parallel_size=2"], 2, "parallel.sequence_parallel: true"),
        (["moe.grouped_gemm=true", "train.device=cpu"], 2, "moe.grouped_gemm needs CUDA"),
    ],
    ids=["topk", "ep-divides-experts", "tp-needs-sp", "grouped-gemm-cpu"],
)
def test_bad_moe_configs_fail_before_training(overrides, world_size, message):
    proc = run_module("pretrain", "--config", str(TINY_MOE), *overrides, env={"WORLD_SIZE": str(world_size)})
    assert proc.returncode == 2, proc.stderr
    assert "error: " in proc.stderr and message in proc.stderr, proc.stderr


def test_banner_counts_the_same_model_at_ep1_and_ep2(ep1_run, ep2_run):
    """The start-up banner's parameter total does not depend on how the experts are split."""
    def counts(run):
        line = next(line for line in run.output.splitlines() if line.strip().startswith("parameters"))
        return [int(x.replace(",", "")) for x in re.findall(r"[\d,]{2,}", line)]

    (total1, local1), (total2, local2) = counts(ep1_run), counts(ep2_run)
    assert total1 == total2 == local1 and local2 < total2
    assert "MoE GPT (4 experts, top-2)" in ep2_run.output and "EP 2" in ep2_run.output
