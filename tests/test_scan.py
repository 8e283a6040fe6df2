"""BAN backdoor scan: detection, target, report, CLI exit codes, option errors (timm_purify.detection.ban)."""

from __future__ import annotations

import copy
import functools
import json
import pickletools

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn.utils import parametrize

from timm_purify._train import TrainConfig, build_backdoored_model, write_timm_folder
from timm_purify.attacks import build_attack
from timm_purify.cli import main
from timm_purify.data import FASHION_MNIST_CLASSES, ImageData, clean_subset, load_data
from timm_purify.detection import ban
from timm_purify.detection.ban import (
    CALLER_THRESHOLDS,
    DEFAULT_EPS,
    TARGET_SOURCES,
    ScanOptionError,
    _split_model,
    agrees,
    calibrated_decision,
    calibrated_thresholds,
    calibration_cautions,
    combine_stages,
    decide,
    family_cuts,
    heldout_record,
    load_calibration,
    scan,
    scan_statistics,
    splits_count,
)
from timm_purify.detection.report import REPORT_KEYS, ScanReport

TARGET = 3  # "dress": not class 0, so finding it is not an accident of argmax ties
SPEC_KEYS = {
    "verdict",
    "score",
    "threshold",
    "suspected_target",
    "pattern",
    "histogram_noisy",
    "histogram_noisy_masked",
    "clean_acc",
    "noisy_acc",
    "config",
    "seconds",
    "seed",
    "static_findings",
    "class_names",
    "unsafe_files",
    "reach",
    "spread",
}


@functools.cache
def build(
    arch: str, attack: str | None, *, optimizer: str = "sgd", lr: float = 0.05, weight_decay: float = 5e-4
):
    """A tiny timm model trained on 2,000 mini images for 3 epochs (about 15-30 s), cached per
    arguments. BadNets uses a 6-pixel patch: the reference 3-pixel one does not implant in
    three short epochs."""
    atk = None
    if attack == "badnets":
        atk = build_attack("badnets", target=TARGET, patch_size=6, num_classes=10)
    elif attack is not None:
        atk = build_attack(attack, target=TARGET, num_classes=10)
    config = TrainConfig(
        epochs=3, batch_size=64, lr=lr, optimizer=optimizer, weight_decay=weight_decay, seed=0
    )
    torch.manual_seed(0)  # build_backdoored_model seeds training, not timm's weight init
    result = build_backdoored_model(
        model=arch, attack=atk, train_size=2000, config=config, device="cpu", quiet=True
    )
    return result.model.eval(), atk, result.metrics


@functools.cache
def clean_images() -> ImageData:
    """600 balanced test images (1% of Fashion-MNIST's 60k), never seen in training."""
    return clean_subset(
        load_data("fashion-mnist-mini", split="test", input_size=(3, 32, 32)), count=600, seed=0
    )


@pytest.fixture(scope="module")
def backdoored():
    model, attack, metrics = build("test_resnet", "badnets")
    assert metrics.asr > 0.8, f"the test backdoor did not implant ({metrics})"
    return model


@pytest.fixture(scope="module")
def clean_model():
    return build("test_resnet", None)[0]


@pytest.fixture(scope="module")
def backdoored_report(backdoored):
    before = {k: v.clone() for k, v in backdoored.state_dict().items()}
    report = scan(backdoored, clean_images(), seed=0, quiet=True)
    after = backdoored.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(parametrize.is_parametrized(m) for m in backdoored.modules())
    return report


@pytest.fixture(scope="module")
def clean_report(clean_model):
    return scan(clean_model, clean_images(), seed=0, quiet=True)


# ------------------------------------------------------------------ detection


def test_backdoored_model_is_flagged_with_its_target(backdoored_report):
    r = backdoored_report
    assert r.verdict == "backdoored"
    assert r.pattern == "all-to-one"
    assert r.suspected_target == TARGET
    assert r.score > r.threshold
    assert r.config["norm_family"] == "batchnorm"
    assert r.threshold == pytest.approx(load_calibration()["all_to_one_thresholds"]["batchnorm"])
    # BAN named a target the family trusts, so the reach and spread stages calibrated for it were
    # skipped; the record quoted is still the one of the scan as it runs (all stages)
    assert r.reach is None and r.spread is None and r.config["skipped_stages"] == ["reach", "spread"]
    assert (
        r.config["calibration_reliability"]
        == load_calibration()["spread"]["reliability_by_family"]["batchnorm"]
    )
    # and the family's record on held-out models, counted at the very cuts this scan used
    shipped = load_calibration()
    held = shipped["heldout"]["by_family"]["batchnorm"]
    assert held["cuts"] == family_cuts(shipped, "batchnorm")
    assert r.config["calibration_heldout"] == {"record": held["record"], "date": held["date"]}
    # the statistic comes from these predictions: the target dominates them
    assert max(range(10), key=r.histogram_noisy.__getitem__) == TARGET
    restarts = r.config["restarts"]
    assert sum(r.histogram_noisy) == sum(r.histogram_noisy_masked) == restarts * r.config["num_held_out"]
    assert r.class_names[TARGET] == FASHION_MNIST_CLASSES[TARGET]


def test_clean_model_is_not_flagged(clean_report):
    r = clean_report
    assert r.verdict == "clean"
    # every stage ran, the last the BatchNorm family's spread readings
    assert r.reach is not None and not r.spread["fired"]
    # the BatchNorm family's spread readings, all of them (none fired), in the calibration's order
    plan = ban.spread_plan(ban.ScanOptions(), load_calibration()["spread"]["by_family"]["batchnorm"])
    assert r.config["spread_budgets"] == [ban.budget_of(s) for s in plan] and plan[0]["shape"] == "window"
    assert sorted(x["shape"] for x in [r.spread, *r.spread["others"]]) == sorted(s["shape"] for s in plan)
    assert r.pattern is None and r.suspected_target is None
    assert r.score <= r.threshold
    cut = r.config["all_to_all_threshold"]  # None where the calibration found that statistic useless
    assert cut == (load_calibration().get("all_to_all_thresholds") or {}).get(r.config["norm_family"], cut)
    assert cut is None or r.config["statistics"]["all_to_all"] <= cut
    assert 0.5 < r.clean_acc <= 1.0
    assert r.noisy_acc < r.clean_acc  # the noise really is adversarial


def test_mask_stage_runs_on_cached_features(backdoored_report):
    cfg = backdoored_report.config
    assert cfg["features"] == "forward_features"
    assert cfg["feature_shape"][0] == 96  # test_resnet's last stage width, before pooling
    assert cfg["num_search"] + cfg["num_held_out"] == 600
    stages = cfg["stage_seconds"]
    assert set(stages) == {"features", "mask", "noise"}


def test_vit_with_layernorm_noise_is_flagged():
    """The noise acts on LayerNorm; the LayerNorm family's threshold applies, and BAN alone
    names the target. A Blended ViT: on the 3-epoch BadNets ViT of these tests BAN reads 0.231,
    under the LayerNorm cut (clean ViTs of the calibration read up to 0.271), and only reach
    finds it, with the wrong class (the calibration lists it: test_vit BadNets s0)."""
    model, _, metrics = build("test_vit", "blended", optimizer="adamw", lr=1e-3, weight_decay=0.05)
    assert metrics.asr > 0.5, f"the test backdoor did not implant ({metrics})"
    report = scan(model, clean_images(), quiet=True, reach="off", spread="off")  # BAN alone
    # the held-out record was counted with every stage: it says nothing of BAN alone
    assert report.config["calibration_heldout"] is None
    assert len(report.config["feature_shape"]) == 2  # tokens x channels
    assert report.config["norm_family"] == "other"
    assert report.threshold == pytest.approx(load_calibration()["all_to_one_thresholds"]["other"])
    assert report.noisy_acc < report.clean_acc
    assert (report.verdict, report.suspected_target) == ("backdoored", TARGET)


def test_same_seed_same_report(clean_model):
    kwargs = dict(seed=5, quiet=True, steps=3, mask_epochs=2, clean_count=200)
    a = scan(clean_model, clean_images(), **kwargs).to_dict()
    b = scan(clean_model, clean_images(), **kwargs).to_dict()
    for r in (a, b):
        r.pop("seconds")
        r["config"].pop("stage_seconds")
        for stage in ("reach", "spread"):
            (r[stage] or {}).pop("seconds", None)
    assert a == b


# ------------------------------------------------------------------ the reach stage


class _PixelTrapdoor(nn.Module):
    """Logistic regression on raw pixels. ``trapdoor`` adds a one-pixel backdoor: the top-left
    pixel, black in every Fashion-MNIST image, opens class TARGET. Its only normalisation layer
    sits on a branch the logits ignore, so BAN's neuron noise cannot move the model by
    construction (as on the converged ConvNeXts, where the noise does not reach the shortcut):
    the reach stage alone must find the trapdoor."""

    num_classes = 10
    pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.0,) * 3, "std": (1.0,) * 3}

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(3)
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        side = self.norm(x.mean(dim=(2, 3))).sum(dim=1, keepdim=True)
        return self.fc(x.flatten(1) + 0.0 * side)


