"""Image sets for defences and evaluation, at the model's own resolution and channel count.

An :class:`ImageData` keeps every image as uint8 in memory (N x C x H x W): the small clean
sets defences use and the test sets evaluation uses fit easily, and batches are cut without
a DataLoader. Images stay in [0, 1] pixel space (``floats()``) because triggers and
adversarial perturbations live there; the model's mean/std are applied at the model's door
by :class:`Normalizer`.

Specs accepted by :func:`load_data`:

* ``"fashion-mnist-mini"``: the bundled subset (5,000 train / 1,000 test images);
* ``"fashion-mnist"``: the full set (``apt-get install dataset-fashion-mnist``);
* a folder with one sub-folder per class (any PIL-readable images). If the folder has a
  ``train``/``test`` (or ``val``) sub-folder, ``split`` selects it; otherwise the folder is
  used whatever the split.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist, read_fashion_mnist_mini

__all__ = [
    "BUNDLED",
    "ImageData",
    "DataError",
    "Normalizer",
    "load_data",
    "clean_subset",
    "resize_images",
    "FASHION_MNIST_CLASSES",
]

BUNDLED = ("fashion-mnist-mini", "fashion-mnist")
_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "validation")}


class DataError(ValueError):
    """A data set the user pointed at cannot be used as asked."""


@dataclass
class ImageData:
    """Labelled images as uint8 tensors.

    Attributes:
        x: uint8 images, (N, C, H, W).
        y: int64 labels, (N,), indices into the model's classes.
        classes: class names, index = label.
        source: where the images came from (for reports and model cards).
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    source: str

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise ValueError(
                f"ImageData.x must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"ImageData.y must have shape ({self.x.shape[0]},), got {tuple(self.y.shape)}")
        self.y = self.y.long()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor) -> ImageData:
        return dataclasses.replace(self, x=self.x[index], y=self.y[index])

    def replace(
        self, *, x: torch.Tensor | None = None, y: torch.Tensor | None = None, source: str | None = None
    ) -> ImageData:
        return dataclasses.replace(
            self,
            x=self.x if x is None else x,
            y=self.y if y is None else y,
            source=self.source if source is None else source,
        )

    def floats(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.x.float().div_(255.0)

    def counts(self) -> torch.Tensor:
        """Number of images per class."""
        return torch.bincount(self.y, minlength=self.num_classes)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x in [0, 1] float32, y)`` batches on ``device``."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            yield (
                self.x[idx].to(device=device, non_blocking=True).float().div_(255.0),
                self.y[idx].to(device=device, non_blocking=True),
            )

    def to_model(self, model: nn.Module) -> ImageData:
        """This set at ``model``'s input size and channel count."""
        from .._layers import model_input_size

        return self.replace(x=resize_images(self.x, model_input_size(model)))


