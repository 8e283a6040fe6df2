"""CNPD: class-conditional polarizers (identity at init, every layout, save/load) and the defences."""

from __future__ import annotations

import copy

import pytest
import torch
from test_defense_npd import CNN_LAYER, DATA, backdoored_resnet, tiny_vit

from timm_purify import PolarizedModel, load_polarizer, save_polarizer, wrap_model
from timm_purify.defenses import PurifyOptionError, purify
from timm_purify.defenses.cnpd import CNPDAttentionConfig, CNPDConfig
from timm_purify.polarizers import build_polarizer
from timm_purify.polarizers.cnpd import ReplicaPolarizer, class_matmul
from timm_purify.polarizers.npd import NeuralPolarizer

KINDS = ("cnpd-r", "cnpd-e", "cnpd-a")
SHAPES = {"NCHW": (6, 8, 3, 2), "NHWC": (6, 3, 2, 8), "NLC": (6, 5, 8), "NC": (6, 8)}
LABELS = torch.tensor([0, 1, 2, 3, 0, 2])


@pytest.fixture(scope="session")
def resnet():
    return backdoored_resnet()[0]


@pytest.fixture(scope="session")
def vit():
    return tiny_vit()


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter and batch-norm buffer away from its identity value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen) * 0.2
                t.copy_((t + noise).abs() if "var" in name else t + noise)


# -- the polarizer modules -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", list(SHAPES))
def test_identity_at_init_in_every_layout_and_trainable(kind, layout):
    pol = build_polarizer(kind, 8, layout, num_classes=4, prefix_tokens=1 if layout == "NLC" else 0)
    assert pol.conditional and pol.kind == kind
    x = torch.randn(SHAPES[layout])
    pol.eval()
    pol.set_condition(LABELS)
    assert torch.equal(pol(x), x)
    pol.train()
    out = pol(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pol.parameters())


