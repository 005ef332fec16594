"""Megatron-style pre-training on megatron-core with checkpoint merging built in (see README.md)."""

from megatron_merge import silence_fallback_warnings

silence_fallback_warnings()  # before anything imports megatron-core
