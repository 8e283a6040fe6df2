"""NFT: per-channel masks on norm-layer weights, trained with MixUp (timm_purify.defenses.nft).

The tiny backdoored models are built once per process by :func:`backdoored` (also imported by
``test_defense_awm.py``) so both mask methods share them.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import timm
import torch
from torch import nn

from timm_purify._train import TrainConfig, build_backdoored_model
from timm_purify.attacks import Attack, build_attack
from timm_purify.data import ImageData, clean_subset, load_data
from timm_purify.defenses import PurifyOptionError, purify
from timm_purify.defenses._common import cutmix, mixup, norm_layers
from timm_purify.defenses.nft import NFTConfig, _mixer, depth_floors

# A 3x3 patch is not learnt in the ~50 steps a fast test affords (ASR stays ~5%): a larger
# patch and a higher poison rate plant it in 3 epochs on 2,000 images.
ATTACK_KW = dict(poison_rate=0.2, patch_size=6)
VIT_KW = dict(patch_size=8, depth=2)


@functools.cache
def backdoored(arch: str) -> tuple[nn.Module, Attack]:
    """A tiny backdoored ``resnet18`` or ViT (fashion-mnist-mini, 32x32), built once per process."""
    attack = build_attack("badnets", num_classes=10, **ATTACK_KW)
    if arch == "resnet18":
        kwargs: dict = dict(model="resnet18", config=TrainConfig(epochs=3, batch_size=64))
    else:
        kwargs = dict(
            model="vit_tiny_patch16_224",
            model_kwargs=VIT_KW,
            config=TrainConfig(epochs=3, optimizer="adamw", lr=1e-3, weight_decay=0.05),
        )
    result = build_backdoored_model(attack=attack, train_size=2000, device="cpu", quiet=True, **kwargs)
    return result.model.cpu().eval(), attack


@functools.cache
def eval_images() -> ImageData:
    """500 test images (balanced): enough to see the ASR move, cheap to evaluate each period."""
    return clean_subset(load_data("fashion-mnist-mini", split="test", input_size=(3, 32, 32)), count=500)


def fresh_copy(arch: str, model: nn.Module) -> nn.Module:
    """A plain timm model of the same architecture, as a user would create it."""
    kwargs = VIT_KW | {"img_size": 32} if arch != "resnet18" else {}
    name = "vit_tiny_patch16_224" if arch != "resnet18" else "resnet18"
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def random_images(n: int) -> ImageData:
    """``n`` random 32x32 images cycling through ten classes: enough to run a method, not to learn."""
    return ImageData(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8),
        torch.arange(n) % 10,
        list("abcdefghij"),
        "t",
    )


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_merged_is_plain_timm(merged: nn.Module, arch: str, model: nn.Module) -> None:
    """A merged result gives the user's ``requires_grad`` flags back and loads strictly into a
    plain timm model of the same architecture with the same logits (shared with AWM's tests)."""
    assert all(p.requires_grad for p in merged.parameters())
    plain = fresh_copy(arch, model)
    plain.load_state_dict(merged.state_dict(), strict=True)
    plain.eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), merged(x), atol=1e-5)


def assert_originals_untouched(unmerged: nn.Module, model: nn.Module) -> None:
    """Only the masks trained: behind each parametrization the original tensor is the input's."""
    originals = {
        k.replace(".parametrizations.weight.original", ".weight"): v for k, v in unmerged.state_dict().items()
    }
    for key, value in model.state_dict().items():
        assert torch.equal(originals[key], value), key


def test_depth_floors_reference_and_relative():
    ref = depth_floors(19, alpha=0.8, beta=0.5)
    assert ref[0] == pytest.approx(0.8 * math.exp(-0.5))
    assert ref[-1] == pytest.approx(0.8 * math.exp(-9.5))
    assert all(a > b for a, b in zip(ref, ref[1:], strict=False))
    # relative depth spans the reference's range whatever the number of layers ...
    deep = depth_floors(53, alpha=0.8, beta=0.5, depth="relative")
    assert deep[0] == pytest.approx(ref[0]) and deep[-1] == pytest.approx(ref[-1])
    # ... and is the reference on the reference's 19 layers
    assert depth_floors(19, alpha=0.8, beta=0.5, depth="relative") == pytest.approx(ref)
    with pytest.raises(ValueError):
        depth_floors(3, alpha=0.8, beta=0.5, depth="block")


