"""AWM: element-wise soft weight masks against a recovered universal trigger (timm_purify.defenses.awm)."""

from __future__ import annotations

import pytest
import timm
import torch
from test_defense_nft import (
    _Counting,
    assert_merged_is_plain_timm,
    assert_originals_untouched,
    backdoored,
    eval_images,
    state,
)
from torch import nn

from timm_purify.data import ImageData
from timm_purify.defenses import PurifyOptionError, PurifyResult, purify
from timm_purify.defenses._common import universal_perturbation, weight_layers
from timm_purify.defenses.awm import AWMConfig, _choose_window, random_resized_crop, with_augmented_copies


def toy_data(n: int, num_classes: int = 10) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return ImageData(x, torch.arange(n) % num_classes, [f"c{i}" for i in range(num_classes)], "toy")


def test_few_shot_mode_is_automatic_and_overridable():
    c = AWMConfig()
    one_shot = c.resolved(num_clean=10, num_classes=10)
    assert one_shot == {"few_shot": True, "alpha": 0.99, "trigger_norm": 100.0, "augment_copies": 9}
    many = c.resolved(num_clean=250, num_classes=10)
    assert many == {"few_shot": False, "alpha": 0.9, "trigger_norm": 1000.0, "augment_copies": 0}
    forced = AWMConfig(few_shot=False, alpha=0.5).resolved(num_clean=10, num_classes=10)
    assert forced == {"few_shot": False, "alpha": 0.5, "trigger_norm": 1000.0, "augment_copies": 0}
    # a shaped trigger has a clean-loss weight of its own per shape (in few-shot mode too) unless
    # alpha is given: the window weighs the two losses equally, the blend keeps more clean loss
    for trigger, weight in (("window", 0.5), ("blend", 0.7)):
        for num_clean in (10, 250):
            assert AWMConfig(trigger=trigger).resolved(num_clean=num_clean, num_classes=10)["alpha"] == weight
        assert AWMConfig(trigger=trigger, alpha=0.8).resolved(num_clean=10, num_classes=10)["alpha"] == 0.8


def test_augmented_copies_keep_labels_and_originals():
    data = toy_data(10)
    out = with_augmented_copies(data, 9, generator=torch.Generator().manual_seed(0))
    assert len(out) == 100 and out.x.dtype == torch.uint8
    assert torch.equal(out.x[:10], data.x)
    assert torch.equal(torch.bincount(out.y), torch.full((10,), 10))
    assert torch.equal(out.y[10:].view(9, 10), data.y.repeat(9, 1))
    assert not torch.equal(out.x[10:20], data.x)  # the copies are actually transformed
    assert with_augmented_copies(data, 0, generator=torch.Generator()) is data


def test_random_resized_crop_identity_and_range():
    x = torch.rand(4, 3, 16, 16)
    same = random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(same, x, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    out = random_resized_crop(x, generator=g)
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    flipped = random_resized_crop(
        x, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0)
    )
    for a, b in zip(flipped, x, strict=True):
        assert torch.allclose(a, b, atol=1e-5) or torch.allclose(a, b.flip(-1), atol=1e-5)


def awm_on_backdoored_resnet(**options: object) -> tuple[nn.Module, PurifyResult]:
    """AWM on the tiny BadNets resnet18 with 200 clean images, evaluated; checks that the
    caller's model is left untouched and returns it with the result."""
    model, attack = backdoored("resnet18")
    before_input = state(model)
    result = purify(
        model,
        "fashion-mnist-mini",
        method="awm",
        clean_count=200,
        eval_data=eval_images(),
        eval_attack=attack,
        quiet=True,
        inner_steps=5,
        batch_size=64,
        **options,
    )
    assert all(torch.equal(before_input[k], v) for k, v in state(model).items())  # input untouched
    return model, result


@pytest.mark.slow
def test_awm_cnn_lowers_asr_masks_convs_only_and_merges():
    model, result = awm_on_backdoored_resnet(outer_steps=8)
    before_input = state(model)
    assert result.before.asr > 0.8
    # 8 short outer iterations: drops of 21-24 points seen across runs
    assert result.after.asr < result.before.asr - 0.15, (result.before, result.after)
    assert result.after.acc > 0.5
    assert len(result.history) == 8 and all("asr" in r for r in result.history)
    # merged: same keys; masked weights are shrunk element-wise (|w'| <= |w|, same sign);
    # the head, norm layers, biases and buffers are exactly the input's
    masked = {f"{name}.weight" for name, _ in weight_layers(model, include_head=False)}
    assert masked and "fc.weight" not in masked
    purified = state(result.model)
    assert purified.keys() == before_input.keys()
    moved = 0
    for key, value in purified.items():
        orig = before_input[key]
        if key in masked:
            assert bool((value.abs() <= orig.abs() + 1e-6).all()) and bool((value * orig >= 0).all()), key
            moved += int(not torch.equal(value, orig))
        else:
            assert torch.equal(value, orig), f"{key} should not change"
    assert moved > 0
    assert_merged_is_plain_timm(result.model, "resnet18", model)


