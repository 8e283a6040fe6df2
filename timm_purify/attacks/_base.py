"""The contract every backdoor attack follows, the attack registry and the JSON round trip.

An attack is a small typed dataclass (its *spec*): everything needed to rebuild the exact same
trigger and the exact same poisoned training set lives in its fields, so a benchmark can store
``attack.to_dict()`` next to a model and anyone can plant, or test against, the same backdoor
later. Triggers are built lazily for each image shape they meet (BackdoorBench defines them at
32x32; every attack scales them to the image it is given) and cached per
``(C, H, W, device, dtype)``.

Seeded trigger content (Blended's noise image, LF's pattern, Trojan's watermark, WaNet's grid)
comes from Python's :class:`random.Random`, not from torch: Python guarantees that
``Random(seed).random()`` yields the same sequence on every version and platform, and the few
operations applied afterwards are exact IEEE arithmetic done in Python, so the content and its
SHA-256 (stored by :meth:`Attack.to_dict`) are bit-identical on every machine. Sample selection
uses a local ``torch.Generator`` seeded with :attr:`Attack.seed`, as the project's conventions ask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ..data import ImageData

__all__ = [
    "ATTACKS",
    "MODES",
    "REFERENCE_SIZE",
    "Attack",
    "AttackConfigError",
    "AttackInputError",
    "PoisonResult",
    "UnknownAttackError",
    "build_attack",
    "from_dict",
    "from_json",
    "register_attack",
    "pick_channels",
    "resize_pattern",
    "scaled_size",
    "seeded_gaussian",
    "seeded_uniform",
    "tensor_sha256",
    "to_uint8",
]

ATTACKS: dict[str, type[Attack]] = {}
MODES: tuple[str, ...] = ("all-to-one", "all-to-all")
REFERENCE_SIZE = 32
"""Image side (pixels) at which BackdoorBench defines every trigger; triggers scale from it."""

FORMAT_VERSION = 1
# Keys of ``to_dict`` that are records, not constructor fields; ``from_dict`` checks or ignores them.
_META_KEYS = ("name", "format_version", "clean_label", "reference_size", "built_for", "trigger_sha256")
# Rows triggered per call of ``apply`` while poisoning: bounds the float copy of a big data set.
_POISON_CHUNK = 512


class AttackConfigError(ValueError):
    """An attack spec that cannot work (bad field, unknown name, spec/data mismatch)."""


class UnknownAttackError(AttackConfigError):
    """No attack is registered under the requested name."""


class AttackInputError(ValueError):
    """Images handed to an attack are not float (N, C, H, W) tensors in [0, 1]."""


@dataclass(frozen=True)
class PoisonResult:
    """What :meth:`Attack.poison_detailed` did to a training set.

    ``poison_mask`` marks rows that carry the trigger *and* (for dirty-label attacks) the target
    label: these are the rows a defence should "find". ``cross_mask`` marks rows that were changed
    but kept their true label (WaNet's noise-mode samples, which teach the model that *other*
    warps mean nothing); it is all False for every other attack. The two masks never overlap.
    """

    data: ImageData
    poison_mask: torch.Tensor
    cross_mask: torch.Tensor

    @property
    def num_poisoned(self) -> int:
        return int(self.poison_mask.sum())

    @property
    def num_cross(self) -> int:
        return int(self.cross_mask.sum())


# ----------------------------------------------------------------------------- seeded content


def seeded_uniform(seed: int, count: int, *, stream: str) -> list[float]:
    """``count`` floats in [0, 1) that are identical on every Python version and platform.

    ``stream`` separates attacks (and parts of one attack) that share a seed, so Blended and LF
    with ``seed=0`` do not draw the same numbers.
    """
    rng = random.Random(f"timm-purify/{stream}/{int(seed)}")
    return [rng.random() for _ in range(count)]


def seeded_gaussian(seed: int, count: int, *, stream: str) -> list[float]:
    """Approximately standard-normal floats (Irwin-Hall: sum of 12 uniforms minus 6).

    Why not Box-Muller: ``log``/``cos`` come from the platform's libm and may differ in the last
    bit between machines; sums of uniforms use only exactly-rounded additions, so the values (and
    the trigger hash built from them) are the same everywhere. The tails are cut at +-6 sigma,
    which is irrelevant for a noise image that is clipped to [0, 1] anyway.
    """
    u = seeded_uniform(seed, 12 * count, stream=stream)
    return [math.fsum(u[12 * i : 12 * i + 12]) - 6.0 for i in range(count)]


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes and little-endian float32 values, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous().flatten()
        digest.update(name.encode())
        digest.update(repr(tuple(tensors[name].shape)).encode())
        digest.update(struct.pack(f"<{t.numel()}f", *t.tolist()))
    return digest.hexdigest()


def scaled_size(size: float, extent: int) -> int:
    """A length defined at the 32-pixel reference, scaled to an image side of ``extent`` (>= 1)."""
    return max(1, min(extent, round(size * extent / REFERENCE_SIZE)))


def resize_pattern(pattern: torch.Tensor, height: int, width: int, *, mode: str = "bilinear") -> torch.Tensor:
    """Resize a (C, h, w) pattern to (C, height, width); anti-aliased when shrinking."""
    if pattern.shape[-2:] == (height, width):
        return pattern.clone()
    shrinking = height < pattern.shape[-2] or width < pattern.shape[-1]
    kwargs: dict[str, Any] = {"mode": mode}
    if mode in ("bilinear", "bicubic"):
        kwargs["align_corners"] = False
        kwargs["antialias"] = shrinking
    out = torch.nn.functional.interpolate(pattern[None].double(), size=(height, width), **kwargs)
    return out[0].float()


def pick_channels(pattern: torch.Tensor, channels: int) -> torch.Tensor:
    """Map a 3-channel seeded pattern onto ``channels`` channels (grey images take channel 0).

    Cycling through the source channels keeps grey and RGB triggers of one seed related and
    deterministic without drawing new random numbers.
    """
    index = torch.arange(channels) % pattern.shape[0]
    return pattern[index]


# ----------------------------------------------------------------------------- the contract


@dataclass(kw_only=True)
class Attack:
    """Base class of every attack: a typed spec plus ``apply`` / ``poison`` / JSON round trip.

    Subclasses are ``@dataclass(kw_only=True)`` classes decorated with :func:`register_attack`.
    They implement :meth:`_build_trigger` (tensors that depend only on the image shape, built
    once per shape and cached) and :meth:`_apply` (the vectorised trigger application); attacks
    whose trigger content is drawn from the seed also implement :meth:`_seeded_content` so
    :meth:`to_dict` can record its hash.

    Fields shared by all attacks (BackdoorBench defaults):

    * ``target``: the target class (all-to-one).
    * ``mode``: ``"all-to-one"`` (every triggered image -> ``target``) or ``"all-to-all"``
      (label ``y`` -> ``(y + 1) % num_classes``).
    * ``poison_rate``: share of the training set that is poisoned (dirty-label attacks) in (0, 1].
    * ``seed``: drives both the trigger content (where it is random) and the choice of rows.
    * ``num_classes``: needed for all-to-all; when given it is checked against the data.
    """

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False

    target: int = 0
    mode: str = "all-to-one"
    poison_rate: float = 0.1
    seed: int = 0
    num_classes: int | None = None

    # ------------------------------------------------------------------ validation & caching

    def __post_init__(self) -> None:
        self.validate()

    def __setattr__(self, key: str, value: Any) -> None:
        # A changed field makes cached triggers stale: drop them so ``apply`` rebuilds.
        object.__setattr__(self, key, value)
        if not key.startswith("_"):
            self.__dict__.pop("_cache", None)

    def validate(self) -> None:
        """Raise :class:`AttackConfigError` (saying how to fix it) if the spec cannot work.

        Subclasses extend it with their own fields and call ``super().validate()``.
        """
        label = f"attack {self.name!r}"
        if self.mode not in MODES:
            raise AttackConfigError(f"{label}: unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if isinstance(self.poison_rate, bool) or not isinstance(self.poison_rate, (int, float)):
            raise AttackConfigError(
                f"{label}: poison_rate must be a number in (0, 1], got {self.poison_rate!r}"
            )
        if not (0.0 < float(self.poison_rate) <= 1.0):
            raise AttackConfigError(
                f"{label}: poison_rate must be in (0, 1] (a share of the training set, e.g. 0.1 for 10%), "
                f"got {self.poison_rate!r}"
            )
        _check_int(label, "seed", self.seed)
        _check_int(label, "target", self.target, minimum=0)
        if self.num_classes is not None:
            _check_int(label, "num_classes", self.num_classes, minimum=2)
            if self.target >= self.num_classes:
                raise AttackConfigError(
                    f"{label}: target {self.target} is not a class of a {self.num_classes}-class task; "
                    f"pick a target in 0..{self.num_classes - 1}"
                )
        if self.mode == "all-to-all":
            if self.clean_label:
                raise AttackConfigError(
                    f"{label} is clean-label (it never changes labels), so it only supports mode='all-to-one'"
                )
            if self.num_classes is None:
                raise AttackConfigError(
                    f"{label}: mode='all-to-all' maps label y to (y + 1) % num_classes, so it needs "
                    f"num_classes; pass num_classes=len(data.classes)"
                )

    def _trigger(self, channels: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
        """The trigger tensors for one image shape, built once and cached."""
        cache: dict = self.__dict__.setdefault("_cache", {})
        key = (channels, height, width, str(device), dtype)
        if key not in cache:
            cpu_key = (channels, height, width, "cpu", torch.float32)
            if cpu_key not in cache:
                cache[cpu_key] = self._build_trigger(channels, height, width)
            cache[key] = {k: v.to(device=device, dtype=dtype) for k, v in cache[cpu_key].items()}
        return cache[key]

    def _content(self) -> dict[str, torch.Tensor] | None:
        """Seeded trigger content, built once (see :meth:`_seeded_content`)."""
        cache: dict = self.__dict__.setdefault("_cache", {})
        if "content" not in cache:
            cache["content"] = self._seeded_content()
        return cache["content"]

    # ------------------------------------------------------------------ hooks for subclasses

    def _seeded_content(self) -> dict[str, torch.Tensor] | None:
        """Trigger content drawn from the seed, at its native (small, resolution-free) size.

        Its SHA-256 goes into :meth:`to_dict`, and :func:`from_dict` checks that the same spec
        regenerates it bit for bit. ``None`` for attacks whose trigger is a fixed formula.
        """
        return None

    def _build_trigger(self, channels: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """Tensors (CPU, float32) the trigger needs at this image shape; default: none."""
        return {}

    def _apply(self, x: torch.Tensor, trigger: dict[str, torch.Tensor]) -> torch.Tensor:
        """Triggered copy of ``x`` (float32/64, checked shape); must not modify ``x`` in place."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public API

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on a batch of images.

        ``x`` is float in [0, 1] with shape (N, C, H, W) at any size, on any device. Returns a new
        tensor of the same shape, dtype and device, clamped to [0, 1]; ``x`` is left untouched.
        The output depends only on the spec and on each image (not on the rest of the batch).
        """
        _check_images(x, self.name)
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        _, c, h, w = work.shape
        trigger = self._trigger(c, h, w, work.device, work.dtype)
        out = self._apply(work, trigger)
        return out.clamp(0.0, 1.0).to(x.dtype)

    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Labels the backdoor should produce for triggered images whose true labels are ``y``."""
        if self.mode == "all-to-one":
            return torch.full_like(y, self.target)
        return (y + 1) % self._require_num_classes()

    def asr_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Test samples that count for the attack success rate.

        All-to-one: images not already of the target class (their "success" would be free).
        All-to-all: every image (its target always differs from its label).
        """
        if self.mode == "all-to-one":
            return y != self.target
        return torch.ones_like(y, dtype=torch.bool)

    def poison(self, data: ImageData) -> tuple[ImageData, torch.Tensor]:
        """Poisoned copy of a training set and the bool mask of its poisoned rows.

        Shorthand for :meth:`poison_detailed` for callers that do not need the cross rows.
        """
        result = self.poison_detailed(data)
        return result.data, result.poison_mask

    def poison_detailed(self, data: ImageData) -> PoisonResult:
        """Poison a training set (uint8 images); rows keep their order, none are added.

        Dirty-label attacks trigger ``round(poison_rate * N)`` rows drawn from all classes
        (BackdoorBench; target-class rows may be drawn too) and relabel them with
        :meth:`target_labels`. Clean-label attacks draw only from the target class (rate relative
        to the whole set, capped at the class size) and keep the labels. Rows are drawn with a
        ``torch.Generator`` seeded by :attr:`seed`, so the same spec poisons the same rows.
        """
        self.validate()
        self._check_data(data)
        n = len(data)
        generator = torch.Generator().manual_seed(int(self.seed))
        if self.clean_label:
            candidates = torch.nonzero(data.y.cpu() == self.target).flatten()
            count = min(round(self.poison_rate * n), len(candidates))
            if len(candidates) == 0:
                raise AttackConfigError(
                    f"clean-label attack {self.name!r} poisons images of the target class "
                    f"{self.target} ({data.classes[self.target]!r}), but the data set has none; "
                    f"pick a target class that occurs in the data"
                )
            order = candidates[torch.randperm(len(candidates), generator=generator)]
        else:
            count = round(self.poison_rate * n)
            order = torch.randperm(n, generator=generator)
        if count == 0:
            raise AttackConfigError(
                f"attack {self.name!r}: poison_rate {self.poison_rate} of {n} images rounds to zero "
                f"poisoned images; raise poison_rate or poison a larger set"
            )
        poison_idx = order[:count]
        x = data.x.clone()
        y = data.y.clone()
        device_idx = poison_idx.to(x.device)
        x[device_idx] = self._triggered_uint8(data.x[device_idx])
        if not self.clean_label:
            y[poison_idx.to(y.device)] = self.target_labels(data.y[poison_idx.to(y.device)])
        cross_idx = self._add_cross_samples(data, x, order[count:], count, generator)
        poison_mask = torch.zeros(n, dtype=torch.bool)
        poison_mask[poison_idx] = True
        cross_mask = torch.zeros(n, dtype=torch.bool)
        cross_mask[cross_idx] = True
        labels = f"target={self.target}" if self.mode == "all-to-one" else "all-to-all"
        tag = f"{self.name}({labels}, rate={self.poison_rate}, seed={self.seed})"
        poisoned = data.replace(x=x, y=y, source=f"{data.source}+{tag}")
        return PoisonResult(data=poisoned, poison_mask=poison_mask, cross_mask=cross_mask)

    def _add_cross_samples(
        self,
        data: ImageData,
        x: torch.Tensor,
        remaining: torch.Tensor,
        num_poisoned: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Hook for attacks that also change rows without relabelling them (WaNet); writes into
        ``x`` and returns the changed row indices. Default: none."""
        return torch.zeros(0, dtype=torch.long)

    def _triggered_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """``apply`` on uint8 images, chunked to bound memory, rounded back to uint8."""
        parts = []
        for start in range(0, len(images), _POISON_CHUNK):
            chunk = images[start : start + _POISON_CHUNK].float().div_(255.0)
            parts.append(to_uint8(self.apply(chunk)))
        if not parts:
            return images.clone()
        return torch.cat(parts)

    def summary(self) -> str:
        """One line for logs and model cards."""
        if self.mode == "all-to-all":
            labels = "all-to-all (y -> y+1)"
        else:
            labels = f"all-to-one -> class {self.target}"
        kind = "clean-label" if self.clean_label else "dirty-label"
        return f"{self.name} ({kind}, {labels}, {self.poison_rate:.1%} poisoned, seed {self.seed})"

    def to_dict(self) -> dict[str, Any]:
        """The full spec as JSON-ready data: every field, plus records for reproducibility.

        Records: ``reference_size`` (image side at which the defaults are defined),
        ``built_for`` (the (C, H, W) shapes triggers were built for in this process, for
        information) and, for seeded triggers, ``trigger_sha256`` so :func:`from_dict` can verify
        that the seed regenerates the very same trigger.
        """
        spec: dict[str, Any] = {"name": self.name, "format_version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            spec[f.name] = _jsonable(getattr(self, f.name))
        spec["clean_label"] = self.clean_label
        spec["reference_size"] = REFERENCE_SIZE
        cache = self.__dict__.get("_cache", {})
        shapes = sorted({k[:3] for k in cache if isinstance(k, tuple)})
        spec["built_for"] = [list(s) for s in shapes]
        content = self._content()
        if content is not None:
            spec["trigger_sha256"] = tensor_sha256(content)
        return spec

    def to_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` to ``path`` (written to a temporary file, then renamed)."""
        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(
                f"cannot write attack spec to {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first"
            )
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ helpers

    def _require_num_classes(self) -> int:
        if self.num_classes is None:
            raise AttackConfigError(
                f"attack {self.name!r} needs num_classes for mode={self.mode!r}; pass num_classes=len(data.classes)"
            )
        return int(self.num_classes)

    def _check_data(self, data: ImageData) -> int | None:
        """Check a training set against the spec before touching it; returns its class count."""
        x, y = data.x, data.y
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise AttackInputError(
                f"poison() expects ImageData with uint8 images of shape (N, C, H, W), got "
                f"{x.dtype} {tuple(x.shape)}; load data with timm_purify.data.load_data"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise AttackInputError(f"poison(): {len(x)} images but labels of shape {tuple(y.shape)}")
        classes = len(data.classes) if data.classes else None
        if classes is not None and self.num_classes is not None and classes != self.num_classes:
            raise AttackConfigError(
                f"attack {self.name!r} was built for num_classes={self.num_classes}, but the data set "
                f"{data.source!r} has {classes} classes; rebuild the attack with num_classes={classes}"
            )
        known = self.num_classes if self.num_classes is not None else classes
        if known is not None:
            if self.target >= known:
                raise AttackConfigError(
                    f"attack {self.name!r}: target {self.target} is not a class of {data.source!r} "
                    f"({known} classes); pick a target in 0..{known - 1}"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= known):
                raise AttackInputError(f"labels of {data.source!r} fall outside 0..{known - 1}")
        return known


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8, rounding to the nearest level."""
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _check_int(label: str, field: str, value: Any, *, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AttackConfigError(f"{label}: {field} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise AttackConfigError(f"{label}: {field} must be >= {minimum}, got {value}")


def _check_images(x: Any, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise AttackInputError(f"attack {name!r}: apply() takes a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise AttackInputError(
            f"attack {name!r}: apply() takes float images in [0, 1], got dtype {x.dtype}; "
            f"convert uint8 images with ImageData.floats() or x.float() / 255"
        )
    if x.ndim != 4:
        raise AttackInputError(
            f"attack {name!r}: apply() takes a batch of shape (N, C, H, W), got shape {tuple(x.shape)}; "
            f"add a batch dimension with x[None] for a single image"
        )
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise AttackInputError(f"attack {name!r}: empty image shape {tuple(x.shape)}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


# ----------------------------------------------------------------------------- registry


def register_attack(name: str) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator adding an attack to :data:`ATTACKS` under ``name``."""

    def decorate(cls: type[Attack]) -> type[Attack]:
        if not (isinstance(cls, type) and issubclass(cls, Attack)):
            raise TypeError(f"register_attack({name!r}) decorates Attack subclasses, got {cls!r}")
        if name in ATTACKS and ATTACKS[name] is not cls:
            raise ValueError(f"an attack named {name!r} is already registered ({ATTACKS[name].__name__})")
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return decorate


def _attack_class(name: Any) -> type[Attack]:
    if not isinstance(name, str) or name.lower() not in ATTACKS:
        raise UnknownAttackError(f"unknown attack {name!r}; known attacks: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name.lower()]


def build_attack(name: str, **kwargs: Any) -> Attack:
    """Build a registered attack by name; every field is checked before anything runs.

    Example: ``build_attack("badnets", target=3, poison_rate=0.05)``.
    """
    cls = _attack_class(name)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise AttackConfigError(
            f"attack {cls.name!r} has no option(s) {', '.join(unknown)}; its options are: {', '.join(names)}"
        )
    return cls(**kwargs)


def from_dict(spec: dict[str, Any]) -> Attack:
    """Rebuild an attack from :meth:`Attack.to_dict` output and verify its trigger.

    Raises :class:`AttackConfigError` if the recorded ``trigger_sha256`` does not match the
    trigger regenerated from the seed (the spec was written by an incompatible version).
    """
    if not isinstance(spec, dict):
        raise AttackConfigError(
            f"an attack spec is a dict (from Attack.to_dict()), got {type(spec).__name__}"
        )
    if "name" not in spec:
        raise AttackConfigError(f"attack spec has no 'name'; known attacks: {', '.join(sorted(ATTACKS))}")
    version = spec.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise AttackConfigError(
            f"attack spec format_version {version} is not supported (this timm-purify reads "
            f"{FORMAT_VERSION}); upgrade timm-purify"
        )
    cls = _attack_class(spec["name"])
    kwargs = {k: v for k, v in spec.items() if k not in _META_KEYS}
    attack = build_attack(cls.name, **{k: _from_json_value(v) for k, v in kwargs.items()})
    recorded = spec.get("trigger_sha256")
    if recorded is not None:
        content = attack._content()
        actual = tensor_sha256(content) if content is not None else None
        if actual != recorded:
            raise AttackConfigError(
                f"attack {cls.name!r} with seed {attack.seed} regenerates a trigger whose SHA-256 is "
                f"{actual}, but the spec records {recorded}: it was written by an incompatible version "
                f"of timm-purify, so this is not the same backdoor; use the version that wrote it"
            )
    return attack


def from_json(source: str | os.PathLike | dict[str, Any]) -> Attack:
    """Rebuild an attack from a JSON file written by :meth:`Attack.to_json` (or from its dict)."""
    if isinstance(source, dict):
        return from_dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"attack spec {str(path)!r} does not exist; write one with attack.to_json(path) "
            f"or pass the dict from attack.to_dict()"
        )
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AttackConfigError(f"attack spec {str(path)!r} is not valid JSON ({err})") from err
    return from_dict(spec)


def _from_json_value(value: Any) -> Any:
    """JSON lists back to the tuples attack fields use (nested sequences stay nested)."""
    if isinstance(value, list):
        return tuple(_from_json_value(v) for v in value)
    return value


def _as_nested_tuple(value: Sequence | torch.Tensor) -> tuple:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_as_nested_tuple(v) if isinstance(v, (list, tuple)) else float(v) for v in value)
    raise TypeError(f"expected a nested sequence, got {type(value).__name__}")
