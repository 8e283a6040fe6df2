"""Write a purified model as a Hub-ready folder, and read such folders back.

A folder has one of three forms, recorded in ``config.json`` (``timm_purify.form``), in the
safetensors metadata and in ``purify_result.json``:

* ``plain``: a timm model with its original keys (methods that merge their masks, or any
  plain model). Vanilla ``timm.create_model('local-dir:...', pretrained=True)`` loads it.
* ``folded``: a polarizer folded exactly into the layer it feeds (:mod:`timm_purify._fold`);
  also a plain timm model.
* ``polarizer``: the unchanged base model plus ``polarizer.safetensors`` and
  ``polarizer_config.json``; :func:`from_pretrained` rebuilds the wrapper. Vanilla timm
  would load only the base model, so the card says so in a warning.

Beside the weights: ``purify_result.json`` (what was done and measured), ``README.md`` (the
model card) and its figures. Everything is written into a temporary folder beside the
destination, loaded back and compared with the model in memory, and only then renamed into
place, so a failure never leaves a half-written or wrong folder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._device import module_device
from ._fold import can_fold, fold_polarizer
from ._layers import model_input_size
from ._version import __version__
from ._wrap import (
    _HOOK_ATTR,
    POLARIZER_WEIGHTS,
    PolarizedModel,
    load_polarizer,
    save_polarizer,
)

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "SaveError",
    "OutputExistsError",
    "PURIFY_RESULT",
    "MODEL_CARD",
    "MODEL_WEIGHTS",
    "LOGIT_ATOL",
]

PURIFY_RESULT = "purify_result.json"
MODEL_CARD = "README.md"
MODEL_WEIGHTS = "model.safetensors"
# merged or reloaded logits may differ from the model in memory by at most this much
LOGIT_ATOL = 1e-4
_CHECK_BATCH = 4


class SaveError(ValueError):
    """The model cannot be written as asked; nothing was written (the message says what to do)."""


class OutputExistsError(SaveError):
    """The output folder already holds files, or is the folder the model was loaded from."""


@dataclass
class _Plan:
    """What will be written: the form, the module whose weights go to model.safetensors, the
    wrapper when a polarizer is kept, and how the merge went."""

    form: str
    weights: nn.Module
    wrapped: PolarizedModel | None
    fold_note: str
    merge_diff: float | None


# ---------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------
def _normalise_merge(merge: Any) -> str | bool:
    if merge in ("auto", True, False):
        return merge
    aliases = {"yes": True, "true": True, "no": False, "false": False}
    if isinstance(merge, str) and merge.lower() in aliases:
        return aliases[merge.lower()]
    raise SaveError(f"merge must be 'auto', True or False, got {merge!r}")


def _source_folders(model: nn.Module, references: list[str | None]) -> list[Path]:
    """Folders the model was loaded from (timm's local-dir ``file``, timm-purify's spec)."""
    base = model.base if isinstance(model, PolarizedModel) else model
    cfg = getattr(base, "pretrained_cfg", None) or {}
    candidates = [getattr(base, "_timm_purify_source", None), cfg.get("file"), *references]
    folders = []
    for ref in candidates:
        if not isinstance(ref, str | os.PathLike) or not str(ref):
            continue
        text = str(ref)
        text = text[len("local-dir:") :] if text.startswith("local-dir:") else text
        path = Path(text).expanduser()
        if path.is_file():
            path = path.parent
        if path.is_dir():
            folders.append(path.resolve())
    return folders


def _check_out_dir(out: Path, sources: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"{out} exists and is a file; choose a folder path for the output (nothing was written)"
        )
    if out.is_dir() and any(out.iterdir()):
        raise OutputExistsError(
            f"{out} already exists and is not empty; choose another output folder or remove it (nothing was written)"
        )
    resolved = out.resolve()
    for src in sources:
        if resolved == src or src in resolved.parents:
            raise OutputExistsError(
                f"{out} is inside {src}, the folder the model was loaded from; write the purified model to a "
                "new folder so the original stays intact (nothing was written)"
            )


def _has_polarizer_hook(model: nn.Module) -> bool:
    return any(hasattr(m, _HOOK_ATTR) for m in model.modules())


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return model(x.to(device=device, dtype=dtype)).float().cpu()
    finally:
        model.train(was_training)


def _check_inputs(model: nn.Module) -> torch.Tensor:
    base = model.base if isinstance(model, PolarizedModel) else model
    generator = torch.Generator().manual_seed(0)
    return torch.randn(_CHECK_BATCH, *model_input_size(base), generator=generator)


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((_logits(a, x) - _logits(b, x)).abs().max())


# ---------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------
def _merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parametrization (a mask) folded into a plain tensor.

    ``torch.nn.utils.parametrize.remove_parametrizations`` cannot be used on a copy: it deletes
    the property from the ``Parametrized<Class>`` class, which the copy *shares* with the
    original, and so breaks the caller's model. Here only the copy's instances change class.
    """
    merged = copy.deepcopy(model)
    for module in merged.modules():
        if not parametrize.is_parametrized(module):
            continue
        values = {}
        for name, plist in module.parametrizations.items():
            original = getattr(plist, "original", None)
            if original is None:
                raise SaveError(
                    f"{type(module).__name__}.{name} has a multi-tensor parametrization; merge it with "
                    "torch.nn.utils.parametrize.remove_parametrizations before saving"
                )
            with torch.no_grad():
                values[name] = (getattr(module, name).detach().clone(), isinstance(original, nn.Parameter))
        module.__class__ = type(module).__bases__[0]
        del module._modules["parametrizations"]
        for name, (value, is_param) in values.items():
            if is_param:
                module.register_parameter(name, nn.Parameter(value, requires_grad=False))
            else:
                module.register_buffer(name, value)
    return merged


