"""Measure a candidate all-to-all reading for blended triggers: one whole-image pattern blended in.

The scan's window reading (``window_spread.py``, the BatchNorm spread stage) finds all-to-all
*patch* triggers, but a blended trigger covers the whole image, so no window carries it: the
eighth held-out BatchNorm set (blended all-to-all) was found once in seven (``DETECTION.md``).
The L2 whole-image perturbation the LayerNorm spread stage uses finds a sink class of clean
BatchNorm models instead. This reading keeps the spread score and changes the shape to the
trigger's: one pattern ``p`` blended into every image, ``x' = (1 - alpha) x + alpha p``, fitted
(Adam on the negative cross-entropy of the true labels, ``p`` clamped to [0, 1]) to push images
off their labels, and scored on held-out images by the mean over classes of the share moved to
a class other than the most common destination, as the window reading scores a window. An
all-to-one blend sends every class to its target and scores low; a clean model's blend pushes
most images to one or two sink classes. One reading per ``--alphas`` value, each recorded with
where each class went (an all-to-all map ``y -> y + 1`` shows there).

Measured, not a scan stage: the scan's spread stage runs one shape per family, and this would
have to run beside the window on BatchNorm models.

Example::

    python benchmarks/blend_spread.py --alphas 0.05,0.1,0.2 \\
        --out benchmarks/results/blend-spread/batchnorm-a.json 'benchmarks/cache/calibrate_scan/test_resnet-*'
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from window_spread import describe, load_split, measure_all, next_class_count

from timm_purify.detection.ban import norm_family
from timm_purify.detection.reach import (
    class_destinations,
    confusion_matrix,
    fit_shared_pattern,
    pattern_spread,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "models", nargs="+", help="model folders written by build_backdoored_model, or quoted globs"
    )
    p.add_argument("--alphas", default="0.1", help="comma-separated blend weights in (0, 1)")
    p.add_argument("--steps", type=int, default=30, help="Adam steps of each pattern")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--clean-count", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        args.alpha_list = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError as err:
        raise SystemExit(f"--alphas: {err}") from err
    if not args.alpha_list or not all(0.0 < a < 1.0 for a in args.alpha_list) or args.steps <= 0:
        raise SystemExit("--alphas must be blend weights in (0, 1), --steps positive")
    return args


def blend_reading(
    f: torch.nn.Module,
    search: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    alpha: float,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> dict:
    """One blended pattern's spread score, moved share and per-class destinations (the window
    reading's pattern search and score, :mod:`timm_purify.detection.reach`, with a blend for
    the paste)."""

    def blend(x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        return x * (1 - alpha) + pattern * alpha

    pattern = fit_shared_pattern(
        f, search, blend, steps=steps, batch_size=batch_size, lr=lr, generator=generator
    )
    xh, yh = held
    with torch.no_grad():
        pred = f(blend(xh, pattern)).argmax(1)
    confusion = confusion_matrix(yh, pred, num_classes)
    score, top, moved, _ = pattern_spread(confusion)
    return {
        "alpha": alpha,
        "score": score,
        "moved": float(moved.mean()),
        "top_destination": top,
        "destinations": class_destinations(confusion),
    }


def measure(folder: Path, args: argparse.Namespace) -> dict:
    """One model's readings, one per alpha, with what it is (its training.json)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    record, f, search, held, num_classes = load_split(
        folder, clean_count=args.clean_count, seed=args.seed, generator=generator
    )
    readings = []
    for alpha in args.alpha_list:
        reading = blend_reading(
            f,
            search,
            held,
            num_classes,
            alpha=alpha,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            generator=generator,
        )
        reading["classes_sent_to_next"] = next_class_count(record, reading["destinations"])
        readings.append(reading)
    return {
        "model": folder.name,
        **describe(record),
        "norm_family": norm_family(f),
        "readings": readings,
        "seconds": time.perf_counter() - start,
    }


def _line(row: dict) -> str:
    return ", ".join(
        f"alpha {r['alpha']:g}: {r['score']:.3f}"
        + ("" if r["classes_sent_to_next"] is None else f" ({r['classes_sent_to_next']} to y+1)")
        for r in row["readings"]
    )


def main(argv: list[str] | None = None) -> None:
    measure_all(
        parse_args(argv),
        argv,
        measure=measure,
        line=_line,
        script="blend_spread.py",
        what=__doc__.split("\n")[0],
    )


if __name__ == "__main__":
    main()
