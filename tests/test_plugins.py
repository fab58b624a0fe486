"""The plugin layer: how backbones, strategies and datasets get into the registry, and how
it fails."""

from __future__ import annotations

import gc
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.plugins import hookspecs
from zoo.plugins.manager import get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
TINY_PLUGIN = Path(__file__).parent / "fixtures" / "zoo_tinyplugin"


@contextmanager
def registered(plugin: object, name: str) -> Iterator[None]:
    """Register ``plugin`` for the duration of the block, always unregistering it."""
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    try:
        yield
    finally:
        pm.unregister(plugin)


def tiny_backbone(name: str) -> zoo.Backbone:
    from torch import nn

    def build(*, num_classes: int = 3) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, num_classes))

    return zoo.Backbone(name=name, builder=build, head="3", num_classes=3, input_size=(3, 2, 2),
                        groups=[zoo.LayerGroup("body", ("1",)), zoo.LayerGroup("head", ("3",))])


class AddsBackbone:
    def __init__(self, name: str) -> None:
        self.name = name

    @zoo.hookimpl
    def register_backbones(self, register) -> None:
        register(tiny_backbone(self.name))


def test_a_plugin_registered_at_runtime_shows_up_in_zoo_list(capsys) -> None:
    with registered(AddsBackbone("throwaway_net"), "throwaway"):
        assert main(["list", "throwaway*"]) == 0
        assert capsys.readouterr().out.split() == ["throwaway_net"]
        assert zoo.get_backbone("throwaway_net").plugin == "throwaway"
        model = zoo.create_model("throwaway_net", num_classes=5)
        assert model(torch.zeros(1, 3, 2, 2)).shape == (1, 5)
    assert zoo.list_backbones("throwaway*") == []


def test_a_misspelled_hook_fails_loudly_naming_it() -> None:
    class Misspelled:
        @zoo.hookimpl
        def register_backbone(self, register) -> None:  # missing "s"
            pass

    with registered(Misspelled(), "misspelled"), \
            pytest.raises(zoo.PluginError, match="register_backbone.*hooks zoo knows"):
        zoo.list_backbones()


class Registers:
    """A plugin registering the given specs through the hook that takes their kind."""

    def __init__(self, *specs: object) -> None:
        self.specs = specs

    def _each(self, kind: type, register) -> None:
        for spec in self.specs:
            if isinstance(spec, kind):
                register(spec)

    @zoo.hookimpl
    def register_backbones(self, register) -> None:
        self._each(zoo.Backbone | zoo.BackboneFamily, register)

    @zoo.hookimpl
    def register_strategies(self, register) -> None:
        self._each(zoo.Strategy, register)

    @zoo.hookimpl
    def register_datasets(self, register) -> None:
        self._each(zoo.DatasetSpec, register)


@pytest.mark.parametrize(("spec", "kind", "name", "owner"), [
    (tiny_backbone("resnet18"), "backbone", "resnet18", "zoo_resnet"),
    (tiny_backbone("resnet20"), "backbone", "resnet20", "zoo_cifar_resnet"),  # an alias
    (zoo.BackboneFamily("timm/", resolve=lambda n: None, list_names=list),
     "backbone", "timm/*", "zoo_timm"),
    (zoo.Strategy("full", factory=object), "strategy", "full", "zoo_strategies"),
    (zoo.DatasetSpec("digits", loader=list), "dataset", "digits", "zoo_datasets"),
])
def test_a_duplicate_name_is_refused_naming_both_plugins(spec, kind, name, owner) -> None:
    expected = (f"{kind} name '{name}' is registered by both plugin '{owner}' and plugin "
                "'impostor'; block one of them in registry.toml or via ZOO_LOAD_PLUGINS")
    with registered(Registers(spec), "impostor"), \
            pytest.raises(zoo.DuplicateNameError) as info:
        zoo.list_backbones()
    assert str(info.value) == expected


