"""Text / JSON-lines files -> a megatron-core indexed dataset (PREFIX.bin + PREFIX.idx).

    pretrain-preprocess --input a.txt b.jsonl --output-prefix data/mix \\
        [--tokenizer byte | --tokenizer hf --tokenizer-file tokenizer.json [--eod-token '</s>']] \\
        [--json-key text] [--text-doc paragraph|file] [--no-append-eod] [--workers N]

What a document is:
  * ``.jsonl`` / ``.ndjson`` / ``.json`` files (optionally ``.gz``): one JSON object per line, the
    document is the string under ``--json-key``; blank lines are skipped.
  * any other file is UTF-8 text. With ``--text-doc paragraph`` (the default) each block of
    non-blank lines is one document (blocks are separated by blank lines); with
    ``--text-doc file`` the whole file is one document. Paragraphs are the default because
    megatron-core splits train/valid/test by document: one document per file would leave a
    single-file dataset nothing to split.

Each document is followed by the tokenizer's end-of-document token (``--append-eod``, on by
default; ``--no-append-eod`` turns it off). All inputs go, in order, into one dataset.
Bad input (invalid UTF-8 or JSON, a missing key) stops the run with ``file:line: what`` and a
non-zero exit status, and leaves no output files.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import IO, Iterable, Iterator, List, Optional, Sequence

from tqdm import tqdm

from pretrain.data.indexed import IndexedDatasetWriter
from pretrain.data.provenance import describe_tokenizer
from pretrain.data.tokenizer import TOKENIZER_KINDS, Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_DOC_MODES = ("paragraph", "file")


class InputError(ValueError):
    """Bad input data; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class Document:
    """One document's text and where it came from (``file:line``)."""

    text: str
    source: str


# --- reading -----------------------------------------------------------------------------------


