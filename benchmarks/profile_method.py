"""Profile one defence on a cached quick-suite model: wall seconds, the ratio to one epoch of
plain fine-tuning over the same clean set (measured in the same process), and where the time
goes (cProfile, sorted by time spent inside each function).

Usage::

    python benchmarks/run.py --suite quick                  # builds the cached model once
    python benchmarks/profile_method.py awm --option outer_steps=2
    python benchmarks/profile_method.py npd --option layer=last-stage --option epochs=4 --top 15

Findings are written up by hand in ``benchmarks/PROFILE.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from pathlib import Path

import timm

from timm_purify._train import parse_model_args
from timm_purify.data import clean_subset, load_data
from timm_purify.defenses import purify

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "cache" / "fashion-mnist-mini-resnet18-badnets-p0.1-e5-b64-s0"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("method")
    parser.add_argument(
        "--option", action="append", default=[], help="KEY=VALUE passed to purify (JSON values)"
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a cached model folder")
    parser.add_argument("--data", default="fashion-mnist-mini")
    parser.add_argument("--clean-fraction", type=float, default=0.05)
    parser.add_argument("--top", type=int, default=20, help="functions listed")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "model.safetensors").is_file():
        parser.error(
            f"{args.model} holds no model.safetensors: run `python benchmarks/run.py --suite quick` first"
        )
    try:
        options = parse_model_args(args.option)
    except ValueError as err:
        parser.error(str(err))

    model = timm.create_model(f"local-dir:{args.model}", pretrained=True).eval()
    clean = clean_subset(
        load_data(args.data, split="train", model=model), fraction=args.clean_fraction, seed=0
    )
    ft_epoch = purify(model, clean, method="ft", epochs=1, seed=0, quiet=True).seconds
    profiler = cProfile.Profile()
    profiler.enable()
    result = purify(model, clean, method=args.method, seed=0, quiet=True, **options)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    print(
        f"{args.method} {options}: {result.seconds:.1f} s on {len(clean)} clean images; one FT epoch "
        f"{ft_epoch:.2f} s; ratio {result.seconds / ft_epoch:.1f}x"
    )


if __name__ == "__main__":
    main()
