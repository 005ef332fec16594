"""An independent reference for merged checkpoints: whole tensors through torch's own DCP reader,
combined in one process (nothing from megatron_merge's read path)."""

import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader


def model_keys(path: Path) -> list[str]:
    """Float tensor keys of a checkpoint that are model weights (what a merge combines)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return sorted(k for k, m in md.items() if isinstance(m, TensorStorageMetadata)
                  and m.properties.dtype.is_floating_point and not k.startswith(("optimizer.", "merge_state.")))


def load_full(path: Path, key: str) -> torch.Tensor:
    """A whole tensor through torch's own DCP reader (not the package's)."""
    import torch.distributed.checkpoint as dcp

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata[key]
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return state[key]


def reference_merge(paths, key, weights, acc_dtype=torch.float32, ema_alpha=None) -> torch.Tensor:
    """sum_i w_i * x_i, oldest first, in the accumulation dtype, rounded back once.

    With ``ema_alpha``: the paper's recursion M = a * x_i + (1 - a) * M, starting from x_1.
    """
    tensors = [load_full(p, key) for p in paths]
    if ema_alpha is not None:
        a, keep = torch.tensor(ema_alpha, dtype=acc_dtype), torch.tensor(1 - ema_alpha, dtype=acc_dtype)
        acc = tensors[0].to(acc_dtype)
        for tensor in tensors[1:]:
            acc = tensor.to(acc_dtype) * a + acc * keep
        return acc.to(tensors[0].dtype)
    acc = torch.zeros(tensors[0].shape, dtype=acc_dtype)
    for tensor, weight in zip(tensors, weights):
        acc = acc + tensor.to(acc_dtype) * weight
    return acc.to(tensors[0].dtype)


