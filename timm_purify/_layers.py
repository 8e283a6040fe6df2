"""Locate places inside any timm classifier where a module can be inserted.

Nothing here knows an architecture's layer names. A model is described by:

* timm's own data: ``feature_info`` (which modules end a stage) and ``pretrained_cfg``
  (input size), read when present;
* one dry forward pass on a dummy input, recording the input tensor of every conv/linear
  and the output of every stage module, which tells the layout (NCHW, NHWC, NLC, NC), the
  channel count and the execution order;
* the module tree, walked when ``feature_info`` is missing (VGG and DenseNet variants).

The automatic spot generalises the NPD reference (input of ``layer4.1.conv1`` of a
PreAct-ResNet18): the input of the first conv/linear, in execution order, of the last block
of the last stage. When a block is a sequence of sub-blocks that each hold several
conv/linear layers (a transformer block: attention, then MLP), the rule descends into the
last sub-block, which gives the input of the MLP of the last transformer block.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "LAYOUTS",
    "LayerSpot",
    "LayerNotFoundError",
    "NotAClassifierError",
    "find_layers",
    "resolve_spot",
    "model_input_size",
    "check_classifier",
]

LAYOUTS = ("NCHW", "NHWC", "NLC", "NC")
_WEIGHTED = (nn.Conv2d, nn.Linear)


class LayerNotFoundError(ValueError):
    """The requested insertion layer does not name exactly one spot of the model."""


class NotAClassifierError(TypeError):
    """The model is not an image classifier timm-purify can act on."""


@dataclass(frozen=True)
class LayerSpot:
    """A place where a module can be inserted.

    Attributes:
        name: dotted module name, as ``model.named_modules()`` gives it.
        where: ``"input"`` (a forward pre-hook on ``name``) or ``"output"`` (a forward hook).
        channels: size of the channel dimension of the tensor at that place.
        layout: ``"NCHW"``, ``"NHWC"``, ``"NLC"`` (tokens) or ``"NC"`` (pooled features).
        depth: position in the forward pass, 0.0 at the stem and 1.0 at the classifier head.
        stage: index of the ``feature_info`` stage (or top-level block) holding the spot,
            ``None`` for the head and for modules outside every stage.
        prefix_tokens: leading class/register tokens in an ``"NLC"`` tensor (0 otherwise).
        shape: the tensor shape seen in the dry forward, batch dimension excluded.
    """

    name: str
    where: str
    channels: int
    layout: str
    depth: float
    stage: int | None
    prefix_tokens: int = 0
    shape: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "where": self.where,
            "channels": self.channels,
            "layout": self.layout,
            "depth": self.depth,
            "stage": self.stage,
            "prefix_tokens": self.prefix_tokens,
            "shape": list(self.shape),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerSpot:
        return cls(**{**d, "shape": tuple(d.get("shape", ()))})


def check_classifier(model: nn.Module) -> int:
    """Return the number of classes, or raise if ``model`` is not a timm-style classifier."""
    if not isinstance(model, nn.Module):
        raise NotAClassifierError(f"expected a torch.nn.Module, got {type(model).__name__}")
    num_classes = getattr(model, "num_classes", None)
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None or not isinstance(num_classes, int):
        raise NotAClassifierError(
            f"{type(model).__name__} has no classifier head (no `get_classifier()` / `num_classes`); "
            "timm-purify acts on timm image classifiers. Create the model with "
            "`timm.create_model(name, num_classes=K)`."
        )
    if num_classes <= 0:
        raise NotAClassifierError(
            f"{type(model).__name__} was built with num_classes={num_classes} (a feature extractor). "
            "Create it with the number of classes it was trained on."
        )
    return num_classes


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) input the model expects.

    A patch embedding built for a fixed grid (timm's ``PatchEmbed.img_size``) is the ground
    truth when present, since ``pretrained_cfg`` keeps the ImageNet size of the family even
    for a model built with ``img_size=32``; otherwise timm's resolved data config.
    """
    from timm.data import resolve_model_data_config

    cfg_size = tuple(resolve_model_data_config(model)["input_size"])
    in_chans = cfg_size[0]
    for module in model.modules():
        img_size = getattr(module, "img_size", None)
        strict = getattr(module, "strict_img_size", True) and not getattr(module, "dynamic_img_size", False)
        if img_size is not None and strict:
            if isinstance(img_size, int):
                img_size = (img_size, img_size)
            chans = getattr(module, "in_chans", None)
            proj = getattr(module, "proj", None)
            if chans is None and isinstance(proj, nn.Conv2d):
                chans = proj.in_channels
            return (int(chans or in_chans), int(img_size[0]), int(img_size[1]))
    return (int(cfg_size[0]), int(cfg_size[1]), int(cfg_size[2]))


