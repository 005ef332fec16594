"""The typed run config: nested dataclasses loaded from YAML, with dotted overrides.

A run is described by one YAML file whose top-level sections mirror the
dataclasses below (``model``, ``moe``, ``parallel``, ``train``, ``optimizer``,
``scheduler``, ``data``, ``checkpoint``, ``logging``, ``merge``, ``recovery``, ``fault_injection``). Every field is
documented where it is defined; ``python -m pretrain.config --reference``
prints the reference as Markdown.

    cfg = load_config("configs/tiny-dense.yaml", ["train.train_iters=50", "parallel.tensor_model_parallel_size=2"])
    validate(cfg, world_size=2)

Errors are :class:`ConfigError` and always name the dotted key, the bad value
and what is allowed.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import difflib
import logging
import math
import re
import signal
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megatron_merge.weights import DEFAULT_EMA_ALPHA, METHODS


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key and the fix."""


def doc(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with a default and a one-line description for the reference."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


#: A merge method (megatron_merge/weights.py's METHODS: one list for the config, the CLI and the merge).
MergeMethod = Literal[METHODS]

#: Where a run's optimizer state comes from when it loads a checkpoint (resume, PMA-init, recovery):
#: ``checkpoint`` = the loaded checkpoint's (Adam moments and step count), ``fresh`` = new state.
OptimizerState = Literal["checkpoint", "fresh"]


@dataclass
class MergeSelection:
    """Which checkpoints a merge takes and how it weighs them (formulas: megatron_merge/weights.py).

    One type for the three merges of a run: the in-training merge (``merge``, whose section
    extends it), PMA-init (``checkpoint.init_merge``) and loss-spike recovery (``recovery.merge``);
    validated by one function wherever it is used.
    """

    method: MergeMethod = doc("sma", "Merge method, as megatron-merge --method.")
    window: int = doc(3, "N: merge the newest N checkpoints.")
    ema_alpha: float = doc(DEFAULT_EMA_ALPHA, "EMA factor in (0, 1] (method ema).")
    weights: list = doc([], "Explicit weights, oldest first, one per merged checkpoint (method weights); when fewer "
                            "are available the newest ones' weights are used, renormalised.")

    def count(self) -> int:
        """How many checkpoints the merge takes."""
        return self.window

    def count_key(self) -> str:
        """The key that sets :meth:`count` (for messages)."""
        return "window"


@dataclass
class InitMergeConfig(MergeSelection):
    """PMA-init: merge saved checkpoints of ``checkpoint.init_from`` (a run directory) on the fly, each rank
    its own partition, instead of loading one checkpoint as it is."""

    enabled: bool = doc(False, "Merge init_from's checkpoints (else init_from is loaded as it is).")
    every: int = doc(1, "Take every K-th saved iteration, counting back from the newest (the interval V).")
    iterations: list = doc([], "Exactly these saved iterations (instead of window/every).")

    def count(self) -> int:
        return len(self.iterations) if self.iterations else self.window

    def count_key(self) -> str:
        return "iterations" if self.iterations else "window"


@dataclass
class ModelConfig:
    """Transformer shape and numerics (megatron-core TransformerConfig)."""

    num_layers: int = doc(2, "Transformer layers.")
    hidden_size: int = doc(64, "Model width.")
    num_attention_heads: int = doc(4, "Attention heads; must be divisible by the tensor-parallel size.")
    num_query_groups: Optional[int] = doc(None, "KV head groups for grouped-query attention; null = one per head.")
    ffn_hidden_size: int = doc(256, "MLP inner width (per expert for MoE unless moe.ffn_hidden_size is set).")
    kv_channels: Optional[int] = doc(None, "Per-head dimension; null = hidden_size / num_attention_heads.")
    position_embedding_type: Literal["rope", "learned_absolute"] = doc("rope", "Position encoding.")
    rotary_base: int = doc(10000, "RoPE base.")
    normalization: Literal["RMSNorm", "LayerNorm"] = doc("RMSNorm", "Normalisation layer.")
    norm_epsilon: float = doc(1e-5, "Normalisation epsilon.")
    activation: Literal["swiglu", "gelu"] = doc("swiglu", "MLP activation (swiglu = gated SiLU).")
    add_bias_linear: bool = doc(False, "Biases in linear layers.")
    add_qkv_bias: bool = doc(False, "Bias in the QKV projection only.")
    qk_layernorm: bool = doc(False, "Normalise queries and keys.")
    untie_embeddings_and_output_weights: bool = doc(True, "Separate output layer instead of the tied embedding.")
    init_method_std: float = doc(0.02, "Std of the normal weight initialisation.")
    hidden_dropout: float = doc(0.0, "Dropout after attention and MLP.")
    attention_dropout: float = doc(0.0, "Dropout on attention probabilities.")
    make_vocab_size_divisible_by: int = doc(
        128,
        "Pad the vocabulary to a multiple of this. Unlike Megatron-LM the padding does not grow with the "
        "tensor-parallel size, so checkpoints keep one shape at every layout.",
    )
    recompute_granularity: Optional[Literal["full", "selective"]] = doc(None, "Activation recomputation.")
    recompute_num_layers: Optional[int] = doc(None, "Layers per recompute block with granularity full.")
    transformer_impl: Literal["auto", "local", "transformer_engine"] = doc(
        "auto", "Layer implementation: auto = Transformer Engine when it and CUDA are present, else local."
    )


@dataclass
class MoEConfig:
    """Mixture-of-Experts layers (megatron-core MoE). Off while num_experts is null."""

    num_experts: Optional[int] = doc(None, "Experts per MoE layer; null = dense model.")
    router_topk: int = doc(2, "Experts each token is routed to.")
    ffn_hidden_size: Optional[int] = doc(None, "Expert MLP width; null = model.ffn_hidden_size.")
    aux_loss_coeff: float = doc(
        0.01, "Load-balancing auxiliary loss coefficient for aux_loss / seq_aux_loss (0 disables it)."
    )
    z_loss_coeff: Optional[float] = doc(None, "Router z-loss coefficient (ST-MoE); null or 0 disables it.")
    load_balancing_type: Literal["aux_loss", "seq_aux_loss", "sinkhorn", "none"] = doc(
        "aux_loss", "Load-balancing strategy."
    )
    token_dispatcher: Literal["alltoall", "allgather"] = doc("alltoall", "Token dispatcher.")
    shared_expert_intermediate_size: Optional[int] = doc(None, "Width of the shared expert MLP; null = none.")
    grouped_gemm: bool = doc(False, "Grouped GEMM experts (GPU only).")
    layer_freq: int = doc(1, "Every layer_freq-th layer is MoE (1 = all).")
    capacity_factor: Optional[float] = doc(None, "Token capacity per expert; null = dropless.")
    router_dtype: Optional[Literal["fp32", "fp64"]] = doc("fp32", "Router computation precision.")


@dataclass
class ParallelConfig:
    """How the model and data are split across processes (megatron-core parallel_state)."""

    tensor_model_parallel_size: int = doc(1, "TP: splits each layer's matrices.")
    pipeline_model_parallel_size: int = doc(1, "PP: splits the layer stack into stages.")
    virtual_pipeline_model_parallel_size: Optional[int] = doc(None, "Interleaved pipeline chunks per stage.")
    expert_model_parallel_size: int = doc(1, "EP: splits the experts of each MoE layer.")
    expert_tensor_parallel_size: Optional[int] = doc(None, "TP inside experts; null = tensor_model_parallel_size.")
    sequence_parallel: bool = doc(False, "Shard LayerNorm/dropout activations along the sequence (needs TP > 1).")
    use_distributed_optimizer: bool = doc(False, "Shard optimizer state across data-parallel ranks (ZeRO-1).")
    overlap_grad_reduce: bool = doc(False, "Overlap gradient reduction with backward.")
    overlap_param_gather: bool = doc(False, "Overlap parameter all-gather with forward (distributed optimizer).")
    distributed_timeout_minutes: int = doc(30, "Collective timeout.")


@dataclass
class TrainConfig:
    """Batch shape, length and numerics of the run."""

    train_iters: int = doc(100, "Optimizer steps in the run (the schedule's horizon).")
    seed: int = doc(1234, "Seed for initialisation, data order and dropout.")
    micro_batch_size: int = doc(4, "Sequences per forward pass per data-parallel rank.")
    global_batch_size: int = doc(16, "Sequences per optimizer step, summed over data-parallel ranks.")
    seq_length: int = doc(128, "Tokens per sequence.")
    precision: Literal["fp32", "bf16", "fp16"] = doc("fp32", "Parameter/compute dtype (bf16/fp16 keep fp32 master weights).")
    eval_interval: Optional[int] = doc(None, "Validate every this many iterations; null = only at the end.")
    eval_iters: int = doc(4, "Validation batches (of global_batch_size) per evaluation.")
    device: Literal["auto", "cpu", "cuda"] = doc("auto", "auto = CUDA with NCCL when present, else CPU with gloo.")
    exit_on_nonfinite_loss: bool = doc(True, "Stop with an error when the loss becomes NaN/Inf.")
    exit_signal_handler: bool = doc(
        True, "On one of exit_signals every rank stops at the end of the current iteration, saves a checkpoint "
        "and exits 0 (Megatron-LM's --exit-signal-handler); a second signal kills at once.",
    )
    exit_signals: list = doc(["SIGTERM", "SIGINT", "SIGUSR1"], "Signals that stop the run cleanly (names).")
    exit_duration_mins: Optional[float] = doc(
        None, "Stop, save and exit 0 after this many minutes of training (Megatron-LM's --exit-duration-in-mins).")
    exit_interval: Optional[int] = doc(
        None, "Stop, save and exit 0 at the first iteration divisible by this (Megatron-LM's --exit-interval).")


@dataclass
class OptimizerSection:
    """Adam via megatron-core's get_megatron_optimizer."""

    name: Literal["adam", "sgd"] = doc("adam", "Optimizer.")
    lr: float = doc(1e-3, "Peak learning rate.")
    min_lr: float = doc(0.0, "Learning rate at the end of decay.")
    weight_decay: float = doc(0.1, "Decoupled weight decay.")
    adam_beta1: float = doc(0.9, "Adam beta1.")
    adam_beta2: float = doc(0.95, "Adam beta2.")
    adam_eps: float = doc(1e-8, "Adam epsilon.")
    clip_grad: float = doc(1.0, "Gradient clipping by global norm (0 disables).")


@dataclass
class SchedulerConfig:
    """Learning-rate schedule (megatron-core OptimizerParamScheduler)."""

    style: Literal["constant", "linear", "cosine", "wsd", "inverse-square-root"] = doc(
        "wsd", "wsd = warmup, stable (constant) stage, then decay over wsd_decay_iters."
    )
    warmup_iters: Optional[int] = doc(
        None, "Linear warmup from init_lr to optimizer.lr, in iterations; null = warmup_fraction x decay_iters."
    )
    warmup_fraction: float = doc(
        0.0, "Warmup as a fraction of decay_iters (rounded down), used while warmup_iters is null."
    )
    init_lr: float = doc(0.0, "Learning rate at iteration 0 of the warmup.")
    decay_iters: Optional[int] = doc(None, "Iteration where decay ends; null = train.train_iters.")
    wsd_decay_iters: Optional[int] = doc(
        None, "Length of the WSD decay stage in iterations; null = wsd_decay_fraction x decay_iters."
    )
    wsd_decay_fraction: float = doc(
        0.1, "WSD decay as a fraction of decay_iters (rounded down, at least 1), used while wsd_decay_iters is null. "
        "Fractions keep a config valid at any train.train_iters; an iteration count, when set, wins."
    )
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = doc("linear", "Shape of the WSD decay.")


@dataclass
class FaultInjectionConfig:
    """Deliberate faults, to try the recovery machinery (off by default)."""

    lr_spike_at: Optional[int] = doc(
        None, "Multiply the LR by lr_spike_factor from this iteration (once per process); null = off."
    )
    lr_spike_factor: float = doc(1000.0, "LR multiplier of the injected spike.")
    lr_spike_iters: int = doc(3, "Iterations the injected spike lasts.")


@dataclass
class DataConfig:
    """Training data: megatron-core indexed datasets and a tokenizer."""

    data_path: list = doc(
        [],
        "Dataset prefixes (PREFIX.bin/.idx; a trailing .bin or .idx is dropped), optionally weighted: [0.7, a, 0.3, b]. "
        "Empty = the embedded default corpus, built on first use.",
    )
    split: str = doc("98,2,0", "Train/valid/test split of each dataset, in parts.")
    tokenizer: Literal["byte", "hf"] = doc("byte", "byte = built-in byte-level tokenizer; hf = a tokenizers JSON file.")
    tokenizer_file: Optional[str] = doc(None, "Hugging Face tokenizer.json (tokenizer: hf).")
    cache_dir: Optional[str] = doc(None, "Where dataset indices and the default corpus are cached.")
    allow_default_corpus: bool = doc(
        True, "Allow an empty data_path (the small embedded corpus); the paper-scale configs set false, so "
        "they refuse to start without real data."
    )

    def __post_init__(self) -> None:
        # A prefix given as PREFIX.bin or PREFIX.idx (a file the user can see) means PREFIX.
        self.data_path = [re.sub(r"\.(bin|idx)$", "", x) if isinstance(x, str) else x for x in self.data_path]


@dataclass
class CheckpointConfig:
    """Saving and resuming, in Megatron's directory layout."""

    save: Optional[str] = doc(None, "Run directory: iter_NNNNNNN/ checkpoints, metrics, config.")
    save_interval: Optional[int] = doc(None, "Save every this many iterations (and at the end).")
    load: Optional[str] = doc(
        None, "Resume from this run directory's latest checkpoint (or an iter_* directory); null = continue from "
        "checkpoint.save's newest complete checkpoint when it has one (auto-resume), else start fresh.",
    )
    overwrite: bool = doc(
        False, "Allow starting where checkpoint.save holds later checkpoints (they are replaced as the run saves); "
        "also turns auto-resume off. Their metrics records move to metrics.rolled_back.jsonl.",
    )
    keep_last: Optional[int] = doc(None, "Retention: keep the newest K training checkpoints (null = keep all).")
    keep_every: Optional[int] = doc(
        None, "Retention: also keep every checkpoint whose iteration is a multiple of M. The newest complete "
        "checkpoint and those the in-training merge (storage: disk) or recovery still need are never deleted.",
    )
    format: Literal["torch_dist", "torch"] = doc(
        "torch_dist",
        "Save format: torch_dist = megatron-core dist_checkpointing (reshardable); torch = Megatron's legacy "
        "per-rank mp_rank_*/model_optim_rng.pt files (loads only at the saved TP/PP/EP layout; no distributed "
        "optimizer). Loading detects the format from the directory.",
    )
    optimizer_sharding: Literal["fully_reshardable", "dp_reshardable"] = doc(
        "fully_reshardable",
        "Distributed-optimizer state layout: fully_reshardable stores it per model parameter (loads at any "
        "TP/PP/DP; gathered per DP group at save), dp_reshardable stores each rank's buffers (faster, "
        "reloads only at the same TP/PP).",
    )
    async_save: bool = doc(
        False, "Write torch_dist checkpoints in the background (megatron-core's async save, Megatron-LM's "
        "--async-save): training goes on; the tracker moves when every rank's files are written.",
    )
    resume_optimizer: OptimizerState = doc(
        "checkpoint", "Optimizer state on resume (checkpoint.load, auto-resume): the checkpoint's, or fresh "
        "(Megatron-LM's --no-load-optim)."
    )
    no_load_rng: bool = doc(False, "Do not restore RNG states.")
    exit_after_save: bool = doc(False, "Stop after the first checkpoint save (for tests of crash/resume).")
    init_from: Optional[str] = doc(
        None,
        "Start a new phase (continued training, annealing, SFT) from these weights: a checkpoint directory "
        "(e.g. a merged one), or a run directory merged on the fly per rank with init_merge.enabled.",
    )
    init_merge: InitMergeConfig = field(default_factory=InitMergeConfig)
    init_optimizer: OptimizerState = doc(
        "fresh", "Optimizer state for init_from: fresh, or the newest input checkpoint's."
    )
    init_keep_iteration: bool = doc(
        False, "Keep init_from's iteration counter and data position (default: start the new phase at 0)."
    )


@dataclass
class LoggingConfig:
    """Where metrics go."""

    metrics_file: Optional[str] = doc(None, "JSON-lines metrics; null = <checkpoint.save>/metrics.jsonl.")
    tensorboard_dir: Optional[str] = doc(None, "TensorBoard logs when tensorboard is installed; null = <save>/tensorboard.")
    log_interval: int = doc(1, "Print a line to stdout every this many iterations.")


@dataclass
class MergeConfig(MergeSelection):
    """Checkpoint merging during training (PMA): each rank merges its own parameter partition.

    method, window, ema_alpha and weights are the run's one merge selection (see MergeSelection);
    ema is a running EMA over every snapshot, not only the window's.

    Memory per rank, in bytes per parameter of the rank's partition, with D data-parallel
    replicas sharing the work (each parameter's merge state lives on one replica) and b the
    parameter dtype's size (4 fp32, 2 bf16): storage host/device keeps N snapshots, N*b/D
    (sma, wma, wsm-*, weights) or one fp32 accumulator, 4/D (ema); storage disk keeps nothing
    and re-reads this rank's partition of the last N checkpoints when merged weights are needed.
    Materialising the merged weights (at evaluations and saves) briefly needs 2*b more.
    """

    window: int = doc(10, "N: merge the newest N snapshots (sma, wma, wsm-*, weights).")
    enabled: bool = doc(False, "Merge checkpoints during training.")
    interval: Optional[int] = doc(None, "V in iterations: snapshot every this many iterations.")
    interval_tokens: Optional[float] = doc(
        None, "V in tokens, converted to iterations by global_batch_size x seq_length (instead of interval)."
    )
    start_iteration: int = doc(0, "No snapshots before this iteration (e.g. the end of warmup).")
    save: bool = doc(True, "Write merged checkpoints to <checkpoint.save>/merged/iter_N at each save.")
    eval: bool = doc(True, "Validation loss of the merged weights (val_loss_merged) at every evaluation.")
    storage: Literal["host", "device", "disk"] = doc(
        "host", "Where snapshots live: host (pinned CPU) | device (GPU) | disk (the saved checkpoints)."
    )
    keep_last: Optional[int] = doc(None, "Retention of <save>/merged/ (and merged_candidates/*/): keep the newest K "
                                         "merged checkpoints.")
    keep_every: Optional[int] = doc(None, "Retention of <save>/merged/ (and merged_candidates/*/): also keep "
                                          "iterations divisible by M.")
    # Merge candidates (megatron_merge/candidates.py): many merges evaluated beside the primary one.
    candidates: list = doc([], "Merges evaluated at every evaluation beside the primary one, e.g. [sma:3, wma:10, "
                               "ema:0.2, sma:10/every2]: METHOD:N[/everyK] or ema:ALPHA[/everyK], K in merge intervals.")
    max_store_mib: Optional[float] = doc(None, "Refuse the run when the merge store (snapshots and EMA accumulators "
                                               "of the primary merge and the candidates) exceeds this on a rank.")
    save_candidates: bool = doc(False, "Also write each candidate's merge to <save>/merged_candidates/<name>/iter_N at "
                                       "each save.")


@dataclass
class RecoveryConfig:
    """Automatic loss-spike recovery: roll back to the PMA of the last good checkpoints.

    Detection (all ranks decide together, one all-reduce of a flag per iteration): a non-finite
    loss or gradient norm at once; or, for `patience` consecutive iterations, the loss above
    `loss_factor` x its running median over `baseline_window` iterations, or the gradient norm
    above `grad_norm_factor` x its running median.
    """

    enabled: bool = doc(False, "Detect loss spikes and recover automatically.")
    loss_factor: float = doc(1.5, "Spike when the loss exceeds this multiple of its running median.")
    grad_norm_factor: Optional[float] = doc(20.0, "Spike when the gradient norm exceeds this multiple of its running median; null = off.")
    patience: int = doc(3, "Consecutive anomalous iterations that make a spike.")
    baseline_window: int = doc(20, "Iterations in the running medians; detection starts once it is full.")
    merge: MergeSelection = field(
        default_factory=MergeSelection, metadata={"help": "The merge of the good checkpoints (the paper used the "
                                                          "SMA of 3)."})
    optimizer: OptimizerState = doc(
        "fresh", "Optimizer state after the roll-back: fresh, or the newest good checkpoint's."
    )
    skip_data: bool = doc(True, "Skip the data seen since the restored checkpoint (do not replay it).")
    max_retries: int = doc(3, "Recoveries allowed in one run; one more spike stops the run with an error.")


@dataclass
class RunConfig:
    """A whole pre-training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    fault_injection: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)


@dataclass(frozen=True)
class MovedKey:
    """Where a deprecated key's value goes now.

    ``values`` translates old values (e.g. ``True`` -> ``"fresh"``); without it the value moves as
    it is. ``enables`` is a switch the old key implied by being non-null (the new section's
    ``enabled``).
    """

    new: str
    values: Optional[dict] = None
    enables: Optional[str] = None


#: Keys that moved or changed vocabulary, old -> new: still read (with a warning when set), so
#: shipped configs and the run configs saved beside older checkpoints keep working.
DEPRECATED_KEYS = {
    "scheduler.inject_spike_at": MovedKey("fault_injection.lr_spike_at"),
    "scheduler.inject_spike_factor": MovedKey("fault_injection.lr_spike_factor"),
    "scheduler.inject_spike_iters": MovedKey("fault_injection.lr_spike_iters"),
    "checkpoint.no_load_optim": MovedKey("checkpoint.resume_optimizer", values={True: "fresh", False: "checkpoint"}),
    "checkpoint.init_merge_method": MovedKey("checkpoint.init_merge.method", enables="checkpoint.init_merge.enabled"),
    "checkpoint.init_merge_last": MovedKey("checkpoint.init_merge.window"),
    "checkpoint.init_merge_every": MovedKey("checkpoint.init_merge.every"),
    "checkpoint.init_merge_iterations": MovedKey("checkpoint.init_merge.iterations"),
    "checkpoint.init_merge_alpha": MovedKey("checkpoint.init_merge.ema_alpha"),
    "recovery.window": MovedKey("recovery.merge.window"),
    "recovery.method": MovedKey("recovery.merge.method"),
    "recovery.ema_alpha": MovedKey("recovery.merge.ema_alpha"),
    "recovery.optimizer": MovedKey("recovery.optimizer", values={"reset": "fresh", "keep": "checkpoint"}),
}


# ---------------------------------------------------------------------------
# Loading: YAML + overrides -> dataclasses, with types checked per key.


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and where lossless, convert) ``value`` against the annotation ``tp``."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {_describe(inner)})")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not a boolean (true/false)")
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 without a dot as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a number")
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: {value!r} is not a string")
    if inner is list or origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} is not a list")
        return list(value)
    return value


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, data: dict, prefix: str, default: Any = None) -> Any:
    """``cls`` from ``data`` (keys checked, values coerced); unset keys keep ``default``'s values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            # A key of a nested section given one level up (recovery.weights: recovery.merge.weights).
            nested = [f"{n}.{name}" for n in sorted(names) if dataclasses.is_dataclass(hints[n])
                      and name in {f.name for f in dataclasses.fields(hints[n])}]
            close = nested or difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{key}'{hint} (known in this section: {', '.join(sorted(names))})")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            nested_default = getattr(default, name) if default is not None else fields[name].default_factory()
            kwargs[name] = _build(tp, value or {}, f"{key}.", nested_default)
        else:
            kwargs[name] = _coerce(key, value, tp)
    return dataclasses.replace(default, **kwargs) if default is not None else cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value parsed as YAML: numbers, booleans, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or key.startswith(".") or key.endswith("."):
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a RunConfig from a plain dict plus ``dotted.key=value`` overrides (which win, also
    when one names a deprecated key and the dict its new one)."""
    tree = copy.deepcopy(dict(data or {}))
    _move_deprecated_keys(tree)
    for text in overrides:
        key, value = parse_override(text)
        single: dict = {}
        _set_dotted(single, key, value)
        _move_deprecated_keys(single)
        _merge_tree(tree, single)
    return _build(RunConfig, tree, "")


def _merge_tree(tree: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge_tree(tree[key], value)
        else:
            tree[key] = value


def _pop_dotted(tree: dict, dotted: str) -> tuple[bool, Any]:
    *sections, last = dotted.split(".")
    node = tree
    for part in sections:
        node = node.get(part)
        if not isinstance(node, dict):
            return False, None
    if last not in node:
        return False, None
    return True, node.pop(last)


def _get_dotted(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _as_override(value: Any) -> str:
    """``value`` as it would be written on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _move_deprecated_keys(tree: dict) -> None:
    """Rewrite DEPRECATED_KEYS in ``tree`` to their new keys and values (a new key set too wins)."""
    defaults = to_dict(RunConfig())
    for old, move in DEPRECATED_KEYS.items():
        found, value = _pop_dotted(tree, old)
        if not found:
            continue
        updates = _new_values(old, move, value)
        if updates is None:  # the key kept its name and holds a new value
            _set_dotted(tree, old, value)
            continue
        # Saved run configs hold every key: only a value someone set is worth a warning.
        if any(v != _get_dotted(defaults, k) for k, v in updates.items()):
            given = f"{old}: {_as_override(value)}" if move.values is not None else old
            message = f"{given} is deprecated: use " + " ".join(f"{k}={_as_override(v)}" for k, v in updates.items())
            warnings.warn(message, DeprecationWarning, stacklevel=3)
            logging.getLogger(__name__).warning(message)
        for key, new_value in updates.items():
            _set_dotted_default(tree, key, new_value)


def _new_values(old: str, move: MovedKey, value: Any) -> Optional[dict]:
    """The new keys and values for ``old: value``; None when ``value`` is already new (same key)."""
    if move.values is not None:
        try:
            value = move.values[value]
        except (KeyError, TypeError):
            if old == move.new:
                return None
            raise ConfigError(f"{old}: {value!r} is not one of {', '.join(map(_as_override, move.values))} "
                              f"({old} is deprecated: use {move.new})") from None
    if move.enables is None:
        return {move.new: value}
    return {move.enables: value is not None, **({move.new: value} if value is not None else {})}


def _set_dotted_default(tree: dict, dotted: str, value: Any) -> None:
    """Set ``dotted`` in ``tree`` unless it is set already."""
    *sections, last = dotted.split(".")
    node = tree
    for part in sections:
        if node.get(part) is None:  # absent, or an empty YAML section
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(sections)}: expected a mapping, got {node!r}")
    node.setdefault(last, value)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config and apply overrides; does not validate (see :func:`validate`)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(data, overrides)


