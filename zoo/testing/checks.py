"""Checks a backbone plugin's author runs in their own tests: ``check_backbone(name)``.

A backbone that registers and builds can still be wrong in ways that train silently: a
parameter in no layer group (it never learns) or in two, ``stages`` that do not compose to
the model's own forward pass (the runner trains through the stages, so the saved model
computes something else), a head that is not the last group, weights that do not fit,
or preprocessing that differs from what the weights were trained with. Each check here
reports ok, skipped (with why) or failed (with what to fix)::

    def test_my_backbone():
        zoo.testing.check_backbone("my_net")   # raises BackboneCheckError on a failure

``zoo check NAME`` runs the same checks from the command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zoo.core.errors import ZooError
from zoo.core.spec import Backbone, LayerGroup, Weights, resolve_callable
from zoo.core.table import table_lines
from zoo.models.build import assign_groups, create_model, transforms_for
from zoo.plugins.registry import get_backbone
from zoo.weights.sources import cached_path

OK, SKIPPED, FAILED = "ok", "skipped", "failed"


class BackboneCheckError(ZooError):
    """A backbone failed one or more of ``check_backbone``'s checks."""


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``status`` is "ok", "skipped" or "failed"; ``detail`` says why."""

    name: str
    status: str
    detail: str = ""


@dataclass
class BackboneReport:
    """Every check run on one backbone, in order."""

    backbone: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if c.status == FAILED]

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped ones do not count against it)."""
        return not self.failures

    def table(self) -> str:
        """The report as aligned text, one check a line."""
        # the status column is always as wide as the longest status, whichever appear
        rows = [(c.name, c.status.ljust(len(SKIPPED)), c.detail) for c in self.checks]
        return "\n".join([f"{self.backbone}:", *("  " + line for line in table_lines(rows))])

    def raise_for_failures(self) -> None:
        """Raise ``BackboneCheckError`` (one line naming every failed check) if any failed."""
        if self.failures:
            raise BackboneCheckError(
                f"backbone {self.backbone!r} fails {len(self.failures)} check(s): "
                + "; ".join(f"{c.name}: {c.detail}" for c in self.failures))


def check_backbone(name: str | Backbone, *, forward: bool = True, image_size: int | None = None,
                   num_classes: int = 3, check_weights: bool = True,
                   raise_on_failure: bool = True) -> BackboneReport:
    """Check backbone ``name`` the way the runner will use it, and return the report.

    Checks: the model builds (with ``num_classes`` outputs, and its head can be resized);
    its layer groups cover every parameter exactly once, none is empty and ``head`` is last;
    the head is an ``nn.Linear`` inside the ``head`` group; ``stages`` list every group once,
    in order, and (with ``forward``) compose to exactly ``model(x)`` in eval mode; each
    weights' file that is already here (cached, local or packaged) loads and fits, the
    others are skipped (nothing is downloaded); and each weights' transform matches its
    declared preprocessing. ``image_size`` overrides the input side for the forward check
    (for a builder that takes ``image_size``, pass it too); ``forward=False`` builds on the
    meta device only, for backbones too large to run in a test. Raises
    ``BackboneCheckError`` on a failure unless ``raise_on_failure`` is False.
    """
    spec = get_backbone(name) if isinstance(name, str) else name
    report = BackboneReport(spec.name)
    model = _check_build(spec, report, num_classes, forward, image_size)
    if model is not None:
        groups = _check_groups(spec, model, report)
        if groups is not None:
            _check_head(spec, model, groups, report, num_classes)
            _check_stages(spec, model, groups, report, forward, image_size)
    if check_weights:
        for weights in spec.weights:
            _check_weights(spec, weights, report)
    _check_transforms(spec, report)
    if raise_on_failure:
        report.raise_for_failures()
    return report


def _add(report: BackboneReport, name: str, problem: str | None, ok: str = "") -> bool:
    report.checks.append(Check(name, FAILED, problem) if problem else Check(name, OK, ok))
    return problem is None