class Normalizer(nn.Module):
    """``(x - mean) / std`` with the model's own statistics (``pretrained_cfg``).

    Put in front of the model (``nn.Sequential(Normalizer(model), model)``) so attacks and
    defences work on [0, 1] pixels while the model sees what it was trained on.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def resize_images(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """uint8 images resized (bilinear, antialiased) and channel-matched to ``size`` = (C, H, W).

    Grey images are repeated to three channels; colour images are averaged to one when the
    model takes one.
    """
    channels, height, width = size
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
        else:
            raise DataError(f"cannot turn {x.shape[1]}-channel images into {channels}-channel model inputs")
    if tuple(x.shape[2:]) != (height, width):
        out = []
        for chunk in x.split(4096):
            resized = F.interpolate(
                chunk.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
            )
            out.append(resized.round_().clamp_(0, 255).to(torch.uint8))
        x = torch.cat(out)
    return x.contiguous()


def _model_label_names(model: nn.Module | None) -> list[str] | None:
    if model is None:
        return None
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    num_classes = getattr(model, "num_classes", None)
    if names and (num_classes is None or len(names) == num_classes):
        return [str(n) for n in names]
    return None


def _map_classes(folders: list[str], model: nn.Module | None) -> tuple[list[str], dict[str, int]]:
    """Class names of the model and the label of each folder; raise on any mismatch."""
    num_classes = getattr(model, "num_classes", None) if model is not None else None
    label_names = _model_label_names(model)
    if label_names is not None:
        missing = [f for f in folders if f not in label_names]
        if not missing:
            return label_names, {f: label_names.index(f) for f in folders}
        if len(missing) < len(folders):
            raise DataError(
                f"class folders {missing} are not among the model's label_names {label_names}; "
                "rename them to match (or remove them)"
            )
    if all(f.isdigit() for f in folders):
        indices = {f: int(f) for f in folders}
        k = num_classes if num_classes is not None else max(indices.values()) + 1
        if max(indices.values()) >= k:
            raise DataError(f"class folder {max(indices.values())} is out of range for a {k}-class model")
        names = label_names or [str(i) for i in range(k)]
        return names, indices
    ordered = sorted(folders)
    if num_classes is not None and len(ordered) != num_classes:
        raise DataError(
            f"the data has {len(ordered)} class folders but the model's head has {num_classes} classes. "
            "Give one sub-folder per class the model knows (named as its label_names, or 0..K-1), "
            "or load the model with the right num_classes."
        )
    return ordered, {f: i for i, f in enumerate(ordered)}


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _load_folder(
    root: Path, split: str, model: nn.Module | None, size: tuple[int, int, int] | None
) -> ImageData:
    from PIL import Image, UnidentifiedImageError

    base = root
    for candidate in _SPLIT_DIRS.get(split, ()):
        if (root / candidate).is_dir():
            base = root / candidate
            break
    folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(
            f"{base} has no class sub-folders. Lay the images out as {base}/<class name>/<image file>, "
            "one sub-folder per class."
        )
    classes, label_of = _map_classes(folders, model)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    skipped: list[str] = []
    target_hw = size[1:] if size is not None else None
    for folder in folders:
        for path in sorted((base / folder).iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB" if (size is None or size[0] == 3) else "L")
                    if target_hw is not None and img.size != (target_hw[1], target_hw[0]):
                        img = img.resize((target_hw[1], target_hw[0]), Image.BILINEAR)
                    arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
                    arr = arr.view(img.size[1], img.size[0], -1).permute(2, 0, 1)
            except (UnidentifiedImageError, OSError):
                skipped.append(str(path.relative_to(base)))
                continue
            images.append(arr)
            labels.append(label_of[folder])
    if not images:
        detail = f" ({len(skipped)} files could not be read as images, e.g. {skipped[:3]})" if skipped else ""
        raise DataError(f"no readable image found under {base}{detail}. Supported: any format PIL opens.")
    if skipped and len(skipped) > 0.5 * (len(images) + len(skipped)):
        raise DataError(
            f"most files under {base} are not images ({len(skipped)} unreadable, e.g. {skipped[:3]})"
        )
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise DataError(
            f"images under {base} differ in size {sorted(shapes)[:3]}; pass a model so they are resized"
        )
    return ImageData(torch.stack(images), torch.tensor(labels), classes, f"{root}:{split}")


def load_data(
    spec: str | os.PathLike,
    *,
    split: str = "train",
    model: nn.Module | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> ImageData:
    """Load a data set, at ``model``'s input size (or ``input_size``) when one is given.

    Raises:
        DataError: empty or unreadable folder, class names or counts that do not match the model.
        FileNotFoundError: the folder or the full Fashion-MNIST set is absent.
    """
    if split not in _SPLIT_DIRS:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    size = input_size
    if size is None and model is not None:
        from .._layers import model_input_size

        size = model_input_size(model)
    name = str(spec)
    if name in BUNDLED:
        x, y = read_fashion_mnist_mini(split) if name == "fashion-mnist-mini" else read_fashion_mnist(split)
        num_classes = getattr(model, "num_classes", None) if model is not None else None
        if num_classes is not None and num_classes != len(FASHION_MNIST_CLASSES):
            raise DataError(
                f"{name} has {len(FASHION_MNIST_CLASSES)} classes but the model's head has {num_classes}; "
                "use a 10-class model or your own image folder"
            )
        data = ImageData(x, y, list(FASHION_MNIST_CLASSES), f"{name}:{split}")
    else:
        root = Path(name).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"data {name!r} is neither a folder nor a bundled set ({', '.join(BUNDLED)}). "
                "Pass a folder with one sub-folder of images per class."
            )
        data = _load_folder(root, split, model, size)
    if size is not None:
        data = data.replace(x=resize_images(data.x, size))
    return data


def clean_subset(
    data: ImageData,
    *,
    count: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> ImageData:
    """A class-balanced, seeded subset: ``count`` images in all, or ``fraction`` of ``data``.

    Each class present in ``data`` contributes ``total // classes`` images (one-shot is
    ``count = number of classes``).

    Raises:
        DataError: fewer images than classes asked for, or a class too small for its share.
    """
    if (count is None) == (fraction is None):
        raise DataError("give exactly one of count= or fraction=")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DataError(f"fraction must lie in (0, 1], got {fraction}")
        count = int(math.floor(fraction * len(data)))
    present = torch.nonzero(data.counts()).flatten()
    k = len(present)
    if count is None or count < k:
        raise DataError(
            f"{count} clean images cannot cover the {k} classes present (at least one image per class is needed)"
        )
    per_class = count // k
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for cls in present.tolist():
        idx = torch.nonzero(data.y == cls).flatten()
        if len(idx) < per_class:
            raise DataError(
                f"class {data.classes[cls]!r} has only {len(idx)} images, fewer than the {per_class} per class asked for"
            )
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    index = torch.cat(picked)
    index = index[torch.randperm(len(index), generator=gen)]
    return data.subset(index).replace(source=f"{data.source} (balanced subset of {len(index)}, seed {seed})")