def _has_weighted(module: nn.Module) -> bool:
    return any(isinstance(m, _WEIGHTED) for m in module.modules())


def _count_weighted(module: nn.Module) -> int:
    return sum(isinstance(m, _WEIGHTED) for m in module.modules())


def _infer_layout(module: nn.Module, shape: tuple[int, ...], prefix_tokens: int) -> tuple[str, int] | None:
    """Layout and channel count of the tensor ``shape`` (batch included) entering ``module``."""
    if isinstance(module, nn.Conv2d) and len(shape) == 4:
        return "NCHW", shape[1]
    if isinstance(module, nn.Linear):
        if len(shape) == 4:
            return "NHWC", shape[-1]
        if len(shape) == 3:
            return "NLC", shape[-1]
        if len(shape) == 2:
            return "NC", shape[-1]
    if isinstance(module, nn.Conv1d) and len(shape) == 3:
        return None  # sequence convolutions are not insertion spots here
    return None


def _output_layout(shape: tuple[int, ...], reference_channels: int | None) -> tuple[str, int] | None:
    """Layout of a stage output, using the channel count ``feature_info`` declares."""
    if len(shape) == 4:
        if reference_channels is not None and shape[1] == reference_channels:
            return "NCHW", shape[1]
        if reference_channels is not None and shape[-1] == reference_channels:
            return "NHWC", shape[-1]
        return "NCHW", shape[1]
    if len(shape) == 3:
        return "NLC", shape[-1]
    if len(shape) == 2:
        return "NC", shape[-1]
    return None


def _stage_modules(model: nn.Module) -> list[tuple[str, int | None]]:
    """Stage-ending modules with their declared channel counts, from ``feature_info`` if any.

    Without ``feature_info`` the top-level children that hold weights, other than the head,
    stand in for stages.
    """
    names = dict(model.named_modules())
    info = getattr(model, "feature_info", None)
    stages: list[tuple[str, int | None]] = []
    if isinstance(info, Iterable) and not isinstance(info, (str, bytes)):
        for entry in info:
            mod = entry.get("module") if isinstance(entry, dict) else None
            if mod and mod in names:
                stages.append((mod, entry.get("num_chs")))
    if stages:
        return stages
    head = _head_name(model)
    for child_name, child in model.named_children():
        if child_name != head and _has_weighted(child):
            stages.append((child_name, None))
    return stages


def _head_name(model: nn.Module) -> str | None:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if classifier is None:
        return None
    for name, module in model.named_modules():
        if module is classifier:
            return name
    return None


