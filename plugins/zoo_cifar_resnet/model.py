"""The CIFAR-10 ResNets of He et al. 2016 (section 4.2): ResNet-20/32/44/56.

Not torchvision's ImageNet ResNet: a 3x3 stem without max-pool, three stages of 16/32/64
channels, and a parameter-free shortcut. Module names follow Yerlan Idelbayev's
pytorch_resnet_cifar10 (conv1, bn1, layer1..layer3, linear), so its published checkpoints
load with ``strict=True`` once ``convert_checkpoint`` has stripped their ``module.`` prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import zoo


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus the identity; the first convolution may halve the size."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.stride = stride
        self.pad = out_ch - in_ch  # channels the shortcut adds with zeros

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's "option A": subsample, then zero-pad channels (half on each side)."""
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem, three stages of ``n`` blocks (6n + 2 layers in all), global average pool, linear."""

    def __init__(self, n: int, *, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        # He (Kaiming) initialisation, as in the original training code.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_ch, out_ch, stride)]
        blocks += [BasicBlock(out_ch, out_ch) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Group ``stem``: 3x3 convolution, BN, ReLU."""
        return F.relu(self.bn1(self.conv1(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Group ``head``: global average pool, then ``linear``."""
        return self.linear(x.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.forward_head(x)


def stages(model: CifarResNet) -> list[zoo.Stage]:
    """One stage per layer group; applied in order they equal ``model(x)``."""
    return [
        zoo.Stage(("stem",), model.forward_stem),
        zoo.Stage(("layer1",), model.layer1),
        zoo.Stage(("layer2",), model.layer2),
        zoo.Stage(("layer3",), model.layer3),
        zoo.Stage(("head",), model.forward_head),
    ]


def resnet20(*, num_classes: int = 10) -> CifarResNet:
    """ResNet-20: three blocks per stage."""
    return CifarResNet(3, num_classes=num_classes)


def resnet32(*, num_classes: int = 10) -> CifarResNet:
    """ResNet-32: five blocks per stage."""
    return CifarResNet(5, num_classes=num_classes)


def resnet44(*, num_classes: int = 10) -> CifarResNet:
    """ResNet-44: seven blocks per stage."""
    return CifarResNet(7, num_classes=num_classes)


def resnet56(*, num_classes: int = 10) -> CifarResNet:
    """ResNet-56: nine blocks per stage."""
    return CifarResNet(9, num_classes=num_classes)


_REQUIRED = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer2.0.conv1.weight",
             "layer3.0.conv1.weight", "linear.weight", "linear.bias")


def convert_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Turn a pytorch_resnet_cifar10 checkpoint into this model's state dict.

    The published files hold ``{'best_prec1': ..., 'state_dict': ...}``, saved from a model
    wrapped in ``nn.DataParallel``, so every key starts with ``module.``. A plain state dict,
    with or without the prefix, is accepted too.
    """
    state = checkpoint.get("state_dict", checkpoint)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        found = ", ".join(list(state)[:5]) or "none"
        raise ValueError(
            f"not a CIFAR ResNet checkpoint: missing {missing} (first keys found: {found}); "
            "expected the pytorch_resnet_cifar10 format, a dict with a 'state_dict' entry"
        )
    return state
