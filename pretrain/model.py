"""Dense GPT and MoE models from megatron-core layer specs.

The Transformer Engine spec is used when TE and CUDA are present (or asked
for); otherwise the local spec, with :class:`SDPACoreAttention` in the core
attention slot. Both produce the same checkpoint keys for the same shapes.
"""

from __future__ import annotations

import logging
from typing import List

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.utils import get_pg_rank

from pretrain import cpu_compat, moe_metrics
from pretrain.config import RunConfig
from pretrain.platform import Platform, transformer_engine_available
from pretrain.sdpa_attention import SDPACoreAttention

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def padded_vocab_size(vocab_size: int, cfg: RunConfig) -> int:
    """Round the tokenizer's vocabulary up to ``model.make_vocab_size_divisible_by``.

    Megatron-LM multiplies the multiple by the TP size, so the embedding shape
    changes with the layout; we keep one shape so every layout loads every checkpoint.
    """
    multiple = cfg.model.make_vocab_size_divisible_by
    return ((vocab_size + multiple - 1) // multiple) * multiple


def use_transformer_engine(cfg: RunConfig, platform: Platform) -> bool:
    impl = cfg.model.transformer_impl
    if impl == "local" or platform.on_cpu:
        return False
    if impl == "transformer_engine":
        return True
    return transformer_engine_available()


def transformer_config(cfg: RunConfig, platform: Platform) -> TransformerConfig:
    """megatron-core's TransformerConfig for this run."""
    m, p, moe = cfg.model, cfg.parallel, cfg.moe
    dtype = _DTYPES[cfg.train.precision]
    on_cpu = platform.on_cpu
    te = use_transformer_engine(cfg, platform)
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.kv_channels,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        pipeline_dtype=dtype,
        # On CPUs, build each full weight with one generator and slice it: the
        # initial model is then the same at every TP size (and, with SeededInitTransformerLayer
        # and GlobalInitSequentialMLP, at every PP and EP size).
        use_cpu_initialization=on_cpu,
        # Fused kernels exist only on GPUs (TE or apex).
        gradient_accumulation_fusion=te,
        bias_activation_fusion=te and m.activation == "swiglu",
        masked_softmax_fusion=te,
        persist_layer_norm=te,
        bias_dropout_fusion=te,
        apply_rope_fusion=te,
        recompute_granularity=m.recompute_granularity,
        recompute_method="uniform" if m.recompute_granularity == "full" else None,
        recompute_num_layers=m.recompute_num_layers if m.recompute_granularity == "full" else None,
        deallocate_pipeline_outputs=True,
        variable_seq_lengths=False,
    )
    if moe.num_experts is not None:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.router_topk,
            moe_ffn_hidden_size=moe.ffn_hidden_size or m.ffn_hidden_size,
            # megatron-core's sinkhorn router asserts a zero coefficient; "none" ignores it.
            moe_aux_loss_coeff=moe.aux_loss_coeff if moe.load_balancing_type in ("aux_loss", "seq_aux_loss") else 0.0,
            moe_z_loss_coeff=moe.z_loss_coeff or None,  # 0 disables it (megatron-core would log 0/0)
            moe_router_load_balancing_type=moe.load_balancing_type,
            moe_token_dispatcher_type=moe.token_dispatcher,
            moe_shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
            moe_grouped_gemm=moe.grouped_gemm,
            moe_layer_freq=moe.layer_freq,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_router_dtype=moe.router_dtype,
            moe_permute_fusion=False,
        )
    return TransformerConfig(**kwargs)