@pytest.mark.slow
def test_nft_cnn_lowers_asr_trains_only_masks_and_merges():
    model, attack = backdoored("resnet18")
    before_input = state(model)
    result = purify(
        model,
        "fashion-mnist-mini",
        method="nft",
        clean_count=200,
        eval_data=eval_images(),
        eval_attack=attack,
        quiet=True,
        # 40 batches instead of 1000: a 10x higher learning rate moves the masks as far
        iterations=40,
        lr_period=20,
        lr=0.5,
        lr_min=0.2,
        batch_size=64,
    )
    # the user's model is untouched
    after_input = state(model)
    assert all(torch.equal(before_input[k], after_input[k]) for k in before_input)
    # the backdoor is weakened while the model still classifies
    assert result.before.asr > 0.8
    assert result.after.asr < result.before.asr - 0.2, (result.before, result.after)
    assert result.after.acc > 0.5
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert [r["lr"] for r in result.history] == pytest.approx([0.5, 0.35])  # cosine, one step per period
    assert all("asr" in r for r in result.history)
    # merged: same keys; only norm weights changed, each channel scaled by a mask in [mu(l), 1]
    purified = state(result.model)
    assert purified.keys() == before_input.keys()
    masked = [name for name, _ in norm_layers(model, skip_stem=True)]
    floors = dict(zip(masked, depth_floors(len(masked), alpha=0.8, beta=0.5), strict=True))
    changed = set()
    for key, value in purified.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # train mode: BN statistics follow the clean data, as in the reference
        layer, _, param = key.rpartition(".")
        if layer in floors and param == "weight":
            orig = before_input[key]
            ok = orig.abs() > 1e-6
            ratio = value[ok] / orig[ok]
            assert bool((ratio >= floors[layer] - 1e-5).all() and (ratio <= 1 + 1e-5).all()), key
            if not torch.allclose(value, orig):
                changed.add(layer)
        else:
            assert torch.equal(value, before_input[key]), f"{key} should not change"
    assert changed, "no mask moved"
    assert_merged_is_plain_timm(result.model, "resnet18", model)


@pytest.mark.slow
def test_nft_vit_one_shot_without_merge_exposes_masks():
    model, _ = backdoored("vit")
    result = purify(
        model,
        "fashion-mnist-mini",
        method="nft",
        clean_count=10,  # one image per class
        quiet=True,
        iterations=8,
        lr_period=4,
        batch_size=32,
        merge=False,
    )
    out = result.model
    norms = norm_layers(model, skip_stem=True)
    assert len(norms) == 2 * VIT_KW["depth"]  # norm1/norm2 per block + final norm, stem (first) excluded
    masks = {k: v for k, v in out.named_parameters() if k.endswith(".mask")}
    assert len(masks) == len(norms)
    floors = depth_floors(len(norms), alpha=0.8, beta=0.5)
    for (name, layer), floor in zip(norms, floors, strict=True):
        m = masks[f"{name}.parametrizations.weight.0.mask"]
        assert m.shape == layer.weight.shape  # LayerNorm: one mask per normalised feature
        assert bool((m >= floor - 1e-6).all() and (m <= 1).all())
    assert any(not torch.allclose(m, torch.ones_like(m)) for m in masks.values())
    assert_originals_untouched(out, model)
    # the model still runs and is trainable only where the user's flags say
    with torch.no_grad():
        assert out(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_nft_same_seed_same_result_and_stem_option():
    model, _ = backdoored("vit")
    kw = dict(clean_count=20, quiet=True, iterations=3, batch_size=16)
    a = purify(model, "fashion-mnist-mini", method="nft", seed=3, **kw).model.state_dict()
    b = purify(model, "fashion-mnist-mini", method="nft", seed=3, **kw).model.state_dict()
    c = purify(model, "fashion-mnist-mini", method="nft", seed=4, **kw).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    with_stem = purify(model, "fashion-mnist-mini", method="nft", include_stem=True, merge=False, **kw).model
    n_masks = sum(1 for k, _ in with_stem.named_parameters() if k.endswith(".mask"))
    assert n_masks == len(norm_layers(model))


@pytest.mark.parametrize("norm_stats", ["train", "frozen"])
def test_nft_norm_stats_option(norm_stats):
    """``frozen`` keeps every BatchNorm's running statistics as trained; ``train`` (the reference)
    lets the clean batches move them."""
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    data = random_images(20)
    before = state(net)
    out = purify(net, data, method="nft", quiet=True, iterations=3, batch_size=8, norm_stats=norm_stats).model
    after = state(out)
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    moved = [k for k in stats if not torch.equal(before[k], after[k])]
    assert stats and (moved == [] if norm_stats == "frozen" else len(moved) == len(stats))


@pytest.mark.parametrize("anywhere", [False, True])
def test_cutmix_pastes_one_box_from_the_partner_and_reports_the_kept_share(anywhere):
    # image i is the constant i, so every pixel says which image it came from
    b, h, w = 16, 32, 32
    x = torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 3, h, w).clone()
    y = torch.arange(b)
    boxes = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        mixed, y_a, y_b, lam = cutmix(x, y, alpha=1.0, generator=g, anywhere=anywhere)
        assert torch.equal(y_a, y)
        from_partner = mixed != x  # the partner of image i is image y_b[i]
        partner = y_b.float()[:, None, None, None].expand_as(x)
        assert torch.equal(mixed[from_partner], partner[from_partner])
        # one box, the same for every image and channel, and lam is the share kept
        box = from_partner[y_b != y][:, 0]
        assert bool((box == box[0]).all())
        rows, cols = box[0].any(1).nonzero().flatten(), box[0].any(0).nonzero().flatten()
        assert int(box[0].sum()) == len(rows) * len(cols)  # a rectangle
        assert lam == pytest.approx(1.0 - float(box[0].float().mean()))
        if len(rows):
            boxes.add((int(rows[0]), int(cols[0]), len(rows), len(cols)))
    assert len(boxes) > 10  # size and place change with the draw
    # seeded: the same generator state gives the same mix
    a = cutmix(x, y, generator=torch.Generator().manual_seed(1), anywhere=anywhere)
    c = cutmix(x, y, generator=torch.Generator().manual_seed(1), anywhere=anywhere)
    assert torch.equal(a[0], c[0]) and a[3] == c[3]


