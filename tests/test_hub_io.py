"""Model loading from every kind of spec, and a push / download round trip through a Hub server.

The round trip runs the unmodified huggingface_hub client against :mod:`hub_server`. Code that
reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` at import (``load_model('org/name')``, vanilla
``timm.create_model('hf-hub:...')``) runs in subprocesses with their own cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
import timm
import torch
from hub_server import HubServer
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from timm_purify._hub import (
    CheckpointMismatchError,
    HubPushError,
    ModelNotFoundError,
    ModelSpecError,
    NoClassifierError,
    NotATimmFolderError,
    NumClassesMismatchError,
    load_model,
    push_to_hub,
    resolve_source,
)
from timm_purify.cli._common import open_model
from timm_purify.detection import UnsafeFileError

REPO = "purify-tests/tiny-resnet"


class Payload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    overlay = {"input_size": (3, 32, 32), "crop_pct": 1.0}
    return timm.create_model("resnet18", num_classes=10, pretrained_cfg_overlay=overlay).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A timm folder of a 10-class resnet18 at 32x32, an input batch and its logits."""
    root = tmp_path_factory.mktemp("saved")
    model = tiny_model()
    folder = root / "model"
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    (folder / "README.md").write_text("---\nlibrary_name: timm\nlicense: apache-2.0\n---\n# tiny resnet\n")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    save_file({"x": x, "logits": logits}, str(root / "io.safetensors"))
    return {"root": root, "folder": folder, "x": x, "logits": logits, "model": model}


CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
import timm
from timm_purify._hub import load_model
io_path, out_path, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
x = load_file(io_path)["x"]
out, report = {}, {"loaded": {}, "errors": {}}
with torch.no_grad():
    for spec in plan["load"]:
        model = load_model(spec)
        out[spec] = model(x)
        cfg = {k: model.pretrained_cfg.get(k) for k in ("hf_hub_id", "source", "input_size", "file")}
        report["loaded"][spec] = {"source": model._timm_purify_source, "cfg": cfg}
    for repo in plan["vanilla"]:
        out["vanilla:" + repo] = timm.create_model("hf-hub:" + repo, pretrained=True).eval()(x)
for spec in plan["fail"]:
    try:
        load_model(spec)
    except Exception as err:
        report["errors"][spec] = [type(err).__name__, [c.__name__ for c in type(err).__mro__], str(err)]
