"""NPD on an all-to-all model with every image attacked towards its *true* target (an oracle).

Plain NPD attacks each image towards its runner-up class; on the 8-epoch all-to-all resnet18 that
is the backdoor's target ``y + 1`` for only 13% of the images, and NPD leaves 18-23% ASR. This
script asks whether a better target estimate could close the gap: it registers ``npd-oracle``,
NPD whose per-image target is ``(y + 1) mod K`` (what no defender knows), and hands the rest of
the command line to ``run.py``. Its answer (``PURIFICATION.md``): no, 17.4% remains.

Usage (the options of the recorded run)::

    python benchmarks/a2a_oracle.py --suite full --archs resnet18 --attacks badnets-a2a --epochs 8 \\
        --methods npd-oracle --out benchmarks/results/alignment/npd-oracle-full-resnet18-a2a-e8.json \\
        --options '{"npd-oracle": {"layer": "last-stage", "lr": 0.1, "epochs": 10, "rho": 10,
                    "pgd_steps": 5, "stop_fraction": 1.0, "w_adv": 0.1, "w_other": 0.1, "w_target": 0.1}}'

(written under ``results/alignment/`` so that ``run.py --render`` does not list an oracle among
the methods.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from timm_purify.data import ImageData
from timm_purify.defenses._base import PurifyContext, register_defense
from timm_purify.defenses.npd import NPDConfig, _budget, pgd_attack, train_polarizer, wrap_for_defense

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the harness, beside this file)


@register_defense("npd-oracle", NPDConfig, "NPD attacking every image towards its true all-to-all target")
def run_npd_oracle(model: nn.Module, clean: ImageData, config: NPDConfig, ctx: PurifyContext) -> nn.Module:
    def next_class(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y + 1) % ctx.num_classes

    wrapped = wrap_for_defense(model, config)
    attack = pgd_attack(config, _budget(config, clean))
    return train_polarizer(
        wrapped, clean, config, ctx, choose_target=next_class, attack=attack, desc="npd-oracle"
    )


if __name__ == "__main__":
    run.main(sys.argv[1:])
