"""``timm-purify purify`` and ``timm-purify push`` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import timm
import torch
from click.testing import CliRunner
from hub_server import HubServer
from PIL import Image
from scan_reports import fake_report

from timm_purify.attacks import build_attack
from timm_purify.cli import main
from timm_purify.cli.purify import reproduce_command
from timm_purify.data import ImageData, load_data

PER_CLASS = {"train": 10, "test": 5}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny (random) resnet18 folder with its attack.json, and a small image folder with
    train/ and test/ splits cut from the bundled set."""
    from timm_purify._train import create_classifier, write_timm_folder

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = create_classifier("resnet18", num_classes=10, img_size=32)
    attack = build_attack("badnets", num_classes=10)
    folder = write_timm_folder(model, root / "model", {"attack.json": json.dumps(attack.to_dict())})
    data = root / "images"
    for split, count in PER_CLASS.items():
        images = load_data("fashion-mnist-mini", split=split)
        for c, name in enumerate(images.classes):
            target = data / split / name
            target.mkdir(parents=True)
            idx = torch.nonzero(images.y == c).flatten()[:count]
            for i in idx.tolist():
                Image.fromarray(images.x[i, 0].numpy()).save(target / f"{i}.png")
    return {"root": root, "model": folder, "attack": folder / "attack.json", "data": data}


def _run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _base_args(ws: dict[str, Path], out: Path) -> list[str]:
    return [
        "purify",
        str(ws["model"]),
        "--data",
        str(ws["data"]),
        "--method",
        "ft",
        "--out",
        str(out),
        "--option",
        "epochs=1",
        "--option",
        "batch_size=50",
    ]


