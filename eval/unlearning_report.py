"""The ``unlearning`` report: every metric in one table (a row per metric, a column per adapter) and one figure (a
bar chart per metric, the retrained adapter's value marked), from :func:`mmerase.eval.unlearning.evaluate_unlearning`."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes

_SCORE_LABELS = {"loss": "loss", "min_k": "Min-{k}%", "min_k_pp": "Min-{k}%++", "zlib": "zlib"}
_SPLIT_LABELS = {"loss": "loss", "accuracy": "accuracy", "rouge_l": "ROUGE-L"}


def metric_rows(result: Mapping[str, Any]) -> list[tuple[str, dict[str, float | None]]]:
    """``[(metric label, {adapter: value})]`` for every metric some adapter has a value for."""
    adapters = result["adapters"]
    rows: list[tuple[str, dict[str, float | None]]] = []
    for s in result["splits"]:
        for m, label in _SPLIT_LABELS.items():
            rows.append((f"{s}: {label}", {n: a["splits"][s][m] for n, a in adapters.items()}))
    mia = result["mia"]
    k = f"{100 * mia['min_k']:g}"
    for kind, label in _SCORE_LABELS.items():
        rows.append((f"MIA AUC ({mia['member_split']} vs {mia['nonmember_split']}): {label.format(k=k)}",
                     {n: a["mia"][kind] for n, a in adapters.items()}))
    for s in result["splits"]:
        rows.append((f"KL(retrained ‖ adapter), {s}", {n: a["kl_retrained"][s] for n, a in adapters.items()}))
    fq = result["forget_quality"]["split"]
    rows.append((f"forget quality: KS p-value ({fq} losses vs retrained)",
                 {n: (a["forget_quality"] or {}).get("p_value") for n, a in adapters.items()}))
    return [(label, vals) for label, vals in rows if any(v is not None for v in vals.values())]


def render_summary(result: Mapping[str, Any], places: int = 4) -> str:
    """Markdown: what each metric is, the one table of all metrics, then the per-split detail with recoveries."""
    from .report import markdown_table
    from .unlearning import render_markdown

    ref = result["reference"]["retrained"]
    names = list(result["adapters"])
    header = ["metric", *[f"{n} (target)" if n == ref else n for n in names]]
    table = markdown_table(header, [[label, *[vals[n] for n in names]] for label, vals in metric_rows(result)],
                           places)
    mia = result["mia"]
    notes = [
        "# Unlearning evaluation", "",
        f"MIA AUC: ROC AUC of a member-high score, members = split '{mia['member_split']}', non-members = split "
        f"'{mia['nonmember_split']}' (0.5 = no membership signal); Min-K% and Min-K%++ average the lowest "
        f"{100 * mia['min_k']:g}% of the answer's token scores; zlib = −loss / zlib-compressed answer bytes "
        "(definitions: eval/mia.py).",
        "KL(retrained ‖ adapter): the retrained adapter's next-token distribution against this adapter's on the "
        "reference answer's tokens, averaged per sample, then over the split (nats).",
        "Forget quality: p-value of the two-sample KS test between this adapter's and the retrained adapter's "
        "per-sample losses on the forget split (high = indistinguishable from retraining).",
    ]
    if ref:
        notes.append(f"The retrained adapter '{ref}' is the target of every row (its KL is 0 and its KS p-value 1 "
                     "by construction).")
    detail = render_markdown(result, places).split("\n", 2)[2]  # its table without its title
    return "\n".join(notes) + "\n\n" + table + "\n## Per split, with recovery ratios\n\n" + detail


def plot_summary(result: Mapping[str, Any], path: str | Path) -> None:
    """One bar chart per metric (a bar per adapter), the retrained adapter's value drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metric_rows(result)
    ref = result["reference"]["retrained"]
    names = list(result["adapters"])
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    ncols = min(4, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    for ax, (label, vals) in zip(axes.flat, rows):
        shown = [n for n in names if vals[n] is not None]
        bars = ax.bar(range(len(shown)), [vals[n] for n in shown], color=[colors[n] for n in shown])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if ref is not None and vals.get(ref) is not None:
            ax.axhline(vals[ref], color="black", linestyle="--", linewidth=1)
        if label.startswith("MIA AUC"):
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.margins(y=0.18)
        ax.set_xticks(range(len(shown)), shown, fontsize=8, rotation=15)
        ax.set_title(label, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="grey", linestyle=":", label="AUC 0.5: no membership signal")]
    if ref is not None:
        handles.insert(0, Line2D([], [], color="black", linestyle="--", label=f"{ref}: the target"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
