"""Data pipeline: tokenizers, text/JSON-lines -> indexed .bin/.idx, GPT datasets, the default corpus.

Modules, one job each:
  tokenizer   ByteTokenizer (built in), HFTokenizer (tokenizers JSON), build_tokenizer
  indexed     atomic writing / reading of megatron-core indexed datasets (PREFIX.bin/.idx)
  preprocess  the `pretrain-preprocess` command: text and .jsonl files -> PREFIX.bin/.idx
  provenance  PREFIX.tokenizer.json: the tokenizer a dataset was made with, checked at start-up
  corpus      the embedded default corpus (CPython's own documentation), built on first use
  datasets    build_gpt_datasets: blend + split -> megatron-core GPTDataset train/valid/test
  sampler     deterministic, resumable data-parallel micro-batch iterator
"""

from pretrain.data.corpus import default_cache_dir, ensure_default_corpus
from pretrain.data.datasets import (
    GPTDatasets,
    build_gpt_datasets,
    parse_blend,
    samples_per_split,
)
from pretrain.data.indexed import read_documents, require_dataset
from pretrain.data.sampler import PretrainingSampler, build_data_iterator
from pretrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "GPTDatasets",
    "HFTokenizer",
    "PretrainingSampler",
    "Tokenizer",
    "build_data_iterator",
    "build_gpt_datasets",
    "build_tokenizer",
    "default_cache_dir",
    "ensure_default_corpus",
    "parse_blend",
    "read_documents",
    "require_dataset",
    "samples_per_split",
]