class GlobalInitSequentialMLP(SequentialMLP):
    """megatron-core's SequentialMLP whose experts start from the same weights at every EP size.

    With ``use_cpu_initialization`` each rank draws every full weight from the
    one default generator and keeps its slice, so the initial model does not
    depend on TP. Experts break that: at EP=k a rank builds only its E/k
    experts, so it draws what EP=1 draws for experts 0..E/k-1, whatever experts
    it holds, and the generator ends elsewhere for every later layer. Building
    all E experts in order (the draws of EP=1, like the full master weight of a
    TP-split matrix) and keeping this rank's contiguous block restores it:
    expert e, and every weight built after it, is the same at every EP size.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        ep_size, ep_rank = pg_collection.ep.size(), pg_collection.ep.rank()
        super().__init__(num_local_experts * ep_size, config, submodules, pg_collection=pg_collection)
        first = ep_rank * num_local_experts
        self.local_experts = torch.nn.ModuleList(list(self.local_experts)[first : first + num_local_experts])
        self.num_local_experts = num_local_experts


def layer_init_seed(seed: int, global_layer_number: int) -> int:
    """The default generator's seed while transformer layer ``global_layer_number`` (1-based)
    draws its initial weights."""
    return (seed * 1_000_003 + global_layer_number) % 2**63


def seeded_init_layer(seed: int) -> type:
    """megatron-core's TransformerLayer that draws its weights after re-seeding the default
    generator with :func:`layer_init_seed` of its global layer number.

    With ``use_cpu_initialization`` every weight comes from the one default generator, in
    build order. A later pipeline stage builds its layers without the earlier stages' draws, so
    its layers -- and the output layer after them -- would differ from PP=1's. Re-seeding per
    layer makes each layer's weights a function of the seed and its place in the model alone:
    the initial model is the same at every pipeline (and virtual pipeline) size; the embedding
    draws first and the output layer follows the last layer, as at PP=1.
    """

    class SeededInitTransformerLayer(TransformerLayer):
        def __init__(self, config, submodules, layer_number=1, hidden_dropout=None,
                     pg_collection=None, vp_stage=None, **kwargs):
            pp_group = pg_collection.pp if pg_collection is not None else None
            pp_rank = (get_pg_rank(pp_group) if pp_group is not None
                       else parallel_state.get_pipeline_model_parallel_rank())
            offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
            torch.manual_seed(layer_init_seed(seed, layer_number + offset))
            super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout,
                             pg_collection=pg_collection, vp_stage=vp_stage, **kwargs)

    return SeededInitTransformerLayer


def _layer_block_spec(config: TransformerConfig, cfg: RunConfig, te: bool, vp_stage):
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=te, normalization=cfg.model.normalization, vp_stage=vp_stage
    )
    if not te:
        for layer_spec in spec.layer_specs:
            layer_spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    for layer_spec in spec.layer_specs:
        moe = getattr(layer_spec.submodules.mlp, "submodules", None)
        if (config.use_cpu_initialization and isinstance(moe, MoESubmodules)
                and getattr(moe.experts, "module", None) is SequentialMLP):
            moe.experts.module = GlobalInitSequentialMLP
        if config.use_cpu_initialization and layer_spec.module is TransformerLayer:
            layer_spec.module = seeded_init_layer(cfg.train.seed)
    return spec


def build_model(cfg: RunConfig, platform: Platform, vocab_size: int) -> List[GPTModel]:
    """One GPTModel per virtual pipeline chunk held by this rank (usually one)."""
    config = transformer_config(cfg, platform)
    te = use_transformer_engine(cfg, platform)
    if cfg.moe.num_experts is not None:
        cpu_compat.ensure_router_gemm_fallback()  # megatron-core's router without TE (GPUs too)
    if cfg.parallel.sequence_parallel and not te:
        raise ValueError("parallel.sequence_parallel needs the Transformer Engine layer spec "
                         "(model.transformer_impl: auto with TE installed, or transformer_engine)")
    vp_size = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size is not None else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=_layer_block_spec(config, cfg, te, stage),
            vocab_size=padded_vocab_size(vocab_size, cfg),
            max_sequence_length=cfg.train.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
            position_embedding_type=cfg.model.position_embedding_type,
            rotary_base=cfg.model.rotary_base,
            vp_stage=stage,
        )
        model.to(platform.device)
        if config.bf16 or config.fp16:
            # Megatron's mixed precision: every parameter (norms included) in bf16/fp16, outputs
            # back in fp32; the optimizer keeps the fp32 main copy.
            model = Float16Module(config, model)
        chunks.append(model)
    if cfg.moe.num_experts is not None:
        moe_metrics.track_routers(chunks)
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    logger.info("rank %d: built %d model chunk(s), %d parameters on this rank (%s spec)",
                platform.rank, len(chunks), n_params, "TE" if te else "local")
    return chunks
