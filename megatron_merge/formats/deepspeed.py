"""DeepSpeed checkpoints: one tag directory (``global_step100``) of per-rank ``torch.save`` files.

What ``DeepSpeedEngine.save_checkpoint(save_dir)`` writes into ``save_dir/<tag>/`` (and
``save_dir/latest`` names the newest tag)::

    mp_rank_{mp:02d}_model_states.pt                   module state_dict + engine state (ZeRO 0-2)
    zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt engine state, empty placeholders (ZeRO-3)
    [bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt   one DP rank's ZeRO optimizer
    layer_{idx:02d}-model_{mp:02d}-model_states.pt     a pipeline layer's state_dict (PipelineModule)
    [layer_{l}_]expert_{e}_mp_rank_{mp:02d}_model_states.pt     an MoE expert's state_dict
    expp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt     MoE optimizer state (no ZeRO)

Merged, file by file (nothing is gathered or converted; ``zero_to_fp32`` is not used):

* module weights: the floating-point tensors of ``module`` (and ``frozen_param_fragments``),
  and of layer and expert files;
* fp32 master weights, the flat partitions each DP rank's optimizer owns:
  ``optimizer_state_dict/single_partition_of_fp32_groups`` (ZeRO-1/2 and the bf16 optimizer),
  ``optimizer_state_dict/fp32_flat_groups`` (ZeRO-3), ``fp32_groups_flat`` / ``fp32_groups``
  (fp16 optimizers without ZeRO). They are merged with the same formula, so a resumed engine's
  master weights and module weights hold the same merged values. Padding merges to itself.

Everything else -- Adam moments, step counts, loss scaler, partition metadata, ``ds_config``,
client state -- comes from the newest input. The output is a tag directory: DeepSpeed loads it
with ``engine.load_checkpoint(out.parent, tag=out.name)`` at the DP/MP layout it was saved at
(merging does not reshard). With bf16/fp16 module weights, the merged module weights and the
merged fp32 master weights are each the merge of the inputs' own copies, so they agree to
within one rounding; the first optimizer step re-derives the module weights from the master. ``--model-only`` drops the ZeRO-1/2 optimizer
files (load with ``load_optimizer_states=False`` or ``load_module_only=True``); ZeRO-3 keeps its
weights only in those files, so ``--model-only`` is refused there.

Safety: the optimizer files pickle a few DeepSpeed classes besides tensors. They are allowed by
name -- ``LossScaler``, ``DynamicLossScaler`` (plain attribute bags), ``ZeroStageEnum`` (an int
enum) and ``fragment_address`` (a dataclass of two ints) -- and loaded with
``weights_only=True``, which rebuilds them from their stored attributes without running any
code from the file. Writing the merged file back pickles the same classes, so DeepSpeed itself
must be importable to merge its optimizer files (``pip install 'megatron-pma[deepspeed]'``).
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

MODEL_STATES = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
ZERO3_MODEL_STATES = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
ZERO_OPTIM_STATES = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_?optim_states\.pt$")
LAYER_STATES = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
EXPERT_STATES = re.compile(r"^(?:layer_(\d+)_)?expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
EXPERT_OPTIM_STATES = re.compile(r"^expp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
TAG_DIR = re.compile(r"^global_step(\d+)$")

# fp32 master weights inside optimizer state (ZeRO-1/2 and BF16_Optimizer, ZeRO-3,
# FP16_Optimizer, FP16_UnfusedOptimizer).
MASTER_WEIGHT_KEYS = ("single_partition_of_fp32_groups", "fp32_flat_groups", "fp32_groups_flat",
                      "fp32_groups")

# The DeepSpeed classes its checkpoint files pickle, by module.
DEEPSPEED_CLASSES = {
    "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler"),
    "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
    "deepspeed.utils.tensor_fragment": ("fragment_address",),
}


def looks_like_deepspeed(path: str | Path) -> bool:
    """Whether ``path`` holds DeepSpeed checkpoint files (a tag directory)."""
    path = Path(path)
    return path.is_dir() and any(
        MODEL_STATES.match(p.name) or ZERO3_MODEL_STATES.match(p.name)
        or ZERO_OPTIM_STATES.match(p.name) or LAYER_STATES.match(p.name)
        for p in path.iterdir()
    )


def _deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _is_master(path: tuple) -> bool:
    return any(isinstance(key, str) and key in MASTER_WEIGHT_KEYS for key in path)


class DeepSpeedCheckpoint(RankFileCheckpoint):
    """A DeepSpeed tag directory (``<save_dir>/global_step<N>``)."""

    format = "deepspeed"
    on_demand_globals = frozenset(f"{m}.{n}" for m, names in DEEPSPEED_CLASSES.items() for n in names)

    def _list_files(self) -> list[str]:
        names = sorted(p.name for p in self.path.iterdir() if p.is_file() and p.name.endswith(".pt"))
        if not names:
            if (self.path / "latest").is_file():
                tag = (self.path / "latest").read_text().strip()
                raise MergeError(
                    f"{self.path}: a DeepSpeed save directory; merge its tag directories "
                    f"(e.g. {self.path / tag}) or pick them with --last/--iterations"
                )
            raise MergeError(f"{self.path}: not a DeepSpeed checkpoint (no .pt files)")
        self._model_files = [n for n in names if MODEL_STATES.match(n) or ZERO3_MODEL_STATES.match(n)]
        if not self._model_files:
            raise MergeError(
                f"{self.path}: not a DeepSpeed checkpoint (no mp_rank_*_model_states.pt or "
                f"zero_pp_rank_*_model_states.pt)"
            )
        self._layout: dict | None = None
        self._states: Any = None
        return names

    def safe_globals(self) -> list:
        return common_safe_globals()

    def _import_global(self, err, path: Path) -> Any:
        if not _deepspeed_installed():
            raise MergeError(
                f"{path}: pickles DeepSpeed's {err.qualname}; install DeepSpeed to merge its "
                f"checkpoints (pip install 'megatron-pma[deepspeed]')"
            ) from None
        return super()._import_global(err, path)

    # -- what is merged -------------------------------------------------------------------------

    def rule(self, name: str, obj: Any, model_only: bool) -> FileRule:
        where = self.path / name
        if not isinstance(obj, dict):
            raise MergeError(f"{where}: holds {type(obj).__name__}, expected a dict")
        if MODEL_STATES.match(name) or ZERO3_MODEL_STATES.match(name):
            if "module" not in obj:
                raise MergeError(f"{where}: key 'module' is missing (not a DeepSpeed model-states file)")
            merged = []
            for key in ("module", "frozen_param_fragments"):
                if isinstance(obj.get(key), dict):
                    merged += [path for path, _ in weight_tensors(obj[key], (key,))]
            optimizer = obj.get("optimizer")
            if model_only:
                emptied = ("optimizer",) if optimizer is not None else ()
                return FileRule(merged=tuple(merged), emptied_entries=emptied)
            if optimizer is not None:  # no ZeRO: the optimizer lives here
                merged += [p for p, _ in weight_tensors(optimizer, ("optimizer",)) if _is_master(p)]
            return FileRule(merged=tuple(merged))
        if ZERO_OPTIM_STATES.match(name) or EXPERT_OPTIM_STATES.match(name):
            state = obj.get("optimizer_state_dict", obj.get("optimizer"))
            if state is None:
                raise MergeError(f"{where}: key 'optimizer_state_dict' is missing")
            if model_only:
                if self.zero_stage() == 3:
                    raise MergeError(
                        f"{where}: --model-only cannot drop ZeRO-3 optimizer files: they hold the "
                        f"only copy of the weights (fp32_flat_groups)"
                    )
                return FileRule(drop_file=True, why_dropped="optimizer state (--model-only)")
            key = "optimizer_state_dict" if "optimizer_state_dict" in obj else "optimizer"
            merged = tuple(p for p, _ in weight_tensors(state, (key,)) if _is_master(p))
            return FileRule(merged=merged, ranges=self._weight_ranges(name, key, state))
        if LAYER_STATES.match(name) or EXPERT_STATES.match(name):
            return FileRule(merged=tuple(path for path, _ in weight_tensors(obj)))
        return FileRule()  # a file DeepSpeed does not name this way: copied from the newest input

    def _weight_ranges(self, name: str, key: str, state: dict) -> dict:
        """Where the weights are in each flat fp32 partition (the rest is padding, which DeepSpeed
        allocates with ``torch.empty`` and may hold anything, NaN included)."""
        where = self.path / name
        ranges = {}
        groups = state.get("single_partition_of_fp32_groups")
        if isinstance(groups, list):  # ZeRO-1/2, bf16 optimizer: the parameter fragments it owns
            mappings = state.get("param_slice_mappings")
            paddings = state.get("group_paddings")
            for g, flat in enumerate(groups):
                path = (key, "single_partition_of_fp32_groups", g)
                if isinstance(mappings, list) and g < len(mappings):
                    spans = sorted((int(f.start), int(f.start) + int(f.numel)) for f in mappings[g].values())
                elif isinstance(paddings, list) and g < len(paddings):
                    spans = [(0, flat.numel() - int(paddings[g]))]
                else:
                    continue
                ranges[path] = _checked_spans(spans, flat.numel(), where, path)
        groups = state.get("fp32_flat_groups")
        if isinstance(groups, list):  # ZeRO-3: every parameter's partition, padded to equal size
            match = ZERO_OPTIM_STATES.match(name)
            if match is None:
                return ranges
            dp_rank, mp_rank = int(match.group(2)), int(match.group(3))
            world = state.get("partition_count")
            model_file = f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_model_states.pt"
            shapes = self.load(model_file).get("param_shapes") if model_file in self._files else None
            if not isinstance(world, int) or not isinstance(shapes, list):
                raise MergeError(
                    f"{where}: cannot locate the weights in fp32_flat_groups (needs partition_count "
                    f"here and param_shapes in {self.path / model_file})"
                )
            spans = _zero3_spans(shapes, [g.numel() for g in groups], dp_rank, world, where)
            for g, group_spans in enumerate(spans):
                path = (key, "fp32_flat_groups", g)
                ranges[path] = _checked_spans(group_spans, groups[g].numel(), where, path)
        return ranges

    # -- what it is ------------------------------------------------------------------------------

    def _model_states(self) -> dict:
        if self._states is not None:
            return self._states
        obj = self.load(self._model_files[0])
        self._states = obj
        if not isinstance(obj, dict):
            raise MergeError(f"{self.path / self._model_files[0]}: holds {type(obj).__name__}, expected a dict")
        return obj

    def zero_stage(self) -> int:
        if any(ZERO3_MODEL_STATES.match(n) for n in self._model_files):
            return 3
        config = self._model_states().get("ds_config") or {}
        stage = (config.get("zero_optimization") or {}).get("stage", 0) if isinstance(config, dict) else 0
        return int(stage)

    def iteration(self) -> int | None:
        try:
            value = self._model_states().get("global_steps")
        except MergeError:
            value = None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        match = TAG_DIR.match(self.path.name)
        return int(match.group(1)) if match else None

    def layout(self) -> dict:
        if self._layout is None:
            states = self._model_states()
            self._layout = {
                "zero_stage": self.zero_stage(),
                "dp_world_size": states.get("dp_world_size"),
                "mp_world_size": states.get("mp_world_size"),
            }
        return self._layout

    def check_complete(self) -> None:
        """Every rank file the stored world sizes call for is present: one model-states file per
        model-parallel rank (per rank at ZeRO-3) and, where the checkpoint has ZeRO optimizer
        files at all (``--model-only`` outputs have none), one per data- and model-parallel rank.
        Pipeline and expert layouts name their files otherwise and are not checked here."""
        if any(LAYER_STATES.match(n) or EXPERT_STATES.match(n) or EXPERT_OPTIM_STATES.match(n)
               for n in self._files):
            return
        states = self._model_states()
        dp, mp = states.get("dp_world_size"), states.get("mp_world_size")
        if not (isinstance(dp, int) and isinstance(mp, int) and dp > 0 and mp > 0):
            return
        where = self.path / self._model_files[0]
        zero3 = self.zero_stage() == 3
        expected = [f"zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt" for d in range(dp) for m in range(mp)] \
            if zero3 else [f"mp_rank_{m:02d}_model_states.pt" for m in range(mp)]
        optim = [n for n in self._files if ZERO_OPTIM_STATES.match(n)]
        if optim:
            prefix = "bf16_" if optim[0].startswith("bf16_") else ""
            expected += [f"{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"
                         for d in range(dp) for m in range(mp)]
        missing = [name for name in expected if name not in self._files]
        if missing:
            raise MergeError(
                f"{self.path / missing[0]}: missing ({len(missing)} rank file(s) missing); "
                f"{where} records dp_world_size={dp}, mp_world_size={mp}, so the checkpoint has "
                f"one such file per rank -- copy the complete checkpoint"
            )

    def check_matches(self, source: "RankFileCheckpoint") -> None:
        super().check_matches(source)
        # The flat fp32 partitions are laid out by parameter order and shape: the same file
        # names and partition sizes are not enough, the parameters must be the same too.
        for name in self._model_files:
            if name not in source.files():
                continue
            mine = self.load(name).get("param_shapes")
            theirs = source.load(name).get("param_shapes")
            if mine != theirs:
                raise MergeError(
                    f"{self.path / name}: key 'param_shapes' differs from {source.path / name} "
                    f"({_first_difference(mine, theirs)}); the checkpoints hold different models"
                )


def _first_difference(a, b) -> str:
    if not (isinstance(a, list) and isinstance(b, list)):
        return f"{type(a).__name__} vs {type(b).__name__}"
    if len(a) != len(b):
        return f"{len(a)} parameter groups vs {len(b)}"
    for group, (x, y) in enumerate(zip(a, b)):
        if list(x) != list(y):
            return f"group {group}: parameters {list(x)} vs {list(y)}"
        for key in x:
            if tuple(x[key]) != tuple(y[key]):
                return f"group {group}: {key} has shape {tuple(x[key])} vs {tuple(y[key])}"
    return "different content"


def _checked_spans(spans, numel: int, where, path) -> tuple[tuple[int, int], ...]:
    """Sorted, non-overlapping, inside the buffer; adjacent spans joined."""
    joined: list[list[int]] = []
    for start, stop in sorted(spans):
        if start < 0 or stop > numel or start > stop or (joined and start < joined[-1][1]):
            raise MergeError(
                f"{where}: key {'/'.join(map(str, path))!r}: parameter fragments {sorted(spans)} do "
                f"not fit a flat buffer of {numel} elements"
            )
        if joined and start == joined[-1][1]:
            joined[-1][1] = stop
        elif stop > start:
            joined.append([start, stop])
    return tuple((a, b) for a, b in joined)


def _zero3_spans(param_shapes: list, group_numels: list[int], rank: int, world: int, where) -> list[list]:
    """ZeRO-3's layout of one rank's fp32 partitions: parameters in ``param_shapes`` order, each
    taking ``ceil(numel / world)`` elements of which this rank's share of the parameter comes
    first (the last ranks' shares end in padding); groups concatenated. As ``zero_to_fp32``
    reads them."""
    bounds = [0]
    for n in group_numels:
        bounds.append(bounds[-1] + n)
    spans: list[list] = [[] for _ in group_numels]
    offset = 0
    for group in param_shapes:
        for shape in group.values():
            numel = 1
            for s in shape:
                numel *= int(s)
            per_rank = -(-numel // world)
            valid = max(0, min(per_rank, numel - rank * per_rank))
            start, stop = offset, offset + valid
            for g in range(len(group_numels)):  # split at group boundaries
                lo, hi = max(start, bounds[g]), min(stop, bounds[g + 1])
                if lo < hi:
                    spans[g].append((lo - bounds[g], hi - bounds[g]))
            offset += per_rank
    if offset != bounds[-1]:
        raise MergeError(
            f"{where}: fp32_flat_groups hold {bounds[-1]} elements, the parameters in param_shapes "
            f"account for {offset} at {world} partitions"
        )
    return spans