def test_cutpaste_takes_the_box_from_another_place_of_the_partner():
    # a partner with one bright pixel: CutMix proper can paste it only where it was,
    # anywhere=True carries it elsewhere
    x = torch.zeros(2, 1, 32, 32)
    x[1, 0, 16, 16] = 1.0
    y = torch.tensor([0, 1])
    places = set()
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        for anywhere in (False, True):
            mixed = cutmix(x, y, generator=g, anywhere=anywhere)[0][0, 0]
            if mixed.sum() > 0:
                places.add((anywhere, tuple(mixed.nonzero()[0].tolist())))
    assert {p for a, p in places if not a} == {(16, 16)}
    assert len({p for a, p in places if a}) > 5


def test_nft_mix_option_names_the_mixing():
    assert _mixer("mixup") is mixup
    x = torch.rand(8, 3, 16, 16)
    y = torch.arange(8)
    for mix, anywhere in (("cutmix", False), ("cutpaste", True)):
        got = _mixer(mix)(x, y, alpha=1.0, generator=torch.Generator().manual_seed(0))
        want = cutmix(x, y, alpha=1.0, generator=torch.Generator().manual_seed(0), anywhere=anywhere)
        assert torch.equal(got[0], want[0]) and got[3] == want[3]


@pytest.mark.parametrize("mix", ["cutmix", "cutpaste"])
def test_nft_runs_with_cutmix(mix):
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    data = random_images(20)
    result = purify(net, data, method="nft", quiet=True, iterations=4, batch_size=8, lr=0.5, mix=mix)
    assert result.config["mix"] == mix
    before, after = state(net), state(result.model)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".weight"))


class _Counting(nn.Module):
    """Wraps a classifier and counts forward passes (to prove no work happened)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.num_classes = inner.num_classes
        self.pretrained_cfg = inner.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.inner.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize(
    "options",
    [
        {"iterations": 0},
        {"lr": -0.1},
        {"alpha": 1.5},
        {"beta": -1.0},
        {"depth": "block"},
        {"norm_stats": "eval"},
        {"mix": "cutout"},
        {"lr_min": 0.1},  # above lr
        {"momentum": 1.0},
        {"reg": -1e-3},
        {"lr_period": 0},
        {"mixup_alpha": 0},
        {"batch_size": 0},
        {"no_such_option": 1},
    ],
)
def test_nft_bad_options_fail_before_any_work(options):
    net = _Counting(timm.create_model("resnet18", pretrained=False, num_classes=10))
    data = random_images(20)
    with pytest.raises(PurifyOptionError):
        purify(net, data, method="nft", quiet=True, **options)
    assert net.calls == 0


def test_nft_model_without_norm_layers_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    net.num_classes = 10
    net.get_classifier = lambda: net[-1]
    net.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    data = random_images(10)
    with pytest.raises(PurifyOptionError, match="awm"):
        purify(copy.deepcopy(net), data, method="nft", quiet=True, iterations=1)


def test_nft_config_defaults_are_the_reference():
    c = NFTConfig()
    assert (c.iterations, c.batch_size, c.lr, c.momentum, c.lr_min, c.lr_period) == (
        1000,
        128,
        0.05,
        0.95,
        0.02,
        200,
    )
    assert (c.alpha, c.beta, c.reg, c.depth, c.include_stem, c.norm_stats, c.mix, c.merge) == (
        0.8,
        0.5,
        0.001,
        "layer",
        False,
        "train",
        "mixup",
        True,
    )