def declared_world_size(path: str | Path) -> Optional[int]:
    """The world size a config file says it is for (a comment line ``# world_size: N``), or None."""
    for line in Path(path).read_text().splitlines():
        key, _, value = line.lstrip("#").partition(":")
        if line.startswith("#") and key.strip() == "world_size" and value.strip().isdigit():
            return int(value)
    return None


def to_dict(cfg: Any) -> dict:
    """The config as plain data (what is saved beside checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


# ---------------------------------------------------------------------------
# Validation: every rule names the key(s) involved.


def _require(ok: bool, message: str) -> bool:
    """Report ``message`` unless ``ok``: collected while :func:`validation_errors` runs, else raised.
    Returns ``ok``, so a section can stop before checks that build on a bad value."""
    if ok:
        return True
    errors = _collected.get()
    if errors is None:
        raise ConfigError(message)
    errors.append(message)
    return False


@dataclass(frozen=True)
class ScheduleLengths:
    """The LR schedule in iterations, after fractions are resolved."""

    warmup: int
    decay: int  # iteration where the decay ends
    wsd_decay: int  # length of the WSD decay stage


def schedule_lengths(cfg: RunConfig) -> ScheduleLengths:
    """Resolve scheduler.*_iters / *_fraction against the run's length (an iteration count wins)."""
    s = cfg.scheduler
    decay = s.decay_iters if s.decay_iters is not None else max(1, cfg.train.train_iters)

    def share(fraction: float) -> int:  # rounded down; the epsilon keeps 0.29 x 100 at 29
        return math.floor(fraction * decay + 1e-9)

    warmup = s.warmup_iters if s.warmup_iters is not None else share(s.warmup_fraction)
    wsd_decay = s.wsd_decay_iters if s.wsd_decay_iters is not None else max(1, share(s.wsd_decay_fraction))
    return ScheduleLengths(warmup=warmup, decay=decay, wsd_decay=wsd_decay)


