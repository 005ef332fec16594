"""The start-up banner: what this run is, before its first step (as Megatron-LM users expect).

Layout (world size, TP / PP / DP / EP / virtual PP), parameters (the model's total and this
rank's share), batch and tokens per step, precision and layer implementation, the LR schedule,
the data blend with the samples each dataset gives, and where checkpoints and metrics go.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from pretrain.config import RunConfig, schedule_lengths
from pretrain.model import padded_vocab_size, use_transformer_engine
from pretrain.platform import Platform, collective_device


def parameter_counts(model_chunks) -> tuple[int, int]:
    """(parameters held by this rank, parameters of the whole model). Collective: every rank calls it.

    Each rank adds each of its parameters divided by the number of ranks holding a copy of it:
    a tensor-parallel shard lives on every data-parallel replica, a tensor-parallel-replicated
    parameter (a norm) also on every TP rank; expert parameters (megatron-core marks them
    ``allreduce=False``) are replicated across the expert-data-parallel and expert-TP groups
    instead. The world's sum is then the model's size.
    """
    ps = parallel_state
    dense_copies = ps.get_data_parallel_world_size()
    expert_copies = ps.get_expert_data_parallel_world_size()
    local, share = 0, 0.0
    for chunk in model_chunks:
        for param in chunk.parameters():
            expert = not getattr(param, "allreduce", True)
            copies = expert_copies if expert else dense_copies
            if not getattr(param, "tensor_model_parallel", False):
                copies *= (ps.get_expert_tensor_parallel_world_size() if expert
                           else ps.get_tensor_model_parallel_world_size())
            local += param.numel()
            share += param.numel() / copies
    total = torch.tensor([share], dtype=torch.float64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(total)
    return local, round(total.item())


def startup_banner(cfg: RunConfig, platform: Platform, params: tuple[int, int], sources: list[dict],
                   vocab_size: int, metrics_file: Optional[str]) -> str:
    """The banner text. ``params``: from :func:`parameter_counts`; ``sources``: one dict per dataset
    (``prefix``, ``weight``, ``train`` and ``valid`` samples); ``vocab_size``: the tokenizer's."""
    m, p, t, c, o = cfg.model, cfg.parallel, cfg.train, cfg.checkpoint, cfg.optimizer
    kind = (f"MoE GPT ({cfg.moe.num_experts} experts, top-{cfg.moe.router_topk})" if cfg.moe.num_experts
            else "dense GPT")
    dp = parallel_state.get_data_parallel_world_size()
    local, total = params
    lengths = schedule_lengths(cfg)
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    lines = [
        "=" * 72,
        f"pretrain: {kind}, {m.num_layers} layers x {m.hidden_size} hidden, {m.num_attention_heads} heads, "
        f"vocabulary {vocab_size} (padded to {padded_vocab_size(vocab_size, cfg)})",
        f"  layout       world {platform.world_size} = TP {p.tensor_model_parallel_size} x PP "
        f"{p.pipeline_model_parallel_size} x DP {dp}; EP {p.expert_model_parallel_size}, virtual PP "
        f"{p.virtual_pipeline_model_parallel_size or 1}; {platform.backend} on {platform.device.type}",
        f"  parameters   {total:,} in the model, {local:,} on rank {platform.rank}",
        f"  batch        {t.global_batch_size} sequences x {t.seq_length} tokens = "
        f"{t.global_batch_size * t.seq_length:,} tokens per step ({micro} micro-batches of {t.micro_batch_size} "
        f"per DP rank)",
        f"  precision    {t.precision}, "
        + ("Transformer Engine layers" if use_transformer_engine(cfg, platform) else "local (torch) layers"),
        f"  schedule     {t.train_iters} iterations, {cfg.scheduler.style}: warmup {lengths.warmup}"
        + (f", decay over the last {lengths.wsd_decay}" if cfg.scheduler.style == "wsd" else "")
        + f", lr {o.lr:g} -> {o.min_lr:g}",
    ]
    for i, source in enumerate(sources):
        label = "  data         " if i == 0 else "               "
        lines.append(f"{label}{source['prefix']} (weight {source['weight']:.3g}): {source['train']:,} train / "
                     f"{source['valid']:,} valid samples")
    if c.save:
        when = f"every {c.save_interval} iterations and at the end" if c.save_interval else "at the end"
        lines.append(f"  checkpoints  {c.save} ({when})")
    lines.append(f"  metrics      {metrics_file or 'not written (no checkpoint.save or logging.metrics_file)'}")
    lines.append("=" * 72)
    return "\n".join(lines)