def _dry_forward(
    model: nn.Module, input_size: tuple[int, int, int], watch: dict[str, nn.Module], stages: list[str]
):
    """Run one forward in eval mode (mode restored afterwards), recording for every module of
    ``watch`` its input shape and when it started, and for every stage module its output
    shape and when it ended, on one event counter."""
    in_shapes: dict[str, tuple[int, ...]] = {}
    out_shapes: dict[str, tuple[int, ...]] = {}
    started: dict[str, int] = {}
    ended: dict[str, int] = {}
    clock = [0]
    handles = []

    def pre_hook(name):
        def hook(_module, args):
            if name not in in_shapes and args and isinstance(args[0], torch.Tensor):
                in_shapes[name] = tuple(args[0].shape)
                started[name] = clock[0]
                clock[0] += 1

        return hook

    def post_hook(name):
        def hook(_module, _args, output):
            if name not in out_shapes and isinstance(output, torch.Tensor):
                out_shapes[name] = tuple(output.shape)
                ended[name] = clock[0]
                clock[0] += 1

        return hook

    modules = dict(model.named_modules())
    for name, module in watch.items():
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
    for name in stages:
        handles.append(modules[name].register_forward_hook(post_hook(name)))
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(2, *input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return in_shapes, out_shapes, started, ended, tuple(out.shape)


def find_layers(model: nn.Module, *, input_size: tuple[int, int, int] | None = None) -> list[LayerSpot]:
    """Every insertion spot of ``model``, in execution order.

    Spots are the input of every conv/linear layer that runs in the forward pass (the head's
    input included, as the last spot) and the output of every ``feature_info`` stage.
    ``input_size`` (C, H, W) overrides the size read from the model.
    """
    num_classes = check_classifier(model)
    size = tuple(input_size) if input_size is not None else model_input_size(model)
    stages = _stage_modules(model)
    stage_names = [s for s, _ in stages]
    watch = {n: m for n, m in model.named_modules() if isinstance(m, _WEIGHTED)}
    try:
        in_shapes, out_shapes, started, ended, out_shape = _dry_forward(model, size, watch, stage_names)
    except Exception as err:  # noqa: BLE001 - any failure here means the size is wrong
        raise NotAClassifierError(
            f"a dry forward pass of {type(model).__name__} on a dummy input of size {size} failed ({err}). "
            "Pass input_size=(C, H, W) matching the model, or set it in pretrained_cfg['input_size']."
        ) from err
    if len(out_shape) != 2 or out_shape[1] != num_classes:
        raise NotAClassifierError(
            f"{type(model).__name__} returns a tensor of shape {out_shape}, not (batch, {num_classes}) logits."
        )
    prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
    head = _head_name(model)
    order = sorted(started, key=started.get)
    total = max(len(order) - 1, 1)
    position = {name: i for i, name in enumerate(order)}

    def stage_of(name: str) -> int | None:
        # the first stage whose output is produced after this layer starts: the stage that
        # runs it, whether the stage module contains it or (VGG, DenseNet) only ends after it
        for idx, stage in enumerate(stage_names):
            if stage in ended and ended[stage] > started[name]:
                return idx
        return None

    spots: list[tuple[float, int, LayerSpot]] = []
    for name in order:
        found = _infer_layout(watch[name], in_shapes[name], prefix_tokens)
        if found is None:
            continue
        layout, channels = found
        is_head = name == head or (head is not None and name.startswith(head + "."))
        depth = 1.0 if is_head else round(position[name] / total, 4)
        spot = LayerSpot(
            name=name,
            where="input",
            channels=int(channels),
            layout=layout,
            depth=depth,
            stage=None if is_head else stage_of(name),
            prefix_tokens=prefix_tokens if layout == "NLC" else 0,
            shape=tuple(in_shapes[name][1:]),
        )
        spots.append((depth, 0, spot))
    for idx, (stage, num_chs) in enumerate(stages):
        if stage not in out_shapes:
            continue
        found = _output_layout(out_shapes[stage], num_chs)
        if found is None:
            continue
        layout, channels = found
        # the stage output sits just after the last conv/linear that started before it ended
        inner = [position[n] for n in order if started[n] < ended[stage]]
        depth = round((max(inner) + 0.5) / total, 4) if inner else 0.0
        spots.append(
            (
                min(depth, 0.9999),
                1,
                LayerSpot(
                    name=stage,
                    where="output",
                    channels=int(channels),
                    layout=layout,
                    depth=min(depth, 0.9999),
                    stage=idx,
                    prefix_tokens=prefix_tokens if layout == "NLC" else 0,
                    shape=tuple(out_shapes[stage][1:]),
                ),
            )
        )
    spots.sort(key=lambda t: (t[0], t[1]))
    return [s for _, _, s in spots]


def _weighted_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, c) for n, c in module.named_children() if _has_weighted(c)]


def _is_block_sequence(module: nn.Module) -> bool:
    """A container of blocks: a Sequential/ModuleList/ModuleDict, or repeated same-class
    children that each hold several conv/linear layers (timm's ``RegStage`` with ``b1 .. bN``)."""
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return True
    kids = [c for _, c in _weighted_children(module)]
    return len(kids) >= 2 and len({type(k) for k in kids}) == 1 and all(_count_weighted(k) >= 2 for k in kids)


def _is_subblock_sequence(module: nn.Module) -> bool:
    """True when every weighted child holds two or more conv/linear layers (attention, MLP)."""
    kids = [c for _, c in _weighted_children(module)]
    return bool(kids) and all(_count_weighted(c) >= 2 for c in kids)


