"""Run config: YAML + overrides -> typed dataclasses, and validation that names the key."""


import pytest
import yaml

from helpers import REPO, run_module
from pretrain.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    declared_world_size,
    load_config,
    reference_markdown,
    save_config,
    schedule_lengths,
    to_dict,
    validate,
)

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_required_key_names_exist():
    cfg = RunConfig()
    for dotted in [
        "model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.ffn_hidden_size",
        "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
        "parallel.expert_model_parallel_size", "train.train_iters", "train.seed", "train.micro_batch_size",
        "train.global_batch_size", "train.seq_length", "checkpoint.save", "checkpoint.save_interval",
        "checkpoint.load", "logging.metrics_file",
    ]:
        section, key = dotted.split(".")
        assert hasattr(getattr(cfg, section), key), dotted


def test_yaml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"hidden_size": 32}, "optimizer": {"lr": "1e-3"}}))
    cfg = load_config(path, ["train.train_iters=7", "model.num_attention_heads=2", "data.data_path=[0.5, a, 0.5, b]",
                             "checkpoint.save=null", "parallel.use_distributed_optimizer=true"])
    assert cfg.model.hidden_size == 32
    assert cfg.optimizer.lr == pytest.approx(1e-3) and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.train_iters == 7
    assert cfg.model.num_attention_heads == 2
    assert cfg.data.data_path == [0.5, "a", 0.5, "b"]
    assert cfg.checkpoint.save is None
    assert cfg.parallel.use_distributed_optimizer is True


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'model.hiden_size'.*did you mean 'model.hidden_size'"):
        config_from_dict({"model": {"hiden_size": 3}})
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        config_from_dict({}, ["trian.train_iters=3"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.train_iters=abc"], r"train.train_iters: 'abc' is not an integer"),
        (["train.precision=fp8"], r"train.precision: 'fp8' is not one of"),
        (["parallel.sequence_parallel=3"], r"parallel.sequence_parallel: 3 is not a boolean"),
        (["model.num_layers=null"], r"model.num_layers: null is not allowed"),
    ],
)
def test_type_errors_name_key_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, overrides)


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["parallel.tensor_model_parallel_size=3"], 3,
         r"parallel.tensor_model_parallel_size: 3 does not divide model.num_attention_heads=4"),
        (["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], 2,
         r"world size 2 is not divisible by .* = 2 x 2 = 4"),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], 1,
         r"train.global_batch_size: 6 is not divisible by train.micro_batch_size x data-parallel size"),
        (["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"], 2, r"model.num_layers: 3 is not divisible"),
        (["scheduler.warmup_iters=100", "train.train_iters=100"], 1, r"scheduler.warmup_iters: 100 must be in"),
        (["optimizer.min_lr=1.0", "optimizer.lr=0.1"], 1, r"optimizer.min_lr"),
        (["moe.num_experts=4", "moe.router_topk=5"], 1, r"moe.router_topk: 5 must be between 1 and moe.num_experts=4"),
        (["moe.num_experts=3", "parallel.expert_model_parallel_size=2"], 2,
         r"moe.num_experts: 3 is not divisible by parallel.expert_model_parallel_size=2"),
        (["train.precision=fp16", "train.device=cpu"], 1, r"train.precision: fp16 needs CUDA"),
        (["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2", "train.device=cpu"], 2,
         r"parallel.sequence_parallel needs Transformer Engine"),
    ],
)
def test_inconsistent_configs_are_refused(overrides, world_size, message):
    cfg = config_from_dict({}, overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=world_size, cuda_available=False)


@pytest.mark.parametrize("config", ["tiny-dense.yaml", "tiny-moe.yaml"])
@pytest.mark.parametrize("train_iters", [1, 3, 10, 50, 59, 200, 1000])
def test_tiny_configs_validate_at_any_run_length(config, train_iters):
    """Their schedule is given as fractions of the run, so short runs (the README's train_iters=50) work."""
    cfg = load_config(REPO / "configs" / config, [f"train.train_iters={train_iters}"])
    validate(cfg, world_size=2, cuda_available=False)
    lengths = schedule_lengths(cfg)
    assert lengths.decay == train_iters
    assert lengths.warmup == int(0.1 * train_iters + 1e-9) and lengths.wsd_decay == max(1, int(0.2 * train_iters + 1e-9))
    assert lengths.warmup + lengths.wsd_decay <= train_iters


