"""Progress bars that honour ``quiet`` and huggingface_hub's global switch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(
    iterable: Iterable[T], *, desc: str, total: int | None = None, disable: bool = False
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar (``huggingface_hub.utils.tqdm``, which also honours
    ``HF_HUB_DISABLE_PROGRESS_BARS``); ``disable=True`` turns it off."""
    from huggingface_hub.utils import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True))
