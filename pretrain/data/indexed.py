"""megatron-core indexed datasets on disk: PREFIX.bin (tokens) + PREFIX.idx (document index).

Writing goes through megatron-core's ``IndexedDatasetBuilder`` into temporary files beside the
target, renamed into place only once complete: a reader never sees a half-written dataset, and a
failed write leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Iterator, List, Optional, Sequence

import numpy

from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from pretrain.data.provenance import record_path, write_record

logger = logging.getLogger(__name__)


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype megatron-core uses for token ids of this vocabulary (uint16 or int32)."""
    return DType.optimal_dtype(vocab_size)


def missing_files(prefix: str) -> List[str]:
    """The files of dataset ``prefix`` (``.bin``, ``.idx``) that do not exist."""
    return [p for p in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(p)]


def require_dataset(prefix: str) -> None:
    """Raise ``FileNotFoundError`` naming each missing file if dataset ``prefix`` is incomplete."""
    missing = missing_files(prefix)
    if missing:
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = " (a dataset prefix is given without the .bin/.idx extension)"
        raise FileNotFoundError(
            f"dataset prefix {prefix!r}: missing {', '.join(missing)}{hint}; "
            f"create it with `pretrain-preprocess --output-prefix {prefix} ...`"
        )


class IndexedDatasetWriter:
    """Write documents of token ids to ``prefix``.bin/.idx, atomically.

    Use as a context manager::

        with IndexedDatasetWriter(prefix, vocab_size) as writer:
            writer.add_document(ids)

    On a clean exit the files are renamed into place (an existing dataset is replaced); on an
    exception the temporary files are removed and nothing appears at ``prefix``. Empty documents
    are skipped (they carry no tokens and would only skew document-based splits).
    ``tokenizer_record`` (see ``pretrain.data.provenance``), plus the largest token id written,
    goes to ``PREFIX.tokenizer.json``; without one, a stale record of a previous dataset is removed.
    """

    def __init__(self, prefix: str, vocab_size: int, tokenizer_record: Optional[dict] = None) -> None:
        self.prefix = prefix
        self.dtype = token_dtype(vocab_size)
        self.tokenizer_record = tokenizer_record
        self.documents = 0
        self.tokens = 0
        self.max_token_id = -1
        self.skipped_empty = 0
        self._builder: Optional[IndexedDatasetBuilder] = None
        self._tmp_bin = self._tmp_idx = ""
        self._created_dir: Optional[str] = None

    def __enter__(self) -> "IndexedDatasetWriter":
        directory = os.path.dirname(os.path.abspath(self.prefix))
        if not os.path.isdir(directory):
            os.makedirs(directory)
            self._created_dir = directory
        base = os.path.basename(self.prefix)
        # Temporary names in the target directory, so the final rename stays on one filesystem.
        self._tmp_bin = _temp_path(directory, base, ".bin")
        self._tmp_idx = _temp_path(directory, base, ".idx")
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=self.dtype)
        return self

    def add_document(self, ids: Sequence[int]) -> None:
        """Append one document (a sequence of token ids)."""
        array = numpy.asarray(ids, dtype=self.dtype)
        if array.size == 0:
            self.skipped_empty += 1
            return
        self._builder.add_document(array, [array.size])
        self.max_token_id = max(self.max_token_id, int(array.max()))
        self.documents += 1
        self.tokens += int(array.size)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._builder.finalize(self._tmp_idx)
                if self.tokenizer_record is not None:
                    write_record(self.prefix, {**self.tokenizer_record, "max_token_id": self.max_token_id})
                elif os.path.exists(record_path(self.prefix)):
                    os.remove(record_path(self.prefix))
                # The record, then .bin, then .idx: readers look for both data files, and the
                # .idx is what says "complete".
                os.replace(self._tmp_bin, get_bin_path(self.prefix))
                os.replace(self._tmp_idx, get_idx_path(self.prefix))
                logger.info(
                    "wrote %s.{bin,idx}: %d documents, %d tokens (%s)",
                    self.prefix, self.documents, self.tokens, numpy.dtype(self.dtype).name,
                )
        finally:
            if self._builder is not None and not self._builder.data_file.closed:
                self._builder.data_file.close()
            for path in (self._tmp_bin, self._tmp_idx):
                if path and os.path.exists(path):
                    os.remove(path)
            if exc_type is not None and self._created_dir and not os.listdir(self._created_dir):
                os.rmdir(self._created_dir)  # leave no trace of a failed write


def _temp_path(directory: str, base: str, suffix: str) -> str:
    # A unique name, not a mkstemp file: mkstemp's 0600 mode would stick to the final dataset.
    return os.path.join(directory, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}.tmp")


def write_indexed_dataset(prefix: str, documents, vocab_size: int,
                          tokenizer_record: Optional[dict] = None) -> IndexedDatasetWriter:
    """Write an iterable of token-id documents to ``prefix``; returns the finished writer (counts)."""
    with IndexedDatasetWriter(prefix, vocab_size, tokenizer_record) as writer:
        for ids in documents:
            writer.add_document(ids)
    return writer


def read_documents(prefix: str) -> Iterator[numpy.ndarray]:
    """Yield each document of dataset ``prefix`` as an array of token ids (for checks and tests)."""
    require_dataset(prefix)
    dataset = IndexedDataset(prefix, mmap=True)
    bounds = dataset.document_indices
    for d in range(len(bounds) - 1):
        # Copies: IndexedDataset returns views of an mmap that closes with it.
        parts = [numpy.array(dataset[s]) for s in range(bounds[d], bounds[d + 1])]
        yield numpy.concatenate(parts) if parts else numpy.zeros(0, dtype=dataset.index.dtype)
