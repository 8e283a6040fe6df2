"""Hub round trip: folding polarizers, writing purified-model folders, reading them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hub_server import HubServer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import timm_purify._save as save_module
from timm_purify import PolarizedModel, wrap_model
from timm_purify._fold import FoldError, can_fold, fold_polarizer, polarizer_affine
from timm_purify._hub import load_model
from timm_purify._save import (
    LOGIT_ATOL,
    OutputExistsError,
    SaveError,
    from_pretrained,
    save_pretrained,
)
from timm_purify._train import create_classifier

LABELS = [f"class{i}" for i in range(10)]


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_classifier("resnet18", num_classes=10, img_size=32, label_names=LABELS).eval()


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return create_classifier(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2, label_names=LABELS
    ).eval()


def _train_polarizer(wrapped: PolarizedModel, steps: int = 3) -> PolarizedModel:
    """A few SGD steps (batch norm in train mode): a dense map with a non-zero offset, not the
    identity a fresh polarizer is."""
    generator = torch.Generator().manual_seed(1)
    wrapped.train()
    opt = torch.optim.SGD(wrapped.polarizer.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        loss = F.cross_entropy(wrapped(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return wrapped.eval()


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _vanilla(folder: Path) -> nn.Module:
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ---------------------------------------------------------------------------------------
# folding
# ---------------------------------------------------------------------------------------
def test_fold_vit_mlp_is_exact_and_leaves_the_input_alone(x: torch.Tensor) -> None:
    wrapped = _train_polarizer(wrap_model(_vit()))
    A, b = polarizer_affine(wrapped.polarizer, shape=wrapped.spot.shape)
    assert (
        float(b.abs().max()) > 1e-3 and float((A - torch.eye(A.shape[0], dtype=A.dtype)).abs().max()) > 1e-3
    )
    ok, reason = can_fold(wrapped)
    assert ok and "blocks.1.mlp.fc1" in reason
    before_base, before_pol = _state(wrapped.base), _state(wrapped.polarizer)
    expected = _logits(wrapped, x)
    folded = fold_polarizer(wrapped)
    assert not isinstance(folded, PolarizedModel) and folded is not wrapped.base
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in folded.modules())
    assert {k: v.shape for k, v in folded.state_dict().items()} == {
        k: v.shape for k, v in before_base.items()
    }
    changed = [k for k, v in folded.state_dict().items() if not torch.equal(v, before_base[k])]
    assert sorted(changed) == ["blocks.1.mlp.fc1.bias", "blocks.1.mlp.fc1.weight"]
    torch.testing.assert_close(_logits(folded, x), expected, rtol=0, atol=1e-5)
    # the input wrapper is untouched and still polarizes
    for k, v in _state(wrapped.base).items():
        assert torch.equal(v, before_base[k]), k
    for k, v in _state(wrapped.polarizer).items():
        assert torch.equal(v, before_pol[k]), k
    torch.testing.assert_close(_logits(wrapped, x), expected, rtol=0, atol=0)


def test_padded_conv_without_bias_is_not_foldable_once_trained(x: torch.Tensor) -> None:
    wrapped = _train_polarizer(wrap_model(_resnet()))
    ok, reason = can_fold(wrapped)
    assert not ok
    assert "zero-pads" in reason and "no bias" in reason and "layer4.1.conv1" in reason
    with pytest.raises(FoldError, match="zero-pads"):
        fold_polarizer(wrapped)


def test_padded_conv_folds_exactly_when_the_offset_is_zero(x: torch.Tensor) -> None:
    """A dense channel map without offset commutes with zero padding: the 3x3 path is exact."""
    wrapped = wrap_model(_resnet())
    with torch.no_grad():
        proj = wrapped.polarizer.proj.weight
        proj.copy_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(3)) / proj.shape[0] ** 0.5)
        wrapped.polarizer.norm.weight.uniform_(0.5, 1.5)
    ok, reason = can_fold(wrapped)
    assert ok, reason
    torch.testing.assert_close(_logits(fold_polarizer(wrapped), x), _logits(wrapped, x), rtol=0, atol=1e-5)


def test_one_by_one_conv_with_bias_folds_the_offset(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = create_classifier("mobilenetv3_small_100", num_classes=10, img_size=32).eval()
    wrapped = _train_polarizer(wrap_model(model, layer="conv_head"))
    ok, reason = can_fold(wrapped)
    assert ok, reason
    folded = fold_polarizer(wrapped)
    torch.testing.assert_close(_logits(folded, x), _logits(wrapped, x), rtol=0, atol=1e-5)
    assert not torch.equal(folded.conv_head.bias, model.conv_head.bias)


def test_unfoldable_kinds_and_spots() -> None:
    # stage output: feeds everything after it
    ok, reason = can_fold(wrap_model(_resnet(), layer="layer4:output"))
    assert not ok and "output of layer4" in reason
    # class-conditional polarizers depend on the prediction
    import timm_purify.polarizers.cnpd  # noqa: F401 - registers the CNPD kinds

    ok, reason = can_fold(wrap_model(_vit(), polarizer="cnpd-r", num_classes=10))
    assert not ok and "conditional" in reason and "two forward passes" in reason
    # prefix tokens skipped by the polarizer but seen by the Linear
    ok, reason = can_fold(wrap_model(_vit(), include_prefix=False))
    assert not ok and "class/register tokens" in reason
    # a depthwise conv absorbs only a channel-wise (diagonal) map
    torch.manual_seed(0)
    convnext = create_classifier("test_convnext", num_classes=10, img_size=32).eval()
    wrapped = wrap_model(convnext)
    target = dict(convnext.named_modules())[wrapped.spot.name]
    assert isinstance(target, nn.Conv2d) and target.groups == target.in_channels > 1
    with torch.no_grad():
        wrapped.polarizer.proj.weight.add_(0.1)
    ok, reason = can_fold(wrapped)
    assert not ok and "grouped" in reason
    with torch.no_grad():
        n = wrapped.polarizer.channels
        wrapped.polarizer.proj.weight.copy_(torch.diag(torch.linspace(0.5, 1.5, n)).view(n, n, 1, 1))
    ok, reason = can_fold(wrapped)
    assert ok, reason
    probe = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        _logits(fold_polarizer(wrapped), probe), _logits(wrapped, probe), rtol=0, atol=1e-5
    )


# ---------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------
def _metadata(folder: Path) -> dict[str, str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        return fh.metadata()


def test_plain_model_round_trip(tmp_path: Path, x: torch.Tensor) -> None:
    model = _resnet()
    out = save_pretrained(model, tmp_path / "plain", command="python make.py")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "purify_result.json",
    ]
    expected = _logits(model, x)
    torch.testing.assert_close(_logits(_vanilla(out), x), expected, rtol=0, atol=0)
    loaded = from_pretrained(out)
    assert not isinstance(loaded, PolarizedModel)
    torch.testing.assert_close(_logits(loaded, x), expected, rtol=0, atol=0)
    meta = _metadata(out)
    assert meta["library"] == "timm-purify" and meta["form"] == "plain" and meta["method"] == "none"
    assert meta["version"] == timm_purify_version() and meta["format"] == "pt"
    config = json.loads((out / "config.json").read_text())
    assert config["timm_purify"]["form"] == "plain" and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    record = json.loads((out / "purify_result.json").read_text())
    assert record["form"] == "plain" and record["command"] == "python make.py" and record["result"] is None
    assert record["fold"]["reload_max_logit_diff"] == 0.0
    assert "python make.py" in (out / "README.md").read_text()


def timm_purify_version() -> str:
    from timm_purify import __version__

    return __version__


def test_foldable_polarizer_becomes_a_vanilla_timm_model(tmp_path: Path, x: torch.Tensor) -> None:
    wrapped = _train_polarizer(wrap_model(_vit()))
    expected = _logits(wrapped, x)
    base_keys = set(wrapped.base.state_dict())
    out = save_pretrained(wrapped, tmp_path / "vit", base_model="org/vit-badnets")
    names = {p.name for p in out.iterdir()}
    assert "polarizer.safetensors" not in names and "polarizer_config.json" not in names
    vanilla = _vanilla(out)
    assert set(vanilla.state_dict()) == base_keys
    assert set(load_file(str(out / "model.safetensors"))) == base_keys
    diff = float((_logits(vanilla, x) - expected).abs().max())
    assert diff <= LOGIT_ATOL
    # not the unpurified base: the fold changed the function
    with wrapped.polarizer_disabled():
        assert float((_logits(wrapped, x) - expected).abs().max()) > 1e-3
    meta = _metadata(out)
    assert meta["form"] == "folded" and meta["base_model"] == "org/vit-badnets"
    record = json.loads((out / "purify_result.json").read_text())
    assert record["fold"]["folded"] and record["fold"]["merge_max_logit_diff"] <= LOGIT_ATOL
    card = (out / "README.md").read_text()
    assert "base_model: org/vit-badnets" in card and "timm.create_model(" in card
    # merge=False keeps the polarizer apart, on the same model
    kept = save_pretrained(wrapped, tmp_path / "vit-kept", merge=False)
    assert (kept / "polarizer.safetensors").is_file()
    torch.testing.assert_close(_logits(from_pretrained(kept), x), expected, rtol=0, atol=1e-6)


def test_unfoldable_polarizer_is_saved_beside_the_base(tmp_path: Path, x: torch.Tensor) -> None:
    wrapped = _train_polarizer(wrap_model(_resnet()))
    expected = _logits(wrapped, x)
    with pytest.raises(SaveError, match="cannot merge the polarizer.*zero-pads"):
        save_pretrained(wrapped, tmp_path / "forced", merge=True)
    assert not (tmp_path / "forced").exists() and not _leftovers(tmp_path, "forced")

    out = save_pretrained(wrapped, tmp_path / "r18")
    assert {"polarizer.safetensors", "polarizer_config.json", "model.safetensors", "config.json"} <= {
        p.name for p in out.iterdir()
    }
    # vanilla timm sees only the base model (the card warns about exactly this)
    with wrapped.polarizer_disabled():
        base_logits = _logits(wrapped, x)
    torch.testing.assert_close(_logits(_vanilla(out), x), base_logits, rtol=0, atol=0)
    loaded = from_pretrained(out)
    assert isinstance(loaded, PolarizedModel) and loaded.spot == wrapped.spot
    torch.testing.assert_close(_logits(loaded, x), expected, rtol=0, atol=0)
    assert _metadata(out)["form"] == "polarizer"
    card = (out / "README.md").read_text()
    assert "timm_purify.from_pretrained(" in card and "**Warning:**" in card and "zero-pads" in card


def test_masks_are_merged_into_plain_keys(tmp_path: Path, x: torch.Tensor) -> None:
    from timm_purify.defenses._common import attach_masks

    model = _resnet()
    keys = set(model.state_dict())
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-2:]
    masks = attach_masks(convs, per_channel=True)
    with torch.no_grad():
        for m in masks:
            m.uniform_(0.0, 1.0)
    expected = _logits(model, x)
    with pytest.raises(SaveError, match="parametrizations"):
        save_pretrained(model, tmp_path / "unmerged", merge=False)
    out = save_pretrained(model, tmp_path / "merged")
    vanilla = _vanilla(out)
    assert set(vanilla.state_dict()) == keys
    torch.testing.assert_close(_logits(vanilla, x), expected, rtol=0, atol=1e-5)
    # the input model keeps its masks and still runs (the copy's merge must not touch the
    # Parametrized* classes it shares with the original)
    assert any(m.__class__.__name__.startswith("Parametrized") for m in model.modules())
    torch.testing.assert_close(_logits(model, x), expected, rtol=0, atol=0)


def test_refuses_existing_and_source_folders(tmp_path: Path) -> None:
    model = _resnet()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        save_pretrained(model, busy)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    # an existing empty folder is fine
    (tmp_path / "empty").mkdir()
    assert (save_pretrained(model, tmp_path / "empty") / "model.safetensors").is_file()
    # never into (or under) the folder the model came from
    source = save_pretrained(model, tmp_path / "source")
    reloaded = load_model(str(source))
    for target in (source / "purified", source / "a" / "b"):
        with pytest.raises(OutputExistsError, match="loaded from"):
            save_pretrained(reloaded, target)
    assert sorted(p.name for p in source.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "purify_result.json",
    ]
    assert not _leftovers(tmp_path, "busy") and not _leftovers(source, "purified")


def test_an_inexact_merge_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped = _train_polarizer(wrap_model(_vit()))
    real_fold = save_module.fold_polarizer

    def sloppy_fold(w):
        folded = real_fold(w)
        with torch.no_grad():
            folded.blocks[1].mlp.fc1.bias.add_(1e-2)
        return folded

    monkeypatch.setattr(save_module, "fold_polarizer", sloppy_fold)
    with pytest.raises(SaveError, match="differ from the polarized model"):
        save_pretrained(wrapped, tmp_path / "out", merge="auto")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_a_folder_that_does_not_reload_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reload check catches a corrupted write (here: weights altered after writing)."""
    real_write = save_module._write_weights

    def corrupting_write(model, folder, **kwargs):
        real_write(model, folder, **kwargs)
        tensors = load_file(str(folder / "model.safetensors"))
        tensors["fc.bias"] = tensors["fc.bias"] + 1.0
        save_file(tensors, str(folder / "model.safetensors"))

    monkeypatch.setattr(save_module, "_write_weights", corrupting_write)
    with pytest.raises(SaveError, match="does not reproduce"):
        save_pretrained(_resnet(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_bad_arguments() -> None:
    with pytest.raises(SaveError, match="merge must be"):
        save_pretrained(_resnet(), "/nonexistent/never", merge="maybe")
    with pytest.raises(SaveError, match="PurifyResult or a torch model"):
        save_pretrained({"not": "a model"}, "/nonexistent/never")
    wrapped = wrap_model(_resnet())
    with pytest.raises(SaveError, match="polarizer hook"):
        save_pretrained(wrapped.base, "/nonexistent/never")
    with pytest.raises(ValueError, match="architecture name"):
        from_pretrained("resnet18")


def test_npd_result_round_trip(tmp_path: Path, x: torch.Tensor) -> None:
    """A real PurifyResult: npd on a tiny ViT (foldable spot), evaluated before and after."""
    from timm_purify.attacks import build_attack
    from timm_purify.data import load_data
    from timm_purify.defenses import DEFENSES, purify

    if "npd" not in DEFENSES:
        pytest.fail("the npd method is not registered")
    model = _vit()
    test = load_data("fashion-mnist-mini", split="test", model=model)
    test = test.subset(torch.arange(0, len(test), 10))
    attack = build_attack("badnets", num_classes=10)
    result = purify(
        model,
        "fashion-mnist-mini",
        method="npd",
        clean_count=60,
        eval_data=test,
        eval_attack=attack,
        quiet=True,
        epochs=1,
        warmup_epochs=1,
        batch_size=32,
    )
    assert isinstance(result.model, PolarizedModel)
    out = save_pretrained(result, tmp_path / "npd", command="timm-purify purify ...")
    torch.testing.assert_close(_logits(_vanilla(out), x), _logits(result.model, x), rtol=0, atol=LOGIT_ATOL)
    record = json.loads((out / "purify_result.json").read_text())
    assert record["form"] == "folded" and record["result"]["method"] == "npd"
    assert record["result"]["num_clean"] == 60 and record["result"]["config"]["epochs"] == 1
    assert record["evaluations"]["badnets"]["after"]["asr"] == result.after.asr
    assert _metadata(out)["method"] == "npd"
    assert (out / "purification_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    values = {(r.metric_type, r.dataset_config): r.metric_value for r in card.data.eval_results}
    assert values[("attack_success_rate", "badnets")] == round(100 * result.after.asr, 2)
    assert values[("accuracy", None)] == round(100 * result.after.acc, 2)


def test_hub_round_trip_of_a_polarizer_folder(tmp_path: Path, x: torch.Tensor, hub_server: HubServer) -> None:
    from timm_purify._hub import ModelNotFoundError, push_to_hub

    wrapped = _train_polarizer(wrap_model(_resnet()))
    out = save_pretrained(wrapped, tmp_path / "r18", repo_id="purify-tests/r18-npd")
    push_to_hub(out, "purify-tests/r18-npd", endpoint=hub_server.endpoint)
    files = hub_server.resolve("purify-tests/r18-npd").files
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "polarizer.safetensors",
        "polarizer_config.json",
    } <= set(files)
    assert 'timm_purify.from_pretrained("purify-tests/r18-npd")' in files["README.md"].decode()
    cache = tmp_path / "cache"
    loaded = from_pretrained("purify-tests/r18-npd", endpoint=hub_server.endpoint, cache_dir=cache)
    assert isinstance(loaded, PolarizedModel)
    assert loaded.base.pretrained_cfg["hf_hub_id"] == "purify-tests/r18-npd"
    torch.testing.assert_close(_logits(loaded, x), _logits(wrapped, x), rtol=0, atol=0)
    snapshot = next(cache.glob("models--purify-tests--r18-npd/snapshots/*"))
    assert (snapshot / "polarizer_config.json").is_file() and (snapshot / "purify_result.json").is_file()
    assert not list(snapshot.glob("*.png"))  # figures are for the Hub page, not for loading
    with pytest.raises(ModelNotFoundError, match="was not found"):
        from_pretrained("purify-tests/nothing-here", endpoint=hub_server.endpoint, cache_dir=cache)