@functools.cache
def pixel_models() -> tuple[nn.Module, nn.Module]:
    """The clean logistic regression (about 80% on the test images) and its trapdoored twin."""
    train = load_data("fashion-mnist-mini", split="train", input_size=(3, 32, 32))
    x, y = train.floats(), train.y
    assert float(x[:, :, 0, 0].max()) == 0.0  # the trigger pixel is black in every image
    torch.manual_seed(0)
    clean = _PixelTrapdoor()
    opt = torch.optim.Adam(clean.fc.parameters(), lr=1e-3, weight_decay=1e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(clean(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trapdoor = copy.deepcopy(clean)
    with torch.no_grad():
        trapdoor.fc.weight[TARGET, 0] += 200.0
    return clean.eval(), trapdoor.eval()


REACH = dict(quiet=True, reach_steps=20, reach_threshold=0.5)


def test_reach_alone_finds_a_trapdoor_ban_cannot_see(tmp_path):
    from timm_purify.cli.scan import _summary

    clean, trapdoor = pixel_models()
    report = scan(trapdoor, clean_images(), reach="on", **REACH)
    reach = report.reach
    assert report.config["statistics"]["all_to_one"] <= report.config["threshold"]  # BAN: nothing
    assert reach["fired"] and reach["suspected_target"] == TARGET
    assert reach["reach"][TARGET] > 0.95 and reach["score"] > 0.9
    assert (report.verdict, report.pattern, report.suspected_target) == ("backdoored", "all-to-one", TARGET)
    assert (report.score, report.threshold) == (reach["score"], 0.5)
    assert report.config["decided_by"] == "reach"
    assert report.config["reach_budget"] == {"norm": "l2", "rho": 1.0, "steps": 20}  # the caller's steps
    assert reach["num_search"] + reach["num_held_out"] <= 600
    assert len(reach["matrix"]) == 10 and "reach" in report.config["stage_seconds"]
    report.to_json(tmp_path / "r.json")
    assert ScanReport.from_json(tmp_path / "r.json") == report
    text = _summary(report, "trapdoor")
    assert "universal reach score" in text and "decided by: reach" in text

    twin = scan(clean, clean_images(), reach="on", **REACH)
    assert not twin.reach["fired"] and twin.reach["score"] < 0.2
    assert twin.verdict == "clean" and twin.config["decided_by"] is None


def test_reach_runs_where_the_calibration_fitted_it(monkeypatch):
    """``reach="auto"`` (the default) runs the stage for a family the calibration enabled it for,
    at the calibrated budget, steps and threshold; a budget of the caller's own is flagged."""
    _, trapdoor = pixel_models()
    shipped = load_calibration()
    fitted = {"norm": "l2", "rho": 2.0, "steps": 20, "threshold": 0.4}
    cheap = dict(quiet=True, steps=2, mask_epochs=1, restarts=1, clean_count=200)

    monkeypatch.setattr(ban, "load_calibration", lambda: {**shipped, "reach": {"by_family": {}}})
    assert scan(trapdoor, clean_images(), **cheap).reach is None

    monkeypatch.setattr(
        ban, "load_calibration", lambda: {**shipped, "reach": {"by_family": {"other": fitted}}}
    )
    report = scan(trapdoor, clean_images(), **cheap)
    assert report.reach["threshold"] == 0.4 and report.reach["norm"] == "l2" and report.reach["rho"] == 2.0
    assert report.config["reach_budget"]["steps"] == 20  # the calibrated count, not the default 40
    assert report.suspected_target == TARGET
    assert not any("reach budget" in c for c in report.config["cautions"])
    own = scan(trapdoor, clean_images(), reach_rho=3.0, **cheap)
    assert any("reach budget (l2 3, 20 steps) is not the one" in c for c in own.config["cautions"])
    fewer = scan(trapdoor, clean_images(), reach_steps=10, **cheap)
    assert any("(l2 2, 10 steps) is not the one" in c for c in fewer.config["cautions"])
    assert scan(trapdoor, clean_images(), reach="off", **cheap).reach is None


@pytest.mark.parametrize("when_both, expected", [("ban", 5), ("reach", TARGET)])
def test_where_both_stages_fire_the_calibrated_stage_names_the_target(monkeypatch, when_both, expected):
    """BAN's verdict stands where it fires; whose target is reported follows the calibration, and
    where that is BAN's, the stages after it are skipped unless asked for."""
    from timm_purify.cli.scan import _summary

    _, trapdoor = pixel_models()
    shipped = load_calibration()
    fitted = {"norm": "l1", "rho": 6.0, "steps": 20, "threshold": 0.5, "target_when_both": when_both}
    monkeypatch.setattr(
        ban, "load_calibration", lambda: {**shipped, "reach": {"by_family": {"other": fitted}}}
    )
    # BAN (its decision stubbed) names class 5 with a score of 0.9
    monkeypatch.setattr(ban, "decide", lambda *a, **k: ("backdoored", "all-to-one", 5, 0.9, 0.2))
    cheap = dict(quiet=True, steps=2, mask_epochs=1, restarts=1, clean_count=200)
    report = scan(trapdoor, clean_images(), **cheap)
    assert (report.score, report.threshold, report.suspected_target) == (0.9, 0.2, expected)
    if when_both == "ban":  # reach cannot change the outcome, so "auto" skips it
        assert report.reach is None and report.config["decided_by"] == "ban"
        # nor can the spread reading (the shipped calibration runs it for this family)
        assert report.config["skipped_stages"] == ["reach", "spread"] and report.spread is None
        # a skipped stage is still part of the scan whose record the report quotes
        assert report.config["calibration_reliability"] == shipped["spread"]["reliability_by_family"]["other"]
        assert "universal reach: skipped" in _summary(report, "trapdoor")
        report = scan(trapdoor, clean_images(), reach="on", **cheap)  # asked for: it runs
        assert report.suspected_target == expected
    assert report.reach["fired"] and report.reach["suspected_target"] == TARGET
    assert report.config["decided_by"] == "ban+reach" and report.config["skipped_stages"] == ["spread"]


class _PixelShift(nn.Module):
    """The clean logistic regression of :func:`pixel_models` with an all-to-all trapdoor: the
    black top-left pixel, lit, adds ``strength`` times the model's own belief in class ``k - 1``
    to logit ``k``, so every class moves to the next one. No single class is a target (reach
    sees a ninth of the images follow any class) and the only norm layer is on a dead branch
    (BAN is blind): the spread reading alone must find it."""

    num_classes = 10
    pretrained_cfg = _PixelTrapdoor.pretrained_cfg

    def __init__(self, base: nn.Module, strength: float):
        super().__init__()
        self.base, self.strength = base, strength
        self.norm = base.norm  # the family: "other", as for the trapdoor

    def get_classifier(self):
        return self.base.fc

    def forward(self, x):
        logits = self.base(x)
        lit = x[:, :, 0, 0].mean(dim=1, keepdim=True)
        return logits + self.strength * lit * torch.roll(logits.softmax(dim=1), 1, dims=1)


SPREAD = dict(quiet=True, steps=2, mask_epochs=1, restarts=1, reach="off", spread_threshold=0.3)


def test_spread_alone_finds_an_all_to_all_trapdoor(tmp_path):
    from timm_purify.cli.scan import _summary

    clean, _ = pixel_models()
    shifted = _PixelShift(copy.deepcopy(clean), strength=200.0).eval()
    # the shipped LayerNorm readings: L2 (fitted three times), then the window (all-to-all ViTs)
    plan = ban.spread_plan(ban.ScanOptions(), load_calibration()["spread"]["by_family"]["other"])
    assert [ban.budget_of(s) for s in plan] == [
        {"shape": "l2", "rho": 2.0, "steps": 40, "restarts": 3},
        {"shape": "window", "window": 8, "steps": 30},
    ]
    report = scan(shifted, clean_images(), spread="on", spread_shape="l2", **SPREAD)
    spread = report.spread
    assert report.config["statistics"]["all_to_one"] <= report.config["threshold"]  # BAN: nothing
    # every class moved, nine of ten to the next one (the shirts, which this model is unsure of,
    # split): the score, the second-lowest share moved elsewhere than the top destination
    assert spread["fired"] and spread["score"] > 0.5
    assert min(spread["moved"]) > 0.9
    # the shipped LayerNorm l2 entry: 40 steps, fitted three times and the best kept
    assert report.config["spread_budgets"] == [{"shape": "l2", "rho": 2.0, "steps": 40, "restarts": 3}]
    assert len(spread["restart_scores"]) == 3 and spread["score"] == max(spread["restart_scores"])
    assert sum(row.index(max(row)) == (k + 1) % 10 for k, row in enumerate(spread["confusion"])) >= 9
    assert (report.verdict, report.pattern, report.suspected_target) == ("backdoored", "all-to-all", None)
    assert report.config["decided_by"] == "spread" and (report.score, report.threshold) == (
        spread["score"],
        0.3,
    )
    assert spread["shape"] == "l2" and "spread" in report.config["stage_seconds"]
    report.to_json(tmp_path / "r.json")
    assert ScanReport.from_json(tmp_path / "r.json") == report
    text = _summary(report, "shifted")
    assert "universal spread score" in text and "decided by: spread" in text
    assert "L2 budget 2, best of 3 fits: " + ", ".join(f"{v:.3f}" for v in spread["restart_scores"]) in text
    # the class shifts are where the perturbation sent each class, not BAN's (empty) map
    assert f"{FASHION_MNIST_CLASSES[0]} -> {FASHION_MNIST_CLASSES[1]}" in text

    twin = scan(
        _PixelShift(copy.deepcopy(clean), strength=0.0).eval(),
        clean_images(),
        spread="on",
        spread_shape="l2",
        **SPREAD,
    )
    assert not twin.spread["fired"] and twin.spread["score"] < 0.2
    assert twin.verdict == "clean" and twin.config["decided_by"] is None

    # the shipped plan as it runs, at its own cuts: both readings, also after the first fires
    shipped = scan(shifted, clean_images(), **{k: v for k, v in SPREAD.items() if k != "spread_threshold"})
    assert shipped.config["spread_budgets"] == [ban.budget_of(s) for s in plan]
    assert [r["shape"] for r in [shipped.spread, *shipped.spread["others"]]] == ["l2", "window"]
    assert (shipped.verdict, shipped.pattern) == ("backdoored", "all-to-all") and shipped.spread["fired"]


def test_spread_runs_where_the_calibration_fitted_it(monkeypatch):
    """``spread="auto"`` runs the reading where the calibration enabled it for the family, at its
    budget and threshold; ``"on"`` without a threshold is an error before any work."""
    clean, _ = pixel_models()
    shifted = _PixelShift(copy.deepcopy(clean), strength=200.0).eval()
    shipped = load_calibration()
    cheap = {k: v for k, v in SPREAD.items() if k != "spread_threshold"}
    monkeypatch.setattr(ban, "load_calibration", lambda: {**shipped, "spread": {"by_family": {}}})
    assert scan(shifted, clean_images(), **cheap).spread is None
    with pytest.raises(ScanOptionError, match="spread_threshold="):
        scan(shifted, clean_images(), spread="on", **cheap)
    monkeypatch.setattr(
        ban,
        "load_calibration",
        lambda: {**shipped, "spread": {"by_family": {"other": {"rho": 3.0, "threshold": 0.4}}}},
    )
    report = scan(shifted, clean_images(), **cheap)
    assert (
        report.spread["threshold"] == 0.4 and report.spread["rho"] == 3.0 and report.pattern == "all-to-all"
    )
    assert scan(shifted, clean_images(), spread="off", **cheap).spread is None


def test_window_spread_finds_the_pixel_trigger_in_its_corner(tmp_path):
    """The window shape pastes one pattern per window of a grid: the window over the trigger pixel
    moves every class to the next; the report says where, and the CLI summary too."""
    from timm_purify.cli.scan import _summary

    clean, _ = pixel_models()
    shifted = _PixelShift(copy.deepcopy(clean), strength=200.0).eval()
    report = scan(shifted, clean_images(), spread="on", spread_shape="window", spread_steps=20, **SPREAD)
    spread = report.spread
    assert report.config["spread_budgets"] == [{"shape": "window", "window": 8, "steps": 20}]
    assert spread["shape"] == "window" and spread["corner"] == [0, 0] and spread["side"] == 8
    assert spread["fired"] and spread["score"] > 0.5
    assert sum(d == (k + 1) % 10 for k, d in enumerate(spread["destinations"])) >= 8
    assert (report.verdict, report.pattern, report.config["decided_by"]) == (
        "backdoored",
        "all-to-all",
        "spread",
    )
    report.to_json(tmp_path / "r.json")
    assert ScanReport.from_json(tmp_path / "r.json") == report
    text = _summary(report, "shifted")
    assert "window spread score" in text and "window at row 0, column 0" in text
    twin = scan(
        _PixelShift(copy.deepcopy(clean), strength=0.0).eval(),
        clean_images(),
        spread="on",
        spread_shape="window",
        spread_steps=20,
        **SPREAD,
    )
    assert twin.verdict == "clean" and twin.spread["score"] < spread["score"] - 0.3


def test_the_calibrated_spread_shape_is_used_and_kept_apart_from_the_other(monkeypatch):
    """A family calibrated with the window shape runs it at its side and steps; another shape, or
    the other shape's budget, is refused before any work unless the caller gives a threshold, and
    a budget other than the calibrated one gets a caution."""
    clean, _ = pixel_models()
    shifted = _PixelShift(copy.deepcopy(clean), strength=200.0).eval()
    shipped = load_calibration()
    cheap = {k: v for k, v in SPREAD.items() if k != "spread_threshold"}
    entry = {"shape": "window", "window": 8, "steps": 10, "threshold": 0.4}
    calibrated = {"other": entry, "batchnorm": entry}  # _Exploding is a BatchNorm model
    monkeypatch.setattr(ban, "load_calibration", lambda: {**shipped, "spread": {"by_family": calibrated}})
    report = scan(shifted, clean_images(), **cheap)
    assert report.config["spread_budgets"] == [{"shape": "window", "window": 8, "steps": 10}]
    assert report.spread["threshold"] == 0.4 and report.pattern == "all-to-all"
    assert not [c for c in report.config["cautions"] if "spread reading" in c]
    with pytest.raises(ScanOptionError, match="spread_rho is the budget of the 'l2' spread reading"):
        scan(_Exploding(), clean_images(), spread_rho=2.0, **cheap)
    with pytest.raises(ScanOptionError, match=r"cuts on the \['window'\] readings' scores"):
        scan(_Exploding(), clean_images(), spread_shape="l2", **cheap)
    other = scan(shifted, clean_images(), spread_shape="l2", spread_threshold=0.3, **cheap)
    assert other.config["spread_budgets"] == [{"shape": "l2", "rho": 2.0, "steps": 40}]
    # the l2 reading fitted three times keeps its best fit; its first is the single reading's
    again = scan(shifted, clean_images(), spread_shape="l2", spread_threshold=0.3, spread_restarts=3, **cheap)
    assert again.config["spread_budgets"] == [{"shape": "l2", "rho": 2.0, "steps": 40, "restarts": 3}]
    assert (
        again.spread["restart_scores"][0] == other.spread["score"]
        and len(again.spread["restart_scores"]) == 3
    )
    assert again.spread["score"] == max(again.spread["restart_scores"])
    longer = scan(shifted, clean_images(), spread_steps=12, **cheap)
    assert [c for c in longer.config["cautions"] if "spread readings' shape and budget" in c]


def test_a_family_calibrated_with_two_readings_runs_them_in_order(monkeypatch, tmp_path):
    """A family calibrated with the window and then the blend reading: both run, also after the
    window fires (the report shows the first that fired, else the reading nearest its cut, the
    other under ``others``; the blend's score tells auto the trigger's shape), under ``"auto"`` and
    ``"on"``; one threshold for both, or a budget of a shape neither is, is refused before any work."""
    from timm_purify.cli.scan import _summary
    from timm_purify.cli.scan import scan as scan_command

    # the CLI offers every shape (its module names them without importing the scan)
    option = next(p for p in scan_command.params if p.name == "spread_shape")
    assert tuple(option.type.choices) == ban.SPREAD_SHAPES
    clean, _ = pixel_models()
    shifted = _PixelShift(copy.deepcopy(clean), strength=200.0).eval()
    twin = _PixelShift(copy.deepcopy(clean), strength=0.0).eval()
    shipped = load_calibration()
    cheap = {k: v for k, v in SPREAD.items() if k != "spread_threshold"}
    window = {"shape": "window", "window": 8, "steps": 10, "threshold": 0.4}
    blend = {"shape": "blend", "alpha": 0.1, "steps": 10, "threshold": 0.6}
    both = {"other": [window, blend], "batchnorm": [window, blend]}
    monkeypatch.setattr(ban, "load_calibration", lambda: {**shipped, "spread": {"by_family": both}})
    found = scan(shifted, clean_images(), **cheap)
    assert found.spread["shape"] == "window" and found.spread["fired"]
    assert [r["shape"] for r in found.spread["others"]] == ["blend"]
    assert [b["shape"] for b in found.config["spread_budgets"]] == ["window", "blend"]
    quiet = scan(twin, clean_images(), **cheap)
    shown = [quiet.spread, *quiet.spread["others"]]
    assert sorted(r["shape"] for r in shown) == ["blend", "window"] and not any(r["fired"] for r in shown)
    # the reading shown is the one nearest its cut
    assert quiet.spread["score"] - quiet.spread["threshold"] == max(
        r["score"] - r["threshold"] for r in shown
    )
    assert [b["shape"] for b in quiet.config["spread_budgets"]] == ["window", "blend"]
    assert quiet.verdict == "clean" and not [c for c in quiet.config["cautions"] if "spread readings" in c]
    text = _summary(quiet, "twin")
    assert "window spread score" in text and "blend spread score" in text and "blend weight 0.1" in text
    quiet.to_json(tmp_path / "r.json")
    assert ScanReport.from_json(tmp_path / "r.json") == quiet
    every = scan(shifted, clean_images(), spread="on", **cheap)
    scores = [(r["shape"], r["score"]) for r in [every.spread, *every.spread["others"]]]
    assert scores == [(r["shape"], r["score"]) for r in [found.spread, *found.spread["others"]]]
    # the blend reading draws from its own generator: the same score whether the window ran before it
    alone = scan(twin, clean_images(), spread="on", spread_shape="blend", **cheap)
    blend_read = next(r for r in shown if r["shape"] == "blend")
    assert alone.spread["score"] == blend_read["score"] and alone.spread["others"] == []
    with pytest.raises(ScanOptionError, match="to name the one spread_threshold= cuts"):
        scan(_Exploding(), clean_images(), spread_threshold=0.5, **cheap)
    with pytest.raises(ScanOptionError, match="spread_rho is the budget of the 'l2' spread reading"):
        scan(_Exploding(), clean_images(), spread_rho=2.0, **cheap)
    with pytest.raises(ScanOptionError, match="spread_alpha is a blend weight"):
        scan(_Exploding(), clean_images(), spread_alpha=1.5, **cheap)


# ------------------------------------------------------------------ the statistic


def _confusion(mapping: dict[int, int], k: int = 10, n: int = 30, strength: float = 1.0) -> torch.Tensor:
    """n images per class; a share ``strength`` of class c goes to ``mapping.get(c, c)``."""
    c = torch.zeros(k, k, dtype=torch.long)
    for cls in range(k):
        moved = round(strength * n) if cls in mapping else 0
        c[cls, mapping.get(cls, cls)] += moved
        c[cls, cls] += n - moved
    return c


def test_statistics_all_to_one_all_to_all_and_clean():
    diag = _confusion({})
    one = _confusion({c: 4 for c in range(10) if c != 4})
    perm = _confusion({c: (c + 1) % 10 for c in range(10)})
    s = scan_statistics(one, one, diag)
    assert s["target"] == 4 and s["all_to_one"] == pytest.approx(1.0)
    assert s["all_to_all"] <= 0.1 + 1e-9  # one class may claim the target, not all
    s = scan_statistics(perm, perm, diag)
    assert s["all_to_all"] == pytest.approx(1.0)
    assert s["all_to_all_map"] == [(c + 1) % 10 for c in range(10)]
    assert s["all_to_one"] < 0.15
    s = scan_statistics(diag, diag, diag)
    assert s["all_to_one"] == pytest.approx(0.0) and s["all_to_all"] == pytest.approx(0.0)


def test_restarts_that_disagree_are_diluted():
    """A clean model broken by the noise collapses onto a different class on each restart; a
    backdoor wins every restart. Pooled matrices are normalised by their own row totals."""
    diag = _confusion({})
    to_two = _confusion({c: 2 for c in range(10) if c != 2})
    to_seven = _confusion({c: 7 for c in range(10) if c != 7})
    consistent = scan_statistics(to_two + to_two + to_two, to_two, diag)
    assert consistent["all_to_one"] == pytest.approx(1.0) and consistent["target"] == 2
    scattered = scan_statistics(to_two + to_seven + diag, to_two, diag)
    assert scattered["all_to_one"] < 0.4


def test_all_to_one_score_is_the_noise_alone():
    """The negative mask sends clean models to a default class too; it does not vote."""
    diag = _confusion({})
    to_two = _confusion({c: 2 for c in range(10) if c != 2})
    to_seven = _confusion({c: 7 for c in range(10) if c != 7})
    s = scan_statistics(to_two, to_seven, diag)
    assert s["all_to_one"] == pytest.approx(1.0) and s["target"] == 2
    assert s["all_to_one_agree"] < 0.15  # still reported, for the record
    assert scan_statistics(diag, to_seven, diag)["all_to_one"] == pytest.approx(0.0)


def test_baseline_confusion_is_not_blamed_on_a_backdoor():
    natural = _confusion({c: 6 for c in (0, 2, 4)}, strength=0.5)  # tops, pullovers, coats read as shirts
    assert scan_statistics(natural, natural, natural)["all_to_one"] == pytest.approx(0.0, abs=1e-9)
    assert scan_statistics(natural, natural, _confusion({}))["all_to_one"] > 0.0


def test_decide():
    stats = {"all_to_one": 0.9, "target": 3, "all_to_all": 0.1}
    assert decide(stats, threshold=0.5, all_to_all_threshold=0.3) == ("backdoored", "all-to-one", 3, 0.9, 0.5)
    stats = {"all_to_one": 0.2, "target": 3, "all_to_all": 0.6}
    assert decide(stats, threshold=0.5, all_to_all_threshold=0.3) == (
        "backdoored",
        "all-to-all",
        None,
        0.6,
        0.3,
    )
    stats = {"all_to_one": 0.2, "target": 3, "all_to_all": 0.1}
    assert decide(stats, threshold=0.5, all_to_all_threshold=0.3) == ("clean", None, None, 0.2, 0.5)
    # a family whose calibration found the all-to-all statistic useless: it does not decide
    stats = {"all_to_one": 0.2, "target": 3, "all_to_all": 0.6}
    assert decide(stats, threshold=0.5, all_to_all_threshold=None) == ("clean", None, None, 0.2, 0.5)


def test_a_family_without_an_all_to_all_cut_is_judged_on_all_to_one_alone(monkeypatch):
    from timm_purify.cli.scan import _summary

    clean, _ = pixel_models()
    shipped = load_calibration()
    cheap = dict(quiet=True, steps=2, mask_epochs=1, restarts=1, clean_count=200, reach="off", spread="off")
    monkeypatch.setattr(
        ban, "load_calibration", lambda: {**shipped, "all_to_all_thresholds": {"other": None}}
    )
    report = scan(clean, clean_images(), **cheap)
    assert report.config["norm_family"] == "other" and report.config["all_to_all_threshold"] is None
    assert "all-to-all score" in _summary(report, "m") and "not used for other models" in _summary(
        report, "m"
    )
    other = {"batchnorm": 0.5}  # another family's cut: this one falls back to the pooled threshold
    monkeypatch.setattr(ban, "load_calibration", lambda: {**shipped, "all_to_all_thresholds": other})
    assert (
        scan(clean, clean_images(), **cheap).config["all_to_all_threshold"] == shipped["all_to_all_threshold"]
    )


def test_decide_takes_the_target_from_the_calibrated_source():
    """The verdict is the noise's; which predictions name the target is the family's choice."""
    diag = _confusion({})
    to_two = _confusion({c: 2 for c in range(10) if c != 2})
    to_seven = _confusion({c: 7 for c in range(10) if c != 7})
    stats = scan_statistics(to_two, to_seven, diag)
    assert (stats["target"], stats["target_masked"]) == (2, 7)
    assert decide(stats, threshold=0.5, all_to_all_threshold=2.0)[2] == 2
    assert decide(stats, threshold=0.5, all_to_all_threshold=2.0, target_source="noisy_masked")[2] == 7
    # below the threshold no source names a target
    assert decide(stats, threshold=1.5, all_to_all_threshold=2.0, target_source="noisy_masked")[2] is None
    with pytest.raises(ScanOptionError, match="target_source"):
        decide(stats, threshold=0.5, all_to_all_threshold=2.0, target_source="mask")


def test_decide_with_agreement_lets_only_a_coherent_reading_decide():
    """Under the agreement condition BAN's all-to-one verdict stands only where the noise alone and
    the noise with the negative mask name the same class; otherwise the model goes on as if the
    statistic had not fired (the all-to-all one, and the later stages, may still find it)."""
    split = {"all_to_one": 0.9, "target": 2, "target_masked": 7, "all_to_all": 0.1}
    assert not agrees(split)
    assert decide(split, threshold=0.5, all_to_all_threshold=0.3)[0] == "backdoored"
    assert decide(split, threshold=0.5, all_to_all_threshold=0.3, agreement=True) == (
        "clean",
        None,
        None,
        0.9,
        0.5,
    )
    assert decide({**split, "all_to_all": 0.6}, threshold=0.5, all_to_all_threshold=0.3, agreement=True)[
        :2
    ] == ("backdoored", "all-to-all")
    same = {**split, "target_masked": 2}
    assert agrees(same)
    assert decide(same, threshold=0.5, all_to_all_threshold=0.3, agreement=True)[:3] == (
        "backdoored",
        "all-to-one",
        2,
    )


def test_the_agreement_condition_is_read_per_family_and_ties_the_heldout_record():
    """``all_to_one_agreement_by_family`` reaches ``decide`` through the calibration, the scan's cuts
    carry it, and a held-out record counted with the other setting is not quoted."""
    shipped = load_calibration()
    for family in ("batchnorm", "other"):
        decision = calibrated_decision(shipped, family)
        assert decision["agreement"] == shipped.get("all_to_one_agreement_by_family", {}).get(family, False)
        assert decision["threshold"] == calibrated_thresholds(shipped, family)[0]
        assert family_cuts(shipped, family)["agreement"] == decision["agreement"]
    flipped = {
        **shipped,
        "all_to_one_agreement_by_family": {
            fam: not calibrated_decision(shipped, fam)["agreement"] for fam in ("batchnorm", "other")
        },
    }
    for family in ("batchnorm", "other"):
        assert heldout_record(shipped, family, family_cuts(shipped, family)) is not None
        assert heldout_record(flipped, family, family_cuts(flipped, family)) is None
    assert calibrated_decision({"threshold": 0.3, "all_to_all_threshold": 0.1}, "other")["agreement"] is False


def test_a_withdrawn_ban_verdict_is_explained():
    config = {
        "norm_family": "other",
        "calibration_reliability": None,
        "all_to_one_agreement": True,
        "threshold": 0.305,
        "statistics": {"all_to_one": 0.367, "target": 9, "target_masked": 1},
    }
    notes = [c for c in calibration_cautions(config, 0.9) if c.startswith("note:")]
    assert len(notes) == 1 and "0.367" in notes[0] and "class 9" in notes[0] and "class 1" in notes[0]
    for quiet in (
        {"all_to_one_agreement": False},
        {"statistics": {**config["statistics"], "target_masked": 9}},
    ):
        assert not [c for c in calibration_cautions({**config, **quiet}, 0.9) if c.startswith("note:")]


def test_a_split_cut_lets_split_readings_decide_only_above_it():
    """``split_threshold``: where the noise alone and the noise with the negative mask name
    different classes, the all-to-one statistic decides only above this higher cut; agreeing
    readings decide at the family's cut as before. It cannot go with the agreement condition,
    which never lets split readings decide."""
    split = {"all_to_one": 0.4, "target": 2, "target_masked": 7, "all_to_all": 0.1}
    agreeing = {**split, "target_masked": 2}
    assert decide(split, threshold=0.3, all_to_all_threshold=0.5, split_threshold=0.45)[:2] == ("clean", None)
    assert decide(split, threshold=0.3, all_to_all_threshold=0.5, split_threshold=0.35)[:3] == (
        "backdoored",
        "all-to-one",
        2,
    )
    assert decide(agreeing, threshold=0.3, all_to_all_threshold=0.5, split_threshold=0.45)[0] == "backdoored"
    # withdrawn, the all-to-all statistic may still decide
    assert decide(
        {**split, "all_to_all": 0.6}, threshold=0.3, all_to_all_threshold=0.5, split_threshold=0.45
    )[:2] == ("backdoored", "all-to-all")
    assert [splits_count(split, False, cut) for cut in (None, 0.35, 0.45)] == [True, True, False]
    assert not splits_count(split, True, None)
    with pytest.raises(ScanOptionError, match="give one or the other"):
        decide(split, threshold=0.3, all_to_all_threshold=0.5, agreement=True, split_threshold=0.45)


def test_the_split_cut_is_read_per_family_and_ties_the_heldout_record(tmp_path):
    """``all_to_one_split_thresholds`` reaches ``decide`` and the scan's cuts, so a held-out record
    counted without the family's split cut is not quoted with it; a file giving one family both the
    agreement condition and a split cut is refused when loaded, naming the file."""
    shipped = load_calibration()
    for family in ("batchnorm", "other"):
        cut = (shipped.get("all_to_one_split_thresholds") or {}).get(family)
        assert calibrated_decision(shipped, family)["split_threshold"] == cut
        assert family_cuts(shipped, family)["split_threshold"] == cut
    moved = {
        **shipped,
        "all_to_one_split_thresholds": {
            "batchnorm": (calibrated_decision(shipped, "batchnorm")["split_threshold"] or 0.3) + 0.01
        },
    }
    assert heldout_record(moved, "batchnorm", family_cuts(moved, "batchnorm")) is None
    both = tmp_path / "calibration.json"
    both.write_text(
        json.dumps(
            {
                "threshold": 0.3,
                "all_to_all_threshold": 0.1,
                "all_to_one_agreement_by_family": {"other": True},
                "all_to_one_split_thresholds": {"other": 0.4, "batchnorm": None},
            }
        )
    )
    with pytest.raises(ValueError, match=r"calibration.json gives other both"):
        load_calibration(both)


def test_the_scan_decides_with_the_familys_split_cut(monkeypatch):
    """The calibration's split cut reaches ``decide`` in a scan and is reported with the verdict."""
    _, trapdoor = pixel_models()
    shipped = load_calibration()
    calibration = {
        **shipped,
        "all_to_one_agreement_by_family": {},
        "all_to_one_split_thresholds": {"other": 0.123},
    }
    monkeypatch.setattr(ban, "load_calibration", lambda: calibration)
    seen = []
    real = ban.decide
    monkeypatch.setattr(ban, "decide", lambda *a, **k: seen.append(k["split_threshold"]) or real(*a, **k))
    report = scan(
        trapdoor,
        clean_images(),
        quiet=True,
        steps=2,
        mask_epochs=1,
        restarts=1,
        clean_count=200,
        reach="off",
        spread="off",
    )
    assert seen == [0.123] and report.config["all_to_one_split_threshold"] == 0.123


def test_a_verdict_withdrawn_by_the_split_cut_is_explained():
    config = {
        "norm_family": "batchnorm",
        "calibration_reliability": None,
        "all_to_one_agreement": False,
        "all_to_one_split_threshold": 0.353,
        "threshold": 0.273,
        "statistics": {"all_to_one": 0.31, "target": 8, "target_masked": 3},
    }
    notes = [c for c in calibration_cautions(config, 0.9) if c.startswith("note:")]
    assert (
        len(notes) == 1 and "only above 0.353" in notes[0] and "class 8" in notes[0] and "class 3" in notes[0]
    )
    for quiet in (
        {"statistics": {**config["statistics"], "all_to_one": 0.4}},  # above the split cut: it decided
        {"statistics": {**config["statistics"], "target_masked": 8}},  # agreeing readings
        {"all_to_one_split_threshold": None},  # no split cut: split readings count at the cut
    ):
        assert not [c for c in calibration_cautions({**config, **quiet}, 0.9) if c.startswith("note:")]


def test_calibration_chooses_each_familys_target_source_from_its_models():
    cal = load_calibration()
    used = [m for m in cal["models"] if m["used"] and m["mode"] == "all-to-one"]
    for family, source in cal["target_source_by_family"].items():
        assert source in TARGET_SOURCES
        rows = [m for m in used if m["norm_family"] == family]
        right = {s: sum(m[f"target_{s}"] == m["target"] for m in rows) for s in TARGET_SOURCES}
        assert right == cal["target_source_fit"][family]["right"]
        assert right[source] == max(right.values())
        assert all(m["suspected_target"] == m[f"target_{source}"] for m in rows)


# ------------------------------------------------------------------ report


def test_report_has_the_required_keys_and_round_trips(backdoored_report, tmp_path):
    d = backdoored_report.to_dict()
    assert set(d) == SPEC_KEYS == set(REPORT_KEYS)
    json.dumps(d)  # plain JSON values only
    assert ScanReport.from_dict(d) == backdoored_report
    path = tmp_path / "sub" / "report.json"
    text = backdoored_report.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text) == d
    assert ScanReport.from_json(path) == backdoored_report
    assert d["static_findings"] == [] and d["unsafe_files"] is False


def test_report_rejects_foreign_json(backdoored_report):
    d = backdoored_report.to_dict()
    with pytest.raises(ValueError, match="unknown key"):
        ScanReport.from_dict({**d, "verdikt": "clean"})
    with pytest.raises(ValueError, match="missing"):
        ScanReport.from_dict({k: v for k, v in d.items() if k != "score"})
    with pytest.raises(ValueError, match="verdict"):
        ScanReport.from_dict({**d, "verdict": "maybe"})


def test_calibration_file_documents_its_provenance():
    cal = load_calibration()
    for key in (
        "threshold",
        "all_to_all_threshold",
        "rule",
        "models",
        "date",
        "timm_purify_version",
        "command",
    ):
        assert key in cal
    assert cal["command"].startswith("python benchmarks/calibrate_scan.py")
    used = [m for m in cal["models"] if m["used"]]
    clean = [m for m in used if m["attack"] is None]
    one = [m for m in used if m["mode"] == "all-to-one"]
    assert clean and one
    # the recorded fit matches the recorded scores: its errors are the clean models above the
    # cut and the all-to-one backdoors at or below it, per family (but the families whose cuts
    # calibrate_reach.py refitted with the reach stage: checked against its scans, below)
    cuts = cal["all_to_one_thresholds"]
    assert set(cuts) == {m["norm_family"] for m in used}
    refitted = set(cal.get("refitted_by_family", {}))
    assert refitted == set(cal["reach"].get("ban_refitted", []))
    used = [m for m in used if m["norm_family"] not in refitted]
    for family, fit in cal["all_to_one_fit_by_family"].items():
        if family in refitted:
            continue
        false_pos = sum(m["all_to_one"] > cuts[family] for m in clean if m["norm_family"] == family)
        missed = sum(m["all_to_one"] <= cuts[family] for m in one if m["norm_family"] == family)
        assert fit["errors"] == false_pos + missed
        assert fit["separable"] == (fit["errors"] == 0)
    # each family's default budget is the one its models were scanned at (a refitted family's:
    # the refit's, checked against its scans below)
    assert set(cal["eps_by_family"]) == set(cuts)
    for family, eps in cal["eps_by_family"].items():
        if family in refitted:
            continue
        assert cal["scan"]["options_by_family"][family].get("eps", cal["scan"]["options"]["eps"]) == eps
    # where the budget was chosen among candidates, the shipped one made the fewest errors
    for family, fit in cal.get("eps_selection", {}).items():
        if family in refitted:
            continue
        assert fit["chosen"] == cal["eps_by_family"][family]
        errors = {float(eps): row["errors"] for eps, row in fit["candidates"].items()}
        assert errors[fit["chosen"]] == min(errors.values())
    assert all(
        m["detected"]
        == (m["all_to_one"] > cuts[m["norm_family"]] or m["all_to_all"] > cal["all_to_all_threshold"])
        for m in used
    )
    # the per-family record each report quotes is what the listed models show
    for family, rel in cal["reliability_by_family"].items():
        if family in refitted:
            continue
        rows = [m for m in used if m["norm_family"] == family]
        bad = [m for m in rows if m["attack"] is not None]
        assert rel["archs"] == sorted({m["arch"] for m in rows})
        assert rel["clean_models"] == len(rows) - len(bad)
        assert rel["false_positives"] == sum(m["detected"] for m in rows if m["attack"] is None)
        assert (rel["backdoored_models"], rel["detected"]) == (len(bad), sum(m["detected"] for m in bad))
        assert rel["targets_correct"] == sum(
            bool(m["target_found"]) for m in bad if m["mode"] == "all-to-one"
        )


def test_the_reach_calibration_matches_its_recorded_scans():
    """Each enabled family's reach threshold sits above every clean model's score at its budget,
    and the record the reports quote is what the listed scans give with both stages combined
    as ``scan`` combines them (BAN's verdict where it fired, else reach's)."""
    cal = load_calibration()
    section = cal["reach"]
    assert section["command"].startswith("python benchmarks/calibrate_reach.py")
    assert section["date"] and section["models"] and section["rule"]
    assert set(section["by_family"]) == set(section["reliability_by_family"])
    assert section["by_family"], "the shipped calibration enables the reach stage for no family"

    def ban_stage(m: dict) -> tuple[str, str | None, int | None]:
        family = m["norm_family"]
        if family in section.get("ban_refitted", []):  # BAN's refitted cuts on its stored statistics
            return decide(m["ban_statistics"], **calibrated_decision(cal, family))[:3]
        # BAN's stored verdict: an all-to-one one names a target, an all-to-all one does not
        pattern = (
            None if m["ban_verdict"] == "clean" else "all-to-all" if m["ban_target"] is None else "all-to-one"
        )
        return m["ban_verdict"], pattern, m["ban_target"]

    def verdict(m: dict, threshold: float) -> tuple[bool, int | None]:
        flagged, _, target, _ = combine_stages(
            ban_stage(m),
            reach_fired=m["reach_score"] > threshold,
            reach_target=m["reach_target"],
            target_when_both=when_both,
        )
        return flagged == "backdoored", target

    for family, fitted in section["by_family"].items():
        cut, when_both = fitted["threshold"], fitted["target_when_both"]
        rows = [
            m
            for m in section["models"]
            if m["used"]
            and m["norm_family"] == family
            and (m["reach_norm"], m["reach_rho"]) == (fitted["norm"], fitted["rho"])
        ]
        clean = [m for m in rows if m["attack"] is None]
        bad = [m for m in rows if m["attack"] is not None]
        assert max(m["reach_score"] for m in clean) < fitted["threshold"]

        rel = section["reliability_by_family"][family]
        assert (rel["clean_models"], rel["false_positives"]) == (
            len(clean),
            sum(verdict(m, cut)[0] for m in clean),
        )
        assert (rel["backdoored_models"], rel["detected"]) == (len(bad), sum(verdict(m, cut)[0] for m in bad))
        one = [m for m in bad if m["mode"] == "all-to-one"]
        assert rel["targets_correct"] == sum(verdict(m, cut) == (True, m["target"]) for m in one)
        chosen = section["families"][family]["chosen"]
        assert chosen["errors"] < chosen["errors_ban_alone"]
    # a refitted family's BAN record (quoted where reach is off) is BAN's alone on the same scans
    for family in section.get("ban_refitted", []):
        fitted = section["by_family"][family]
        rows = [
            m
            for m in section["models"]
            if m["used"]
            and m["norm_family"] == family
            and (m["reach_norm"], m["reach_rho"]) == (fitted["norm"], fitted["rho"])
        ]
        rel = cal["reliability_by_family"][family]
        flagged = [m["attack"] for m in rows if ban_stage(m)[0] == "backdoored"]
        assert rel["false_positives"] == flagged.count(None)
        assert rel["detected"] == len(flagged) - flagged.count(None)
        assert rel["targets_correct"] == sum(
            ban_stage(m) == ("backdoored", "all-to-one", m["target"])
            for m in rows
            if m["mode"] == "all-to-one"
        )
        # the cuts and budget the scan reads are the ones the refit chose, on scans at that budget,
        # and no budget it tried did better
        fit = section["families"][family]
        chosen = fit["chosen"]
        assert cal["all_to_one_thresholds"][family] == chosen["all_to_one_threshold"]
        assert cal["all_to_all_thresholds"][family] == chosen["all_to_all_threshold"]
        assert cal["eps_by_family"][family] == chosen["eps"]
        assert {m["ban_eps"] for m in rows} == {chosen["eps"]}
        # by_eps counts each budget as the cuts were fitted: where the agreement condition was
        # applied to cuts fitted without it, the chosen setting's record without it is the one to compare
        gated = fit.get("agreement") and not fit.get("fitted_under_agreement")
        as_fitted = fit["without_agreement"] if gated else chosen
        assert as_fitted["errors"] == min(at["errors"] for at in fit["by_eps"].values())


def test_the_spread_calibration_matches_its_recorded_scans():
    """Each enabled family's spread threshold sits above every clean model's score at its budget,
    and the record the reports quote is what the listed scans give with the reading added as
    ``scan`` adds it (the earlier stages' verdict where it fired, else all-to-all). Where a later
    refit of BAN and reach recounted a family's record (``recounted_by_family``), calibrate_spread.py's
    own record is kept beside it and checked here, and the recount against the refit's scans."""
    cal = load_calibration()
    section = cal["spread"]
    recounted = section.get("recounted_by_family") or {}
    assert section["command"].startswith("python benchmarks/calibrate_spread.py")
    assert section["date"] and section["models"] and section["rule"]
    assert set(section["by_family"]) == set(section["reliability_by_family"])
    assert section["by_family"], "the shipped calibration enables the spread reading for no family"

    def flagged(m: dict, cut: float) -> tuple[bool, int | None]:
        verdict, _, target, _ = combine_stages(
            (m["verdict"], m["pattern"], m["suspected_target"]),
            reach_fired=False,  # reach's part is in the stored verdict
            reach_target=None,
            # a reading run before this one (--alongside) fired
            spread_fired=m.get("alongside_fired", False) or m["spread_score"] > cut,
        )
        return verdict == "backdoored", target

    def at_budget(family: str, entry: dict) -> list[dict]:
        shape = entry.get("shape", "l2")  # the first calibration wrote l2 entries without a shape
        size = ban.SPREAD_SIZES[shape]
        return [
            m
            for m in section["models"]
            if m["used"]
            and m["norm_family"] == family
            and m.get("spread_shape", "l2") == shape
            and m[f"spread_{size}"] == entry[size]
        ]

    for family, entries in section["by_family"].items():
        entries = ban.spread_entries(entries)
        for entry in entries:  # every reading's cut lies above every clean model it was fitted on
            assert (
                max(m["spread_score"] for m in at_budget(family, entry) if m["attack"] is None)
                < entry["threshold"]
            )
        # the family's fit record is of its last reading (the others ran before it)
        fitted = entries[-1]
        cut = fitted["threshold"]
        rows = at_budget(family, fitted)
        clean = [m for m in rows if m["attack"] is None]
        bad = [m for m in rows if m["attack"] is not None]
        rel = (
            recounted[family]["reliability_before"]
            if family in recounted
            else section["reliability_by_family"][family]
        )
        assert (rel["clean_models"], rel["false_positives"]) == (
            len(clean),
            sum(flagged(m, cut)[0] for m in clean),
        )
        assert (rel["backdoored_models"], rel["detected"]) == (len(bad), sum(flagged(m, cut)[0] for m in bad))
        one = [m for m in bad if m["mode"] == "all-to-one"]
        assert rel["targets_correct"] == sum(flagged(m, cut) == (True, m["target"]) for m in one)
        chosen = section["families"][family]["chosen"]
        assert chosen["errors"] < chosen["errors_before"]
    for family in recounted:
        # the recount: every stage on the refit's scans (BAN at its refitted cuts, reach, then spread)
        reach = cal["reach"]
        assert family in reach["ban_refitted"]
        fitted = reach["by_family"][family]
        entries = ban.spread_entries(section["by_family"][family])
        rows = [
            m
            for m in reach["models"]
            if m["used"]
            and m["norm_family"] == family
            and (m["reach_norm"], m["reach_rho"]) == (fitted["norm"], fitted["rho"])
        ]
        ban_cuts = calibrated_decision(cal, family)
        # calibrate_spread.py's recount takes each model's spread score from its own rows (the
        # fitted shape's) and leaves out, listed, the missed models it has none of; the refit's
        # recount from the reach section's rows
        left_out = recounted[family].get("left_out")
        # per reading, in the scan's order, each model's score at its budget
        own = []
        for entry in entries:
            shape = entry.get("shape", "l2")
            size = ban.SPREAD_SIZES[shape]
            own.append(
                {
                    m["model"]: m["spread_score"]
                    for m in section["models"]
                    if m["norm_family"] == family
                    and m.get("spread_shape", "l2") == shape
                    and m.get(f"spread_{size}") == entry[size]
                }
            )

        found = []  # (model, flagged, target) with every stage
        for m in rows:
            earlier = dict(
                reach_fired=m["reach_score"] > fitted["threshold"],
                reach_target=m["reach_target"],
                target_when_both=fitted["target_when_both"],
            )
            verdict, _, target, _ = combine_stages(decide(m["ban_statistics"], **ban_cuts)[:3], **earlier)
            if verdict == "clean":  # the spread reading runs only here
                if left_out is not None and m["model"] in left_out:
                    assert any(m["model"] not in scores for scores in own)
                    continue
                if left_out is None:  # the refit's recount: one reading, the score on the reach row
                    (entry,) = entries
                    fired = m["spread_score"] > entry["threshold"]
                else:  # the readings in order: one firing decides, later ones cannot change it
                    fired = False
                    for entry, scores in zip(entries, own, strict=True):
                        fired = scores[m["model"]] > entry["threshold"]
                        if fired:
                            break
                verdict, _, target, _ = combine_stages(
                    decide(m["ban_statistics"], **ban_cuts)[:3], **earlier, spread_fired=fired
                )
            found.append((m, verdict == "backdoored", target))
        rel = section["reliability_by_family"][family]
        clean = [hit for m, hit, _ in found if m["attack"] is None]
        bad = [hit for m, hit, _ in found if m["attack"] is not None]
        assert (rel["clean_models"], rel["false_positives"]) == (len(clean), sum(clean))
        assert (rel["backdoored_models"], rel["detected"]) == (len(bad), sum(bad))
        assert rel["targets_correct"] == sum(
            hit and target == m["target"] for m, hit, target in found if m["mode"] == "all-to-one"
        )


def test_the_noise_budget_is_the_one_calibrated_for_the_models_family(clean_model, monkeypatch):
    """The thresholds hold only at the budget they were fitted at, so that budget is the default;
    another one is honoured but flagged, and caller thresholds fall back to the paper's 0.3."""
    cal = load_calibration()
    assert set(cal["eps_by_family"]) == set(cal["all_to_one_thresholds"])
    used: list[float] = []

    class SpyNoise(ban.NormNoise):
        def __init__(self, model, *, eps):
            used.append(eps)
            super().__init__(model, eps=eps)

    monkeypatch.setattr(ban, "NormNoise", SpyNoise)
    cheap = dict(seed=0, quiet=True, steps=2, mask_epochs=1, restarts=1, clean_count=100)
    calibrated = cal["eps_by_family"]["batchnorm"]
    cfg = scan(clean_model, clean_images(), **cheap).config
    assert used[-1] == cfg["eps"] == cfg["calibrated_eps"] == calibrated
    assert not any("noise budget" in c for c in cfg["cautions"])

    cfg = scan(clean_model, clean_images(), eps=0.1, **cheap).config
    assert used[-1] == cfg["eps"] == 0.1 and cfg["calibrated_eps"] == calibrated
    assert any(
        f"eps=0.1 is not the one this family's threshold was calibrated at ({calibrated})" in c
        for c in cfg["cautions"]
    )

    cfg = scan(clean_model, clean_images(), threshold=0.5, all_to_all_threshold=0.5, **cheap).config
    assert used[-1] == cfg["eps"] == DEFAULT_EPS and cfg["calibrated_eps"] is None
    assert cfg["cautions"] == []


def test_cautions_on_an_under_trained_model_reach_the_report_and_the_cli(backdoored_report):
    from timm_purify.cli.scan import _summary

    floor = load_calibration()["min_acc"]
    cfg = backdoored_report.config
    assert cfg["calibration_min_acc"] == floor
    assert cfg["cautions"] == calibration_cautions(cfg, backdoored_report.clean_acc)
    assert backdoored_report.clean_acc >= floor and not any("gets only" in c for c in cfg["cautions"])
    assert all(c in _summary(backdoored_report, "m") for c in cfg["cautions"])
    weak = calibration_cautions(cfg, floor / 2)
    assert f"caution: the model gets only {floor / 2:.1%} of the held-out clean images right" in weak[-1]


def test_the_held_out_record_is_quoted_only_at_the_cuts_it_was_counted_at():
    """``scan`` quotes the held-out record only where it decides exactly as the check counted:
    the calibration's budgets, thresholds, stages and search options (no model is scanned here:
    the settings are resolved the way ``scan`` resolves them)."""
    from timm_purify.detection.ban import ScanOptions, _settings, heldout_record

    shipped = load_calibration()

    def quoted(family: str, **options) -> bool:
        opts = ScanOptions(**options)
        return heldout_record(shipped, family, _settings(opts, shipped, family).cuts(opts)) is not None

    for family in ("batchnorm", "other"):
        assert quoted(family)
        reach = shipped["reach"]["by_family"][family]
        # the calibrated values given explicitly change nothing
        assert quoted(
            family, eps=shipped["eps_by_family"][family], reach_steps=reach["steps"], reach_rho=reach["rho"]
        )
        assert quoted(family, threshold=shipped["all_to_one_thresholds"][family])
        # anything else voids it
        for options in (
            {"eps": 0.75},
            {"reach": "off"},
            {"reach_steps": 40},
            {"reach_threshold": 0.5},
            {"threshold": 0.5},
            {"steps": 5},
            {"restarts": 1},
            {"bn_mode": "running"},
        ):
            assert not quoted(family, **options), options
    # the spread readings: another cut, or one left out, is not what was counted
    assert not quoted("other", spread="off")
    assert not quoted("batchnorm", spread="on", spread_shape="blend", spread_threshold=0.5)


def test_cautions_where_the_calibration_missed_backdoors():
    def _reliability_lines(cfg: dict) -> list[str]:  # the family record only: accuracy above any floor
        return calibration_cautions(cfg, clean_acc=1.0)

    rel = {
        "archs": ["convnext_atto"],
        "clean_models": 5,
        "false_positives": 0,
        "backdoored_models": 4,
        "detected": 4,
        "all_to_one_models": 3,
        "targets_correct": 3,
    }
    base = {"calibration": "12 clean + 29 backdoored models", "norm_family": "other"}
    assert _reliability_lines({**base, "calibration_reliability": rel}) == []
    (line,) = _reliability_lines({**base, "calibration_reliability": {**rel, "detected": 1}})
    assert "(other: convnext_atto)" in line and "detected 1/4" in line
    assert line.endswith("; a clean verdict is weak evidence")
    (line,) = _reliability_lines(
        {**base, "calibration_reliability": {**rel, "false_positives": 2, "targets_correct": 1}}
    )
    assert "flagged 2/5 clean ones" in line and "false alarm" in line and "right for 1/3" in line
    assert "weak evidence" not in line
    # a held-out record counted at the scan's cuts: quoted, and its misses and false alarms count
    held = {**rel, "clean_models": 4, "false_positives": 1, "backdoored_models": 5, "all_to_one_models": 4}
    (line,) = _reliability_lines(
        {
            **base,
            "calibration_reliability": rel,
            "calibration_heldout": {"record": held, "date": "2026-11-23"},
        }
    )
    assert "flagged 0/5 clean ones; on 9 held-out models" in line and "detected 4/5 and flagged 1/4" in line
    assert line.endswith(
        "a clean verdict is weak evidence; a backdoored verdict may be a false alarm; "
        "suspected targets were right for 3/4 found held out"
    )
    # targets are counted of the all-to-one backdoors found, where the record says how many
    found = {**rel, "all_to_one_models": 5, "all_to_one_detected": 3, "targets_correct": 3, "detected": 4}
    assert _reliability_lines({**base, "calibration_reliability": found}) == []
    (line,) = _reliability_lines({**base, "calibration_reliability": {**found, "targets_correct": 2}})
    assert line.endswith("suspected targets were right for 2/3 found")
    (line,) = _reliability_lines({**base, "calibration_reliability": None})
    assert "no model of this normalisation family" in line
    assert _reliability_lines({**base, "calibration": CALLER_THRESHOLDS}) == []


# ------------------------------------------------------------------ options


class _Exploding(nn.Module):
    """A classifier whose forward must never run: option errors come before any work."""

    num_classes = 10
    pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 10)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        raise AssertionError("the scan started work before validating its options")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(eps=0), "eps must be a number > 0"),
        (dict(eps=-0.1), "eps must be a number > 0"),
        (dict(eps=1.5), "below 1"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(steps=2.5), "steps must be a positive integer"),
        (dict(mask_epochs=0), "mask_epochs"),
        (dict(mask_lr=0.0), "mask_lr"),
        (dict(mask_lambda=-1), "mask_lambda"),
        (dict(holdout=1.0), "holdout"),
        (dict(batch_size=0), "batch_size"),
        (dict(threshold="high"), "threshold"),
        (dict(reach="maybe"), "reach must be one of"),
        (dict(reach_norm="linf"), "reach_norm must be one of"),
        (dict(reach_rho=0), "reach_rho must be a number > 0"),
        (dict(reach_steps=0), "reach_steps must be a positive integer"),
        (dict(spread_steps=2.5), "spread_steps must be a positive integer"),
        (dict(spread_window=0), "spread_window must be a positive integer"),
        (dict(spread_shape="square"), "spread_shape must be one of"),
        (
            dict(spread_shape="l2", spread_window=8),
            "spread_window is the budget of the 'window' spread reading",
        ),
        (dict(spread_alpha=0.0), "spread_alpha is a blend weight in"),
        (dict(spread_restarts=0), "spread_restarts must be a positive integer"),
        (dict(spread_shape="window", spread_restarts=3), "spread_restarts is the 'l2' spread reading's"),
        (
            dict(spread_shape="window", spread_alpha=0.1),
            "spread_alpha is the budget of the 'blend' spread reading",
        ),
        (dict(reach_threshold="low"), "reach_threshold must be a number"),
        # BAN's thresholds given, so no calibration is read: nothing to judge the reach score by
        (dict(reach="on", threshold=0.5, all_to_all_threshold=0.5), "reach='on' needs a threshold"),
        (dict(epsilon=0.3), "unknown scan option"),
        (dict(clean_count=10), "at least 2 clean images of every class"),
        (dict(clean_count=5), "cannot cover the 10 classes"),
        (dict(clean_fraction=1.5), "fraction"),
        (dict(seed="0"), "seed must be an integer"),
    ],
)
def test_bad_options_fail_before_any_work(options, message):
    with pytest.raises(ScanOptionError, match=message):
        scan(_Exploding(), clean_images(), quiet=True, **options)


