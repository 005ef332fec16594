"""The closing summary a run prints on its logging rank."""

from __future__ import annotations

from pretrain.candidate_report import candidate_table
from pretrain.config import RunConfig


def print_summary(cfg: RunConfig, summary) -> None:
    if summary.first_loss is None and not summary.evaluations:
        return  # not the logging rank
    lines = ["", "=" * 72, "run summary"]
    run = summary.iterations - summary.start_iteration
    span = f" (iterations {summary.start_iteration} -> {summary.iterations})" if summary.start_iteration else ""
    lines.append(f"  iterations        {run}{span} in {summary.seconds:.1f} s")
    if summary.first_loss is not None:
        lines.append(f"  training loss     {summary.first_loss:.4f} (first) -> {summary.last_loss:.4f} (last)")
    if summary.evaluations:
        merged = any("val_loss_merged" in r for r in summary.evaluations)
        lines.append("  validation        iteration  val_loss" +
                     ("  val_loss_merged (merged - raw)  merged snapshots" if merged else ""))
        for r in summary.evaluations:
            line = f"                    {r['iteration']:9d}  {r['val_loss']:.4f}"
            if "val_loss_merged" in r:
                delta = r["val_loss_merged"] - r["val_loss"]
                line += (f"  {r['val_loss_merged']:.4f} ({delta:+.4f})          "
                         f"{r['merge_method']} n={r['merge_n']}, iterations {r['merge_span'][0]}-{r['merge_span'][1]}")
            lines.append(line)
        lines += candidate_table(summary.evaluations)
    if getattr(summary, "stopped", None):
        lines.append(f"  stopped early     {summary.stopped} (the checkpoint below continues it)")
    if summary.checkpoint:
        lines.append(f"  checkpoint        {summary.checkpoint}")
    if getattr(summary, "merged_checkpoint", None):
        lines.append(f"  merged checkpoint {summary.merged_checkpoint}")
    if cfg.checkpoint.save:
        lines.append(f"  metrics           {cfg.logging.metrics_file or cfg.checkpoint.save + '/metrics.jsonl'}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)
