"""Per-iteration MoE metrics: each layer's load-balancing loss and how evenly its experts are loaded.

During a step's training forwards the routers record what they did:
megatron-core's layer-wise tracker (``moe_utils.save_to_aux_losses_tracker``)
adds up each layer's auxiliary losses over the microbatches, and a forward hook
on every router (:func:`track_routers`, installed when the model is built)
adds up the tokens each expert receives. :func:`step_metrics`, called by the
loop once per iteration on every rank, reduces both over the parallel groups
(the same collectives in the same order on every rank), clears them and
returns the fields for the metrics record:

    moe_load_balancing_loss              mean over MoE layers (the value Megatron-LM logs)
    moe_load_balancing_loss_per_layer    one value per MoE layer, in depth order
    moe_seq_load_balancing_loss[...]     instead, with moe.load_balancing_type: seq_aux_loss
    moe_z_loss, moe_z_loss_per_layer     with moe.z_loss_coeff
    moe_tokens_per_expert_min / _max     per MoE layer: the fewest / most tokens any expert
                                         received in the global batch (topk assignments per token)

Losses are the unscaled auxiliary losses (without their coefficients), averaged
over microbatches and data-parallel ranks, as Megatron-LM reports them.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.moe.router import TopKRouter

from pretrain.batches import microbatches_per_step
from pretrain.config import RunConfig
from pretrain.platform import collective_device

# layer_number -> tokens routed to each expert by this rank during the current step's training forwards.
_TOKENS_PER_EXPERT: dict = {}


def _count_tokens(router: TopKRouter, inputs, output) -> None:
    # Training forwards only: evaluation runs without grad, and a recomputed
    # (checkpointed) layer runs its first forward without grad too, so every
    # token is counted once.
    if not (router.training and torch.is_grad_enabled()) or router.layer_number is None:
        return
    _, routing_map = output
    counts = routing_map.detach().sum(dim=0).to(torch.float64)
    previous = _TOKENS_PER_EXPERT.get(router.layer_number)
    _TOKENS_PER_EXPERT[router.layer_number] = counts if previous is None else previous + counts


def track_routers(model_chunks) -> None:
    """Count the tokens each expert of each MoE layer receives (a forward hook on every router)."""
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, TopKRouter) and not getattr(module, "_pretrain_counts_tokens", False):
                module.register_forward_hook(_count_tokens)
                module._pretrain_counts_tokens = True


def moe_layer_numbers(cfg: RunConfig) -> List[int]:
    """1-based numbers of the MoE layers (megatron-core's moe_layer_freq pattern)."""
    return [i + 1 for i in range(cfg.model.num_layers) if i % cfg.moe.layer_freq == 0]


def tracked_losses(cfg: RunConfig) -> List[str]:
    """The megatron-core tracker names this config's routers record."""
    moe, names = cfg.moe, []
    if moe.aux_loss_coeff > 0 and moe.load_balancing_type == "aux_loss":
        names.append("load_balancing_loss")
    if moe.aux_loss_coeff > 0 and moe.load_balancing_type == "seq_aux_loss":
        names.append("seq_load_balancing_loss")
    if moe.z_loss_coeff:
        names.append("z_loss")
    return names


def _all_reduce_sum(tensor: torch.Tensor, group) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)


def step_metrics(cfg: RunConfig) -> dict:
    """Reduce, clear and return this step's MoE metrics; call on every rank once per iteration.

    Returns {} for dense models. Every rank gets the same values; the loop logs them on its logging rank.
    """
    if cfg.moe.num_experts is None:
        return {}
    num_layers, num_experts = cfg.model.num_layers, cfg.moe.num_experts
    names = tracked_losses(cfg)
    device = collective_device()
    tracker = get_moe_layer_wise_logging_tracker()

    # One buffer, three reductions: [losses (len(names) x L) | tokens (L x E)].
    losses = torch.zeros(len(names), num_layers, dtype=torch.float64, device=device)
    for i, name in enumerate(names):
        if name in tracker:
            losses[i] = tracker[name]["values"][:num_layers].to(device, torch.float64)
    tokens = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
    for layer_number, counts in _TOKENS_PER_EXPERT.items():
        tokens[layer_number - 1] = counts.to(device)
    clear_aux_losses_tracker()
    _TOKENS_PER_EXPERT.clear()

    # Tensor parallelism: each rank's load-balancing loss is its share of the
    # layer's (megatron-core sums them); the z-loss is a mean over each rank's
    # tokens; tokens are split across TP ranks only with sequence parallelism.
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group)
    for i, name in enumerate(names):
        if name == "z_loss":
            losses[i] /= tp
    if not cfg.parallel.sequence_parallel:
        tokens /= tp
    buffer = torch.cat([losses.reshape(-1), tokens.reshape(-1)])
    _all_reduce_sum(buffer, tp_group)
    # Data parallelism: losses are averaged, tokens add up to the global batch.
    dp_group = parallel_state.get_data_parallel_group()
    buffer[: losses.numel()] /= dist.get_world_size(dp_group)
    _all_reduce_sum(buffer, dp_group)
    # Pipeline parallelism: each layer lives on one stage, the others hold zeros.
    _all_reduce_sum(buffer, parallel_state.get_pipeline_model_parallel_group())

    losses = buffer[: losses.numel()].reshape(len(names), num_layers) / microbatches_per_step(cfg)
    tokens = buffer[losses.numel():].reshape(num_layers, num_experts).round()
    layers = [n - 1 for n in moe_layer_numbers(cfg)]
    record = {}
    for i, name in enumerate(names):
        per_layer = losses[i, layers].tolist()
        record[f"moe_{name}"] = sum(per_layer) / len(per_layer)
        record[f"moe_{name}_per_layer"] = per_layer
    record["moe_tokens_per_expert_min"] = [int(v) for v in tokens[layers].min(dim=1).values.tolist()]
    record["moe_tokens_per_expert_max"] = [int(v) for v in tokens[layers].max(dim=1).values.tolist()]
    return record
