"""The embedded default corpus: English text that every CPython installation carries.

Sources, read without executing anything:
  * ``pydoc_data.topics`` — the language reference topics behind ``help()`` (~470 KB), one
    document per topic, in sorted topic order;
  * the docstrings (module, classes, functions, methods) of a fixed list of pure-Python standard
    library modules, read from their source with ``ast``, one document per module.

The text depends only on the Python version (the same bytes for the same CPython release; from
minor version to minor version it changes a little), so the dataset is named after a hash of its
source files: ``<cache>/python3.11-docs-<sha>.{bin,idx}``. ``ensure_default_corpus`` tokenizes it with
the byte tokenizer on first use and reuses the files afterwards; concurrent callers (e.g. every
torchrun rank) serialise on a lock file and build into temporary names, so all of them end up
with one complete dataset.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import logging
import os
import sys
import sysconfig
from functools import lru_cache
from typing import Iterator, List, Optional, Tuple

from pretrain.data.indexed import missing_files, write_indexed_dataset
from pretrain.data.provenance import describe_tokenizer
from pretrain.data.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

#: Environment variable that overrides the corpus cache directory.
CACHE_ENV = "PRETRAIN_DATA_CACHE"

#: Bump when the way the corpus is assembled changes, so old caches are not reused.
CORPUS_VERSION = 1

# Pure-Python modules present in every CPython build (no optional packages such as tkinter or
# idlelib, which some distributions split out), so the corpus is the same everywhere.
DOCSTRING_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "email.message", "enum",
    "fractions", "functools", "glob", "gzip", "heapq", "http.client", "inspect", "ipaddress",
    "json", "logging", "mailbox", "os", "pathlib", "pickle", "pprint", "random", "shutil",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "typing", "unittest.case", "urllib.parse", "uuid", "warnings", "zipfile",
)


def default_cache_dir() -> str:
    """``$PRETRAIN_DATA_CACHE``, else ``$XDG_CACHE_HOME/megatron-pma/corpus`` (~/.cache/...)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron-pma", "corpus")


def _topic_documents() -> Iterator[str]:
    from pydoc_data.topics import topics  # plain data: a dict of topic name -> text

    for name in sorted(topics):
        yield topics[name]


def _module_source(name: str) -> Optional[str]:
    """The source file of stdlib module ``name``, found on disk (nothing is imported)."""
    stdlib = sysconfig.get_path("stdlib")
    base = os.path.join(stdlib, *name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _docstrings(tree: ast.AST, qualname: str = "") -> Iterator[Tuple[str, str]]:
    """(qualified name, docstring) for every documented class and function, in source order."""
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{qualname}{node.name}"
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield name, doc
            if isinstance(node, ast.ClassDef):
                yield from _docstrings(node, name + ".")


def _module_documents() -> Iterator[str]:
    for name in DOCSTRING_MODULES:
        path = _module_source(name)
        if path is None:
            logger.warning("default corpus: stdlib module %s not found; skipped", name)
            continue
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
        parts = [f"Module {name}"]
        module_doc = ast.get_docstring(tree, clean=True)
        if module_doc:
            parts.append(module_doc)
        parts.extend(f"{qual}\n{doc}" for qual, doc in _docstrings(tree))
        yield "\n\n".join(parts)


@lru_cache(maxsize=1)
def corpus_documents() -> Tuple[str, ...]:
    """The default corpus as a tuple of document texts (deterministic for a Python release)."""
    return tuple(_topic_documents()) + tuple(_module_documents())


def _source_files() -> List[str]:
    """The stdlib files the corpus is read from (those that exist here)."""
    paths = [_module_source("pydoc_data.topics")]
    if paths[0] is None:
        raise FileNotFoundError(
            f"pydoc_data/topics.py is missing from this Python's standard library "
            f"({sysconfig.get_path('stdlib')}); pass a dataset instead of the default corpus"
        )
    return paths + [p for p in map(_module_source, DOCSTRING_MODULES) if p is not None]


def corpus_name() -> str:
    """File name (no extension) of the default corpus here, e.g. ``python3.11-docs-<sha>``.

    The hash covers the source files the text is extracted from (cheap to compute, unlike the
    extraction itself), so any change in them gives a new name instead of a stale cache hit.
    """
    digest = hashlib.sha256(f"corpus-v{CORPUS_VERSION}".encode())
    for path in _source_files():
        digest.update(os.path.relpath(path, sysconfig.get_path("stdlib")).encode())
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return f"python{sys.version_info.major}.{sys.version_info.minor}-docs-{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive advisory lock on ``path`` (POSIX flock); a no-op where unavailable.

    Correctness does not depend on it (the dataset is written to temporary names and renamed),
    it only spares concurrent callers from each building the same files.
    """
    try:
        import fcntl
    except ImportError:  # Windows: rely on the atomic rename alone
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_default_corpus(prefix: str) -> None:
    """Tokenize the default corpus with the byte tokenizer into ``prefix``.bin/.idx (atomic)."""
    tokenizer = ByteTokenizer()
    docs = (tokenizer.tokenize(text) + [tokenizer.eod] for text in corpus_documents())
    writer = write_indexed_dataset(prefix, docs, tokenizer.vocab_size, describe_tokenizer(tokenizer))
    logger.info(
        "built the default corpus at %s: %d documents, %d tokens",
        prefix, writer.documents, writer.tokens,
    )


def ensure_default_corpus(cache_dir: Optional[str] = None) -> str:
    """Return the dataset prefix of the default corpus, building it on first use.

    Args:
        cache_dir: where the corpus lives; defaults to ``default_cache_dir()``.

    Safe to call from several processes at once (they wait on a lock; one builds).
    The corpus is tokenized with ``ByteTokenizer``: train on it with that tokenizer.
    """
    cache_dir = cache_dir or default_cache_dir()
    prefix = os.path.join(cache_dir, corpus_name())
    if not missing_files(prefix):
        return prefix
    os.makedirs(cache_dir, exist_ok=True)
    with _file_lock(os.path.join(cache_dir, ".build.lock")):
        if missing_files(prefix):  # another process may have built it while we waited
            logger.info("building the default corpus (first use) at %s", prefix)
            build_default_corpus(prefix)
    return prefix


def corpus_size() -> List[int]:
    """[number of documents, number of bytes] of the default corpus text (for logs and tests)."""
    docs = corpus_documents()
    return [len(docs), sum(len(d.encode("utf-8")) for d in docs)]