def _plan(model: nn.Module, merge: str | bool, x: torch.Tensor) -> _Plan:
    if isinstance(model, PolarizedModel):
        if any(parametrize.is_parametrized(m) for m in model.base.modules()):
            raise SaveError(
                "the polarized model's base still carries parametrizations (unmerged masks); merge them "
                "(timm_purify.defenses._common.merge_masks) before saving"
            )
        foldable, reason = can_fold(model)
        if merge is False:
            return _Plan("polarizer", model.base, model, f"not merged (merge=False); {reason}", None)
        if not foldable:
            if merge is True:
                raise SaveError(
                    f"cannot merge the polarizer into the model: {reason}. Save with merge='auto' (or "
                    "--merge auto) to write the base model plus the polarizer files instead (nothing was written)"
                )
            return _Plan("polarizer", model.base, model, reason, None)
        folded = fold_polarizer(model)
        diff = _max_diff(folded, model, x)
        if not diff <= LOGIT_ATOL:
            raise SaveError(
                f"the folded model's logits differ from the polarized model's by {diff:.2e} (> {LOGIT_ATOL}) on "
                "random inputs; refusing to write it. Save with merge=False to keep the polarizer separate."
            )
        return _Plan("folded", folded, None, reason, diff)
    if _has_polarizer_hook(model):
        raise SaveError(
            "this model carries a polarizer hook: pass the PolarizedModel itself (or the PurifyResult), "
            "not its `.base`, so the polarizer is saved too"
        )
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        if merge is False:
            raise SaveError(
                "the model still carries parametrizations (unmerged masks), which vanilla timm cannot load; "
                "save with merge='auto' to fold them into the weights"
            )
        merged = _merged_copy(model)
        diff = _max_diff(merged, model, x)
        if not diff <= LOGIT_ATOL:
            raise SaveError(
                f"merging the masks changed the logits by {diff:.2e}; refusing to write the model"
            )
        return _Plan("plain", merged, None, "masks merged into the weights", diff)
    return _Plan("plain", model, None, "plain model", None)


def _write_weights(model: nn.Module, folder: Path, *, metadata: dict[str, str], config_extra: dict) -> None:
    """timm's ``config.json`` + ``model.safetensors``, the latter re-written with our metadata."""
    from safetensors.torch import load_file, save_file
    from timm.models import save_for_hf

    save_for_hf(model, folder, model_config={"timm_purify": config_extra}, safe_serialization=True)
    weights = folder / MODEL_WEIGHTS
    tensors = load_file(str(weights))
    save_file(tensors, str(weights), metadata=metadata)


def _verify_folder(folder: Path, plan: _Plan, x: torch.Tensor) -> float:
    """Load the written folder the way users will and compare its logits with the model."""
    import timm

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    if plan.form == "polarizer":
        loaded = load_polarizer(loaded, folder)
        reference: nn.Module = plan.wrapped
    else:
        reference = plan.weights
    # on the reference's device: CUDA convolutions run in TF32 by default and differ from the
    # CPU by ~1e-3 in the logits, which would read as a broken file
    loaded.to(module_device(reference))
    diff = _max_diff(loaded, reference, x)
    if not diff <= LOGIT_ATOL:
        raise SaveError(
            f"the written folder does not reproduce the model (logits differ by {diff:.2e}); nothing was kept. "
            "Report this as a bug with the model's architecture."
        )
    return diff


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    return str(value)


