"""Foundation: layer location, wrapping, unwrapping and polarizer save/load on many timm families."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import timm_purify
from timm_purify import LayerNotFoundError, NotAClassifierError, find_layers, resolve_spot, wrap_model

# architecture -> constructor kwargs (small inputs, random init)
ARCHS = {
    "resnet18": {},
    "resnet50": {},
    "resnetv2_18": {},
    "vgg11_bn": {},
    "densenet121": {},
    "efficientnet_b0": {},
    "mobilenetv3_small_100": {},
    "convnext_atto": {},
    "regnetx_002": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
    "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
    "swin_tiny_patch4_window7_224": {"img_size": 32, "window_size": 4},
}


def make(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        arch,
        pretrained=False,
        num_classes=10,
        pretrained_cfg_overlay={"input_size": (3, 32, 32), "crop_pct": 1.0},
        **ARCHS[arch],
    )
    # timm zero-initialises the last norm of each residual branch, which would give a polarizer
    # inside the branch no gradient at all; a trained model has no such zeros
    for m in model.modules():
        if (
            isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
            and m.weight is not None
        ):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return model.eval()


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_model(request):
    return request.param, make(request.param)


def test_spots_describe_the_model(arch_model):
    arch, model = arch_model
    spots = find_layers(model)
    modules = dict(model.named_modules())
    assert spots, arch
    assert [s.depth for s in spots] == sorted(s.depth for s in spots)
    for s in spots:
        assert s.layout in ("NCHW", "NHWC", "NLC", "NC")
        if s.where != "input":
            continue
        m = modules[s.name]
        expected = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        assert s.channels == expected, (arch, s)
        if isinstance(m, nn.Conv2d):
            assert s.layout == "NCHW" and len(s.shape) == 3 and s.shape[0] == s.channels
        if s.layout == "NLC":
            assert s.shape[-1] == s.channels
    head = [s for s in spots if s.depth == 1.0]
    # pooled features: (N, C), or (N, C, 1, 1) where the head is a 1x1 conv (resnetv2)
    assert head and (head[-1].layout == "NC" or head[-1].shape[1:] == (1, 1))


def test_auto_spot_is_deep(arch_model):
    arch, model = arch_model
    spots = find_layers(model)
    auto = resolve_spot(model, "auto", spots=spots)
    assert auto.where == "input" and auto.depth < 1.0
    assert auto.depth >= 0.6, (arch, auto)
    # the last stage that runs a conv/linear layer
    stages = [s.stage for s in spots if s.stage is not None and s.where == "input"]
    assert auto.stage == max(stages), (arch, auto)


def test_wrap_is_identity_then_trains_only_the_polarizer(arch_model, tmp_path):
    arch, model = arch_model
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = wrap_model(model)
    with torch.no_grad():
        out = wrapped(x)
    assert (out - ref).abs().max().item() < 1e-5, arch

    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("polarizer.") for n in trainable)
    before = {n: p.detach().clone() for n, p in wrapped.polarizer.named_parameters()}
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    wrapped.train()
    assert not wrapped.base.training, "the base must stay in eval mode"
    for _ in range(3):
        loss = nn.functional.cross_entropy(wrapped(torch.rand(8, 3, 32, 32)), torch.arange(8) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    wrapped.eval()
    assert any(not torch.equal(before[n], p) for n, p in wrapped.polarizer.named_parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_state[k]), f"{arch}: base tensor {k} changed"

    # save / load round trip reproduces the wrapped model exactly
    with torch.no_grad():
        trained = wrapped(x)
    timm_purify.save_polarizer(wrapped, tmp_path / "pol")
    assert (tmp_path / "pol" / "polarizer.safetensors").is_file()
    base = wrapped.unwrap()
    assert _hooks(base) == 0
    with torch.no_grad():
        assert torch.equal(base(x), ref), "unwrap must restore the original exactly"
    reloaded = timm_purify.load_polarizer(make(arch), tmp_path / "pol")
    with torch.no_grad():
        assert torch.equal(reloaded(x), trained), arch


def test_reference_spots():
    assert resolve_spot(make("resnet18"), "auto").name == "layer4.1.conv1"
    vit = resolve_spot(make("vit_tiny_patch16_224"), "auto")
    assert (vit.name, vit.layout, vit.prefix_tokens) == ("blocks.11.mlp.fc1", "NLC", 1)
    swin_layouts = {s.layout for s in find_layers(make("swin_tiny_patch4_window7_224"))}
    assert "NHWC" in swin_layouts


def test_layer_choices():
    model = make("resnet18")
    spots = find_layers(model)
    assert resolve_spot(model, "layer3.0.conv2", spots=spots).name == "layer3.0.conv2"
    assert resolve_spot(model, r"layer2\.1\.conv1", spots=spots).name == "layer2.1.conv1"
    assert resolve_spot(model, "layer4:output", spots=spots).where == "output"
    last = resolve_spot(model, "last-stage", spots=spots)
    assert (last.name, last.where, last.layout) == ("layer4", "output", "NCHW")
    shallow = resolve_spot(model, 0.1, spots=spots)
    deep = resolve_spot(model, 0.9, spots=spots)
    assert shallow.depth < deep.depth
    token = resolve_spot(model, spots[3], spots=spots)
    assert token == spots[3]


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ("layer9.conv1", "names no input spot"),
        (r"layer4\..*", "matches"),
        (1.5, "depth fraction"),
        ("(unclosed", "valid regex"),
    ],
)
def test_bad_layer_leaves_model_untouched(layer, message):
    model = make("resnet18")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(LayerNotFoundError, match=message):
        wrap_model(model, layer=layer)
    assert _hooks(model) == 0
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_not_a_classifier():
    extractor = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(NotAClassifierError, match="num_classes"):
        wrap_model(extractor)
    with pytest.raises(NotAClassifierError):
        wrap_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    assert _hooks(extractor) == 0


def test_double_wrap_and_mismatched_load(tmp_path):
    model = make("resnet18")
    wrapped = wrap_model(model)
    with pytest.raises(ValueError, match="already carries a polarizer"):
        wrap_model(model)
    timm_purify.save_polarizer(wrapped, tmp_path)
    other = timm.create_model("resnet18", num_classes=5)
    with pytest.raises(ValueError, match="10-class"):
        timm_purify.load_polarizer(other, tmp_path)
    assert _hooks(other) == 0
    (tmp_path / "polarizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        timm_purify.load_polarizer(make("resnet18"), tmp_path)


def test_token_prefix_option():
    model = make("vit_tiny_patch16_224")
    wrapped = wrap_model(model, include_prefix=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = wrapped(x)
        # a polarizer that skips the class token cannot change a token-pooled ViT's logits at the MLP
        wrapped.polarizer.proj.weight.mul_(3.0)
        assert torch.allclose(wrapped(x), ref, atol=1e-5)
