"""Measure a candidate all-to-all reading for patch triggers: a shared pattern confined to one window.

On BatchNorm models the scan misses most all-to-all backdoors (``DETECTION.md``): BAN's noise
does not reach them, and an untargeted universal perturbation, L2 or patch-shaped (L1 with soft
thresholding), finds a sink class of the clean model instead of the trigger. A patch trigger's
defining property is that one pattern at one place moves *every* class, each to its own
destination. So this reading searches, for each window of a grid over the image, one pattern
(the window's pixels replaced, shared by every image) that pushes the images off their labels
(Adam on the negative cross-entropy), and scores the window by the mean over classes of the
share of held-out images moved to a class other than the most common destination (as the
spread reading does: an all-to-one trigger sends every class to one class and scores low).
The model's score is the best window's. Per window it records where each class went, so an
all-to-all mapping (``y -> y + 1``) shows in the result.

The reading itself is ``timm_purify.detection.reach.window_spread``, the scan's spread stage in
its ``window`` shape (``calibrate_spread.py --shape window`` fits its cut); this script measures
it alone, outside a scan, at any settings. Each model is read on ``--clean-count`` clean test
images it classifies right (half fit the patterns, half measure them), on one thread. The result
goes to ``--out``.

Example (the command behind each ``results/window-spread/batchnorm-*.json`` is recorded in it)::

    python benchmarks/window_spread.py --out benchmarks/results/window-spread/batchnorm-resnet18-a.json \\
        'benchmarks/cache/calibrate_scan/resnet18-badnets-patch_size6-modea2a-*' ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from calibrate_reach import model_folders  # noqa: E402
from refit_crossfold import write_out  # noqa: E402

from timm_purify.data import Normalizer, clean_subset, load_data  # noqa: E402
from timm_purify.defenses._common import PixelModel  # noqa: E402
from timm_purify.detection.reach import window_spread  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "models", nargs="+", help="model folders written by build_backdoored_model, or quoted globs"
    )
    p.add_argument(
        "--window", type=int, default=8, help="window side in pixels at 32x32 (scaled with the image)"
    )
    p.add_argument("--stride", type=int, default=8, help="grid step at 32x32; the last window sits flush")
    p.add_argument("--steps", type=int, default=60, help="Adam steps of each window's pattern")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--clean-count", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not 0 < args.window <= 32 or not 0 < args.stride <= args.window or args.steps <= 0:
        raise SystemExit(
            "--window must be in (0, 32], --stride in (0, --window] (so the windows cover the image), "
            "--steps positive"
        )
    return args


def load_split(
    folder: Path, *, clean_count: int, seed: int, generator: torch.Generator
) -> tuple[dict, PixelModel, tuple, tuple, int]:
    """A model folder as the readings take it: ``(training record, model on [0, 1] pixels,
    search, held, number of classes)``, where search and held are two halves, split with
    ``generator`` (which the reading then goes on drawing from), of ``clean_count`` clean test
    images (subset ``seed``) the model classifies right. Shared with ``blend_spread.py``."""
    record = json.loads((folder / "training.json").read_text())
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data = clean_subset(load_data(record["data"], split="test", model=model), count=clean_count, seed=seed)
    f = PixelModel(model, Normalizer(model))
    x, y = data.floats(), data.y
    with torch.no_grad():
        right = torch.cat([f(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)]) == y
    x, y = x[right], y[right]
    order = torch.randperm(len(x), generator=generator)
    half = len(x) // 2
    return (
        record,
        f,
        (x[order[:half]], y[order[:half]]),
        (x[order[half:]], y[order[half:]]),
        len(data.classes),
    )


def next_class_count(record: dict, destinations: list[int | None]) -> int | None:
    """For an all-to-all model, how many classes a reading sends to ``y + 1`` (the backdoor's map)."""
    spec = record.get("attack")
    if spec is None or spec["mode"] != "all-to-all":
        return None
    return sum(d == (c + 1) % len(destinations) for c, d in enumerate(destinations))


def describe(record: dict) -> dict:
    """What a model is, from its training record, for a result row."""
    spec = record.get("attack")
    return {
        "arch": record["model"],
        "attack": None if spec is None else spec["name"],
        "mode": None if spec is None else spec["mode"],
        "acc": record["metrics"]["acc"],
        "asr": record["metrics"]["asr"],
    }


def measure(folder: Path, args: argparse.Namespace) -> dict:
    """One model's reading, with what it is (its training.json)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    record, f, search, held, num_classes = load_split(
        folder, clean_count=args.clean_count, seed=args.seed, generator=generator
    )
    reading = window_spread(
        f,
        search,
        held,
        num_classes,
        window=args.window,
        stride=args.stride,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        generator=generator,
    )
    return {
        "model": folder.name,
        **describe(record),
        "classes_sent_to_next": next_class_count(record, reading.destinations),
        "score": reading.score,
        "best": {
            "window": [*reading.corner, reading.side],
            "score": reading.score,
            "top_destination": reading.top_destination,
            "destinations": reading.destinations,
        },
        "second_score": reading.second_score,
        "windows": reading.window_scores,
        "seconds": time.perf_counter() - start,
    }


def measure_all(
    args: argparse.Namespace,
    argv: list[str] | None,
    *,
    measure: Callable[[Path, argparse.Namespace], dict],
    line: Callable[[dict], str],
    script: str,
    what: str,
) -> None:
    """Read every model of ``args.models`` with ``measure`` on one thread, print ``line(row)``
    per model and write the rows with the settings and the command to ``args.out`` (shared
    with ``blend_spread.py``)."""
    torch.set_num_threads(1)
    rows = []
    for folder in model_folders(args.models):
        row = measure(folder, args)
        rows.append(row)
        kind = "clean" if row["attack"] is None else f"{row['attack']} {row['mode']}"
        print(f"{row['model']} ({kind}): {line(row)} [{row['seconds']:.0f}s]", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("models", "out") and not k.endswith("_list")}
    write_out({"what": what, "settings": settings, "models": rows}, args.out, argv, script)


def _line(row: dict) -> str:
    best = row["best"]
    to_next = row["classes_sent_to_next"]
    return f"{row['score']:.3f} at window {best['window']} (second {row['second_score']:.3f})" + (
        "" if to_next is None else f", {to_next} classes to y+1"
    )


def main(argv: list[str] | None = None) -> None:
    measure_all(
        parse_args(argv),
        argv,
        measure=measure,
        line=_line,
        script="window_spread.py",
        what=__doc__.split("\n")[0],
    )


if __name__ == "__main__":
    main()
