"""Megatron-style pre-training on megatron-core with checkpoint merging built in (see README.md)."""

import warnings

# megatron-core warns at import time, from several modules, that Transformer Engine / apex are
# missing and it falls back to torch implementations: noise on every command, on CPUs always.
# What a run actually uses is logged by pretrain.model (the layer spec) instead.
warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed",
                        category=UserWarning)