def validate(cfg: RunConfig, world_size: Optional[int] = None, cuda_available: Optional[bool] = None) -> None:
    """Check a config for consistency; with ``world_size`` also against the launch, and against
    a machine with (``cuda_available=True``) or without CUDA (default: this machine).

    Raises one ConfigError listing every problem found, each naming the key, the value and
    what is allowed.
    """
    errors = validation_errors(cfg, world_size, cuda_available)
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors))


_collected: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("config_errors", default=None)


def validation_errors(cfg: RunConfig, world_size: Optional[int] = None,
                      cuda_available: Optional[bool] = None) -> list[str]:
    """Every problem of ``cfg`` (see :func:`validate`), in the order of the sections."""
    cuda = _cuda_available() if cuda_available is None else cuda_available
    errors: list[str] = []
    token = _collected.set(errors)
    try:
        _validate_sizes(cfg)
        if errors:  # the checks below divide by these sizes
            return errors
        for section in (_validate_shape, _validate_moe, _validate_merge, _validate_candidates,
                        _validate_init_and_recovery, _validate_stopping_and_retention, _validate_optimizer,
                        _validate_schedule, _validate_data):
            _run_section(errors, lambda: section(cfg))
        _run_section(errors, lambda: _validate_platform(cfg, cuda))
        if world_size is not None:
            _run_section(errors, lambda: _validate_launch(cfg, world_size))
    finally:
        _collected.reset(token)
    return errors