def save_pretrained(
    result_or_model,
    out_dir: str | os.PathLike,
    *,
    merge: str | bool = "auto",
    scan_report=None,
    evaluations: dict | None = None,
    command: str | None = None,
    base_model: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Write a purified model, its record and its model card to a new folder.

    Args:
        result_or_model: a :class:`~timm_purify.defenses.PurifyResult` (preferred: the card then
            says what was done) or a model (plain timm model or ``PolarizedModel``).
        out_dir: the folder to create. It must not exist or be empty, and must not be (inside)
            the folder the model was loaded from.
        merge: for a polarizer, ``"auto"`` folds it when the fold is exact and otherwise
            keeps it in its own files; ``True`` requires the fold (error if impossible);
            ``False`` always keeps the polarizer separate. Masks are always merged.
        scan_report: a ``ScanReport`` (or its dict) of the base model, shown in the card.
        evaluations: extra ``{attack: (before, after)}`` EvalResult pairs for the card.
        command: the command line that reproduces the folder, shown in the card.
        base_model: the input model's reference (default: the result's, or the model's).
        repo_id: the Hub repository this folder is meant for (used in the card's snippets).
        license: license id for the card (the base model's, usually).

    Returns:
        The output folder.

    Raises:
        OutputExistsError: ``out_dir`` is not empty, or is where the model came from.
        SaveError: the merge is impossible or inexact, or the written folder does not
            reproduce the model. Nothing is written in either case.
    """
    from ._train import environment_info
    from .defenses import PurifyResult
    from .hub_cards import build_model_card, merge_evaluations, write_plots

    result = result_or_model if isinstance(result_or_model, PurifyResult) else None
    model = result.model if result is not None else result_or_model
    if not isinstance(model, nn.Module):
        raise SaveError(f"expected a PurifyResult or a torch model, got {type(result_or_model).__name__}")
    merge = _normalise_merge(merge)
    out = Path(out_dir).expanduser()
    if base_model is None:
        from ._wrap import model_reference

        base_model = (
            result.base_model
            if result is not None
            else model_reference(model.base if isinstance(model, PolarizedModel) else model)
        )
    _check_out_dir(out, _source_folders(model, [base_model]))
    scan = _jsonable(scan_report) if scan_report is not None else None
    evals = merge_evaluations(result, evaluations)

    x = _check_inputs(model)
    plan = _plan(model, merge, x)
    method = result.method if result is not None else None
    conditional = plan.wrapped is not None and bool(plan.wrapped.polarizer.conditional)
    info = {
        "version": __version__,
        "form": plan.form,
        "method": method,
        "base_model": base_model,
        "polarizer": POLARIZER_WEIGHTS if plan.form == "polarizer" else None,
    }
    metadata = {
        "format": "pt",
        "library": "timm-purify",
        "version": __version__,
        "form": plan.form,
        "method": method or "none",
        "base_model": base_model,
    }
    base = plan.weights
    class_names = (getattr(base, "pretrained_cfg", None) or {}).get("label_names") or (scan or {}).get(
        "class_names"
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_weights(base, tmp, metadata=metadata, config_extra=info)
        if plan.wrapped is not None:
            save_polarizer(plan.wrapped, tmp, base_model=base_model)
        reload_diff = _verify_folder(tmp, plan, x)
        environment = environment_info()
        record = {
            "timm_purify": __version__,
            "form": plan.form,
            "fold": {
                "folded": plan.form == "folded",
                "reason": plan.fold_note,
                "merge_max_logit_diff": plan.merge_diff,
                "reload_max_logit_diff": reload_diff,
            },
            "base_model": base_model,
            "result": _jsonable(result.summary()) if result is not None else None,
            "scan": scan,
            "evaluations": {
                name: {"before": b.to_dict(), "after": a.to_dict()} for name, (b, a) in evals.items()
            },
            "command": command,
            "environment": environment,
        }
        (tmp / PURIFY_RESULT).write_text(json.dumps(record, indent=2) + "\n")
        plots = write_plots(tmp, evaluations=evals, scan_report=scan, class_names=class_names)
        card = build_model_card(
            result=result,
            scan_report=scan,
            evaluations=evaluations,
            base_model=base_model,
            command=command,
            plot_files=plots,
            license=license,
            repo_id=repo_id,
            save_form=plan.form,
            fold_note=plan.fold_note,
            conditional=conditional,
            class_names=class_names,
            environment={k: environment.get(k) for k in ("timm_purify", "torch", "timm", "python")},
        )
        (tmp / MODEL_CARD).write_text(card.content, encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory on every OS
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------
def from_pretrained(
    dir_or_repo_id: str | os.PathLike,
    *,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    **load_kwargs,
) -> nn.Module:
    """Load a folder written by :func:`save_pretrained`, locally or from the Hub.

    Plain and folded folders give a timm model; a folder with ``polarizer_config.json``
    gives the base model with its polarizer re-inserted (a ``PolarizedModel``). Every file is
    inspected statically before anything is read (:func:`timm_purify.detection.inspect_files`).

    Args:
        dir_or_repo_id: a folder (or ``local-dir:/path``), or a Hub id ``org/name[@rev]``
            (or ``hf-hub:org/name``), downloaded through the Hugging Face cache.
        endpoint, cache_dir, token: for Hub ids, passed to ``huggingface_hub.snapshot_download``
            (default: ``HF_ENDPOINT``, the usual cache and the logged-in token).
        **load_kwargs: passed to :func:`timm_purify._hub.load_model` (e.g. ``num_classes`` to
            check the head size).
    """
    from ._hub import ModelSpecError, load_model, resolve_source

    spec = str(dir_or_repo_id)
    if resolve_source(spec)[0] == "architecture":
        raise ModelSpecError(
            f"{spec!r} is a timm architecture name, not a saved model: pass a folder written by "
            "save_pretrained / `timm-purify purify`, or a Hub id (org/name)."
        )
    return load_model(spec, endpoint=endpoint, cache_dir=cache_dir, token=token, **load_kwargs)
