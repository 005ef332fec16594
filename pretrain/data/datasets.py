"""Train / valid / test GPT datasets from a blend of indexed datasets, via megatron-core.

``build_gpt_datasets`` is a thin, checked front end to megatron-core's
``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig`` + ``GPTDataset``: it parses the blend and
the split, checks the files exist and that every requested split gets data (megatron-core would
otherwise fail late or loop forever on an empty split), and works with or without
``torch.distributed`` initialised. Without a blend it uses the embedded default corpus.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from pretrain.data.corpus import ensure_default_corpus
from pretrain.data.indexed import require_dataset
from pretrain.data.provenance import check_dataset_tokenizer
from pretrain.data.tokenizer import ByteTokenizer, Tokenizer

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")


class GPTDatasets(NamedTuple):
    """The three splits; a split is None when its share of the split string is 0."""

    train: Optional[torch.utils.data.Dataset]
    valid: Optional[torch.utils.data.Dataset]
    test: Optional[torch.utils.data.Dataset]


def parse_blend(blend: Union[str, Sequence[str]]) -> Tuple[List[str], Optional[List[float]]]:
    """Parse a blend into (prefixes, weights or None).

    Accepts Megatron's ``--data-path`` forms: ``["prefixA"]``, ``["prefixA", "prefixB"]`` (weights
    from dataset sizes) or ``["0.7", "prefixA", "0.3", "prefixB"]``; a single string is split on
    whitespace. Weights need not sum to 1.
    """
    items = blend.split() if isinstance(blend, str) else [str(b).strip() for b in blend]
    if not items:
        raise ValueError("the data blend is empty")

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(items) % 2 == 0 and all(is_number(w) for w in items[0::2]):
        weights = [float(w) for w in items[0::2]]
        prefixes = items[1::2]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"blend weights must be >= 0 and not all 0, got {weights}")
        return prefixes, weights
    if any(is_number(s) for s in items):
        raise ValueError(
            f"cannot parse the data blend {items}: give either prefixes only, or weight/prefix "
            f"pairs like ['0.7', 'prefixA', '0.3', 'prefixB']"
        )
    return items, None


def parse_split(split: str) -> List[float]:
    """Parse a split string "train,valid,test" (e.g. "98,2,0") into normalised ratios."""
    if not re.fullmatch(r"\s*[0-9.]+(\s*,\s*[0-9.]+){0,2}\s*", str(split)):
        raise ValueError(f"split must look like '98,2,0' (train,valid,test weights), got {split!r}")
    ratios = [float(x) for x in str(split).split(",")]
    if sum(ratios) <= 0:
        raise ValueError(f"split {split!r} gives no data to any split")
    return parse_and_normalize_split(str(split))


def samples_per_split(
    train_iters: int, global_batch_size: int, eval_interval: int, eval_iters: int
) -> Tuple[int, int, int]:
    """Samples each split must provide, as Megatron counts them.

    train: every iteration's global batch; valid: ``eval_iters`` batches at each evaluation
    (every ``eval_interval`` iterations and once at the end); test: one evaluation.
    """
    evaluations = train_iters // eval_interval + 1 if eval_interval > 0 else 0
    return (
        train_iters * global_batch_size,
        evaluations * eval_iters * global_batch_size,
        eval_iters * global_batch_size,
    )


def _check_splits_have_data(
    prefixes: Sequence[str], split: str, split_matrix, sizes: Sequence[int]
) -> None:
    """Fail early, naming the dataset, when a split would get no tokens.

    megatron-core splits each dataset by document index ranges and builds every split whose
    share is non-zero; an empty range makes GPTDataset loop forever looking for tokens.
    """
    for prefix in prefixes:
        # Keep `dataset` alive while reading: its arrays view an mmap closed on deletion.
        dataset = IndexedDataset(prefix, mmap=True)
        lengths = numpy.array(dataset.sequence_lengths)
        del dataset
        n = len(lengths)
        for i, bounds in enumerate(split_matrix):
            if bounds is None:
                continue
            beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            if int(numpy.sum(lengths[beg:end], dtype=numpy.int64)) == 0:
                raise ValueError(
                    f"dataset {prefix!r} has {n} documents; split {split!r} gives its "
                    f"{SPLIT_NAMES[i]} split {end - beg} of them and no tokens "
                    f"({sizes[i]} {SPLIT_NAMES[i]} samples requested). Use more documents "
                    f"(e.g. --text-doc paragraph), or a split with 0 for unused splits."
                )


@contextlib.contextmanager
def _rank_zero_without_distributed():
    """Let megatron-core's BlendedDataset build its cache in a single, non-distributed process.

    BlendedDataset calls ``torch.distributed.get_rank()`` without checking that a process group
    exists (megatron-core 0.16), which raises in single-process use. Only when no process group
    is initialised, answer 0 for the duration of the build.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