def _run_section(errors: list[str], section) -> None:
    """Run one group of checks; one that trips over a value already reported stops quietly."""
    try:
        section()
    except ConfigError as exc:  # raised directly (not through _require)
        errors.append(str(exc))
    except Exception:
        if not errors:
            raise


def _validate_sizes(cfg: RunConfig) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for key, value in [
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size),
        ("parallel.pipeline_model_parallel_size", p.pipeline_model_parallel_size),
        ("parallel.expert_model_parallel_size", p.expert_model_parallel_size),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size),
        ("train.seq_length", t.seq_length),
        ("train.eval_iters", t.eval_iters),
        ("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by),
        ("logging.log_interval", cfg.logging.log_interval),
    ]:
        _require(value >= 1, f"{key}: {value} must be a positive integer")


def _validate_shape(cfg: RunConfig) -> None:
    m, p, t, c = cfg.model, cfg.parallel, cfg.train, cfg.checkpoint
    _require(t.train_iters >= 0, f"train.train_iters: {t.train_iters} must be >= 0 (0: load or merge, evaluate, save)")
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    _require(
        m.hidden_size % m.num_attention_heads == 0 or m.kv_channels is not None,
        f"model.hidden_size: {m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads} "
        "(set model.kv_channels to use another head size)",
    )
    _require(
        m.num_attention_heads % tp == 0,
        f"parallel.tensor_model_parallel_size: {tp} does not divide model.num_attention_heads={m.num_attention_heads}",
    )
    groups = m.num_query_groups or m.num_attention_heads
    _require(
        m.num_attention_heads % groups == 0,
        f"model.num_query_groups: {groups} does not divide model.num_attention_heads={m.num_attention_heads}",
    )
    if m.num_query_groups is not None:  # else groups are the heads, checked above
        _require(groups % tp == 0, f"parallel.tensor_model_parallel_size: {tp} does not divide model.num_query_groups={groups}")
    _require(m.ffn_hidden_size % tp == 0, f"parallel.tensor_model_parallel_size: {tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")
    _require(
        m.make_vocab_size_divisible_by % tp == 0,
        f"model.make_vocab_size_divisible_by: {m.make_vocab_size_divisible_by} must be a multiple of "
        f"parallel.tensor_model_parallel_size={tp} (the padded vocabulary is split across TP ranks)",
    )
    vp = p.virtual_pipeline_model_parallel_size
    if vp is not None:
        _require(vp >= 1, f"parallel.virtual_pipeline_model_parallel_size: {vp} must be null or >= 1")
        _require(pp > 1 or vp == 1, "parallel.virtual_pipeline_model_parallel_size needs parallel.pipeline_model_parallel_size > 1")
    chunks = pp * (vp or 1)
    _require(
        m.num_layers % chunks == 0,
        f"model.num_layers: {m.num_layers} is not divisible by pipeline stages x virtual chunks = {chunks}",
    )
    if p.sequence_parallel:
        _require(tp > 1, "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
    if p.overlap_param_gather:
        _require(p.use_distributed_optimizer, "parallel.overlap_param_gather needs parallel.use_distributed_optimizer: true")
    _require(not (c.format == "torch" and p.use_distributed_optimizer),
             "checkpoint.format: torch does not support parallel.use_distributed_optimizer (Megatron-LM keeps that "
             "state in separate distrib_optim.pt files); use checkpoint.format: torch_dist")
    _require(not (c.format == "torch" and cfg.merge.enabled),
             "checkpoint.format: torch cannot hold the in-training merge state (merge.enabled); use "
             "checkpoint.format: torch_dist, or set merge.enabled: false and merge the torch checkpoints offline "
             "with megatron-merge")
    for key, value in [("model.hidden_dropout", m.hidden_dropout), ("model.attention_dropout", m.attention_dropout)]:
        _require(0.0 <= value < 1.0, f"{key}: {value} must be in [0, 1)")
    _require(m.init_method_std > 0, f"model.init_method_std: {m.init_method_std} must be > 0")
    if m.recompute_granularity == "full":
        _require(m.recompute_num_layers is not None and m.recompute_num_layers >= 1,
                 "model.recompute_num_layers must be >= 1 with model.recompute_granularity: full")


def _validate_optimizer(cfg: RunConfig) -> None:
    o = cfg.optimizer
    if not _require(o.lr > 0 and math.isfinite(o.lr), f"optimizer.lr: {o.lr} must be a positive number"):
        return
    _require(0 <= o.min_lr <= o.lr, f"optimizer.min_lr: {o.min_lr} must be in [0, optimizer.lr={o.lr}]")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay: {o.weight_decay} must be >= 0")
    _require(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "optimizer.adam_beta1/adam_beta2 must be in [0, 1)")
    _require(o.adam_eps > 0, f"optimizer.adam_eps: {o.adam_eps} must be > 0")
    _require(o.clip_grad >= 0, f"optimizer.clip_grad: {o.clip_grad} must be >= 0 (0 disables clipping)")


def _validate_data(cfg: RunConfig) -> None:
    t, d, c = cfg.train, cfg.data, cfg.checkpoint
    if t.eval_interval is not None:
        _require(t.eval_interval >= 1, f"train.eval_interval: {t.eval_interval} must be null or >= 1")
    if c.save_interval is not None:
        _require(c.save_interval >= 1, f"checkpoint.save_interval: {c.save_interval} must be null or >= 1")
    if d.tokenizer == "hf":
        _require(d.tokenizer_file is not None, "data.tokenizer: hf needs data.tokenizer_file (a tokenizers JSON file)")
        if d.tokenizer_file is not None:
            _require(Path(d.tokenizer_file).is_file(), f"data.tokenizer_file: {d.tokenizer_file} does not exist")
    _require(bool(d.data_path) or d.allow_default_corpus,
             "data.data_path is empty and this config sets data.allow_default_corpus: false (a run of this size "
             "must not train on the small embedded corpus): give data.data_path=[/data/corpus] (made with "
             "pretrain-preprocess, with the tokenizer of data.tokenizer)")
    _validate_data_paths(d)
    _validate_split(d.split)
    if c.load is not None:
        _require(Path(c.load).exists(), f"checkpoint.load: {c.load} does not exist")


def _validate_platform(cfg: RunConfig, cuda: bool) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    on_cpu = t.device == "cpu" or (t.device == "auto" and not cuda)
    if cfg.merge.enabled and cfg.merge.storage == "device":
        _require(not on_cpu, "merge.storage: device keeps snapshots in GPU memory and needs CUDA; use host on CPUs")
    if t.device == "cuda":
        _require(cuda, "train.device: cuda was requested but CUDA is not available")
    if on_cpu:
        _require(t.precision != "fp16", "train.precision: fp16 needs CUDA (its loss scaler is CUDA-only); use bf16 or fp32 on CPU")
        _require(
            m.transformer_impl != "transformer_engine",
            "model.transformer_impl: transformer_engine needs CUDA; use auto or local on CPU",
        )
        _require(not cfg.moe.grouped_gemm, "moe.grouped_gemm needs CUDA; set it false on CPU")
        _require(
            not p.sequence_parallel,
            "parallel.sequence_parallel needs Transformer Engine or apex norms (megatron-core's torch norm refuses "
            "it), which need CUDA; set it false on CPU",
        )
        _require(not p.overlap_grad_reduce and not p.overlap_param_gather,
                 "parallel.overlap_grad_reduce/overlap_param_gather need CUDA streams; set them false on CPU")


def _validate_launch(cfg: RunConfig, world_size: int) -> None:
    p, t = cfg.parallel, cfg.train
    tp, pp, vp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    mp = tp * pp
    _require(
        world_size % mp == 0,
        f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size x "
        f"parallel.pipeline_model_parallel_size = {tp} x {pp} = {mp}",
    )
    if world_size % mp:
        return  # the checks below need a whole data-parallel size
    dp = world_size // mp
    _require(
        t.global_batch_size % (t.micro_batch_size * dp) == 0,
        f"train.global_batch_size: {t.global_batch_size} is not divisible by train.micro_batch_size x "
        f"data-parallel size = {t.micro_batch_size} x {dp}",
    )
    ep = p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    _require(
        (world_size // pp) % (ep * etp) == 0,
        f"parallel.expert_model_parallel_size x expert_tensor_parallel_size = {ep} x {etp} does not divide "
        f"the {world_size // pp} ranks of a pipeline stage",
    )
    if pp > 1 and vp is not None and vp > 1:
        micro = t.global_batch_size // (t.micro_batch_size * dp)
        _require(micro % pp == 0, f"interleaved pipelining needs microbatches per step ({micro}) divisible by PP={pp}")


def merge_interval_iterations(cfg: RunConfig) -> int:
    """V in iterations (merge.interval, or merge.interval_tokens over tokens per iteration)."""
    m = cfg.merge
    if m.interval is not None:
        return m.interval
    return max(1, round(m.interval_tokens / (cfg.train.global_batch_size * cfg.train.seq_length)))


def _validate_schedule(cfg: RunConfig) -> None:
    s, o = cfg.scheduler, cfg.optimizer
    if o.lr > 0:  # else reported with the optimizer
        _require(0 <= s.init_lr <= o.lr, f"scheduler.init_lr: {s.init_lr} must be in [0, optimizer.lr={o.lr}]")
    fractions_ok = _require(0 <= s.warmup_fraction < 1,
                            f"scheduler.warmup_fraction: {s.warmup_fraction} must be in [0, 1)")
    fractions_ok &= _require(0 < s.wsd_decay_fraction <= 1,
                             f"scheduler.wsd_decay_fraction: {s.wsd_decay_fraction} must be in (0, 1]")
    lengths = schedule_lengths(cfg)
    decay = lengths.decay
    if not (fractions_ok and _require(decay >= 1, f"scheduler.decay_iters: {decay} must be >= 1")):
        return
    # Name the key the user set; a fraction's message shows what it resolved to.
    warmup_key = ("scheduler.warmup_iters:" if s.warmup_iters is not None
                  else f"scheduler.warmup_fraction: {s.warmup_fraction:g} x decay_iters =")
    if not _require(0 <= lengths.warmup < decay, f"{warmup_key} {lengths.warmup} must be in [0, decay_iters={decay})"):
        return
    if s.style == "wsd":
        if s.wsd_decay_iters is None and s.warmup_iters is None:
            if not _require(s.warmup_fraction + s.wsd_decay_fraction <= 1,
                            f"scheduler.warmup_fraction + wsd_decay_fraction = {s.warmup_fraction:g} + "
                            f"{s.wsd_decay_fraction:g} must be <= 1"):
                return
        wsd_key = ("scheduler.wsd_decay_iters:" if s.wsd_decay_iters is not None
                   else f"scheduler.wsd_decay_fraction: {s.wsd_decay_fraction:g} x decay_iters =")
        _require(
            0 < lengths.wsd_decay <= decay - lengths.warmup,
            f"{wsd_key} {lengths.wsd_decay} must be in [1, decay_iters - warmup = {decay} - {lengths.warmup} = "
            f"{decay - lengths.warmup}] (scheduler.wsd_decay_fraction scales with the run)",
        )


def _validate_selection(s: MergeSelection, key: str, fewest: int, window_used: bool = True) -> None:
    """The rules of every merge selection (``key``: merge, checkpoint.init_merge or recovery.merge);
    ``window_used=False`` where the merge ignores ``window`` (the in-training EMA)."""
    _require(s.method in METHODS, f"{key}.method: {s.method!r} is not one of {', '.join(map(repr, METHODS))}")
    n, count_key = s.count(), s.count_key()
    if count_key == "window":
        _require(not window_used or s.window >= fewest, f"{key}.window: {s.window} must be >= {fewest}"
                 + (" (merging needs at least 2 checkpoints)" if fewest == 2 else ""))
    else:
        _require(n >= fewest, f"{key}.{count_key}: {getattr(s, count_key)!r} must name at least {fewest}")
    if s.method == "ema":
        _require(_is_number(s.ema_alpha) and 0.0 < s.ema_alpha <= 1.0, f"{key}.ema_alpha: {s.ema_alpha} must be in (0, 1]")
    if s.method == "weights":
        numbers = all(_is_number(w) and math.isfinite(float(w)) and float(w) >= 0 for w in s.weights)
        _require(len(s.weights) == n and numbers and sum(float(w) for w in s.weights) > 0,
                 f"{key}.weights: {s.weights!r} must be {n} non-negative numbers, not all 0 (one per checkpoint of "
                 f"{key}.{count_key}, oldest first)")
    else:
        _require(not s.weights, f"{key}.weights is only used with {key}.method: weights")


def _validate_merge(cfg: RunConfig) -> None:
    m, c = cfg.merge, cfg.checkpoint
    if not m.enabled:
        return
    # The in-training EMA runs over every snapshot (OnlineMergeSpec.count / store_size): no window.
    _validate_selection(m, "merge", fewest=2, window_used=m.method != "ema")
    _require((m.interval is None) != (m.interval_tokens is None),
             "merge: set exactly one of merge.interval (iterations) and merge.interval_tokens")
    if m.interval is not None:
        _require(m.interval >= 1, f"merge.interval: {m.interval} must be >= 1")
    else:
        tokens = cfg.train.global_batch_size * cfg.train.seq_length
        _require(m.interval_tokens >= tokens,
                 f"merge.interval_tokens: {m.interval_tokens:g} is less than one iteration ({tokens} tokens)")
    _require(m.start_iteration >= 0, f"merge.start_iteration: {m.start_iteration} must be >= 0")
    if m.save:
        _require(c.save is not None, "merge.save needs checkpoint.save (merged checkpoints go to <save>/merged)")
    if m.storage == "disk":
        interval = merge_interval_iterations(cfg)
        _require(c.save is not None and c.save_interval is not None,
                 "merge.storage: disk reads snapshots back from saved checkpoints: set checkpoint.save and "
                 "checkpoint.save_interval")
        _require(interval % c.save_interval == 0,
                 f"merge.storage: disk needs the merge interval ({interval} iterations) to be a multiple of "
                 f"checkpoint.save_interval={c.save_interval}")


def _validate_candidates(cfg: RunConfig) -> None:
    """merge.candidates, merge.max_store_mib, merge.save_candidates."""
    from megatron_merge.candidates import parse_candidates

    m = cfg.merge
    _require(m.max_store_mib is None or (_is_number(m.max_store_mib) and m.max_store_mib > 0),
             f"merge.max_store_mib: {m.max_store_mib!r} must be a positive number of MiB (or null: no budget)")
    if not m.candidates:
        _require(not (m.enabled and m.save_candidates), "merge.save_candidates needs merge.candidates")
        return
    _require(isinstance(m.candidates, list),
             f"merge.candidates: {m.candidates!r} must be a list of strings, e.g. [sma:3, ema:0.2]")
    try:
        parse_candidates(m.candidates)
    except ValueError as err:
        raise ConfigError(f"merge.candidates{err}") from None
    if not m.enabled:  # like the rest of the merge section: off means off (the strings are checked still)
        return
    _require(m.storage != "disk", "merge.candidates need the snapshots in memory: use merge.storage: host or device")
    _require(not m.save_candidates or cfg.checkpoint.save is not None,
             "merge.save_candidates needs checkpoint.save (candidate merges go to <save>/merged_candidates)")


def _validate_stopping_and_retention(cfg: RunConfig) -> None:
    t, c, m = cfg.train, cfg.checkpoint, cfg.merge
    for name in t.exit_signals:
        _require(isinstance(name, str) and name in signal.Signals.__members__ and name not in ("SIGKILL", "SIGSTOP"),
                 f"train.exit_signals: {name!r} is not a signal name that can be handled (e.g. SIGTERM, SIGUSR1)")
    if t.exit_duration_mins is not None:
        _require(t.exit_duration_mins > 0, f"train.exit_duration_mins: {t.exit_duration_mins} must be > 0")
    if t.exit_interval is not None:
        _require(t.exit_interval >= 1, f"train.exit_interval: {t.exit_interval} must be >= 1")
    for section, keep_last, keep_every in (("checkpoint", c.keep_last, c.keep_every),
                                           ("merge", m.keep_last, m.keep_every)):
        if keep_last is not None:
            _require(keep_last >= 1, f"{section}.keep_last: {keep_last} must be >= 1 (the newest is always kept)")
        if keep_every is not None:
            _require(keep_every >= 1, f"{section}.keep_every: {keep_every} must be >= 1")
        if keep_last is not None or keep_every is not None:
            _require(c.save is not None, f"{section}.keep_last/keep_every need checkpoint.save")
    if c.async_save:
        _require(c.format == "torch_dist", "checkpoint.async_save needs checkpoint.format: torch_dist")
        _require(not (m.enabled and m.storage == "disk"),
                 "checkpoint.async_save with merge.storage: disk would read checkpoints still being written; "
                 "use merge.storage: host")


def _validate_init_and_recovery(cfg: RunConfig) -> None:
    c, r, f = cfg.checkpoint, cfg.recovery, cfg.fault_injection
    if c.init_from is not None:
        _require(Path(c.init_from).exists(), f"checkpoint.init_from: {c.init_from} does not exist")
        _require(c.load is None, "checkpoint.init_from starts a new phase and checkpoint.load resumes one: set only one")
    if c.init_merge.enabled:
        i = c.init_merge
        _require(c.init_from is not None, "checkpoint.init_merge.enabled needs checkpoint.init_from (a run directory)")
        _validate_selection(i, "checkpoint.init_merge", fewest=2)
        _require(i.every >= 1, f"checkpoint.init_merge.every: {i.every} must be >= 1")
        _require(all(isinstance(it, int) and not isinstance(it, bool) and it >= 0 for it in i.iterations)
                 and len(set(i.iterations)) == len(i.iterations),
                 f"checkpoint.init_merge.iterations: {i.iterations!r} must be distinct saved iteration numbers")
    if f.lr_spike_at is not None:
        _require(f.lr_spike_at >= 1 and f.lr_spike_iters >= 1 and f.lr_spike_factor > 0,
                 "fault_injection.lr_spike_at/lr_spike_iters must be >= 1 and lr_spike_factor > 0")
    if not r.enabled:
        return
    _require(r.loss_factor > 1.0, f"recovery.loss_factor: {r.loss_factor} must be > 1")
    if r.grad_norm_factor is not None:
        _require(r.grad_norm_factor > 1.0, f"recovery.grad_norm_factor: {r.grad_norm_factor} must be > 1 or null")
    _require(r.patience >= 1, f"recovery.patience: {r.patience} must be >= 1")
    _require(r.baseline_window >= 3, f"recovery.baseline_window: {r.baseline_window} must be >= 3")
    _validate_selection(r.merge, "recovery.merge", fewest=1)
    _require(r.max_retries >= 1, f"recovery.max_retries: {r.max_retries} must be >= 1")
    _require(c.save is not None and c.save_interval is not None,
             "recovery rolls back to saved checkpoints: set checkpoint.save and checkpoint.save_interval")
    _require(c.format == "torch_dist", "recovery merges torch_dist checkpoints per rank: checkpoint.format must be torch_dist")


def _validate_moe(cfg: RunConfig) -> None:
    moe, p = cfg.moe, cfg.parallel
    if moe.num_experts is None:
        _require(p.expert_model_parallel_size == 1, "parallel.expert_model_parallel_size > 1 needs moe.num_experts")
        return
    _require(moe.num_experts >= 1, f"moe.num_experts: {moe.num_experts} must be >= 1")
    _require(
        1 <= moe.router_topk <= moe.num_experts,
        f"moe.router_topk: {moe.router_topk} must be between 1 and moe.num_experts={moe.num_experts}",
    )
    _require(
        moe.num_experts % p.expert_model_parallel_size == 0,
        f"moe.num_experts: {moe.num_experts} is not divisible by parallel.expert_model_parallel_size={p.expert_model_parallel_size}",
    )
    _require(moe.aux_loss_coeff >= 0, f"moe.aux_loss_coeff: {moe.aux_loss_coeff} must be >= 0")
    if moe.z_loss_coeff is not None:
        _require(moe.z_loss_coeff >= 0, f"moe.z_loss_coeff: {moe.z_loss_coeff} must be >= 0")
    _require(moe.layer_freq >= 1, f"moe.layer_freq: {moe.layer_freq} must be >= 1")
    _require(
        p.tensor_model_parallel_size == 1 or p.sequence_parallel,
        f"parallel.tensor_model_parallel_size: {p.tensor_model_parallel_size} with moe.num_experts needs "
        "parallel.sequence_parallel: true (megatron-core's MoE layer refuses tensor parallelism without it); "
        "parallel.expert_tensor_parallel_size splits the experts alone",
    )
    if p.expert_tensor_parallel_size is not None:
        _require(p.expert_tensor_parallel_size >= 1,
                 f"parallel.expert_tensor_parallel_size: {p.expert_tensor_parallel_size} must be null or >= 1")
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    width = moe.ffn_hidden_size or cfg.model.ffn_hidden_size
    _require(width % etp == 0, f"moe.ffn_hidden_size: {width} is not divisible by the expert tensor-parallel size {etp}")
    if moe.shared_expert_intermediate_size is not None:
        _require(moe.shared_expert_intermediate_size % p.tensor_model_parallel_size == 0,
                 "moe.shared_expert_intermediate_size must be divisible by parallel.tensor_model_parallel_size")


def _validate_data_paths(d: DataConfig) -> None:
    entries = list(d.data_path)
    if not entries:
        return
    weighted = len(entries) % 2 == 0 and _is_number(entries[0])
    prefixes = entries[1::2] if weighted else entries
    if weighted:
        for w in entries[0::2]:
            _require(_is_number(w) and float(w) > 0, f"data.data_path: weight {w!r} must be a positive number")
    for prefix in prefixes:
        _require(not _is_number(prefix), f"data.data_path: {entries!r} mixes weights and prefixes; use [w1, prefix1, w2, prefix2]")
        for suffix in (".bin", ".idx"):
            _require(Path(f"{prefix}{suffix}").is_file(), f"data.data_path: {prefix}{suffix} does not exist")


def _validate_split(split: str) -> None:
    parts = split.replace("/", ",").split(",")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise ConfigError(f"data.split: {split!r} must be comma-separated numbers like '98,2,0'") from None
    _require(len(values) <= 3 and all(v >= 0 for v in values), f"data.split: {split!r} must be up to 3 non-negative parts")
    _require(values[0] > 0, f"data.split: {split!r} leaves no training data")


def _is_number(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def reference_markdown() -> str:
    """The config reference (every key, type, default, description) as Markdown."""
    lines = []
    for section in dataclasses.fields(RunConfig):
        cls = section.type if isinstance(section.type, type) else typing.get_type_hints(RunConfig)[section.name]
        lines += [f"### `{section.name}`", "", (cls.__doc__ or "").strip(), "", "| key | default | description |", "|---|---|---|"]
        lines += _reference_rows(cls, section.name)
        lines.append("")
    return "\n".join(lines)


def _reference_rows(cls: type, prefix: str) -> list[str]:
    """One table row per key of ``cls``; a nested section gives a row of its own, then its keys."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}.{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            text = f.metadata.get("help") or " ".join((tp.__doc__ or "").split())
            rows.append(f"| `{key}` | {tp.__name__} | {text} |")
            rows += _reference_rows(tp, key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"| `{key}` | `{default!r}` | {f.metadata.get('help', '')} |")
    return rows


def reference_document() -> str:
    """The whole of docs/config.md."""
    return (
        "# Run config reference\n\n"
        "Generated from the dataclasses in `pretrain/config.py` by "
        "`python -m pretrain.config --reference > docs/config.md`;\n"
        "a test keeps this file current. Override any key on the command line as `section.key=value`.\n\n"
        + reference_markdown()
    )


if __name__ == "__main__":
    if "--reference" in sys.argv:
        print(reference_document(), end="")
    else:
        print("usage: python -m pretrain.config --reference > docs/config.md", file=sys.stderr)
        sys.exit(2)
