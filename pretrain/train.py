"""The pre-training loop, top to bottom.

    setup:   process groups -> tokenizer -> model (DDP) -> optimizer -> LR schedule
             -> resume -> datasets
    loop:    one optimizer step over global_batch_size sequences (megatron-core's
             pipeline schedule runs the microbatches), then log, evaluate, save
    finish:  final evaluation and checkpoint, a summary

Everything parallel comes from megatron-core: parallel_state, GPTModel, its
DistributedDataParallel, get_megatron_optimizer, the forward/backward
schedules, OptimizerParamScheduler and dist_checkpointing.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from pretrain import checkpoint as ckpt
from pretrain import moe_metrics
from pretrain.async_save import AsyncCheckpointSaver
from pretrain.banner import parameter_counts, startup_banner
from pretrain.batches import TrainingData, build_training_data
from pretrain.candidate_report import plot_candidates
from pretrain.config import RunConfig, schedule_lengths
from pretrain.merging import build_merger, save_candidate_checkpoints, save_merged_checkpoint
from pretrain.metrics import MetricsLogger, read_metrics, roll_back
from pretrain.pma_init import initialize_from
from pretrain.recovery import LossSpikeRecovery
from pretrain.model import build_model
from pretrain.platform import Platform, collective_device, init_distributed
from pretrain.resume import choose_start, refuse_overwrite
from pretrain.retention import apply_merged_retention, apply_retention
from pretrain.stopping import StopConditions

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


@dataclass
class RunSummary:
    """What a finished run reports (on every rank; losses are filled on the logging rank)."""

    iterations: int = 0  # the iteration the run ended at
    start_iteration: int = 0  # ... and began at (resumed or continued runs start above 0)
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    losses: List[float] = field(default_factory=list)
    evaluations: List[dict] = field(default_factory=list)
    seconds: float = 0.0
    checkpoint: Optional[str] = None
    merged_checkpoint: Optional[str] = None
    recoveries: List[dict] = field(default_factory=list)
    stopped: Optional[str] = None  # why the run stopped before train_iters (a signal, a time budget)


# ---------------------------------------------------------------------------
# Setup


def wrap_with_ddp(cfg: RunConfig, model_chunks) -> list:
    """megatron-core's DDP over each model chunk: contiguous grad buffers, DP reduction."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.train.precision != "fp32",
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                # Only the first chunk's buckets start reducing with no_sync off.
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(model_chunks)
    ]
    # The schedules call these to sync grads across DP and tied embeddings across PP.
    config = model_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    if cfg.parallel.overlap_grad_reduce:
        config.grad_sync_func = [m.start_grad_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].start_grad_sync
    if cfg.parallel.overlap_param_gather:
        config.param_sync_func = [m.start_param_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].start_param_sync
    return wrapped


def build_optimizer(cfg: RunConfig, model_chunks):
    """megatron-core's optimizer (Adam, clipping, mixed precision, optionally distributed)."""
    o, precision = cfg.optimizer, cfg.train.precision
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=o.name,
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            initial_loss_scale=2.0**16 if precision == "fp16" else None,
        ),
        model_chunks,
    )
    # fp16: the schedules scale each loss (MoE aux losses included) by the optimizer's loss scale.
    model_chunks[0].config.grad_scale_func = optimizer.scale_loss if precision == "fp16" else None
    return optimizer


def build_scheduler(cfg: RunConfig, optimizer) -> OptimizerParamScheduler:
    """Warmup, then constant / linear / cosine / WSD decay, counted in iterations."""
    s, o = cfg.scheduler, cfg.optimizer
    lengths = schedule_lengths(cfg)
    decay_iters, wsd_decay = lengths.decay, lengths.wsd_decay
    style = {"wsd": "WSD"}.get(s.style, s.style)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=s.init_lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=lengths.warmup,
        lr_decay_steps=decay_iters,
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_decay if style == "WSD" else None,
        lr_wsd_decay_style=s.wsd_decay_style if style == "WSD" else None,
        # A resumed run follows the config's schedule, not the checkpoint's: a
        # new phase (annealing, continued training) may change it.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def set_seeds(seed: int) -> None:
    import random

    import numpy as np

    # Same seed on every rank (the full weights are drawn identically, then
    # sliced); megatron-core derives the per-TP-rank dropout streams.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


# ---------------------------------------------------------------------------
# One step


