"""The one restricted reader for every pickled part of a checkpoint.

Checkpoints arrive from elsewhere (a collaborator's run, a shared file system, a download), and
unpickling calls whatever a pickle names. So no pickled part is ever read with plain ``pickle`` or
``torch.load(weights_only=False)``; everything goes through here:

``.metadata`` (DCP)         :func:`read_dcp_metadata`: a ``pickle.Unpickler`` that resolves only
                            the classes DCP metadata is made of (:data:`DCP_METADATA_CLASSES`).
                            :class:`SafeFileSystemReader` gives it to torch's DCP loaders.
``torch.save`` data         :func:`load_torch`: ``torch.load(weights_only=True)`` with an
                            explicit allowlist -- torch's own tensors and containers, the plain
                            data Megatron and DeepSpeed store (:func:`common_safe_globals`),
                            megatron-core's own ``SAFE_GLOBALS`` (its enums, ``Namespace``,
                            ``signal.Signals``, ...; imported the first time a file needs them)
                            and a format's extras. Used for ``common.pt``, legacy
                            ``model_optim_rng.pt`` / ``distrib_optim.pt``, DeepSpeed files and
                            DCP bytes items (RNG state, ``_extra_state``, any ``ShardedObject``).

Anything else is refused with :class:`~megatron_merge.errors.UnsafeCheckpointError`, whose
message names the file, the key that holds the object and its class, before the caller has
changed any state. The megatron-core load path (strategies and planner) is in
:mod:`megatron_merge.safe_dist_checkpointing`.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

from megatron_merge.errors import MergeError, UnsafeCheckpointError

DCP_METADATA_FILE = ".metadata"

# --------------------------------------------------------------------------------------------
# DCP .metadata
# --------------------------------------------------------------------------------------------

# What torch 2.x's FileSystemWriter and megatron-core's save pickle into `.metadata`.
DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    # megatron-core pickles its save plans into the metadata (`all_local_plans`).
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData",
    },
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # maps a layout's name to torch.strided etc.
    "collections": {"OrderedDict"},
    # torch's FileSystemWriter records StorageMeta.checkpoint_id as a Path.
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "builtins": {"set", "frozenset"},
    # Empty placeholder classes older megatron-core versions pickled into .metadata.
    "megatron.core.dist_checkpointing.strategies.torch": {"MCoreMetadata", "MCoreSavePlan"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file; refuses every class outside the allowlist."""

    def find_class(self, module: str, name: str):
        if name in DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")


class _Refused(pickle.UnpicklingError):
    def __init__(self, qualname: str):
        super().__init__(f"refusing to load {qualname} (not a DCP metadata class)")
        self.qualname = qualname


