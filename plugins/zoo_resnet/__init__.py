"""Built-in plugin: torchvision's ImageNet ResNets, Wide ResNet and ResNeXt.

Registration only: builders and stages are named as ``"zoo_resnet.model:..."`` strings, so
importing this module (every ``zoo list``) does not import torch. The weights below are
torchvision's published ImageNet-1k checkpoints, declared as data; ``sha256`` is the hash
prefix in each file name, as torch.hub checks it.
"""

from __future__ import annotations

from collections.abc import Callable

import zoo
from zoo.core.spec import imagenet_categories

_V1_RECIPE = "https://github.com/pytorch/vision/tree/main/references/classification#resnet"
_NEW_RECIPE = "https://github.com/pytorch/vision/issues/3995#new-recipe"
_NEW_RECIPE_FIXRES = "https://github.com/pytorch/vision/issues/3995#new-recipe-with-fixres"

# name: (description, num_params, [(tag, file name, resize_size, acc@1, acc@5, recipe)])
# The last weights listed are torchvision's DEFAULT.
_MODELS: dict[str, tuple[str, int, list[tuple[str, str, int, float, float, str]]]] = {
    "resnet18": ("ResNet-18 (He et al. 2016)", 11689512, [
        ("imagenet1k_v1", "resnet18-f37072fd.pth", 256, 69.758, 89.078, _V1_RECIPE),
    ]),
    "resnet34": ("ResNet-34 (He et al. 2016)", 21797672, [
        ("imagenet1k_v1", "resnet34-b627a593.pth", 256, 73.314, 91.420, _V1_RECIPE),
    ]),
    "resnet50": ("ResNet-50 (He et al. 2016)", 25557032, [
        ("imagenet1k_v1", "resnet50-0676ba61.pth", 256, 76.130, 92.862, _V1_RECIPE),
        ("imagenet1k_v2", "resnet50-11ad3fa6.pth", 232, 80.858, 95.434,
         "https://github.com/pytorch/vision/issues/3995#issuecomment-1013906621"),
    ]),
    "resnet101": ("ResNet-101 (He et al. 2016)", 44549160, [
        ("imagenet1k_v1", "resnet101-63fe2227.pth", 256, 77.374, 93.546, _V1_RECIPE),
        ("imagenet1k_v2", "resnet101-cd907fc2.pth", 232, 81.886, 95.780, _NEW_RECIPE),
    ]),
    "resnet152": ("ResNet-152 (He et al. 2016)", 60192808, [
        ("imagenet1k_v1", "resnet152-394f9c45.pth", 256, 78.312, 94.046, _V1_RECIPE),
        ("imagenet1k_v2", "resnet152-f82ba261.pth", 232, 82.284, 96.002, _NEW_RECIPE),
    ]),
    "wide_resnet50_2": ("Wide ResNet-50-2 (Zagoruyko & Komodakis 2016)", 68883240, [
        ("imagenet1k_v1", "wide_resnet50_2-95faca4d.pth", 256, 78.468, 94.086,
         "https://github.com/pytorch/vision/pull/912#issue-445437439"),
        ("imagenet1k_v2", "wide_resnet50_2-9ba9bcbe.pth", 232, 81.602, 95.758,
         _NEW_RECIPE_FIXRES),
    ]),
    "resnext50_32x4d": ("ResNeXt-50 32x4d (Xie et al. 2017)", 25028904, [
        ("imagenet1k_v1", "resnext50_32x4d-7cdf4587.pth", 256, 77.618, 93.698,
         "https://github.com/pytorch/vision/tree/main/references/classification#resnext"),
        ("imagenet1k_v2", "resnext50_32x4d-1a0047aa.pth", 232, 81.198, 95.340, _NEW_RECIPE),
    ]),
}

GROUPS = (
    zoo.LayerGroup("stem", ("conv1", "bn1")),
    zoo.LayerGroup("layer1", ("layer1",)),
    zoo.LayerGroup("layer2", ("layer2",)),
    zoo.LayerGroup("layer3", ("layer3",)),
    zoo.LayerGroup("layer4", ("layer4",)),
    zoo.LayerGroup("head", ("fc",)),
)


def _weights(num_params: int, tag: str, filename: str, resize_size: int, acc1: float,
             acc5: float, recipe: str) -> zoo.Weights:
    return zoo.Weights(
        tag=tag,
        source=f"https://download.pytorch.org/models/{filename}",
        sha256=filename.rsplit("-", 1)[1].split(".")[0],
        num_classes=1000,
        categories=imagenet_categories(),
        input_size=(3, 224, 224),
        resize_size=resize_size,
        interpolation="bilinear",
        license="BSD-3-Clause",
        meta={"num_params": num_params, "acc@1": acc1, "acc@5": acc5, "recipe": recipe,
              "dataset": "ImageNet-1k",
              # timm mirrors these very files on the Hub (its tv_in1k/tv2_in1k tags)
              "base_model": f"timm/{filename.rsplit('-', 1)[0]}."
                            f"{'tv_in1k' if tag == 'imagenet1k_v1' else 'tv2_in1k'}"},
    )


@zoo.hookimpl
def register_backbones(register: Callable[[zoo.Backbone], None]) -> None:
    """Register the seven torchvision ImageNet ResNets."""
    for name, (description, num_params, weights) in _MODELS.items():
        register(zoo.Backbone(
            name=name,
            builder=f"zoo_resnet.model:{name}",
            groups=GROUPS,
            head="fc",
            num_classes=1000,
            weights=tuple(_weights(num_params, *w) for w in weights),
            default_weights=weights[-1][0],
            input_size=(3, 224, 224),
            description=description,
            stages="zoo_resnet.model:stages",
        ))