def test_schedule_fractions_resolve_and_iteration_counts_win():
    cfg = config_from_dict({}, ["train.train_iters=100", "scheduler.warmup_fraction=0.29",
                                "scheduler.wsd_decay_fraction=0.3"])
    assert schedule_lengths(cfg) == type(schedule_lengths(cfg))(warmup=29, decay=100, wsd_decay=30)
    # An explicit count (tests/helpers.FAST, a command-line override) wins over the config's fraction.
    cfg = load_config(REPO / "configs" / "tiny-dense.yaml", ["scheduler.warmup_iters=2", "scheduler.wsd_decay_iters=4"])
    assert (schedule_lengths(cfg).warmup, schedule_lengths(cfg).wsd_decay) == (2, 4)
    # Fractions are of decay_iters when it is set; the default WSD decay is 10%.
    cfg = config_from_dict({}, ["train.train_iters=100", "scheduler.decay_iters=50"])
    assert schedule_lengths(cfg) == type(schedule_lengths(cfg))(warmup=0, decay=50, wsd_decay=5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scheduler.warmup_fraction=1.0"], r"scheduler.warmup_fraction: 1.0 must be in \[0, 1\)"),
        (["scheduler.wsd_decay_fraction=0"], r"scheduler.wsd_decay_fraction: 0.0 must be in \(0, 1\]"),
        (["scheduler.warmup_fraction=0.5", "scheduler.wsd_decay_fraction=0.6"],
         r"scheduler.warmup_fraction \+ wsd_decay_fraction = 0.5 \+ 0.6 must be <= 1"),
        (["train.train_iters=10", "scheduler.warmup_iters=5", "scheduler.wsd_decay_fraction=0.6"],
         r"scheduler.wsd_decay_fraction: 0.6 x decay_iters = 6 must be in \[1, decay_iters - warmup = 10 - 5 = 5\]"),
    ],
)
def test_bad_schedule_fractions_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(config_from_dict({}, overrides), world_size=1, cuda_available=False)


def test_missing_data_path_names_the_file(tmp_path):
    cfg = config_from_dict({}, [f"data.data_path=[{tmp_path / 'nope'}]"])
    with pytest.raises(ConfigError, match=r"data.data_path: .*nope.bin does not exist"):
        validate(cfg)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny-dense.yaml", ["train.train_iters=11"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    """A small preprocessed dataset (what the paper-scale configs need in data.data_path)."""
    from pretrain.data.indexed import write_indexed_dataset

    prefix = str(tmp_path_factory.mktemp("data") / "corpus")
    write_indexed_dataset(prefix, [[1, 2, 3, 256]] * 10, 257)
    return prefix


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate_at_their_world_size(path, data_prefix):
    """Every config in configs/ states the world size it is for (a comment: '# world_size: N');
    the paper-scale ones refuse to start without real data."""
    world = declared_world_size(path)
    assert world is not None, f"{path.name} has no '# world_size: N' line"
    gpu = "tiny" not in path.name
    cfg = load_config(path, ["checkpoint.load=null"])
    if gpu:
        with pytest.raises(ConfigError, match=r"data.data_path is empty and this config sets data.allow_default_corpus"):
            validate(cfg, world_size=world, cuda_available=True)
        cfg = load_config(path, ["checkpoint.load=null", f"data.data_path=[{data_prefix}]"])
    validate(cfg, world_size=world, cuda_available=gpu)


def test_every_problem_is_reported_at_once():
    cfg = config_from_dict({}, ["parallel.tensor_model_parallel_size=3", "optimizer.lr=-1", "train.device=cpu",
                                "train.precision=fp16", "scheduler.warmup_fraction=2"])
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=4, cuda_available=False)
    message = str(info.value)
    assert message.startswith("7 problems:\n"), message  # and no consequences of them (min_lr, init_lr, ...)
    for expected in ["parallel.tensor_model_parallel_size: 3 does not divide model.num_attention_heads=4",
                     "optimizer.lr: -1.0 must be a positive number", "scheduler.warmup_fraction: 2.0 must be in",
                     "train.precision: fp16 needs CUDA", "world size 4 is not divisible"]:
        assert expected in message
    # A size that later checks divide by is reported alone, not as a crash.
    with pytest.raises(ConfigError, match=r"^parallel.tensor_model_parallel_size: 0 must be a positive integer$"):
        validate(config_from_dict({}, ["parallel.tensor_model_parallel_size=0"]), world_size=2)


def test_validate_only_checks_a_gpu_config_from_a_cpu_node(data_prefix):
    """--target cuda skips the checks of this machine's CUDA; the world size comes from the config."""
    config = str(REPO / "configs" / "dense-8b.yaml")
    proc = run_module("pretrain", "--validate-only", "--target", "cuda", "--config", config,
                      f"data.data_path=[{data_prefix}]")
    assert proc.returncode == 0 and "config OK for world size 64 on cuda" in proc.stdout, proc.stderr
    proc = run_module("pretrain", "--validate-only", "--target", "cpu", "--world-size", "5", "--config", config)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors == ["error: 4 problems:"], proc.stderr
    for expected in ["data.data_path is empty", "parallel.sequence_parallel needs Transformer Engine",
                     "world size 5 is not divisible", "overlap_grad_reduce"]:
        assert expected in proc.stderr


