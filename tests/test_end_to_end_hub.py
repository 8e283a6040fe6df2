"""The Hub round trip as a user types it, in fresh processes against the loopback Hub server.

Push a backdoored model, ``timm-purify purify <id> --push-to-hub <id>-purified``, load the
result with vanilla ``timm.create_model('hf-hub:...')``, parse its card; then, with
``HF_HUB_OFFLINE=1`` and the cache the run filled, ``timm-purify scan <id>`` with no server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer

from timm_purify import push_to_hub
from timm_purify._train import TrainConfig, build_backdoored_model
from timm_purify.attacks import build_attack

REPO = "e2e-org/bd-resnet18"
# a few scan and method steps: the test checks the plumbing, the benchmarks check the quality
PURIFY_ARGS = ["--method", "ft", "--option", "epochs=1", "--clean-count", "100",
               "--scan-option", "steps=2", "--scan-option", "mask_epochs=1", "--seed", "0", "--quiet"]  # fmt: skip


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "timm_purify.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _python(code: str, env: dict[str, str], cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def pushed_model(tmp_path_factory: pytest.TempPathFactory, hub_server: HubServer) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    folder = root / "bd"
    build_backdoored_model(
        device="cpu",
        model="resnet18",
        attack=build_attack("badnets", num_classes=10),
        out_dir=folder,
        train_size=500,
        config=TrainConfig(epochs=1),
        quiet=True,
    )
    (folder / "README.md").write_text("---\nlibrary_name: timm\n---\n# a backdoored test model\n")
    push_to_hub(folder, REPO, endpoint=hub_server.endpoint)
    return folder


def test_purify_push_and_vanilla_load(
    pushed_model: Path, hub_server: HubServer, hub_env, tmp_path: Path
) -> None:
    home = tmp_path / "hf"
    env = hub_env(hub_server.endpoint, home=home)
    out = tmp_path / "purified"
    run = _cli(
        ["purify", REPO, "--data", "fashion-mnist-mini", "--out", str(out), "--attack", str(pushed_model / "attack.json"),
         *PURIFY_ARGS, "--push-to-hub", f"{REPO}-purified"],
        env, tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]
    assert "pushed:" in run.stdout
    assert set(hub_server.resolve(f"{REPO}-purified").files) >= {
        "config.json",
        "model.safetensors",
        "README.md",
    }

    # a fresh process that knows nothing of timm-purify loads the pushed model with vanilla timm
    code = f"""
import json, timm, torch
from huggingface_hub import ModelCard, hf_hub_download
m = timm.create_model('hf-hub:{REPO}-purified', pretrained=True).eval()
ref = timm.create_model('local-dir:{out}', pretrained=True).eval()
x = torch.rand(4, 3, 32, 32)
with torch.no_grad():
    diff = (m(x) - ref(x)).abs().max().item()
card = ModelCard.load(hf_hub_download('{REPO}-purified', 'README.md'))
results = [(r.metric_type, r.metric_value) for r in card.data.eval_results]
print(json.dumps({{"diff": diff, "base_model": card.data.base_model, "tags": card.data.tags, "results": results}}))
"""
    info = json.loads(
        _python(code, hub_env(hub_server.endpoint, home=tmp_path / "fresh"), tmp_path).splitlines()[-1]
    )
    assert info["diff"] < 1e-5
    assert info["base_model"] == REPO
    assert {"timm", "timm-purify", "backdoor-defense"} <= set(info["tags"])
    metric_types = {t for t, _ in info["results"]}
    assert {"accuracy"} <= metric_types and len(info["results"]) >= 3, info["results"]

    # offline, with the cache the purify run filled and no server reachable
    offline = hub_env("http://127.0.0.1:9", home=home, offline=True)
    scan = _cli(
        ["scan", REPO, "--data", "fashion-mnist-mini", "--clean-count", "100", "--json", str(tmp_path / "scan.json"),
         "--steps", "2", "--quiet"],
        offline, tmp_path,
    )  # fmt: skip
    assert scan.returncode in (0, 3), scan.stderr[-3000:]
    report = json.loads((tmp_path / "scan.json").read_text())
    assert report["verdict"] in ("clean", "backdoored") and 0.0 <= report["clean_acc"] <= 1.0
