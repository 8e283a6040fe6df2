"""Hand-made :class:`ScanReport` objects for tests of what consumes a scan (``auto``, the CLI,
cards), so those tests neither run the slow scan nor depend on its verdict on a tiny model."""

from __future__ import annotations

from typing import Any

from timm_purify.detection.report import ScanReport


def fake_report(*, verdict: str = "backdoored", target: int | None = 0, **fields: Any) -> ScanReport:
    """A report with ``verdict`` and ``target`` (all-to-one when a target is given); any other
    field of :class:`ScanReport` can be set through ``fields``."""
    base: dict[str, Any] = dict(
        verdict=verdict,
        score=0.93 if verdict == "backdoored" else 0.1,
        threshold=0.4,
        suspected_target=target,
        pattern="all-to-one" if target is not None else None,
        histogram_noisy=[40, 1, 1, 1, 1, 1, 1, 1, 1, 2],
        histogram_noisy_masked=[45, 1, 0, 0, 1, 0, 1, 0, 1, 1],
        clean_acc=0.1,
        noisy_acc=0.1,
        config={},
        seconds=1.0,
        seed=0,
    )
    return ScanReport(**{**base, **fields})
