"""Train timm classifiers on (optionally poisoned) data and save them as timm folders.

This is how the project builds its own test subjects: a user checking a defence on their
architecture plants a known backdoor with :func:`build_backdoored_model` and gets a folder
that vanilla timm loads (``config.json`` + ``model.safetensors``) plus the ``attack.json``
that re-creates the trigger.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ._augment import random_crop_flip
from ._device import get_device
from ._progress import progress
from ._version import __version__
from .data import ImageData, Normalizer, load_data
from .metrics import EvalResult, evaluate

__all__ = [
    "TrainConfig",
    "BuildResult",
    "create_classifier",
    "train_model",
    "build_backdoored_model",
    "write_timm_folder",
    "environment_info",
    "parse_model_args",
]


@dataclass
class TrainConfig:
    """Recipe for training from scratch.

    Small batches on purpose: a backdoor needs enough SGD steps to be implanted, and on the
    5,000-image mini set 4 epochs at batch 128 (160 steps) left resnet18 with a clean accuracy
    of 82% but an ASR of 4%; batch 64 doubles the steps at the same cost per epoch.
    """

    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False
    optimizer: str = "sgd"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size <= 0:
            raise ValueError("epochs, lr and batch_size must be positive")


@dataclass
class BuildResult:
    """What :func:`build_backdoored_model` wrote and measured."""

    path: Path
    model: nn.Module
    metrics: EvalResult
    attack: dict | None
    seconds: float
    history: list[dict] = field(default_factory=list)


def environment_info() -> dict:
    """Machine and library versions, recorded with every result."""
    import huggingface_hub
    import safetensors

    return {
        "timm_purify": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def create_classifier(
    arch: str,
    *,
    num_classes: int,
    img_size: int,
    in_chans: int = 3,
    label_names: list[str] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    **kwargs,
) -> nn.Module:
    """A randomly initialised timm classifier whose ``pretrained_cfg`` describes a small input.

    ``img_size`` is passed to the constructor of models that take it (patch-based models build
    a fixed token grid); others ignore it at construction and only record it. With
    ``crop_pct=1`` timm's own preprocessing resizes straight to ``img_size``.
    """
    overlay = {"input_size": (in_chans, img_size, img_size), "crop_pct": 1.0, "test_input_size": None}
    if mean is not None:
        overlay.update(mean=tuple(mean), std=tuple(std))
    if label_names is not None:
        overlay["label_names"] = list(label_names)
    try:
        return timm.create_model(
            arch,
            pretrained=False,
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=img_size,
            pretrained_cfg_overlay=overlay,
            **kwargs,
        )
    except TypeError as err:
        if "img_size" not in str(err):
            raise
    return timm.create_model(
        arch,
        pretrained=False,
        num_classes=num_classes,
        in_chans=in_chans,
        pretrained_cfg_overlay=overlay,
        **kwargs,
    )


def train_model(
    model: nn.Module,
    data: ImageData,
    config: TrainConfig,
    *,
    device: torch.device | str | None = None,
    quiet: bool = False,
    eval_fn=None,
) -> list[dict]:
    """SGD with cosine decay over all parameters; returns per-epoch history.

    ``eval_fn(model) -> dict`` runs after each epoch and its result joins the history.
    """
    dev = get_device(device=device)
    model.to(dev)
    norm = Normalizer(model).to(dev)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # timm init and dropout draw from the global generator
    steps = config.epochs * ((len(data) + config.batch_size - 1) // config.batch_size)
    if config.optimizer == "adamw":  # transformers trained from scratch need it
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=max(steps, 1), pct_start=0.15
    )
    history = []
    for epoch in range(config.epochs):
        model.train()
        total = 0
        # loss sum and hits on the device, read once per epoch (no host sync per batch)
        loss_sum, correct = torch.zeros((), device=dev), torch.zeros((), device=dev, dtype=torch.long)
        batches = data.batches(config.batch_size, shuffle=True, generator=gen, device=dev)
        n_batches = (len(data) + config.batch_size - 1) // config.batch_size
        for x, y in progress(
            batches, desc=f"train epoch {epoch + 1}/{config.epochs}", total=n_batches, disable=quiet
        ):
            if config.augment:
                x = random_crop_flip(x, pad=max(1, x.shape[-1] // 8), generator=gen)
            logits = model(norm(x))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            total += len(y)
        row = {"epoch": epoch + 1, "loss": float(loss_sum) / total, "train_acc": int(correct) / total}
        if eval_fn is not None:
            row.update(eval_fn(model))
        history.append(row)
    model.eval()
    return history


def write_timm_folder(
    model: nn.Module, out_dir: str | os.PathLike, extra_files: dict[str, str] | None = None
) -> Path:
    """Write ``model`` as a timm folder (``config.json`` + ``model.safetensors``) atomically.

    The folder is built under a temporary name beside ``out_dir`` and renamed into place, so
    an interrupted run never leaves a half-written model; an existing ``out_dir`` is refused.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} already exists and is not empty; choose another --out (nothing was written)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        timm.models.save_for_hf(model, tmp, safe_serialization=True)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _dataset_stats(data: ImageData) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = data.floats()
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def build_backdoored_model(
    *,
    model: str,
    data: str | os.PathLike = "fashion-mnist-mini",
    attack=None,
    out_dir: str | os.PathLike | None = None,
    img_size: int = 32,
    config: TrainConfig | None = None,
    train_size: int | None = None,
    model_kwargs: dict | None = None,
    device: torch.device | str | None = None,
    quiet: bool = False,
) -> BuildResult:
    """Train ``model`` (a timm architecture name) on ``data`` poisoned by ``attack``.

    With ``attack=None`` the same recipe trains a clean model (for false-positive checks).
    ``train_size`` takes a class-balanced subset of the training split; ``model_kwargs`` go to
    ``timm.create_model`` (e.g. ``patch_size=4`` for a ViT at 32x32). The result is written
    to ``out_dir`` (when given) with ``attack.json`` and ``training.json``.
    """
    from .data import clean_subset

    config = config or TrainConfig()
    if out_dir is not None:
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(
                f"{out} already exists and is not empty; choose another --out (nothing was written)"
            )
    start = time.perf_counter()
    train = load_data(data, split="train", input_size=(3, img_size, img_size))
    test = load_data(data, split="test", input_size=(3, img_size, img_size))
    if train_size is not None and train_size < len(train):
        train = clean_subset(train, count=train_size, seed=config.seed)
    mean, std = _dataset_stats(train)
    torch.manual_seed(config.seed)  # timm draws the initial weights from the global generator
    net = create_classifier(
        model,
        num_classes=train.num_classes,
        img_size=img_size,
        label_names=train.classes,
        mean=mean,
        std=std,
        **(model_kwargs or {}),
    )
    poisoned = train
    if attack is not None:
        poisoned, _mask = attack.poison(train)

    def eval_fn(m: nn.Module) -> dict:
        r = evaluate(m, test, attack=attack, device=device)
        return {"acc": r.acc, "asr": r.asr}

    history = train_model(
        net, poisoned, config, device=device, quiet=quiet, eval_fn=eval_fn if not quiet else None
    )
    metrics = evaluate(net, test, attack=attack, device=device)
    seconds = time.perf_counter() - start
    spec = attack.to_dict() if attack is not None else None
    if out_dir is not None:
        record = {
            "model": model,
            "model_kwargs": model_kwargs or {},
            "data": str(data),
            "img_size": img_size,
            "train_size": len(train),
            "train": asdict(config),
            "attack": spec,
            "metrics": metrics.to_dict(),
            "history": history,
            "seconds": seconds,
            "environment": environment_info(),
        }
        extra = {"training.json": json.dumps(record, indent=2) + "\n"}
        if spec is not None:
            extra["attack.json"] = json.dumps(spec, indent=2) + "\n"
        write_timm_folder(net.cpu(), out_dir, extra)
    return BuildResult(Path(out_dir) if out_dir else None, net, metrics, spec, seconds, history)


def parse_model_args(pairs: tuple[str, ...] | list[str]) -> dict:
    """``["patch_size=4", "drop_rate=0.1"]`` -> ``{"patch_size": 4, "drop_rate": 0.1}`` (JSON values, else strings)."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"model argument {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out
