"""Built-in plugin: torchvision's Vision Transformers (ViT-B/16, B/32, L/16, L/32, H/14).

Registration only: builders and stages are named as ``"zoo_vit.model:..."`` strings, so
importing this module does not import torch. Weights are torchvision's published ImageNet-1k
checkpoints, declared as data. A ViT's position embedding fixes its input size, so each
backbone declares only weights trained at the size it is built for: 224 px, except ViT-H/14,
which is built at 518 px for its default SWAG end-to-end weights (torchvision's 224 px SWAG
linear-probe weights for ViT-H/14 would need a second backbone, and are left out).
"""

from __future__ import annotations

from collections.abc import Callable

import zoo
from zoo.core.spec import imagenet_categories

_SWAG_LICENSE = "CC-BY-NC-4.0"  # https://github.com/facebookresearch/SWAG/blob/main/LICENSE
_SWAG_E2E_RECIPE = "https://github.com/facebookresearch/SWAG"
_SWAG_LINEAR_RECIPE = "https://github.com/pytorch/vision/pull/5793"
_V1_RECIPE = "https://github.com/pytorch/vision/tree/main/references/classification#{name}"


def _weights(tag: str, filename: str, *, size: int, resize: int, interpolation: str,
             num_params: int, acc1: float, acc5: float, recipe: str,
             license: str) -> zoo.Weights:
    return zoo.Weights(
        tag=tag,
        source=f"https://download.pytorch.org/models/{filename}",
        sha256=filename.rsplit("-", 1)[1].split(".")[0],
        num_classes=1000,
        categories=imagenet_categories(),
        input_size=(3, size, size),
        resize_size=resize,
        interpolation=interpolation,
        license=license,
        meta={"num_params": num_params, "acc@1": acc1, "acc@5": acc5, "recipe": recipe,
              "dataset": "ImageNet-1k"},
    )


def _v1(name: str, filename: str, num_params: int, acc1: float, acc5: float,
        resize: int = 256) -> zoo.Weights:
    """torchvision's own ImageNet-1k training (DeiT-like recipe), 224 px, BSD-3-Clause."""
    return _weights("imagenet1k_v1", filename, size=224, resize=resize,
                    interpolation="bilinear", num_params=num_params, acc1=acc1, acc5=acc5,
                    recipe=_V1_RECIPE.format(name=name), license="BSD-3-Clause")


def _swag_linear(filename: str, num_params: int, acc1: float, acc5: float) -> zoo.Weights:
    """Frozen SWAG trunk plus a linear classifier trained on ImageNet-1k, 224 px."""
    return _weights("imagenet1k_swag_linear_v1", filename, size=224, resize=224,
                    interpolation="bicubic", num_params=num_params, acc1=acc1, acc5=acc5,
                    recipe=_SWAG_LINEAR_RECIPE, license=_SWAG_LICENSE)


# name: (description, layer count, image size it is built for, weights; the first is default)
_MODELS: dict[str, tuple[str, int, int, tuple[zoo.Weights, ...]]] = {
    "vit_b_16": ("ViT-B/16 (Dosovitskiy et al. 2021)", 12, 224, (
        _v1("vit_b_16", "vit_b_16-c867db91.pth", 86567656, 81.072, 95.318),
        _swag_linear("vit_b_16_lc_swag-4e70ced5.pth", 86567656, 81.886, 96.180),
    )),
    "vit_b_32": ("ViT-B/32 (Dosovitskiy et al. 2021)", 12, 224, (
        _v1("vit_b_32", "vit_b_32-d86f8d99.pth", 88224232, 75.912, 92.466),
    )),
    "vit_l_16": ("ViT-L/16 (Dosovitskiy et al. 2021)", 24, 224, (
        _v1("vit_l_16", "vit_l_16-852ce7e3.pth", 304326632, 79.662, 94.638, resize=242),
        _swag_linear("vit_l_16_lc_swag-4d563306.pth", 304326632, 85.146, 97.422),
    )),
    "vit_l_32": ("ViT-L/32 (Dosovitskiy et al. 2021)", 24, 224, (
        _v1("vit_l_32", "vit_l_32-c7638314.pth", 306535400, 76.972, 93.07),
    )),
    "vit_h_14": ("ViT-H/14 (Dosovitskiy et al. 2021), at 518 px for SWAG weights", 32, 518, (
        _weights("imagenet1k_swag_e2e_v1", "vit_h_14_swag-80465313.pth", size=518,
                 resize=518, interpolation="bicubic", num_params=633470440, acc1=88.552,
                 acc5=98.694, recipe=_SWAG_E2E_RECIPE, license=_SWAG_LICENSE),
    )),
}


def layer_groups(num_layers: int) -> tuple[zoo.LayerGroup, ...]:
    """``embed``, one group per encoder block (the last one owns the final ``encoder.ln``),
    ``head``."""
    blocks = [zoo.LayerGroup(f"encoder_layer_{i}", (f"encoder.layers.encoder_layer_{i}",))
              for i in range(num_layers)]
    blocks[-1] = zoo.LayerGroup(blocks[-1].name, (*blocks[-1].members, "encoder.ln"))
    return (
        zoo.LayerGroup("embed", ("conv_proj", "class_token", "encoder.pos_embedding")),
        *blocks,
        zoo.LayerGroup("head", ("heads",)),
    )


@zoo.hookimpl
def register_backbones(register: Callable[[zoo.Backbone], None]) -> None:
    """Register the five torchvision Vision Transformers."""
    for name, (description, num_layers, image_size, weights) in _MODELS.items():
        register(zoo.Backbone(
            name=name,
            builder=f"zoo_vit.model:{name}",
            groups=layer_groups(num_layers),
            head="heads.head",
            num_classes=1000,
            weights=weights,
            default_weights=weights[0].tag,
            input_size=(3, image_size, image_size),
            description=description,
            builder_kwargs={"image_size": image_size},
            checkpoint_kwargs=("image_size",),
            stages="zoo_vit.model:stages",
        ))
