"""megatron-core ``torch_dist`` checkpoints on disk (PyTorch DCP): what they store, reading and writing items.

The merge's planning and writing for this format is in :mod:`.torch_dist`; this module is the file
level only.

A ``torch_dist`` checkpoint directory (``megatron.core.dist_checkpointing.save``) holds:

``metadata.json``  ``{"sharded_backend": "torch_dist", ...}`` -- what megatron-core checks first.
``common.pt``      non-sharded state (iteration, args, ...), written by rank 0 with ``torch.save``.
``.metadata``      a pickled ``torch.distributed.checkpoint.metadata.Metadata``:
                   ``state_dict_metadata[key]`` is a ``TensorStorageMetadata`` (dtype, global
                   size, stored chunks as (offsets, sizes)) or a ``BytesStorageMetadata`` (an
                   opaque object: TE ``_extra_state``, RNG state, ...); ``storage_data`` maps
                   ``MetadataIndex(key, chunk offsets)`` to ``_StorageInfo(relative_path,
                   offset, length)``. megatron-core adds ``all_local_plans`` (the save plans).
``*.distcp``       items back to back. A tensor chunk item is a ``torch.save`` of that chunk
                   (a zip archive) at ``[offset, offset + length)``; a bytes item is raw bytes
                   (megatron-core stores ``torch.save([object, ...])`` there). This is what
                   ``torch.distributed.checkpoint.filesystem._write_item`` writes and
                   ``FileSystemReader.read_data`` reads (``torch.load`` of the byte range).

Writing mirrors ``_write_item``: ``torch.save(tensor, stream)`` at the stream's position, the
new ``(offset, length)`` recorded in a fresh ``storage_data``; ``.metadata`` is pickled the way
``FileSystemWriter.finish`` does. So torch's and megatron-core's own readers load the output.

Safety: every pickled part is read by :mod:`megatron_merge.safe_load`: ``.metadata`` with a
restricted unpickler that only resolves DCP metadata classes; tensor items with
``torch.load(weights_only=True)`` (the merge has torch parse the item that way, then reads its
data record into a reused buffer); bytes items and ``common.pt`` are parsed the same way
(:meth:`TorchDistCheckpoint.check_opaque_parts`) before the merge copies them byte for byte
(or, when optimizer state is dropped, saves ``common.pt`` again without its optimizer entries).
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import logging
import os
import pickle
import re
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from megatron_merge.accumulate import PieceBuffers, intersect
from megatron_merge.errors import MergeError, UnsafeCheckpointError
from megatron_merge.safe_load import DCP_METADATA_FILE, check_objects, load_torch, read_dcp_metadata

logger = logging.getLogger(__name__)

CONFIG_FILE = "metadata.json"
COMMON_FILE = "common.pt"
BACKEND = "torch_dist"


def write_dcp_metadata(checkpoint_dir: str | Path, metadata: Metadata) -> None:
    """Pickle ``metadata`` to ``<checkpoint_dir>/.metadata`` as ``FileSystemWriter.finish`` does."""
    path = Path(checkpoint_dir) / DCP_METADATA_FILE
    tmp = path.with_name(DCP_METADATA_FILE + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(metadata, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


# --------------------------------------------------------------------------------------------
# The checkpoint: what it stores and where
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredChunk:
    """One chunk of a tensor as stored: global ``offsets``/``sizes`` and its file byte range."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    index: MetadataIndex
    storage: _StorageInfo


@dataclass(frozen=True)
class StoredItem:
    """One item of a ``.distcp`` file: a tensor chunk or a bytes object."""

    index: MetadataIndex
    storage: _StorageInfo

    @property
    def key(self) -> str:
        return self.index.fqn

    @property
    def is_tensor(self) -> bool:
        return self.index.offset is not None


