"""Clean accuracy, attack success rate, robust accuracy and the defence effectiveness rating.

Definitions (``../shared/notes/methods.md``, the papers' own):

* ACC: accuracy on the clean test set.
* ASR: share of triggered test images predicted as the attack's target label, counted over
  the images whose true class is not the target (all-to-one) or over all images (all-to-all).
* RA: share of the same triggered images predicted as their true label.
* DER = [max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._device import get_device, module_device, placed_on
from .data import ImageData, Normalizer, load_data

__all__ = ["EvalResult", "evaluate", "der", "predict"]


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one model on one test set (and one attack), as fractions in [0, 1].

    ``asr`` and ``ra`` are ``None`` when no attack was given.
    """

    acc: float
    n_clean: int
    asr: float | None = None
    ra: float | None = None
    n_triggered: int = 0
    attack: str | None = None
    data: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        parts = [f"ACC {100 * self.acc:.2f}% (n={self.n_clean})"]
        if self.asr is not None:
            parts.append(f"ASR {100 * self.asr:.2f}%")
            parts.append(f"RA {100 * self.ra:.2f}% (n={self.n_triggered}, {self.attack})")
        return ", ".join(parts)


def der(before: EvalResult, after: EvalResult) -> float:
    """Defence effectiveness rating in [0, 1] (simplified form; 0.5 = no change).

    Raises:
        ValueError: when either result lacks an ASR.
    """
    if before.asr is None or after.asr is None:
        raise ValueError("DER needs the ASR before and after: evaluate both with the same attack")
    return (max(0.0, before.asr - after.asr) - max(0.0, before.acc - after.acc) + 1.0) / 2.0


@torch.no_grad()
def predict(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    normalizer: nn.Module | None = None,
) -> torch.Tensor:
    """Predicted labels of ``model`` for [0, 1] images ``x`` (normalised with the model's stats),
    computed on ``device``, by default where ``model`` lives (the model itself is not moved)."""
    device = device or module_device(model)
    norm = (normalizer or Normalizer(model)).to(device)
    out = []
    for chunk in x.split(batch_size):
        out.append(model(norm(chunk.to(device))).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def evaluate(
    model: nn.Module,
    data: ImageData | str | os.PathLike,
    *,
    attack=None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    accelerator=None,
) -> EvalResult:
    """Evaluate ``model`` on clean test images and, with ``attack``, on their triggered copies.

    Args:
        model: any classifier (a timm model, a wrapped or purified one).
        data: an :class:`ImageData` (taken as the test set) or a data spec, whose ``test``
            split is loaded at the model's resolution.
        attack: an attack object or the path of an ``attack.json``.
    """
    if not isinstance(data, ImageData):
        data = load_data(data, split="test", model=model)
    if isinstance(attack, (str, os.PathLike, dict)):
        from .attacks import from_json

        attack = from_json(attack)
    dev = get_device(accelerator, device)
    was_training = model.training
    model.eval()
    norm = Normalizer(model).to(dev)
    correct = hits = robust = n_trig = 0
    try:
        # the caller's model runs on ``dev`` and goes back where it was afterwards
        with torch.no_grad(), placed_on(model, dev):
            for x, y in data.batches(batch_size, device=dev):
                correct += int((model(norm(x)).argmax(1) == y).sum())
                if attack is None:
                    continue
                mask = attack.asr_mask(y)
                if not bool(mask.any()):
                    continue
                xt, yt = x[mask], y[mask]
                pred = model(norm(attack.apply(xt))).argmax(1)
                hits += int((pred == attack.target_labels(yt)).sum())
                robust += int((pred == yt).sum())
                n_trig += int(mask.sum())
    finally:
        model.train(was_training)
    n = len(data)
    if n == 0:
        raise ValueError("the test set is empty")
    if attack is not None and n_trig == 0:
        raise ValueError("no test image counts for the ASR (every image belongs to the target class)")
    return EvalResult(
        acc=correct / n,
        n_clean=n,
        asr=hits / n_trig if attack is not None else None,
        ra=robust / n_trig if attack is not None else None,
        n_triggered=n_trig,
        attack=getattr(attack, "name", None),
        data=data.source,
    )
