"""The specs plugins register: backbones, their layer groups and weights, and strategies.

Specs are frozen dataclasses holding data and cheap callables only; nothing here imports
torch, so listing the registry stays fast.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in class-index order (read once from a data file).

    Shared by every backbone whose weights were trained on ImageNet-1k, so plugins can
    declare ``categories=zoo.core.spec.imagenet_categories()`` without importing torchvision.
    """
    text = Path(__file__).with_name("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


def resolve_callable(ref: Callable[..., Any] | str) -> Callable[..., Any]:
    """Turn a ``"package.module:attribute"`` reference into the object it names.

    Plugins may name builders and converters as strings so that registering them imports
    nothing heavy; the module is imported the first time the callable is needed.
    """
    if callable(ref):
        return ref
    module_name, _, attribute = ref.partition(":")
    if not attribute:
        raise ValueError(f"callable reference {ref!r} must look like 'package.module:name'")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


@dataclass(frozen=True)
class LayerGroup:
    """A named slice of a model: the modules or parameters listed in ``members``.

    A member is a dotted module path or parameter name in ``model.named_parameters()``;
    a parameter (or buffer) belongs to the group when its name equals a member or starts
    with ``member + "."``. Tensors of a ``torch.nn.utils.parametrize`` parametrization
    (``conv.parametrizations.weight.original``, LoRA's adapters) belong to the group of the
    tensor they parametrize (``conv.weight``).
    """

    name: str
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.members, str):
            object.__setattr__(self, "members", (self.members,))
        else:
            object.__setattr__(self, "members", tuple(self.members))

    def owns(self, tensor_name: str) -> bool:
        """Whether the parameter or buffer called ``tensor_name`` belongs to this group."""
        name = _PARAMETRIZED.sub(r"\1\2", tensor_name)
        return any(name == m or name.startswith(m + ".") for m in self.members)


# "<module>.parametrizations.<tensor>.<anything>" is a parametrization of "<module>.<tensor>".
_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\..*$")


@dataclass(frozen=True)
class Weights:
    """One set of pretrained weights for a backbone, with what is needed to use them.

    ``source`` is ``https://...``/``http://...``/``file://...`` (a URL), ``hf-hub:<repo>[@rev]``,
    ``file:<path>`` or ``package:<distribution>/<path inside it>``. ``sha256`` is the full
    hex digest or a prefix of it (as in torch.hub file names); None means "check the prefix
    in the file name, if any". ``convert`` maps the file's state dict onto the backbone's
    keys (a callable or a ``"module:function"`` reference).
    """

    tag: str
    source: str
    sha256: str | None = None
    num_classes: int = 1000
    categories: tuple[str, ...] | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    resize_size: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    license: str | None = None
    size_bytes: int | None = None
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.categories is not None:
            object.__setattr__(self, "categories", tuple(self.categories))
            if len(self.categories) != self.num_classes:
                raise ValueError(
                    f"weights {self.tag!r}: {len(self.categories)} category names for "
                    f"{self.num_classes} classes"
                )


GroupsSpec = Sequence[LayerGroup] | Callable[["torch.nn.Module"], Sequence[LayerGroup]] | str


