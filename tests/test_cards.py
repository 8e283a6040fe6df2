"""Model cards and their figures: Hub metadata that parses, a body that says what was done."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest
from huggingface_hub import ModelCard

from timm_purify.detection.report import ScanReport
from timm_purify.hub_cards import (
    METRICS_PLOT,
    SCAN_PLOT,
    build_model_card,
    hub_model_id,
    merge_evaluations,
    plot_attack_metrics,
    plot_scan_histogram,
    write_plots,
)
from timm_purify.hub_cards.plots import histogram_values
from timm_purify.metrics import EvalResult, der

PNG = b"\x89PNG\r\n\x1a\n"
CLASSES = ["tee", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def _pair(attack: str, asr_before: float, asr_after: float) -> tuple[EvalResult, EvalResult]:
    common = dict(n_clean=1000, n_triggered=900, attack=attack, data="fashion-mnist-mini:test")
    return (
        EvalResult(acc=0.912, asr=asr_before, ra=0.05, **common),
        EvalResult(acc=0.887, asr=asr_after, ra=0.81, **common),
    )


def _scan(verdict: str = "backdoored") -> ScanReport:
    return ScanReport(
        verdict=verdict,
        score=0.8731,
        threshold=0.3069302950329654,  # as calibration.json stores it
        suspected_target=0 if verdict == "backdoored" else None,
        pattern="all-to-one" if verdict == "backdoored" else None,
        histogram_noisy=[410, 12, 9, 8, 11, 10, 15, 9, 8, 8],
        histogram_noisy_masked=[480, 2, 1, 3, 4, 2, 3, 1, 2, 2],
        clean_acc=0.9,
        noisy_acc=0.31,
        config={"data": "fashion-mnist-mini:train", "eps": 0.3},
        seconds=42.0,
        seed=0,
        static_findings=[
            {"severity": "info", "file": "model.safetensors", "kind": "safetensors", "message": "ok"}
        ],
        class_names=CLASSES,
    )


EVALS = {"badnets": _pair("badnets", 0.97, 0.021), "blended": _pair("blended", 0.99, 0.12)}


def _card(**kwargs) -> ModelCard:
    args = dict(
        scan_report=_scan(),
        evaluations=EVALS,
        base_model="hf-hub:purify-tests/r18-badnets@main",
        command="timm-purify purify purify-tests/r18-badnets --data fashion-mnist-mini --method npd --out out",
        plot_files=[METRICS_PLOT, SCAN_PLOT],
        license="apache-2.0",
        repo_id="purify-tests/r18-npd",
    )
    args.update(kwargs)
    return build_model_card(**args)


def test_metadata_parses_and_holds_the_metrics(tmp_path: Path) -> None:
    card = _card(save_form="folded")
    text = card.content
    assert text.startswith("---\n") and "\n---\n" in text[4:]
    for parsed in (ModelCard(text), _load(tmp_path, text)):
        data = parsed.data
        assert data.library_name == "timm" and data.license == "apache-2.0"
        assert data.base_model == "purify-tests/r18-badnets"
        assert data.pipeline_tag == "image-classification"
        assert {"timm", "image-classification", "timm-purify", "backdoor-defense"} <= set(data.tags)
        assert data.model_name == "r18-npd"
        got = {(r.metric_type, r.dataset_config): r.metric_value for r in data.eval_results}
        assert got[("accuracy", None)] == 88.7
        for attack, (before, after) in EVALS.items():
            assert got[("attack_success_rate", attack)] == round(100 * after.asr, 2)
            assert got[("robust_accuracy", attack)] == round(100 * after.ra, 2)
            assert got[("der", attack)] == round(100 * der(before, after), 2)
        assert got[("backdoor_scan_verdict", "backdoor-scan")] == "backdoored"
        assert got[("backdoor_scan_score", "backdoor-scan")] == 0.8731
        assert all(r.task_type == "image-classification" for r in data.eval_results)


def _load(tmp_path: Path, text: str) -> ModelCard:
    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")
    return ModelCard.load(path)


def test_body_says_what_was_found_done_and_claimed() -> None:
    body = _card(save_form="folded").text
    # scan
    assert "**Verdict: backdoored** (score 0.8731, threshold 0.3069)" in body
    assert "Suspected target class: 0 (tee)" in body
    assert "nothing unsafe found" in body
    # before/after table: one row per attack with ACC, ASR, DER
    row = next(line for line in body.splitlines() if line.startswith("| badnets |"))
    assert "91.20%" in row and "88.70%" in row and "97.00%" in row and "2.10%" in row
    assert f"{100 * der(*EVALS['badnets']):.2f}%" in row
    # figures, loading, reproduction, scope
    assert f"]({METRICS_PLOT})" in body and f"]({SCAN_PLOT})" in body
    assert 'timm.create_model("hf-hub:purify-tests/r18-npd", pretrained=True)' in body
    assert "folded" in body
    assert "```bash\ntimm-purify purify purify-tests/r18-badnets --data fashion-mnist-mini" in body
    assert "`badnets`, `blended`" in body and "not tested" in body
    assert "not a proof" in body
    assert "Universal reach" not in body and "Not run" not in body  # no second stage for this family


def test_stages_the_scan_skipped_are_named() -> None:
    report = _scan()
    report.config = {**report.config, "skipped_stages": ["reach", "spread"]}
    body = _card(scan_report=report).text
    assert (
        "- Not run, as they could not change the verdict or target: universal reach, universal spread" in body
    )
    # a family whose spread reading is calibrated in the window shape names it so
    report.config = {**report.config, "spread_calibrated": {"shape": "window", "window": 8, "threshold": 0.5}}
    body = _card(scan_report=report).text
    assert "could not change the verdict or target: universal reach, window spread" in body
    # a family calibrated with two readings names both
    both = [
        {"shape": "window", "window": 8, "threshold": 0.5},
        {"shape": "blend", "alpha": 0.1, "threshold": 0.6},
    ]
    report.config = {**report.config, "spread_calibrated": both}
    body = _card(scan_report=report).text
    assert "could not change the verdict or target: universal reach, window spread, blend spread" in body


def test_every_spread_reading_that_ran_is_listed_and_only_the_decider_marked() -> None:
    report = _scan()
    blend = {"shape": "blend", "alpha": 0.1, "score": 0.81, "threshold": 0.6, "fired": True}
    window = {"shape": "window", "window": 8, "score": 0.3, "threshold": 0.5, "fired": False}
    report.spread = {**blend, "others": [window]}
    report.config = {**report.config, "decided_by": "spread"}
    lines = [x for x in _card(scan_report=report).text.splitlines() if "spread (all-to-all reading" in x]
    assert len(lines) == 2
    assert lines[0].startswith(
        "- Blend spread (all-to-all reading: one pattern shared by all images, blended"
    )
    assert "score 0.8100, threshold 0.6 (this reading decided the verdict)" in lines[0]
    assert lines[1].startswith("- Window spread") and "decided" not in lines[1] and "fired" not in lines[1]
    # a reading that fired after the one that decided (the blend after the window) is marked too
    window = {**window, "score": 0.87, "fired": True}
    report.spread = {**window, "others": [blend]}
    lines = [x for x in _card(scan_report=report).text.splitlines() if "spread (all-to-all reading" in x]
    assert lines[0].startswith("- Window spread") and lines[0].endswith("(this reading decided the verdict)")
    assert lines[1].startswith("- Blend spread") and lines[1].endswith("threshold 0.6 (fired too)")


def test_a_reach_verdict_is_attributed_to_the_reach_stage() -> None:
    reach = {
        "score": 0.8771,
        "threshold": 0.29999999999999993,
        "norm": "l1",
        "suspected_target": 0,
        "fired": True,
    }
    report = _scan()
    report.reach = reach
    report.config = {**report.config, "decided_by": "reach"}

    def reach_line(r: ScanReport) -> str:
        return next(x for x in _card(scan_report=r).text.splitlines() if "Universal reach" in x)

    line = reach_line(report)
    assert (
        "score 0.8771, threshold 0.3, most reachable class 0 (tee) (this stage decided the verdict)" in line
    )
    # it fired, but BAN had already found the backdoor: BAN's verdict stands
    report.config = {**report.config, "decided_by": "ban+reach"}
    assert "decided" not in reach_line(report) and "verdict stands" in reach_line(report)
    report.reach = {**reach, "fired": False}
    report.config = {**report.config, "decided_by": "ban"}
    assert "decided" not in reach_line(report)


def test_a_spread_verdict_is_attributed_to_the_all_to_all_reading() -> None:
    report = _scan()
    report.spread = {"score": 0.826, "threshold": 0.2, "fired": True}
    report.config = {**report.config, "decided_by": "spread"}

    def spread_line(r: ScanReport) -> str:
        return next(x for x in _card(scan_report=r).text.splitlines() if "Universal spread" in x)

    assert "score 0.8260, threshold 0.2 (this reading decided the verdict)" in spread_line(report)
    report.config = {**report.config, "decided_by": "ban"}
    assert "decided" not in spread_line(report)
    report.spread = {"shape": "window", "score": 0.75, "threshold": 0.5, "fired": True}
    line = next(x for x in _card(scan_report=report).text.splitlines() if "Window spread" in x)
    assert "pasted in each window of a grid" in line and "score 0.7500, threshold 0.5" in line
    report.spread = None
    assert "Universal spread" not in _card(scan_report=report).text


def test_the_scans_record_in_sample_and_held_out_is_quoted() -> None:
    rel = {
        "archs": ["resnet18", "test_resnet"],
        "clean_models": 25,
        "false_positives": 0,
        "backdoored_models": 42,
        "detected": 33,
        "all_to_one_models": 32,
        "targets_correct": 32,
    }
    held = {
        **rel,
        "clean_models": 10,
        "false_positives": 1,
        "backdoored_models": 18,
        "detected": 17,
        "all_to_one_models": 17,
        "all_to_one_detected": 16,
        "targets_correct": 16,
    }
    report = _scan()

    def record_line(config: dict) -> str | None:
        report.config = config
        return next(
            (x for x in _card(scan_report=report).text.splitlines() if x.startswith("- Record")), None
        )

    base = {"data": "fashion-mnist-mini:train", "norm_family": "batchnorm"}
    line = record_line({**base, "calibration_reliability": rel})
    assert line == (
        "- Record of this scan on its calibration models (batchnorm normalisation: resnet18, test_resnet): "
        "detected 33/42 backdoored models, flagged 0/25 clean ones, named the right target for 32 of the 32 "
        "all-to-one backdoors found."
    )
    line = record_line({**base, "calibration_reliability": rel, "calibration_heldout": {"record": held}})
    assert line.endswith(
        "; on 28 held-out models of seeds no fit saw: detected 17/18 backdoored models, flagged 1/10 clean "
        "ones, named the right target for 16 of the 16 all-to-one backdoors found."
    )
    assert record_line(base) is None  # thresholds of the caller's own: no record to quote


def test_polarizer_form_points_to_timm_purify_and_warns() -> None:
    body = _card(save_form="polarizer", fold_note="the (3, 3) conv zero-pads its input").text
    assert "**Warning:**" in body and "*unpurified* base weights" in body
    assert 'timm_purify.from_pretrained("purify-tests/r18-npd")' in body
    assert "zero-pads" in body
    assert "two forward passes" not in body
    conditional = _card(save_form="polarizer", conditional=True).text
    assert "two forward passes" in conditional


def test_without_scan_or_evaluations_the_card_says_so() -> None:
    card = build_model_card(
        base_model="/data/models/r18",
        command=None,
        plot_files=[],
    )
    assert card.data.base_model is None  # a local path is not a Hub id
    assert not card.data.eval_results
    body = card.text
    assert "No behavioural backdoor scan was run" in body
    assert "No evaluation was recorded" in body
    assert "No attack was evaluated" in body
    assert "was not recorded" in body
    assert "local-dir:/path/to/this/folder" in body
    # a clean verdict is reported as such, with the caveat
    clean = build_model_card(
        scan_report=_scan("clean").to_dict(), base_model="r18", command=None, plot_files=[]
    )
    got = {r.metric_type: r.metric_value for r in clean.data.eval_results}
    assert got["backdoor_scan_verdict"] == "clean"
    assert "not a proof" in clean.text and "Suspected target" not in clean.text


def test_purify_result_fields_reach_the_card() -> None:
    from torch import nn

    from timm_purify.defenses import PurifyResult

    before, after = EVALS["badnets"]
    result = PurifyResult(
        model=nn.Identity(),
        method="ft",
        config={"epochs": 3, "lr": 0.01, "seed": 7},
        history=[],
        seconds=12.5,
        seed=7,
        num_clean=250,
        data="fashion-mnist-mini:train",
        base_model="purify-tests/r18-badnets",
        before=before,
        after=after,
    )
    card = build_model_card(result=result, base_model=result.base_model, command="cmd", plot_files=[])
    body = card.text
    assert "Method: `ft`: fine-tune all weights on the clean set" in body
    assert "250 images from `fashion-mnist-mini:train`" in body and "12.5 s" in body and "Seed: 7" in body
    assert "| `epochs` | `3` |" in body
    got = {(r.metric_type, r.dataset_config): r.metric_value for r in card.data.eval_results}
    assert got[("attack_success_rate", "badnets")] == 2.1
    assert "ft" in card.data.tags


def test_merge_evaluations_and_hub_ids() -> None:
    assert list(merge_evaluations(None, EVALS)) == ["badnets", "blended"]
    with pytest.raises(TypeError, match="pair of timm_purify EvalResults"):
        merge_evaluations(None, {"x": ({"acc": 1}, {"acc": 1})})
    with pytest.raises(ValueError, match="save_form"):
        _card(save_form="zipped")
    assert hub_model_id("hf-hub:org/name@v1") == "org/name"
    assert hub_model_id("org/name") == "org/name"
    assert hub_model_id("resnet18") is None
    assert hub_model_id("/abs/path") is None and hub_model_id("./rel/path") is None


def test_plots_are_pngs_and_leave_the_backend_alone(tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    files = write_plots(tmp_path, evaluations=EVALS, scan_report=_scan().to_dict(), class_names=CLASSES)
    assert files == [METRICS_PLOT, SCAN_PLOT]
    for name in files:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000
    assert matplotlib.get_backend() == backend
    # a clean-only evaluation (no ASR) still plots; no histogram -> no scan figure
    clean_only = {"clean": (EvalResult(acc=0.9, n_clean=10), EvalResult(acc=0.8, n_clean=10))}
    sub = tmp_path / "clean-only"
    sub.mkdir()
    assert write_plots(sub, evaluations=clean_only) == [METRICS_PLOT]
    with pytest.raises(ValueError, match="no evaluations"):
        plot_attack_metrics({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="histogram_noisy"):
        plot_scan_histogram({"verdict": "clean"}, tmp_path / "y.png")


def test_histogram_values_accepts_lists_and_mappings() -> None:
    assert histogram_values([3, 1, 0]) == [3.0, 1.0, 0.0]
    assert histogram_values({"2": 5, "0": 1}) == [1.0, 0.0, 5.0]
    assert histogram_values({}) == []