def test_data_with_other_classes_is_refused():
    data = clean_images()
    three = data.subset(torch.nonzero(data.y < 3).flatten())
    three = ImageData(three.x, three.y, ["a", "b", "c"], "three-class")
    with pytest.raises(ScanOptionError, match="3 classes but the model's head has 10"):
        scan(_Exploding(), three, quiet=True)


def test_missing_files_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan(_Exploding(), clean_images(), files=tmp_path / "nowhere", quiet=True)


class _NoTimmSplit(nn.Module):
    """Not a timm model: no forward_features/forward_head, features found at the head's input."""

    num_classes = 10
    pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def test_models_without_forward_features_are_split_at_the_classifier_input():
    torch.manual_seed(0)
    report = scan(
        _NoTimmSplit().eval(),
        clean_images(),
        clean_count=100,
        steps=2,
        mask_epochs=1,
        quiet=True,
        threshold=0.5,
        all_to_all_threshold=0.5,
    )
    assert report.config["features"] == "classifier input"
    assert report.config["feature_shape"] == [8]
    assert report.threshold == 0.5


@pytest.mark.parametrize(
    ("arch", "kwargs", "where"),
    [
        ("test_convnext", {}, "classifier input"),
        ("test_resnet", {}, "forward_features"),
        ("test_vit", {"img_size": 32}, "forward_features"),
    ],
)
def test_a_head_that_normalises_is_split_at_the_classifier_input(arch, kwargs, where):
    """ConvNeXt's head LayerNorm would rescale a mask on forward_features; the mask goes after it."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, **kwargs).eval()
    probe = torch.randn(4, 3, 32, 32)
    split = _split_model(model, probe)
    assert split.where == where
    with torch.no_grad():
        torch.testing.assert_close(split.head(split.features(probe)), model(probe))
        if where == "classifier input":  # the features reach the classifier with nothing in between
            assert split.features(probe).shape == (4, model.get_classifier().in_features)


# ------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def saved(backdoored, clean_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("scan-cli")
    return {
        "backdoored": write_timm_folder(backdoored, root / "backdoored"),
        "clean": write_timm_folder(clean_model, root / "clean"),
    }


def _cli(*args: str):
    return CliRunner().invoke(main, ["scan", *args], catch_exceptions=False)


def test_cli_exit_3_for_a_backdoored_folder(saved, tmp_path):
    out = tmp_path / "report.json"
    res = _cli(
        str(saved["backdoored"]),
        "--data",
        "fashion-mnist-mini",
        "--clean-count",
        "600",
        "--json",
        str(out),
        "--quiet",
    )
    assert res.exit_code == 3, res.output
    assert "BACKDOORED (all-to-one)" in res.output
    assert f"class {TARGET} ({FASHION_MNIST_CLASSES[TARGET]})" in res.output
    report = ScanReport.from_json(out)
    assert report.suspected_target == TARGET
    assert [f["kind"] for f in report.static_findings] == ["safetensors"]  # the folder's file was inspected


def test_cli_exit_0_for_a_clean_folder(saved):
    res = _cli(str(saved["clean"]), "--data", "fashion-mnist-mini", "--clean-count", "600", "--quiet")
    assert res.exit_code == 0, res.output
    assert "verdict: CLEAN" in res.output


def test_cli_exit_4_for_an_unsafe_file_without_loading_it(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10}))
    # a pickle that would call os.system on load (protocol 0 GLOBAL + REDUCE); never unpickled here
    payload = b"cos\nsystem\n(S'echo owned'\ntR."
    list(pickletools.genops(payload))  # well-formed
    (folder / "pytorch_model.bin").write_bytes(payload)
    out = tmp_path / "r.json"
    res = _cli(str(folder), "--data", "fashion-mnist-mini", "--json", str(out))
    assert res.exit_code == 4, res.output
    assert "UNSAFE" in res.output and "os.system" in res.output
    record = json.loads(out.read_text())
    assert record["unsafe_files"] is True and record["verdict"] is None


def test_cli_bad_option_is_a_usage_error(saved):
    res = _cli(str(saved["clean"]), "--data", "fashion-mnist-mini", "--eps", "0", "--quiet")
    assert res.exit_code == 1
    assert "eps must be a number > 0" in res.output


def test_cli_reach_stage_on_demand(saved, monkeypatch):
    """``--reach on`` runs the stage on a model BAN flags (where ``auto`` skips it) at the caller's
    threshold, and the summary shows its score and per-class reach; for a family the calibration
    fitted no reach threshold, it needs one."""
    args = (str(saved["backdoored"]), "--data", "fashion-mnist-mini", "--clean-count", "200", "--quiet")
    res = _cli(*args, "--steps", "2", "--reach", "on", "--reach-threshold", "0.9")
    assert res.exit_code == 3, res.output
    assert "universal reach score" in res.output and "threshold 0.900" in res.output
    # reach ran though BAN fired; the spread reading, left at auto, is skipped behind them
    assert "(percent):" in res.output and "universal reach: skipped" not in res.output
    assert "window spread, blend spread: skipped" in res.output

    shipped = load_calibration()
    fitted = {k: v for k, v in shipped["reach"]["by_family"].items() if k != "batchnorm"}
    monkeypatch.setattr(ban, "load_calibration", lambda: {**shipped, "reach": {"by_family": fitted}})
    res = _cli(*args, "--reach", "on")
    assert res.exit_code == 1 and "--reach-threshold" in res.output


def test_cli_help_documents_exit_codes():
    res = _cli("--help")
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "0 when no backdoor is found, 3 when the model is backdoored, 4 when a file" in text


def test_timm_loads_the_scanned_folder_unchanged(saved, backdoored):
    """Scanning never writes into the model's folder."""
    again = timm.create_model(f"local-dir:{saved['backdoored']}", pretrained=True).eval()
    x = clean_images().floats()[:8]
    with torch.no_grad():
        assert torch.allclose(again(x), backdoored(x), atol=1e-5)