def test_purify_with_ft_writes_a_vanilla_timm_folder(workspace: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "purified"
    args = _base_args(workspace, out) + [
        "--attack",
        str(workspace["attack"]),
        "--no-scan",
        "--quiet",
        "--seed",
        "3",
    ]
    result = _run(args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("method ft: 100 clean images") and "seed 3" in lines[0]
    assert any(line.startswith("ACC") and line.count("%") == 2 for line in lines)
    assert any(line.startswith("ASR") and "(badnets)" in line for line in lines)
    assert any(line.startswith("DER") for line in lines)
    assert f"saved to {out} as a plain model" in result.output
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "purify_result.json",
        "purification_metrics.png",
    } <= {p.name for p in out.iterdir()}
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.num_classes == 10
    record = json.loads((out / "purify_result.json").read_text())
    assert record["result"]["method"] == "ft" and record["result"]["config"]["epochs"] == 1
    assert record["result"]["seed"] == 3 and record["result"]["num_clean"] == 100
    assert record["evaluations"]["badnets"]["before"]["n_clean"] == 50  # --eval-data defaulted to --data
    card = (out / "README.md").read_text()
    assert record["command"] in card
    assert record["command"].startswith(f"timm-purify purify {workspace['model']} --data {workspace['data']}")
    assert (
        "--seed 3" in record["command"]
        and "--no-scan" in record["command"]
        and "--quiet" not in record["command"]
    )


def test_command_line_mistakes_fail_cleanly(workspace: dict[str, Path], tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    result = _run(_base_args(workspace, busy) + ["--no-scan"])
    assert result.exit_code == 1 and "not empty" in result.output and "Traceback" not in result.output
    # into the model's own folder
    result = _run(_base_args(workspace, workspace["model"] / "purified") + ["--no-scan"])
    assert result.exit_code == 1 and "loaded from" in result.output
    assert not (workspace["model"] / "purified").exists()
    # invalid method option: refused before any work, nothing written
    out = tmp_path / "never"
    result = _run(_base_args(workspace, out) + ["--option", "epochs=0", "--no-scan"])
    assert result.exit_code == 1 and "epochs must be > 0" in result.output
    assert not out.exists()
    result = _run(_base_args(workspace, out) + ["--option", "nonsense=1", "--no-scan"])
    assert result.exit_code == 1 and "unknown option" in result.output
    result = _run(_base_args(workspace, out) + ["--option", "epochs", "--no-scan"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = _run(["purify", str(workspace["model"]), "--data", "x", "--method", "nope", "--out", str(out)])
    assert result.exit_code == 2 and "unknown method 'nope'" in result.output and "ft" in result.output
    # data mistakes: named as --data's, before any scan or training, nothing written
    empty = tmp_path / "no-images"
    empty.mkdir()
    result = _run(_base_args(workspace, out) + ["--data", str(empty)])
    assert result.exit_code == 1 and "--data:" in result.output and "Traceback" not in result.output
    result = _run(_base_args(workspace, out) + ["--clean-count", "5"])
    assert (
        result.exit_code == 1 and "--clean-count: 5 clean images cannot cover the 10 classes" in result.output
    )
    assert not out.exists()
    result = _run(_base_args(workspace, out) + ["--clean-count", "5", "--clean-fraction", "0.5"])
    assert result.exit_code == 2 and "not both" in result.output
    result = _run(_base_args(workspace, out) + ["--token", "secret"])
    assert result.exit_code == 2 and "--push-to-hub" in result.output
    result = _run(_base_args(workspace, out) + ["--merge", "yes", "--no-scan", "--quiet"])
    assert result.exit_code == 0  # a plain result has nothing to fold: merge=yes is satisfied
    assert not list(tmp_path.glob(".never.*"))
    result = _run(
        ["purify", "no-such-model-xyz", "--data", "x", "--method", "ft", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output


def _fake_scan(
    monkeypatch: pytest.MonkeyPatch,
    *,
    verdict: str = "backdoored",
    target: int | None = 0,
    config: dict | None = None,
    **fields: Any,
) -> list:
    """Replace the (slow) BAN scan with a fixed report; returns the list its calls land in.
    The tests using it check what the command passes to the scan and what it does with the
    report, not the scan itself (tests/test_scan.py does that)."""
    import timm_purify.detection.ban as ban

    calls = []

    def fake_scan(model, data, **kwargs):
        calls.append((data, kwargs))
        return fake_report(
            verdict=verdict,
            target=target,
            config={"data": str(data), **(config or {})},
            seed=kwargs["seed"],
            class_names=["T-shirt/top"] + [f"c{i}" for i in range(1, 10)],
            **fields,
        )

    monkeypatch.setattr(ban, "scan", fake_scan)
    return calls


def test_scan_report_reaches_the_card(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_scan(monkeypatch)
    out = tmp_path / "scanned"
    result = _run(_base_args(workspace, out) + ["--clean-count", "50", "--scan-option", "eps=0.1", "--quiet"])
    assert result.exit_code == 0, result.output
    ((data, kwargs),) = calls
    # the command loads and subsets the clean images once: the scan gets the 50 the method gets
    assert isinstance(data, ImageData) and len(data) == 50 and "clean_count" not in kwargs
    assert data.source.startswith(str(workspace["data"])) and kwargs["eps"] == 0.1
    assert Path(kwargs["files"]).resolve() == workspace["model"].resolve()
    assert "scan of the input model: backdoored (score 0.9300, suspected target T-shirt/top)" in result.output
    record = json.loads((out / "purify_result.json").read_text())
    assert record["result"]["data"] == data.source and record["result"]["num_clean"] == 50
    assert record["scan"]["verdict"] == "backdoored" and record["scan"]["seed"] == 0
    card = (out / "README.md").read_text()
    assert "**Verdict: backdoored**" in card and "(scan_histogram.png)" in card
    assert (out / "scan_histogram.png").is_file()
    assert "--scan-option eps=0.1" in record["command"]


def _auto_args(ws: dict[str, Path], out: Path, *options: str) -> list[str]:
    args = ["purify", str(ws["model"]), "--data", str(ws["data"]), "--method", "auto", "--out", str(out)]
    # a polarizer trained for one short epoch on 100 images: seconds, enough to see what ran
    for option in ("epochs=1", "warmup_epochs=0", "batch_size=50", "layer=last-stage", *options):
        args += ["--option", option]
    return args + ["--quiet"]


@pytest.mark.parametrize(
    ("verdict", "target", "method"), [("backdoored", 3, "npd-tp"), ("clean", None, "npd")]
)
def test_auto_method_follows_the_scan(
    workspace: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    verdict: str,
    target: int | None,
    method: str,
) -> None:
    calls = _fake_scan(monkeypatch, verdict=verdict, target=target)
    out = tmp_path / "auto"
    result = _run(_auto_args(workspace, out))
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 and result.output.startswith(f"method {method}:")
    record = json.loads((out / "purify_result.json").read_text())
    config = record["result"]["config"]
    # the caller's epochs=1 wins over auto's options; the attack budget applies to npd-tp only
    assert record["result"]["method"] == method and config["epochs"] == 1
    assert config.get("target") == target
    assert (config["rho"], config["pgd_steps"]) == ((6.0, 5) if target is not None else (3.0, 2))
    assert config["lr"] == 0.1  # auto's for both methods (the paper's is 0.01)
    # the saved command names what ran, so rerunning it does not depend on a scan's verdict
    assert f"--method {method} " in record["command"] and "--method auto" not in record["command"]
    assert ("--option target=3" in record["command"]) == (target is not None)
    assert ("--option rho=6.0" in record["command"]) == (target is not None)
    assert record["command"].count("--option epochs=") == 1


def test_auto_budget_yields_to_the_callers_options(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_scan(monkeypatch, verdict="backdoored", target=3)
    out = tmp_path / "auto-rho"
    result = _run(_auto_args(workspace, out, "rho=2", "pgd_steps=1"))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "purify_result.json").read_text())
    config = record["result"]["config"]
    assert (config["rho"], config["pgd_steps"], config["stop_fraction"]) == (2, 1, 1.0)
    assert record["command"].count("--option rho=") == 1 and "--option rho=2" in record["command"]


def test_auto_runs_awm_for_an_all_to_all_pattern(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_scan(monkeypatch, target=None, pattern="all-to-all", config={"norm_family": "batchnorm"})
    out = tmp_path / "auto-awm"
    result = _run(_auto_args(workspace, out, "outer_steps=1", "inner_steps=1"))
    assert result.exit_code == 0, result.output
    # the polarizer options auto's other candidates take are named, not silently dropped
    assert "awm does not take --option epochs, layer, warmup_epochs: not used" in result.output
    record = json.loads((out / "purify_result.json").read_text())
    assert record["result"]["method"] == "awm"
    config = record["result"]["config"]
    assert (config["outer_steps"], config["inner_steps"], config["batch_size"]) == (1, 1, 50)
    # the saved command reruns as it ran: awm with the options it took, none it would refuse
    command = record["command"]
    assert "--method awm " in command and "--option outer_steps=1" in command
    assert "epochs=" not in command.replace("outer_steps", "") and "layer=" not in command


def test_auto_method_mistakes_fail_before_any_work(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_scan(monkeypatch)
    out = tmp_path / "never"
    result = _run(_auto_args(workspace, out) + ["--no-scan"])
    assert result.exit_code == 2 and "drop --no-scan" in result.output
    result = _run(_auto_args(workspace, out, "target=2"))
    assert result.exit_code == 2 and "--method npd-tp --option target=N" in result.output
    result = _run(_auto_args(workspace, out, "nonsense=1"))
    assert result.exit_code == 1 and "--method auto: unknown option(s) ['nonsense']" in result.output
    result = _run(_auto_args(workspace, out, "outer_steps=0"))  # AWM's option, checked for AWM
    assert result.exit_code == 1 and "--method auto (awm): outer_steps must be > 0" in result.output
    result = _run(_auto_args(workspace, out, "rho=-1"))
    assert result.exit_code == 1 and "rho must be > 0" in result.output
    # any method's bad option is refused before the scan runs, not after it
    result = _run(_base_args(workspace, out) + ["--option", "epochs=0"])
    assert result.exit_code == 1 and "epochs must be > 0" in result.output
    assert calls == [] and not out.exists() and "Traceback" not in result.output


def test_options_are_checked_against_the_clean_set_the_method_gets(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from timm_purify.defenses.ft import FTConfig

    seen = []
    check = FTConfig.validate

    def spy(self, *, num_clean: int, num_classes: int) -> None:
        seen.append(num_clean)
        check(self, num_clean=num_clean, num_classes=num_classes)

    monkeypatch.setattr(FTConfig, "validate", spy)
    result = _run(_base_args(workspace, tmp_path / "sized") + ["--clean-count", "30", "--no-scan", "--quiet"])
    assert result.exit_code == 0, result.output
    # the early check (before any scan) and purify's own both see the 30 images, not a stand-in
    assert seen == [30, 30]


def test_push_commands(
    workspace: dict[str, Path], tmp_path: Path, hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub reads HF_ENDPOINT at import; the client reads this constant at call time
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub_server.endpoint)
    out = tmp_path / "to-push"
    result = _run(
        _base_args(workspace, out)
        + ["--no-scan", "--quiet", "--push-to-hub", "purify-tests/cli-ft", "--token", "hf_not_checked"]
    )
    assert result.exit_code == 0, result.output
    assert "pushed:" in result.output
    pushed = hub_server.resolve("purify-tests/cli-ft").files
    assert pushed["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "hf_not_checked" not in pushed["README.md"].decode()
    assert "hf_not_checked" not in pushed["purify_result.json"].decode()
    # the push command on its own
    result = _run(
        ["push", str(out), "purify-tests/cli-again", "--private", "--token", "t", "--message", "again"]
    )
    assert result.exit_code == 0, result.output
    commit = hub_server.commits("purify-tests/cli-again")[-1]
    assert commit.message == "again" and "README.md" in commit.files
    # a folder without a model card is refused with a clean message
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    result = _run(["push", str(bare), "purify-tests/bare"])
    assert result.exit_code == 1 and "README.md" in result.output and "Traceback" not in result.output


def test_reproduce_command_is_canonical() -> None:
    params = dict(
        model="org/name",
        checkpoint=None,
        num_classes=None,
        img_size=None,
        data="my data",
        method="npd",
        out_dir="out",
        clean_count=None,
        clean_fraction=0.05,
        eval_data=None,
        attack_file="a.json",
        options=("epochs=5",),
        seed=0,
        merge="auto",
        scan=None,
        scan_options=(),
        license=None,
        token="secret",
        repo_id="org/x",
        device="cuda",
        quiet=True,
    )
    assert reproduce_command(params) == (
        "timm-purify purify org/name --data 'my data' --method npd --out out --clean-fraction 0.05 "
        "--attack a.json --option epochs=5 --seed 0"
    )
