"""The scripts in ``examples/`` run as documented (on tiny models, with short budgets)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from timm_purify._train import create_classifier, write_timm_folder

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_polarizer_anywhere_finds_spots_in_every_layout(capsys: pytest.CaptureFixture[str]) -> None:
    _example("polarizer_anywhere").main()  # raises SystemExit if a wrap changes logits or unwrap fails
    out = capsys.readouterr().out
    assert "layouts NC, NCHW, NHWC" in out  # the channels-last ConvNeXt
    assert "layouts NC, NCHW, NLC" in out  # the ViT's tokens
    assert out.count("logits unchanged: True") == 9


def test_scan_and_purify_writes_a_folder_that_reloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = create_classifier("test_resnet", num_classes=10, img_size=32)
    folder = write_timm_folder(model, tmp_path / "model")
    out = tmp_path / "purified"
    args = [
        str(folder),
        "--data",
        "fashion-mnist-mini",
        "--clean-count",
        "100",
        "--epochs",
        "1",
        "--out",
        str(out),
    ]
    # --epochs is given to a polarizer as epochs and to AWM as outer steps: auto names the unused one
    with pytest.warns(UserWarning, match="which does not take .*: not used"):
        _example("scan_and_purify").main(args)
    printed = capsys.readouterr().out
    assert printed.startswith("scan: ") and "reloaded logits match: True" in printed
    record = json.loads((out / "purify_result.json").read_text())
    config = record["result"]["config"]
    assert record["result"]["method"] in {"npd", "npd-tp", "cnpd-r", "awm"}  # what auto may pick
    length = config["outer_steps"] if record["result"]["method"] == "awm" else config["epochs"]
    assert length == 1 and record["result"]["num_clean"] == 100
    assert record["scan"]["verdict"] in {"backdoored", "clean"} and (out / "README.md").is_file()