class TorchDistCheckpoint:
    """A ``torch_dist`` checkpoint directory opened for reading (metadata only until asked)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self._read_config()
        self.metadata = read_dcp_metadata(self.path)
        self._chunks: dict[str, list[StoredChunk]] = {}
        self._boxes: dict[str, _ChunkIndex] = {}  # built on first overlap query of a key
        self._chunk_index: dict[tuple[str, tuple[int, ...]], StoredChunk] = {}
        self._file_sizes: dict[str, int] = {}
        self._index_items()

    # -- opening -------------------------------------------------------------------------------

    def _read_config(self) -> dict:
        config_path = self.path / CONFIG_FILE
        if not self.path.is_dir():
            raise MergeError(f"{self.path}: no such checkpoint directory")
        if not config_path.exists():
            raise MergeError(
                f"{self.path}: not a megatron-core distributed checkpoint (no {CONFIG_FILE})"
            )
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise MergeError(f"{config_path}: unreadable ({err})") from None
        backend = config.get("sharded_backend") if isinstance(config, dict) else None
        if backend != BACKEND:
            raise MergeError(
                f"{config_path}: sharded_backend is {backend!r}; only {BACKEND!r} is supported"
            )
        return config

    def _index_items(self) -> None:
        storage = self.metadata.storage_data
        for key, meta in self.metadata.state_dict_metadata.items():
            if isinstance(meta, TensorStorageMetadata):
                chunks = []
                for position, chunk in enumerate(meta.chunks):
                    index = MetadataIndex(key, chunk.offsets, position)
                    info = storage.get(index)
                    if info is None:
                        raise MergeError(
                            f"{self.path / DCP_METADATA_FILE}: key {key!r} chunk at offsets "
                            f"{tuple(chunk.offsets)} has no storage entry"
                        )
                    chunks.append(
                        StoredChunk(key, tuple(chunk.offsets), tuple(chunk.sizes), index, info)
                    )
                self._chunks[key] = chunks
                self._chunk_index.update({(key, c.offsets): c for c in chunks})
            elif not isinstance(meta, BytesStorageMetadata):
                raise MergeError(
                    f"{self.path / DCP_METADATA_FILE}: key {key!r} has unknown storage type "
                    f"{type(meta).__name__}"
                )
        for index, info in storage.items():
            meta = self.metadata.state_dict_metadata.get(index.fqn)
            is_chunk = isinstance(meta, TensorStorageMetadata) and index.offset is not None
            if not (is_chunk or (isinstance(meta, BytesStorageMetadata) and index.offset is None)):
                raise MergeError(
                    f"{self.path / DCP_METADATA_FILE}: storage entry for key {index.fqn!r} "
                    f"(offsets {index.offset}) matches no tensor chunk or object in the metadata"
                )
            if is_chunk and (index.fqn, tuple(index.offset)) not in self._chunk_index:
                raise MergeError(
                    f"{self.path / DCP_METADATA_FILE}: key {index.fqn!r} has a stored item at "
                    f"offsets {tuple(index.offset)} that is not one of its chunks"
                )
            name = info.relative_path
            if not name or name != os.path.basename(name) or name in (".", ".."):
                raise MergeError(
                    f"{self.path / DCP_METADATA_FILE}: key {index.fqn!r} points at file "
                    f"{name!r}, not a plain file name inside the checkpoint"
                )
            if getattr(info, "transform_descriptors", None):
                raise MergeError(
                    f"{self.path / name}: key {index.fqn!r} is stored with transforms "
                    f"{info.transform_descriptors} (e.g. compression); not supported"
                )

    # -- what is stored ------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.metadata.state_dict_metadata)

    def tensor_metadata(self, key: str) -> TensorStorageMetadata | None:
        meta = self.metadata.state_dict_metadata.get(key)
        return meta if isinstance(meta, TensorStorageMetadata) else None

    def chunks(self, key: str) -> list[StoredChunk]:
        return self._chunks[key]

    def chunk_at(self, key: str, offsets: tuple[int, ...]) -> StoredChunk:
        """The stored chunk of ``key`` that starts at ``offsets``."""
        return self._chunk_index[key, tuple(offsets)]

    def chunks_overlapping(
        self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]
    ) -> Iterator[tuple[StoredChunk, list[int], list[int]]]:
        """Stored chunks of ``key`` that overlap the box (in metadata order), each with the
        overlap's offsets/sizes. O(log n + candidates) per query (see :class:`_ChunkIndex`)."""
        index = self._boxes.get(key)
        if index is None:
            index = self._boxes[key] = _ChunkIndex(self._chunks[key])
        for chunk in index.candidates(offsets, sizes):
            overlap = intersect(chunk.offsets, chunk.sizes, offsets, sizes)
            if overlap is not None:
                yield chunk, overlap[0], overlap[1]

    def items_by_file(self) -> dict[str, list[StoredItem]]:
        """Every stored item, grouped by ``.distcp`` file, in file order."""
        by_file: dict[str, list[StoredItem]] = {}
        for index, info in self.metadata.storage_data.items():
            by_file.setdefault(info.relative_path, []).append(StoredItem(index, info))
        for items in by_file.values():
            items.sort(key=lambda item: item.storage.offset)
        return dict(sorted(by_file.items()))

    def check_stored(self, storage: _StorageInfo, key: str) -> None:
        """Raise if the item's byte range is not inside its file (missing or truncated file)."""
        name = storage.relative_path
        size = self._file_sizes.get(name)
        if size is None:
            try:
                size = (self.path / name).stat().st_size
            except FileNotFoundError:
                raise MergeError(f"{self.path / name}: missing (holds key {key!r})") from None
            if not os.access(self.path / name, os.R_OK):
                raise MergeError(
                    f"{self.path / name}: not readable (permission denied; holds key {key!r}); "
                    f"make it readable (chmod u+r) and run again"
                )
            self._file_sizes[name] = size
        if storage.offset < 0 or storage.length < 0 or storage.offset + storage.length > size:
            raise MergeError(
                f"{self.path / name}: truncated: key {key!r} is stored at bytes "
                f"[{storage.offset}, {storage.offset + storage.length}) but the file has {size} bytes"
            )

    def check_files(self) -> None:
        """Raise unless every item the metadata lists lies inside its file (missing or truncated
        ``.distcp`` files), whether or not a merge reads that item."""
        for index, info in self.metadata.storage_data.items():
            self.check_stored(info, index.fqn)

    def check_opaque_parts(self) -> None:
        """Parse ``common.pt`` and every bytes item with the safe reader; raise if one is refused
        or unreadable. A merge copies these byte for byte, so it checks them first."""
        self.load_common()
        check_objects(self.path, self.metadata)

    def load_common(self) -> dict:
        """``common.pt`` read by the safe reader (:func:`~megatron_merge.safe_load.load_torch`:
        Megatron-LM's ``args`` and megatron-core's safe classes are allowed). Raises
        :class:`MergeError` if it holds anything else."""
        path = self.path / COMMON_FILE
        common = load_torch(path)
        if not isinstance(common, dict):
            raise MergeError(f"{path}: holds {type(common).__name__}, expected a dict")
        return common

    def iteration(self) -> int | None:
        """``iteration`` from common.pt when it is readable; else None (a peek only). A
        common.pt holding a refused class raises even here: that input is hostile."""
        try:
            value = self.load_common().get("iteration")
        except UnsafeCheckpointError:
            raise
        except MergeError as err:
            logger.debug("%s: no iteration from %s (%s)", self.path, COMMON_FILE, err)
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    # -- reading items -------------------------------------------------------------------------

    def read_chunk(self, chunk: StoredChunk, buffers: PieceBuffers | None = None) -> torch.Tensor:
        """Load one stored chunk, checked against the metadata's dtype and sizes.

        With ``buffers`` the values land in their reused ``"input"`` buffer (see
        :func:`_load_into_buffer`) and are valid until the next read with the same buffers.
        """
        self.check_stored(chunk.storage, chunk.key)
        file = self.path / chunk.storage.relative_path
        where = f"{file} (key {chunk.key!r}, chunk offsets {chunk.offsets})"
        try:
            with open(file, "rb") as f:
                view = _ByteRangeReader(f, chunk.storage.offset, chunk.storage.length)
                tensor = _load_into_buffer(view, buffers) if buffers is not None else None
                if tensor is None:
                    view.seek(0)
                    tensor = torch.load(view, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a blob that does not load is corrupt
            raise MergeError(f"{where}: corrupt item ({type(err).__name__}: {err})") from None
        expected_dtype = self.metadata.state_dict_metadata[chunk.key].properties.dtype
        if not isinstance(tensor, torch.Tensor):
            raise MergeError(f"{where}: corrupt item (holds {type(tensor).__name__}, not a tensor)")
        if tensor.dtype != expected_dtype or tuple(tensor.shape) != chunk.sizes:
            raise MergeError(
                f"{where}: corrupt item: holds {tensor.dtype} {tuple(tensor.shape)}, "
                f"metadata says {expected_dtype} {chunk.sizes}"
            )
        return tensor

    def prefetch(self, storage: _StorageInfo) -> None:
        """Start reading an item's bytes into the page cache and return at once (a hint).

        The merge asks for the next item's chunks while it works on the current one, so the
        disk reads them while the CPU merges; a plain read of a freshly opened file gets only
        the kernel's synchronous readahead, one window at a time.
        """
        _fadvise(self.path / storage.relative_path, storage.offset, storage.length, _WILLNEED)

    def copy_item_bytes(self, item: StoredItem, out: BinaryIO, block: int = 1 << 24) -> None:
        """Copy an item's raw bytes to ``out`` in bounded blocks (bytes objects are opaque)."""
        self.check_stored(item.storage, item.key)
        with open(self.path / item.storage.relative_path, "rb") as f:
            f.seek(item.storage.offset)
            left = item.storage.length
            while left:
                data = f.read(min(block, left))
                if not data:
                    raise MergeError(
                        f"{self.path / item.storage.relative_path}: truncated while copying "
                        f"key {item.key!r}"
                    )
                out.write(data)
                left -= len(data)


class _ChunkIndex:
    """The stored chunks of one key, sorted along the dimension that splits them most.

    A merge asks, for every output chunk, which stored chunks of each input overlap it; a scan
    of all k chunks of a key makes planning and merging O(k^2) per key (megatron-core stacks
    layers and experts into one key: 10^4-10^5 chunks). Sorted by their start in one
    dimension, only chunks starting within the query's span (less the longest chunk's extent)
    can overlap it: found by bisection.
    """

    def __init__(self, chunks: list[StoredChunk]):
        self.chunks = chunks
        ndim = len(chunks[0].offsets) if chunks else 0
        self.dim = max(range(ndim), key=lambda d: len({c.offsets[d] for c in chunks})) if ndim else None
        if self.dim is None:
            return
        self.order = sorted(range(len(chunks)), key=lambda i: chunks[i].offsets[self.dim])
        self.starts = [chunks[i].offsets[self.dim] for i in self.order]
        self.longest = max(c.sizes[self.dim] for c in chunks)

    def candidates(self, offsets, sizes) -> list[StoredChunk]:
        if self.dim is None:  # 0-d tensors: one chunk
            return self.chunks
        low, high = offsets[self.dim], offsets[self.dim] + sizes[self.dim]
        first = bisect.bisect_right(self.starts, low - self.longest)
        last = bisect.bisect_left(self.starts, high)
        return [self.chunks[i] for i in sorted(self.order[first:last])]


def _load_into_buffer(view: "_ByteRangeReader", buffers: PieceBuffers) -> torch.Tensor | None:
    """``torch.load`` of a one-tensor item, with the tensor's bytes read into a reused buffer.

    torch.load allocates fresh memory for every item, which the OS page-faults in again each
    time (see :class:`PieceBuffers`). Here torch still parses the item -- its pickle, with
    ``weights_only``'s checks -- but under ``skip_data``, which leaves the storage unread and
    untouched; the zip directory says where the one storage record lies, and one ``readinto``
    fills the buffer. Returns None for an item not laid out that way, or one it cannot parse
    (the caller then uses plain ``torch.load``, which names what is wrong with a corrupt item).
    """
    skip_data = getattr(torch.serialization, "skip_data", None)  # torch >= 2.5
    if skip_data is None:
        return None
    try:
        with skip_data():
            layout = torch.load(view, map_location="cpu", weights_only=True)
        record = _storage_record(view) if isinstance(layout, torch.Tensor) else None
    except Exception:  # noqa: BLE001 - left to plain torch.load to report
        return None
    if record is None or record[1] != layout.untyped_storage().nbytes():
        return None
    start, nbytes = record
    raw = buffers.empty("input", (nbytes,), torch.uint8)
    view.seek(start)
    if nbytes and view.readinto(raw.numpy()) != nbytes:
        return None  # short: torch.load reports the truncated item
    return raw.view(layout.dtype).as_strided(layout.shape, layout.stride(), layout.storage_offset())


def _storage_record(view: "_ByteRangeReader") -> tuple[int, int] | None:
    """(start, length) inside the item of its one storage record (``<archive>/data/<key>``),
    if it is stored uncompressed in little-endian byte order; else None."""
    if sys.byteorder != "little":
        return None
    view.seek(0)
    with zipfile.ZipFile(view) as archive:
        infos = archive.infolist()
        records = [i for i in infos if re.fullmatch(r"[^/]+/data/[^/]+", i.filename)]
        byteorder = [i for i in infos if i.filename.endswith("/byteorder")]
        if byteorder and archive.read(byteorder[0]) != b"little":
            return None
    if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
        return None
    record = records[0]
    view.seek(record.header_offset)
    header = view.read(zipfile.sizeFileHeader)
    if len(header) != zipfile.sizeFileHeader or header[:4] != zipfile.stringFileHeader:
        return None
    name_length, extra_length = struct.unpack("<HH", header[26:30])  # after the fixed fields
    start = record.header_offset + zipfile.sizeFileHeader + name_length + extra_length
    return start, record.file_size


class _ByteRangeReader(io.RawIOBase):
    """A seekable read-only view of ``[offset, offset + length)`` of an open binary file.

    ``torch.load`` reads the item's zip archive through it without copying the item first.
    """

    def __init__(self, base: BinaryIO, offset: int, length: int):
        super().__init__()
        self._base, self._start, self._length, self._pos = base, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            new = pos
        elif whence == io.SEEK_CUR:
            new = self._pos + pos
        elif whence == io.SEEK_END:
            new = self._length + pos
        else:
            raise ValueError(f"bad whence {whence}")
        self._pos = max(0, min(new, self._length))
        return self._pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._length - self._pos)
        if want <= 0:
            return 0
        self._base.seek(self._start + self._pos)
        got = self._base.readinto(memoryview(buffer)[:want])
        self._pos += got or 0
        return got or 0

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._pos
        size = left if size is None or size < 0 else min(size, left)
        if size <= 0:
            return b""
        self._base.seek(self._start + self._pos)
        data = self._base.read(size)
        self._pos += len(data)
        return data


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


