"""Backdoor attacks: triggers, poisoning, JSON round trip and errors (timm_purify.attacks)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from timm_purify.attacks import (
    ATTACKS,
    Attack,
    AttackConfigError,
    AttackInputError,
    UnknownAttackError,
    build_attack,
    from_dict,
    from_json,
    register_attack,
)
from timm_purify.attacks._base import seeded_gaussian, to_uint8
from timm_purify.attacks.bpp import floyd_steinberg
from timm_purify.data import ImageData

ALL = sorted(ATTACKS)
SEEDED = ["blended", "lf", "trojan", "wanet"]  # trigger content drawn from the seed
FIXED = ["badnets", "bpp", "sig"]  # trigger is a formula; the seed only picks rows
SHAPES = [(1, 28, 28), (3, 32, 32)]


def images(shape: tuple[int, int, int], n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g)


def make_data(n: int = 200, num_classes: int = 10, shape=(3, 32, 32), seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    return ImageData(x=x, y=y, classes=[f"c{i}" for i in range(num_classes)], source="synthetic:train")


def test_registry_has_every_attack():
    assert {"badnets", "blended", "sig", "wanet", "trojan", "lf", "bpp"} <= set(ATTACKS)
    for name, cls in ATTACKS.items():
        assert cls.name == name
        assert isinstance(build_attack(name), cls)
    assert ATTACKS["sig"].clean_label and not ATTACKS["badnets"].clean_label


# ------------------------------------------------------------------------- apply


@pytest.mark.parametrize("shape", SHAPES, ids=["28x28grey", "32x32rgb"])
@pytest.mark.parametrize("name", ALL)
def test_apply_is_pure_bounded_and_changes_images(name, shape):
    attack = build_attack(name)
    x = images(shape)
    before = x.clone()
    out = attack.apply(x)
    assert torch.equal(x, before), "apply must not modify its input"
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out - x).abs().amax() > 1e-3, "the trigger must change the images"


@pytest.mark.parametrize("shape", SHAPES, ids=["28x28grey", "32x32rgb"])
@pytest.mark.parametrize("name", ALL)
def test_apply_is_deterministic_and_per_image(name, shape):
    x = images(shape)
    out = build_attack(name, seed=3).apply(x)
    assert torch.equal(out, build_attack(name, seed=3).apply(x))
    # Each image's result does not depend on the rest of the batch.
    assert torch.allclose(build_attack(name, seed=3).apply(x[2:3]), out[2:3], atol=1e-6)


@pytest.mark.parametrize("name", SEEDED)
def test_seeded_triggers_differ_across_seeds(name):
    x = images((3, 32, 32))
    assert not torch.allclose(build_attack(name, seed=0).apply(x), build_attack(name, seed=1).apply(x))
    assert (
        build_attack(name, seed=0).to_dict()["trigger_sha256"]
        != build_attack(name, seed=1).to_dict()["trigger_sha256"]
    )


@pytest.mark.parametrize("name", FIXED)
def test_formula_triggers_ignore_the_seed(name):
    x = images((3, 32, 32))
    assert torch.equal(build_attack(name, seed=0).apply(x), build_attack(name, seed=1).apply(x))


@pytest.mark.parametrize("name", ALL)
def test_apply_keeps_dtype(name):
    x = images((3, 16, 16), n=2)
    for dtype in (torch.float64, torch.bfloat16):
        out = build_attack(name).apply(x.to(dtype))
        assert out.dtype == dtype
        # Same result as float32 on the same (rounded) values, up to the output dtype's precision.
        assert torch.allclose(out.float(), build_attack(name).apply(x.to(dtype).float()), atol=0.01)


def test_apply_rejects_bad_input():
    attack = build_attack("badnets")
    with pytest.raises(AttackInputError, match="floats"):
        attack.apply(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(AttackInputError, match="batch"):
        attack.apply(torch.zeros(3, 8, 8))


def test_changing_a_field_rebuilds_the_trigger():
    attack = build_attack("blended", seed=0)
    x = images((3, 32, 32))
    first = attack.apply(x)
    attack.seed = 5
    assert torch.equal(attack.apply(x), build_attack("blended", seed=5).apply(x))
    assert not torch.equal(attack.apply(x), first)


# ------------------------------------------------------------------------- the triggers themselves


@pytest.mark.parametrize(("side", "patch"), [(32, 3), (28, 3), (64, 6), (16, 2)])
def test_badnets_patch_is_white_in_the_bottom_right(side, patch):
    x = torch.full((2, 3, side, side), 0.25)
    out = build_attack("badnets").apply(x)
    changed = (out != x).any(dim=(0, 1))
    expected = torch.zeros(side, side, dtype=torch.bool)
    expected[side - patch :, side - patch :] = True
    assert torch.equal(changed, expected)
    assert torch.all(out[..., side - patch :, side - patch :] == 1.0)


def test_blended_is_an_alpha_blend_of_a_noise_image():
    attack = build_attack("blended")
    x = images((3, 32, 32))
    k = attack.pattern(3, 32, 32)
    assert torch.allclose(attack.apply(x), 0.8 * x + 0.2 * k, atol=1e-6)
    assert k.min() >= 0.0 and k.max() <= 1.0
    assert abs(k.mean().item() - 0.5) < 0.02 and 0.2 < k.std().item() < 0.27  # N(0.5, 0.25) clipped
    # Grey images take the first channel; other sizes see the same pattern resized.
    assert torch.allclose(attack.pattern(1, 32, 32), k[:1])
    assert attack.pattern(3, 28, 28).shape == (3, 28, 28)


def test_seeded_gaussian_looks_normal():
    z = torch.tensor(seeded_gaussian(0, 20000, stream="test"))
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1.0) < 0.03


@pytest.mark.parametrize("width", [32, 28, 50])
def test_sig_adds_the_sinusoid(width):
    x = torch.full((1, 3, 20, width), 0.5)
    out = build_attack("sig").apply(x)
    j = torch.arange(width, dtype=torch.float64)
    expected = 0.5 + (40 / 255) * torch.sin(2 * math.pi * j * 6 / width)
    assert torch.allclose(out, expected.float().expand_as(out), atol=1e-6)


def test_wanet_warp_follows_the_noise_grid():
    side = 32
    attack = build_attack("wanet", seed=2)
    grid = torch.tensor(attack.to_dict()["noise_grid"], dtype=torch.float64)
    assert grid.shape == (2, 4, 4)
    assert torch.isclose(grid.abs().mean(), torch.tensor(1.0, dtype=torch.float64))
    noise = F.interpolate(grid[None], size=(side, side), mode="bicubic", align_corners=True)[0]
    coords = torch.linspace(-1, 1, side, dtype=torch.float64)
    # A horizontal ramp is resampled exactly by bilinear interpolation: the output pixel value
    # is the sampled x coordinate, i.e. identity + s * noise[0] / W (clamped), mapped to [0, 1].
    ramp = ((coords + 1) / 2).float().expand(1, 1, side, side)
    sampled_x = (coords[None, :] + 0.5 * noise[0] / side).clamp(-1, 1)
    assert torch.allclose(attack.apply(ramp)[0, 0], ((sampled_x + 1) / 2).float(), atol=1e-5)
    vertical = ((coords + 1) / 2).float()[:, None].expand(1, 1, side, side)
    sampled_y = (coords[:, None] + 0.5 * noise[1] / side).clamp(-1, 1)
    assert torch.allclose(attack.apply(vertical)[0, 0], ((sampled_y + 1) / 2).float(), atol=1e-5)


def test_wanet_noise_mode_differs_from_the_backdoor_warp():
    attack = build_attack("wanet")
    x = images((3, 32, 32), n=4)
    warped = attack.apply(x)
    noisy = attack.apply_noise_mode(x, generator=torch.Generator().manual_seed(0))
    again = attack.apply_noise_mode(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    assert (noisy - warped).abs().mean() > 1e-3
    assert noisy.min() >= 0 and noisy.max() <= 1


def test_lf_pattern_is_smooth_and_bounded():
    attack = build_attack("lf")
    pattern = attack.pattern(3, 32, 32)
    assert torch.isclose(pattern.abs().amax(), torch.tensor(0.1), atol=1e-6)
    # Low frequency: neighbouring pixels differ by a small share of the amplitude.
    assert pattern.diff(dim=-1).abs().amax() < 0.03 and pattern.diff(dim=-2).abs().amax() < 0.03
    x = torch.full((1, 3, 32, 32), 0.5)
    assert torch.allclose(attack.apply(x)[0], 0.5 + pattern, atol=1e-6)


def test_trojan_watermark_sits_near_the_bottom_right_corner():
    x = torch.full((1, 3, 32, 32), 0.5)
    changed = (build_attack("trojan").apply(x) != x).any(dim=(0, 1))
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert len(rows) > 0
    assert rows.min() >= 23 and rows.max() <= 30 and cols.min() >= 23 and cols.max() <= 30
    half = build_attack("trojan", alpha=0.5).apply(x)
    full = build_attack("trojan").apply(x)
    assert torch.allclose((half - x)[0, :, changed], 0.5 * (full - x)[0, :, changed], atol=1e-6)


def _sequential_floyd_steinberg(img: torch.Tensor, levels: int) -> torch.Tensor:
    """The textbook raster-order algorithm, one pixel at a time, as a reference."""
    work = img.clone().double()
    n, c, h, w = work.shape
    step = levels - 1
    for r in range(h):
        for col in range(w):
            old = work[:, :, r, col].clone()
            new = torch.round(old * step) / step
            work[:, :, r, col] = new
            err = old - new
            if col + 1 < w:
                work[:, :, r, col + 1] += err * 7 / 16
            if r + 1 < h:
                if col > 0:
                    work[:, :, r + 1, col - 1] += err * 3 / 16
                work[:, :, r + 1, col] += err * 5 / 16
                if col + 1 < w:
                    work[:, :, r + 1, col + 1] += err * 1 / 16
    return work


@pytest.mark.parametrize("hw", [(6, 7), (5, 3), (1, 4), (4, 1)])
def test_bpp_vectorised_dithering_matches_raster_order(hw):
    x = images((3, *hw), n=2, seed=4).double()
    assert torch.allclose(floyd_steinberg(x, 8), _sequential_floyd_steinberg(x, 8), atol=1e-12)


def test_bpp_quantises_to_squeeze_levels():
    x = images((3, 32, 32))
    plain = build_attack("bpp", dithering=False).apply(x)
    assert torch.allclose(plain * 7, torch.round(plain * 7), atol=1e-5)
    dithered = build_attack("bpp").apply(x)
    assert torch.allclose(dithered * 7, torch.round(dithered * 7), atol=1e-5)
    # Error diffusion keeps local averages: its mean error is far below plain rounding's worst case.
    assert (dithered.mean() - x.mean()).abs() < 0.01


# ------------------------------------------------------------------------- labels


def test_target_labels_and_asr_mask():
    y = torch.tensor([0, 1, 2, 3, 4])
    one = build_attack("badnets", target=2)
    assert torch.equal(one.target_labels(y), torch.full_like(y, 2))
    assert torch.equal(one.asr_mask(y), y != 2)
    allx = build_attack("badnets", mode="all-to-all", num_classes=5)
    assert torch.equal(allx.target_labels(y), torch.tensor([1, 2, 3, 4, 0]))
    assert allx.asr_mask(y).all()


# ------------------------------------------------------------------------- poisoning


@pytest.mark.parametrize("name", ["badnets", "blended", "trojan", "lf", "bpp"])
def test_dirty_label_poisoning(name):
    data = make_data()
    x0, y0 = data.x.clone(), data.y.clone()
    attack = build_attack(name, target=3)
    poisoned, mask = attack.poison(data)
    assert torch.equal(data.x, x0) and torch.equal(data.y, y0), "the input set must not change"
    assert mask.dtype == torch.bool and int(mask.sum()) == 20
    assert len(torch.unique(y0[mask])) > 1, "rows are drawn from all classes"
    assert torch.all(poisoned.y[mask] == 3)
    assert torch.equal(poisoned.y[~mask], y0[~mask]) and torch.equal(poisoned.x[~mask], x0[~mask])
    assert poisoned.x.dtype == torch.uint8
    assert torch.equal(poisoned.x[mask], to_uint8(attack.apply(x0[mask].float() / 255)))
    assert name in poisoned.source and poisoned.classes == data.classes
    # Same seed: same rows; another seed: other rows.
    assert torch.equal(build_attack(name, target=3).poison(data)[1], mask)
    assert not torch.equal(build_attack(name, target=3, seed=1).poison(data)[1], mask)


def test_all_to_all_poisoning_shifts_labels():
    data = make_data(num_classes=10)
    poisoned, mask = build_attack("badnets", mode="all-to-all", num_classes=10, poison_rate=0.25).poison(data)
    assert int(mask.sum()) == 50
    assert torch.equal(poisoned.y[mask], (data.y[mask] + 1) % 10)


def test_sig_poisons_target_class_only_and_keeps_labels():
    data = make_data()
    attack = build_attack("sig", target=4, poison_rate=0.05)
    result = attack.poison_detailed(data)
    mask = result.poison_mask
    assert int(mask.sum()) == 10
    assert torch.all(data.y[mask] == 4)
    assert torch.equal(result.data.y, data.y)
    changed = (result.data.x != data.x).flatten(1).any(dim=1)
    assert torch.equal(changed, mask)
    # The rate is relative to the whole set and capped at the class size (20 images of class 4).
    capped, capped_mask = build_attack("sig", target=4, poison_rate=0.5).poison(data)
    assert torch.equal(capped_mask, data.y == 4)


def test_wanet_poisoning_adds_cross_rows():
    data = make_data()
    result = build_attack("wanet", target=1).poison_detailed(data)
    assert result.num_poisoned == 20 and result.num_cross == 40
    assert not (result.poison_mask & result.cross_mask).any()
    assert torch.all(result.data.y[result.poison_mask] == 1)
    assert torch.equal(result.data.y[result.cross_mask], data.y[result.cross_mask])
    changed = (result.data.x != data.x).flatten(1).any(dim=1)
    assert torch.equal(changed, result.poison_mask | result.cross_mask)
    none = build_attack("wanet", cross_ratio=0).poison_detailed(data)
    assert none.num_cross == 0


def test_wanet_cross_rows_are_capped_by_the_rows_left():
    result = build_attack("wanet", poison_rate=0.5).poison_detailed(make_data(n=40))
    assert result.num_poisoned == 20 and result.num_cross == 20


def test_poisoning_works_on_grey_28x28():
    data = make_data(n=50, shape=(1, 28, 28))
    for name in ALL:
        attack = build_attack(name, target=0 if name == "sig" else 2, poison_rate=0.2)
        poisoned, mask = attack.poison(data)
        assert poisoned.x.shape == data.x.shape and mask.any()


def test_poisoning_checks_the_data():
    data = make_data(num_classes=10)
    with pytest.raises(AttackConfigError, match="num_classes=10"):
        build_attack("badnets", num_classes=5, target=1).poison(data)
    with pytest.raises(AttackConfigError, match="target 12"):
        build_attack("badnets", target=12).poison(data)
    with pytest.raises(AttackConfigError, match="rounds to zero"):
        build_attack("badnets", poison_rate=0.001).poison(data)
    no_target = data.subset(torch.nonzero(data.y != 0).flatten())
    with pytest.raises(AttackConfigError, match="has none"):
        build_attack("sig", target=0).poison(no_target)


# ------------------------------------------------------------------------- spec round trip


ROUND_TRIP_SPECS = [
    {"target": 2, "seed": 7},
    {"mode": "all-to-all", "num_classes": 10, "poison_rate": 0.3, "seed": 1},
]


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS, ids=["all-to-one", "all-to-all"])
@pytest.mark.parametrize("name", ALL)
def test_json_round_trip_gives_the_same_attack(name, spec, tmp_path):
    if name == "sig" and spec.get("mode") == "all-to-all":
        spec = {"target": 1, "seed": 3, "poison_rate": 0.05}  # clean-label: all-to-one only
    attack = build_attack(name, **spec)
    x = images((3, 32, 32))
    out = attack.apply(x)
    path = tmp_path / "attack.json"
    attack.to_json(path)
    saved = json.loads(path.read_text())
    assert saved["name"] == name and saved["num_classes"] == attack.num_classes
    assert saved["built_for"] == [[3, 32, 32]]
    again = from_json(path)
    assert type(again) is type(attack)
    assert torch.equal(again.apply(x), out)
    assert torch.equal(from_dict(attack.to_dict()).apply(x), out)
    assert torch.equal(from_json(saved).apply(x[:, :1, :28, :28]), attack.apply(x[:, :1, :28, :28]))
    if name != "sig":
        data = make_data()
        assert torch.equal(again.poison(data)[1], attack.poison(data)[1])
    for key in ("target", "mode", "poison_rate", "seed", "num_classes"):
        assert saved[key] == getattr(attack, key)
    assert ("trigger_sha256" in saved) == (name in SEEDED)


def test_wanet_spec_stores_the_grid_and_uses_it():
    spec = build_attack("wanet", seed=0).to_dict()
    spec["noise_grid"][0][0][0] += 1.0
    del spec["trigger_sha256"]
    x = images((3, 32, 32))
    assert not torch.equal(from_dict(spec).apply(x), build_attack("wanet", seed=0).apply(x))
    spec["noise_grid"] = [[0.0, 1.0]]
    with pytest.raises(AttackConfigError, match="noise_grid"):
        from_dict(spec)


def test_from_dict_detects_a_different_trigger():
    spec = build_attack("blended", seed=0).to_dict()
    spec["trigger_sha256"] = build_attack("blended", seed=1).to_dict()["trigger_sha256"]
    with pytest.raises(AttackConfigError, match="SHA-256"):
        from_dict(spec)


def test_spec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="to_json"):
        from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AttackConfigError, match="not valid JSON"):
        from_json(bad)
    with pytest.raises(AttackConfigError, match="no option"):
        from_dict({"name": "badnets", "colour": "red"})
    with pytest.raises(UnknownAttackError, match="badnets"):
        from_dict({"name": "nope"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_attack("badnets").to_json(tmp_path / "no" / "such" / "dir.json")


# ------------------------------------------------------------------------- validation


def test_unknown_attack_lists_known_names():
    with pytest.raises(UnknownAttackError) as err:
        build_attack("badnet")
    for name in ALL:
        assert name in str(err.value)


@pytest.mark.parametrize("rate", [0, -0.1, 1.5, "0.1", True])
def test_bad_poison_rate(rate):
    with pytest.raises(AttackConfigError, match="poison_rate"):
        build_attack("badnets", poison_rate=rate)


def test_bad_fields_give_clear_errors():
    with pytest.raises(AttackConfigError, match="all-to-one, all-to-all"):
        build_attack("blended", mode="one-to-one")
    with pytest.raises(AttackConfigError, match="num_classes=len"):
        build_attack("badnets", mode="all-to-all")
    with pytest.raises(AttackConfigError, match="0..9"):
        build_attack("badnets", target=10, num_classes=10)
    with pytest.raises(AttackConfigError, match="clean-label"):
        build_attack("sig", mode="all-to-all", num_classes=10)
    with pytest.raises(AttackConfigError, match="options are"):
        build_attack("badnets", alpha=0.3)
    with pytest.raises(AttackConfigError, match="alpha"):
        build_attack("blended", alpha=0)
    with pytest.raises(AttackConfigError, match="squeeze_num"):
        build_attack("bpp", squeeze_num=1)
    with pytest.raises(AttackConfigError, match="k "):
        build_attack("wanet", k=1)
    # Direct construction is validated too, not only build_attack.
    with pytest.raises(AttackConfigError, match="poison_rate"):
        ATTACKS["lf"](poison_rate=2.0)


def test_register_a_custom_attack():
    @register_attack("test-invert")
    @dataclass(kw_only=True)
    class Invert(Attack):
        def _apply(self, x, trigger):
            return 1.0 - x

    try:
        attack = build_attack("test-invert", target=1)
        x = images((1, 8, 8), n=2)
        assert torch.allclose(attack.apply(x), 1 - x)
        assert from_dict(attack.to_dict()) == attack
        with pytest.raises(ValueError, match="already registered"):
            register_attack("badnets")(Invert)
    finally:
        ATTACKS.pop("test-invert", None)
