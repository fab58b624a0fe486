"""Built-in plugin: the CIFAR-10 ResNets of He et al. 2016, with pretrained weights.

This is the worked example of registering a new backbone. A plugin is a module with a
``register_backbones`` function marked ``@zoo.hookimpl``; it calls ``register`` once per
``zoo.Backbone``. Builders, stages and converters are named as ``"module:function"``
strings so that registering imports no torch: ``model.py`` loads only when a model is built.
"""

from __future__ import annotations

from collections.abc import Callable

import zoo

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

# The layer groups, input to output, the classifier last and called "head". A member is a
# module path: it owns every parameter whose name starts with it. Strategies (freeze the
# first N groups, layer-wise learning rates, ...) speak only in these names.
GROUPS = (
    zoo.LayerGroup("stem", ("conv1", "bn1")),
    zoo.LayerGroup("layer1", ("layer1",)),
    zoo.LayerGroup("layer2", ("layer2",)),
    zoo.LayerGroup("layer3", ("layer3",)),
    zoo.LayerGroup("head", ("linear",)),
)

_RELEASES = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models"

# depth: (file name, sha256 or its prefix, top-1 test accuracy reported by the authors).
# The 8 hex digits in each file name start its sha256; the full digest is given where known.
_WEIGHTS = {
    20: ("resnet20-12fca82f.th",
         "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8", 91.73),
    32: ("resnet32-d509ac18.th", "d509ac18", 92.63),
    44: ("resnet44-014dd654.th", "014dd654", 93.10),
    56: ("resnet56-4bfd9763.th",
         "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367", 93.39),
}


def _cifar10_weights(filename: str, sha256: str, acc1: float) -> zoo.Weights:
    """The weights trained on CIFAR-10 by Yerlan Idelbayev (BSD-2-Clause)."""
    return zoo.Weights(
        tag="cifar10",
        source=f"{_RELEASES}/{filename}",
        sha256=sha256,
        num_classes=10,
        categories=CIFAR10_CLASSES,
        input_size=(3, 32, 32),
        resize_size=None,  # CIFAR images are already 32x32: no resize, no crop
        license="BSD-2-Clause",
        # The file holds {'best_prec1', 'state_dict'} with "module."-prefixed keys.
        convert="zoo_cifar_resnet.model:convert_checkpoint",
        meta={"acc@1": acc1, "dataset": "CIFAR-10",
              "recipe": "https://github.com/akamaster/pytorch_resnet_cifar10"},
    )


@zoo.hookimpl
def register_backbones(register: Callable[[zoo.Backbone], None]) -> None:
    """Register ResNet-20/32/44/56 for CIFAR as ``cifar_resnet20`` ... (alias ``resnet20`` ...)."""
    for depth, (filename, sha256, acc1) in _WEIGHTS.items():
        register(zoo.Backbone(
            name=f"cifar_resnet{depth}",
            builder=f"zoo_cifar_resnet.model:resnet{depth}",
            groups=GROUPS,
            head="linear",  # the nn.Linear replaced when num_classes changes
            num_classes=10,
            weights=(_cifar10_weights(filename, sha256, acc1),),
            default_weights="cifar10",
            aliases=(f"resnet{depth}",),
            input_size=(3, 32, 32),
            mean=zoo.core.spec.IMAGENET_MEAN,  # the training code normalised with ImageNet stats
            std=zoo.core.spec.IMAGENET_STD,
            description=f"ResNet-{depth} for 32x32 images (He et al. 2016, CIFAR variant)",
            stages="zoo_cifar_resnet.model:stages",
        ))