def _builder_kwargs(spec: Backbone, image_size: int | None) -> dict[str, Any]:
    return {"image_size": image_size} if image_size is not None and \
        "image_size" in spec.builder_kwargs else {}


def _check_build(spec: Backbone, report: BackboneReport, num_classes: int, forward: bool,
                 image_size: int | None) -> nn.Module | None:
    """Build the model (random, or on the meta device) and check it has ``num_classes``."""
    kwargs = _builder_kwargs(spec, image_size)
    try:
        if forward:
            torch.manual_seed(0)
            model = create_model(spec, num_classes=num_classes, **kwargs)
        else:
            with torch.device("meta"):
                model = create_model(spec, num_classes=num_classes, **kwargs)
    except Exception as exc:  # the plugin's builder: any failure is the finding
        _add(report, "build", f"building it failed: {type(exc).__name__}: {exc}")
        return None
    size = sum(p.numel() for p in model.parameters())
    _add(report, "build", None, f"{size:,} parameters" + ("" if forward else " (meta device)"))
    return model.eval()


def _check_groups(spec: Backbone, model: nn.Module, report: BackboneReport
                  ) -> tuple[LayerGroup, ...] | None:
    """Groups: named uniquely, ``head`` last, every parameter in exactly one, none empty."""
    try:
        groups = spec.layer_groups(model)
        owner = assign_groups(model, groups, spec.name)
    except (ZooError, ValueError) as exc:
        _add(report, "groups", str(exc))
        return None
    names = [g.name for g in groups]
    empty = [n for n in names if n not in set(owner.values())]
    problem = None
    if len(set(names)) != len(names):
        problem = f"duplicate group names in {names}"
    elif empty:
        problem = (f"group(s) {empty} own no parameter: a strategy freezing or training them "
                   "would do nothing; drop them or fix their members")
    elif not spec.has_static_groups and [g.name for g in spec.layer_groups()] != names:
        problem = "groups derived from a meta-device build differ from the built model's"
    _add(report, "groups", problem, f"{len(names)} groups cover every parameter once")
    return groups if problem is None else None


def _check_head(spec: Backbone, model: nn.Module, groups: Sequence[LayerGroup],
                report: BackboneReport, num_classes: int) -> None:
    """The head: an ``nn.Linear`` with ``num_classes`` outputs, owned by the last group."""
    try:
        head = model.get_submodule(spec.head)
    except AttributeError:
        _add(report, "head", f"Backbone.head {spec.head!r} names no module of the model")
        return
    params = [f"{spec.head}.{n}" for n, _ in head.named_parameters()]
    problem = None
    if not isinstance(head, nn.Linear):
        problem = f"{spec.head!r} is a {type(head).__name__}; the head must be an nn.Linear"
    elif head.out_features != num_classes:
        problem = (f"built with num_classes={num_classes}, the head has {head.out_features} "
                   "outputs: the builder must honour num_classes")
    elif not all(groups[-1].owns(p) for p in params):
        problem = f"the head {spec.head!r} is not in the last group {groups[-1].name!r}"
    _add(report, "head", problem, f"{spec.head} (nn.Linear) in the last group")


