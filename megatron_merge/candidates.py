"""Merge candidates: many merges of one run's snapshots, evaluated side by side.

A candidate is written ``METHOD:N[/everyK]`` (merge the newest N snapshots, taking every K-th
one: K x the merge interval V apart) or ``ema:ALPHA[/everyK]`` (a running EMA over every K-th
snapshot). Window candidates are served from the one snapshot store of the run's
:class:`~megatron_merge.online.PartitionMerger`, which then keeps the ``(N - 1) * K + 1`` newest
snapshots the largest candidate needs; each EMA candidate keeps its own fp32 accumulator per
owned parameter. Every rank merges only the parameters it owns, with the arithmetic of the
offline tool, so a candidate equals ``megatron-merge`` of the same checkpoints bit for bit.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_merge.accumulate import ema_update
from megatron_merge.weights import merge_weights

logger = logging.getLogger(__name__)

WINDOW_METHODS = ("sma", "wma", "wsm-linear", "wsm-minus-sqrt")
GRAMMAR = (f"METHOD:N[/everyK] (METHOD one of {', '.join(WINDOW_METHODS)}; N >= 2 snapshots; "
           "K >= 1: every K-th snapshot) or ema:ALPHA[/everyK] (ALPHA in (0, 1]), "
           "e.g. sma:3, wma:10, ema:0.2, sma:10/every2")
_WINDOW_RE = re.compile(r"^(%s):(\d+)(?:/every(\d+))?$" % "|".join(re.escape(m) for m in WINDOW_METHODS))
_EMA_RE = re.compile(r"^ema:([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?:/every(\d+))?$")
STATE_PREFIX = "merge_state.candidate"


@dataclass(frozen=True)
class Candidate:
    """One merge to evaluate: ``method`` over ``n`` snapshots ``every`` apart, or an EMA."""

    method: str
    n: int = 0  # window methods
    every: int = 1
    alpha: Optional[float] = None  # ema

    def __post_init__(self):
        if self.method == "ema":
            problem = None if self.alpha is not None and 0.0 < self.alpha <= 1.0 else "ALPHA must be in (0, 1]"
        elif self.method in WINDOW_METHODS:
            problem = None if self.n >= 2 else "N must be >= 2 (merging needs at least 2 snapshots)"
        else:
            problem = f"unknown method {self.method!r}"
        if problem is None and self.every < 1:
            problem = "K must be >= 1"
        if problem:
            raise ValueError(f"{problem}; expected {GRAMMAR}")

    @property
    def name(self) -> str:
        """The stable name: the canonical spelling of the candidate string."""
        head = f"ema:{self.alpha:g}" if self.method == "ema" else f"{self.method}:{self.n}"
        return head if self.every == 1 else f"{head}/every{self.every}"

    @property
    def slug(self) -> str:
        """The name as a path and checkpoint-key component."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)

    @property
    def span(self) -> int:
        """Snapshots of the store a window candidate reaches back over (0 for ema)."""
        return 0 if self.method == "ema" else (self.n - 1) * self.every + 1


def parse_candidate(text: str) -> Candidate:
    """``"sma:10/every2"`` -> Candidate; ValueError naming the grammar otherwise."""
    text = str(text).strip()
    window, ema = _WINDOW_RE.match(text), _EMA_RE.match(text)
    try:
        if window:
            method, n, every = window.groups()
            return Candidate(method, n=int(n), every=int(every or 1))
        if ema:
            alpha, every = ema.groups()
            return Candidate("ema", alpha=float(alpha), every=int(every or 1))
    except ValueError as err:
        raise ValueError(f"{text!r}: {err}") from None
    raise ValueError(f"{text!r} is not a merge candidate; expected {GRAMMAR}")


def parse_candidates(texts: Sequence[str]) -> list[Candidate]:
    """Parse a candidate list; ValueError (``[index]: message``) on a bad or repeated entry."""
    out, seen = [], set()
    for index, text in enumerate(texts):
        try:
            candidate = parse_candidate(text)
        except ValueError as err:
            raise ValueError(f"[{index}]: {err}") from None
        if candidate.name in seen:
            raise ValueError(f"[{index}]: {text!r} repeats candidate {candidate.name}")
        seen.add(candidate.name)
        out.append(candidate)
    return out


def store_needed(candidates: Sequence[Candidate]) -> int:
    """Snapshots the store must keep for these candidates."""
    return max((c.span for c in candidates), default=0)


@dataclass
class _EmaState:
    iterations: list  # snapshot iterations folded in, oldest first
    accumulators: dict  # owned parameter name -> fp32 tensor