def test_reference_documents_every_section():
    text = reference_markdown()
    for section in ("model", "moe", "parallel", "train", "optimizer", "scheduler", "data", "checkpoint", "logging"):
        assert f"### `{section}`" in text
    assert "`train.global_batch_size`" in text


def test_cli_rejects_bad_config_before_training(tmp_path):
    proc = run_module("pretrain", "--config", str(REPO / "configs" / "tiny-dense.yaml"),
                      "parallel.tensor_model_parallel_size=2", env={"WORLD_SIZE": "3"})
    assert proc.returncode == 2
    assert "error: world size 3 is not divisible" in proc.stderr  # alone: no consequences of it
    proc = run_module("pretrain", "--config", str(REPO / "configs" / "tiny-dense.yaml"), "model.hidden=3")
    assert proc.returncode == 2 and "unknown key 'model.hidden'" in proc.stderr
    proc = run_module("pretrain", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml does not exist" in proc.stderr


@pytest.mark.parametrize("path", [p for p in CONFIGS if "tiny" not in p.name], ids=lambda p: p.name)
def test_paper_scale_configs_build_a_megatron_transformer_config(path):
    """megatron-core accepts the shapes and parallel settings (no weights are allocated)."""
    import torch

    from pretrain.model import transformer_config
    from pretrain.platform import Platform

    cfg = load_config(path)
    gpu = Platform(device=torch.device("cuda", 0), backend="nccl", rank=0, world_size=1, local_rank=0)
    tc = transformer_config(cfg, gpu)
    assert tc.num_layers == cfg.model.num_layers and tc.hidden_size == cfg.model.hidden_size
    assert tc.tensor_model_parallel_size == cfg.parallel.tensor_model_parallel_size
    assert tc.bf16 and tc.params_dtype == torch.bfloat16


def test_config_reference_doc_is_current():
    from pretrain.config import reference_document

    doc = (REPO / "docs" / "config.md").read_text()
    assert doc == reference_document(), "regenerate: python -m pretrain.config --reference > docs/config.md"


# A bad config under a real 2-process torchrun: the error reaches the user exactly once, whichever
# rank gets there first. A shell wrapper delays one rank's start to force each order.
@pytest.mark.parametrize("slow_rank, grace_s, reporter", [(0, 60, "rank 0"), (1, 2, "rank 0"), (0, 2, "rank 1")],
                         ids=["rank0-late", "rank1-late", "rank0-stuck"])
def test_config_error_under_torchrun_is_reported_once(slow_rank, grace_s, reporter):
    import os
    import subprocess
    import sys

    from helpers import free_port

    delay = 60 if reporter == "rank 1" else 4  # "stuck": rank 0 outlives rank 1's grace period
    wrapper = f'[ "$RANK" = {slow_rank} ] && sleep {delay}; exec "$0" -m pretrain "$@"'
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "--no-python", "sh", "-c", wrapper, sys.executable,
            "--config", str(REPO / "configs" / "tiny-dense.yaml"), "parallel.tensor_model_parallel_size=3"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PRETRAIN_ERROR_GRACE_S": str(grace_s)}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0
    assert len(errors) == 1, output
    assert output.count("parallel.tensor_model_parallel_size: 3 does not divide model.num_attention_heads") == 1
    assert ("reported by rank 1" in output) == (reporter == "rank 1")


def test_data_path_may_name_the_bin_or_idx_file(data_prefix):
    cfg = config_from_dict({}, [f"data.data_path=[{data_prefix}.bin]"])
    assert cfg.data.data_path == [data_prefix]
    validate(cfg, world_size=1, cuda_available=False)
    cfg = config_from_dict({}, [f"data.data_path=[0.3, {data_prefix}.idx, 0.7, {data_prefix}]"])
    assert cfg.data.data_path == [0.3, data_prefix, 0.7, data_prefix]


def test_importing_the_stack_does_not_warn_about_missing_transformer_engine():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-W", "default", "-c", "import pretrain.train, pretrain.evaluate"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "not installed" not in proc.stderr, proc.stderr


def test_renamed_fault_injection_keys_are_still_read():
    """scheduler.inject_spike_* moved to fault_injection.lr_spike_*; the old names still work, with a warning."""
    with pytest.warns(DeprecationWarning, match=r"scheduler.inject_spike_at is deprecated: use fault_injection.lr_spike_at"):
        cfg = config_from_dict({"scheduler": {"inject_spike_at": 30}}, ["scheduler.inject_spike_factor=50"])
    assert (cfg.fault_injection.lr_spike_at, cfg.fault_injection.lr_spike_factor) == (30, 50.0)
    assert not hasattr(cfg.scheduler, "inject_spike_at")
    # A config saved before the move holds the old keys at their defaults: read silently.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = config_from_dict({"scheduler": {"inject_spike_at": None, "inject_spike_factor": 1000.0}})
    assert cfg.fault_injection.lr_spike_at is None
