"""Legacy Megatron ``torch`` checkpoints: one ``torch.save`` file per model-parallel rank.

Layout (Megatron-LM ``get_checkpoint_name``, and ``pretrain`` with ``checkpoint.format: torch``)::

    <save>/latest_checkpointed_iteration.txt
    <save>/iter_0000100/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt
                                                              [distrib_optim.pt]

The ``_{pp:03d}`` part is there when PP > 1 and ``_{ep:03d}`` when EP > 1, so a name with two
numbers (``mp_rank_00_001``) is either a pipeline or an expert rank. Which one is decided from
the ``args`` stored in the files (Megatron-LM: an ``argparse.Namespace``; ``pretrain``: a dict)
-- ``pipeline_model_parallel_size`` / ``expert_model_parallel_size`` -- and a checkpoint whose
names are ambiguous and whose files store neither is refused.

``model_optim_rng.pt`` holds ``args``, ``iteration``, ``checkpoint_version``, ``model`` (or
``model0``, ``model1``, ... with virtual pipeline stages: the module ``state_dict``),
``optimizer``, ``opt_param_scheduler``, ``rng_state`` and more. Merged: the floating-point
tensors of ``model*``, and the fp32 master weights that mixed-precision optimizers keep
(``optimizer/.../fp32_from_fp16_params``; in ``distrib_optim.pt``, the distributed optimizer's
``param`` buffers) -- a resumed optimizer copies its master weights back into the model, so
they must be merged too. Everything else comes from the newest input; ``--model-only`` drops
``optimizer`` and ``opt_param_scheduler`` and the ``distrib_optim.pt`` files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from megatron_merge.errors import MergeError
from megatron_merge.formats.rank_files import (
    FileRule,
    RankFileCheckpoint,
    weight_tensors,
)
from megatron_merge.safe_load import common_safe_globals

MODEL_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM_FILE = "distrib_optim.pt"
RANK_DIR = re.compile(r"^mp_rank_(\d{2,})(?:_(\d{3,}))?(?:_(\d{3,}))?$")
_MODEL_KEY = re.compile(r"^model\d*$")
# Optimizer entries holding fp32 master copies of the model weights (megatron-core's
# Float16OptimizerWithFloat16Params; 'fp32_from_fp16' in older Megatron-LM).
MASTER_WEIGHT_KEYS = ("fp32_from_fp16_params", "fp32_from_fp16")
MODEL_ONLY_DROPPED = ("optimizer", "opt_param_scheduler")


def is_legacy_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like an ``iter_*`` directory of a legacy checkpoint."""
    path = Path(path)
    return path.is_dir() and any(
        child.is_dir() and RANK_DIR.match(child.name) for child in path.iterdir()
    )


def rank_dir_name(tp: int, pp: int, ep: int, pipeline: bool, expert: bool) -> str:
    """Megatron-LM's directory name for a rank (``get_checkpoint_name``)."""
    name = f"mp_rank_{tp:02d}"
    if pipeline:
        name += f"_{pp:03d}"
    if expert:
        name += f"_{ep:03d}"
    return name


# megatron-core enums that Megatron-LM's args and rerun-state hold (allowed by name; imported only
# when a file needs them: importing megatron-core takes seconds).
MEGATRON_ENUMS = frozenset(
    [f"megatron.core.transformer.enums.{n}" for n in
     ("ModelType", "LayerType", "AttnType", "AttnMaskType", "AttnBackend", "CudaGraphScope")]
    + [f"megatron.core.enums.{n}" for n in ("ModelType", "Fp8Recipe", "Fp4Recipe")]
    + [f"megatron.core.rerun_state_machine.{n}" for n in
       ("RerunDiagnostic", "RerunMode", "RerunState", "RerunValidationStatus")]
)