@dataclass(frozen=True)
class Stage:
    """One step of a model's forward pass, covering one or more consecutive layer groups.

    A backbone's ``stages(model)`` returns stages in order such that applying their
    ``forward`` functions one after the other equals ``model(x)``. The runner cuts the
    model at a stage boundary to run (and cache) a frozen prefix without gradients.
    """

    groups: tuple[str, ...]
    forward: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Backbone:
    """A registered architecture: how to build it, its layer groups, and its weights.

    ``builder(num_classes=...)`` returns a randomly initialised ``nn.Module``. ``groups`` is
    the ordered list of layer groups (input to output, the classifier last and named
    ``head``), or a callable that derives them from a built model (for families such as
    timm whose groups are only known per model). ``head`` is the module path of the final
    ``nn.Linear`` that a new ``num_classes`` replaces. ``stages`` (optional) splits a built
    model's forward pass by groups (see ``Stage``), which lets a frozen prefix be cached.
    ``export_config(config)`` (optional) returns extra ``config.json`` keys that let other
    tools load a full checkpoint without zoo (e.g. timm's Hub loader).
    ``checkpoint_kwargs`` names the builder keyword arguments that a checkpoint's
    ``config.json`` (``builder_kwargs``) may pass when it is loaded: checkpoints come from
    strangers, so list only arguments that change sizes or regularisation (``image_size``,
    ``drop_rate``), never ones that name files or code; any other key is refused.
    """

    name: str
    builder: Callable[..., torch.nn.Module] | str
    groups: GroupsSpec
    head: str
    num_classes: int = 1000
    weights: tuple[Weights, ...] = ()
    default_weights: str | None = None
    aliases: tuple[str, ...] = ()
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""
    plugin: str = ""
    builder_kwargs: Mapping[str, Any] = field(default_factory=dict)
    stages: Callable[[torch.nn.Module], Sequence[Stage]] | str | None = None
    export_config: Callable[[dict[str, Any]], dict[str, Any]] | str | None = None
    checkpoint_kwargs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        if isinstance(self.checkpoint_kwargs, str):
            object.__setattr__(self, "checkpoint_kwargs", (self.checkpoint_kwargs,))
        object.__setattr__(self, "checkpoint_kwargs", tuple(self.checkpoint_kwargs))
        if not callable(self.groups) and not isinstance(self.groups, str):
            object.__setattr__(self, "groups", tuple(self.groups))
            names = [g.name for g in self.groups]
            if len(set(names)) != len(names):
                raise ValueError(f"backbone {self.name!r}: duplicate group names {names}")
            if not names or names[-1] != "head":
                raise ValueError(f"backbone {self.name!r}: the last layer group must be 'head'")
        tags = [w.tag for w in self.weights]
        if len(set(tags)) != len(tags):
            raise ValueError(f"backbone {self.name!r}: duplicate weight tags {tags}")
        if self.default_weights is not None and self.default_weights not in tags:
            raise ValueError(
                f"backbone {self.name!r}: default weights {self.default_weights!r} "
                f"not among {tags}"
            )

    @property
    def has_static_groups(self) -> bool:
        """True when the group list is known without building the model."""
        return not callable(self.groups) and not isinstance(self.groups, str)

    def build(self, num_classes: int | None = None) -> torch.nn.Module:
        """Build the randomly initialised model with ``num_classes`` outputs."""
        builder = resolve_callable(self.builder)
        classes = self.num_classes if num_classes is None else num_classes
        return builder(num_classes=classes, **dict(self.builder_kwargs))

    def layer_groups(self, model: torch.nn.Module | None = None) -> tuple[LayerGroup, ...]:
        """The ordered layer groups; builds the model on the meta device if they are derived."""
        if self.has_static_groups:
            return self.groups  # type: ignore[return-value]
        derive = resolve_callable(self.groups)  # type: ignore[arg-type]
        if model is None:
            import torch  # lazy: the core imports no torch until a model is built

            with torch.device("meta"):
                model = self.build()
        groups = tuple(derive(model))
        if not groups or groups[-1].name != "head":
            raise ValueError(f"backbone {self.name!r}: the last layer group must be 'head'")
        return groups

    def get_weights(self, tag: str | None = None) -> Weights:
        """The weights called ``tag`` (the default weights when ``tag`` is None or "default")."""
        from zoo.core.errors import UnknownNameError

        if tag in (None, "default"):
            tag = self.default_weights
            if tag is None:
                raise UnknownNameError(
                    f"backbone {self.name!r} declares no default weights; "
                    "pass weights=None for random initialisation",
                    name=str(tag),
                    candidates=[w.tag for w in self.weights],
                )
        for w in self.weights:
            if w.tag == tag:
                return w
        raise UnknownNameError.for_name("weights tag", f"{tag}", [w.tag for w in self.weights],
                                        context=f" for backbone {self.name!r}")


@dataclass(frozen=True)
class Strategy:
    """A registered way of adapting a backbone, speaking only in layer-group names.

    ``factory(**options)`` returns an object implementing the plan protocol used by the
    runner (see ``zoo.models.strategy.FreezePlan``). ``options`` documents each accepted option
    and its default.
    """

    name: str
    factory: Callable[..., Any] | str
    description: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    plugin: str = ""


@dataclass(frozen=True)
class BackboneFamily:
    """A lazily resolved set of backbones sharing a name prefix, such as every ``timm/*`` model.

    Registering a family costs nothing: ``resolve(name)`` (the full name, prefix included)
    returns the ``Backbone`` or None, and ``list_names()`` enumerates every member; both are
    only called when a name with this prefix is asked for. ``featured`` are the members shown
    by a plain ``zoo list``.
    """

    prefix: str
    resolve: Callable[[str], Backbone | None] | str
    list_names: Callable[[], Sequence[str]] | str
    featured: tuple[str, ...] = ()
    description: str = ""
    plugin: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "featured", tuple(self.featured))


DATASET_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its name, what ``zoo datasets`` shows, and how to load a split.

    ``loader(split)`` (a callable or a ``"module:function"`` reference, imported only when
    the data is loaded) is called with one of ``splits`` and returns an ``(images, labels)``
    pair of tensors (N x C x H x W uint8 or float in [0, 1], int labels) or anything else
    ``zoo.load_data`` accepts (an ImageFolder path, a torch Dataset, ...). A ``"test"``
    request of a dataset without a test split gets its val split. ``classes`` names the
    labels 0..K-1 (default ``"0"``..``"K-1"``). The sizes are shown before loading and may
    be None when unknown.
    """

    name: str
    loader: Callable[[str], Any] | str
    description: str = ""
    num_classes: int | None = None
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    train_size: int | None = None
    val_size: int | None = None
    splits: tuple[str, ...] = ("train", "val")
    classes: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    plugin: str = ""

    def __post_init__(self) -> None:
        for attribute in ("splits", "aliases", "classes", "image_size"):
            value = getattr(self, attribute)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, attribute, tuple(value))
        for name in (self.name, *self.aliases):
            if not name or "/" in name or "\\" in name or name.startswith(("hf:", ".", "~")):
                raise ValueError(f"dataset name {name!r} would be read as a path; use a plain "
                                 "name such as 'mnist5k'")
        if not {"train", "val"} <= set(self.splits) <= set(DATASET_SPLITS):
            raise ValueError(f"dataset {self.name!r}: splits {self.splits} must be 'train', "
                             "'val' and optionally 'test'")
        if self.classes is not None and self.num_classes is not None \
                and len(self.classes) != self.num_classes:
            raise ValueError(f"dataset {self.name!r}: {len(self.classes)} class names for "
                             f"{self.num_classes} classes")

    def split_for(self, split: str) -> str:
        """The split loaded for a request of ``split``: "test" falls back to "val"."""
        if split == "test" and "test" not in self.splits:
            return "val"
        return split