def _check_stages(spec: Backbone, model: nn.Module, groups: Sequence[LayerGroup],
                  report: BackboneReport, forward: bool, image_size: int | None) -> None:
    """Stages list every group once, in order, and compose to ``model(x)``."""
    if spec.stages is None:
        report.checks.append(Check("stages", SKIPPED, "none declared: the model runs whole "
                                   "(no frozen-prefix cache)"))
        return
    try:
        stages = list(resolve_callable(spec.stages)(model))
    except Exception as exc:
        _add(report, "stages", f"stages(model) failed: {type(exc).__name__}: {exc}")
        return
    listed = [g for stage in stages for g in stage.groups]
    if listed != [g.name for g in groups]:
        _add(report, "stages", f"stages cover groups {listed}, expected each of "
                               f"{[g.name for g in groups]} once, in order")
        return
    if not forward:
        report.checks.append(Check("stages", SKIPPED, f"{len(stages)} stages in group order; "
                                   "forward pass not run (forward=False)"))
        return
    side = image_size or spec.input_size[-1]
    x = torch.rand(2, spec.input_size[0], side, side)
    with torch.no_grad():
        expected, staged = model(x), x
        for stage in stages:
            staged = stage.forward(staged)
    _add(report, "stages", _compare(staged, expected),
         f"{len(stages)} stages compose to model(x)")


def _compare(staged: Any, expected: torch.Tensor) -> str | None:
    if not isinstance(staged, torch.Tensor) or staged.shape != expected.shape:
        shape = getattr(staged, "shape", type(staged).__name__)
        return f"the stages output {shape}, model(x) {tuple(expected.shape)}"
    diff = (staged - expected).abs().max().item()
    if not math.isfinite(diff) or diff > 1e-5 * max(1.0, expected.abs().max().item()):
        return (f"the stages compute something else than model(x) (max difference {diff:.3g}): "
                "the runner trains through them, so fix stages()")
    return None


def _check_weights(spec: Backbone, weights: Weights, report: BackboneReport) -> None:
    """Weights already here load and fit; others are skipped (nothing is downloaded)."""
    name = f"weights {weights.tag}"
    if cached_path(weights) is None:
        report.checks.append(Check(name, SKIPPED, f"not here; would download {weights.source}"))
        return
    try:
        model = create_model(spec, weights=weights.tag)
    except ZooError as exc:
        _add(report, name, str(exc))
        return
    head = model.get_submodule(spec.head)
    _add(report, name, None if getattr(head, "out_features", None) == weights.num_classes
         else f"loaded, but the head has {getattr(head, 'out_features', '?')} outputs, "
              f"the weights declare {weights.num_classes}", "loads and fits")


def _check_transforms(spec: Backbone, report: BackboneReport) -> None:
    """Each weights' transform matches its declared preprocessing, and the backbone's own
    input size and normalisation match its default weights'."""
    rows: list[tuple[str, Callable[[], str | None]]] = []
    for w in spec.weights:
        rows.append((f"transform {w.tag}", lambda w=w: _transform_problem(spec, w, transforms_for)))
    if spec.default_weights is not None:
        rows.append(("preprocessing", lambda: _default_problem(spec)))
    for name, problem in rows:
        try:
            _add(report, name, problem(), "matches the weights")
        except ZooError as exc:
            _add(report, name, str(exc))


def _transform_problem(spec: Backbone, w: Weights, transforms_for: Any) -> str | None:
    if len(w.mean) != w.input_size[0] or len(w.std) != w.input_size[0] or min(w.std) <= 0:
        return f"mean {w.mean} / std {w.std} do not fit {w.input_size[0]} channels (std > 0)"
    t = transforms_for(spec, w.tag)
    crop = min(w.input_size[-1] / w.resize_size, 1.0) if w.resize_size else 1.0
    got = (tuple(t.input_size), tuple(t.mean), tuple(t.std), round(t.crop_pct, 6))
    want = (tuple(w.input_size), tuple(w.mean), tuple(w.std), round(crop, 6))
    if got != want:
        return f"transform (size, mean, std, crop) {got} differs from the weights' {want}"
    return None


def _default_problem(spec: Backbone) -> str | None:
    w = spec.get_weights()
    own = (tuple(spec.input_size), tuple(spec.mean), tuple(spec.std))
    declared = (tuple(w.input_size), tuple(w.mean), tuple(w.std))
    if own != declared:
        return (f"Backbone input_size/mean/std {own} differ from its default weights "
                f"{w.tag!r}' {declared}")
    return None