save_file(out, out_path)
print(json.dumps(report))
"""


def run_child(env: dict[str, str], saved: dict, out: Path, **plan: list[str]) -> tuple[dict, dict]:
    """In a fresh interpreter, ``load_model`` each of ``plan["load"]``, build each of
    ``plan["vanilla"]`` with timm's own hf-hub loader, and try each of ``plan["fail"]``.
    Returns the logits by spec and a report (source and cfg of each load, error of each fail)."""
    plan = {"load": [], "vanilla": [], "fail": [], **plan}
    args = [str(saved["root"] / "io.safetensors"), str(out), json.dumps(plan)]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out)), json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pushed(saved: dict, hub_server: HubServer) -> str:
    return push_to_hub(saved["folder"], REPO, endpoint=hub_server.endpoint, commit_message="tiny resnet")


def test_push_creates_one_commit_with_the_whole_folder(
    pushed: str, saved: dict, hub_server: HubServer
) -> None:
    commits = hub_server.commits(REPO)
    assert [c.message for c in commits] == ["initial commit", "tiny resnet"]  # creation + ONE upload
    assert pushed == f"{hub_server.endpoint}/{REPO}/commit/{commits[-1].sha}"
    local = {p.name: p.read_bytes() for p in saved["folder"].iterdir()}
    assert set(local) == {"README.md", "config.json", "model.safetensors"}
    assert {k: v for k, v in commits[-1].files.items() if k != ".gitattributes"} == local
    # pushing the same folder again is a no-op (the client skips unchanged files)
    again = push_to_hub(saved["folder"], REPO, endpoint=hub_server.endpoint)
    assert len(hub_server.commits(REPO)) == 2 and again.endswith(commits[-1].sha)


def _raw_upload(hub_server: HubServer, repo: str, files: dict[str, bytes], tmp_path: Path) -> None:
    """Publish files push_to_hub would refuse (pickles, no config.json) with the plain client."""
    folder = tmp_path / repo.replace("/", "--")
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    api = HfApi(endpoint=hub_server.endpoint)
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=folder)


def test_download_online_then_offline(
    pushed: str, saved: dict, hub_server: HubServer, hub_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    config = (saved["folder"] / "config.json").read_bytes()
    clean_bin, evil_bin = tmp_path / "clean.bin", tmp_path / "evil.bin"
    sentinel = tmp_path / "SENTINEL"
    torch.save(saved["model"].state_dict(), clean_bin)
    torch.save({**saved["model"].state_dict(), "x": Payload(f"touch {sentinel}")}, evil_bin)
    _raw_upload(hub_server, "purify-tests/no-config", {"weights.safetensors": b"\0" * 8 + b"{}"}, tmp_path)
    _raw_upload(
        hub_server,
        "purify-tests/pickle-only",
        {"config.json": config, "pytorch_model.bin": clean_bin.read_bytes()},
        tmp_path,
    )
    _raw_upload(
        hub_server,
        "purify-tests/trap",
        {"config.json": config, "pytorch_model.bin": evil_bin.read_bytes()},
        tmp_path,
    )

    home = tmp_path / "hf_home"
    fail = ["nobody/nothing", f"{REPO}@v999", "purify-tests/no-config", "purify-tests/trap"]
    load = [REPO, f"hf-hub:{REPO}", "purify-tests/pickle-only"]
    logits, online = run_child(
        hub_env(hub_server.endpoint, home=home),
        saved,
        tmp_path / "online.safetensors",
        load=load,
        vanilla=[REPO],
        fail=fail,
    )
    for key in [*load, f"vanilla:{REPO}"]:
        torch.testing.assert_close(logits[key], saved["logits"], rtol=0, atol=0)
    expected = {"hf_hub_id": REPO, "source": "hf-hub", "input_size": [3, 32, 32], "file": None}
    assert online["loaded"][REPO] == online["loaded"][f"hf-hub:{REPO}"] == {"source": REPO, "cfg": expected}
    errors = online["errors"]
    assert errors.keys() == set(fail)  # each one raised
    name, mro, message = errors["nobody/nothing"]
    assert name == "ModelNotFoundError" and "FileNotFoundError" in mro
    assert "'nobody/nothing' was not found" in message and "HF_ENDPOINT" in message
    assert (
        errors[f"{REPO}@v999"][0] == "ModelNotFoundError"
        and "'v999' does not exist" in errors[f"{REPO}@v999"][2]
    )
    assert errors["purify-tests/no-config"][0] == "NotATimmFolderError"
    assert errors["purify-tests/trap"][0] == "UnsafeFileError" and "system" in errors["purify-tests/trap"][2]
    assert not sentinel.exists()
    # safetensors repo: the pickle-free snapshot only; pickle-only repo: its .bin was needed
    cache = home / "hub"
    assert sorted(p.name for p in cache.glob("models--purify-tests--tiny-resnet/snapshots/*/*")) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert sorted(p.name for p in cache.glob("models--purify-tests--pickle-only/snapshots/*/*")) == [
        "config.json",
        "pytorch_model.bin",
    ]

    # same cache, HF_HUB_OFFLINE=1 and an endpoint where nothing listens
    dead = HubServer().start()
    dead_endpoint = dead.endpoint
    dead.stop()
    logits, offline = run_child(
        hub_env(dead_endpoint, home=home, offline=True),
        saved,
        tmp_path / "offline.safetensors",
        load=[REPO],
        fail=["purify-tests/never-downloaded"],
    )
    torch.testing.assert_close(logits[REPO], saved["logits"], rtol=0, atol=0)
    name, _, message = offline["errors"]["purify-tests/never-downloaded"]
    assert name == "ModelNotFoundError" and "HF_HUB_OFFLINE is set" in message


def test_open_model_reports_a_clean_click_error(saved: dict) -> None:
    with pytest.raises(click.ClickException, match="10-class model"):
        open_model(str(saved["folder"]), num_classes=3)
    assert open_model(str(saved["folder"])).num_classes == 10


def test_local_folder_specs(saved: dict) -> None:
    for spec in (str(saved["folder"]), f"local-dir:{saved['folder']}"):
        model = load_model(spec)
        assert model._timm_purify_source == spec and not model.training
        with torch.no_grad():
            torch.testing.assert_close(model(saved["x"]), saved["logits"], rtol=0, atol=0)
    assert resolve_source(str(saved["folder"])) == ("folder", str(saved["folder"]))
    assert resolve_source("resnet18") == ("architecture", "resnet18")
    assert resolve_source("org/name@v1") == ("hub", "org/name@v1")


def test_hub_id_from_a_downloaded_snapshot_asks_no_server(saved: dict) -> None:
    # `scan org/name` downloads the snapshot to inspect it, then loads from that folder; the
    # endpoint here is a closed port, so any second Hub request would fail the load
    model = load_model("org/tiny@main", snapshot=saved["folder"], endpoint="http://127.0.0.1:9")
    assert model._timm_purify_source == "org/tiny@main"
    assert model.pretrained_cfg["hf_hub_id"] == "org/tiny@main"
    with torch.no_grad():
        torch.testing.assert_close(model(saved["x"]), saved["logits"], rtol=0, atol=0)
    with pytest.raises(ModelSpecError, match="snapshot= is the downloaded folder of a Hub id"):
        load_model(str(saved["folder"]), snapshot=saved["folder"])


def test_folder_errors(saved: dict, tmp_path: Path) -> None:
    with pytest.raises(NumClassesMismatchError, match="10-class model"):
        load_model(str(saved["folder"]), num_classes=5)
    with pytest.raises(ModelSpecError, match="img_size applies"):
        load_model(str(saved["folder"]), img_size=64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotATimmFolderError, match="no config.json"):
        load_model(str(empty))
    (empty / "config.json").write_text((saved["folder"] / "config.json").read_text())
    with pytest.raises(NotATimmFolderError, match="no weights"):
        load_model(str(empty))
    headless = json.loads((saved["folder"] / "config.json").read_text())
    headless["num_classes"] = 0
    (empty / "config.json").write_text(json.dumps(headless))
    with pytest.raises(NoClassifierError, match="feature extractor"):
        load_model(str(empty))


def test_malicious_pickle_folder_is_refused_without_running(saved: dict, tmp_path: Path) -> None:
    folder = tmp_path / "trap"
    folder.mkdir()
    (folder / "config.json").write_text((saved["folder"] / "config.json").read_text())
    sentinel = tmp_path / "SENTINEL"
    torch.save(
        {**saved["model"].state_dict(), "x": Payload(f"touch {sentinel}")}, folder / "pytorch_model.bin"
    )
    with pytest.raises(UnsafeFileError, match="unsafe import (posix|nt).system") as info:
        load_model(str(folder))
    assert info.value.findings and not sentinel.exists()


def test_architecture_with_checkpoint(saved: dict, tmp_path: Path) -> None:
    sd = saved["model"].state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = load_model("resnet18", checkpoint=str(tmp_path / name), img_size=32)
        assert model.num_classes == 10  # read from the checkpoint's head
        assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.pretrained_cfg["crop_pct"] == 1.0
        with torch.no_grad():
            torch.testing.assert_close(model(saved["x"]), saved["logits"], rtol=0, atol=0)
    with pytest.raises(NumClassesMismatchError, match="10-class head"):
        load_model("resnet18", checkpoint=str(tmp_path / "w.pth"), num_classes=5)
    with pytest.raises(CheckpointMismatchError, match="does not fit resnet34"):
        load_model("resnet34", checkpoint=str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelSpecError, match="pickle-based and allow_pickle=False"):
        load_model("resnet18", checkpoint=str(tmp_path / "w.pth"), allow_pickle=False)
    with pytest.raises(ModelNotFoundError):
        load_model("resnet18", checkpoint=str(tmp_path / "missing.pth"))


def test_bare_architecture_img_size_and_errors() -> None:
    vit = load_model("vit_tiny_patch16_224", num_classes=3, img_size=32)  # takes img_size
    assert vit.patch_embed.img_size == (32, 32) and vit.pretrained_cfg["input_size"] == (3, 32, 32)
    cnn = load_model("resnet18", num_classes=3, img_size=32)  # does not: falls back, cfg only
    assert cnn.pretrained_cfg["input_size"] == (3, 32, 32) and cnn._timm_purify_source == "resnet18"
    with pytest.raises(ModelSpecError, match="resnet18"):  # close-match suggestion
        load_model("resnet18x")
    with pytest.raises(NoClassifierError):
        load_model("resnet18", num_classes=0)


def test_push_refusals(saved: dict, tmp_path: Path, hub_server: HubServer) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_bytes((saved["folder"] / name).read_bytes())
    with pytest.raises(HubPushError, match="lacks README.md"):
        push_to_hub(out, "org/x", endpoint=hub_server.endpoint)
    (out / "README.md").write_text("# card\n")
    torch.save({}, out / "pytorch_model.bin")
    with pytest.raises(HubPushError, match="pickle-based files"):
        push_to_hub(out, "org/x", endpoint=hub_server.endpoint)
    (out / "pytorch_model.bin").unlink()
    with pytest.raises(HubPushError, match="org/name"):
        push_to_hub(out, "no-slash", endpoint=hub_server.endpoint)
    assert "org/x" not in hub_server.repos  # every refusal happened before any request


def test_pickled_module_passes_the_scan_but_weights_only_refuses_it(saved: dict, tmp_path: Path) -> None:
    # torch.save(model) only imports torch / timm classes: warnings for the scan, but
    # torch.load(weights_only=True) refuses them; the user gets an UnsafeFileError, not a traceback
    folder = tmp_path / "pickled-module"
    folder.mkdir()
    (folder / "config.json").write_text((saved["folder"] / "config.json").read_text())
    torch.save(saved["model"], folder / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="weights_only=True\\) refused"):
        load_model(str(folder))
    with pytest.raises(UnsafeFileError, match="pickled model"):
        load_model("resnet18", checkpoint=str(folder / "pytorch_model.bin"))


def test_push_reports_a_rejected_model_card(saved: dict, tmp_path: Path, hub_server: HubServer) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_bytes((saved["folder"] / name).read_bytes())
    (out / "README.md").write_text("---\nlicense: [unclosed\n---\n# card\n")  # the server's YAML check fails
    with pytest.raises(HubPushError, match="Invalid metadata in README.md"):
        push_to_hub(out, "purify-tests/bad-card", endpoint=hub_server.endpoint)
    assert len(hub_server.commits("purify-tests/bad-card")) == 1  # created, nothing committed


def test_allow_pickle_false_follows_the_file_timm_would_read(saved: dict, tmp_path: Path) -> None:
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "config.json").write_text((saved["folder"] / "config.json").read_text())
    sd = saved["model"].state_dict()
    save_file(sd, str(folder / "weights.safetensors"))  # not the name timm prefers
    torch.save(sd, folder / "pytorch_model.bin")  # ... which this one is
    with pytest.raises(ModelSpecError, match="would load pytorch_model.bin"):
        load_model(str(folder), allow_pickle=False)
    (folder / "weights.safetensors").rename(folder / "model.safetensors")
    assert load_model(str(folder), allow_pickle=False).num_classes == 10
