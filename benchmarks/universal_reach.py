"""How far does one small perturbation, shared by every image, carry a model towards each class?

Prototype of a second detection signal (not part of ``scan``; findings in
``benchmarks/DETECTION.md``). A backdoor is a shortcut that one input pattern, the trigger,
opens from every class to the target. BAN looks for it in the weights; this script looks
for it in pixel space: for every class ``t`` it fits one *universal* perturbation ``delta``
(L2 norm at most ``rho``) that lowers ``CE(f(clamp(x + delta)), t)`` over search images of
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
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from timm_purify.attacks import from_json
from timm_purify.data import Normalizer, clean_subset, load_data
from timm_purify.defenses._common import PixelModel, clamp_pixels, project_l2, scale_budget
from timm_purify.metrics import predict


def project_l1_ball(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Euclidean projection of one perturbation onto the L1 ball (soft thresholding).

    Unlike scaling, it zeroes the small entries, so the perturbation can become a patch.
    """
    flat = delta.flatten()
    if float(flat.abs().sum()) <= radius:
        return delta
    mags = flat.abs().sort(descending=True).values
    cums = mags.cumsum(0) - radius
    ks = torch.arange(1, len(mags) + 1, dtype=mags.dtype)
    k = int((mags - cums / ks > 0).nonzero().max())
    theta = cums[k] / (k + 1)
    return (flat.sign() * (flat.abs() - theta).clamp_min(0.0)).view_as(delta)


def universal_towards(
    f: PixelModel,
    x: torch.Tensor,
    target: int,
    *,
    rho: float,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    norm: str = "l2",
) -> torch.Tensor:
    """One perturbation of L2 (or L1) norm <= ``rho`` that pushes every image of ``x`` towards ``target``.

    Normalised-gradient descent on random batches, projected onto the ball after each step:
    the direction matters here, not the step's pixel pattern. The L1 ball admits a small
    patch of full contrast (a BadNets trigger) that no L2 ball of the same reach holds.
    """
    delta = torch.zeros_like(x[:1], requires_grad=True)
    goal = torch.full((batch_size,), target, dtype=torch.long)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=generator)
        loss = F.cross_entropy(f(clamp_pixels(x[idx] + delta)), goal[: len(idx)])
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            step = 0.25 * rho if norm == "l2" else rho / 8
            delta -= step * grad / grad.norm().clamp_min(1e-12)
            delta.clamp_(-1.0, 1.0)
            delta.copy_(project_l2(delta, rho) if norm == "l2" else project_l1_ball(delta, rho))
    return delta.detach()


def reach_matrix(
    f: PixelModel,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    rho: float,
    steps: int,
    batch_size: int,
    seed: int,
    norm: str = "l2",
) -> torch.Tensor:
    """``[target, source]``: share of held-out images of ``source`` that ``target``'s perturbation sends to it."""
    generator = torch.Generator().manual_seed(seed)
    search = torch.rand(len(y), generator=generator) < 0.5
    out = torch.zeros(num_classes, num_classes)
    for t in range(num_classes):
        delta = universal_towards(
            f,
            x[search & (y != t)],
            t,
            rho=rho,
            steps=steps,
            batch_size=batch_size,
            generator=generator,
            norm=norm,
        )
        held = ~search & (y != t)
        with torch.no_grad():
            pred = f((x[held] + delta).clamp(0.0, 1.0)).argmax(1)
        for s in range(num_classes):
            pick = y[held] == s
            if s != t and pick.any():
                out[t, s] = (pred[pick] == t).float().mean()
    return out


def summarise(matrix: torch.Tensor) -> dict:
    """Per-class reach (mean over source classes), the score (max - median) and its class."""
    n = matrix.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    reach = torch.stack([matrix[t][off[t]].mean() for t in range(n)])
    top = int(reach.argmax())
    return {
        "reach": [round(float(r), 4) for r in reach],
        "score": float(reach[top] - reach.median()),
        "suspected_target": top,
    }


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
        start = time.perf_counter()
        scaled = scale_budget(rho, tuple(x.shape[1:]), norm=args.norm)
        matrix = reach_matrix(
            f,
            x,
            y,
            len(data.classes),
            rho=scaled,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            norm=args.norm,
        )
        row = {
            "norm": args.norm,
            "rho": rho,
            "seconds": round(time.perf_counter() - start, 1),
            **summarise(matrix),
        }
        row["matrix"] = [[round(float(v), 3) for v in r] for r in matrix]
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
