"""Does NPD's adversarial example look like the backdoor, to the layer the polarizer sits at?

NPD trains its polarizer to undo targeted perturbations; it can only remove a backdoor whose
trigger those perturbations imitate. This script measures the imitation on a cached model
(one with ``attack.json``: a benchmark zoo model) and its suite's clean set:

* the trigger's shift of the penultimate features (the input of the classifier, where a
  ``layer="last-stage"`` polarizer acts on a 32x32 resnet18), averaged over clean images of
  the other classes;
* for each budget (L2 radius ``rho``, sign steps, early stop), the targeted PGD's hit rate
  and how its feature shift lines up with the trigger's: the cosine of the mean shifts, and
  the mean projection onto the trigger direction as a share of the trigger's own shift (1 =
  the attack moves the features as far along the backdoor as the trigger does);
* the same towards NPD's per-image target estimate (the runner-up class), and the classes an
  untargeted attack lands on.

Usage::

    python benchmarks/trigger_alignment.py benchmarks/cache/fashion-mnist-resnet18-badnets-p0.1-e3-b64-s0 \
        --json benchmarks/results/alignment/full-resnet18-badnets.json

(``results/alignment/``, not ``results/``: ``run.py --render`` reads every JSON file there as
its own results.)

Findings are written up by hand in ``benchmarks/PURIFICATION.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from timm_purify.attacks import from_json
from timm_purify.data import Normalizer, clean_subset, load_data
from timm_purify.defenses._common import PixelModel, project_l2, targeted_pgd
from timm_purify.metrics import predict

# (rho, steps, stop_fraction): NPD's reference budget first, then larger ones
BUDGETS = ((3.0, 2, 0.6), (3.0, 10, None), (6.0, 5, None), (10.0, 5, None))


def _untargeted(
    f, x: torch.Tensor, y: torch.Tensor, rho: float, steps: int, step: float = 0.1
) -> torch.Tensor:
    """L2 sign-gradient ascent on the true class's loss: where does a free attack go?"""
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(F.cross_entropy(f(x + delta), y), delta)
        with torch.no_grad():
            delta += step * grad.sign()
            delta.copy_(project_l2(delta, rho))
            delta.copy_((x + delta).clamp(0.0, 1.0) - x)
    return (x + delta).detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a cached model folder holding attack.json (all-to-one attack)")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--clean-fraction", type=float, default=0.05)
    parser.add_argument("--images", type=int, default=512, help="clean images measured")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    folder = Path(args.model)
    if not (folder / "attack.json").is_file():
        parser.error(f"{folder} holds no attack.json: give a backdoored benchmark model")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    attack = from_json(folder / "attack.json")
    if attack.mode != "all-to-one":
        parser.error("the alignment needs an all-to-one attack (one target class)")
    target = int(attack.target)
    clean = clean_subset(
        load_data(args.data, split="train", model=model), fraction=args.clean_fraction, seed=0
    )
    pick = torch.randperm(len(clean), generator=torch.Generator().manual_seed(0))[: args.images]
    x, y = clean.floats()[pick], clean.y[pick]
    x, y = x[y != target], y[y != target]
    norm = Normalizer(model)
    f = PixelModel(model, norm)

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.forward_head(model.forward_features(norm(images)), pre_logits=True)

    base = features(x)
    trigger_shift = (features(attack.apply(x)) - base).mean(0)
    unit = trigger_shift / trigger_shift.norm()
    out: dict = {
        "model": folder.name,
        "target": target,
        "images": len(y),
        "trigger_hit": float((predict(model, attack.apply(x), normalizer=norm) == target).float().mean()),
        "attacks": [],
    }
    with torch.no_grad():
        logits = f(x)
    runner_up = logits.scatter(1, y.unsqueeze(1), float("-inf")).argmax(1)
    out["runner_up_is_target"] = float((runner_up == target).float().mean())
    for towards, goal in (("target", torch.full_like(y, target)), ("runner-up", runner_up)):
        for rho, steps, stop in BUDGETS:
            adv = targeted_pgd(f, x, goal, eps=rho, steps=steps, step_size=0.1, norm="l2", stop_fraction=stop)
            shift = features(adv) - base
            pred = predict(model, adv, normalizer=norm)
            out["attacks"].append(
                {
                    "towards": towards,
                    "rho": rho,
                    "steps": steps,
                    "stop_fraction": stop,
                    "hit": float((pred == goal).float().mean()),
                    "lands_on_target": float((pred == target).float().mean()),
                    "cos_mean_shift": float(F.cosine_similarity(shift.mean(0), trigger_shift, dim=0)),
                    "projection": float((shift @ unit).mean() / trigger_shift.norm()),
                }
            )
    landing = {}
    for rho, steps in ((3.0, 2), (10.0, 5)):
        pred = predict(model, _untargeted(f, x, y, rho, steps), normalizer=norm)
        landing[f"rho{rho:g}-steps{steps}"] = torch.bincount(
            pred[pred != y], minlength=logits.shape[1]
        ).tolist()
    out["untargeted_landing"] = landing

    print(f"{out['model']}: target {target}, trigger hit {out['trigger_hit']:.3f}, "
          f"runner-up = target for {out['runner_up_is_target']:.1%} of {out['images']} images")  # fmt: skip
    print(
        "| towards | rho | steps | early stop | hit | lands on target | cos(mean shift, trigger) | projection |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for a in out["attacks"]:
        print(
            f"| {a['towards']} | {a['rho']:g} | {a['steps']} | {a['stop_fraction'] or '-'} | {a['hit']:.3f} "
            f"| {a['lands_on_target']:.3f} | {a['cos_mean_shift']:.3f} | {a['projection']:.3f} |"
        )
    for name, hist in landing.items():
        print(f"untargeted {name}: lands on classes {hist}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
