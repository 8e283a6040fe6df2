"""Scan a timm model for a backdoor, remove it and write a Hub-ready folder, with the Python API.

The steps ``timm-purify purify MODEL --method auto`` takes, spelled out one call each so any of
them can be changed: load the model (a Hub id, a local timm folder, or an architecture name with
a checkpoint), take a class-balanced clean subset, scan (the report names a suspected target
class), purify with the method the scan's finding picks, measure before and after when a
trigger is known, save as safetensors with a model card, and check that the saved folder loads
back to the same predictions.

Usage (``timm-purify demo`` builds a backdoored model to try it on)::

    timm-purify demo --out demo-output
    python examples/scan_and_purify.py demo-output/backdoored --data fashion-mnist-mini \\
        --attack demo-output/backdoored/attack.json --out purified

``--data`` is a bundled set name or a folder with one sub-folder of images per class (its
``train/`` split if it has one); the test split of the same source measures ACC/ASR. Publish
the folder with ``timm_purify.push_to_hub("purified", "org/name")``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import timm_purify
from timm_purify.data import Normalizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="Hub id, local timm folder, or architecture name")
    parser.add_argument("--data", required=True, help="clean images: bundled set name or image folder")
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--clean-count", type=int, default=250, help="clean images to use (class-balanced)")
    parser.add_argument("--attack", help="attack.json of a known trigger, to measure ASR before and after")
    parser.add_argument(
        "--epochs",
        type=int,
        help="shorten the chosen method (1 for a smoke run): N epochs of a polarizer, N outer steps of AWM",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = timm_purify.load_model(args.model)
    clean = timm_purify.clean_subset(
        timm_purify.load_data(args.data, split="train", model=model), count=args.clean_count, seed=args.seed
    )
    # the files are inspected too (no pickle is ever unpickled) when the model is a local folder
    files = args.model if Path(args.model).is_dir() else None
    report = timm_purify.scan(model, clean, files=files, seed=args.seed, quiet=True)
    target = f", suspected target {report.target_name}" if report.suspected_target is not None else ""
    print(f"scan: {report.verdict} (score {report.score:.3f} vs threshold {report.threshold:.3f}{target})")

    # auto gives each method the options it takes (and warns about the one the picked method does not)
    options = {} if args.epochs is None else {"epochs": args.epochs, "outer_steps": args.epochs}
    measure = {"eval_data": args.data, "eval_attack": args.attack} if args.attack else {}
    result = timm_purify.purify(
        model, clean, method="auto", scan_report=report, seed=args.seed, quiet=True, **measure, **options
    )
    print(f"purified with {result.method} in {result.seconds:.0f} s on {result.num_clean} clean images")
    if result.before is not None and result.after is not None:
        b, a = result.before, result.after
        print(
            f"  ACC {b.acc:.2%} -> {a.acc:.2%}, ASR {b.asr:.2%} -> {a.asr:.2%}, DER {timm_purify.der(b, a):.2%}"
        )

    folder = timm_purify.save_pretrained(result, args.out, scan_report=report)
    reloaded = timm_purify.from_pretrained(folder).eval()
    x = Normalizer(model)(clean.floats()[:64])  # the models take normalised images
    with torch.no_grad():
        # a folded polarizer is the same map up to float rounding
        same = torch.allclose(result.model.eval()(x), reloaded(x), rtol=1e-4, atol=1e-4)
    print(f"wrote {folder} (model card: {folder / 'README.md'}); reloaded logits match: {same}")
    if not same:
        raise SystemExit("the saved folder does not reproduce the purified model's predictions")


if __name__ == "__main__":
    main()
