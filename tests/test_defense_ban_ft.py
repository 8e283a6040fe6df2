"""``ban-ft``: fine-tuning against adversarial neuron noise (timm_purify.defenses.ban_ft)."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from torch.nn.utils import parametrize

from timm_purify._train import TrainConfig, build_backdoored_model
from timm_purify.attacks import build_attack
from timm_purify.data import load_data
from timm_purify.defenses import DEFENSES, PurifyOptionError, purify
from timm_purify.defenses.ban_ft import BANFTConfig


@functools.cache
def build(arch: str, *, optimizer: str = "sgd", lr: float = 0.05):
    """A tiny BadNets model (2,000 mini images, 3 epochs; 15-30 s), cached per arguments. The
    6-pixel patch implants in three short epochs where the reference 3-pixel one does not."""
    attack = build_attack("badnets", target=3, patch_size=6, num_classes=10)
    config = TrainConfig(epochs=3, batch_size=64, lr=lr, optimizer=optimizer, weight_decay=5e-4, seed=0)
    torch.manual_seed(0)  # build_backdoored_model seeds training, not timm's weight init
    result = build_backdoored_model(
        model=arch, attack=attack, train_size=2000, config=config, device="cpu", quiet=True
    )
    return result.model.eval(), attack


@functools.cache
def eval_images():
    return load_data("fashion-mnist-mini", split="test", input_size=(3, 32, 32))


@pytest.fixture(scope="module")
def backdoored():
    return build("test_resnet")


@pytest.fixture(scope="module")
def purified(backdoored):
    model, attack = backdoored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = purify(
        model,
        "fashion-mnist-mini",
        method="ban-ft",
        clean_count=500,
        eval_data=eval_images(),
        eval_attack=attack,
        epochs=5,
        quiet=True,
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "purify modified the input model"
    return result


def test_registered_with_reference_defaults():
    spec = DEFENSES["ban-ft"]
    cfg = spec.config_cls()
    assert isinstance(cfg, BANFTConfig)
    assert (cfg.epochs, cfg.lr, cfg.momentum, cfg.weight_decay) == (25, 0.005, 0.9, 5e-4)
    assert (cfg.eps, cfg.noise_steps, cfg.noise_weight) == (0.3, 1, 0.5)


def test_lowers_asr_and_keeps_accuracy(purified):
    before, after = purified.before, purified.after
    assert before.asr > 0.8
    assert after.asr < 0.5 * before.asr, f"ASR {before.asr:.3f} -> {after.asr:.3f}"
    assert after.acc > before.acc - 0.1
    assert len(purified.history) == 5
    assert all({"loss", "loss_clean", "loss_noisy", "acc", "asr"} <= set(h) for h in purified.history)
    # the noisy loss is the larger: the noise really works against the model
    assert all(h["loss_noisy"] > h["loss_clean"] for h in purified.history)


def test_result_is_a_plain_timm_model(purified, backdoored):
    model = purified.model
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    fresh = timm.create_model("test_resnet", num_classes=10)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    x = eval_images().floats()[:16]
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-5)
    assert set(model.state_dict()) == set(backdoored[0].state_dict())


def test_every_weight_trains(purified, backdoored):
    original = backdoored[0].state_dict()
    changed = [
        k
        for k, v in purified.model.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, original[k])
    ]
    weights = [k for k, _ in purified.model.named_parameters()]
    assert set(weights) <= set(changed)


def test_same_seed_same_result(backdoored):
    model, _ = backdoored
    # bitwise on the CPU; on CUDA, cuDNN's weight-gradient kernels are not deterministic
    runs = [
        purify(
            model,
            "fashion-mnist-mini",
            method="ban-ft",
            clean_count=100,
            epochs=1,
            seed=3,
            device="cpu",
            quiet=True,
        ).model
        for _ in range(2)
    ]
    a, b = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_runs_on_a_vit():
    model, attack = build("test_vit", optimizer="adamw", lr=1e-3)
    result = purify(model, "fashion-mnist-mini", method="ban-ft", clean_count=100, epochs=1, quiet=True)
    fresh = timm.create_model("test_vit", num_classes=10, img_size=32)
    fresh.load_state_dict(result.model.state_dict(), strict=True)
    assert not torch.equal(result.model.state_dict()["norm.weight"], model.state_dict()["norm.weight"])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(eps=0), "eps must be > 0"),
        (dict(eps=1.2), "below 1"),
        (dict(noise_steps=0), "noise_steps must be > 0"),
        (dict(noise_weight=-0.5), "noise_weight"),
        (dict(epochs=0), "epochs must be > 0"),
        (dict(lr=-1.0), "lr must be > 0"),
        (dict(momentum=1.0), "momentum"),
        (dict(noise_lambda=0.5), "unknown option"),
    ],
)
def test_bad_options_raise_before_work(backdoored, options, message):
    with pytest.raises(PurifyOptionError, match=message):
        purify(backdoored[0], "fashion-mnist-mini", method="ban-ft", quiet=True, **options)
