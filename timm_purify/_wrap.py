"""Insert a polarizer into a frozen timm model, remove it, save and load it alone.

The base model's module tree is never edited: the polarizer is attached with a forward
(pre-)hook on the module of the chosen :class:`LayerSpot`, so the base keeps its exact
``state_dict`` keys and :meth:`PolarizedModel.unwrap` gives it back unchanged. As in peft's
``inject_adapter``, every check runs before the model is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._layers import LayerSpot, check_classifier, resolve_spot
from ._version import __version__
from .polarizers import Polarizer, build_polarizer

__all__ = [
    "PolarizedModel",
    "wrap_model",
    "save_polarizer",
    "load_polarizer",
    "model_reference",
    "POLARIZER_WEIGHTS",
    "POLARIZER_CONFIG",
]

POLARIZER_WEIGHTS = "polarizer.safetensors"
POLARIZER_CONFIG = "polarizer_config.json"
_HOOK_ATTR = "_timm_purify_polarizer"


def model_reference(model: nn.Module) -> str:
    """The best name for a model's origin: what the user loaded it from (a Hub id, a folder),
    else its Hub id when timm really loaded its weights from the Hub, else its architecture.

    ``pretrained_cfg["hf_hub_id"]`` alone proves nothing: timm fills it from the default
    config even for ``pretrained=False``.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    source = getattr(model, "_timm_purify_source", None)
    if source:
        return source
    if cfg.get("source") == "hf-hub" and cfg.get("hf_hub_id"):
        return cfg["hf_hub_id"]
    return cfg.get("architecture") or type(model).__name__


