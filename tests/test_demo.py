"""``timm-purify demo``: the README's first command, end to end on a tiny architecture.

The real demo trains a resnet18 (about 80 s on 2 cores); here the same code path runs on
timm's ``test_resnet`` so the whole chain (train, scan, purify, evaluate, save with card)
is checked in CI.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard
from scan_reports import fake_report

from timm_purify._auto import AUTO_OPTIONS, choose_method, untaken_error, unused_options, why
from timm_purify.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(
        main,
        ["demo", "--out", str(out), "--model", "test_resnet", "--epochs", "3", "--quiet"],
        catch_exceptions=False,
    )
    return result, out


def test_demo_runs_every_step_and_writes_a_card(demo_run):
    result, out = demo_run
    assert result.exit_code == 0, result.output
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in result.output
    purified = out / "purified"
    assert (purified / "README.md").is_file() and (purified / "purify_result.json").is_file()
    assert any(purified.glob("*.safetensors"))
    assert not any(p.suffix in {".bin", ".pt", ".pth", ".pkl"} for p in purified.rglob("*"))
    card = ModelCard.load(purified / "README.md")
    assert "timm-purify" in card.data.tags
    record = json.loads((purified / "purify_result.json").read_text())
    assert record["scan"]["verdict"] in {"backdoored", "clean"}
    assert record["command"].startswith("timm-purify purify")  # how to reproduce the purification


def test_demo_lowers_the_attack_success_rate(demo_run):
    result, out = demo_run
    assert result.exit_code == 0, result.output
    record = json.loads((out / "purified" / "purify_result.json").read_text())
    before, after = record["result"]["before"], record["result"]["after"]
    assert before["asr"] > 0.5, f"the demo's backdoor did not implant: {before}"
    assert after["asr"] < before["asr"] - 0.2, (before, after)


def test_auto_method_follows_the_scan():
    method, options = choose_method("auto", fake_report(verdict="backdoored", target=4))
    assert method == "npd-tp" and options == {**AUTO_OPTIONS["npd-tp"], "target": 4}
    assert options["layer"] == "last-stage" and options["rho"] == 6.0
    assert choose_method("auto", fake_report(verdict="clean", target=None)) == ("npd", AUTO_OPTIONS["npd"])
    assert choose_method("nft", fake_report(verdict="backdoored", target=4)) == ("nft", {})
    # a backdoored LayerNorm model: the per-class polarizer with the larger budget, no target needed
    layernorm = fake_report(verdict="backdoored", target=4)
    layernorm.config = {**(layernorm.config or {}), "norm_family": "other"}
    assert choose_method("auto", layernorm, {"epochs": 2}) == (
        "cnpd-r",
        {**AUTO_OPTIONS["cnpd-r"], "epochs": 2},
    )
    assert AUTO_OPTIONS["cnpd-r"]["rho"] == 10.0 and "target" not in AUTO_OPTIONS["cnpd-r"]
    layernorm.verdict, layernorm.suspected_target = "clean", None
    assert choose_method("auto", layernorm) == ("npd", AUTO_OPTIONS["npd"])


def test_auto_runs_awm_for_an_all_to_all_model():
    a2a = fake_report(
        verdict="backdoored", target=None, pattern="all-to-all", config={"norm_family": "batchnorm"}
    )
    # BAN's all-to-all statistic (or the window reading) decided: the trigger search takes a window
    assert choose_method("auto", a2a) == ("awm", {"trigger": "window"})
    # a blend reading fired: a blended pattern, also where the window fired first and decided (a
    # window of a blended trigger can carry it); a blend reading that ran and did not fire does not count
    blended = fake_report(
        verdict="backdoored",
        target=None,
        pattern="all-to-all",
        config={"norm_family": "batchnorm", "decided_by": "spread"},
        spread={"shape": "blend", "fired": True, "others": [{"shape": "window", "fired": False}]},
    )
    assert choose_method("auto", blended) == ("awm", {"trigger": "blend"})
    assert choose_method("auto", blended, {"trigger": "l1"}) == (
        "awm",
        {"trigger": "l1"},
    )  # the caller's wins
    blended.spread = {"shape": "window", "fired": True, "others": [{"shape": "blend", "fired": True}]}
    assert choose_method("auto", blended) == ("awm", {"trigger": "blend"})
    # the line naming the method says what the scan steered
    assert why(choose_method("auto", blended)[1]) == " (trigger=blend: a blend reading fired)"
    blended.spread["others"][0]["fired"] = False
    assert choose_method("auto", blended) == ("awm", {"trigger": "window"})
    assert why(choose_method("auto", blended)[1]) == " (trigger=window: no blend reading fired)"
    assert why({}) == "" and why({"target": 4}) == " (towards the scan's suspected target 4)"
    # each candidate gets the caller's options it takes: the polarizer's epochs are not AWM's
    given = {"epochs": 2, "outer_steps": 3, "batch_size": 16}
    assert choose_method("auto", a2a, given) == (
        "awm",
        {"trigger": "window", "outer_steps": 3, "batch_size": 16},
    )
    assert unused_options("awm", given) == ["epochs"]
    clean = fake_report(verdict="clean", target=None)
    assert choose_method("auto", clean, given) == (
        "npd",
        {**AUTO_OPTIONS["npd"], "epochs": 2, "batch_size": 16},
    )
    assert unused_options("npd", given) == ["outer_steps"]
    # an option no candidate takes is the caller's mistake, refused before any work
    assert "unknown option(s) ['nonsense']" in untaken_error({**given, "nonsense": 1})
    assert untaken_error(given) is None
    # an all-to-all LayerNorm model takes AWM too (the window removed the ConvNeXt's, cnpd-r left 33%)
    a2a.config = {"norm_family": "other"}
    assert choose_method("auto", a2a) == ("awm", {"trigger": "window"})
