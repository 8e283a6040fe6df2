"""Measure the blend reading of the scan's spread stage on model folders, at several blend weights.

The scan's window reading (``window_spread.py``) finds all-to-all *patch* triggers, but a
blended trigger covers the whole image, so no window carries it: the eighth held-out BatchNorm
set (blended all-to-all) was found once in seven (``DETECTION.md``). The L2 whole-image
perturbation the LayerNorm spread stage uses finds a sink class of clean BatchNorm models
instead. The blend reading (``timm_purify.detection.reach.blend_spread``) keeps the spread score
and changes the shape to the trigger's: one pattern ``p`` blended into every image,
``x' = (1 - alpha) x + alpha p``, fitted to push images off their labels. This script takes it
on each model's own clean images, outside the scan (no BAN, no reach: about a second a model),
at every ``--alphas`` value, with where each class went (an all-to-all map ``y -> y + 1`` shows
there): it chose the weight the scan's stage was then calibrated at (calibrate_spread.py
``--shape blend``), whose scores the scan takes on its own held-out images.

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
from timm_purify.detection.reach import blend_spread


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


def measure(folder: Path, args: argparse.Namespace) -> dict:
    """One model's readings, one per alpha, with what it is (its training.json)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    record, f, search, held, num_classes = load_split(
        folder, clean_count=args.clean_count, seed=args.seed, generator=generator
    )
    readings = []
    for alpha in args.alpha_list:
        result = blend_spread(
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
        readings.append(
            {
                "alpha": alpha,
                "score": result.score,
                "moved": sum(result.moved) / len(result.moved),
                "top_destination": result.top_destination,
                "destinations": result.destinations,
                "classes_sent_to_next": next_class_count(record, result.destinations),
            }
        )
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
