"""BAN: find out whether a classifier carries a backdoor by activating it with adversarial
neuron noise (Xu et al., NeurIPS 2024; ``shared/papers/ban-adversarial-neuron-noise.txt``).

Why it works: a backdoor is a shortcut from a trigger feature to the target class. Noise on
the neurons that *maximises* the loss on clean images finds the cheapest way to break the
model; in a backdoored model that way is the shortcut, so the noisy model sends clean images
of every class to the target, while a clean model under the same noise scatters its errors.
A feature mask separates the features the model needs for correct answers (``m``) from the
rest (``1 - m``); with the noise on and only the rest kept, the backdoored model piles its
predictions onto the target.

What runs (the reference code's order and defaults, ``shared/notes/methods.md``):

1. The clean images are split, class-balanced and seeded, into a *search* part and a
   *held-out* part (``holdout``).
2. Feature mask: the penultimate features ``z`` of the search images are computed once with
   the noise off (the reference trains the mask before any noise exists), and a mask ``m``
   over one feature map (U(0, 1) start, clamped to [0, 1]) is trained for ``mask_epochs`` x
   ``mask_steps_per_epoch`` Adam steps on
   ``CE(h(m*z), y) - CE(h((1-m)*z), y) + mask_lambda * |m|_1 / stopgrad(|m|_1)``. Only the
   head ``h`` runs in this stage, on cached features.
3. Neuron noise: multiplicative noise on the weight and bias of every affine normalisation
   layer (:class:`~timm_purify.defenses._common.NormNoise`), drawn from U(-eps, eps) and
   pushed by ``steps`` sign-ascent steps of ``eps / steps`` on the CE of search batches.
   ``eps`` is the calibrated budget of the model's normalisation family (below).
4. Statistic: the held-out images are predicted by the unmodified model, the noisy model
   and the noisy model with the negative mask ``(1 - m)`` on its features; the three
   confusion matrices give two scores (:func:`scan_statistics`), all-to-one and
   all-to-all, each compared with a threshold calibrated on clean and backdoored models
   (``calibration.json`` beside this file, written by ``benchmarks/calibrate_scan.py``;
   :func:`decide`).
5. Universal reach (:mod:`timm_purify.detection.reach`), where the calibration enabled it for
   the model's normalisation family (``benchmarks/calibrate_reach.py``: LayerNorm models,
   where the noise does not reach the shortcut of a converged ConvNeXt, and BatchNorm ones,
   where it misses SIG): per class one small perturbation shared by all images, and how many
   images of the other classes it sends to the class. A second stage: it flags a model BAN
   found clean; where BAN fired, BAN's verdict stands, so the stage is skipped where it could
   only confirm it.
6. Spread, where the calibration enabled it (``benchmarks/calibrate_spread.py``): one
   untargeted pattern shared by all images, and whether it moves every class, each to its own
   destination. The all-to-all reading: it flags, as an all-to-all pattern, a model both stages
   above found clean. Its shapes are calibrated per family, and every one of a family's
   readings runs once the stage runs (one after the first to fire tells the trigger's shape): on
   LayerNorm models one L2-bounded perturbation over the whole image
   (:func:`~timm_purify.detection.reach.universal_spread`), then one pattern pasted in each window
   of a grid in turn (:func:`~timm_purify.detection.reach.window_spread`; the L2 perturbation
   misses an all-to-all patch on a ViT); on BatchNorm ones, where the L2 perturbation finds a
   sink class of the clean model instead, the window, which finds all-to-all patch triggers,
   then one pattern blended into the whole image
   (:func:`~timm_purify.detection.reach.blend_spread`), which finds blended ones.

Where this departs from the reference, and why:

* BatchNorm. The reference searches the noise and predicts in train mode, so BatchNorm
  normalises with batch statistics (and rewrites its running statistics). That matters: with
  batch statistics each BatchNorm re-normalises what the noise did upstream, so the noise
  acts locally and only a real shortcut carries it to the logits; with running statistics
  (``bn_mode="running"``) the perturbations compound through the network and eps 0.3 sends
  clean and backdoored models alike onto one arbitrary class (measured: noisy accuracy
  7-10% on both a clean and a BadNets resnet18). The default ``bn_mode="batch"`` keeps the
  reference's batch statistics but with momentum 0, so the running statistics (of the
  scan's private copy) never change; everything else (dropout, drop-path) stays in eval
  mode. The feature mask is trained, as in the reference, before any noise, on eval-mode
  features. LayerNorm and GroupNorm models are unaffected by the option.
* The noise budget. The paper uses eps 0.3 for 32x32 images. On BatchNorm models trained to
  convergence (resnet18, 3 epochs on all 60,000 Fashion-MNIST images, ~91% accuracy) that
  budget costs only 8-18% of the clean accuracy and the backdoors barely show (Blended and
  SIG scored inside the clean models' range); at eps 0.75 the noise reaches the shortcut of
  a converged model too, while the scores of the zoo's briefly trained clean models, which
  eps 0.3 already broke, level off. So the budget is calibrated with the thresholds, per
  normalisation family (``eps_by_family`` in ``calibration.json``): the calibration scans
  every model at each candidate budget and keeps the one whose thresholds make the fewest
  errors on that family's models (``eps_selection``; ``benchmarks/DETECTION.md``): 0.75 for
  BatchNorm, 0.5 for LayerNorm, for BAN alone. With the reach stage behind BAN (it finds the
  Blended and SIG backdoors that needed the larger budget), the BatchNorm budget and cuts were
  refitted together with reach's (``calibrate_reach.py --refit-ban batchnorm --ban-eps``): at
  0.5 clean BatchNorm models score lower (at most 0.26 against 0.49 at 0.75) while the BadNets
  patches still show (0.34 and up), and both stages together make half the errors
  (``refitted_by_family``). The LayerNorm cuts were refitted the same way with reach and the
  spread reading (``--refit-ban other``), last on 102 models with BAN's verdict conditional on
  its two readings agreeing (:func:`agrees`) and the cuts fitted under that condition: the
  budgets make equally many errors there and 0.3, the only one flagging no clean model, is kept,
  with a low cut (0.061) that only the clean models whose readings agree bind. A family can
  instead have a second, higher all-to-one cut for split readings (:func:`splits_count`); on
  BatchNorm it traded false alarms for misses one for one over six sets, so none ships.
  On fully trained ConvNeXts no budget separates clean from
  backdoored models (the noise either leaves them alone or sends every one of them to the
  same class), which the family's reliability record, quoted in each report, shows.
* The reference re-draws the noise for each of 10 batches and keeps only the last; here one
  draw is ascended over ``steps`` different batches, the same cost as the last batch alone,
  and the search is repeated from ``restarts`` random starts whose predictions are pooled.
* The verdict. The released code prints the prediction histogram of step 4 and leaves the
  call to a person. On small models the noise breaks clean models as well, so "most
  predictions on one class" flags everything. The score is the excess share of other-class
  images the noisy model sends to one class, over what the unmodified model sends there,
  pooled over restarts: a backdoor wins every restart for its target, a clean model's
  errors move between classes (see :func:`scan_statistics`).
* The features are the output of timm's ``forward_features`` (before pooling: C x H x W for
  CNNs, tokens x C for transformers), the head is ``forward_head``; a model where
  ``forward_head(forward_features(x))`` is not ``model(x)``, or whose head runs a
  normalisation layer (ConvNeXt's pooled LayerNorm, which would rescale what the mask
  removed), falls back to the input of ``get_classifier()``. Nothing depends on layer names.
* The suspected target. The paper reads it off the noisy predictions. On the calibration zoo
  that is right for BatchNorm models, while on LayerNorm models the noisy predictions *with
  the negative mask* name the target more often (test_vit: 8 of 8 against 6 of 8), so
  ``calibration.json`` records, per normalisation family, which of the two to report
  (``target_source_by_family``); the verdict itself always comes from the noise alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._device import get_device
from .._layers import check_classifier
from .._progress import progress
from ..data import DataError, ImageData, Normalizer, clean_subset, load_data
from ..defenses._common import _NORM_TYPES, NormNoise, PixelModel
from .reach import (
    REACH_NORMS,
    blend_spread,
    confusion_matrix,
    universal_reach,
    universal_spread,
    window_spread,
)
from .report import ScanReport, all_to_one_found

__all__ = [
    "scan",
    "ScanOptions",
    "ScanOptionError",
    "CALLER_THRESHOLDS",
    "REACH_MODES",
    "SPREAD_SHAPES",
    "SPREAD_SIZES",
    "DEFAULT_EPS",
    "DEFAULT_SPREAD",
    "restarts_field",
    "TARGET_SOURCES",
    "calibration_cautions",
    "load_calibration",
    "calibrated_thresholds",
    "calibrated_decision",
    "calibrated_agreement",
    "calibrated_split_threshold",
    "calibrated_eps",
    "family_cuts",
    "family_fit",
    "heldout_record",
    "budget_of",
    "spread_entries",
    "spread_plan",
    "norm_family",
    "CALIBRATION_FILE",
    "scan_statistics",
    "decide",
    "agrees",
    "splits_count",
    "combine_stages",
]

# ``config["calibration"]`` of a report whose thresholds the caller gave (no calibration used)
CALLER_THRESHOLDS = "thresholds given by the caller"

# which predictions name the suspected target -> the key of :func:`scan_statistics` holding it:
# the noisy model's (the paper's reading: right for all 16 BatchNorm all-to-one zoo backdoors)
# or the noisy model's with the negative mask (LayerNorm zoo: 10 of 12, the noise alone 7).
# ``calibration.json`` picks one per normalisation family.
TARGET_SOURCES = {"noisy": "target", "noisy_masked": "target_masked"}

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")

# when the universal-reach stage runs (ScanOptions.reach)
REACH_MODES = ("auto", "on", "off")
# its budget where neither the caller nor the calibration gives one (benchmarks/DETECTION.md)
DEFAULT_REACH = {"norm": "l2", "rho": 1.0, "steps": 40}
# the shapes of the spread reading's perturbation: one L2-bounded perturbation over the whole
# image (universal_spread), one pasted pattern per window of a grid (window_spread: patch
# triggers) or one whole-image pattern blended in (blend_spread: blended triggers)
SPREAD_SHAPES = ("l2", "window", "blend")
# the size of each shape's budget: its ScanOptions field is ``spread_<size>``, and a calibrated
# entry stores it under ``<size>``
SPREAD_SIZES = {"l2": "rho", "window": "window", "blend": "alpha"}
# each shape's budget and steps where neither the caller nor the calibration gives them: the L2
# radius at 3x32x32 and ascent steps (the shipped LayerNorm threshold records no steps: 40), the
# window side at 3x32x32 and Adam steps (benchmarks/DETECTION.md: 30 steps of 32 images read as
# 60 of 64 did, at a third of the time), and the blend weight and Adam steps (DETECTION.md: 0.1
# separated blended all-to-all models from every other BatchNorm model, 0.05 and 0.2 less)
DEFAULT_SPREAD = {
    "l2": {"rho": 2.0, "steps": 40, "restarts": 1},
    "window": {"window": 8, "steps": 30},
    "blend": {"alpha": 0.1, "steps": 30},
}
_SPREAD_READINGS = {"l2": universal_spread, "window": window_spread, "blend": blend_spread}

# the paper's noise budget for 32x32 images: used when the caller gives the thresholds but no eps,
# and for a normalisation family the calibration records no budget for
DEFAULT_EPS = 0.3


class ScanOptionError(ValueError):
    """An option or data set :func:`scan` cannot work with; raised before any work starts."""


@dataclass
class ScanOptions:
    """Options of :func:`scan`, with the reference implementation's defaults.

    Attributes:
        eps: bound of the multiplicative noise, ``|delta| <= eps``. ``None`` (the default):
            the budget the thresholds were calibrated at for the model's normalisation family
            (``eps_by_family`` in ``calibration.json``), or :data:`DEFAULT_EPS` when the caller
            gives both thresholds. The paper uses 0.3 for 32x32 data (0.2 / 0.1 for 64x64 /
            224x224). A value other than the calibrated one leaves the calibrated thresholds
            meaningless, and the report says so.
        steps: sign-ascent steps of the noise search (step size ``eps / steps``).
        mask_epochs, mask_steps_per_epoch: Adam steps of the feature mask, as the reference
            counts them (20 epochs of 10 batches sampled with replacement).
        mask_lr: Adam learning rate of the mask.
        mask_lambda: weight of the normalised L1 term that keeps the mask from filling with
            ones (0.25 in the released code, 0.75 in the paper's appendix).
        batch_size: images per step of the mask and noise searches.
        holdout: share of the clean images kept out of the searches to compute the statistic.
        restarts: independent noise searches (random starts) whose predictions are pooled. A
            backdoor pulls every search to the same class; a clean model breaks towards a
            different class each time, so pooling dilutes its score (see :func:`scan_statistics`).
        bn_mode: ``"batch"`` (the reference: BatchNorm uses batch statistics while the noise is
            searched and applied) or ``"running"`` (eval mode throughout); see the module notes.
        threshold, all_to_all_threshold: override the calibrated thresholds of the all-to-one
            and all-to-all statistics (``None``: use ``calibration.json``, where a family's
            all-to-all threshold may be ``null``: the statistic flagged none of that family's
            all-to-all calibration backdoors without flagging clean models, so it does not
            decide there).
        reach: the second stage, universal reach (:mod:`timm_purify.detection.reach`): ``"auto"``
            runs it where it has a threshold (the calibration records one for the model's
            normalisation family, or ``reach_threshold`` is given) and it can still change the
            outcome (not after BAN named an all-to-all pattern, or a target the family trusts
            over reach's: ``config["skipped_stages"]``), ``"on"`` always (an error without a
            threshold), ``"off"`` never. It is a second stage: where BAN fires, BAN's
            verdict stands (and its target, unless the calibration found reach's the better
            one for the family, ``target_when_both``); where BAN finds nothing and reach fires,
            the model is backdoored (all-to-one) and reach names the target.
        reach_norm, reach_rho: the perturbation budget (norm, size at 3x32x32); ``None``: the
            calibrated one for the family, else ``"l2"`` and 1.
        reach_steps: descent steps of each class's universal perturbation; ``None``: the number
            the family's reach threshold was calibrated with (``steps`` in ``calibration.json``),
            else 40.
        reach_threshold: override the calibrated threshold of the reach score.
        spread: the all-to-all readings, run as ``reach`` is (``"auto"``: where a threshold is
            calibrated or given, and no earlier stage fired). Where BAN and reach find nothing
            and one fires, the model is backdoored with an all-to-all pattern. A family may be
            calibrated with several shapes (BatchNorm: window, then blend; LayerNorm: L2, then
            window); they run in that order, all of them (those after the first that fires
            tell the trigger's shape: ``_spread_readings``).
        spread_shape: run this one shape only: ``"l2"``, universal spread
            (:func:`~timm_purify.detection.reach.universal_spread`, one L2-bounded perturbation
            over the whole image), ``"window"``, window spread
            (:func:`~timm_purify.detection.reach.window_spread`, one pasted pattern per window of
            a grid: patch triggers), or ``"blend"``, blend spread
            (:func:`~timm_purify.detection.reach.blend_spread`, one whole-image pattern blended
            in: blended triggers); ``None``: the calibrated ones for the family, else ``"l2"``.
        spread_rho: the ``"l2"`` shape's budget at 3x32x32; ``spread_window``: the ``"window"``
            shape's window side at 3x32x32; ``spread_alpha``: the ``"blend"`` shape's weight;
            ``spread_steps``: every shape's steps; ``spread_restarts``: the ``"l2"`` shape's
            perturbations, the best one kept (one fit can settle in a sink class instead of the
            trigger). ``None``: the calibrated ones, else :data:`DEFAULT_SPREAD`'s. Giving the
            budget of a shape the scan does not run is an error.
        spread_threshold: override the calibrated threshold of the spread score (of the one
            shape the scan runs: with several, name it with ``spread_shape``).
    """

    eps: float | None = None
    steps: int = 30
    mask_epochs: int = 20
    mask_steps_per_epoch: int = 10
    mask_lr: float = 0.01
    mask_lambda: float = 0.25
    batch_size: int = 128
    holdout: float = 0.5
    restarts: int = 3
    bn_mode: str = "batch"
    threshold: float | None = None
    all_to_all_threshold: float | None = None
    reach: str = "auto"
    reach_norm: str | None = None
    reach_rho: float | None = None
    reach_steps: int | None = None
    reach_threshold: float | None = None
    spread: str = "auto"
    spread_shape: str | None = None
    spread_rho: float | None = None
    spread_window: int | None = None
    spread_alpha: float | None = None
    spread_steps: int | None = None
    spread_restarts: int | None = None
    spread_threshold: float | None = None

    def validate(self) -> None:
        """Raise :class:`ScanOptionError` for values the scan cannot run with."""
        for name in ("eps", "mask_lr"):
            value = getattr(self, name)
            if name == "eps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ScanOptionError(f"{name} must be a number > 0, got {value!r}")
        for name in (
            "steps", "restarts", "mask_epochs", "mask_steps_per_epoch", "batch_size", "reach_steps", "spread_steps",
            "spread_window", "spread_restarts",
        ):  # fmt: skip
            value = getattr(self, name)
            if name in ("reach_steps", "spread_steps", "spread_window", "spread_restarts") and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ScanOptionError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.mask_lambda, bool) or not isinstance(self.mask_lambda, (int, float)):
            raise ScanOptionError(f"mask_lambda must be a number >= 0, got {self.mask_lambda!r}")
        if self.mask_lambda < 0:
            raise ScanOptionError(f"mask_lambda must be >= 0, got {self.mask_lambda}")
        if self.eps is not None and self.eps >= 1:
            raise ScanOptionError(
                f"eps={self.eps} would let the noise flip the sign of normalisation weights "
                "(w * (1 + delta) with |delta| >= 1); use a value below 1 (0.3 for 32x32 images)"
            )
        if not (isinstance(self.holdout, (int, float)) and 0 < self.holdout < 1):
            raise ScanOptionError(
                f"holdout is the share of clean images kept for the statistic and must lie in (0, 1), "
                f"got {self.holdout!r}"
            )
        if self.bn_mode not in ("batch", "running"):
            raise ScanOptionError(f"bn_mode must be 'batch' or 'running', got {self.bn_mode!r}")
        for name in ("threshold", "all_to_all_threshold", "reach_threshold", "spread_threshold"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ScanOptionError(f"{name} must be a number or None, got {value!r}")
        for name in ("reach", "spread"):
            if getattr(self, name) not in REACH_MODES:
                raise ScanOptionError(f"{name} must be one of {REACH_MODES}, got {getattr(self, name)!r}")
        if self.spread_shape is not None and self.spread_shape not in SPREAD_SHAPES:
            raise ScanOptionError(
                f"spread_shape must be one of {SPREAD_SHAPES} or None, got {self.spread_shape!r}"
            )
        if self.spread_alpha is not None and (
            isinstance(self.spread_alpha, bool)
            or not isinstance(self.spread_alpha, (int, float))
            or not 0 < self.spread_alpha < 1
        ):
            raise ScanOptionError(
                f"spread_alpha is a blend weight in (0, 1) or None, got {self.spread_alpha!r}"
            )
        if self.reach_norm is not None and self.reach_norm not in REACH_NORMS:
            raise ScanOptionError(f"reach_norm must be one of {REACH_NORMS} or None, got {self.reach_norm!r}")
        for name in ("reach_rho", "spread_rho"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
            ):
                raise ScanOptionError(f"{name} must be a number > 0 or None, got {value!r}")


def _build_options(options: dict[str, Any]) -> ScanOptions:
    names = [f.name for f in dataclasses.fields(ScanOptions)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ScanOptionError(f"unknown scan option(s) {unknown}; the options are: {', '.join(names)}")
    opts = ScanOptions(**options)
    opts.validate()
    return opts


# ---------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------
@cache
def _read_calibration(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def norm_family(model: nn.Module) -> str:
    """``"batchnorm"`` when the model normalises with BatchNorm anywhere, else ``"other"``
    (LayerNorm / GroupNorm only: ViTs, ConvNeXts).

    The all-to-one threshold is calibrated per family: with batch statistics every BatchNorm
    re-normalises the noise of the layers before it, so a clean BatchNorm network shows a
    different (larger) chance level of the statistic than a LayerNorm one, where the noise
    acts on each token directly.
    """
    return (
        "batchnorm"
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        else "other"
    )


def load_calibration(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The calibration record (thresholds, the models they came from, how to regenerate it).

    Raises:
        FileNotFoundError: the file is missing (a broken install, or a custom path that does
            not exist); pass ``threshold=`` and ``all_to_all_threshold=`` to scan without it.
    """
    file = Path(path) if path is not None else CALIBRATION_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"scan calibration {file} is missing; reinstall timm-purify, regenerate it with "
            "`python benchmarks/calibrate_scan.py`, or pass threshold= and all_to_all_threshold=."
        )
    record = copy.deepcopy(_read_calibration(str(file.resolve())))
    for key in ("threshold", "all_to_all_threshold"):
        if not isinstance(record.get(key), (int, float)):
            raise ValueError(
                f"{file} has no numeric {key!r}: regenerate it with benchmarks/calibrate_scan.py"
            )
    # a family under the agreement condition never lets split readings decide: a split cut for it
    # would be a contradiction decide() refuses, so say which file holds it
    both = sorted(
        fam
        for fam, cut in (record.get("all_to_one_split_thresholds") or {}).items()
        if cut is not None and (record.get("all_to_one_agreement_by_family") or {}).get(fam)
    )
    if both:
        raise ValueError(
            f"{file} gives {', '.join(both)} both the agreement condition and a split cut; refit the family "
            "with benchmarks/calibrate_reach.py with --agreement or --split-cut, not both"
        )
    return record


def calibrated_thresholds(calibration: dict[str, Any], family: str) -> tuple[float, float | None]:
    """BAN's all-to-one and all-to-all thresholds that ``calibration`` (:func:`load_calibration`)
    records for normalisation ``family``: the family's own where fitted (an all-to-all one of
    ``None``: that statistic does not decide for the family), else the pooled ones."""
    ones = calibration.get("all_to_one_thresholds") or {}
    a2as = calibration.get("all_to_all_thresholds") or {}
    one = ones[family] if family in ones else calibration["threshold"]
    a2a = a2as[family] if family in a2as else calibration["all_to_all_threshold"]
    return float(one), None if a2a is None else float(a2a)


def calibrated_agreement(calibration: dict[str, Any], family: str) -> bool:
    """Whether ``calibration`` makes ``family``'s BAN all-to-one verdict need its two readings to
    agree (:func:`agrees`; ``all_to_one_agreement_by_family``, absent: no)."""
    return bool((calibration.get("all_to_one_agreement_by_family") or {}).get(family, False))


def calibrated_split_threshold(calibration: dict[str, Any], family: str) -> float | None:
    """The higher cut ``calibration`` gives ``family``'s BAN all-to-one score where its two
    readings name different classes (:func:`decide`'s ``split_threshold``;
    ``all_to_one_split_thresholds``, absent: none, split readings count at the family's cut)."""
    cut = (calibration.get("all_to_one_split_thresholds") or {}).get(family)
    return None if cut is None else float(cut)


def calibrated_decision(calibration: dict[str, Any], family: str) -> dict[str, Any]:
    """:func:`decide`'s keyword arguments as ``calibration`` fits them for ``family``: both
    thresholds (:func:`calibrated_thresholds`), whose predictions name the target, and whether the
    all-to-one verdict needs the two noisy readings to agree (:func:`agrees`) or, where they split,
    a higher score (:func:`calibrated_split_threshold`)."""
    one, a2a = calibrated_thresholds(calibration, family)
    return {
        "threshold": one,
        "all_to_all_threshold": a2a,
        "target_source": (calibration.get("target_source_by_family") or {}).get(family, "noisy"),
        "agreement": calibrated_agreement(calibration, family),
        "split_threshold": calibrated_split_threshold(calibration, family),
    }


def calibrated_eps(calibration: dict[str, Any], family: str) -> float | None:
    """The noise budget ``calibration``'s thresholds for normalisation ``family`` hold at: the
    family's own (``eps_by_family``), else the one budget of a file written before budgets were
    calibrated per family; ``None`` where the file records none."""
    eps = (calibration.get("eps_by_family") or {}).get(family) or (
        (calibration.get("scan") or {}).get("options") or {}
    ).get("eps")
    return None if eps is None else float(eps)


def family_cuts(calibration: dict[str, Any], family: str) -> dict[str, Any]:
    """Every cut and setting a default ``scan`` decides with for normalisation ``family``: BAN's
    noise budget, thresholds, target source and search options, and the reach and spread stages'
    settings where the calibration runs them (``None`` where it does not). A held-out record
    (:func:`heldout_record`) is tied to these: it holds only while a scan decides with the same."""
    return _settings(ScanOptions(), calibration, family).cuts(ScanOptions())


def family_fit(calibration: dict[str, Any], family: str) -> dict[str, Any]:
    """The run behind ``family``'s cuts (command and date): a refit that took held-out models in
    may land on the same cuts, and their record would then no longer be held out."""
    reach = calibration.get("reach") or {}
    run = (reach.get("provenance_by_family") or {}).get(family) or reach or calibration
    return {"command": run.get("command"), "date": run.get("date")}


def _cuts(
    *,
    eps: float,
    all_to_one: float,
    all_to_all: float | None,
    target_source: str,
    agreement: bool,
    split_threshold: float | None,
    search: ScanOptions,
    reach: dict | None,
    spread: list[dict] | None,
) -> dict[str, Any]:
    """The one spelling of a scan's cuts, so a stored set compares equal to a scan's own."""
    return {
        "eps": float(eps),
        "all_to_one": float(all_to_one),
        "all_to_all": None if all_to_all is None else float(all_to_all),
        "target_source": target_source,
        "agreement": bool(agreement),
        "split_threshold": None if split_threshold is None else float(split_threshold),
        "search": {name: getattr(search, name) for name in _SEARCH_FIELDS},
        "reach": reach,
        "spread": spread,
    }


def heldout_record(calibration: dict[str, Any], family: str, cuts: dict[str, Any]) -> dict[str, Any] | None:
    """The family's record on held-out models (``calibration["heldout"]``: models of seeds no fit
    saw, counted by ``calibrate_reach.py --check --record-check``), where it was counted at
    ``cuts`` (:func:`family_cuts`) of the fit that still stands (:func:`family_fit`); ``None``
    where there is none, the cuts differ (a scan given other thresholds, budgets or search
    options: the record says nothing about those) or a later run refitted the family."""
    entry = ((calibration.get("heldout") or {}).get("by_family") or {}).get(family)
    if entry is None or entry.get("cuts") != cuts or entry.get("fit") != family_fit(calibration, family):
        return None
    return {"record": entry["record"], "date": entry.get("date")}


# ---------------------------------------------------------------------------------------
# features and head
# ---------------------------------------------------------------------------------------
@dataclass
class _Split:
    """``model(x) == head(features(x))`` with ``features`` the penultimate feature map."""

    features: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    where: str


@contextlib.contextmanager
def _norm_calls(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Record every normalisation layer of ``model`` that runs inside the block.

    Used to tell whether ``forward_head`` normalises its input (ConvNeXt's head LayerNorm).
    Such a norm rescales what a mask on ``forward_features`` left over, undoing much of the
    negative mask: measured on the convnext_atto zoo, the noisy and noisy+masked predictions
    were nearly identical with the mask there, and masking the classifier's input instead
    named the true target for 3 of 4 backdoors (``benchmarks/DETECTION.md``).
    """
    calls: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, _a, _o: calls.append(mod))
        for m in model.modules()
        if isinstance(m, _NORM_TYPES)
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _split_model(model: nn.Module, probe: torch.Tensor) -> _Split:
    """Find where the penultimate features are, generically, and check the split is exact.

    timm's ``forward_features`` / ``forward_head`` give the unpooled map the paper masks. A
    model whose head normalises its input (a norm runs inside ``forward_head``), or one that
    breaks that contract (custom forward), is split at the input of its classifier module,
    captured by a forward pre-hook, after every norm.
    """
    with torch.no_grad():
        reference = model(probe)
        if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
            try:
                features = model.forward_features(probe)
                with _norm_calls(model) as head_norms:
                    got = model.forward_head(features)
            except Exception:  # a non-timm forward_head signature: use the hook below
                got = None
            if (
                got is not None
                and got.shape == reference.shape
                and torch.allclose(got, reference, atol=1e-4, rtol=1e-4)
                and not head_norms
            ):
                return _Split(model.forward_features, model.forward_head, "forward_features")
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not isinstance(head, nn.Module):
            raise ScanOptionError(
                f"{type(model).__name__}: cannot locate the penultimate features (no forward_features/"
                "forward_head pair and no classifier module from get_classifier()); scan needs a timm classifier."
            )
        captured: list[torch.Tensor] = []

        def grab(_module, args):
            captured.append(args[0])

        def features(x: torch.Tensor) -> torch.Tensor:
            captured.clear()
            handle = head.register_forward_pre_hook(grab)
            try:
                model(x)
            finally:
                handle.remove()
            return captured[-1]

        z = features(probe)
        if not torch.allclose(head(z), reference, atol=1e-4, rtol=1e-4):
            raise ScanOptionError(
                f"{type(model).__name__}: the classifier module does not produce the model's output from "
                "its input alone; scan cannot separate features from head in this model."
            )
    return _Split(features, head, "classifier input")


# ---------------------------------------------------------------------------------------
# the statistic
# ---------------------------------------------------------------------------------------
def _greedy_matching(weights: torch.Tensor) -> list[tuple[int, int, float]]:
    """Pairs ``(k, j)`` with each row and each column used at most once, heaviest first.

    A greedy maximum-weight matching: within a factor 2 of the optimum, exact for the
    permutation-like matrices an all-to-all backdoor produces, and free of a SciPy dependency.
    """
    w = weights.clone()
    pairs = []
    for _ in range(min(w.shape)):
        flat = int(torch.argmax(w))
        k, j = divmod(flat, w.shape[1])
        value = float(w[k, j])
        if value <= 0:
            break
        pairs.append((k, j, value))
        w[k, :] = -1.0
        w[:, j] = -1.0
    return pairs


def scan_statistics(noisy: torch.Tensor, noisy_masked: torch.Tensor, clean: torch.Tensor) -> dict[str, Any]:
    """Backdoor statistics from three confusion matrices of the held-out images.

    ``noisy[k, j]`` counts images of class ``k`` predicted ``j`` with the adversarial noise on
    (pooled over the noise restarts), ``noisy_masked`` the same with the negative feature mask
    applied too, ``clean`` the unmodified model. Each matrix is normalised by its own row
    totals, so pooled and single matrices compare directly.

    * all-to-one: for every class ``j``, the share of held-out images of the *other* classes
      that the noisy model sends to ``j`` (an attack success rate), minus the share the
      unmodified model already sends there, rescaled: ``(noisy - base) / (1 - base)``, so
      natural confusions (shirt vs T-shirt) are not blamed on a backdoor. The class with the
      largest excess is the suspected target and the excess is the score. Pooling restarts
      is what makes it discriminate: a backdoor pulls every restart to its target, a clean
      model breaks towards a different class each time. ``target_masked`` is the class with
      the largest excess under the noise *and* the negative mask: the better target estimate
      on LayerNorm models (see :data:`TARGET_SOURCES` and :func:`decide`).
    * all-to-all: shares per true class ``k`` and destination ``j != k``, on what the noise
      and the negative mask *agree* on (``min`` of the two shares), excess over the
      unmodified model. The score is the mean over classes of a greedy one-to-one matching
      ``k -> j``: a permutation-like shift (class k mostly to one class k', every k'
      different) scores high, while an all-to-one backdoor can claim its target for one
      class only.

    Why the negative mask is not in the all-to-one score: measured on the calibration zoo
    (``benchmarks/calibrate_scan.py``), the negative mask sends clean models too onto one
    "default" class (the one the head predicts when the discriminative features are gone),
    and the agreement statistic separated clean from backdoored models worse than the noise
    alone. It is still reported (``all_to_one_agree``) for the record.
    """
    n, m, b = noisy.double(), noisy_masked.double(), clean.double()
    k = n.shape[0]
    present = b.sum(1) > 0

    def column_rate(conf: torch.Tensor) -> torch.Tensor:
        per_class = conf.sum(1)
        others = (per_class.sum() - per_class).clamp_min(1)
        return conf.clone().fill_diagonal_(0).sum(0) / others

    def row_share(conf: torch.Tensor) -> torch.Tensor:
        return conf.clone().fill_diagonal_(0) / conf.sum(1).clamp_min(1)[:, None]

    def excess(rate: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return (rate - base) / (1 - base).clamp_min(1e-6)

    base = column_rate(b)
    noisy_excess = excess(column_rate(n), base)
    agree = excess(torch.minimum(column_rate(n), column_rate(m)), base)
    target = int(torch.argmax(noisy_excess))
    target_masked = int(torch.argmax(excess(column_rate(m), base)))

    shift = excess(torch.minimum(row_share(n), row_share(m)), row_share(b))
    shift = shift.clamp_min(0).fill_diagonal_(0)
    pairs = _greedy_matching(shift)
    classes_present = max(int(present.sum()), 1)
    mapping: list[int | None] = [None] * k
    for row, col, _ in pairs:
        mapping[row] = col
    return {
        "all_to_one": float(noisy_excess[target]),
        "target": target,
        "target_masked": target_masked,
        "all_to_one_agree": float(agree.max()),
        "target_rate_noisy": float(column_rate(n)[target]),
        "target_rate_noisy_masked": float(column_rate(m)[target]),
        "target_rate_clean": float(base[target]),
        "all_to_all": sum(v for _, _, v in pairs) / classes_present,
        "all_to_all_map": mapping,
        "num_classes": k,
    }


def calibration_cautions(config: dict[str, Any], clean_acc: float) -> list[str]:
    """What a user should know before trusting a verdict, from a report's ``config``: its
    normalisation family's record on the calibration models and, where one was counted at the
    cuts the scan used, on held-out models no fit saw (in-sample figures flatter a threshold;
    misses make a clean verdict weak evidence, false alarms a backdoored one doubtful), and a
    scanned model below the calibration's accuracy floor (under-trained models collapse under
    the noise)."""
    if config.get("calibration") == CALLER_THRESHOLDS:
        return []
    family = config.get("norm_family")
    rel = config.get("calibration_reliability")
    cautions = []
    if rel is None:
        cautions.append(
            f"caution: the calibration holds no model of this normalisation family ({family}); "
            "the threshold is the pooled fallback and the verdict is uncalibrated"
        )
    else:
        # the held-out record (models of seeds no fit saw) where one was counted at these cuts
        held = (config.get("calibration_heldout") or {}).get("record")
        records = [rel] if held is None else [rel, held]
        missed = any(r["backdoored_models"] > r["detected"] for r in records)
        # of the all-to-one backdoors found (a missed one has no target to be right about)
        wrong_targets = [
            f"{r['targets_correct']}/{all_to_one_found(r)} found" + (" held out" if r is held else "")
            for r in records
            if r["targets_correct"] < all_to_one_found(r)
        ]
        consequences = [
            "a clean verdict is weak evidence" if missed else "",
            "a backdoored verdict may be a false alarm" if any(r["false_positives"] for r in records) else "",
            f"suspected targets were right for {' and '.join(wrong_targets)}" if wrong_targets else "",
        ]
        if any(consequences):
            heldout = (
                ""
                if held is None
                else f"; on {held['clean_models'] + held['backdoored_models']} held-out models (seeds the "
                f"calibration was not fitted on) it detected {held['detected']}/{held['backdoored_models']} and "
                f"flagged {held['false_positives']}/{held['clean_models']}"
            )
            cautions.append(
                f"caution: on the calibration models of this normalisation family ({family}: "
                f"{', '.join(rel['archs'])}) the scan detected {rel['detected']}/{rel['backdoored_models']} "
                f"backdoored models and flagged {rel['false_positives']}/{rel['clean_models']} clean ones"
                + heldout
                + "; "
                + "; ".join(c for c in consequences if c)
            )
    stats = config.get("statistics") or {}
    split_cut = config.get("all_to_one_split_threshold")
    if (
        "all_to_one" in stats
        and stats["all_to_one"] > config["threshold"]
        and not agrees(stats)
        and not splits_count(stats, bool(config.get("all_to_one_agreement")), split_cut)
    ):
        rule = (
            "counts only where both name one class"
            if split_cut is None
            else f"counts where they name different classes only above {split_cut:.3f}"
        )
        cautions.append(
            f"note: BAN's all-to-one score {stats['all_to_one']:.3f} is above its cut {config['threshold']:.3f}, "
            f"but the noise alone sends the held-out images to class {stats['target']} and the noise with the "
            f"negative mask to class {stats['target_masked']}; on this family ({family}) the score {rule} "
            "(clean models read split far more often than backdoors), so it did not decide the verdict (the "
            "verdict is the other statistics' and stages')"
        )
    fitted_eps = config.get("calibrated_eps")
    if fitted_eps is not None and config.get("eps") != fitted_eps:
        cautions.append(
            f"caution: the noise budget eps={config.get('eps')} is not the one this family's threshold was "
            f"calibrated at ({fitted_eps}); the score does not compare with the threshold. Leave eps at its "
            "default, or pass threshold= and all_to_all_threshold= fitted at your budget"
        )
    fitted, reach = config.get("reach_calibrated"), config.get("reach_budget")
    if fitted and reach:
        used = (reach["norm"], reach["rho"], reach.get("steps"))
        calibrated = (fitted.get("norm"), fitted.get("rho"), fitted.get("steps", DEFAULT_REACH["steps"]))
        if used != calibrated:
            cautions.append(
                "caution: the reach budget ({} {:g}, {} steps) is not the one this family's reach threshold "
                "was calibrated at ({} {:g}, {} steps); leave reach_norm, reach_rho and reach_steps at their "
                "defaults, or pass reach_threshold= fitted at your budget".format(*used, *calibrated)
            )
    fitted, spread = config.get("spread_calibrated"), config.get("spread_budgets")
    calibrated_spread = (
        [budget_of(r) for r in spread_plan(ScanOptions(), fitted)] if fitted and spread else []
    )
    uncalibrated = [budget for budget in spread or [] if budget not in calibrated_spread]
    if fitted and uncalibrated:
        cautions.append(
            f"caution: the spread readings' shape and budget ({uncalibrated}) are not the ones this family's "
            f"spread thresholds were calibrated at ({calibrated_spread}); leave spread_shape, spread_rho, "
            "spread_window, spread_alpha, spread_steps and spread_restarts at their defaults, or pass "
            "spread_threshold= fitted at yours"
        )
    floor = config.get("calibration_min_acc")
    if floor is not None and clean_acc < floor:
        cautions.append(
            f"caution: the model gets only {clean_acc:.1%} of the held-out clean images right; the "
            f"calibration left out models below {floor:.0%}, because under-trained models collapse onto one "
            "class under the noise and score like backdoored ones"
        )
    return cautions


def agrees(stats: dict[str, Any]) -> bool:
    """Whether the noise alone and the noise with the negative mask send the held-out images to
    the same class (:func:`scan_statistics`' ``target`` and ``target_masked``).

    A backdoor's neurons pull towards its target both ways. On the 55 LayerNorm models
    (test_vit, convnext_atto) of two held-out checks, the all-to-one statistic flagged 4 clean
    test_vits (of 25), each pulled to one class by the noise and to another with the mask, and 7
    backdoors: 5 named one class both ways, and reach found the other 2 with their true target.
    Over the 102 LayerNorm models the family's cuts are now fitted on, at eps 0.3, 6 of 57 clean
    models read one class both ways (all-to-one score at most 0.058) against 20 of 42 all-to-one
    backdoors (``benchmarks/DETECTION.md``). So the calibration can make agreement a condition of
    BAN's all-to-one verdict for a family (``all_to_one_agreement_by_family``; a scan given only
    ``threshold=`` keeps the family's condition), with the cut fitted under it. It only withdraws
    verdicts: the all-to-all statistic and the later stages, where they run, decide such a model.
    """
    return int(stats["target"]) == int(stats["target_masked"])


def splits_count(stats: dict[str, Any], agreement: bool, split_threshold: float | None) -> bool:
    """Whether BAN's all-to-one score may decide where its two readings name different classes
    (:func:`agrees`): never under the agreement condition, else above ``split_threshold`` (``None``:
    at the family's cut, as where they agree).

    On BatchNorm models the agreement condition would cost backdoors BAN reads far above every
    clean model with split readings; yet the clean models BAN flagged out of sample read split (6
    of 7 small test_resnets, on 182 held-out models). A second, higher cut for split readings
    keeps the former and clears the latter where they lie apart; over six BatchNorm sets it
    withdrew as many Blended backdoors as it cleared false alarms, so the shipped calibration
    gives no family one (``benchmarks/DETECTION.md``)."""
    if agreement:
        return False
    return split_threshold is None or stats["all_to_one"] > split_threshold


def decide(
    stats: dict[str, Any],
    *,
    threshold: float,
    all_to_all_threshold: float | None,
    target_source: str = "noisy",
    agreement: bool = False,
    split_threshold: float | None = None,
) -> tuple[str, str | None, int | None, float, float]:
    """``(verdict, pattern, suspected_target, score, threshold)`` from :func:`scan_statistics`.
    ``all_to_all_threshold=None``: the all-to-all statistic does not decide.

    All-to-one wins when both statistics fire (its target is the actionable finding); a
    clean verdict reports the all-to-one statistic, the paper's own. The verdict always comes
    from the noise alone; ``target_source`` (one of :data:`TARGET_SOURCES`, chosen per
    normalisation family by the calibration) says which predictions name the target.
    ``agreement`` (:func:`agrees`; chosen per family by the calibration): the all-to-one
    statistic decides only where the noise alone and the noise with the negative mask name the
    same class. ``split_threshold`` (chosen per family by the calibration, never with
    ``agreement``): where they name different classes, the all-to-one statistic decides only
    above this higher cut too (:func:`splits_count`).
    """
    if target_source not in TARGET_SOURCES:
        raise ScanOptionError(f"target_source must be one of {sorted(TARGET_SOURCES)}, got {target_source!r}")
    if agreement and split_threshold is not None:
        raise ScanOptionError(
            "agreement=True never lets split readings decide, so a split_threshold would not apply: give one "
            "or the other"
        )
    if stats["all_to_one"] > threshold and (splits_count(stats, agreement, split_threshold) or agrees(stats)):
        target = int(stats[TARGET_SOURCES[target_source]])
        return "backdoored", "all-to-one", target, float(stats["all_to_one"]), float(threshold)
    if all_to_all_threshold is not None and stats["all_to_all"] > all_to_all_threshold:
        return "backdoored", "all-to-all", None, float(stats["all_to_all"]), float(all_to_all_threshold)
    return "clean", None, None, float(stats["all_to_one"]), float(threshold)


# ---------------------------------------------------------------------------------------
# the scan
# ---------------------------------------------------------------------------------------
def combine_stages(
    ban: tuple[str, str | None, int | None],
    *,
    reach_fired: bool,
    reach_target: int | None,
    target_when_both: str = "ban",
    spread_fired: bool = False,
) -> tuple[str, str | None, int | None, str | None]:
    """``(verdict, pattern, suspected_target, decided_by)`` of both stages from BAN's
    ``(verdict, pattern, target)`` (:func:`decide`) and whether the reach stage fired.

    Reach is a second stage: where BAN fired, BAN's verdict stands (and its target, unless
    ``target_when_both`` is ``"reach"`` and both name an all-to-one target); where BAN found
    nothing and reach fired, the model is backdoored (all-to-one) with reach's target. The
    spread reading comes last: where neither fired and it did, the model is backdoored with an
    all-to-all pattern (no target).
    ``decided_by`` is ``"ban"``, ``"reach"``, ``"ban+reach"``, ``"spread"``, or ``None`` for a
    clean verdict. ``benchmarks/calibrate_reach.py`` and ``calibrate_spread.py`` count their
    errors with this same function.
    """
    verdict, pattern, target = ban
    if verdict == "clean" and not reach_fired and spread_fired:
        return "backdoored", "all-to-all", None, "spread"
    if not reach_fired:
        return verdict, pattern, target, "ban" if verdict == "backdoored" else None
    if verdict == "clean":
        return "backdoored", "all-to-one", reach_target, "reach"
    if pattern == "all-to-one" and target_when_both == "reach":
        target = reach_target
    return verdict, pattern, target, "ban+reach"


def _reach_can_change(verdict: str, pattern: str | None, target_when_both: str) -> bool:
    """Whether the reach stage can still change BAN's outcome (:func:`combine_stages`): where BAN
    found nothing, or found an all-to-one target and the family's calibration trusts reach's target
    where both fire."""
    return verdict == "clean" or (pattern == "all-to-one" and target_when_both == "reach")


def _later_stage(
    calibration: dict, stage: str, family: str, mode: str, threshold: float | None
) -> tuple[dict | None, float | None, bool]:
    """``(calibrated entry, threshold, whether it runs)`` of a later stage, ``"reach"`` or
    ``"spread"``: the caller's threshold, else the one the calibration fitted for ``family``;
    ``"auto"`` runs it where there is one, ``"on"`` always (an error without one)."""
    calibrated = ((calibration.get(stage) or {}).get("by_family") or {}).get(family)
    if threshold is None:
        threshold = (calibrated or {}).get("threshold")
    run = mode == "on" or (mode == "auto" and threshold is not None)
    if run and threshold is None:
        raise ScanOptionError(
            f"{stage}='on' needs a threshold for the {stage} score, and the calibration records none for "
            f"this model's normalisation family ({family}); pass {stage}_threshold= (CLI: --{stage}-threshold), "
            f"or leave {stage}='auto'"
        )
    return calibrated, threshold, run


def spread_entries(calibrated: dict | list | None) -> list[dict]:
    """A family's calibrated spread readings (``calibration["spread"]["by_family"][family]``), in
    the order the scan runs them: a list, or one entry as a dict (as calibrations wrote it before
    a family could have several); an entry without ``shape`` is ``"l2"``, as the first wrote it."""
    return [calibrated] if isinstance(calibrated, dict) else list(calibrated or [])


def spread_plan(opts: ScanOptions, calibrated: dict | list | None) -> list[dict[str, Any]]:
    """The spread readings a scan with ``opts`` runs, in order, each ``{"shape", <size>, "steps",
    "threshold"}`` (the size named by :data:`SPREAD_SIZES`; ``threshold`` ``None`` where neither
    calibrated nor given): ``opts.spread_shape`` alone where given, else every shape calibrated for
    the family (``calibrated``, see :func:`spread_entries`), else ``"l2"``. Each budget is the
    caller's where given, else the calibrated entry's of that shape, else :data:`DEFAULT_SPREAD`'s.

    Raises:
        ScanOptionError: the budget of a shape the scan does not run; another shape than the
            calibrated ones without a threshold (theirs are cuts on other readings' scores); one
            threshold for several readings.
    """
    fitted = {entry.get("shape", "l2"): entry for entry in spread_entries(calibrated)}
    shapes = [opts.spread_shape] if opts.spread_shape else list(fitted) or ["l2"]
    for shape in SPREAD_SHAPES:
        option = f"spread_{SPREAD_SIZES[shape]}"
        if shape not in shapes and getattr(opts, option) is not None:
            raise ScanOptionError(
                f"{option} is the budget of the {shape!r} spread reading, and this scan runs {shapes}; "
                f"drop it, or pass spread_shape={shape!r}"
            )
    if opts.spread_restarts is not None and "l2" not in shapes:
        raise ScanOptionError(
            f"spread_restarts is the {'l2'!r} spread reading's, and this scan runs {shapes}; drop it, or pass "
            "spread_shape='l2'"
        )
    if fitted and opts.spread_shape not in (None, *fitted) and opts.spread_threshold is None:
        raise ScanOptionError(
            f"the calibrated spread thresholds for this model's family are cuts on the {list(fitted)} "
            f"readings' scores, not on the {opts.spread_shape!r} one's; pass spread_threshold= "
            f"(CLI: --spread-threshold) with spread_shape={opts.spread_shape!r}, or leave spread_shape unset"
        )
    if opts.spread_threshold is not None and len(shapes) > 1:
        raise ScanOptionError(
            f"this family's spread stage runs {shapes}, each with its own cut; pass spread_shape= (CLI: "
            "--spread-shape) to name the one spread_threshold= cuts"
        )
    plan = []
    for shape in shapes:
        entry, default, size = fitted.get(shape, {}), DEFAULT_SPREAD[shape], SPREAD_SIZES[shape]
        value = getattr(opts, f"spread_{size}") or entry.get(size) or default[size]
        threshold = opts.spread_threshold if opts.spread_threshold is not None else entry.get("threshold")
        # the l2 shape's fits (an entry written before them made one)
        restarts = (
            int(opts.spread_restarts or entry.get("restarts") or default["restarts"]) if shape == "l2" else 1
        )
        plan.append(
            {
                "shape": shape,
                size: int(value) if shape == "window" else float(value),
                "steps": int(opts.spread_steps or entry.get("steps") or default["steps"]),
                **restarts_field(restarts),
                "threshold": None if threshold is None else float(threshold),
            }
        )
    return plan


def restarts_field(restarts: int) -> dict[str, int]:
    """The l2 reading's restarts as a plan entry, a report's budget or a calibration entry spells
    them: named only where more than one, so a single-fit reading is spelt as it was before
    restarts and the cuts, records and stored scores counted at it still match."""
    return {"restarts": restarts} if restarts > 1 else {}


def budget_of(reading: dict[str, Any]) -> dict[str, Any]:
    """A spread reading's shape, budget and steps, and the l2 shape's restarts where more than one
    (of a plan entry or a report's reading)."""
    size = SPREAD_SIZES[reading["shape"]]
    return {
        "shape": reading["shape"],
        size: reading[size],
        "steps": reading["steps"],
        **restarts_field(reading.get("restarts", 1)),
    }


def _spread_stage(
    calibration: dict, family: str, opts: ScanOptions
) -> tuple[dict | list | None, list[dict[str, Any]], bool]:
    """``(calibrated entries, plan, whether it runs)`` of the spread stage, as
    :func:`_later_stage` has them for reach: ``"auto"`` runs it where every reading of the plan
    has a threshold, ``"on"`` always (an error where one has none)."""
    calibrated = ((calibration.get("spread") or {}).get("by_family") or {}).get(family)
    plan = spread_plan(opts, calibrated)
    complete = all(reading["threshold"] is not None for reading in plan)
    if opts.spread == "on" and not complete:
        raise ScanOptionError(
            "spread='on' needs a threshold for the spread score, and the calibration records none for this "
            f"model's normalisation family ({family}); pass spread_threshold= (CLI: --spread-threshold), "
            "or leave spread='auto'"
        )
    return calibrated, plan, opts.spread == "on" or (opts.spread == "auto" and complete)


def _spread_readings(
    plan: list[dict[str, Any]],
    run: Callable[[dict[str, Any], Callable, torch.Generator], Any],
    *,
    seed: int,
    shared: torch.Generator,
) -> dict[str, Any]:
    """Run every reading of the ``plan`` in order (``run(budget, reading, generator)``); the
    report's ``spread``: the first reading that fired (else the one nearest its cut) with the
    others under ``"others"``.

    The readings after the first that fires cannot change the verdict, but they tell the
    trigger's shape, which ``method="auto"`` passes to AWM (:func:`timm_purify._auto.trigger_shape`):
    a window of a blended trigger can fire the window reading (the fully trained blended
    all-to-all resnet18: window 0.874, blend 0.880), while a pasted patch has never fired the
    blend (0.016-0.047 on the fully trained patch all-to-all resnet18s, at most 0.326 on the
    2,000-image ones, against a cut of 0.648). They cost a reading only where a model is flagged
    all-to-all: the blend (1-4 s) on a BatchNorm model, the window (12-55 s) on a LayerNorm one.

    The blend reading draws from a generator of its own, seeded with the scan's ``seed``, so its
    score does not depend on which readings ran before it: a calibration can take it alone. The
    L2 and window readings draw from the scan's (``shared``), as they did when their cuts were fitted.
    """
    readings = []
    for at in plan:
        budget = {k: v for k, v in at.items() if k not in ("shape", "threshold")}
        generator = torch.Generator().manual_seed(seed) if at["shape"] == "blend" else shared
        result = run(budget, _SPREAD_READINGS[at["shape"]], generator)
        readings.append(
            {
                "shape": at["shape"],
                **result.to_dict(),
                "threshold": at["threshold"],
                "fired": result.score > at["threshold"],
            }
        )
    fired = [r for r in readings if r["fired"]]
    shown = fired[0] if fired else max(readings, key=lambda r: r["score"] - r["threshold"])
    return {**shown, "others": [r for r in readings if r is not shown]}


def _stratified_split(
    y: torch.Tensor, holdout: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    search, held = [], []
    for cls in torch.unique(y).tolist():
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_held = min(len(idx) - 1, max(1, round(holdout * len(idx))))
        held.append(idx[:n_held])
        search.append(idx[n_held:])
    return torch.cat(search), torch.cat(held)


@contextlib.contextmanager
def _batch_statistics(model: nn.Module, enabled: bool) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics inside the block; running statistics
    are left as they are (momentum 0) and every other module stays in eval mode."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if enabled else []
    saved = [(m, m.training, m.momentum) for m in layers]
    for m in layers:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum


def _even_batch(n: int, batch_size: int) -> int:
    """The batch size <= ``batch_size`` that splits ``n`` items into batches of nearly equal
    size, so no tiny last batch normalises with statistics of its own."""
    batches = max(1, -(-n // batch_size))
    return -(-n // batches)


def _predict(
    split: _Split,
    norm: nn.Module,
    data: ImageData,
    *,
    batch_size: int,
    device: torch.device,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for x, _ in data.batches(batch_size, device=device):
            z = split.features(norm(x))
            if mask is not None:
                z = z * mask
            out.append(split.head(z).argmax(1).cpu())
    return torch.cat(out)


# the options of the noise and mask searches: a held-out record holds only for the ones it was
# counted with (the calibration's scans ran with the defaults)
_SEARCH_FIELDS = (
    "steps",
    "mask_epochs",
    "mask_steps_per_epoch",
    "mask_lr",
    "mask_lambda",
    "batch_size",
    "holdout",
    "restarts",
    "bn_mode",
)


@dataclass(frozen=True)
class _Settings:
    """Every threshold, budget and stage a scan decides with, resolved from its options over the
    calibration (:func:`_settings`)."""

    threshold: float
    a2a_threshold: float | None
    fitted_eps: float | None
    eps: float
    target_source: str
    agreement: bool
    split_threshold: float | None
    reach_calibrated: dict | None
    reach_threshold: float | None
    run_reach: bool
    reach_budget: dict[str, Any]
    target_when_both: str
    spread_calibrated: dict | list | None
    spread_plan: list[dict[str, Any]]
    run_spread: bool

    def cuts(self, opts: ScanOptions) -> dict[str, Any]:
        """The cuts in :func:`family_cuts`' spelling, as this scan uses them."""
        return _cuts(
            eps=self.eps,
            all_to_one=self.threshold,
            all_to_all=self.a2a_threshold,
            target_source=self.target_source,
            agreement=self.agreement,
            split_threshold=self.split_threshold,
            search=opts,
            reach={
                **self.reach_budget,
                "threshold": float(self.reach_threshold),
                "target_when_both": self.target_when_both,
            }
            if self.run_reach
            else None,
            spread=self.spread_plan if self.run_spread else None,
        )


def _settings(opts: ScanOptions, calibration: dict[str, Any], family: str) -> _Settings:
    """The caller's options where given, else what ``calibration`` fitted for ``family`` (an empty
    calibration: the caller gave both thresholds), else the defaults."""
    # no calibration (the caller gave both thresholds): the paper's reading, no condition
    decision = (
        calibrated_decision(calibration, family)
        if calibration
        else {
            "threshold": None,
            "all_to_all_threshold": None,
            "target_source": "noisy",
            "agreement": False,
            "split_threshold": None,
        }
    )
    fitted_one, fitted_a2a = decision["threshold"], decision["all_to_all_threshold"]
    # the budget the family's threshold was fitted at (None: no calibration in use, or none recorded)
    fitted_eps = calibrated_eps(calibration, family) if calibration else None
    # the universal-reach stage and the spread reading: where the calibration fitted them for
    # this family, or where asked
    reach_calibrated, reach_threshold, run_reach = _later_stage(
        calibration, "reach", family, opts.reach, opts.reach_threshold
    )
    spread_calibrated, plan, run_spread = _spread_stage(calibration, family, opts)
    return _Settings(
        threshold=float(opts.threshold if opts.threshold is not None else fitted_one),
        a2a_threshold=float(opts.all_to_all_threshold)
        if opts.all_to_all_threshold is not None
        else fitted_a2a,
        fitted_eps=fitted_eps,
        eps=float(opts.eps if opts.eps is not None else fitted_eps or DEFAULT_EPS),
        # whose predictions name the suspected target (calibrated per family; see TARGET_SOURCES)
        target_source=decision["target_source"],
        # whether BAN's all-to-one verdict needs the noise and the masked noise to agree (see agrees)
        agreement=decision["agreement"],
        # where they do not agree: the higher cut the all-to-one score must pass (see splits_count)
        split_threshold=decision["split_threshold"],
        reach_calibrated=reach_calibrated,
        reach_threshold=reach_threshold,
        run_reach=run_reach,
        reach_budget={
            "norm": opts.reach_norm or (reach_calibrated or {}).get("norm") or DEFAULT_REACH["norm"],
            "rho": float(opts.reach_rho or (reach_calibrated or {}).get("rho") or DEFAULT_REACH["rho"]),
            "steps": int(opts.reach_steps or (reach_calibrated or {}).get("steps") or DEFAULT_REACH["steps"]),
        },
        target_when_both=(reach_calibrated or {}).get("target_when_both", "ban"),
        spread_calibrated=spread_calibrated,
        spread_plan=plan,
        run_spread=run_spread,
    )


def scan(
    model: nn.Module,
    data: ImageData | str | os.PathLike,
    *,
    files: str | os.PathLike | None = None,
    seed: int = 0,
    clean_count: int | None = None,
    clean_fraction: float | None = None,
    device: torch.device | str | None = None,
    quiet: bool = False,
    **options: Any,
) -> ScanReport:
    """Scan ``model`` for a backdoor with BAN and return a :class:`ScanReport`.

    Args:
        model: a timm classifier (not modified: the scan works on a copy).
        data: clean images: an :class:`ImageData`, a bundled set name or an image folder
            (its ``train`` split). A few hundred class-balanced images suffice (the paper
            uses 1% of the training set).
        files: the file or folder the model was loaded from; its files are inspected
            statically (nothing is loaded) and the findings join the report.
        seed: drives the subset, the split, the mask start and the noise start.
        clean_count, clean_fraction: take a class-balanced, seeded subset of ``data``.
        device: where to run (default: accelerate's choice).
        quiet: no progress bars.
        **options: fields of :class:`ScanOptions` (``eps``, ``steps``, ``mask_epochs``, ...).

    Raises:
        ScanOptionError: unknown or invalid option, too few clean images (at least two per
            class: one for the searches, one held out), data that does not fit the model.
        FileNotFoundError: ``files`` does not exist, or the calibration file is missing.
    """
    opts = _build_options(options)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ScanOptionError(f"seed must be an integer, got {seed!r}")
    num_classes = check_classifier(model)
    findings: list[dict[str, str]] = []
    if files is not None:
        from .static import inspect_files

        findings = [f.to_dict() for f in inspect_files(files)]
    calibration: dict[str, Any] = {}
    if opts.threshold is None or opts.all_to_all_threshold is None:
        calibration = load_calibration()
    family = norm_family(model)
    st = _settings(opts, calibration, family)
    threshold, a2a_threshold, fitted_eps, eps = st.threshold, st.a2a_threshold, st.fitted_eps, st.eps
    reach_calibrated, reach_threshold, run_reach = st.reach_calibrated, st.reach_threshold, st.run_reach
    reach_budget, target_when_both = st.reach_budget, st.target_when_both
    spread_calibrated, run_spread = st.spread_calibrated, st.run_spread
    # the record on held-out models, where this scan decides with the cuts it was counted at
    heldout = heldout_record(calibration, family, st.cuts(opts)) if calibration else None
    try:
        if isinstance(data, ImageData):
            if data.num_classes != num_classes:
                raise ScanOptionError(
                    f"the data has {data.num_classes} classes but the model's head has {num_classes}; "
                    "give clean images of the classes the model was trained on"
                )
            data = data.to_model(model)
        else:
            data = load_data(data, split="train", model=model)
        if clean_count is not None or clean_fraction is not None:
            data = clean_subset(data, count=clean_count, fraction=clean_fraction, seed=seed)
    except DataError as err:
        raise ScanOptionError(str(err)) from err
    if int(data.y.max()) >= num_classes:
        raise ScanOptionError(f"labels go up to {int(data.y.max())} but the model has {num_classes} classes")
    counts = torch.bincount(data.y, minlength=num_classes)
    short = [
        data.classes[c] if c < len(data.classes) else str(c) for c in range(num_classes) if counts[c] < 2
    ]
    if short:
        raise ScanOptionError(
            f"the scan needs at least 2 clean images of every class (one for the searches, one held out "
            f"for the statistic); too few for class(es) {short[:10]}. Give more images "
            "(e.g. clean_count=10 * number of classes or more)."
        )

    start = time.perf_counter()
    timings: dict[str, float] = {}
    dev = get_device(device=device)
    gen = torch.Generator().manual_seed(seed)
    work = copy.deepcopy(model).to(dev).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    norm = Normalizer(work).to(dev)
    search_idx, held_idx = _stratified_split(data.y, opts.holdout, gen)
    search, held = data.subset(search_idx), data.subset(held_idx)

    # 1. where the features are; cache them for the search images (noise off, eval mode)
    t0 = time.perf_counter()
    probe = search.x[: min(len(search), 8)].to(dev).float().div_(255.0)
    split = _split_model(work, norm(probe))
    with torch.no_grad():
        z_all = torch.cat([split.features(norm(x)) for x, _ in search.batches(opts.batch_size, device=dev)])
    y_all = search.y.to(dev)
    with torch.no_grad():
        search_right = split.head(z_all).argmax(1) == y_all
    search_acc = float(search_right.float().mean())
    timings["features"] = time.perf_counter() - t0

    # 2. feature mask, head only
    t0 = time.perf_counter()
    mask = torch.rand(z_all.shape[1:], generator=gen).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([mask], lr=opts.mask_lr)
    n = len(search)
    mask_steps = opts.mask_epochs * opts.mask_steps_per_epoch
    last_losses = torch.zeros(2, device=dev)  # the last epoch's mean losses, read once
    for step in progress(range(mask_steps), desc="scan: feature mask", disable=quiet):
        idx = torch.randint(0, n, (min(opts.batch_size, n),), generator=gen).to(dev)
        z, y = z_all[idx], y_all[idx]
        loss_pos = F.cross_entropy(split.head(z * mask), y)
        loss_neg = F.cross_entropy(split.head(z * (1 - mask)), y)
        l1 = mask.abs().sum()
        loss = loss_pos - loss_neg + opts.mask_lambda * l1 / l1.detach().clamp_min(1e-12)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            mask.clamp_(0.0, 1.0)
        if step >= mask_steps - opts.mask_steps_per_epoch:  # last epoch's mean losses
            last_losses += torch.stack([loss_pos, loss_neg]).detach() / opts.mask_steps_per_epoch
    mask = mask.detach()
    pos_loss, neg_loss = last_losses.tolist()
    del z_all
    timings["mask"] = time.perf_counter() - t0

    # 3. adversarial neuron noise on every affine norm layer, from `restarts` random starts;
    # 4. the statistic on the held-out images, pooled over the restarts
    t0 = time.perf_counter()
    batch_stats = opts.bn_mode == "batch"
    bs = _even_batch(len(held), max(opts.batch_size, 256))
    pred_clean = _predict(split, norm, held, batch_size=bs, device=dev)
    preds_noisy, preds_masked = [], []
    noise = NormNoise(work, eps=eps)
    try:
        bar = iter(progress(range(opts.steps * opts.restarts), desc="scan: neuron noise", disable=quiet))

        def noisy_loss() -> torch.Tensor:
            next(bar, None)
            idx = torch.randint(0, n, (min(opts.batch_size, n),), generator=gen)
            x = search.x[idx].to(dev).float().div_(255.0)
            return F.cross_entropy(work(norm(x)), search.y[idx].to(dev))

        for _ in range(opts.restarts):
            noise.reset(gen)
            with torch.enable_grad(), _batch_statistics(work, batch_stats):
                noise.ascend(noisy_loss, opts.steps)
            with noise.on(), _batch_statistics(work, batch_stats):
                preds_noisy.append(_predict(split, norm, held, batch_size=bs, device=dev))
                preds_masked.append(_predict(split, norm, held, batch_size=bs, device=dev, mask=1 - mask))
        for _ in bar:  # exhaust the iterator so the progress bar closes
            pass
    finally:
        noise.remove()
    timings["noise"] = time.perf_counter() - t0
    pred_noisy, pred_masked = torch.cat(preds_noisy), torch.cat(preds_masked)
    y_held = held.y
    y_pooled = y_held.repeat(opts.restarts)
    confusions = {
        "noisy": confusion_matrix(y_pooled, pred_noisy, num_classes),
        "noisy_masked": confusion_matrix(y_pooled, pred_masked, num_classes),
        "clean": confusion_matrix(y_held, pred_clean, num_classes),
    }
    stats = scan_statistics(confusions["noisy"], confusions["noisy_masked"], confusions["clean"])

    target_source = st.target_source
    verdict, pattern, target, score, used = decide(
        stats,
        threshold=threshold,
        all_to_all_threshold=a2a_threshold,
        target_source=target_source,
        agreement=st.agreement,
        split_threshold=st.split_threshold,
    )

    # 5-6. the pixel-space stages, on the images the unmodified model gets right (eval mode, no noise).
    # Where they run because the calibration enabled them ("auto"), each is skipped once it can no
    # longer change the verdict or the target (see combine_stages): reach where BAN found an
    # all-to-all pattern, or an all-to-one target this family trusts over reach's; spread where an
    # earlier stage fired. "on" always runs them.
    skipped: list[str] = []
    do_reach = run_reach and (opts.reach == "on" or _reach_can_change(verdict, pattern, target_when_both))
    if run_reach and not do_reach:
        skipped.append("reach")
    if do_reach or run_spread:
        pixels = PixelModel(work, norm)
        keep_search, keep_held = search_right.cpu(), pred_clean.cpu() == held.y
        right_search = (search.floats()[keep_search].to(dev), search.y[keep_search].to(dev))
        right_held = (held.floats()[keep_held].to(dev), held.y[keep_held].to(dev))
    # 5. universal reach
    reach: dict[str, Any] | None = None
    if do_reach:
        result = universal_reach(
            pixels,
            right_search,
            right_held,
            num_classes,
            rho=reach_budget["rho"],
            norm=reach_budget["norm"],
            steps=reach_budget["steps"],
            generator=gen,
            quiet=quiet,
        )
        fired = result.score > reach_threshold
        reach = {**result.to_dict(), "threshold": float(reach_threshold), "fired": fired}
        timings["reach"] = result.seconds
    # 6. universal spread (all-to-all reading)
    spread: dict[str, Any] | None = None
    reach_fired = reach is not None and reach["fired"]
    do_spread = run_spread and (opts.spread == "on" or (verdict == "clean" and not reach_fired))
    if run_spread and not do_spread:
        skipped.append("spread")
    if do_spread:
        # each shape's reading, at its budget (L2 radius, window side or blend weight) and steps
        spread = _spread_readings(
            st.spread_plan,
            lambda budget, reading, generator: reading(
                pixels, right_search, right_held, num_classes, **budget, generator=generator
            ),
            seed=seed,
            shared=gen,
        )
        timings["spread"] = sum(r["seconds"] for r in [spread, *spread["others"]])
    verdict, pattern, target, decided_by = combine_stages(
        (verdict, pattern, target),
        reach_fired=reach_fired,
        reach_target=None if reach is None else reach["suspected_target"],
        # whose target stands where both stages name one: chosen per family by the calibration
        target_when_both=target_when_both,
        spread_fired=spread is not None and spread["fired"],
    )
    if decided_by == "reach":
        score, used = reach["score"], reach["threshold"]
    elif decided_by == "spread":
        score, used = spread["score"], spread["threshold"]
    seconds = time.perf_counter() - start
    # the record each report quotes: both stages' where the reach stage ran and was calibrated
    # for the family, else BAN's alone
    # (and the record of all stages where the spread reading ran and was calibrated too)
    both_stages = ((calibration.get("reach") or {}).get("reliability_by_family") or {}).get(family)
    all_stages = ((calibration.get("spread") or {}).get("reliability_by_family") or {}).get(family)
    # (a stage skipped because it could not change the outcome still counts as part of the scan)
    reliability = (
        all_stages
        if run_spread and all_stages
        else both_stages
        if run_reach and both_stages
        else (calibration.get("reliability_by_family") or {}).get(family)
    )
    config = {
        **dataclasses.asdict(opts),
        "eps": eps,
        # the budget this family's threshold was calibrated at (None: thresholds given by the caller)
        "calibrated_eps": fitted_eps,
        "threshold": threshold,
        "all_to_all_threshold": a2a_threshold,
        "calibration": calibration.get("summary") if calibration else CALLER_THRESHOLDS,
        # how this family's verdicts fared on the calibration models (None: thresholds given,
        # or a family the calibration holds no model of); with the reach stage, both stages' record
        "calibration_reliability": reliability,
        # the same record on held-out models the calibration was not fitted on (None: none was
        # counted at the cuts this scan used)
        "calibration_heldout": heldout,
        # the stage(s) whose statistic fired: "ban", "reach", "ban+reach", "spread" (None: clean);
        # BAN's verdict and target stand where it fired
        "decided_by": decided_by,
        # the reach budget and threshold fitted for this family (None: not calibrated), and the one used
        "reach_calibrated": reach_calibrated,
        "reach_budget": reach_budget if reach is not None else None,
        # later stages the calibration runs for this family that were skipped because an earlier
        # stage's verdict and target already stood ("reach", "spread")
        "skipped_stages": skipped,
        # the same for the spread readings: each one's shape and budget (an L2 radius or a window
        # side at 3x32x32, or a blend weight) and steps, where the stage ran
        "spread_calibrated": spread_calibrated,
        # (in the order they ran: the whole plan)
        "spread_budgets": [budget_of(at) for at in st.spread_plan] if spread is not None else None,
        # the calibration left out models below this clean accuracy (they collapse under the noise)
        "calibration_min_acc": calibration.get("min_acc"),
        "norm_family": family,
        # whose predictions named the suspected target (calibrated per family; see TARGET_SOURCES)
        "target_source": target_source,
        # BAN's all-to-one verdict needed the noise and the masked noise to agree (see agrees)
        "all_to_one_agreement": st.agreement,
        # where they did not: the higher cut the all-to-one score had to pass (None: the threshold)
        "all_to_one_split_threshold": st.split_threshold,
        "features": split.where,
        "feature_shape": list(mask.shape),
        "mask_mean": float(mask.mean()),
        "mask_loss_positive": pos_loss,
        "mask_loss_negative": neg_loss,
        "search_acc": search_acc,
        "num_search": len(search),
        "num_held_out": len(held),
        "data": data.source,
        "device": str(dev),
        "statistics": stats,
        "confusions": {name: c.tolist() for name, c in confusions.items()},
        "stage_seconds": timings,
    }
    clean_acc = float((pred_clean == y_held).float().mean())
    config["cautions"] = calibration_cautions(config, clean_acc)
    return ScanReport(
        verdict=verdict,
        score=float(score),
        threshold=float(used),
        suspected_target=target,
        pattern=pattern,
        histogram_noisy=torch.bincount(pred_noisy, minlength=num_classes).tolist(),
        histogram_noisy_masked=torch.bincount(pred_masked, minlength=num_classes).tolist(),
        clean_acc=clean_acc,
        noisy_acc=float((pred_noisy == y_pooled).float().mean()),
        config=config,
        seconds=seconds,
        seed=seed,
        static_findings=findings,
        class_names=list(data.classes) if data.classes else None,
        unsafe_files=any(f.get("severity") == "critical" for f in findings),
        reach=reach,
        spread=spread,
    )
