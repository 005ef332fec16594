"""Which tokenizer made a dataset: ``PREFIX.tokenizer.json`` beside ``PREFIX.bin/.idx``.

Data tokenized with one tokenizer and trained with another fails deep in the embedding
(``IndexError: index out of range``, a device-side assert on GPUs) or, worse, trains on
nonsense. Preprocessing records the tokenizer (kind, vocabulary size, end-of-document id, the
sha256 of its file) and the largest token id written; start-up compares the record with the
run's tokenizer and refuses a mismatch, naming both. Datasets from elsewhere (Megatron-LM's own
preprocessing) have no record: their largest token id is read from the ``.bin`` when that is
cheap (see ``SCAN_LIMIT_BYTES``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional

import numpy

logger = logging.getLogger(__name__)

RECORD_SUFFIX = ".tokenizer.json"
#: Without a record, read the largest token id from .bin files up to this size (~1 s per GiB).
SCAN_LIMIT_BYTES = 2 << 30


class TokenizerMismatchError(ValueError):
    """A dataset was tokenized differently from what the run's tokenizer and model accept."""


def record_path(prefix: str) -> str:
    """Where the tokenizer record of dataset ``prefix`` lives."""
    return prefix + RECORD_SUFFIX


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_tokenizer(tokenizer) -> dict:
    """What identifies ``tokenizer``: kind, vocab_size, eod and, for a file, its path and sha256."""
    info = {"kind": tokenizer.kind, "vocab_size": int(tokenizer.vocab_size), "eod": int(tokenizer.eod)}
    if tokenizer.path:
        info["tokenizer_file"] = tokenizer.path
        info["tokenizer_sha256"] = file_sha256(tokenizer.path)
    return info


def write_record(prefix: str, record: dict) -> None:
    """Write ``record`` to ``PREFIX.tokenizer.json`` atomically."""
    path = record_path(prefix)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_record(prefix: str) -> Optional[dict]:
    """The tokenizer record of dataset ``prefix``, or None when it has none."""
    path = record_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise TokenizerMismatchError(f"{path}: unreadable tokenizer record ({err})") from None
    if not isinstance(record, dict) or not {"kind", "vocab_size", "max_token_id"} <= set(record):
        raise TokenizerMismatchError(f"{path}: not a tokenizer record (kind, vocab_size, max_token_id)")
    return record


def _scanned_max_token_id(prefix: str) -> Optional[int]:
    """The largest token id in ``PREFIX.bin``, or None when the file is too large to scan at start-up."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    bin_path = prefix + ".bin"
    if os.path.getsize(bin_path) > SCAN_LIMIT_BYTES:
        return None
    dataset = IndexedDataset(prefix, mmap=True)
    dtype = dataset.index.dtype
    del dataset
    tokens = numpy.memmap(bin_path, dtype=dtype, mode="r")
    return int(tokens.max()) if tokens.size else -1


def _describe(info: dict) -> str:
    text = f"the {info['kind']} tokenizer (vocab_size {info['vocab_size']}"
    if info.get("tokenizer_file"):
        text += f", {info['tokenizer_file']} sha256 {info.get('tokenizer_sha256', '?')[:12]}"
    return text + ")"


def check_dataset_tokenizer(prefix: str, tokenizer) -> None:
    """Refuse dataset ``prefix`` when it was not tokenized with (something equal to) ``tokenizer``.

    Raises TokenizerMismatchError naming both tokenizers and the settings that would fix it.
    A sha256 difference alone (same kind and vocabulary size) is only logged: a re-saved
    tokenizer file changes its bytes, not its ids.
    """
    run = describe_tokenizer(tokenizer)
    record = read_record(prefix)
    if record is None:
        largest = _scanned_max_token_id(prefix)
        if largest is None:
            logger.warning("%s has no %s and is too large to scan: its token ids are not checked "
                           "against the tokenizer", prefix, RECORD_SUFFIX)
        elif largest >= run["vocab_size"]:
            raise TokenizerMismatchError(
                f"{prefix}: token id {largest} is out of range for {_describe(run)}; the data was "
                f"tokenized with a larger vocabulary: set data.tokenizer / data.tokenizer_file to that tokenizer"
            )
        return
    fix = (f"set data.tokenizer={record['kind']}"
           + (f" data.tokenizer_file={record['tokenizer_file']}" if record.get("tokenizer_file") else "")
           + f", or preprocess the data again with pretrain-preprocess --tokenizer {run['kind']}"
           + (f" --tokenizer-file {run['tokenizer_file']}" if run.get("tokenizer_file") else ""))
    if record["kind"] != run["kind"] or int(record["vocab_size"]) != run["vocab_size"]:
        raise TokenizerMismatchError(
            f"{prefix} was preprocessed with {_describe(record)} but this run uses {_describe(run)}: {fix}"
        )
    if int(record["max_token_id"]) >= run["vocab_size"]:
        raise TokenizerMismatchError(
            f"{prefix}: token id {record['max_token_id']} is out of range for {_describe(run)}: {fix}"
        )
    if record.get("tokenizer_sha256") != run.get("tokenizer_sha256"):
        logger.warning("%s was preprocessed with %s, this run uses %s: same kind and vocabulary size, "
                       "different file contents", prefix, _describe(record), _describe(run))