class CandidateMerges:
    """The candidates of one run, merged from ``merger``'s store (attach with ``merger.candidates = ...``).

    ``merger.spec.store`` must be at least :func:`store_needed` of the candidates.
    """

    def __init__(self, merger, candidates: Sequence[Candidate]):
        if store_needed(candidates) > merger.spec.store_size:
            raise ValueError(f"the merger's store keeps {merger.spec.store_size} snapshots; the candidates need "
                             f"{store_needed(candidates)}")
        self.merger = merger
        self.candidates = list(candidates)
        self.ema = {c.name: _EmaState([], {}) for c in self.candidates if c.method == "ema"}

    # -- state over training ----------------------------------------------------------------

    def after_snapshot(self) -> None:
        """Fold the snapshot the merger just took into the EMA candidates that take it."""
        m = self.merger
        with torch.no_grad():
            for c in self.candidates:
                if c.method != "ema" or m.total_snapshots % c.every:
                    continue
                state = self.ema[c.name]
                state.iterations.append(m.iterations[-1])
                for slot in m.owned:
                    acc = state.accumulators.get(slot.name)
                    if acc is None:
                        acc = state.accumulators[slot.name] = m.new_buffer(slot.param, torch.float32)
                    value = slot.param.detach()
                    ema_update(acc, value.to(acc.device), c.alpha, first=len(state.iterations) == 1)

    def plan(self, candidate: Candidate) -> tuple[list[int], list[float]]:
        """The snapshot iterations the candidate merges now (oldest first) and their weights."""
        if candidate.method == "ema":
            iterations = list(self.ema[candidate.name].iterations)
            return iterations, _weights(len(iterations), "ema", alpha=candidate.alpha)
        positions = self._positions(candidate)
        stored = self.merger.iterations[len(self.merger.iterations) - self.merger.stored:]
        iterations = [stored[p] for p in positions]
        return iterations, _weights(len(iterations), candidate.method)

    def _positions(self, candidate: Candidate) -> list[int]:
        newest = self.merger.stored - 1
        if newest < 0:
            return []
        n = min(candidate.n, newest // candidate.every + 1)
        return [newest - candidate.every * j for j in reversed(range(n))]

    def merged_owned(self, candidate: Candidate) -> dict[str, torch.Tensor]:
        """The candidate's merged values of this rank's owned parameters."""
        m = self.merger
        if candidate.method == "ema":
            m.wait_for_copies()
            accumulators = self.ema[candidate.name].accumulators
            return {s.name: accumulators[s.name].to(s.param.dtype) for s in m.owned}
        _, weights = self.plan(candidate)
        return m.merge_stored(self._positions(candidate), weights)

    def ready(self) -> list[Candidate]:
        """The candidates with at least two snapshots to merge (the same on every rank): one
        snapshot alone is an earlier raw checkpoint, not a merge."""
        return [c for c in self.candidates if len(self.plan(c)[0]) >= 2]

    def evaluate(self, evaluate_model: Callable[[], Optional[float]]) -> dict:
        """Install each ready candidate in turn, call ``evaluate_model``, restore the raw weights.

        Collective. Returns the metrics: ``val_loss_candidates`` (name -> loss, None off the
        logging rank), ``candidate_merges`` (name -> n and first/last iteration) and the time.
        """
        began = time.perf_counter()
        losses, merges = {}, {}
        with self.merger.raw_weights_kept():
            for c in self.ready():
                iterations, _ = self.plan(c)
                self.merger.install(self.merged_owned(c))
                losses[c.name] = evaluate_model()
                merges[c.name] = {"n": len(iterations), "span": [iterations[0], iterations[-1]]}
        return {"val_loss_candidates": losses, "candidate_merges": merges,
                "eval_candidates_s": time.perf_counter() - began}

    # -- checkpointing ----------------------------------------------------------------------

    def common_state(self) -> dict:
        return {c.name: {"iterations": list(self.ema[c.name].iterations)} for c in self.candidates
                if c.method == "ema"}

    def sharded_state_dict(self, is_loading: bool, saved: Optional[dict]) -> dict:
        """The EMA accumulators, sharded like the parameters (window candidates live in the store)."""
        state = saved if is_loading else self.common_state()
        entries = {}
        for c in self.candidates:
            if c.method != "ema" or not (state or {}).get(c.name, {}).get("iterations"):
                continue
            for slot in self.merger.owned:
                data = (torch.empty(slot.param.shape, dtype=torch.float32) if is_loading
                        else self.ema[c.name].accumulators[slot.name])
                key = f"{STATE_PREFIX}.{c.slug}.{slot.sharded.key}"
                entries[f"candidate/{c.slug}/{slot.name}"] = self.merger.state_entry(slot, key, data)
        return entries

    def load_state(self, saved: Optional[dict], loaded: dict) -> None:
        """Restore the EMA candidates the checkpoint holds; the others start afresh."""
        saved = saved or {}
        for c in self.candidates:
            if c.method != "ema":
                continue
            iterations = saved.get(c.name, {}).get("iterations")
            if not iterations:
                logger.info("merge candidate %s: no saved state, starting afresh", c.name)
                continue
            m = self.merger
            self.ema[c.name] = _EmaState(list(iterations), {
                s.name: loaded[f"candidate/{c.slug}/{s.name}"].to(m.state_device(s.param)) for s in m.owned})

    def accumulator_count(self) -> int:
        """How many fp32 EMA accumulators (per owned parameter) the candidates keep."""
        return len(self.ema)

    def memory_bytes(self) -> int:
        """Bytes the EMA candidates' accumulators hold on this rank (the store is the merger's)."""
        return sum(t.numel() * t.element_size() for state in self.ema.values() for t in state.accumulators.values())



def _weights(n: int, method: str, alpha: Optional[float] = None) -> list[float]:
    """Merge weights of ``n`` snapshots; one snapshot is taken as it is, none gives none."""
    return [] if n == 0 else [1.0] if n == 1 else merge_weights(method, n, alpha=alpha)