def _forward_step(data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    per_token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token_loss, partial(_loss_func, batch["loss_mask"])


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    # (sum, tokens, report): megatron-core divides by tokens and microbatches for
    # the gradient; the report keeps both so logs are exact token-weighted means.
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def _reduce_loss(reports: list) -> Optional[float]:
    """Token-weighted mean loss over microbatches and data-parallel ranks (last stage only)."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.zeros(2, dtype=torch.float64)
    for report in reports:
        total += report["lm loss"].detach().to("cpu", torch.float64)
    total = total.to(collective_device())
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0] / total[1].clamp(min=1))




def _run_schedule(model, microbatches: list, cfg: RunConfig, forward_only: bool) -> list:
    """megatron-core's pipeline schedule over one step's microbatches (each model chunk reads them all)."""
    return get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=[iter(microbatches) for _ in model] if len(model) > 1 else iter(microbatches),
        model=model,
        num_microbatches=len(microbatches),
        seq_length=cfg.train.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(model, optimizer, scheduler, microbatches: list, cfg: RunConfig):
    """Forward/backward over one global batch, then an optimizer step; returns (loss, grad_norm, skipped)
    with the gradient norm as a float (None when the optimizer does not compute one)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _run_schedule(model, microbatches, cfg, forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    return _reduce_loss(reports), None if grad_norm is None else float(grad_norm), not update_successful


@torch.no_grad()
def evaluate(model, batches: List[list], cfg: RunConfig) -> Optional[float]:
    """Mean validation loss over fixed batches (each a list of microbatches); None off the last stage."""
    for chunk in model:
        chunk.eval()
    reports = []
    for microbatches in batches:
        reports += _run_schedule(model, microbatches, cfg, forward_only=True)
    for chunk in model:
        chunk.train()
    return _reduce_loss(reports)


# ---------------------------------------------------------------------------
# The run


def is_logging_rank() -> bool:
    """The rank that holds the loss and writes metrics: last stage, first TP and DP rank."""
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def _metrics_path(cfg: RunConfig) -> Optional[str]:
    if cfg.logging.metrics_file:
        return cfg.logging.metrics_file
    if cfg.checkpoint.save:
        return str(Path(cfg.checkpoint.save) / "metrics.jsonl")
    return None


def pretrain(cfg: RunConfig, platform: Optional[Platform] = None) -> RunSummary:
    """Run (or resume) the training described by ``cfg``; the caller validated it."""
    platform = platform or init_distributed(cfg)
    t, c = cfg.train, cfg.checkpoint
    set_seeds(t.seed)
    if c.save:  # a kill during an earlier save must not block this resume or grow the disk
        if dist.get_rank() == 0:
            for action in ckpt.recover_interrupted_saves(c.save):
                logger.warning("checkpoint leftovers: %s", action)
        dist.barrier()

    data: TrainingData = build_training_data(cfg, platform)
    model = wrap_with_ddp(cfg, build_model(cfg, platform, data.vocab_size))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    merger = build_merger(cfg, model)  # None unless merge.enabled

    start_point = choose_start(cfg)  # checkpoint.load, else auto-resume from checkpoint.save
    state = ckpt.TrainState()
    init_record = None
    if c.init_from is not None and start_point.load is None:  # a new phase from (merged) weights: PMA-init
        state, init_record = initialize_from(cfg, model, optimizer, scheduler)
    if start_point.load is not None:
        if start_point.automatic:
            logger.info("auto-resume: continuing from %s (checkpoint.save holds it; checkpoint.overwrite=true "
                        "starts afresh)%s", start_point.load,
                        "; checkpoint.init_from is not used again" if c.init_from is not None else "")
        fresh_optimizer = c.resume_optimizer == "fresh"
        state = ckpt.load_checkpoint(cfg, model, optimizer, scheduler, start_point.load,
                                     load_optimizer=not fresh_optimizer, load_rng=not c.no_load_rng,
                                     merger=merger)
        if fresh_optimizer:
            state = ckpt.TrainState(iteration=state.iteration, consumed_samples=state.consumed_samples,
                                    resume_facts=state.resume_facts)
        scheduler.step(increment=state.iteration - scheduler.num_steps)
    refuse_overwrite(cfg, state.iteration)

    logging_rank = is_logging_rank()
    params = parameter_counts(model)  # collective
    if platform.rank == 0:
        print(startup_banner(cfg, platform, params, data.sources, data.vocab_size, _metrics_path(cfg)), flush=True)
    rolled_back = 0
    if logging_rank and _metrics_path(cfg):
        # A resumed run drops the records the crashed one wrote after its checkpoint; a fresh start all.
        rolled_back = roll_back(_metrics_path(cfg), state.iteration if start_point.load is not None else None)
    metrics = MetricsLogger(_metrics_path(cfg) if logging_rank else None,
                            tensorboard_dir=cfg.logging.tensorboard_dir if logging_rank else None,
                            run_dir=c.save if logging_rank else None)
    if logging_rank and c.save:
        Path(c.save).mkdir(parents=True, exist_ok=True)

    if start_point.load is not None:
        record = {"iteration": state.iteration, "event": "resume", "checkpoint": str(start_point.load),
                  "automatic": start_point.automatic, "consumed_samples": state.consumed_samples,
                  "rolled_back_records": rolled_back, **state.resume_facts}
        if merger is not None:
            record["merge_snapshots"] = merger.count
        metrics.log(record, stdout=f"resuming at iteration {state.iteration} from {start_point.load}"
                                   f"{' (auto-resume)' if start_point.automatic else ''}"
                                   f"{f', merge state of {merger.count} snapshot(s)' if merger is not None else ''}")
    if init_record is not None:
        metrics.log(init_record)
    recovery = LossSpikeRecovery(cfg) if cfg.recovery.enabled else None
    spike = LrSpikeInjection(cfg)
    train_batches = data.train_batches(state.consumed_samples)
    valid_batches = data.valid_batches()
    summary = RunSummary(start_iteration=state.iteration)
    tokens_per_step = t.global_batch_size * t.seq_length
    start = time.perf_counter()
    last_saved = None

    def run_evaluation() -> None:
        if not valid_batches:  # the split has no validation share
            return
        began = time.perf_counter()
        record = {"iteration": state.iteration, "val_loss": evaluate(model, valid_batches, cfg)}
        record["eval_s"] = time.perf_counter() - began
        if merger is not None and cfg.merge.eval and merger.count > 0:
            # The annealing prediction: the same batches through the merged weights, swapped in
            # and restored bit-exactly, so training goes on as if nothing happened.
            began = time.perf_counter()
            with merger.merged_weights_in_model():
                record["val_loss_merged"] = evaluate(model, valid_batches, cfg)
            record["eval_merged_s"] = time.perf_counter() - began
            record.update(merger.describe())
        if merger is not None and merger.candidates is not None:  # merge.candidates, each merged in turn
            record.update(merger.candidates.evaluate(lambda: evaluate(model, valid_batches, cfg)))
        if logging_rank:
            line = f"iter {state.iteration:6d} | validation loss {record['val_loss']:.4f}"
            if "val_loss_merged" in record:
                line += (f" | merged ({record['merge_method']}, n={record['merge_n']}, "
                         f"iterations {record['merge_span'][0]}-{record['merge_span'][1]}) "
                         f"{record['val_loss_merged']:.4f}")
            candidates = {k: v for k, v in (record.get("val_loss_candidates") or {}).items() if v is not None}
            if candidates:
                best = min(candidates, key=candidates.get)
                line += f" | best of {len(candidates)} candidates: {best} {candidates[best]:.4f}"
            metrics.log(record, stdout=line)
            summary.evaluations.append(record)
            if c.save and record.get("val_loss_candidates"):  # every evaluation of the run, resumed ones too
                plot_candidates([r for r in read_metrics(_metrics_path(cfg)) if "val_loss" in r],
                                Path(c.save) / "merge_candidates.png", tokens_per_step)

    saver = AsyncCheckpointSaver() if c.async_save else None

    def save() -> None:
        nonlocal last_saved
        began = time.perf_counter()
        if saver is not None:
            saver.wait()  # the previous save's files are written and published
        iteration = state.iteration
        summary.checkpoint = str(ckpt.save_checkpoint(
            cfg, model, optimizer, scheduler, state, merger=merger, saver=saver,
            # rank 0, once the checkpoint is published: deleting earlier ones is safe only then
            on_published=lambda: apply_retention(cfg, merger, iteration)))
        record = {"iteration": state.iteration, "event": "save", "save_s": time.perf_counter() - began}
        if saver is not None:
            record["async"] = True
        if merger is not None and cfg.merge.save and merger.count > 0:
            began = time.perf_counter()
            summary.merged_checkpoint = str(save_merged_checkpoint(cfg, merger, model, state))
            record["merged_save_s"] = time.perf_counter() - began
        if merger is not None and cfg.merge.save_candidates:
            save_candidate_checkpoints(cfg, merger, model, state)
        if dist.get_rank() == 0:  # after this save's merged checkpoints exist, not before
            apply_merged_retention(cfg)
        metrics.log(record)
        last_saved = state.iteration

    stopping = StopConditions(t)
    while state.iteration < t.train_iters:
        step_start = time.perf_counter()
        spike.apply(optimizer, state.iteration + 1)
        lr = optimizer.param_groups[0]["lr"]
        loss, grad_norm, skipped = train_step(model, optimizer, scheduler, next(train_batches), cfg)
        moe_record = moe_metrics.step_metrics(cfg)  # every rank: it reduces across groups; {} when dense
        state.iteration += 1
        state.consumed_samples += t.global_batch_size
        snapshot_start = time.perf_counter()
        snapshot = merger is not None and merger.maybe_snapshot(state.iteration)
        snapshot_s = time.perf_counter() - snapshot_start
        elapsed = time.perf_counter() - step_start

        if logging_rank:
            record = {
                "iteration": state.iteration,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_step / elapsed,
                "iteration_time_s": elapsed,
                "consumed_samples": state.consumed_samples,
                "skipped": skipped,
                **moe_record,
            }
            if snapshot:
                record["merge_snapshot_s"] = snapshot_s
            show = state.iteration % cfg.logging.log_interval == 0 or state.iteration == t.train_iters
            # ETA from this run's mean wall time per iteration so far (evaluations and saves included).
            eta_s = ((time.perf_counter() - start) / (state.iteration - summary.start_iteration)
                     * (t.train_iters - state.iteration))
            metrics.log(record, stdout=_format_step(record, t.train_iters, eta_s) if show else None)
            summary.losses.append(loss)

        if recovery is not None and recovery.spike_detected(state.iteration, loss, grad_norm):
            state, event = recovery.recover(model, optimizer, scheduler, merger, state)
            metrics.log(event, stdout=f"iter {event['iteration']:6d} | loss spike ({event['reason']}): rolled back "
                                      f"to iteration {event['restored_iteration']} with the {event['method']} of "
                                      f"checkpoints {event['merged_iterations']}")
            summary.recoveries.append(event)
            train_batches = data.train_batches(state.consumed_samples)
            continue
        if logging_rank and t.exit_on_nonfinite_loss and not math.isfinite(loss):
            raise NonFiniteLossError(f"iteration {state.iteration}: loss is {loss}")

        # Save before evaluating: with merge.storage disk the newest snapshot is this checkpoint.
        saved_now = bool(c.save and c.save_interval and state.iteration % c.save_interval == 0)
        if saved_now:
            save()
        if t.eval_interval and state.iteration % t.eval_interval == 0:
            run_evaluation()
        if saved_now and c.exit_after_save:
            break
        if saver is not None:
            saver.poll()  # publishes a background save once every rank has written it
        summary.stopped = stopping.reason(state.iteration)  # collective: every rank stops at the same iteration
        if summary.stopped is not None:
            break

    finished = state.iteration >= t.train_iters
    if c.save and last_saved != state.iteration and (finished or summary.stopped is not None):
        save()
    if saver is not None:
        saver.close()  # the run ends only with its checkpoints published
    stopping.close()
    if finished and not (t.eval_interval and state.iteration % t.eval_interval == 0):
        run_evaluation()
    if summary.stopped is not None and dist.get_rank() == 0:
        how = (f"saved {summary.checkpoint}; run the same command again to continue from it" if c.save
               else "nothing saved (checkpoint.save is not set)")
        print(f"stopped at iteration {state.iteration} ({summary.stopped}): {how}", flush=True)

    summary.iterations = state.iteration
    summary.seconds = time.perf_counter() - start
    end = {"iteration": state.iteration, "event": "end", "seconds": summary.seconds,
           "peak_rss_mib": _peak_rss_mib()}
    if summary.stopped is not None:
        end["stopped"] = summary.stopped
    if merger is not None:
        end["merge_state_mib"] = merger.memory_bytes() / 2**20
    metrics.log(end)
    if summary.losses:
        summary.first_loss, summary.last_loss = summary.losses[0], summary.losses[-1]
    metrics.close()
    return summary


class LrSpikeInjection:
    """Fault injection for testing recovery: multiply the LR for a few iterations, once per process."""

    def __init__(self, cfg: RunConfig):
        f = cfg.fault_injection
        self.start, self.length, self.factor = f.lr_spike_at, f.lr_spike_iters, f.lr_spike_factor
        self.done: set[int] = set()

    def apply(self, optimizer, iteration: int) -> None:
        if self.start is None or not self.start <= iteration < self.start + self.length or iteration in self.done:
            return
        self.done.add(iteration)  # a run that rolls back past it trains through it normally
        for group in optimizer.param_groups:
            group["lr"] *= self.factor


def _peak_rss_mib() -> float:
    """This process's peak resident memory (Linux VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _format_step(r: dict, total: int, eta_s: float) -> str:
    grad = "n/a" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
    minutes, seconds = divmod(round(eta_s), 60)
    hours, minutes = divmod(minutes, 60)
    eta = f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
    return (
        f"iter {r['iteration']:6d}/{total} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | grad norm {grad} | "
        f"{r['tokens_per_s']:.0f} tok/s | {r['iteration_time_s'] * 1000:.0f} ms | ETA {eta}"
    )
