"""Plots of the PMA reproduction (matplotlib, PNG): the main curve, gains, ablations, PMA-init."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pma_report import CONFIG_TITLES, METHOD_ORDER, main_rows, merge_table, noise  # noqa: E402

COLORS = {"raw": "0.45", "SMA": "tab:blue", "EMA 0.1": "tab:cyan", "EMA 0.2": "tab:green", "WMA": "tab:purple",
          "annealed": "tab:orange", "merged start": "tab:blue", "raw start": "tab:orange"}
MARKERS = {"SMA": "o", "EMA 0.1": "v", "EMA 0.2": "^", "WMA": "D"}


def _title(name: str) -> str:
    return CONFIG_TITLES.get(name, name)


def make_all(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [main_plot(results, out / "main.png"), gains_plot(results, out / "gains.png"),
               ablation_nv_plot(results, out / "ablation_nv.png"),
               ablation_methods_plot(results, out / "ablation_methods.png"),
               pma_init_plot(results, out / "pma_init.png")]
    return written


def _save(fig, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main_plot(results: dict, path: Path) -> Path:
    s = results["scale"]
    names = list(results["configs"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.4 * len(names), 4.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results["configs"][name]
        tpi = r["tokens_per_iteration"] / 1e6
        curve = [(it, v) for it, v in r["trunk"]["val_curve"] if it >= s["points"][0] // 2]
        ax.plot([it * tpi for it, _ in curve], [v for _, v in curve], color=COLORS["raw"], lw=1.2,
                label="newest checkpoint (raw, constant LR)")
        rows = main_rows(results, name)
        for label in METHOD_ORDER:
            ax.plot([row["point"] * tpi for row in rows], [row[label] for row in rows], ls="none",
                    marker=MARKERS[label], ms=6, color=COLORS[label], label=f"{label} of last {s['main_n']}")
        ends = [(row["anneal_end"], row["sma_at_end"]) for row in rows if row["sma_at_end"] is not None]
        if ends:
            ax.plot([e * tpi for e, _ in ends], [v for _, v in ends], ls="none", marker="o", mfc="none", ms=7,
                    color=COLORS["SMA"], label="SMA where the annealing ends (equal tokens)")
        for i, row in enumerate(rows):
            fork = r["anneal"][str(row["point"])]
            xs = [row["point"]] + [it for it, _ in fork["val_curve"] if it > row["point"]]
            ys = [row["raw"]] + [v for it, v in fork["val_curve"] if it > row["point"]]
            ax.plot([x * tpi for x in xs], ys, ls="--", color=COLORS["annealed"], lw=1.2,
                    label="annealed from there" if i == 0 else None)
            ax.plot(xs[-1] * tpi, ys[-1], marker="s", color=COLORS["annealed"], ms=5)
        # Every merged point in range, the early ones that lag far behind included.
        values = [row["annealed"] for row in rows] + [row[l] for row in rows for l in (*METHOD_ORDER, "raw")]
        ax.set_ylim(min(values) - 0.04, max(values) + 0.04)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{_title(name)}: merged vs raw vs annealed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _style_delta_axes(ax, sigma: float, ticks: list[str], title: str, ylabel: str,
                      legend_size: int, band_label: str | None = None) -> None:
    """Axes of a bar chart of losses relative to the raw checkpoint: the +-2 sigma noise band,
    the zero line, one tick per group."""
    ax.axhspan(-2 * sigma, 2 * sigma, color="0.85", zorder=0, label=band_label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=legend_size)


def gains_plot(results: dict, path: Path) -> Path:
    s = results["scale"]
    names = list(results["configs"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.4 * len(names), 4.2), squeeze=False)
    series = [*METHOD_ORDER, "annealed"]
    width = 0.8 / len(series)
    for ax, name in zip(axes[0], names):
        r = results["configs"][name]
        rows = main_rows(results, name)
        sigma = noise(r, s["points"][0])
        for j, label in enumerate(series):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [row[label] - row["raw"] for row in rows], width, color=COLORS[label], label=label)
        ax.set_xlabel("iteration (comparison point)")
        _style_delta_axes(ax, sigma, [str(row["point"]) for row in rows],
                          f"{_title(name)}: loss vs the newest checkpoint (N={s['main_n']}, V={s['main_v']})",
                          "validation loss - raw (lower is better)", 8, band_label="+-2 sigma (checkpoint noise)")
    return _save(fig, path)


def _ablation_grid(results: dict, path: Path, points, series, ns, *, merged_key, color, label, title,
                   ylabel: str, panel_width: float) -> Path:
    """One panel per config and point: for each of ``series``, bars of merged - raw over N."""
    s = results["scale"]
    names = list(results["configs"])
    fig, axes = plt.subplots(len(names), len(points), figsize=(panel_width * len(points), 3.6 * len(names)),
                             squeeze=False)
    width = 0.8 / len(series)
    for row_axes, name in zip(axes, names):
        r = results["configs"][name]
        table = merge_table(r)
        sigma = noise(r, s["points"][0])
        for ax, p in zip(row_axes, points):
            raw = r["raw"].get(str(p))
            for j, item in enumerate(series):
                xs, ys = [], []
                for i, n in enumerate(ns):
                    x = table.get(merged_key(item, n, p))
                    if x is not None and raw is not None:
                        xs.append(i + (j - (len(series) - 1) / 2) * width)
                        ys.append(x - raw)
                ax.bar(xs, ys, width, color=color(j, item), label=label(item, r))
            _style_delta_axes(ax, sigma, [f"N={n}" for n in ns], title(name, p), ylabel, 7)
    return _save(fig, path)


def ablation_nv_plot(results: dict, path: Path) -> Path:
    s = results["scale"]
    vs = s["ablation_v"]
    cmap = plt.get_cmap("viridis")
    return _ablation_grid(
        results, path, s["ablation_points"], vs, s["ablation_n"],
        merged_key=lambda v, n, p: ("SMA", n, v, p),
        color=lambda j, v: cmap(j / max(1, len(vs) - 1) * 0.85),
        label=lambda v, r: f"V={v} it ({v * r['tokens_per_iteration'] / 1e3:.0f}k tok)",
        title=lambda name, p: f"{_title(name)}, iteration {p}", ylabel="SMA - raw", panel_width=4.6)


def ablation_methods_plot(results: dict, path: Path) -> Path:
    s = results["scale"]
    return _ablation_grid(
        results, path, s["method_points"], METHOD_ORDER, s["method_n"],
        merged_key=lambda method, n, p: (method, n, s["main_v"], p),
        color=lambda j, method: COLORS[method], label=lambda method, r: method,
        title=lambda name, p: f"{_title(name)}, iteration {p} (V={s['main_v']})", ylabel="merged - raw",
        panel_width=5.2)


def _smooth(values: list[float], beta: float = 0.8) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


def pma_init_plot(results: dict, path: Path) -> Path:
    s = results["scale"]
    names = list(results["configs"])
    points = [str(p) for p in s["pma_points"]]
    fig, axes = plt.subplots(2 * len(names), len(points), figsize=(6.0 * len(points), 4.0 * 2 * len(names)),
                             squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 2] * len(names)})
    for k, name in enumerate(names):
        r = results["configs"][name]
        table = merge_table(r)
        for c, p in enumerate(points):
            ax_loss, ax_grad = axes[2 * k][c], axes[2 * k + 1][c]
            starts = {"raw start": r["raw"].get(p),
                      "merged start": table.get(("SMA", s["main_n"], s["main_v"], int(p)))}
            for label, fork in (("raw start", r["anneal"][p]), ("merged start", r["pma_init"][p])):
                color = COLORS[label]
                its = [it for it, _ in fork["train_loss"]]
                ax_loss.plot(its, _smooth([v for _, v in fork["train_loss"]]), color=color, lw=0.8, alpha=0.5,
                             label=f"train loss (smoothed), {label}")
                xs = [int(p)] + [it for it, _ in fork["val_curve"] if it > int(p)]
                ys = [starts[label]] + [v for it, v in fork["val_curve"] if it > int(p)]
                ax_loss.plot(xs, ys, color=color, marker="o", ms=4, lw=1.5, label=f"validation, {label}")
                ax_grad.plot([it for it, _ in fork["grad_norm"]], [g for _, g in fork["grad_norm"]], color=color,
                             lw=0.9, label=label)
            ax_loss.set_title(f"{_title(name)}: annealing from iteration {p}")
            ax_loss.set_ylabel("loss")
            ax_loss.grid(alpha=0.3)
            ax_loss.legend(fontsize=7)
            ax_grad.set_ylabel("grad norm")
            ax_grad.set_xlabel("iteration")
            ax_grad.grid(alpha=0.3)
            ax_grad.legend(fontsize=7)
    return _save(fig, path, dpi=85)