@pytest.mark.slow
def test_awm_vit_one_shot_masks_linear_layers_without_merge():
    model, _ = backdoored("vit")
    result = purify(
        model,
        "fashion-mnist-mini",
        method="awm",
        clean_count=10,  # one image per class: few-shot mode with 9 augmented copies each
        quiet=True,
        outer_steps=2,
        inner_steps=2,
        batch_size=32,
        merge=False,
    )
    out = result.model
    masks = {k: v for k, v in out.named_parameters() if k.endswith(".mask")}
    expected = weight_layers(model, include_head=False)
    assert any(isinstance(m, nn.Linear) for _, m in expected)  # qkv, proj, mlp
    assert {f"{n}.parametrizations.weight.0.mask" for n, _ in expected} == set(masks)
    for name, layer in expected:
        m = masks[f"{name}.parametrizations.weight.0.mask"]
        assert m.shape == layer.weight.shape
        assert bool((m >= 0).all() and (m <= 1).all())
    assert any(not torch.allclose(m, torch.ones_like(m)) for m in masks.values())
    assert "head.weight" in out.state_dict()  # the head is left alone
    assert_originals_untouched(out, model)
    assert result.history[0]["few_shot"] is True and result.history[0]["alpha"] == 0.99
    with torch.no_grad():
        assert out(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_awm_window_trigger_finds_the_patch_and_lowers_asr():
    """The shaped trigger: the window chosen is one where a pasted pattern fires the BadNets
    backdoor, and masking against that pattern lowers the ASR, masks only."""
    # window_stride 8: 16 windows instead of 49, the patch lies whole in the last one
    model, result = awm_on_backdoored_resnet(trigger="window", window_stride=8, outer_steps=4)
    first, last = result.history[0], result.history[-1]
    assert first["trigger"] == "window" and first["alpha"] == 0.5 and "trigger_l1" not in first
    # the 6x6 patch sits bottom-right, but this 3-epoch model's backdoor fires from the top-left
    # corner too (patterns fitted there moved 86-87% of the clean images, 99-100% into one class;
    # every other window of the grid at most 57%): either is a trigger of it
    assert first["window"] in ([24, 24, 8], [0, 0, 8])
    assert first["trigger_moved"] > 0.5  # the pattern found there fires the backdoor
    assert last["trigger_moved"] < first["trigger_moved"]  # and stops firing as the masks learn
    assert result.before.asr > 0.8
    assert result.after.asr < result.before.asr - 0.3, (result.before, result.after)
    assert result.after.acc > 0.5
    assert_merged_is_plain_timm(result.model, "resnet18", model)


def test_the_window_chosen_is_the_one_whose_pattern_moves_most_images():
    """A bright pixel in the bottom-left window flips this model's answer; the grid search
    must choose that window, and its pattern must draw the pixel."""
    linear = nn.Linear(3 * 8 * 8, 2, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0, :] = 0.1  # class 0: overall brightness
        linear.weight[1, 2 * 64 + 7 * 8 + 1] = 50.0  # class 1: row 7, column 1 of the last channel
    f = nn.Sequential(nn.Flatten(), linear)
    pool = torch.zeros(16, 3, 8, 8)
    pool[:, :, :2, 5:] = 0.6
    assert (f(pool).argmax(1) == 0).all()
    config = AWMConfig(window=16, window_stride=16)  # at 8x8: side 4, stride 4, four windows
    apply, window = _choose_window(f, pool, config, torch.Generator().manual_seed(0))
    assert window == [4, 0, 4]
    stamped = apply(pool, torch.ones(1, 3, 8, 8))
    assert torch.equal(stamped[:, :, 4:, :4], torch.ones(16, 3, 4, 4))  # pasted inside the window
    assert torch.equal(stamped[:, :, :4], pool[:, :, :4])  # and nowhere else
    assert torch.equal(stamped[:, :, 4:, 4:], pool[:, :, 4:, 4:])


@pytest.mark.slow
def test_awm_blend_trigger_runs_and_records_what_it_found():
    model, _ = backdoored("vit")
    result = purify(
        model,
        "fashion-mnist-mini",
        method="awm",
        trigger="blend",
        clean_count=20,
        quiet=True,
        outer_steps=2,
        inner_steps=2,
        batch_size=16,
        merge=False,
    )
    for record in result.history:
        assert (
            record["trigger"] == "blend" and 0.0 <= record["trigger_moved"] <= 1.0 and record["alpha"] == 0.7
        )
        assert "window" not in record and "trigger_l1" not in record
    masks = [v for k, v in result.model.named_parameters() if k.endswith(".mask")]
    assert masks and any(not torch.allclose(m, torch.ones_like(m)) for m in masks)
    assert_originals_untouched(result.model, model)


def test_awm_window_trigger_on_non_square_images_is_refused():
    inner = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 16, 16), nn.ReLU(), nn.Linear(16, 10))
    inner.num_classes = 10
    inner.get_classifier = lambda: inner[-1]
    inner.pretrained_cfg = {"input_size": (3, 32, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    net = _Counting(inner)
    g = torch.Generator().manual_seed(0)
    data = ImageData(
        torch.randint(0, 256, (20, 3, 32, 16), generator=g, dtype=torch.uint8),
        torch.arange(20) % 10,
        [f"c{i}" for i in range(10)],
        "toy",
    )
    with pytest.raises(PurifyOptionError, match="square"):
        purify(net, data, method="awm", trigger="window", quiet=True, outer_steps=1, inner_steps=1)
    assert net.calls == 0


@pytest.mark.slow
def test_awm_same_seed_same_result_and_layer_options():
    model, _ = backdoored("vit")
    kw = dict(clean_count=20, quiet=True, outer_steps=1, inner_steps=2, batch_size=16)
    a = purify(model, "fashion-mnist-mini", method="awm", seed=5, **kw).model.state_dict()
    b = purify(model, "fashion-mnist-mini", method="awm", seed=5, **kw).model.state_dict()
    c = purify(model, "fashion-mnist-mini", method="awm", seed=6, **kw).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    conv_only = purify(model, "fashion-mnist-mini", method="awm", mask_linear=False, merge=False, **kw).model
    names = [k for k, _ in conv_only.named_parameters() if k.endswith(".mask")]
    assert names == ["patch_embed.proj.parametrizations.weight.0.mask"]
    with_head = purify(model, "fashion-mnist-mini", method="awm", mask_head=True, merge=False, **kw).model
    assert "head.parametrizations.weight.0.mask" in dict(with_head.named_parameters())


@pytest.mark.parametrize(
    "options",
    [
        {"outer_steps": 0},
        {"inner_steps": -1},
        {"trigger_lr": 0},
        {"trigger_norm": 0.0},
        {"lr": 0},
        {"lr_decay": 1.5},
        {"alpha": 2.0},
        {"gamma": -1.0},
        {"augment_copies": -1},
        {"batch_size": 0},
        {"tau": 100},
        {"trigger": "patch"},
        {"window": 0},
        {"window_stride": 0},
        {"blend_alpha": 0.0},
        {"blend_alpha": 1.0},
    ],
)
def test_awm_bad_options_fail_before_any_work(options):
    net = _Counting(timm.create_model("resnet18", pretrained=False, num_classes=10))
    with pytest.raises(PurifyOptionError):
        purify(net, toy_data(20), method="awm", quiet=True, **options)
    assert net.calls == 0


def test_awm_conv_only_on_a_model_without_convs_is_refused():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, 10))
    net.num_classes = 10
    net.get_classifier = lambda: net[-1]
    net.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    with pytest.raises(PurifyOptionError, match="mask"):
        purify(net, toy_data(10), method="awm", quiet=True, mask_linear=False, outer_steps=1, inner_steps=1)


def test_the_recovered_trigger_can_draw_on_a_black_background():
    """A bright corner pixel flips this model's answer; every image is black there. The
    trigger search must find that pixel, which a plain clamp (no gradient at exactly 0) hides."""
    linear = nn.Linear(3 * 4 * 4, 2, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0, :] = 0.1  # class 0: overall brightness
        linear.weight[1, 3 * 16 - 1] = 50.0  # class 1: the last pixel of the last channel
    f = nn.Sequential(nn.Flatten(), linear)
    x = torch.zeros(8, 3, 4, 4)
    x[:, :, :2, :2] = 0.6  # a grey object in one corner, black elsewhere
    own = f(x).argmax(1)
    assert (own == 0).all()

    def batches():
        yield x, own

    delta = universal_perturbation(
        f, batches, shape=(3, 4, 4), steps=3, lr=1.0, l1_budget=5.0, device=x.device
    )
    assert float(delta[2, 3, 3]) > 0.5  # drawn on the black background
    assert (f((x + delta).clamp(0.0, 1.0)).argmax(1) == 1).all()