def test_a_family_member_looked_up_by_name_is_not_listed() -> None:
    resolved: list[str] = []

    def resolve(name: str) -> zoo.Backbone:
        resolved.append(name)
        return tiny_backbone(name)

    family = zoo.BackboneFamily("toy/", resolve=resolve, list_names=lambda: ["a", "b", "c"],
                                featured=("toy/a",))
    with registered(Registers(family), "toys"):
        listed = zoo.list_backbones()
        assert "toy/a" in listed and "toy/b" not in listed
        assert zoo.get_backbone("toy/b").plugin == "toys"
        assert zoo.get_backbone("toy/b") is zoo.get_backbone("toy/b")  # resolved once, kept
        assert resolved == ["toy/b"]
        assert zoo.list_backbones() == listed
        assert zoo.list_backbones("toy/*") == ["toy/a", "toy/b", "toy/c"]  # asked for by prefix


def test_the_registry_follows_a_plugin_replaced_at_the_same_address() -> None:
    """CPython reuses a freed object's address (its id) for the next object of its size, so a
    registry keyed on plugin ids would keep serving a replaced plugin's backbones."""
    reused = 0
    for _ in range(5):
        old = AddsBackbone("old_net")
        with registered(old, "reused"):
            assert zoo.list_backbones("*_net") == ["old_net"]
        gc.collect()  # free the registration's own garbage first, so that the next object
        address = id(old)  # of this size lands where ``old`` was
        del old
        new = AddsBackbone("new_net")
        reused += id(new) == address
        with registered(new, "reused"):
            assert zoo.list_backbones("*_net") == ["new_net"]
        del new
    assert reused  # the case an id-keyed registry gets wrong happened at least once
    assert zoo.list_backbones("*_net") == []


# -- datasets: a plugin's dataset loads by name wherever a built-in one does