class LegacyCheckpoint(RankFileCheckpoint):
    """An ``iter_*`` directory of a legacy Megatron ``torch`` checkpoint."""

    format = "torch"
    on_demand_globals = MEGATRON_ENUMS
    _allowed: list | None = None

    def _list_files(self) -> list[str]:
        rank_dirs = sorted(
            child for child in self.path.iterdir() if child.is_dir() and RANK_DIR.match(child.name)
        )
        if not rank_dirs:
            raise MergeError(
                f"{self.path}: not a legacy Megatron checkpoint (no mp_rank_* directories)"
            )
        files = []
        for rank_dir in rank_dirs:
            if not (rank_dir / MODEL_FILE).is_file():
                raise MergeError(f"{rank_dir / MODEL_FILE}: missing")
            files += [
                f"{rank_dir.name}/{f.name}" for f in sorted(rank_dir.iterdir())
                if f.is_file() and f.name.endswith(".pt")
            ]
        self._rank_dirs = [d.name for d in rank_dirs]
        self._layout: dict | None = None
        return files

    def safe_globals(self) -> list:
        if LegacyCheckpoint._allowed is None:
            import torch.nn.functional as F

            # some Megatron-LM versions keep the activation function in args
            LegacyCheckpoint._allowed = [*common_safe_globals(), F.silu, F.gelu, F.relu]
        return LegacyCheckpoint._allowed

    # -- what is merged -------------------------------------------------------------------------

    def rule(self, name: str, obj: Any, model_only: bool) -> FileRule:
        where = self.path / name
        basename = name.rsplit("/", 1)[-1]
        # a chained optimizer (MoE: dense and expert parameters) saves a list, one dict each
        chained = basename == DISTRIB_OPTIM_FILE and isinstance(obj, list)
        if not (isinstance(obj, dict) or chained):
            raise MergeError(f"{where}: holds {type(obj).__name__}, expected a dict")
        if basename == DISTRIB_OPTIM_FILE:
            if model_only:
                return FileRule(drop_file=True, why_dropped="distributed optimizer state (--model-only)")
            return FileRule(merged=tuple(
                path for path, _ in weight_tensors(obj) if "param" in path
            ))
        if basename != MODEL_FILE:
            return FileRule()  # unknown per-rank file: copied from the newest input
        merged = [path for key in obj if isinstance(key, str) and _MODEL_KEY.match(key)
                  for path, _ in weight_tensors(obj[key], (key,))]
        if not any(isinstance(k, str) and _MODEL_KEY.match(k) for k in obj):
            raise MergeError(f"{where}: no 'model' entry (not a Megatron model_optim_rng.pt)")
        if model_only:
            return FileRule(merged=tuple(merged),
                            dropped_entries=tuple(k for k in MODEL_ONLY_DROPPED if k in obj))
        if "optimizer" in obj:
            merged += [path for path, _ in weight_tensors(obj["optimizer"], ("optimizer",))
                       if any(key in MASTER_WEIGHT_KEYS for key in path)]
        return FileRule(merged=tuple(merged))

    # -- what it is ------------------------------------------------------------------------------

    def _first_file(self) -> str:
        return f"{self._rank_dirs[0]}/{MODEL_FILE}"

    def args(self) -> dict:
        """The ``args`` of the first rank file as a dict ({} if it stores none)."""
        obj = self.load(self._first_file())
        args = obj.get("args") if isinstance(obj, dict) else None
        if args is None:
            return {}
        return dict(args) if isinstance(args, dict) else dict(vars(args))

    def iteration(self) -> int | None:
        try:
            obj = self.load(self._first_file())
        except MergeError:
            return None
        value = obj.get("iteration") if isinstance(obj, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def layout(self) -> dict:
        """TP/PP/EP sizes, from the stored args, checked against the rank directories."""
        if self._layout is None:
            self._layout = self._decide_layout()
        return self._layout

    def _decide_layout(self) -> dict:
        where = self.path / self._first_file()
        args = self.args()
        parsed = [RANK_DIR.match(name).groups() for name in self._rank_dirs]
        numbers = {sum(g is not None for g in groups) for groups in parsed}
        if len(numbers) != 1:
            raise MergeError(f"{self.path}: rank directories mix naming schemes: {self._rank_dirs}")
        n = numbers.pop()
        pp_size = args.get("pipeline_model_parallel_size")
        ep_size = args.get("expert_model_parallel_size")
        if n == 1:
            pipeline, expert = False, False
        elif n == 3:
            pipeline, expert = True, True
        else:  # mp_rank_XX_YYY: YYY is a pipeline rank (PP > 1) or an expert rank (EP > 1)
            if pp_size is None and ep_size is None:
                raise MergeError(
                    f"{where}: rank directories like {self._rank_dirs[-1]} are ambiguous (the second "
                    f"number is the pipeline rank when PP > 1, the expert rank when EP > 1) and this "
                    f"file's args hold neither pipeline_model_parallel_size nor "
                    f"expert_model_parallel_size to decide"
                )
            pipeline, expert = (pp_size or 1) > 1, (ep_size or 1) > 1
            if pipeline == expert:
                raise MergeError(
                    f"{where}: args say pipeline_model_parallel_size={pp_size}, "
                    f"expert_model_parallel_size={ep_size}, which does not match rank directory "
                    f"names like {self._rank_dirs[-1]} (exactly one of PP and EP must be > 1)"
                )
        columns = list(zip(*parsed))
        counts = [len({int(v) for v in col if v is not None}) for col in columns]
        tp = args.get("tensor_model_parallel_size") or counts[0]
        pp = (pp_size or counts[1]) if pipeline else 1
        ep = (ep_size or counts[-1]) if expert else 1
        if (pp_size is not None and pp_size != pp) or (ep_size is not None and ep_size != ep):
            raise MergeError(
                f"{where}: args say pipeline_model_parallel_size={pp_size}, "
                f"expert_model_parallel_size={ep_size}, but the rank directories are "
                f"{self._rank_dirs}"
            )
        expected = {
            rank_dir_name(t, p, e, pipeline, expert)
            for t in range(tp) for p in range(pp) for e in range(ep)
        }
        found = set(self._rank_dirs)
        if expected != found:
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            raise MergeError(
                f"{self.path}: rank directories do not match TP={tp} PP={pp} EP={ep} (from "
                f"{'the args in ' + str(where) if args else 'the directory names'}): "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"unexpected {unexpected}" if unexpected else "")
            )
        return {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "expert_model_parallel_size": ep,
        }
