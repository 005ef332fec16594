"""From the data config to what the loop consumes: one list of microbatches per step.

Every rank reads its data-parallel slice of each global batch (the pipeline
schedule takes what its stage needs: tokens on the first, labels and masks on
the last). Validation uses the same fixed batches at every evaluation, so
validation losses, raw or merged, are comparable along a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List

import torch

from megatron.core import parallel_state

from pretrain.config import ConfigError, RunConfig
from pretrain.data.datasets import build_gpt_datasets, describe_sources
from pretrain.data.provenance import TokenizerMismatchError
from pretrain.data.sampler import build_data_iterator
from pretrain.data.tokenizer import build_tokenizer
from pretrain.platform import Platform

_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass
class TrainingData:
    """The tokenizer's vocabulary size and factories for train and validation batches."""

    vocab_size: int
    sources: List[dict]  # per dataset of the blend: prefix, weight, train and valid samples
    train_batches: Callable[[int], Iterator[List[dict]]]  # consumed_samples -> steps
    valid_batches: Callable[[], List[List[dict]]]


def microbatches_per_step(cfg: RunConfig) -> int:
    dp = parallel_state.get_data_parallel_world_size()
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in _BATCH_KEYS}


def _steps(iterator, per_step: int, device: torch.device) -> Iterator[List[dict]]:
    while True:
        step = []
        for _ in range(per_step):
            try:
                step.append(_to_device(next(iterator), device))
            except StopIteration:
                return
        yield step


def build_training_data(cfg: RunConfig, platform: Platform) -> TrainingData:
    """Tokenizer, megatron-core GPT datasets (default corpus when none is given) and batch factories."""
    t, d = cfg.train, cfg.data
    tokenizer = build_tokenizer(d.tokenizer, d.tokenizer_file)
    try:
        datasets = build_gpt_datasets(
            tokenizer,
            t.seq_length,
            blend=[str(x) for x in d.data_path] or None,
            split=d.split,
            seed=t.seed,
            train_samples=t.train_iters * t.global_batch_size,
            valid_samples=t.eval_iters * t.global_batch_size,
            index_cache_dir=d.cache_dir and f"{d.cache_dir}/index-cache",
            corpus_cache_dir=d.cache_dir,
            create_attention_mask=False,  # attention is causal; no [s, s] mask per sample
        )
    except TokenizerMismatchError as exc:  # every rank sees it: a config error, said once
        raise ConfigError(f"data.data_path / data.tokenizer: {exc}") from None
    per_step = microbatches_per_step(cfg)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()

    def train_batches(consumed_samples: int) -> Iterator[List[dict]]:
        it = build_data_iterator(datasets.train, t.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                 consumed_samples=consumed_samples)
        return _steps(it, per_step, platform.device)

    def valid_batches() -> List[List[dict]]:
        if datasets.valid is None:
            return []
        it = build_data_iterator(datasets.valid, t.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                 consumed_samples=0, cyclic=True)
        steps = _steps(it, per_step, platform.device)
        return [next(steps) for _ in range(t.eval_iters)]

    return TrainingData(vocab_size=tokenizer.vocab_size, sources=describe_sources(datasets),
                        train_batches=train_batches, valid_batches=valid_batches)
