"""Fashion-MNIST: the full set from Debian's ``dataset-fashion-mnist`` and the bundled mini subset.

Fashion-MNIST (Zalando Research, MIT licence; see ``FASHION-MNIST-LICENSE.md`` beside this
file) ships as gzip'd IDX files. The mini subset bundled with the package is a seeded,
class-balanced selection stored as a gzip'd safetensors file, so the package carries no
pickle and no image library is needed to read it.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "MINI_FILE",
    "read_fashion_mnist",
    "read_fashion_mnist_mini",
    "write_fashion_mnist_mini",
]

# folder-safe forms of the official names ("T-shirt/top" holds a slash)
FASHION_MNIST_CLASSES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
FASHION_MNIST_DIR = Path(os.environ.get("TIMM_PURIFY_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
MINI_FILE = Path(__file__).with_name("fashion-mnist-mini.safetensors.gz")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
    return data.reshape(dims)


def read_fashion_mnist(split: str, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 1 x 28 x 28, labels int64) of the full set's ``split``."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    images_name, labels_name = _FILES[split]
    if not (root / images_name).is_file():
        raise FileNotFoundError(
            f"the full Fashion-MNIST set is not installed (no {root / images_name}). Install it with "
            "`sudo apt-get install dataset-fashion-mnist`, point TIMM_PURIFY_FASHION_MNIST at a folder "
            "holding the four IDX .gz files, or use the bundled `fashion-mnist-mini`."
        )
    images = _read_idx(root / images_name).unsqueeze(1).contiguous()
    labels = _read_idx(root / labels_name).long()
    return images, labels


def read_fashion_mnist_mini(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 1 x 28 x 28, labels int64) of the bundled subset's ``split``."""
    tensors = load_safetensors(gzip.decompress(MINI_FILE.read_bytes()))
    return tensors[f"{split}_images"], tensors[f"{split}_labels"].long()


def write_fashion_mnist_mini(
    path: Path = MINI_FILE, *, train_per_class: int = 500, test_per_class: int = 100, seed: int = 0
) -> Path:
    """Regenerate the bundled subset from the full set (class-balanced, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = read_fashion_mnist(split)
        order = torch.randperm(len(labels), generator=gen)
        picked = torch.cat([order[labels[order] == k][:per_class] for k in range(10)])
        picked = picked[torch.randperm(len(picked), generator=gen)]
        tensors[f"{split}_images"] = images[picked].contiguous()
        tensors[f"{split}_labels"] = labels[picked].to(torch.uint8).contiguous()
    metadata = {"source": "Fashion-MNIST (Zalando Research), MIT licence", "seed": str(seed)}
    path.write_bytes(gzip.compress(save_safetensors(tensors, metadata=metadata), compresslevel=9, mtime=0))
    return path


if __name__ == "__main__":
    print(write_fashion_mnist_mini())