# posix_fadvise advice (Linux; elsewhere the hints are skipped). WILLNEED starts readahead of
# a range; DONTNEED starts writeback of its dirty pages (WB_SYNC_NONE: no waiting) and drops
# its clean ones -- neither changes what is read or written.
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


def _fadvise(path: Path, offset: int, length: int, advice: int | None) -> None:
    if advice is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a hint only: reading the item reports a missing file properly
    try:
        _fadvise_fd(fd, offset, length, advice)
    finally:
        os.close(fd)


def _fadvise_fd(fd: int, offset: int, length: int, advice: int | None) -> None:
    if advice is None or length <= 0:
        return
    try:
        os.posix_fadvise(fd, offset, length, advice)
    except OSError:
        pass  # a hint only


class DistcpFileWriter:
    """Writes one ``.distcp`` file item by item, returning each item's new ``_StorageInfo``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")

    def write_tensor(self, tensor: torch.Tensor) -> _StorageInfo:
        # torch.save writes a tensor's whole storage: give it a compact, contiguous one.
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.contiguous().clone()
        offset = self._file.tell()
        torch.save(tensor, self._file)
        return self._written(offset)

    def copy_item(self, source: TorchDistCheckpoint, item: StoredItem) -> _StorageInfo:
        offset = self._file.tell()
        source.copy_item_bytes(item, self._file)
        return self._written(offset)

    def _written(self, offset: int) -> _StorageInfo:
        """The storage entry of the item just written from ``offset``; starts its writeback.

        Without the nudge, the kernel keeps the whole file dirty until the fsync in
        :meth:`close` and then writes it while the merge waits; started per item, the writes
        overlap with reading and merging the next items.
        """
        length = self._file.tell() - offset
        self._file.flush()
        _fadvise_fd(self._file.fileno(), offset, length, _DONTNEED)
        return _StorageInfo(self.path.name, offset, length)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> "DistcpFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()


def output_metadata(
    template: Metadata,
    storage_data: dict[MetadataIndex, _StorageInfo],
    dropped_keys: set[str],
    checkpoint_id: str,
    save_id: str,
    dtypes: dict[str, torch.dtype] | None = None,
) -> Metadata:
    """The output's ``.metadata``: the template's (reference input's) minus dropped keys, new storage.

    ``dtypes`` gives keys stored in another dtype than the template's (``--save-dtype``).
    Everything else -- chunking, planner data, megatron-core's ``all_local_plans`` -- stays as
    the template had it, so the output looks like a checkpoint saved at its layout.
    """
    dtypes = dtypes or {}
    state_dict_metadata = {
        k: _with_dtype(v, dtypes.get(k)) for k, v in template.state_dict_metadata.items()
        if k not in dropped_keys
    }
    planner_data = template.planner_data
    if isinstance(planner_data, dict):
        planner_data = {k: v for k, v in planner_data.items() if k not in dropped_keys}
    metadata = dataclasses.replace(
        template,
        state_dict_metadata=state_dict_metadata,
        planner_data=planner_data,
        storage_data=dict(storage_data),
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=save_id),
    )
    # Attributes megatron-core sets on the instance beyond the dataclass fields.
    for name, value in vars(template).items():
        if name in {f.name for f in dataclasses.fields(Metadata)}:
            continue
        if name == "all_local_plans" and isinstance(value, list) and (dropped_keys or dtypes):
            value = [
                dataclasses.replace(
                    plan, items=[_write_item_with_dtype(i, dtypes.get(i.index.fqn))
                                 for i in plan.items if i.index.fqn not in dropped_keys]
                )
                for plan in value
            ]
        setattr(metadata, name, value)
    return metadata


def _with_dtype(meta, dtype: torch.dtype | None):
    if dtype is None or not isinstance(meta, TensorStorageMetadata):
        return meta
    return dataclasses.replace(meta, properties=dataclasses.replace(meta.properties, dtype=dtype))


def _write_item_with_dtype(item, dtype: torch.dtype | None):
    """A save plan's ``WriteItem`` with its tensor's dtype changed (megatron-core keeps the
    plans in the metadata; they should describe what is stored)."""
    tensor_data = getattr(item, "tensor_data", None)
    if dtype is None or tensor_data is None:
        return item
    properties = dataclasses.replace(tensor_data.properties, dtype=dtype)
    return dataclasses.replace(item, tensor_data=dataclasses.replace(tensor_data, properties=properties))
