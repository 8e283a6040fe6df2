"""The figures a model card shows: metrics before/after purification, and the scan histogram.

Drawn with matplotlib's object API on an Agg canvas (no ``pyplot``), so writing a card never
switches the backend of a user's notebook or needs a display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..metrics import EvalResult

__all__ = [
    "METRICS_PLOT",
    "SCAN_PLOT",
    "PLOT_CAPTIONS",
    "plot_attack_metrics",
    "plot_scan_histogram",
    "histogram_values",
    "write_plots",
]

METRICS_PLOT = "purification_metrics.png"
SCAN_PLOT = "scan_histogram.png"
PLOT_CAPTIONS = {
    METRICS_PLOT: "Clean accuracy and attack success rate before and after purification",
    SCAN_PLOT: "Predictions of the base model under adversarial neuron noise (backdoor scan)",
}
_BEFORE, _AFTER, _TARGET = "#b0b0b0", "#1f77b4", "#d62728"


def _canvas(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _label_bars(ax, bars, values: Sequence[float | None]) -> None:
    for bar, value in zip(bars, values, strict=True):
        if value is None:
            continue
        ax.annotate(
            f"{value:.1f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )


def plot_attack_metrics(
    evaluations: Mapping[str, tuple[EvalResult, EvalResult]], path: str | os.PathLike
) -> Path:
    """Grouped bars of clean accuracy and ASR, before and after, one group per attack.

    ``evaluations`` maps an attack name to its ``(before, after)`` results; a pair without an
    ASR (clean evaluation only) shows in the accuracy panel and is left out of the ASR panel.
    """
    import numpy as np

    if not evaluations:
        raise ValueError("no evaluations to plot: pass at least one (before, after) pair")
    names = list(evaluations)
    x = np.arange(len(names))
    width = 0.38
    fig, (ax_acc, ax_asr) = _canvas(max(5.0, 1.6 * len(names) + 3.0), 3.2, ncols=2)
    panels = (
        (ax_acc, "Clean accuracy (%)", lambda r: r.acc),
        (ax_asr, "Attack success rate (%)", lambda r: r.asr),
    )
    for ax, title, metric in panels:
        for offset, idx, color, label in (
            (-width / 2, 0, _BEFORE, "before"),
            (width / 2, 1, _AFTER, "after"),
        ):
            values = [metric(evaluations[n][idx]) for n in names]
            shown = [100.0 * v if v is not None else None for v in values]
            bars = ax.bar(x + offset, [v or 0.0 for v in shown], width, color=color, label=label)
            _label_bars(ax, bars, shown)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylim(0, 125)
        ax.grid(axis="y", alpha=0.3)
    ax_acc.legend(fontsize=8, loc="upper right", ncols=2)
    out = Path(path)
    fig.savefig(out)
    return out


def histogram_values(histogram) -> list[float]:
    """A scan histogram (a list of per-class counts or shares, or a ``{class: count}`` mapping)
    as a list indexed by class."""
    if isinstance(histogram, Mapping):
        items = sorted((int(k), float(v)) for k, v in histogram.items())
        size = items[-1][0] + 1 if items else 0
        values = [0.0] * size
        for k, v in items:
            values[k] = v
        return values
    return [float(v) for v in histogram]


def plot_scan_histogram(
    scan: Mapping, path: str | os.PathLike, *, class_names: Sequence[str] | None = None
) -> Path:
    """Bars of the share of predictions per class under neuron noise, without and with the
    negative feature mask, the suspected target highlighted; the title gives the verdict.

    ``scan`` is a ``ScanReport.to_dict()``; it needs ``histogram_noisy``.
    """
    import numpy as np

    noisy = histogram_values(scan.get("histogram_noisy") or [])
    if not noisy:
        raise ValueError("the scan report has no histogram_noisy to plot")
    masked = histogram_values(scan.get("histogram_noisy_masked") or [])
    series = [("neuron noise", noisy)] + ([("noise + negative mask", masked)] if masked else [])
    k = max(len(v) for _, v in series)
    x = np.arange(k)
    width = 0.8 / len(series)
    fig, (ax,) = _canvas(max(5.0, 0.45 * k + 2.5), 3.2)
    target = scan.get("suspected_target")
    for i, (label, values) in enumerate(series):
        total = sum(values) or 1.0
        shares = [100.0 * v / total for v in values] + [0.0] * (k - len(values))
        bars = ax.bar(
            x + (i - (len(series) - 1) / 2) * width,
            shares,
            width,
            color=(_BEFORE, _AFTER)[i % 2],
            label=label,
        )
        if isinstance(target, int) and 0 <= target < k:
            bars[target].set_edgecolor(_TARGET)
            bars[target].set_linewidth(2.0)
    names = list(class_names) if class_names and len(class_names) == k else [str(c) for c in range(k)]
    rotate = max(len(n) for n in names) > 3
    ax.set_xticks(x, names, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    if isinstance(target, int) and 0 <= target < k:
        ax.get_xticklabels()[target].set_color(_TARGET)
    ax.set_ylabel("share of predictions (%)")
    verdict = scan.get("verdict", "?")
    score = scan.get("score")
    title = f"Backdoor scan: {verdict}" + (f" (score {score:.3f})" if isinstance(score, int | float) else "")
    if target is not None:
        title += f", suspected target {names[target] if 0 <= target < k else target}"
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 115)
    ax.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=(_BEFORE, _AFTER)[i % 2], label=label) for i, (label, _) in enumerate(series)]
    if isinstance(target, int) and 0 <= target < k:
        handles.append(Patch(facecolor="none", edgecolor=_TARGET, linewidth=2.0, label="suspected target"))
    ax.legend(handles=handles, fontsize=8, loc="upper right", ncols=len(handles))
    out = Path(path)
    fig.savefig(out)
    return out


def write_plots(
    directory: str | os.PathLike,
    *,
    evaluations: Mapping[str, tuple[EvalResult, EvalResult]] | None = None,
    scan_report: Mapping | None = None,
    class_names: Sequence[str] | None = None,
) -> list[str]:
    """Draw every figure the available results allow into ``directory``; return the file names."""
    directory = Path(directory)
    written = []
    if evaluations:
        plot_attack_metrics(evaluations, directory / METRICS_PLOT)
        written.append(METRICS_PLOT)
    if scan_report and scan_report.get("histogram_noisy"):
        plot_scan_histogram(scan_report, directory / SCAN_PLOT, class_names=class_names)
        written.append(SCAN_PLOT)
    return written
