"""How high can an all-to-all backdoor's ASR go on this model? Bounded by its clean accuracy.

An all-to-all trigger sends an image of class ``y`` to ``(y + 1) mod K``; the ASR counts a hit
only when the triggered prediction is the *true* label plus one. The backdoor has to recognise
the class before it can shift it, so on an image the model misclassifies it shifts the wrong
class and misses. The ASR, and with it the best possible DER (``(ASR + 1) / 2``), is then
bounded by the model's clean accuracy: the issue's "best-of DER >= 97%" needs an all-to-all
ASR >= 94%, which a Fashion-MNIST resnet18 at 92% accuracy cannot give whatever it is trained
with. This script measures that on a cached model (one with ``attack.json`` in all-to-all mode,
a benchmark zoo model) over the full test split:

* ACC and ASR as ``timm_purify.evaluate`` counts them (over all test images for all-to-all);
* the ASR on the images the model classifies correctly and on those it gets wrong;
* on the misclassified ones, the share whose triggered prediction is the *predicted* class
  plus one (the backdoor fired on the model's own reading);
* the same per true class.

Usage::

    python benchmarks/a2a_ceiling.py benchmarks/cache/fashion-mnist-resnet18-badnets-a2a-p0.1-e8-b64-s0 \
        --json benchmarks/results/alignment/a2a-ceiling-full-resnet18-e8.json

(written under ``results/alignment/`` so that ``run.py --render`` does not read it as a results
file). Findings are written up by hand in ``benchmarks/PURIFICATION.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch

from timm_purify.attacks import from_json
from timm_purify.data import load_data
from timm_purify.metrics import predict


def _share(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")


def measure(model_dir: Path, data: str) -> dict:
    """The ceiling's numbers for the cached model in ``model_dir`` on ``data``'s test split."""
    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    attack = from_json(model_dir / "attack.json")
    if attack.mode != "all-to-all":
        raise SystemExit(f"{model_dir}: the attack is {attack.mode}, this measures all-to-all backdoors")
    test = load_data(data, split="test", model=model)
    x, y = test.floats(), test.y
    clean_pred = predict(model, x)
    trig_pred = predict(model, attack.apply(x))
    num_classes = int(attack.num_classes or model.num_classes)
    hit = trig_pred == attack.target_labels(y)
    right = clean_pred == y
    wrong = ~right
    on_own_reading = trig_pred[wrong] == (clean_pred[wrong] + 1) % num_classes
    per_class = []
    for c in range(num_classes):
        of_c = y == c
        per_class.append(
            {
                "class": c,
                "acc": _share(right[of_c]),
                "asr": _share(hit[of_c]),
                "asr_when_right": _share(hit[of_c & right]),
            }
        )
    return {
        "model": str(model_dir),
        "data": data,
        "n": int(len(y)),
        "acc": _share(right),
        "asr": _share(hit),
        "asr_when_right": _share(hit[right]),
        "asr_when_wrong": _share(hit[wrong]),
        "n_wrong": int(wrong.sum()),
        "wrong_shifted_from_own_prediction": _share(on_own_reading),
        "der_cap": (_share(hit) + 1.0) / 2.0,
        "per_class": per_class,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = measure(args.model_dir, args.data)
    print(
        f"ACC {out['acc']:.4f}  ASR {out['asr']:.4f}  (DER cap {out['der_cap']:.4f})\n"
        f"ASR on correctly classified images {out['asr_when_right']:.4f}, on the {out['n_wrong']} "
        f"misclassified {out['asr_when_wrong']:.4f}; of those, shifted from the model's own "
        f"prediction {out['wrong_shifted_from_own_prediction']:.4f}"
    )
    for row in out["per_class"]:
        print(
            f"  class {row['class']}: ACC {row['acc']:.3f}  ASR {row['asr']:.3f}  ASR|right {row['asr_when_right']:.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
