"""ResNet, Wide ResNet and ResNeXt for ImageNet (He et al. 2016; Zagoruyko & Komodakis 2016;
Xie et al. 2017), written so that ``state_dict()`` keys and shapes equal torchvision's.

Equal keys mean torchvision's published weights load here with ``strict=True``. The forward
pass is split into ``stem``, ``layer1``..``layer4`` and ``head`` so that ``stages(model)``
can run (and cache) a frozen prefix without gradients.
"""

from __future__ import annotations

import torch
from torch import nn

import zoo


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1,
                 base_width: int = 64) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as in torchvision's "ResNet v1.5"), 1x1 expand."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1,
                 base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The ImageNet ResNet: 7x7 stem and max-pool, four stages of blocks, average pool, ``fc``."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], *,
                 num_classes: int = 1000, groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        self.groups = groups
        self.base_width = width_per_group
        self.in_ch = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        # The same initialisation as torchvision, so training from scratch behaves alike.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_ch != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.in_ch, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.in_ch, planes, stride, downsample, self.groups, self.base_width)]
        self.in_ch = planes * block.expansion
        layers += [block(self.in_ch, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Group ``stem``: conv1, bn1, ReLU, max-pool (stride 4 in total)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Group ``head``: global average pool, flatten, ``fc``."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.forward_head(x)


def stages(model: ResNet) -> list[zoo.Stage]:
    """One stage per layer group; applied in order they equal ``model(x)``."""
    return [
        zoo.Stage(("stem",), model.forward_stem),
        zoo.Stage(("layer1",), model.layer1),
        zoo.Stage(("layer2",), model.layer2),
        zoo.Stage(("layer3",), model.layer3),
        zoo.Stage(("layer4",), model.layer4),
        zoo.Stage(("head",), model.forward_head),
    ]


def resnet18(*, num_classes: int = 1000) -> ResNet:
    """ResNet-18: BasicBlocks [2, 2, 2, 2]."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def resnet34(*, num_classes: int = 1000) -> ResNet:
    """ResNet-34: BasicBlocks [3, 4, 6, 3]."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes)


def resnet50(*, num_classes: int = 1000) -> ResNet:
    """ResNet-50: Bottlenecks [3, 4, 6, 3]."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)


def resnet101(*, num_classes: int = 1000) -> ResNet:
    """ResNet-101: Bottlenecks [3, 4, 23, 3]."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes)


def resnet152(*, num_classes: int = 1000) -> ResNet:
    """ResNet-152: Bottlenecks [3, 8, 36, 3]."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes)


def wide_resnet50_2(*, num_classes: int = 1000) -> ResNet:
    """Wide ResNet-50-2: ResNet-50 with twice the channels inside each bottleneck."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, width_per_group=128)


def resnext50_32x4d(*, num_classes: int = 1000) -> ResNet:
    """ResNeXt-50 32x4d: ResNet-50 with 32 groups of 4 channels in each 3x3 convolution."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, groups=32,
                  width_per_group=4)