def _auto_block(model: nn.Module, last_layer: str) -> str:
    """The last block holding ``last_layer``: the child, on its path, of its deepest
    block-sequence ancestor; descended into its last sub-block while it is made of
    sub-blocks (a transformer block: attention, then MLP)."""
    modules = dict(model.named_modules())
    parts = last_layer.split(".")
    block = last_layer
    for i in range(len(parts) - 1, 0, -1):
        if _is_block_sequence(modules[".".join(parts[:i])]):
            block = ".".join(parts[: i + 1])
            break
    while _is_subblock_sequence(modules[block]):
        block = f"{block}.{_weighted_children(modules[block])[-1][0]}"
    return block


def _auto_spot(model: nn.Module, spots: list[LayerSpot]) -> LayerSpot:
    inputs = [s for s in spots if s.where == "input" and s.depth < 1.0]
    if not inputs:
        raise LayerNotFoundError("the model has no conv/linear layer before its head to insert a module at")
    staged = [s for s in inputs if s.stage is not None]
    if not staged:
        return inputs[-1]  # no stage information: the deepest conv/linear input before the head
    last_stage = max(s.stage for s in staged)
    in_stage = [s for s in staged if s.stage == last_stage]
    block = _auto_block(model, in_stage[-1].name)
    in_block = [s for s in in_stage if s.name == block or s.name.startswith(block + ".")]
    return in_block[0] if in_block else in_stage[-1]


def resolve_spot(
    model: nn.Module,
    layer: str | float | LayerSpot = "auto",
    *,
    spots: list[LayerSpot] | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> LayerSpot:
    """Turn a user's ``layer`` choice into exactly one :class:`LayerSpot`.

    ``layer`` may be ``"auto"``; ``"last-stage"`` (the output of the last ``feature_info``
    stage: on the main path, so it also acts where a residual branch is still nearly switched
    off, as timm's zero-initialised last norm leaves it in briefly trained ResNets); an exact
    module name (its input); ``"name:output"`` for the
    output of a stage module; a regular expression (``re.fullmatch`` over module names, which
    must select exactly one spot); a float in [0, 1] (the input spot nearest that depth); or a
    ``LayerSpot`` from :func:`find_layers`.
    """
    spots = spots if spots is not None else find_layers(model, input_size=input_size)
    if isinstance(layer, LayerSpot):
        for s in spots:
            if s.name == layer.name and s.where == layer.where:
                return s
        raise LayerNotFoundError(f"{layer.name!r} ({layer.where}) is not an insertion spot of this model")
    if isinstance(layer, (int, float)) and not isinstance(layer, bool):
        if not 0.0 <= float(layer) <= 1.0:
            raise LayerNotFoundError(f"a depth fraction must lie in [0, 1], got {layer}")
        candidates = [s for s in spots if s.where == "input" and s.depth < 1.0] or spots
        return min(candidates, key=lambda s: (abs(s.depth - float(layer)), s.depth))
    if not isinstance(layer, str) or not layer:
        raise LayerNotFoundError(
            f"layer must be 'auto', a module name, a regex or a depth in [0, 1], got {layer!r}"
        )
    if layer == "auto":
        return _auto_spot(model, spots)
    if layer == "last-stage":
        outputs = [s for s in spots if s.where == "output" and s.stage is not None]
        if not outputs:
            raise LayerNotFoundError("the model declares no stages (feature_info); name a layer instead")
        return max(outputs, key=lambda s: (s.stage, s.depth))
    where = "input"
    name = layer
    if layer.endswith(":output") or layer.endswith(":input"):
        name, where = layer.rsplit(":", 1)
    exact = [s for s in spots if s.name == name and s.where == where]
    if exact:
        return exact[0]
    try:
        pattern = re.compile(name)
    except re.error as err:
        raise LayerNotFoundError(
            f"{name!r} is neither a module name of this model nor a valid regex ({err})"
        ) from err
    matches = [s for s in spots if s.where == where and pattern.fullmatch(s.name)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        shown = ", ".join(s.name for s in matches[:6]) + (" ..." if len(matches) > 6 else "")
        raise LayerNotFoundError(
            f"{layer!r} matches {len(matches)} spots ({shown}); make the pattern select one"
        )
    close = [s.name for s in spots if name.split(".")[-1] in s.name][:5]
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise LayerNotFoundError(
        f"{layer!r} names no {where} spot of this model.{hint} "
        "List them with `timm_purify.find_layers(model)` or `timm-purify layers MODEL`."
    )