def stripes(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal (class 0) or vertical (class 1) stripes, 8x8 grey: 10 a class to train on,
    4 a class to validate on."""
    n = 10 if split == "train" else 4
    lines = torch.zeros(8, 8, dtype=torch.uint8)
    lines[::2] = 255
    noise = torch.randint(0, 40, (2 * n, 8, 8), generator=torch.Generator().manual_seed(n))
    images = torch.stack([lines] * n + [lines.T] * n) - noise.to(torch.uint8) * (lines > 0)
    return images[:, None], torch.tensor([0] * n + [1] * n)


STRIPES = zoo.DatasetSpec("stripes", stripes, "horizontal or vertical stripes", num_classes=2,
                          image_size=(8, 8), channels=1, train_size=20, val_size=8,
                          classes=("horizontal", "vertical"))


def datasets_rows(capsys) -> dict[str, list[str]]:
    """``zoo datasets``'s table, one row of cells per dataset name."""
    assert main(["datasets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line.split() for line in lines[1:] if line.strip()}


def test_a_dataset_plugin_is_listed_and_loads_by_name(capsys) -> None:
    with registered(Registers(STRIPES), "stripes_plugin"):
        assert [d.name for d in zoo.list_datasets()] == ["digits", "mnist5k", "stripes"]
        assert zoo.get_dataset("stripes").plugin == "stripes_plugin"
        assert datasets_rows(capsys)["stripes"][:6] == ["stripes", "2", "1x8x8", "20", "8",
                                                        "horizontal"]
        train, val = zoo.load_data("stripes"), zoo.load_data("stripes", "val")
        assert (train.name, train.split, len(train)) == ("stripes", "train", 20)
        assert (val.name, val.split, len(val)) == ("stripes", "val", 8)
        assert train.classes == ["horizontal", "vertical"]
        assert zoo.load_data("stripes", "test").fingerprint() == val.fingerprint()  # no test
        assert len(zoo.load_data("stripes", classes=["vertical"], limit_per_class=3)) == 3
    assert "stripes" not in [d.name for d in zoo.list_datasets()]
    with pytest.raises(zoo.UnknownNameError):
        zoo.load_data("stripes")


@pytest.mark.slow
def test_a_dataset_plugin_trains_through_finetune_and_compare(tiny, tmp_path: Path) -> None:
    common = ["--data", "stripes", "--epochs", "1", "--weights", "none", "--quiet"]
    with registered(Registers(STRIPES), "stripes_plugin"):
        assert main(["finetune", "--backbone", "tiny_cnn", "--strategy", "full", *common,
                     "--out", str(tmp_path / "run")]) == 0
        assert main(["compare", "--backbones", "tiny_cnn", "--strategies", "linear_probe",
                     *common, "--out", str(tmp_path / "sweep")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == "stripes"
    records = json.loads((tmp_path / "sweep" / "results.json").read_text())["records"]
    assert {r["strategy"] for r in records} == {"linear_probe", "scratch"}


def test_a_dataset_loader_named_as_a_string_is_imported_only_when_loaded(capsys) -> None:
    later = zoo.DatasetSpec("later", "zoo_no_such_module:load", "loaded on demand")
    with registered(Registers(later), "lazy_plugin"):
        assert datasets_rows(capsys)["later"] == ["later", "?", "?x?x?", "?", "?", "loaded",
                                                  "on", "demand"]
        with pytest.raises(zoo.PluginError, match="plugin 'lazy_plugin' failed to load "
                                                  "dataset 'later': ModuleNotFoundError"):
            zoo.load_data("later")


@pytest.mark.parametrize("name", ["a/b", "hf:mnist", "./digits", "~data", ""])
def test_a_dataset_name_that_reads_as_a_path_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="would be read as a path"):
        zoo.DatasetSpec(name, loader=stripes)


def test_an_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(zoo.UnknownNameError, match="did you mean .*'resnet50'"):
        zoo.get_backbone("resnet05")
    with pytest.raises(zoo.UnknownNameError, match="did you mean 'linear_probe'"):
        zoo.get_strategy("linear_prob")
    with pytest.raises(KeyError):  # UnknownNameError is also a KeyError, as a lookup should be
        zoo.get_backbone("no-such-net")


def test_an_exception_inside_a_hook_names_the_plugin() -> None:
    class Broken:
        @zoo.hookimpl
        def register_strategies(self, register) -> None:
            raise RuntimeError("boom")

    with registered(Broken(), "broken_plugin"), \
            pytest.raises(zoo.PluginError, match="'broken_plugin' raised in register_strategies"
                                                 ".*boom"):
        zoo.list_strategies()


def test_registering_the_wrong_kind_of_object_is_explained() -> None:
    class Confused:
        @zoo.hookimpl
        def register_backbones(self, register) -> None:
            register("resnet18")

    with registered(Confused(), "confused"), \
            pytest.raises(zoo.PluginError, match="expected a zoo.Backbone"):
        zoo.list_backbones()


def test_aliases_from_registry_toml_and_specs_resolve() -> None:
    assert zoo.get_backbone("resnet-50").name == "resnet50"
    assert zoo.get_strategy("linear").name == "linear_probe"
    assert zoo.get_backbone("resnet20").name == "cifar_resnet20"


def test_listing_filters_with_fnmatch_patterns() -> None:
    assert zoo.list_backbones("vit_b_*") == ["vit_b_16", "vit_b_32"]
    assert set(zoo.list_backbones("resnet*", exclude="resnet1*")) == {"resnet34", "resnet50"}
    assert zoo.list_strategies("l*") == ["linear_probe", "llrd", "lora"]
    assert "timm/tf_efficientnet_lite0" in zoo.list_backbones()
    assert len(zoo.list_backbones("timm/*")) > 500  # the whole family, on request


def run_zoo(*args: str, env: dict[str, str] | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "zoo.cli", *args], capture_output=True,
                            text=True, env=full_env, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture distribution pip-installed into its own folder (a real install)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target),
                    str(TINY_PLUGIN)], check=True, capture_output=True, timeout=300)
    assert list(target.glob("zoo_tinyplugin-*.dist-info"))
    return target


@pytest.mark.slow
def test_an_installed_third_party_plugin_is_discovered(installed_plugin: Path) -> None:
    env = {"PYTHONPATH": str(installed_plugin)}
    env.pop("ZOO_LOAD_PLUGINS", None)
    assert "tiny_convnet" in run_zoo("list", env=env).stdout.split()
    assert "tiny" in run_zoo("plugins", env=env).stdout
    # ZOO_LOAD_PLUGINS allow-lists third-party plugins; empty means built-ins only.
    only_builtins = run_zoo("list", env={**env, "ZOO_LOAD_PLUGINS": ""}).stdout.split()
    assert "tiny_convnet" not in only_builtins and "resnet18" in only_builtins
    allowed = run_zoo("list", "tiny*", env={**env, "ZOO_LOAD_PLUGINS": "tiny"}).stdout.split()
    assert allowed == ["tiny_convnet"]


@pytest.mark.slow
def test_a_blocked_plugin_is_not_loaded(installed_plugin: Path, tmp_path: Path) -> None:
    registry = tmp_path / "registry.toml"
    text = (ROOT / "zoo" / "plugins" / "registry.toml").read_text()
    registry.write_text(text.replace("blocked = []", 'blocked = ["tiny", "zoo_vit"]'))
    env = {"PYTHONPATH": str(installed_plugin), "ZOO_REGISTRY": str(registry)}
    names = run_zoo("list", env=env).stdout.split()
    assert "tiny_convnet" not in names and "vit_b_16" not in names and "resnet18" in names
    assert "blocked" in run_zoo("plugins", env=env).stdout


def test_a_malformed_registry_toml_names_the_file_and_line(tmp_path: Path) -> None:
    registry = tmp_path / "registry.toml"
    registry.write_text('[plugins]\nbuiltin = ["zoo_resnet"\nblocked = []\n')
    result = run_zoo("list", env={"ZOO_REGISTRY": str(registry)}, check=False)
    assert result.returncode == 2
    assert re.search(r"registry\.toml: malformed TOML: .*line 3", result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_plugin_that_fails_to_import_says_how_to_disable_it(tmp_path: Path) -> None:
    (tmp_path / "zoo_broken").mkdir()
    (tmp_path / "zoo_broken" / "__init__.py").write_text("raise ImportError('needs libfoo')\n")
    registry = tmp_path / "registry.toml"
    registry.write_text('[plugins]\nbuiltin = ["zoo_resnet", "zoo_broken"]\n')
    result = run_zoo("list", env={"ZOO_REGISTRY": str(registry), "PYTHONPATH": str(tmp_path)},
                     check=False)
    assert result.returncode == 2
    assert "'zoo_broken' failed to import: ImportError: needs libfoo" in result.stderr
    assert "plugins.blocked" in result.stderr


def test_listing_imports_neither_torch_nor_timm() -> None:
    code = ("import sys, zoo; zoo.list_backbones(); zoo.list_strategies(); zoo.list_datasets(); "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["timm/resnet18", "timm/tf_efficientnet_lite0",
                                  "timm/vit_tiny_patch16_224", "timm/convnext_atto",
                                  "timm/mobilenetv3_small_100"])
@pytest.mark.slow
def test_timm_backbones_have_groups_covering_every_parameter_once(name: str) -> None:
    from zoo.models.build import assign_groups

    spec = zoo.get_backbone(name)
    model = zoo.create_model(name, num_classes=7).eval()
    groups = spec.layer_groups(model)
    assert groups[-1].name == "head" and len(groups) >= 3
    assign_groups(model, groups, name)  # raises unless each parameter has exactly one group
    assert spec.layer_groups() == groups  # derived groups are the same from a meta build
    x = torch.randn(2, *spec.input_size)
    with torch.no_grad():
        staged = x
        for stage in spec.stages(model):
            staged = stage.forward(staged)
        torch.testing.assert_close(staged, model(x))


# -- the hooks are the public contract: each is documented in the README and tested.


def hook_names() -> list[str]:
    return [n for n, f in vars(hookspecs).items()
            if callable(f) and hasattr(f, "zoo_spec")]


def test_every_hook_is_documented_in_the_readme_with_its_signature() -> None:
    readme = (ROOT / "README.md").read_text()
    assert hook_names() == ["register_backbones", "register_strategies", "register_datasets",
                            "register_loggers"]
    for name in hook_names():
        signature = f"{name}{inspect.signature(getattr(hookspecs, name))}"
        signature = signature.replace("'", "")
        assert signature in readme, f"README lacks the hook signature {signature}"


def test_every_hook_has_a_test() -> None:
    tests = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for name in hook_names():
        assert f"def {name}(" in tests