class PolarizedModel(nn.Module):
    """A frozen base model with a trainable polarizer at ``spot``.

    The wrapper starts in eval mode. ``train()`` switches only the polarizer: the base stays in
    eval mode, so its batch-norm statistics and dropout never change while the polarizer trains.
    """

    def __init__(self, base: nn.Module, polarizer: Polarizer, spot: LayerSpot):
        super().__init__()
        self.base = base
        self.polarizer = polarizer
        self.spot = spot
        self.enabled = True
        self._requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
        self._base_training = base.training
        target = dict(base.named_modules())[spot.name]
        if spot.where == "input":
            self._handle = target.register_forward_pre_hook(self._pre_hook)
        else:
            self._handle = target.register_forward_hook(self._post_hook)
        setattr(target, _HOOK_ATTR, True)
        for p in base.parameters():
            p.requires_grad_(False)
        # start in eval mode, where a fresh polarizer is an exact identity
        self.train(False)

    # hooks -------------------------------------------------------------------------------
    def _pre_hook(self, _module, args):
        if not self.enabled:
            return None
        return (self.polarizer(args[0]), *args[1:])

    def _post_hook(self, _module, _args, output):
        if not self.enabled:
            return None
        return self.polarizer(output)

    # public API --------------------------------------------------------------------------
    @contextlib.contextmanager
    def polarizer_disabled(self) -> Iterator[None]:
        """Run the base model alone inside this context."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.polarizer.conditional:
            with torch.no_grad(), self.polarizer_disabled():
                labels = self.base(x).argmax(dim=1)
            self.polarizer.set_condition(labels)
            try:
                return self.base(x)
            finally:
                self.polarizer.set_condition(None)
        return self.base(x)

    def train(self, mode: bool = True) -> PolarizedModel:
        self.training = mode
        self.polarizer.train(mode)
        self.base.eval()
        return self

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.base, "pretrained_cfg", {})

    def get_classifier(self) -> nn.Module:
        return self.base.get_classifier()

    def unwrap(self) -> nn.Module:
        """Detach the polarizer and return the base model exactly as it was given."""
        self._handle.remove()
        target = dict(self.base.named_modules())[self.spot.name]
        if hasattr(target, _HOOK_ATTR):
            delattr(target, _HOOK_ATTR)
        for name, p in self.base.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, True))
        self.base.train(self._base_training)
        return self.base

    def extra_repr(self) -> str:
        return f"spot={self.spot.name}:{self.spot.where} layout={self.spot.layout} kind={self.polarizer.kind}"


def _check_not_wrapped(model: nn.Module) -> None:
    if isinstance(model, PolarizedModel) or any(hasattr(m, _HOOK_ATTR) for m in model.modules()):
        raise ValueError(
            "this model already carries a polarizer; call `.unwrap()` on its wrapper first, "
            "or wrap the base model"
        )


def wrap_model(
    model: nn.Module,
    *,
    layer: str | float | LayerSpot = "auto",
    polarizer: str = "npd",
    include_prefix: bool = True,
    input_size: tuple[int, int, int] | None = None,
    **polarizer_options,
) -> PolarizedModel:
    """Insert a freshly initialised polarizer into ``model`` and freeze the model.

    Args:
        model: a timm classifier. It is wrapped in place (hooks) and given back by ``unwrap()``.
        layer: ``"auto"`` (the NPD choice generalised, see :func:`resolve_spot`), a module
            name, a regex selecting one module, a depth fraction in [0, 1] or a ``LayerSpot``.
        polarizer: a registered polarizer kind (``"npd"``; CNPD kinds when that defence is
            imported).
        include_prefix: for token layouts, whether class/register tokens pass through the
            polarizer. Included by default: at the usual spot (the last block's MLP) the class
            token is the only path to the logits of a token-pooled ViT, so excluding it would
            leave the polarizer without any effect on the prediction.
        input_size: (C, H, W) override for the dry forward that locates layers.

    Raises:
        LayerNotFoundError, NotAClassifierError, ValueError: before the model is touched.
    """
    check_classifier(model)
    _check_not_wrapped(model)
    spot = resolve_spot(model, layer, input_size=input_size)
    module = build_polarizer(
        polarizer,
        spot.channels,
        spot.layout,
        prefix_tokens=spot.prefix_tokens,
        include_prefix=include_prefix,
        **polarizer_options,
    )
    param = next(model.parameters(), None)
    if param is not None:
        module.to(device=param.device, dtype=param.dtype)
    return PolarizedModel(model, module, spot)


def save_polarizer(
    wrapped: PolarizedModel, directory: str | os.PathLike, *, base_model: str | None = None
) -> Path:
    """Write ``polarizer.safetensors`` and ``polarizer_config.json`` into ``directory``.

    Only the polarizer's tensors are written (parameters and batch-norm buffers); the config
    names the base model so :func:`load_polarizer` can rebuild the wrapper.
    """
    if not isinstance(wrapped, PolarizedModel):
        raise TypeError(f"save_polarizer expects the result of wrap_model, got {type(wrapped).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pol = wrapped.polarizer
    base_model = base_model or model_reference(wrapped.base)
    tensors = {k: v.detach().cpu().contiguous() for k, v in pol.state_dict().items()}
    metadata = {"format": "pt", "library": "timm-purify", "version": __version__, "base_model": base_model}
    save_file(tensors, str(directory / POLARIZER_WEIGHTS), metadata=metadata)
    config = {
        "library": "timm-purify",
        "version": __version__,
        "base_model": base_model,
        "architecture": (getattr(wrapped.base, "pretrained_cfg", None) or {}).get("architecture"),
        "num_classes": wrapped.base.num_classes,
        "spot": wrapped.spot.to_dict(),
        "polarizer": pol.kind,
        "include_prefix": pol.include_prefix,
        "polarizer_options": pol.options(),
    }
    (directory / POLARIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_polarizer(base: nn.Module, directory: str | os.PathLike) -> PolarizedModel:
    """Re-insert a polarizer saved by :func:`save_polarizer` into ``base``.

    Everything (config, architecture, class count, spot, tensor names and shapes) is checked
    before ``base`` is touched.
    """
    directory = Path(directory)
    config_path, weights_path = directory / POLARIZER_CONFIG, directory / POLARIZER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing; a saved polarizer folder holds {POLARIZER_CONFIG} and {POLARIZER_WEIGHTS}"
            )
    try:
        config = json.loads(config_path.read_text())
        spot = LayerSpot.from_dict(config["spot"])
        kind = config["polarizer"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{config_path} is not a valid polarizer config ({err})") from err
    num_classes = check_classifier(base)
    if config.get("num_classes") not in (None, num_classes):
        raise ValueError(
            f"the polarizer was trained for a {config['num_classes']}-class model; this model has {num_classes} classes"
        )
    arch = (getattr(base, "pretrained_cfg", None) or {}).get("architecture")
    if config.get("architecture") and arch and config["architecture"] != arch:
        raise ValueError(f"the polarizer was trained on {config['architecture']!r}; this model is {arch!r}")
    _check_not_wrapped(base)
    resolved = resolve_spot(base, f"{spot.name}:{spot.where}")
    if (resolved.channels, resolved.layout) != (spot.channels, spot.layout):
        raise ValueError(
            f"spot {spot.name} has {resolved.channels} channels ({resolved.layout}) in this model, "
            f"the polarizer expects {spot.channels} ({spot.layout})"
        )
    module = build_polarizer(
        kind,
        spot.channels,
        spot.layout,
        prefix_tokens=spot.prefix_tokens,
        include_prefix=config.get("include_prefix", True),
        **config.get("polarizer_options", {}),
    )
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{weights_path} is not a readable safetensors file ({err})") from err
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_path} does not match a {kind!r} polarizer at {spot.name}: {err}") from err
    param = next(base.parameters(), None)
    if param is not None:
        module.to(device=param.device, dtype=param.dtype)
    return PolarizedModel(base, module, resolved)