def build_gpt_datasets(
    tokenizer: Tokenizer,
    seq_length: int,
    *,
    blend: Optional[Union[str, Sequence[str]]] = None,
    split: str = "98,2,0",
    seed: int = 1234,
    train_samples: int,
    valid_samples: int = 0,
    test_samples: int = 0,
    index_cache_dir: Optional[str] = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    mmap_bin_files: bool = True,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    corpus_cache_dir: Optional[str] = None,
) -> GPTDatasets:
    """Build the train/valid/test GPT datasets of a blend.

    Args:
        tokenizer: the tokenizer the data was preprocessed with (its ``eod`` drives masks).
        seq_length: tokens per sample; each sample reads ``seq_length + 1`` tokens, returned as
            ``tokens = text[:-1]`` and ``labels = text[1:]``.
        blend: dataset prefixes with optional weights (see ``parse_blend``); None or empty uses
            the embedded default corpus (byte tokenizer only), built on first use.
        split: "train,valid,test" weights; each dataset is split by document.
        seed: seed of the document and sample shuffles.
        train_samples / valid_samples / test_samples: samples needed per split (see
            ``samples_per_split``); datasets repeat epochs to provide them.
        index_cache_dir: where megatron-core caches its shuffle/sample indices; default
            ``<directory of the first dataset>/index-cache``.
        reset_position_ids, reset_attention_mask, eod_mask_loss: GPTDataset's per-document
            position/mask options (all off: documents are packed and attend across eod).
        create_attention_mask: build the [1, s, s] boolean causal mask per sample (True =
            masked out); set False when the attention kernel builds its own.
        mmap_bin_files: memory-map the .bin files (else read them with file pointers).
        is_built_on_rank: with torch.distributed initialised, whether this rank builds datasets
            (others get None); default every rank. Rank 0 builds the index cache first, the rest
            wait at a barrier and load it, so this must be called on every rank.
        corpus_cache_dir: cache directory of the default corpus (see ``ensure_default_corpus``).

    Returns:
        ``GPTDatasets(train, valid, test)``; a split is None when its share of ``split`` is 0
        (or on ranks where ``is_built_on_rank()`` is False). Samples are dicts of tensors:
        tokens, labels, loss_mask, position_ids, attention_mask (when created), and dataset_id
        for blends of several datasets.

    Raises:
        FileNotFoundError: a dataset's .bin or .idx file is missing (named in the message).
        TokenizerMismatchError: a dataset was tokenized with another tokenizer, or holds token ids
            outside ``tokenizer``'s vocabulary (see :mod:`pretrain.data.provenance`).
        ValueError: a malformed blend or split, or a requested split without data.
    """
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    if not blend:
        if not isinstance(tokenizer, ByteTokenizer):
            raise ValueError(
                "the default corpus is tokenized with the byte tokenizer; give a data blend "
                f"preprocessed with your tokenizer ({type(tokenizer).__name__}) instead"
            )
        blend = [ensure_default_corpus(corpus_cache_dir)]
    prefixes, weights = parse_blend(blend)
    prefixes = [os.path.expanduser(p) for p in prefixes]
    for prefix in prefixes:
        require_dataset(prefix)
        check_dataset_tokenizer(prefix, tokenizer)

    split_matrix = convert_split_vector_to_split_matrix(parse_split(split))
    sizes = [int(train_samples), int(valid_samples), int(test_samples)]
    _check_splits_have_data(prefixes, split, split_matrix, sizes)
    for i, bounds in enumerate(split_matrix):
        if bounds is None and sizes[i]:
            if i == 0:
                raise ValueError(f"split {split!r} gives the train split no data")
            logger.warning(
                "split %r gives the %s split no data; %d %s samples requested will not exist",
                split, SPLIT_NAMES[i], sizes[i], SPLIT_NAMES[i],
            )

    if index_cache_dir is None:
        index_cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=index_cache_dir,
        mmap_bin_files=mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config
    )
    with _rank_zero_without_distributed():
        train, valid, test = builder.build()
    for name, ds in zip(SPLIT_NAMES, (train, valid, test)):
        if ds is not None:
            logger.info("%s dataset: %d samples of %d tokens", name, len(ds), seq_length)
    return GPTDatasets(train, valid, test)


def describe_sources(datasets: GPTDatasets) -> List[dict]:
    """One dict per dataset of the blend: ``prefix``, ``weight`` (normalised) and the ``train`` and
    ``valid`` samples drawn from it (for the start-up banner)."""

    def parts(split) -> List[tuple]:
        if split is None:
            return []
        if hasattr(split, "datasets"):  # a BlendedDataset: per-dataset weights and samples
            return [(d.dataset_path, w, len(d)) for d, w in zip(split.datasets, split.weights)]
        return [(split.dataset_path, 1.0, len(split))]

    train, valid = parts(datasets.train), {path: n for path, _, n in parts(datasets.valid)}
    return [{"prefix": path, "weight": float(w), "train": n, "valid": valid.get(path, 0)} for path, w, n in train]
