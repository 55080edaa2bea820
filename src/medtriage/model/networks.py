"""One factory from config to MONAI networks, wrapped with the preprocessing that follows decoding.

`TriageNet` = `Preprocess` (resize to the training size, channel check, intensity normalisation)
+ a MONAI backbone. The same module runs in training and is exported to ONNX, so the served
graph takes decoded pixels (`medtriage.io`, float32 in [0, 1], `[B, C, H, W]`, any H and W) and
the preprocessing cannot drift between training and serving.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medtriage.config.schema import PreprocessSpec
from medtriage.errors import ConfigError, InputError
from medtriage.optional import optional_import

nets = optional_import("monai.networks.nets")  # MONAI takes seconds to import: on first network built

PER_IMAGE_STD_FLOOR = 1e-3  # a blank image stays finite (all zeros) instead of dividing by zero


class Preprocess(nn.Module):
    """Decoded pixels in [0, 1] -> network input: antialiased bilinear resize, then intensity normalisation."""

    def __init__(self, spec: PreprocessSpec):
        super().__init__()
        self.spec = spec

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.spec.size, self.spec.size)
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resize(as_float32_pixels(x))
        if self.spec.intensity == "per_image":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True, correction=0).clamp_min(PER_IMAGE_STD_FLOOR)
            return (x - mean) / std
        return (x - self.spec.mean) / self.spec.std


def as_float32_pixels(x: torch.Tensor) -> torch.Tensor:
    """`x` as float32 pixels: float64 (what numpy makes by default) is narrowed to the weights' precision; integer
    pixels are refused, since their 0-255 scale would be normalised as if it were 0-1 into silently wrong scores.
    A branch on the dtype only, so the exported float32 graph is unchanged."""
    if not x.is_floating_point():
        raise InputError(
            f"pixels of type {x.dtype}, expected float32 in [0, 1]",
            where="model input",
            hint="decode images with medtriage.io, or scale integer pixels to [0, 1] first",
        )
    return x.float() if x.dtype == torch.float64 else x


class TriageNet(nn.Module):
    """Preprocess + backbone; returns logits `[B, num_classes]`."""

    def __init__(self, preprocess: Preprocess, backbone: nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(x))


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, stem_stride: int) -> nn.Module:
        factory = getattr(nets.resnet, f"resnet{depth}")
        # MONAI's ResNet defaults to a stride-1 7x7 stem, which quadruples the compute on 2D images.
        return factory(
            spatial_dims=2,
            n_input_channels=in_channels,
            num_classes=num_classes,
            conv1_t_size=7 if stem_stride > 1 else 3,
            conv1_t_stride=stem_stride,
            no_max_pool=stem_stride == 1,
        )

    return build


def _densenet121(in_channels: int, num_classes: int, stem_stride: int) -> nn.Module:
    return nets.DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)


# MONAI's EfficientNet keeps TensorFlow's batch-norm momentum (0.01), tuned for ImageNet runs of 100k+ steps: a run of a
# few hundred steps leaves the running statistics near their initial values, and the evaluated (and exported) network
# scores at chance while training goes well. PyTorch's default (0.1), as the other networks use.
EFFICIENTNET_NORM = ("batch", {"eps": 1e-3, "momentum": 0.1})


def _efficientnet_b0(in_channels: int, num_classes: int, stem_stride: int) -> nn.Module:
    # pretrained=False: weights cannot be downloaded on hospital or CI machines.
    return nets.EfficientNetBN(
        "efficientnet-b0",
        pretrained=False,
        spatial_dims=2,
        in_channels=in_channels,
        num_classes=num_classes,
        norm=EFFICIENTNET_NORM,
    )


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet10": _resnet(10),
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "resnet50": _resnet(50),
    "densenet121": _densenet121,
    "efficientnet-b0": _efficientnet_b0,
}


def build_backbone(name: str, in_channels: int, num_classes: int, stem_stride: int = 2) -> nn.Module:
    if name not in BACKBONES:
        raise ConfigError(f"unknown network '{name}'", where="model.name", hint=f"choose one of: {', '.join(sorted(BACKBONES))}")
    if in_channels < 1 or num_classes < 2:
        raise ConfigError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels} and {num_classes}", where="model")
    return BACKBONES[name](in_channels=in_channels, num_classes=num_classes, stem_stride=stem_stride)


def build_triage_net(name: str, num_classes: int, spec: PreprocessSpec, stem_stride: int = 2) -> TriageNet:
    """The single way to build a model, in training and when an exported run is rebuilt."""
    return TriageNet(Preprocess(spec), build_backbone(name, spec.in_channels, num_classes, stem_stride))
