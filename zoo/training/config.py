"""``FinetuneConfig``: every ``finetune`` setting in one validated, frozen object that can be
saved to a file and loaded back (JSON, TOML or YAML, through ``zoo.training.runfile``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, fields
from typing import TYPE_CHECKING, Any

from zoo.core.arguments import FINETUNE_RULES, Rule, check_arguments
from zoo.core.errors import ZooError
from zoo.training.runfile import check_keys, load_run, write_run

if TYPE_CHECKING:
    import torch

    from zoo.core.spec import Backbone
    from zoo.data.feature_cache import FeatureStore
    from zoo.models.strategy import FreezeStrategy
    from zoo.training.callbacks import Callback


def _is_device(value: Any) -> bool:
    return value is None or (isinstance(value, str | int) and not isinstance(value, bool)) \
        or (type(value).__name__ == "device" and type(value).__module__ == "torch")


# The finetune rules (zoo.core.arguments) and those for the settings they leave to later.
CONFIG_RULES: dict[str, Rule] = {
    **FINETUNE_RULES,
    "val": (lambda v: v is None or not isinstance(v, bool | int | float),
            "None, a dataset name, a folder, an (x, y) pair or a Dataset"),
    "device": (_is_device, "None, 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device"),
    "feature_store": (lambda v: v is None or hasattr(v, "get_or_compute"),
                      "None or a zoo.data.feature_cache.FeatureStore"),
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything ``finetune`` is told, checked on construction (a bad value is a ZooError
    naming it and what it must be, before anything is built or loaded).

    ``train``/``val`` are a built-in dataset name, an ImageFolder path, a ``(x, y)`` tensor
    pair or a torch Dataset (``val=None`` with a named dataset uses its validation split).
    ``weights="default"`` starts from the backbone's default pretrained weights (``None``:
    random). With ``output_dir`` a resumable state is saved after every epoch and the final
    model is saved as a checkpoint (``checkpoint_kind`` "auto", "delta" or "full": see
    ``save_checkpoint``). ``augment`` is False, True (zoo's original pad-crop-flip, kept so
    earlier runs repeat), a preset "none", "light", "standard" or "strong" (mixup/cutmix with
    soft targets), a ``zoo.data.augment.Augmentation`` or any torchvision v2 pipeline;
    evaluation never augments. Augmented runs keep the frozen-prefix cache only with
    ``cache_views=K``: K augmented views of every training image are computed once and epoch
    e uses view e % K (not with mixing). ``optimizer`` is "adamw" or "sgd" (``momentum``,
    Nesterov); norms and biases get no ``weight_decay``. ``scheduler`` is "cosine", "linear",
    "step", "onecycle", "constant" (stepped after every optimizer step, after
    ``warmup_epochs``, fractions allowed), None, or a callable ``optimizer -> scheduler``
    stepped once per epoch. ``label_smoothing`` smooths the cross-entropy targets;
    ``accumulate=N`` steps every N batches (the update of an N times larger batch);
    ``clip_grad`` clips the gradient norm. ``ema=DECAY`` keeps an exponential moving average
    of the weights, evaluated each epoch beside the raw ones (``ema_val_accuracy``); the best
    epoch keeps the better of the two (metrics["kept_weights"]). ``loggers`` names logger
    callbacks (default: "csv" with an ``output_dir``, and "console", a line per epoch, unless
    ``quiet``; "tensorboard" or a plugin's); with ``output_dir`` the settings are written to
    ``run.yaml``. The pretrained head is replaced by a fresh one for the new task unless
    ``keep_head=True`` (same classes as the weights). ``strict=True`` refuses image files
    that do not decode (by default they are skipped and counted). ``image_size`` overrides
    the input resolution (e.g. 64 for a quick run; a ViT also needs
    ``builder_kwargs={"image_size": 64}``). ``output_dir`` must be new, empty, the run being
    resumed, or (with ``overwrite=True``) an earlier zoo checkpoint: checked before
    training. ``keep="best"`` returns and saves the epoch with the best validation accuracy
    (ties: the lower validation loss, then the earlier epoch; without validation data, the
    last), and ``keep="last"`` the last; ``patience=N`` stops after N epochs without
    improvement. ``amp``, ``channels_last`` (None: on for CUDA) and ``compile`` choose how
    the device computes (``zoo.training.device``); ``num_workers`` the DataLoader workers for
    images read as they go (None: automatic).

    ``save(path)`` writes the settings as JSON (``.json``), TOML (``.toml``) or YAML; values
    a file cannot hold (callables, Datasets, tensors, Backbone objects) are refused, naming
    the setting. ``load(path)`` reads any of the three back.
    """

    backbone: str | Backbone
    strategy: str | FreezeStrategy
    train: Any
    val: Any = None
    _: KW_ONLY
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    weights: str | os.PathLike[str] | None = "default"
    num_classes: int | None = None
    strategy_options: Mapping[str, Any] | None = None
    output_dir: str | os.PathLike[str] | None = None
    device: str | torch.device | None = None
    seed: int = 0
    callbacks: Sequence[Callback] = ()
    scheduler: str | Callable[[torch.optim.Optimizer], Any] | None = "cosine"
    augment: Any = False
    limit_per_class: int | None = None
    strict: bool = False
    cache: bool = True
    cache_memory: int | None = None
    cache_views: int = 0
    feature_store: FeatureStore | None = None
    checkpoint_kind: str = "auto"
    resume: str | os.PathLike[str] | None = None
    quiet: bool = False
    amp: bool | None = None
    channels_last: bool | None = None
    compile: bool = False
    num_workers: int | None = None
    builder_kwargs: Mapping[str, Any] | None = None
    image_size: int | None = None
    keep_head: bool = False
    overwrite: bool = False
    keep: str = "best"
    patience: int | None = None
    optimizer: str = "adamw"
    momentum: float = 0.9
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    accumulate: int = 1
    clip_grad: float | None = None
    ema: float | None = None
    loggers: Sequence[str] | None = None

    def __post_init__(self) -> None:
        check_arguments(self.to_dict(), CONFIG_RULES)
        for name in ("callbacks", "loggers"):  # one type for sequences: tuples compare equal
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    def to_dict(self) -> dict[str, Any]:
        """The settings as ``finetune`` keyword arguments (values as they are)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FinetuneConfig:
        """A config from ``finetune`` keyword arguments; unknown or missing settings and bad
        values are a ZooError."""
        check_keys(values)
        missing = [f.name for f in fields(cls)[:3] if f.name not in values]
        if missing:
            raise ZooError(f"run settings: missing setting {missing[0]!r} (backbone, strategy "
                           "and train are required)")
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the settings to ``path``: JSON for ``.json``, TOML for ``.toml``, else YAML.
        A value a file cannot hold is a ZooError naming the setting; nothing is written."""
        write_run(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FinetuneConfig:
        """The config saved in ``path`` (JSON, TOML or YAML), checked like any other."""
        return cls.from_dict(load_run(path))
