"""How far does one small perturbation, shared by every image, carry a model towards each class?

Explores the signal of ``scan``'s second stage (``timm_purify/detection/reach.py``, whose
functions this script calls) at several budgets on one model; findings in
``benchmarks/DETECTION.md``, the stage's calibration in ``calibrate_reach.py``. A backdoor is a shortcut that one input pattern, the trigger,
opens from every class to the target. BAN looks for it in the weights; this script looks
for it in pixel space: for every class ``t`` it fits one *universal* perturbation ``delta``
(L1 or L2 norm at most ``rho``) that lowers ``CE(f(clamp(x + delta)), t)`` over search images of
the other classes, then measures on held-out images of the other classes the share sent to
``t`` (the class's *reach*, averaged over the source classes). A clean model needs a large
perturbation to send shoes, bags and trousers alike to one class; a backdoored one has the
trigger's direction ready, so its target's reach stands out at a budget where the other
classes stay low.

The score at each budget is the largest reach minus the median reach over the classes; the
class with the largest reach is the suspected target. ``rho`` is given at 32x32x3 and scaled
to the model's input size like NPD's budget.

Usage::

    python benchmarks/universal_reach.py benchmarks/cache/fashion-mnist-convnext_atto-badnets-p0.1-e3-b64-s0 \
        --json benchmarks/results/reach/full-convnext_atto-badnets-s0.json

(``results/reach/``, not ``results/``: ``run.py --render`` reads every JSON file there as
its own results.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch

from timm_purify.attacks import from_json
from timm_purify.data import Normalizer, clean_subset, load_data
from timm_purify.defenses._common import PixelModel
from timm_purify.detection.reach import universal_reach
from timm_purify.metrics import predict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a cached benchmark model folder")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--split", default="test", help="images the perturbations are fitted and measured on")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--rho", default="1,2", help="budgets at 32x32x3, comma-separated")
    parser.add_argument("--norm", choices=("l2", "l1"), default="l2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    folder = Path(args.model)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    norm = Normalizer(model)
    f = PixelModel(model, norm)
    data = clean_subset(
        load_data(args.data, split=args.split, model=model), count=args.images, seed=args.seed
    )
    x, y = data.floats(), data.y
    pred = predict(model, x, normalizer=norm)
    # only images the model gets right: a misclassified image says nothing about reaching a class
    x, y = x[pred == y], y[pred == y]
    attack = from_json(folder / "attack.json") if (folder / "attack.json").is_file() else None
    out: dict = {
        "model": folder.name,
        "attack": None
        if attack is None
        else {"name": attack.name, "mode": attack.mode, "target": attack.target},
        "images": len(y),
        "accuracy": float((pred == data.y).float().mean()),
        "budgets": [],
    }
    for rho in (float(v) for v in args.rho.split(",")):
        generator = torch.Generator().manual_seed(args.seed)
        search = torch.rand(len(y), generator=generator) < 0.5
        result = universal_reach(
            f,
            (x[search], y[search]),
            (x[~search], y[~search]),
            len(data.classes),
            rho=rho,
            norm=args.norm,
            steps=args.steps,
            batch_size=args.batch_size,
            generator=generator,
        )
        row = {
            "norm": args.norm,
            "rho": rho,
            "seconds": round(result.seconds, 1),
            "reach": [round(r, 4) for r in result.reach],
            "score": result.score,
            "suspected_target": result.suspected_target,
            "matrix": [[round(v, 3) for v in r] for r in result.matrix],
        }
        out["budgets"].append(row)
        print(
            f"{folder.name} {args.norm} rho {rho:g}: score {row['score']:.3f} class {row['suspected_target']} "
            f"reach {' '.join(f'{r:.2f}' for r in row['reach'])} ({row['seconds']} s)",
            flush=True,
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
