"""Which merge candidate wins: the table and the picture, from evaluation records.

An evaluation record holds ``iteration``, ``val_loss`` (the raw weights), optionally
``val_loss_merged`` (the primary merge) and ``val_loss_candidates`` (name -> loss). The noise
level is the standard deviation of consecutive differences of the raw validation loss: a
candidate that beats the raw weights by less than that is within checkpoint-to-checkpoint jitter.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

PRIMARY = "merge (primary)"


def noise_level(raw_losses: Sequence[float]) -> Optional[float]:
    """Std of consecutive differences of the raw validation loss; None with fewer than 3 values."""
    diffs = [b - a for a, b in zip(raw_losses, raw_losses[1:])]
    return statistics.stdev(diffs) if len(diffs) >= 2 else None


def candidate_losses(record: dict) -> dict[str, float]:
    """The merged losses of one evaluation record: the candidates' and the primary merge's."""
    losses = {name: loss for name, loss in (record.get("val_loss_candidates") or {}).items() if loss is not None}
    if record.get("val_loss_merged") is not None:
        losses[PRIMARY] = record["val_loss_merged"]
    return losses


def best_per_evaluation(records: Sequence[dict]) -> list[dict]:
    """Per evaluation with candidates: the best one, its loss and its margin over raw (raw - best)."""
    rows = []
    for r in records:
        losses = {k: v for k, v in candidate_losses(r).items() if k != PRIMARY}
        if not losses or r.get("val_loss") is None:
            continue
        best = min(losses, key=lambda name: (losses[name], name))
        rows.append({"iteration": r["iteration"], "val_loss": r["val_loss"], "best": best,
                     "best_loss": losses[best], "margin": r["val_loss"] - losses[best]})
    return rows


def records_noise(records: Sequence[dict]) -> Optional[float]:
    """The noise level of the records' raw losses."""
    return noise_level([r["val_loss"] for r in records if r.get("val_loss") is not None])


def candidate_table(records: Sequence[dict], indent: str = "  ", noise: Optional[float] = None) -> list[str]:
    """Lines of the table: best candidate per evaluation, its margin over raw, the noise level
    (``noise``, else that of the records)."""
    rows = best_per_evaluation(records)
    if not rows:
        return []
    noise = records_noise(records) if noise is None else noise
    width = max(12, *(len(r["best"]) for r in rows))
    lines = [f"{indent}merge candidates  iteration  raw val_loss  {'best candidate':<{width}}  val_loss  "
             "margin (raw - best)"]
    for r in rows:
        flag = "" if noise is None or abs(r["margin"]) > noise else "  (within noise)"
        lines.append(f"{indent}                  {r['iteration']:9d}  {r['val_loss']:12.4f}  {r['best']:<{width}}  "
                     f"{r['best_loss']:8.4f}  {r['margin']:+.4f}{flag}")
    lines.append(f"{indent}noise level       {'n/a (fewer than 3 evaluations)' if noise is None else f'{noise:.4f}'} "
                 "(std of consecutive raw val_loss differences)")
    return lines


def plot_candidates(records: Sequence[dict], path: Path, tokens_per_iteration: int,
                    title: str = "validation loss: raw weights and merge candidates",
                    noise: Optional[float] = None) -> Optional[Path]:
    """PNG of validation loss against tokens, raw and each candidate, with the noise band
    (``noise``, else that of the records) around raw; written atomically. Returns the path, or
    None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no %s", path)
        return None
    records = [r for r in records if r.get("val_loss") is not None]
    if not records:
        return None
    names = sorted({name for r in records for name in candidate_losses(r)})
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    tokens = [r["iteration"] * tokens_per_iteration for r in records]
    raw = [r["val_loss"] for r in records]
    ax.plot(tokens, raw, color="black", linewidth=2.2, marker="o", label="raw weights", zorder=3)
    noise = noise_level(raw) if noise is None else noise
    if noise is not None:
        ax.fill_between(tokens, [v - noise for v in raw], [v + noise for v in raw], color="grey", alpha=0.25,
                        label=f"raw ± noise ({noise:.3f})", zorder=1)
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for i, name in enumerate(names):
        points = [(t, candidate_losses(r)[name]) for t, r in zip(tokens, records) if name in candidate_losses(r)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1.3, color=colours(i),
                linestyle="--" if name == PRIMARY else "-", label=name, zorder=4 if name == PRIMARY else 2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    path = Path(path)
    partial = path.with_name(path.name + ".partial.png")
    fig.savefig(partial)
    plt.close(fig)
    partial.replace(path)
    return path
