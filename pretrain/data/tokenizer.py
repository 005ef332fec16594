"""Tokenizers: a built-in byte-level tokenizer and a wrapper for Hugging Face `tokenizers` JSON files.

Both subclass megatron-core's ``MegatronTokenizerBase`` so that ``GPTDatasetConfig`` accepts them,
and both expose what the dataset and the model need: ``vocab_size`` (unpadded; the model pads it),
``eod`` (the end-of-document id appended between documents), ``tokenize`` and ``detokenize``.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

from megatron.core.tokenizers import MegatronTokenizerBase

logger = logging.getLogger(__name__)

#: Names tried, in order, when an HF tokenizer is given without an explicit end-of-document token.
DEFAULT_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


class Tokenizer(MegatronTokenizerBase):
    """Common base: the interface the data pipeline and the training loop rely on."""

    kind: str = ""  # the name build_tokenizer (and data.tokenizer) knows it by

    def __init__(self, path: Optional[str], **options) -> None:
        super().__init__(path if path is not None else "", {})
        self._options = options

    # --- interface -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        """Number of token ids, special tokens included (before any model-side padding)."""
        raise NotImplementedError

    @property
    def eod(self) -> int:
        """Id of the end-of-document token."""
        raise NotImplementedError

    def tokenize(self, text: str) -> List[int]:  # type: ignore[override]
        """Encode ``text`` to token ids (no special tokens are added)."""
        raise NotImplementedError

    def detokenize(self, ids: Iterable[int]) -> str:  # type: ignore[override]
        """Decode token ids to text, dropping special tokens."""
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode several texts; subclasses may do this faster than one at a time."""
        return [self.tokenize(t) for t in texts]

    # --- megatron-core plumbing ------------------------------------------------------------
    @property
    def vocab(self) -> Dict[str, int]:  # type: ignore[override]
        """Mapping token text -> id."""
        raise NotImplementedError

    def apply_chat_template(self, *args, **kwargs):  # pragma: no cover - not used in pre-training
        """Not supported: pre-training works on raw documents."""
        raise NotImplementedError(f"{type(self).__name__} has no chat template")

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        """What identifies this tokenizer in megatron-core's dataset cache descriptions.

        GPTDataset hashes its config (tokenizer included, through this attribute) to name its
        cached index files, so this must be stable across runs and JSON-serialisable.
        """
        ids: "OrderedDict[str, object]" = OrderedDict()
        ids["class"] = type(self).__name__
        ids["tokenizer_path"] = self.path
        ids["vocab_size"] = self.vocab_size
        ids["eod"] = self.eod
        for key in sorted(self._options):
            ids[key] = str(self._options[key])
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is ``<|endoftext|>`` (the eod).

    Needs no files and no downloads, and round-trips any text exactly. Special tokens are never
    produced by ``tokenize`` (the text "<|endoftext|>" encodes as its bytes), only appended by
    the preprocessing step, so document boundaries cannot be forged by the data.
    """

    kind = "byte"
    EOD_TEXT = "<|endoftext|>"
    _NUM_BYTES = 256

    def __init__(self) -> None:
        super().__init__(None)

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self._NUM_BYTES + 1

    @property
    def eod(self) -> int:
        return self._NUM_BYTES

    def tokenize(self, text: str) -> List[int]:  # type: ignore[override]
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:  # type: ignore[override]
        # errors="replace": an arbitrary window of bytes (e.g. a training sample) may cut a
        # multi-byte character in half; show that as U+FFFD instead of failing.
        data = bytes(int(i) for i in ids if 0 <= int(i) < self._NUM_BYTES)
        return data.decode("utf-8", errors="replace")

    @property
    def vocab(self) -> Dict[str, int]:  # type: ignore[override]
        vocab = {f"<0x{i:02X}>": i for i in range(self._NUM_BYTES)}
        vocab[self.EOD_TEXT] = self.eod
        return vocab


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file (``tokenizer.json``).

    Args:
        path: the tokenizer JSON file.
        eod_token: the token text that marks the end of a document, e.g. "</s>" or
            "<|endoftext|>". When None, the first of ``DEFAULT_EOD_CANDIDATES`` present in the
            vocabulary is used.

    Texts are encoded with ``add_special_tokens=False``: documents are separated by ``eod`` alone,
    not by whatever BOS/EOS template the tokenizer's post-processor would add.
    """

    kind = "hf"

    def __init__(self, path: str, eod_token: Optional[str] = None) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: not a Hugging Face tokenizers JSON file ({err})") from err

        candidates = (eod_token,) if eod_token is not None else DEFAULT_EOD_CANDIDATES
        eod_id = None
        for name in candidates:
            eod_id = self._tok.token_to_id(name)
            if eod_id is not None:
                eod_token = name
                break
        if eod_id is None:
            wanted = repr(eod_token) if eod_token is not None else f"one of {list(candidates)}"
            raise ValueError(
                f"{path}: the end-of-document token {wanted} is not in the vocabulary; "
                f"pass the tokenizer's own end-of-text token (eod_token / --eod-token)"
            )
        self._eod = int(eod_id)
        self.eod_token = eod_token
        super().__init__(os.path.abspath(path), eod_token=eod_token)

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> List[int]:  # type: ignore[override]
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:  # type: ignore[override]
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def vocab(self) -> Dict[str, int]:  # type: ignore[override]
        return self._tok.get_vocab(with_added_tokens=True)


TOKENIZER_KINDS = ("byte", "hf")


def build_tokenizer(
    kind: str = "byte", path: Optional[str] = None, eod_token: Optional[str] = None
) -> Tokenizer:
    """Build a tokenizer by name.

    Args:
        kind: "byte" (built-in, no files) or "hf" (a Hugging Face ``tokenizers`` JSON file).
        path: the tokenizer file; required for "hf", must be None for "byte".
        eod_token: for "hf", the end-of-document token text (see ``HFTokenizer``).
    """
    if kind == "byte":
        if path:
            raise ValueError(f"the byte tokenizer takes no tokenizer file (got {path!r})")
        return ByteTokenizer()
    if kind == "hf":
        if not path:
            raise ValueError("tokenizer kind 'hf' needs a tokenizer JSON file (tokenizer file)")
        return HFTokenizer(path, eod_token=eod_token)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {list(TOKENIZER_KINDS)}")
