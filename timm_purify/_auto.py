"""``method="auto"``: let a scan's finding choose the purification method and its options.

Used by :func:`timm_purify.purify` (with ``scan_report=``), ``timm-purify purify --method auto``
and ``timm-purify demo``, so the three pick the same method with the same options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .detection.report import ScanReport

__all__ = [
    "AUTO",
    "AUTO_OPTIONS",
    "auto_options",
    "choose_method",
    "trigger_shape",
    "untaken_error",
    "unused_options",
    "why",
]

# The method name that lets the scan steer NPD.
AUTO = "auto"

# The options ``auto`` runs its methods with (the caller's own options win). Both put the
# polarizer on the last stage's output with lr 0.1: at the paper's spot (the input of the last
# block's first convolution) the fully trained resnet18's BadNets stayed at 99.9% (lr 0.01) or
# 41% (lr 0.1) even with the larger budget; on the last stage it goes to 0%. NPD-TP also gets
# an attack that is not stopped early (5 steps, radius 6 at 3x32x32 instead of 2 steps, 3,
# stop at 60%), which reaches a patch trigger the paper's budget leaves in, over 10 epochs: told
# the target, the fully trained resnet18 suite's BadNets, Blended, SIG and WaNet go to ASR <= 1%
# at <= 1.7 points of accuracy, the demo's weakly trained model to 0% at about 4 points, where the
# paper's budget left 7.6%. Plain NPD keeps the paper's budget over 30 epochs (what the full
# suite measured it with). Measurements: benchmarks/PURIFICATION.md.
AUTO_OPTIONS: dict[str, dict] = {
    "npd": {"layer": "last-stage", "lr": 0.1, "epochs": 30},
    "npd-tp": {
        "layer": "last-stage",
        "lr": 0.1,
        "rho": 6.0,
        "pgd_steps": 5,
        "stop_fraction": 1.0,
        "epochs": 10,
    },
    # LayerNorm models (ConvNeXt, ViT) not read as all-to-all: the per-class replica polarizer (no
    # target needed) on the last stage, lr 0.1, 30 epochs, with the larger attack budget that
    # removed the resnet18 suite's backdoors when NPD was told the target (radius 10, 5 steps, not
    # stopped early). On the fully trained convnext_atto suite it took BadNets to 0.12% at 3.8
    # points (DER 98.1) and Blended to 3.2% at 1.2 (DER 97.8), where NPD-TP towards the scan's
    # (right) target left 46% / 51% and the attention polarizer (cnpd-a, the paper's budget) 0.80% /
    # 49%; it left the all-to-all backdoor at 33% (cnpd-a 32%), which AWM's window removes (below).
    # It leaves SIG at 81% (cnpd-a: 0.00%),
    # which the scan reads as clean on that suite, so auto's plain npd removes it (0.00%); a SIG
    # ConvNeXt the scan does flag would keep its backdoor. The middle budget (rho 6) leaves the
    # smallest worst case of the three attacks (BadNets 12.7%, Blended 2.7%, SIG 6.9%) but the scan
    # has flagged no SIG ConvNeXt so far, and on what it flags rho 10 is better (PURIFICATION.md).
    # On vit_tiny every polarizer tried left the patch in (99.6-99.8%; this budget not tried there).
    "cnpd-r": {
        "layer": "last-stage",
        "lr": 0.1,
        "epochs": 30,
        "rho": 10.0,
        "pgd_steps": 5,
        "stop_fraction": 1.0,
    },
    # A model the scan reads as all-to-all: AWM, its trigger search shaped as the scan's
    # readings found the trigger (choose_method adds trigger="window" or "blend": a pattern
    # pasted into one window, or blended into the whole image, instead of the reference's L1-bounded
    # perturbation, which the all-to-all backdoor often escaped: 22% left on one build of the fully
    # trained resnet18, 7.7-18.8% on 2,000-image models, 15-17% on blended ones). On the two builds
    # of the fully trained all-to-all resnet18 the window took it to 0.59% at -0.67 points and
    # 0.36% at -1.18 (the reference's search: 1.26% and 22.16%); on 2,000-image models the window
    # left 1.3-4.6% (mean 2.9%) where the reference left 1.5-10.3% (4.6%), and the blend 0.5-3.7% on
    # blended all-to-all models where the reference left 7.9-24.9%. On the fully trained all-to-all
    # ConvNeXt the window took it 87.68% -> 1.16% at -0.63 points, where the reference's search left
    # 58% and cnpd-r 33%, so LayerNorm models take this rule too; on four 2,000-image all-to-all
    # test_vits it left 1.4-2.9% where the reference's search left 41-56%.
    # PURIFICATION.md.
    "awm": {},
}


def _takes(method: str) -> set[str]:
    """The option names ``method``'s config takes."""
    from .defenses import DEFENSES

    return {f.name for f in dataclasses.fields(DEFENSES[method].config_cls)}