def _open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decoded_lines(path: str) -> Iterator[tuple]:
    """Yield (line_number, text) with line endings kept; invalid UTF-8 names file:line."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}:{lineno}: invalid UTF-8 ({err.reason})") from None
            if lineno == 1 and line.startswith("\ufeff"):  # a byte-order mark is not text
                line = line[1:]
            yield lineno, line


def read_text_documents(path: str, text_doc: str = "paragraph") -> Iterator[Document]:
    """Documents of a UTF-8 text file: one per blank-line-separated block, or the whole file.

    A paragraph's text is its lines exactly as in the file, without the final line ending.
    """
    if text_doc not in TEXT_DOC_MODES:
        raise ValueError(f"text_doc must be one of {list(TEXT_DOC_MODES)}, got {text_doc!r}")
    if text_doc == "file":
        text = "".join(line for _, line in _decoded_lines(path))
        if text:
            yield Document(text, f"{path}:1")
        return
    block: List[str] = []
    start = 0
    for lineno, line in _decoded_lines(path):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield Document("".join(block).rstrip("\r\n"), f"{path}:{start}")
            block = []
    if block:
        yield Document("".join(block).rstrip("\r\n"), f"{path}:{start}")


def read_jsonl_documents(path: str, json_key: str = "text") -> Iterator[Document]:
    """Documents of a JSON-lines file: the string under ``json_key`` of each non-blank line."""
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: invalid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if json_key not in record:
            present = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            raise InputError(f"{where}: missing key {json_key!r} (keys present: {present})")
        text = record[json_key]
        if not isinstance(text, str):
            raise InputError(
                f"{where}: key {json_key!r} holds {type(text).__name__}, expected a string"
            )
        yield Document(text, where)


def input_format(path: str) -> str:
    """'jsonl' for .jsonl/.ndjson/.json files (optionally .gz), else 'text'."""
    name = path[: -len(".gz")] if path.endswith(".gz") else path
    return "jsonl" if name.lower().endswith(JSON_SUFFIXES) else "text"


def read_documents(
    paths: Sequence[str], json_key: str = "text", text_doc: str = "paragraph"
) -> Iterator[Document]:
    """All documents of ``paths``, in order, each file read according to its extension."""
    for path in paths:
        if input_format(path) == "jsonl":
            yield from read_jsonl_documents(path, json_key)
        else:
            yield from read_text_documents(path, text_doc)


# --- tokenizing --------------------------------------------------------------------------------

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _tokenize_in_worker(texts: List[str]) -> List[List[int]]:
    return _worker_tokenizer.tokenize_batch(texts)


def _batches(documents: Iterable[Document], size: int) -> Iterator[List[Document]]:
    batch: List[Document] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenized_batches(
    batches: Iterator[List[Document]], tokenizer: Tokenizer, workers: int
) -> Iterator[tuple]:
    """Yield (batch, token ids per document) in input order, tokenizing on ``workers`` processes.

    Reading stays in this process (so input errors surface here, with file:line); at most
    2 * workers batches are in flight, bounding memory on large inputs.
    """
    if workers <= 1:
        for batch in batches:
            yield batch, tokenizer.tokenize_batch([d.text for d in batch])
        return
    # fork starts workers at once; it is safe because they only tokenize (no torch operations,
    # whose OpenMP pool does not survive a fork).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(
        workers, initializer=_init_worker, initargs=(tokenizer,)
    ) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_tokenize_in_worker, ([d.text for d in batch],))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: Tokenizer,
    *,
    json_key: str = "text",
    text_doc: str = "paragraph",
    append_eod: bool = True,
    workers: int = 1,
    batch_size: int = 256,
    progress: bool = True,
) -> IndexedDatasetWriter:
    """Tokenize ``inputs`` into one indexed dataset at ``output_prefix`` (.bin/.idx), with the
    tokenizer recorded beside it (``.tokenizer.json``, see :mod:`pretrain.data.provenance`).

    Returns the finished writer, whose ``documents`` and ``tokens`` count what was written.
    Raises ``InputError`` (message ``file:line: ...``) or ``FileNotFoundError`` on bad input,
    in which case nothing is written.
    """
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"input file not found: {', '.join(missing)}")
    if not inputs:
        raise ValueError("no input files given")
    if output_prefix.endswith((".bin", ".idx")):
        raise ValueError(f"--output-prefix is a prefix, without .bin/.idx: {output_prefix!r}")

    documents = read_documents(inputs, json_key=json_key, text_doc=text_doc)
    bar = tqdm(unit="doc", desc="tokenizing", disable=not progress, dynamic_ncols=True)
    record = describe_tokenizer(tokenizer)
    with IndexedDatasetWriter(output_prefix, tokenizer.vocab_size, record) as writer, bar:
        for batch, ids_per_doc in _tokenized_batches(
            _batches(documents, batch_size), tokenizer, workers
        ):
            for ids in ids_per_doc:
                if append_eod and ids:
                    ids.append(tokenizer.eod)
                writer.add_document(ids)
            bar.update(len(batch))
            bar.set_postfix(tokens=writer.tokens, refresh=False)
    if writer.skipped_empty:
        logger.info("skipped %d empty documents", writer.skipped_empty)
    return writer


# --- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``pretrain-preprocess`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="pretrain-preprocess",
        description="Tokenize text / JSON-lines files into a megatron-core indexed dataset.",
        epilog="Text files: one document per blank-line-separated paragraph (--text-doc "
        "paragraph) or per file (--text-doc file). .jsonl/.ndjson/.json files: one document per "
        "line, under --json-key. .gz files are read compressed.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="input files, in order")
    parser.add_argument(
        "--output-prefix", required=True, help="output path without extension: PREFIX.bin/.idx"
    )
    parser.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="byte",
                        help="byte: built-in UTF-8 byte tokenizer (default); hf: --tokenizer-file")
    parser.add_argument("--tokenizer-file", help="Hugging Face tokenizers JSON file (for hf)")
    parser.add_argument("--eod-token", help="end-of-document token text for hf, e.g. '</s>' "
                        "(default: the first of <|endoftext|>, </s>, ... in the vocabulary)")
    parser.add_argument("--json-key", default="text", help="JSON key holding the text")
    parser.add_argument("--text-doc", choices=TEXT_DOC_MODES, default="paragraph",
                        help="what one document is in a text file (default: paragraph)")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="append the end-of-document token to each document (default: on)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``pretrain-preprocess``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.workers > cores:
        logger.warning("--workers %d is more than the %d CPU cores available: processes compete for them, "
                       "which is slower than --workers %d", args.workers, cores, cores)
    try:
        tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_file, args.eod_token)
        writer = preprocess(
            args.input,
            args.output_prefix,
            tokenizer,
            json_key=args.json_key,
            text_doc=args.text_doc,
            append_eod=args.append_eod,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"pretrain-preprocess: error: {err}", file=sys.stderr)
        return 1
    print(
        f"{args.output_prefix}: {writer.documents} documents, {writer.tokens} tokens, "
        f"vocab_size {tokenizer.vocab_size}, eod {tokenizer.eod}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