def _channel_scaled(layout: str, seed: int = 0) -> torch.Tensor:
    """Features whose channels have clearly different means and spreads (not 0 and 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPES[layout], generator=gen)
    scale, shift = torch.linspace(0.5, 4.0, 8), torch.linspace(-3.0, 6.0, 8)
    view = (1, 8, 1, 1) if layout == "NCHW" else (8,)
    return x * scale.view(view) + shift.view(view)


@pytest.mark.parametrize("kind", ("npd", *KINDS))
@pytest.mark.parametrize("layout", list(SHAPES))
def test_matched_statistics_keep_the_identity_in_train_mode(kind, layout):
    options = {"prefix_tokens": 1 if layout == "NLC" else 0}
    if kind != "npd":
        options["num_classes"] = 4
    x = _channel_scaled(layout)
    reference = build_polarizer(kind, 8, layout, **options)  # unit statistics
    matched = build_polarizer(kind, 8, layout, **options)
    rows = matched.channel_rows(x)
    assert rows.shape == (x.numel() // 8, 8)
    matched.match_statistics_(rows.mean(0), rows.var(0, unbiased=False))
    for pol in (reference, matched):
        pol.set_condition(LABELS)
    matched.eval()
    assert torch.allclose(matched(x), x, atol=1e-5)
    matched.train()  # a batch with exactly the matched moments goes through unchanged
    assert torch.allclose(matched(x), x, atol=1e-4)
    reference.train()  # whereas unit statistics standardise it
    assert not torch.allclose(reference(x), x, atol=0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_condition_is_required(kind):
    pol = build_polarizer(kind, 8, "NC", num_classes=4).eval()
    with pytest.raises(RuntimeError, match="set_condition"):
        pol(torch.randn(3, 8))
    pol.set_condition(torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="batch of 3"):
        pol(torch.randn(3, 8))
    with pytest.raises(ValueError, match="num_classes"):
        build_polarizer(kind, 8, "NC")


@pytest.mark.parametrize("layout", list(SHAPES))
def test_replicas_match_one_npd_polarizer_per_class(layout):
    """Sample i must go through the NPD polarizer of class labels[i], in eval mode."""
    pol = ReplicaPolarizer(8, layout, num_classes=4)
    _randomise(pol)
    pol.eval().set_condition(LABELS)
    x = torch.randn(SHAPES[layout])
    out = pol(x)
    for k in range(4):
        ref = NeuralPolarizer(8, layout).eval()
        with torch.no_grad():
            ref.proj.weight.copy_(pol.weight[k].view_as(ref.proj.weight))
            ref.norm.weight.copy_(pol.norm_weight[k])
            ref.norm.bias.copy_(pol.norm_bias[k])
            ref.norm.running_mean.copy_(pol.norm.running_mean)
            ref.norm.running_var.copy_(pol.norm.running_var)
        rows = k == LABELS
        if rows.any():
            assert torch.allclose(out[rows], ref(x[rows]), atol=1e-5), k


def test_replica_batch_norm_statistics_are_shared_in_train_mode():
    pol = ReplicaPolarizer(8, "NC", num_classes=4).train()
    pol.set_condition(LABELS)
    x = torch.randn(6, 8) * 3 + 1
    pol(x)
    expected = 0.1 * x.mean(0)  # one BN momentum step from zero, over every sample
    assert torch.allclose(pol.norm.running_mean, expected, atol=1e-6)


def test_both_class_matmul_strategies_agree():
    gen = torch.Generator().manual_seed(0)
    z, w = torch.randn(5, 3, 8, generator=gen), torch.randn(4, 8, 8, generator=gen)
    labels = torch.tensor([0, 3, 1, 1, 2])
    expected = torch.stack([z[i] @ w[labels[i]].T for i in range(5)])
    for strategy in ("gather", "all", None):
        assert torch.allclose(class_matmul(z, w, labels, strategy=strategy), expected, atol=1e-5)
        first = class_matmul(
            z.transpose(1, 2).contiguous(), w, labels, channels_first=True, strategy=strategy
        )
        assert first.is_contiguous()
        assert torch.allclose(first, expected.transpose(1, 2), atol=1e-5)


def test_attention_init_does_not_touch_the_global_generator():
    torch.manual_seed(1)
    a = build_polarizer("cnpd-a", 16, "NC", num_classes=5, attention_dim=4)
    torch.manual_seed(2)
    b = build_polarizer("cnpd-a", 16, "NC", num_classes=5, attention_dim=4)
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(t, u), name
    c = build_polarizer("cnpd-a", 16, "NC", num_classes=5, attention_dim=4, init_seed=1)
    assert not torch.equal(a.embed.weight, c.embed.weight)
    assert a.options() == {"num_classes": 5, "attention_dim": 4, "init_seed": 0}


# -- inside models ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_cnn_and_vit_spots(kind, resnet, vit):
    x = torch.rand(5, 3, 32, 32)
    for model, layer in ((resnet, "auto"), (resnet, CNN_LAYER), (resnet, "fc"), (vit, "auto")):
        base = copy.deepcopy(model).eval()
        with torch.no_grad():
            expected = base(x)
            wrapped = wrap_model(base, layer=layer, polarizer=kind, num_classes=base.num_classes)
            assert torch.equal(wrapped(x), expected), (kind, layer)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, resnet, vit, tmp_path):
    x = torch.rand(5, 3, 32, 32)
    for model, layer in ((resnet, CNN_LAYER), (vit, "auto")):
        wrapped = wrap_model(copy.deepcopy(model), layer=layer, polarizer=kind, num_classes=model.num_classes)
        _randomise(wrapped.polarizer)
        with torch.no_grad():
            expected = wrapped(x)
        folder = tmp_path / f"{kind}-{wrapped.spot.layout}"
        save_polarizer(wrapped, folder)
        loaded = load_polarizer(copy.deepcopy(model), folder)
        assert loaded.polarizer.kind == kind
        assert loaded.polarizer.options() == wrapped.polarizer.options()
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)


# -- the defences ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_cnpd_runs_end_to_end_on_a_cnn(kind, resnet):
    original = {k: v.clone() for k, v in resnet.state_dict().items()}
    result = purify(
        resnet, DATA, method=kind, clean_count=64, quiet=True, layer=CNN_LAYER, epochs=1, warmup_epochs=1
    )
    wrapped = result.model
    assert isinstance(wrapped, PolarizedModel) and wrapped.polarizer.kind == kind
    for k, v in wrapped.base.state_dict().items():
        assert torch.equal(v, original[k]), k
    fresh = build_polarizer(kind, wrapped.spot.channels, wrapped.spot.layout, **wrapped.polarizer.options())
    changed = [
        n
        for n, t in wrapped.polarizer.state_dict().items()
        if not torch.equal(t.cpu(), fresh.state_dict()[n])
    ]
    assert changed, "training left the polarizer at its initial values"
    assert [h["phase"] for h in result.history] == ["warmup", "main"]


@pytest.mark.slow
def test_cnpd_runs_end_to_end_on_a_vit(vit):
    result = purify(
        vit,
        DATA,
        method="cnpd-a",
        clean_count=40,
        quiet=True,
        epochs=1,
        warmup_epochs=1,
        target_mode="random",
    )
    assert result.model.spot.layout == "NLC"
    assert torch.isfinite(result.model(torch.rand(3, 3, 32, 32))).all()


def test_cnpd_options_are_checked():
    with pytest.raises(PurifyOptionError, match="target_mode"):
        CNPDConfig(target_mode="best").validate(num_clean=100, num_classes=10)
    with pytest.raises(PurifyOptionError, match="attention_dim"):
        CNPDAttentionConfig(attention_dim=0).validate(num_clean=100, num_classes=10)
    with pytest.raises(PurifyOptionError, match="rho"):
        CNPDConfig(rho=0).validate(num_clean=100, num_classes=10)