def unused_options(method: str, given: Mapping[str, Any]) -> list[str]:
    """The caller's options that ``method`` does not take. ``auto`` may pick a polarizer or AWM,
    whose options differ; an option is applied to each candidate that takes it (and an option
    no candidate takes is refused before any work), so these are named to the user, not lost
    silently."""
    return sorted(set(given) - _takes(method))


def untaken_error(given: Mapping[str, Any]) -> str | None:
    """Why ``auto`` refuses the caller's options (``None``: it does not): an option that no method
    it may pick takes is refused before any work, as a named method refuses one it does not know."""
    untaken = sorted(set(given).difference(*(_takes(m) for m in AUTO_OPTIONS)))
    if not untaken:
        return None
    return (
        f"unknown option(s) {untaken}: no method auto may pick ({', '.join(AUTO_OPTIONS)}) takes "
        "them; name a method to pass its own options"
    )


def auto_options(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``auto`` runs ``method`` (one of :data:`AUTO_OPTIONS`) with: its
    :data:`AUTO_OPTIONS` under those of the caller's ``given`` ones that ``method`` takes (the
    caller's win)."""
    takes = _takes(method)
    return {**AUTO_OPTIONS[method], **{k: v for k, v in given.items() if k in takes}}


def choose_method(
    method: str, report: ScanReport, given: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """The method to run and every option it runs with: the caller's ``given`` options that it
    takes, under which ``auto`` puts its own (:func:`auto_options`), and the scan's ``target``
    over them (the API and the CLI refuse a ``target`` given with ``auto`` before calling this).
    ``auto`` lets the scan's finding steer the choice: with a suspected all-to-one target, NPD's
    known-target variant (npd-tp) attacks towards that class (plain NPD's per-image guess, the
    runner-up class, misses a patch trigger whose target is not the images' natural neighbour:
    ``benchmarks/PURIFICATION.md``). An all-to-all pattern, on any model, gets AWM with its
    trigger search shaped as the scan's readings found the trigger
    (:func:`trigger_shape`: a blend where a blend reading fired, else a pasted window), which finds the trigger no single
    target describes. Any other backdoored LayerNorm model (the scan's ``norm_family``
    "other": ConvNeXt, ViT) gets the per-class replica polarizer (cnpd-r, with the larger attack
    budget) instead of npd-tp, which needs no target: on the fully trained ConvNeXt it removed
    the BadNets and Blended backdoors npd-tp left (:data:`AUTO_OPTIONS`). Otherwise (a clean
    verdict) plain npd estimates a target per image. Any other method runs with the caller's
    options alone."""
    given = dict(given or {})
    if method != AUTO:
        return method, given
    backdoored = report.verdict == "backdoored"
    if backdoored and report.pattern == "all-to-all":
        return "awm", {"trigger": trigger_shape(report), **auto_options("awm", given)}
    if backdoored and (report.config or {}).get("norm_family") == "other":
        return "cnpd-r", auto_options("cnpd-r", given)
    if backdoored and report.suspected_target is not None:
        return "npd-tp", {**auto_options("npd-tp", given), "target": int(report.suspected_target)}
    return "npd", auto_options("npd", given)


def trigger_shape(report: ScanReport) -> str:
    """The shape AWM's trigger search takes for an all-to-all verdict: ``"blend"`` where a blend
    reading of the scan fired (a whole-image trigger), else ``"window"`` (the window reading, or
    BAN's all-to-all statistic, which has so far fired on patch triggers).

    The blend wins where both fired: a window of a blended trigger can carry it (the fully
    trained blended all-to-all resnet18 read window 0.874 and blend 0.880), a pasted patch has not
    fired the blend on any model measured; there AWM with the blend left 0.91% where the window
    left 2.58% (benchmarks/PURIFICATION.md)."""
    from .detection.report import spread_readings

    fired = {r.get("shape") for r in spread_readings(report.spread) if r.get("fired")}
    return "blend" if "blend" in fired else "window"


def why(added: Mapping[str, Any]) -> str:
    """What the scan steered, for the line naming the method ``auto`` picked (``""`` where
    nothing): the target NPD-TP attacks towards, or the shape of AWM's trigger search. ``added``:
    the options :func:`choose_method` added to the caller's."""
    if "target" in added:
        return f" (towards the scan's suspected target {added['target']})"
    if "trigger" in added:
        fired = "a blend reading fired" if added["trigger"] == "blend" else "no blend reading fired"
        return f" (trigger={added['trigger']}: {fired})"
    return ""
