"""The interface every purification method follows, its registry, and :func:`purify`.

A method is one module under ``timm_purify/defenses/`` holding

* a config dataclass whose defaults are the reference implementation's, with a
  ``validate()`` that rejects impossible values before any work starts, and
* a function ``run(model, clean, config, ctx) -> nn.Module`` decorated with
  :func:`register_defense`.

``run`` receives a private deep copy of the user's model (never the original) and the clean
images in [0, 1] pixel space; it returns the purified model, which is either a plain timm
model with unchanged keys (masks merged) or a :class:`~timm_purify.PolarizedModel`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._auto import AUTO, choose_method, untaken_error, unused_options
from .._device import get_device, module_device
from .._layers import check_classifier
from ..data import DataError, ImageData, Normalizer, clean_subset, load_data
from ..metrics import EvalResult, evaluate

if TYPE_CHECKING:
    from ..detection.report import ScanReport

__all__ = [
    "DEFENSES",
    "DefenseConfig",
    "DefenseSpec",
    "PurifyContext",
    "PurifyResult",
    "PurifyOptionError",
    "register_defense",
    "purify",
]


class PurifyOptionError(ValueError):
    """An option of :func:`purify` that cannot work; raised before any work starts."""


@dataclass
class DefenseConfig:
    """Fields every method shares. Subclasses add their own, with the reference defaults."""

    seed: int = 0
    batch_size: int = 128

    def validate(self, *, num_clean: int, num_classes: int) -> None:
        """Raise :class:`PurifyOptionError` for values the method cannot run with."""
        if self.batch_size <= 0:
            raise PurifyOptionError(f"batch_size must be positive, got {self.batch_size}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("positive") and not (isinstance(value, (int, float)) and value > 0):
                raise PurifyOptionError(f"{f.name} must be > 0, got {value!r}")


def positive(default: Any, **kwargs) -> Any:
    """A dataclass field that :meth:`DefenseConfig.validate` requires to be > 0."""
    return field(default=default, metadata={"positive": True, **kwargs})


@dataclass
class PurifyContext:
    """What a method needs besides the model, the data and its config.

    Attributes:
        device: where to run (from accelerate, or the caller's Accelerator).
        normalizer: the model's mean/std as a module, to put in front of the model.
        generator: a CPU ``torch.Generator`` seeded with ``config.seed``; draw all randomness from it.
        quiet: turn progress bars off.
        history: per-epoch records; append dicts with at least ``{"epoch": i, "loss": ...}``.
        evaluate: ``evaluate(model) -> dict`` with ``acc``/``asr`` on the evaluation set, or
            ``None`` when the caller gave none; call it at the end of each epoch when set.
        num_classes: size of the model's head.
    """

    device: torch.device
    normalizer: nn.Module
    generator: torch.Generator
    quiet: bool
    num_classes: int
    history: list[dict] = field(default_factory=list)
    evaluate: Callable[[nn.Module], dict] | None = None

    def log(self, record: dict, model: nn.Module | None = None) -> None:
        """Append ``record`` to the history, with evaluation metrics when an evaluator is set."""
        if self.evaluate is not None and model is not None:
            was_training = model.training
            record = {**record, **self.evaluate(model)}
            model.train(was_training)
        self.history.append(record)


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    config_cls: type[DefenseConfig]
    run: Callable[[nn.Module, ImageData, DefenseConfig, PurifyContext], nn.Module]
    summary: str


DEFENSES: dict[str, DefenseSpec] = {}


def register_defense(name: str, config_cls: type[DefenseConfig], summary: str):
    """Register ``run`` under ``name`` with its config class (decorator)."""

    def decorate(run):
        if name in DEFENSES:
            raise ValueError(f"a defense named {name!r} is already registered")
        DEFENSES[name] = DefenseSpec(name, config_cls, run, summary)
        return run

    return decorate


@dataclass
class PurifyResult:
    """The purified model and how it was obtained.

    Attributes:
        model: a plain timm model (masks merged) or a ``PolarizedModel``, on the device the
            input model was on (the method itself runs where ``device`` / accelerate says).
        method: registered method name.
        config: every option used, defaults included.
        history: per-epoch records (losses; ACC/ASR when an evaluation attack was given).
        seconds: wall-clock time of the method itself (data loading excluded).
        seed: the seed used.
        num_clean: number of clean images used.
        data: where the clean images came from.
        base_model: reference of the input model (Hub id, folder or architecture).
        before, after: evaluation of the input and of the purified model when requested.
    """

    model: nn.Module
    method: str
    config: dict
    history: list[dict]
    seconds: float
    seed: int
    num_clean: int
    data: str
    base_model: str
    before: EvalResult | None = None
    after: EvalResult | None = None

    def summary(self) -> dict:
        """JSON-serialisable record of everything but the model."""
        return {
            "method": self.method,
            "config": self.config,
            "history": self.history,
            "seconds": self.seconds,
            "seed": self.seed,
            "num_clean": self.num_clean,
            "data": self.data,
            "base_model": self.base_model,
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
        }


def _build_config(method: str, options: dict) -> DefenseConfig:
    spec = DEFENSES[method]
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise PurifyOptionError(
            f"unknown option(s) {unknown} for method {method!r}; its options are: {', '.join(sorted(names))}"
        )
    return spec.config_cls(**options)


def _resolve_auto(report: ScanReport | None, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``method="auto"``: the method the scan's finding picks, with auto's options under the caller's."""
    if report is None:
        raise PurifyOptionError(
            "method='auto' picks the method from a scan's finding: pass "
            "scan_report=timm_purify.scan(model, data), or name a method"
        )
    if "target" in options:
        raise PurifyOptionError(
            "method='auto' takes the target from the scan; to choose it yourself use "
            "method='npd-tp', target=N"
        )
    refused = untaken_error(options)
    if refused:
        raise PurifyOptionError(f"method='auto': {refused}")
    method, chosen = choose_method(AUTO, report, options)
    unused = unused_options(method, options)
    if unused:
        # auto may pick a polarizer or AWM, whose options differ: say what the picked one ignored
        warnings.warn(
            f"method='auto' picked {method!r}, which does not take {unused}: not used", stacklevel=3
        )
    return method, chosen


def purify(
    model: nn.Module,
    data: ImageData | str | os.PathLike,
    *,
    method: str = "npd",
    clean_count: int | None = None,
    clean_fraction: float | None = None,
    eval_data: ImageData | str | os.PathLike | None = None,
    eval_attack=None,
    device: torch.device | str | None = None,
    accelerator=None,
    quiet: bool = False,
    scan_report: ScanReport | None = None,
    **options: Any,
) -> PurifyResult:
    """Remove a backdoor from ``model`` with ``method``, using clean images ``data``.

    Args:
        model: a timm classifier. It is not modified: the method works on a deep copy.
        data: the clean images (an :class:`ImageData`, a bundled set name or a folder, whose
            ``train`` split is used).
        method: a registered method (``timm_purify.defenses.DEFENSES``), or ``"auto"``: the
            finding of ``scan_report`` picks it (npd-tp towards a suspected all-to-one target,
            awm for an all-to-all pattern on any model, cnpd-r for another backdoored LayerNorm
            model, else npd) with
            the options measured best (``timm_purify._auto.AUTO_OPTIONS``); ``**options`` override
            them where the picked method takes them (a warning names those it does not), except
            the target, which is the scan's.
        scan_report: the :func:`timm_purify.scan` report of ``model``, for ``method="auto"``.
        clean_count, clean_fraction: take a class-balanced, seeded subset of ``data``
            (default: all of it).
        eval_data, eval_attack: when given, ACC/ASR before, after and per epoch are recorded
            (``eval_attack`` is an attack object or an ``attack.json`` path).
        **options: fields of the method's config (e.g. ``epochs=``, ``seed=``).

    Raises:
        PurifyOptionError: unknown method or option, invalid value, too few clean images.
    """
    from .. import defenses as _registry  # noqa: F401 - importing registers every method
    from .._wrap import model_reference

    if method == AUTO:
        method, options = _resolve_auto(scan_report, options)
    elif scan_report is not None:
        raise PurifyOptionError(
            f"scan_report is read only by method='auto' (got method={method!r}); to put the scan in "
            "the model card pass it to save_pretrained(result, ..., scan_report=report)"
        )
    if method not in DEFENSES:
        raise PurifyOptionError(
            f"unknown method {method!r}; available: {', '.join(sorted(DEFENSES))}, {AUTO} (with scan_report=)"
        )
    config = _build_config(method, options)
    num_classes = check_classifier(model)
    if not isinstance(data, ImageData):
        data = load_data(data, split="train", model=model)
    else:
        data = data.to_model(model)
    if clean_count is not None or clean_fraction is not None:
        try:
            data = clean_subset(data, count=clean_count, fraction=clean_fraction, seed=config.seed)
        except DataError as err:
            raise PurifyOptionError(str(err)) from err
    if len(data) < num_classes:
        raise PurifyOptionError(
            f"{len(data)} clean images are too few for a {num_classes}-class model; give at least one per class"
        )
    config.validate(num_clean=len(data), num_classes=num_classes)
    if eval_attack is not None and eval_data is None:
        raise PurifyOptionError("eval_attack needs eval_data (the test images to trigger)")
    if isinstance(eval_attack, (str, os.PathLike, dict)):
        from ..attacks import from_json

        eval_attack = from_json(eval_attack)
    dev = get_device(accelerator, device)
    test = None
    if eval_data is not None:
        test = (
            eval_data if isinstance(eval_data, ImageData) else load_data(eval_data, split="test", model=model)
        )
        test = test.to_model(model)

    def run_eval(m: nn.Module) -> dict:
        r = evaluate(m, test, attack=eval_attack, device=dev)
        return {"acc": r.acc, "asr": r.asr}

    before = evaluate(model, test, attack=eval_attack, device=dev) if test is not None else None
    work = copy.deepcopy(model).to(dev)
    work.eval()
    ctx = PurifyContext(
        device=dev,
        normalizer=Normalizer(work).to(dev),
        generator=torch.Generator().manual_seed(config.seed),
        quiet=quiet,
        num_classes=num_classes,
        evaluate=run_eval if test is not None else None,
    )
    start = time.perf_counter()
    purified = DEFENSES[method].run(work, data, config, ctx)
    seconds = time.perf_counter() - start
    purified.eval()
    after = evaluate(purified, test, attack=eval_attack, device=dev) if test is not None else None
    # the result stands in for the input: a CPU model on a GPU machine comes back on the CPU
    purified.to(module_device(model))
    return PurifyResult(
        model=purified,
        method=method,
        config=dataclasses.asdict(config),
        history=ctx.history,
        seconds=seconds,
        seed=config.seed,
        num_clean=len(data),
        data=data.source,
        base_model=model_reference(model),
        before=before,
        after=after,
    )
