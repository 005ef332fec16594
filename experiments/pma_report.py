"""The results page of the PMA reproduction: tables, plots, and a check of each of the paper's claims.

:func:`analyse` turns results.json into findings (one per claim and config: what was measured and
a verdict by a stated rule); :func:`write_page` renders the page. Text below the ``READING_MARKER``
line of an existing page is hand-written and kept when the page is regenerated.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

READING_MARKER = "<!-- hand-written reading below: kept when experiments/pma_reproduction.py regenerates this page -->"
CONFIG_TITLES = {"dense": "tiny dense", "moe": "tiny MoE"}
METHOD_ORDER = ("SMA", "EMA 0.1", "EMA 0.2", "WMA")


# ---------------------------------------------------------------------------------------------
# Reading the results


def noise(result: dict, first_point: int) -> float:
    """Checkpoint-to-checkpoint jitter of the raw validation loss in the constant phase.

    A robust standard deviation of successive differences of the trunk's evaluations from
    ``first_point`` on, divided by sqrt(2): how much the loss of "the newest checkpoint" moves
    from one evaluation to the next beyond the trend. Differences below ~2 sigma are within noise.
    """
    values = [v for it, v in result["trunk"]["val_curve"] if it >= first_point]
    diffs = [b - a for a, b in zip(values, values[1:])]
    if len(diffs) < 3:
        return float("nan")
    center = statistics.median(diffs)
    mad = statistics.median(abs(d - center) for d in diffs)
    return 1.4826 * mad / math.sqrt(2)


def merge_table(result: dict) -> dict:
    """(label, n, v, point) -> val_loss."""
    return {(m["label"], m["n"], m["v"], m["point"]): m["val_loss"] for m in result["merges"]}


def main_rows(results: dict, name: str) -> list[dict]:
    """Per comparison point: raw, each method at the main N and V, annealed, and derived gaps."""
    s, r = results["scale"], results["configs"][name]
    table = merge_table(r)
    rows = []
    for p in s["points"]:
        raw = r["raw"][str(p)]
        merged = {label: table.get((label, s["main_n"], s["main_v"], p)) for label in METHOD_ORDER}
        anneal = r["anneal"][str(p)]
        best_label = min((l for l in METHOD_ORDER if merged[l] is not None), key=lambda l: merged[l])
        gain_anneal = raw - anneal["val_loss"]
        gain_sma = raw - merged["SMA"]
        end = anneal["end_iteration"]
        rows.append({
            "point": p, "tokens_m": p * r["tokens_per_iteration"] / 1e6, "raw": raw, **merged,
            "annealed": anneal["val_loss"], "anneal_end": end, "best": best_label,
            "raw_at_end": r["raw"].get(str(end)), "sma_at_end": table.get(("SMA", s["main_n"], s["main_v"], end)),
            "sma_share_of_anneal_gain": gain_sma / gain_anneal if gain_anneal > 0 else float("nan"),
        })
    return rows


def _fmt(x, digits=4, signed=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _first_eval_after_start(curve: list, start: int):
    later = [(it, v) for it, v in curve if it > start]
    return later[0] if later else (None, None)


def analyse(results: dict) -> list[dict]:
    """One finding per (claim, config): ``{claim, config, measured, verdict}``; the rule is in ``rule``."""
    s = results["scale"]
    findings = []

    def add(claim, name, measured, verdict, rule):
        findings.append({"claim": claim, "config": name, "measured": measured, "verdict": verdict, "rule": rule})

    for name, r in results["configs"].items():
        sigma = noise(r, s["points"][0])
        rows = main_rows(results, name)
        table = merge_table(r)
        late_rows = rows[len(rows) // 2:]

        # 1. Merged beats the newest checkpoint.
        wins = [row for row in rows if row["SMA"] < row["raw"]]
        deltas = ", ".join(f"{row['point']}: {_fmt(row['SMA'] - row['raw'], 3, True)}" for row in rows)
        verdict = "holds" if len(wins) == len(rows) else "partly" if len(wins) >= len(rows) / 2 else "does not hold"
        if len(wins) < len(rows) and all(row["SMA"] < row["raw"] for row in late_rows):
            verdict = "partly"
        add("Merging (SMA of the last N) beats the newest constant-LR checkpoint", name,
            f"SMA better at {len(wins)}/{len(rows)} points; SMA - raw by iteration: {deltas}", verdict,
            "holds if better at every point, partly if at half of them or at every point of the later half")

        # 2. Merging roughly matches annealing.
        shares = [row["sma_share_of_anneal_gain"] for row in rows if not math.isnan(row["sma_share_of_anneal_gain"])]
        best_minus_anneal = [row[row["best"]] - row["annealed"] for row in rows]
        med = statistics.median(shares) if shares else float("nan")
        close = sum(1 for d in best_minus_anneal if d <= 2 * sigma)
        verdict = ("holds" if close == len(rows) else "partly" if (med >= 0.3 or close > 0) else "does not hold")
        same_tokens = [(row["anneal_end"], row["sma_at_end"] - row["annealed"]) for row in rows
                       if row["sma_at_end"] is not None]
        add("Merging constant-LR checkpoints roughly matches the annealed model", name,
            f"SMA recovers {100 * med:.0f}% (median) of the raw->annealed gain; best merge at P - annealed from P: "
            + ", ".join(f"{row['point']}: {_fmt(d, 3, True)}" for row, d in zip(rows, best_minus_anneal))
            + ("; at equal tokens, SMA - annealed: " + ", ".join(f"{it}: {_fmt(d, 3, True)}" for it, d in same_tokens)
               if same_tokens else "")
            + f" (noise sigma {sigma:.4f})", verdict,
            "holds if the best merge is within 2 sigma of the annealed loss at every point; partly if at some "
            "point or if SMA recovers >= 30% of the annealing gain (median)")

        # 3. Merged loss as the cheap prediction of the annealed loss.
        gap_raw = statistics.mean(abs(row["annealed"] - row["raw"]) for row in rows)
        gap_sma = statistics.mean(abs(row["annealed"] - row["SMA"]) for row in rows)
        closer = sum(1 for row in rows if abs(row["annealed"] - row["SMA"]) < abs(row["annealed"] - row["raw"]))
        verdict = "holds" if closer == len(rows) else "partly" if closer > 0 else "does not hold"
        add("The merged model predicts annealed quality better than the newest checkpoint", name,
            f"mean |annealed - SMA| = {gap_sma:.4f} vs |annealed - raw| = {gap_raw:.4f}; SMA closer at "
            f"{closer}/{len(rows)} points", verdict, "holds if SMA is closer to the annealed loss at every point")

        # 4/5. Methods early and late.
        for which, point in (("early", s["method_points"][0]), ("late", s["method_points"][-1])):
            vals = {l: table.get((l, s["main_n"], s["main_v"], point)) for l in METHOD_ORDER}
            vals = {l: v for l, v in vals.items() if v is not None}
            if len(vals) < 4:
                continue
            ranking = sorted(vals, key=vals.get)
            spread = max(vals.values()) - min(vals.values())
            text = (f"iteration {point}, N={s['main_n']}: " + " < ".join(f"{l} {vals[l]:.4f}" for l in ranking)
                    + f"; spread {spread:.4f} (sigma {sigma:.4f})")
            if which == "early":
                wma_best, ema_order = ranking[0] == "WMA", vals["EMA 0.2"] < vals["EMA 0.1"]
                verdict = "holds" if wma_best and ema_order else "partly" if (wma_best or ema_order) else "does not hold"
                add("Early in training WMA is best and EMA 0.2 beats EMA 0.1", name, text, verdict,
                    "holds if both; partly if one of the two")
            else:
                verdict = "holds" if spread <= 2 * sigma else "does not hold"
                add("Late in training the methods are within noise", name, text, verdict,
                    "holds if max - min over the four methods <= 2 sigma")

        # 6. More N helps late.
        late = s["ablation_points"][-1]
        by_n = {n: table.get(("SMA", n, s["main_v"], late)) for n in s["ablation_n"]}
        by_n = {n: v for n, v in by_n.items() if v is not None}
        ns = sorted(by_n)
        if len(ns) >= 2:
            monotone = all(by_n[b] <= by_n[a] + sigma for a, b in zip(ns, ns[1:]))
            best_n = min(by_n, key=by_n.get)
            verdict = "holds" if monotone and best_n == ns[-1] else "partly" if best_n != ns[0] else "does not hold"
            add("More checkpoints (larger N) help late in training", name,
                f"iteration {late}, V={s['main_v']}: " + ", ".join(f"N={n} {by_n[n]:.4f}" for n in ns)
                + f"; best N={best_n}", verdict,
                "holds if the loss falls (within sigma) with N and the largest N is best; partly if the best N "
                "is not the smallest")

        # 7. Too large a V early hurts.
        early = s["ablation_points"][0]
        for n in sorted(s["ablation_n"]):
            by_v = {v: table.get(("SMA", n, v, early)) for v in s["ablation_v"]}
            by_v = {v: x for v, x in by_v.items() if x is not None}
            if len(by_v) == len(s["ablation_v"]):
                break
        vs = sorted(by_v)
        if len(vs) >= 2:
            rising = all(by_v[b] > by_v[a] for a, b in zip(vs, vs[1:]))
            verdict = "holds" if rising else "partly" if by_v[vs[-1]] > by_v[vs[0]] else "does not hold"
            late_by_v = {v: table.get(("SMA", n, v, late)) for v in s["ablation_v"]}
            late_text = ", ".join(f"V={v} {x:.4f}" for v, x in late_by_v.items() if x is not None)
            add("Too large an interval V early in training hurts", name,
                f"iteration {early}, N={n}: " + ", ".join(f"V={v} {by_v[v]:.4f}" for v in vs)
                + f" (late, iteration {late}: {late_text})", verdict,
                "holds if the early loss rises with V; partly if the largest V is worse than the smallest")

        # 8-10. PMA-init.
        early_better, final_diffs, grad = 0, [], []
        details = []
        for p, merged in r["pma_init"].items():
            raw_fork = r["anneal"][p]
            it_m, v_m = _first_eval_after_start(merged["val_curve"], int(p))
            it_r, v_r = _first_eval_after_start(raw_fork["val_curve"], int(p))
            if v_m is not None and v_r is not None:
                early_better += v_m < v_r
                details.append(f"{p}: after {it_m - int(p)} iterations {v_m:.4f} vs {v_r:.4f}")
            final_diffs.append((p, merged["val_loss"] - raw_fork["val_loss"]))
            window = max(1, merged["decay_iters"] // 5)
            g_m = [g for it, g in merged["grad_norm"] if g is not None and it <= int(p) + window]
            g_r = [g for it, g in raw_fork["grad_norm"] if g is not None and it <= int(p) + window]
            if g_m and g_r:
                grad.append((p, statistics.mean(g_m), statistics.mean(g_r), max(g_m), max(g_r)))
        n_pma = len(r["pma_init"])
        if n_pma:
            verdict = "holds" if early_better == n_pma else "partly" if early_better else "does not hold"
            add("PMA-init: annealing from the merged weights has lower loss early on", name,
                f"validation loss from merged vs from raw, {'; '.join(details)}", verdict,
                "holds if lower at the first evaluation of every fork")
            worse = [int(p) for p, d in final_diffs if d > 2 * sigma]
            better = [d for _, d in final_diffs if d < -2 * sigma]
            later = [int(p) for p, _ in final_diffs][len(final_diffs) // 2:]
            verdict = "holds" if not worse else "partly" if not set(worse) & set(later) else "does not hold"
            add("PMA-init: parity or small gains at the end", name,
                "final validation loss, merged - raw start: "
                + ", ".join(f"{p}: {_fmt(d, 4, True)}" for p, d in final_diffs)
                + f" (sigma {sigma:.4f}; {len(better)} clear gain(s))", verdict,
                "holds unless a fork from the merged weights ends more than 2 sigma worse; partly if only forks "
                "from the earlier half of the points do")
            if grad:
                smoother = sum(1 for _, mm, mr, xm, xr in grad if mm <= mr and xm <= xr)
                verdict = "holds" if smoother == len(grad) else "partly" if smoother else "does not hold"
                add("PMA-init: smoother gradient norm early in the new phase", name,
                    "grad norm over the first 20% of the decay, merged vs raw start (mean / max): "
                    + "; ".join(f"{p}: {mm:.3f}/{xm:.3f} vs {mr:.3f}/{xr:.3f}" for p, mm, mr, xm, xr in grad),
                    verdict, "holds if mean and max are not higher at every point")
    return findings


# ---------------------------------------------------------------------------------------------
# The page


def _rel(target: Path, doc: Path) -> str:
    return os.path.relpath(target, doc.parent).replace(os.sep, "/")


def _hms(seconds) -> str:
    if seconds is None:
        return "reused"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s"


def write_page(results: dict, results_dir: Path, doc: Path) -> None:
    s = results["scale"]
    names = list(results["configs"])
    findings = results.get("findings") or analyse(results)
    m = results["machine"]
    img = lambda f: _rel(results_dir / f, doc)  # noqa: E731
    first = results["configs"][names[0]]
    tpi = first["tokens_per_iteration"]
    out = []
    w = out.append

    w("# PMA at small scale: merged vs raw vs annealed\n")
    w(f"Generated by `{results['command']}` ({s['name']} scale) on {results['started']}; "
      f"wall time {_hms(results['wall_time_s'])}. Numbers: [`{_rel(results_dir / 'results.json', doc)}`]"
      f"({_rel(results_dir / 'results.json', doc)}). Paper: [Model Merging in Pre-training of Large Language "
      "Models](https://arxiv.org/abs/2505.12082) (PMA).\n")
    w(f"![Validation loss along the constant-LR phase, merged and annealed]({img('main.png')})\n")
    w("*Grey: the newest checkpoint (raw) along the constant-LR trunk. Markers at each comparison point: "
      f"merges of the last N={s['main_n']} checkpoints V={s['main_v']} iterations apart. Dashed: runs forked "
      "there and annealed (linear decay to min_lr); the square is where the decay ends, the hollow circle the SMA "
      "of the trunk at that iteration (equal tokens).*\n")

    w("## Which findings hold at this scale\n")
    w("Verdicts follow the stated rule from the measured numbers; sigma is the checkpoint-to-checkpoint jitter of "
      "the raw validation loss in the constant phase (robust std of successive differences / sqrt 2).\n")
    claims = list(dict.fromkeys(f["claim"] for f in findings))
    w("| claim (paper) | " + " | ".join(CONFIG_TITLES.get(n, n) for n in names) + " |")
    w("|---|" + "---|" * len(names))
    for claim in claims:
        cells = []
        for n in names:
            f = next((f for f in findings if f["claim"] == claim and f["config"] == n), None)
            cells.append("n/a" if f is None else f"**{f['verdict']}**: {f['measured']}")
        w(f"| {claim} | " + " | ".join(cells) + " |")
    w("")
    w("<details><summary>rules</summary>\n")
    for claim in claims:
        rule = next(f["rule"] for f in findings if f["claim"] == claim)
        w(f"- *{claim}*: {rule}.")
    w("\n</details>\n")

    w("## Setup\n")
    w(f"- Configs: {', '.join('`' + results['configs'][n]['config'] + '`' for n in names)} unchanged except the "
      f"schedule and the lengths below; 2 processes (gloo), the embedded corpus (byte tokenizer), "
      f"{tpi} tokens per iteration (16 x 128). Peak LR {first['lr']}, min LR {first['min_lr']}.")
    w(f"- Trunk: {s['warmup_iters']} warmup iterations, then a constant LR (`scheduler.style=constant`) for "
      f"{s['trunk_iters']} iterations ({s['trunk_iters'] * tpi / 1e6:.2f}M tokens); a checkpoint every "
      f"{s['save_every']} iterations (V_min = {s['save_every'] * tpi / 1e3:.1f}k tokens), an evaluation every "
      f"{s['trunk_eval_every']}.")
    w(f"- Merges: `megatron_merge.offline.merge_checkpoints` over the trunk's checkpoints (model weights only), "
      f"the newest input being the checkpoint at the comparison point; only checkpoints after warmup are merged "
      f"(combinations reaching back further are left out, shown as n/a). Main comparison: N={s['main_n']}, "
      f"V={s['main_v']} iterations, at iterations {', '.join(map(str, s['points']))}.")
    w(f"- Annealing: a fork at each point continues the trunk exactly (`checkpoint.init_from=<trunk>/iter_P`, "
      f"`init_keep_iteration=true`, `init_optimizer=checkpoint`: same Adam state, same data position) with a "
      f"linear decay to min LR over D = {s['decay_share']:g} x P iterations (`scheduler.style=wsd`, "
      f"`wsd_decay_iters=D`, `decay_iters=train_iters=P+D`): the decay is {100 * s['decay_share'] / (1 + s['decay_share']):.0f}% "
      "of the annealed run's tokens, as in a WSD schedule. The annealed model has seen D more iterations of data "
      "than the merged one.")
    w(f"- PMA-init: the same decay from the SMA merge at P (merged with the newest input's optimizer state) instead "
      f"of the raw checkpoint at P, at iterations {', '.join(map(str, s['pma_points']))}.")
    w(f"- Evaluation: `pretrain.evaluate`, the trunk's fixed validation batches ({s['eval_iters']} x 16 sequences "
      f"of 128 tokens = {s['eval_iters'] * tpi / 1e3:.0f}k tokens); equal to the val_loss training logs at the same "
      "checkpoint (checked below). One seed: differences of the order of sigma are not meaningful.")
    w(f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; Python {m['python']}, "
      f"torch {m['torch']}, megatron-core {m['megatron_core']}, no GPU. Load average before/after: "
      f"{', '.join(f'{x:.1f}' for x in results['load_average_before'])} / "
      f"{', '.join(f'{x:.1f}' for x in results['load_average_after'])}"
      + (f"; 1-minute load after each launch: mean {statistics.mean(results['load_average_samples']):.1f}, "
         f"max {max(results['load_average_samples']):.1f}" if results.get("load_average_samples") else "")
      + " (2 cores: a load above 2 means other jobs shared them and slowed every stage).")
    timing_rows = []
    for n in names:
        r = results["configs"][n]
        t = r["timings_s"]
        timing_rows.append(f"| {CONFIG_TITLES.get(n, n)} | {_hms(t.get('trunk'))} | {_hms(t.get('merges'))} | "
                           f"{_hms(t.get('evaluate'))} | {_hms(t.get('anneal'))} | {_hms(t.get('pma_init'))} | "
                           f"{1000 * (r['trunk']['median_iteration_s'] or 0):.0f} ms |")
    w("\n| config | trunk | merges | evaluation | annealing forks | PMA-init forks | median iteration |")
    w("|---|---|---|---|---|---|---|")
    out.extend(timing_rows)
    w("")

    for n in names:
        r = results["configs"][n]
        title = CONFIG_TITLES.get(n, n)
        sigma = noise(r, s["points"][0])
        w(f"## {title}: merged vs raw vs annealed\n")
        w(f"Validation loss at each point P of the constant phase: the raw checkpoint and the merges of the last "
          f"N={s['main_n']} checkpoints V={s['main_v']} iterations apart; then, at P+D where the run annealed from P "
          f"ends, the raw and SMA trunk checkpoints at equal tokens (n/a beyond the trunk) and the annealed model. "
          f"SMA share = (raw - SMA) / (raw - annealed). Noise sigma = {sigma:.4f}.\n")
        w("| P | tokens | raw | SMA | EMA 0.1 | EMA 0.2 | WMA | best merge - raw | P+D | raw at P+D | "
          "SMA at P+D | annealed at P+D | SMA share of the annealing gain |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in main_rows(results, n):
            cells = [_fmt(row[l]) if row[l] != row[row["best"]] else f"**{_fmt(row[l])}**" for l in METHOD_ORDER]
            w(f"| {row['point']} | {row['tokens_m']:.2f}M | {_fmt(row['raw'])} | " + " | ".join(cells)
              + f" | {_fmt(row[row['best']] - row['raw'], 4, True)} | {row['anneal_end']} | {_fmt(row['raw_at_end'])} | "
              f"{_fmt(row['sma_at_end'])} | **{_fmt(row['annealed'])}** | "
              f"{_fmt(100 * row['sma_share_of_anneal_gain'], 0)}% |")
        checked = [(p, r["raw"][p], r["raw_logged_by_training"][p]) for p in r["raw"]]
        worst = max(abs(a - b) for _, a, b in checked if b is not None)
        w(f"\n`pretrain.evaluate` vs the val_loss the trunk logged at the same checkpoints: largest difference "
          f"{worst:.2e}.\n")
    w(f"![Loss relative to the newest checkpoint]({img('gains.png')})\n")
    w("*Validation loss minus the raw checkpoint's at each point (below zero = better); the band is +-2 sigma.*\n")

    w("## Ablation: N and V (SMA)\n")
    for n in names:
        r = results["configs"][n]
        table = merge_table(r)
        w(f"**{CONFIG_TITLES.get(n, n)}**, SMA minus raw at the same point (V in iterations; "
          f"1 iteration = {tpi} tokens):\n")
        w("| iteration | raw | " + " | ".join(f"N={nn}" for nn in s["ablation_n"]) + " |")
        w("|---|---|" + "---|" * len(s["ablation_n"]))
        for p in s["ablation_points"]:
            raw = r["raw"].get(str(p))
            for v in s["ablation_v"]:
                cells = []
                for nn in s["ablation_n"]:
                    x = table.get(("SMA", nn, v, p))
                    cells.append("n/a" if x is None or raw is None else _fmt(x - raw, 4, True))
                w(f"| {p}, V={v} | {_fmt(raw)} | " + " | ".join(cells) + " |")
        best = []
        for p in s["ablation_points"]:
            combos = [(x, nn, v) for (label, nn, v, q), x in table.items()
                      if label == "SMA" and q == p and nn in s["ablation_n"] and v in s["ablation_v"]]
            if combos:
                x, nn, v = min(combos)
                best.append(f"{p}: N={nn}, V={v} (window {(nn - 1) * v} iterations)")
        w("\nBest combination: " + "; ".join(best) + ".")
        w("")
    w(f"![N x V ablation]({img('ablation_nv.png')})\n")

    w("## Ablation: SMA vs EMA vs WMA\n")
    for n in names:
        r = results["configs"][n]
        table = merge_table(r)
        w(f"**{CONFIG_TITLES.get(n, n)}**, merged minus raw (V={s['main_v']}):\n")
        w("| iteration | N | " + " | ".join(METHOD_ORDER) + " |")
        w("|---|---|" + "---|" * len(METHOD_ORDER))
        for p in s["method_points"]:
            raw = r["raw"].get(str(p))
            for nn in s["method_n"]:
                vals = [table.get((l, nn, s["main_v"], p)) for l in METHOD_ORDER]
                if all(v is None for v in vals):
                    continue
                best = min(v for v in vals if v is not None)
                cells = ["n/a" if v is None else (f"**{_fmt(v - raw, 4, True)}**" if v == best else _fmt(v - raw, 4, True))
                         for v in vals]
                w(f"| {p} | {nn} | " + " | ".join(cells) + " |")
        w("")
    w(f"![Merge methods]({img('ablation_methods.png')})\n")

    w("## PMA-init: annealing from the merged checkpoint vs from the newest one\n")
    for n in names:
        r = results["configs"][n]
        w(f"**{CONFIG_TITLES.get(n, n)}**: validation loss during the decay (start = the checkpoint it starts from).\n")
        w("| from iteration | start: raw / merged | first evaluation (iteration): raw / merged | final: raw / merged "
          "| mean grad norm, first 20%: raw / merged |")
        w("|---|---|---|---|---|")
        table = merge_table(r)
        for p, merged in r["pma_init"].items():
            raw_fork = r["anneal"][p]
            start_raw = r["raw"].get(p)
            start_merged = table.get(("SMA", s["main_n"], s["main_v"], int(p)))
            it, v_r = _first_eval_after_start(raw_fork["val_curve"], int(p))
            _, v_m = _first_eval_after_start(merged["val_curve"], int(p))
            window = int(p) + max(1, merged["decay_iters"] // 5)
            g_r = [g for i, g in raw_fork["grad_norm"] if g is not None and i <= window]
            g_m = [g for i, g in merged["grad_norm"] if g is not None and i <= window]
            w(f"| {p} | {_fmt(start_raw)} / {_fmt(start_merged)} | ({it}) {_fmt(v_r)} / {_fmt(v_m)} | "
              f"{_fmt(raw_fork['val_loss'])} / {_fmt(merged['val_loss'])} | "
              f"{_fmt(statistics.mean(g_r) if g_r else None, 3)} / {_fmt(statistics.mean(g_m) if g_m else None, 3)} |")
        w("")
    w(f"![PMA-init]({img('pma_init.png')})\n")

    w("## Commands\n")
    w("Everything the script launched, in order (from the repository root). Merges ran in-process through "
      "`megatron_merge.offline.merge_checkpoints`, the library behind `megatron-merge`; the equivalent "
      "`megatron-merge` command of each is in `<work>/<config>/merged/merges.log`.\n")
    w("<details><summary>" + f"{len(results['commands'])} commands</summary>\n")
    w("```bash")
    out.extend(results["commands"])
    w("```\n</details>\n")

    reading = "\n## Reading\n\n(not written yet)\n"
    if doc.is_file():
        text = doc.read_text()
        if READING_MARKER in text:
            reading = text.split(READING_MARKER, 1)[1]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(out) + "\n" + READING_MARKER + reading)
