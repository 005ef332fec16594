"""The closing summary a run prints on its logging rank."""

from __future__ import annotations

from pretrain.config import RunConfig


def print_summary(cfg: RunConfig, summary) -> None:
    if summary.first_loss is None and not summary.evaluations:
        return  # not the logging rank
    lines = ["", "=" * 72, "run summary"]
    lines.append(f"  iterations        {summary.iterations} in {summary.seconds:.1f} s")
    if summary.first_loss is not None:
        lines.append(f"  training loss     {summary.first_loss:.4f} (first) -> {summary.last_loss:.4f} (last)")
    if summary.evaluations:
        lines.append("  validation        iteration  val_loss")
        for record in summary.evaluations:
            lines.append(f"                    {record['iteration']:9d}  {record['val_loss']:.4f}")
    if summary.checkpoint:
        lines.append(f"  checkpoint        {summary.checkpoint}")
    if cfg.checkpoint.save:
        lines.append(f"  metrics           {cfg.logging.metrics_file or cfg.checkpoint.save + '/metrics.jsonl'}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)