def read_dcp_metadata(checkpoint_dir: str | Path) -> Metadata:
    """``<checkpoint_dir>/.metadata`` unpickled with the restricted unpickler, checked to be a
    DCP ``Metadata`` with ``storage_data``. Raises :class:`MergeError` naming the file."""
    path = Path(checkpoint_dir) / DCP_METADATA_FILE
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise MergeError(f"{path}: missing; not a complete torch_dist checkpoint") from None
    except _Refused as err:
        inner = _locate_in_pickle(path, err.qualname)
        at = f": key {inner!r}" if inner else ""
        raise UnsafeCheckpointError(
            f"{path}{at}: {err}", path=path, key=inner,
            qualname=err.qualname,
        ) from None
    except OSError as err:
        raise MergeError(f"{path}: cannot read ({err.strerror or err}); check its permissions") from None
    except Exception as err:  # noqa: BLE001 - any other unpickling failure means a bad file
        raise MergeError(f"{path}: cannot read DCP metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise MergeError(f"{path}: not a torch.distributed.checkpoint Metadata object")
    if not isinstance(metadata.storage_data, dict):
        raise MergeError(f"{path}: DCP metadata has no storage_data")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's ``FileSystemReader`` reading ``.metadata`` with :func:`read_dcp_metadata`
    (cached: DCP asks for it more than once per load). Tensor items are read by torch with
    ``weights_only=True`` already; bytes items are the load planner's job (see
    :mod:`megatron_merge.safe_dist_checkpointing`)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.checkpoint_dir = Path(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            metadata = read_dcp_metadata(self.checkpoint_dir)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


# --------------------------------------------------------------------------------------------
# torch.save data: weights_only with an explicit allowlist
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def common_safe_globals() -> tuple:
    """What Megatron and DeepSpeed store beside the tensors, allowed in every file.

    ``argparse.Namespace`` / ``SimpleNamespace`` (Megatron's ``args``), ``io.BytesIO`` (Transformer
    Engine ``_extra_state``; an empty one holds ``b""``, which pickle protocol 2 writes as a call
    of ``bytes``), and numpy arrays and scalars (``np.random.get_state()`` in RNG
    state). Each rebuilds plain data; none runs code from the file. Entries are
    ``(object, "module.name")`` pairs where numpy 1 and numpy 2 pickle the same thing under
    different names.
    """
    import argparse
    import types

    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [argparse.Namespace, types.SimpleNamespace, io.BytesIO, bytes, np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        function = getattr(multiarray, name)
        allowed += [(function, f"numpy.core.multiarray.{name}"),
                    (function, f"numpy._core.multiarray.{name}")]
    # numpy >= 1.25 pickles a dtype's class (numpy.dtypes.UInt32DType, ...) in some cases
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [c for c in vars(dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)]
    return tuple(allowed)


@functools.lru_cache(maxsize=None)
def megatron_core_safe_globals() -> tuple:
    """megatron-core's own list of classes safe to unpickle (``megatron.core.safe_globals``:
    its enums such as ``AttnBackend`` and ``ModelType``, ``signal.Signals``, ``Namespace``,
    ``OptimizerConfig``, ...), which Megatron-LM checkpoints hold in ``args``. Empty when
    megatron-core is not installed. Importing it costs seconds, so :func:`load_torch` asks
    only when a file names a class outside the other lists."""
    try:
        from megatron.core.safe_globals import SAFE_GLOBALS
    except ImportError:
        return ()
    return tuple(SAFE_GLOBALS)


def _qualnames(objects: Sequence) -> set[str]:
    names = set()
    for entry in objects:
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', '?')}")
    return names


_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_torch(
    source: str | Path | bytes | BinaryIO,
    *,
    where: str | Path | None = None,
    key: str | None = None,
    extra_globals: Sequence = (),
    mmap: bool = False,
) -> Any:
    """``torch.load(source, weights_only=True)`` with the allowlist above plus ``extra_globals``.

    ``source`` is a path, the bytes of a ``torch.save``, or an open binary stream. ``where``
    names the file in messages (default: ``source`` when it is a path); ``key`` names the item
    inside it (a DCP key). Raises :class:`UnsafeCheckpointError` for an object outside the
    allowlist (naming the file, the key holding it and its class), :class:`MergeError` for a
    file that is missing, unreadable or not a ``torch.save`` file.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    where = Path(where) if where is not None else (Path(source) if isinstance(source, (str, Path)) else "<bytes>")
    label = f"{where}" + (f": key {key!r}" if key is not None else "")
    allowed = [*common_safe_globals(), *extra_globals]
    tried_megatron = False
    while True:
        try:
            if not isinstance(source, (str, Path)):
                source.seek(0)
            with torch.serialization.safe_globals(allowed):
                return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            match = _UNSUPPORTED_GLOBAL.search(str(err))
            if match is None:
                detail = re.search(r"WeightsUnpickler error: (.*)", str(err))
                reason = detail.group(1)[:300] if detail else _first_line(err)
                raise MergeError(f"{label}: cannot load with weights_only=True ({reason})") from None
            qualname = match.group(1)
            if "." not in qualname:  # torch names builtins without their module
                qualname = f"builtins.{qualname}"
            if not tried_megatron and qualname not in _qualnames(allowed):
                tried_megatron = True
                mcore = megatron_core_safe_globals()
                if qualname in _qualnames(mcore):
                    allowed += mcore
                    continue
            raise _refusal(source, where, key, qualname) from None
        except FileNotFoundError:
            raise MergeError(f"{where}: missing") from None
        except PermissionError:
            raise MergeError(f"{where}: permission denied; make it readable") from None
        except RuntimeError as err:
            if mmap and "mmap" in str(err):  # a file from torch < 1.6 (not a zip archive): no mmap
                mmap = False
                continue
            raise MergeError(f"{label}: corrupt or truncated ({_first_line(err)})") from None
        except Exception as err:  # noqa: BLE001 - any other failure means an unreadable file
            raise MergeError(f"{label}: corrupt or truncated ({type(err).__name__}: {_first_line(err)})") from None


def _refusal(source, where, key: str | None, qualname: str) -> UnsafeCheckpointError:
    inner = _locate(source, qualname)
    holder = ".".join(p for p in (key, inner) if p)
    at = f": key {holder!r}" if holder else ""
    return UnsafeCheckpointError(
        f"{where}{at}: refusing to unpickle {qualname}: not in the allowlist of classes a "
        f"checkpoint may contain (weights_only=True plus megatron-core's safe globals)",
        path=where, key=holder or None, qualname=qualname,
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def read_bytes_item(checkpoint_dir: str | Path, metadata: Metadata, key: str) -> Any:
    """The object stored as bytes item ``key``, parsed by :func:`load_torch` (file and key named)."""
    info = metadata.storage_data.get(MetadataIndex(key))
    if info is None:
        raise MergeError(f"{Path(checkpoint_dir) / DCP_METADATA_FILE}: no stored object for key {key!r}")
    path = Path(checkpoint_dir) / info.relative_path
    try:
        with open(path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
    except OSError as err:
        raise MergeError(f"{path}: cannot read (key {key!r}): {err.strerror or err}") from None
    if len(data) != info.length:
        raise MergeError(
            f"{path}: truncated: key {key!r} is stored at bytes [{info.offset}, "
            f"{info.offset + info.length}) but the file ends before"
        )
    return load_torch(data, where=path, key=key)


def check_objects(checkpoint_dir: str | Path, metadata: Metadata) -> None:
    """Parse every bytes item of a DCP checkpoint with :func:`read_bytes_item`; raise on the first
    refused or unreadable one. Loaders call it before touching any state, so that an object
    the load would not even ask for (a weights-only load's RNG state) is refused too."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            read_bytes_item(checkpoint_dir, metadata, key)


# --------------------------------------------------------------------------------------------
# Where in the file a refused object sits (for the message only)
# --------------------------------------------------------------------------------------------


class _Stub:
    """Stands in for every global while locating a refused one: nothing real is ever built."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.parts = {"args": list(args)}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.parts["state"] = state

    def __setitem__(self, key, value):
        self.parts[key] = value

    def append(self, value):
        self.parts.setdefault("items", []).append(value)

    def extend(self, values):
        self.parts.setdefault("items", []).extend(values)


class _LocatingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import _compat_pickle  # protocol-2 pickles name Python 2 modules (``__builtin__``)

        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return type(name, (_Stub,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid):
        return None  # a tensor's storage: not needed to find a key


def _locate(source, qualname: str) -> str | None:
    """The path (``args.attention_backend``) to the first object of ``qualname`` in a
    ``torch.save`` zip archive, found by unpickling it with every global replaced by an inert
    stub; None when it cannot tell."""
    try:
        if not isinstance(source, (str, Path)):
            source.seek(0)
        with zipfile.ZipFile(source) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            tree = _LocatingUnpickler(io.BytesIO(archive.read(name))).load()
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None
    found = _find_path(tree, qualname, (), set())
    return ".".join(found) if found else None


def _locate_in_pickle(path: Path, qualname: str) -> str | None:
    """Like :func:`_locate`, for a plain pickle file (``.metadata``)."""
    try:
        with open(path, "rb") as f:
            tree = _LocatingUnpickler(f).load()
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None
    found = _find_path(tree, qualname, (), set())
    return ".".join(found) if found else None


def _find_path(obj, qualname: str, path: tuple, seen: set) -> tuple | None:
    if id(obj) in seen:
        return None
    seen.add(id(obj))
    if isinstance(obj, _Stub):
        if obj.qualname == qualname:
            return path
        children = obj.parts.items()
        state = obj.parts.get("state")
        if isinstance(state, dict):  # an object's attributes: name them directly
            children = [*state.items(), *obj.parts.items()]
    elif isinstance(obj, dict):
        children = obj.items()
    elif isinstance(obj, (list, tuple)):
        children = enumerate(obj)
    else:
        return None
    for name, child in children:
        hit = _find_path(child, qualname, path + (str(name),), seen)
        if hit is not None:
            return hit
    return None
