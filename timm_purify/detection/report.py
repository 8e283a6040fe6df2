"""The result of a behavioural backdoor scan, as a typed record that round-trips through JSON.

A scan report travels: the CLI writes it with ``--json``, a model card quotes it, a benchmark
collects hundreds of them. So it holds only plain values (numbers, strings, lists, dicts) and
its JSON keys are fixed: :data:`REPORT_KEYS`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ScanReport",
    "REPORT_KEYS",
    "VERDICTS",
    "PATTERNS",
    "SPREAD_NAMES",
    "all_to_one_found",
    "spread_readings",
    "stage_label",
]

VERDICTS = ("backdoored", "clean")
PATTERNS = ("all-to-one", "all-to-all")


# how a report names each shape of the spread reading (ScanOptions.spread_shape)
SPREAD_NAMES = {"l2": "universal spread", "window": "window spread", "blend": "blend spread"}


def spread_readings(spread: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """Every spread reading a report's ``spread`` holds: the one shown (the first that fired, else
    the one nearest its cut) and the ``others`` that ran (none in reports of one reading)."""
    return [] if spread is None else [spread, *(spread.get("others") or [])]


def stage_label(config: Mapping[str, Any], stage: str) -> str:
    """How a report names a later stage, ``"reach"`` or ``"spread"``: the spread readings by their
    shapes, those that ran or else those the family's calibration gives (``"window spread,
    blend spread"``), as the summary and the card print them, also where the stage was skipped."""
    if stage != "spread":
        return f"universal {stage}"
    entries = config.get("spread_budgets") or config.get("spread_calibrated") or []
    shapes = [e.get("shape", "l2") for e in ([entries] if isinstance(entries, Mapping) else entries)]
    return ", ".join(SPREAD_NAMES[shape] for shape in shapes or ["l2"])


@dataclass
class ScanReport:
    """What :func:`timm_purify.scan` concluded about one model, and how.

    Attributes:
        verdict: ``"backdoored"`` or ``"clean"``.
        score: the statistic that decided the verdict (see :mod:`timm_purify.detection.ban`);
            higher means more backdoor-like.
        threshold: the calibrated value ``score`` is compared with (backdoored when above).
        suspected_target: class index the backdoor sends inputs to (all-to-one), else ``None``.
        pattern: ``"all-to-one"``, ``"all-to-all"`` or ``None`` (no backdoor found).
        histogram_noisy: predictions per class of the held-out clean images with the
            adversarial neuron noise on.
        histogram_noisy_masked: the same with the noise on and the negative feature mask
            applied (the BAN statistic is computed from these predictions).
        clean_acc: accuracy of the unmodified model on the held-out images.
        noisy_acc: accuracy with the noise on (no mask).
        config: every option used, the feature location, the thresholds and both statistics.
        seconds: wall-clock time of the scan (data loading excluded).
        seed: the seed used.
        static_findings: findings of the static file inspection (``Finding.to_dict()``) when
            the scan was given the files the model came from; empty otherwise.
        class_names: class names, index = class, when known.
        unsafe_files: True when a static finding is critical (the files must not be trusted,
            whatever the behavioural verdict).
        reach: the universal-reach stage's result (per-class reach, score, suspected target,
            budget, ``threshold`` and whether it ``fired``; see
            :mod:`timm_purify.detection.reach`), or ``None`` when the stage did not run.
        spread: the all-to-all readings' result (per-class share moved elsewhere, score, shape,
            budget, ``threshold``, ``fired``; :mod:`timm_purify.detection.reach`) of the first reading
            that fired, else of the one nearest its cut, with the other readings that ran under
            ``others`` (:func:`spread_readings`); ``None`` when the stage did not run.
    """

    verdict: str
    score: float
    threshold: float
    suspected_target: int | None
    pattern: str | None
    histogram_noisy: list[int]
    histogram_noisy_masked: list[int]
    clean_acc: float
    noisy_acc: float
    config: dict[str, Any]
    seconds: float
    seed: int
    static_findings: list[dict[str, str]] = field(default_factory=list)
    class_names: list[str] | None = None
    unsafe_files: bool = False
    reach: dict[str, Any] | None = None
    spread: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.pattern is not None and self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS} or None, got {self.pattern!r}")

    @property
    def backdoored(self) -> bool:
        return self.verdict == "backdoored"

    @property
    def target_name(self) -> str | None:
        """Name of the suspected target class, when both are known."""
        if self.suspected_target is None:
            return None
        if self.class_names and 0 <= self.suspected_target < len(self.class_names):
            return self.class_names[self.suspected_target]
        return str(self.suspected_target)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict with the keys of :data:`REPORT_KEYS`."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScanReport:
        """Rebuild a report from :meth:`to_dict` output; unknown keys are an error (typo or
        a report from an incompatible version), missing optional ones take their defaults."""
        unknown = sorted(set(data) - set(REPORT_KEYS))
        if unknown:
            raise ValueError(f"not a timm-purify scan report: unknown key(s) {unknown}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]  # noqa: E501
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"not a complete timm-purify scan report: missing key(s) {missing}")
        return cls(**data)

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
        """The report as JSON text; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent) + "\n"
        if path is not None:
            out = Path(path)
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
                os.replace(tmp, out)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return text

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ScanReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


REPORT_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ScanReport))


def all_to_one_found(record: dict[str, Any]) -> int:
    """The all-to-one backdoors a reliability record's scans found, which its right targets are
    counted of (records written before this count was kept: all of them, as they were worded)."""
    return record.get("all_to_one_detected", record["all_to_one_models"])
