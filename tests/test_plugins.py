"""The plugin layer: how backbones and strategies get into the registry, and how it fails."""

from __future__ import annotations

import inspect
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


def test_a_duplicate_name_is_refused_naming_both_plugins() -> None:
    with registered(AddsBackbone("resnet18"), "impostor"), \
            pytest.raises(zoo.DuplicateNameError, match="'zoo_resnet'.*'impostor'"):
        zoo.list_backbones()


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
    code = ("import sys, zoo; zoo.list_backbones(); zoo.list_strategies(); "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["timm/resnet18", "timm/tf_efficientnet_lite0",
                                  "timm/vit_tiny_patch16_224", "timm/convnext_atto",
                                  "timm/mobilenetv3_small_100"])
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
    assert hook_names() == ["register_backbones", "register_strategies", "register_loggers"]
    for name in hook_names():
        signature = f"{name}{inspect.signature(getattr(hookspecs, name))}"
        signature = signature.replace("'", "")
        assert signature in readme, f"README lacks the hook signature {signature}"


def test_every_hook_has_a_test() -> None:
    tests = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for name in hook_names():
        assert f"def {name}(" in tests
