"""Where can a polarizer go? ``find_layers`` and ``wrap_model`` on a CNN, a ConvNeXt and a ViT.

Nothing here knows a layer name: the spots come from a dry forward pass over each model
(the input of every conv/linear layer, the output of every ``feature_info`` stage), in the
tensor layout the model really uses there (NCHW for the ResNet, NHWC inside the ConvNeXt,
tokens for the ViT). A fresh polarizer is the identity, so wrapping leaves the logits as they
were, and ``unwrap()`` gives the untouched model back.

Usage::

    python examples/polarizer_anywhere.py
"""

from __future__ import annotations

import timm
import torch

import timm_purify

SIZE = (3, 32, 32)
MODELS = {
    "resnet18": {},
    "convnext_atto": {"conv_mlp": False},  # its MLPs then run channels-last (NHWC)
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
}


def main() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, *SIZE)
    for arch, kwargs in MODELS.items():
        model = timm.create_model(arch, num_classes=10, **kwargs).eval()
        with torch.no_grad():
            before = model(x)
        spots = timm_purify.find_layers(model, input_size=SIZE)
        layouts = sorted({spot.layout for spot in spots})
        print(f"{arch}: {len(spots)} spots, layouts {', '.join(layouts)}")
        for layer in ("auto", "last-stage", 0.25):
            wrapped = timm_purify.wrap_model(model, layer=layer, input_size=SIZE)
            spot = wrapped.spot
            with torch.no_grad():
                unchanged = torch.allclose(wrapped(x), before, atol=1e-5)
            print(
                f"  layer={layer!r:13} -> {spot.where} of {spot.name} ({spot.layout}, {spot.channels} channels, "
                f"depth {spot.depth:.2f}); logits unchanged: {unchanged}"
            )
            if not unchanged:
                raise SystemExit(f"a fresh polarizer changed {arch}'s logits at {spot.name}")
            model = wrapped.unwrap()
        with torch.no_grad():
            if not torch.equal(model(x), before):
                raise SystemExit(f"unwrap() did not give {arch} back unchanged")


if __name__ == "__main__":
    main()
