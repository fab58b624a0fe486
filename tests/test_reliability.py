"""Reliability and security (issue 8): fuzzing, a corpus of malformed inputs, injected faults
(kill -9 during save and during training, a failing Hub server) and secrets that must never
leak. Counts of malformed inputs and faults are printed in pytest's terminal summary
(``pytest_terminal_summary`` in conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoo
import zoo.cli
import zoo.plugins.manager
from zoo.core.errors import CheckpointError, ZooError
from zoo.models.strategy import parse_option_value
from zoo.persist.validate import DTYPE_SIZES, validate_config, validate_header, validate_safetensors

COUNTS = {"malformed inputs": 0, "faults injected": 0}
TOKEN = "hf_SECRETtoken123"
WRONG = "hf_WRONGsecret456"
TINY_CLI = ["--data", "digits", "--limit-per-class", "2", "--image-size", "8", "--epochs", "1",
            "--weights", "none", "--quiet"]
FT = ["finetune", "--backbone", "cifar_resnet20", "--strategy", "partial"]
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


# --------------------------------------------------------------------------- shared data


def tiny_xy() -> tuple[torch.Tensor, torch.Tensor]:
    data = zoo.load_data("digits", "train", limit_per_class=2)
    assert data.tensors is not None
    return data.tensors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real full checkpoint (random cifar_resnet20, one epoch on 20 digits)."""
    home = tmp_path_factory.mktemp("ckpt-home")
    old = os.environ.get("ZOO_HOME")
    os.environ["ZOO_HOME"] = str(home)
    try:
        out = tmp_path_factory.mktemp("ckpt") / "run"
        xy = tiny_xy()
        zoo.finetune("cifar_resnet20", "partial", xy, xy, epochs=1, weights=None,
                     output_dir=out, quiet=True)
    finally:
        if old is None:
            os.environ.pop("ZOO_HOME", None)
        else:
            os.environ["ZOO_HOME"] = old
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name, data in snapshot(src).items():
        if name != "resume.pt":
            (dst / name).write_bytes(data)
    return dst


def safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# --------------------------------------------------------------------------- 1. properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)


@FUZZ
@given(raw=st.binary(max_size=300), data_len=st.integers(-5, 10_000))
def test_header_from_arbitrary_bytes_only_raises_checkpoint_error(raw: bytes,
                                                                  data_len: int) -> None:
    try:
        validate_header(raw, data_len)
    except CheckpointError as exc:
        assert str(exc).startswith("checkpoint is corrupt:")


@FUZZ
@given(header=json_values, data_len=st.integers(0, 10_000))
def test_header_from_arbitrary_json_only_raises_checkpoint_error(header: Any,
                                                                 data_len: int) -> None:
    with contextlib.suppress(CheckpointError):
        validate_header(json.dumps(header).encode(), data_len)


tensor_specs = st.lists(
    st.tuples(st.sampled_from(sorted(DTYPE_SIZES)),
              st.lists(st.integers(0, 5), max_size=4)),
    max_size=6)


@FUZZ
@given(specs=tensor_specs, shuffle=st.randoms(), metadata=st.booleans())
def test_valid_headers_from_random_shapes_and_dtypes_pass(specs: list[Any], shuffle: Any,
                                                          metadata: bool) -> None:
    header: dict[str, Any] = {}
    position = 0
    for i, (dtype, shape) in enumerate(specs):
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape,
                           "data_offsets": [position, position + size]}
        position += size
    items = list(header.items())
    shuffle.shuffle(items)
    header = dict(items)
    if metadata:
        header["__metadata__"] = {"format": "pt"}
    assert validate_header(json.dumps(header).encode(), position) == header


@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("st") / "small.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.ones(4, dtype=torch.int64), "c": torch.zeros(3, dtype=torch.float16)},
              str(path))
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_truncated_or_bit_flipped_safetensors_never_raise_anything_else(
    small_safetensors: bytes, tmp_path_factory: pytest.TempPathFactory, data: Any
) -> None:
    blob = bytearray(small_safetensors)
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[:data.draw(st.integers(0, len(blob) - 1), label="length")]
    for _ in range(data.draw(st.integers(0 if len(blob) < len(small_safetensors) else 1, 4))):
        if not blob:
            break
        index = data.draw(st.integers(0, len(blob) - 1), label="byte")
        blob[index] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "model.safetensors"
    path.write_bytes(bytes(blob))
    try:
        header = validate_safetensors(path)
    except CheckpointError as exc:
        assert str(exc).startswith("checkpoint is corrupt:")
    else:
        assert isinstance(header, dict)


VALID_CONFIG = {
    "backbone": "cifar_resnet20", "num_classes": 3, "kind": "full",
    "class_names": ["a", "b", "c"],
    "weights": {"tag": "default", "sha256": "0" * 64, "source": "https://x/y.pth"},
    "strategy": {"name": "partial", "options": {"frozen_groups": 2}},
    "prepared": False,
    "preprocessing": {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5],
                      "std": [0.2, 0.2, 0.2]},
}


def test_the_valid_config_used_for_mutation_passes() -> None:
    assert validate_config(json.loads(json.dumps(VALID_CONFIG))) is not None


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*prefix, i))


CONFIG_PATHS = [p for p in _paths(VALID_CONFIG) if p]


@FUZZ
@given(path=st.sampled_from(CONFIG_PATHS), action=st.sampled_from(["delete", "replace"]),
       value=json_values)
def test_mutated_configs_only_raise_checkpoint_error(path: tuple[Any, ...], action: str,
                                                     value: Any) -> None:
    config = json.loads(json.dumps(VALID_CONFIG))
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        if isinstance(parent, list):
            parent.pop(path[-1])
        else:
            del parent[path[-1]]
    else:
        parent[path[-1]] = value
    try:
        result = validate_config(config)
    except CheckpointError:
        return
    assert isinstance(result, dict)


@FUZZ
@given(value=json_values)
def test_configs_of_any_json_shape_only_raise_checkpoint_error(value: Any) -> None:
    with contextlib.suppress(CheckpointError):
        validate_config(value)


@FUZZ
@given(text=st.text(max_size=30))
def test_parse_option_value_never_fails_and_round_trips(text: str) -> None:
    value = parse_option_value(text)
    assert value is None or isinstance(value, bool | int | float | str | list)
    if isinstance(value, str):
        assert value == text


@FUZZ
@given(number=st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False))
def test_parse_option_value_reads_numbers(number: float) -> None:
    assert parse_option_value(repr(number)) == number
    assert type(parse_option_value(repr(number))) is type(number)


@FUZZ
@given(items=st.lists(st.integers(-1000, 1000) | st.booleans(), min_size=2, max_size=5))
def test_parse_option_value_reads_lists(items: list[Any]) -> None:
    text = ",".join(str(i).lower() for i in items)
    assert parse_option_value(text) == items


# --------------------------------------------------------------------------- 2. corpus


def _write_png(path: Path, size: int = 8) -> None:
    from PIL import Image

    Image.new("RGB", (size, size), (10, 200, 30)).save(path)


def _image_folder(root: Path, *, corrupt: bool = False, empty_class: bool = False) -> Path:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        if empty_class and cls == "dog":
            (root / cls / "notes.txt").write_text("no images here")
            continue
        for i in range(2):
            _write_png(root / cls / f"{i}.png")
    if corrupt:
        (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return root


def _ckpt_with(checkpoint: Path, tmp: Path, mutate: Callable[[Path], None]) -> str:
    target = copy_checkpoint(checkpoint, tmp / "bad-ckpt")
    mutate(target)
    return str(target)


def _set_config(**changes: Any) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))
    return mutate


def _truncate(d: Path) -> None:
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_header(d: Path) -> None:
    path = d / "model.safetensors"
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    blob[8:8 + n] = b"{" + b"x" * (n - 1)
    path.write_bytes(bytes(blob))


def _huge_header(d: Path) -> None:
    path = d / "model.safetensors"
    blob = bytearray(path.read_bytes())
    blob[:8] = struct.pack("<Q", 2**62)
    path.write_bytes(bytes(blob))


def _flip_data(d: Path) -> None:
    path = d / "model.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF
    path.write_bytes(bytes(blob))


def _no_hash(mutate: Callable[[Path], None]) -> Callable[[Path], None]:
    """``mutate`` with config.json's recorded sha256 removed, so the header check must act."""
    def both(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.pop("files", None)
        (d / "config.json").write_text(json.dumps(config))
        mutate(d)
    return both


def _strip_files_hash_and_flip_offsets(d: Path) -> None:
    """A header whose offsets overlap, with config.json's hash removed so only the header
    check can catch it."""
    config = json.loads((d / "config.json").read_text())
    config.pop("files", None)
    (d / "config.json").write_text(json.dumps(config))
    path = d / "model.safetensors"
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start + 1, end + 1]
    path.write_bytes(safetensors_bytes(header, blob[8 + n:]))


# Each case: (id, build(tmp, checkpoint) -> argv, text expected in the message or None).
CLI_CASES: list[tuple[str, Callable[[Path, Path], list[str]], str | None]] = [
    ("unknown-backbone", lambda t, c: ["finetune", "--backbone", "resnet_nope", "--strategy",
                                       "partial", *TINY_CLI, "--out", str(t / "out")],
     "resnet_nope"),
    ("unknown-strategy", lambda t, c: ["finetune", "--backbone", "cifar_resnet20",
                                       "--strategy", "freezy", *TINY_CLI, "--out",
                                       str(t / "out")], "freezy"),
    ("unknown-dataset", lambda t, c: [*FT, *TINY_CLI, "--data", "no_such_data", "--out",
                                      str(t / "out")], "no_such_data"),
    ("option-without-equals", lambda t, c: [*FT, "--option", "frozen_groups", *TINY_CLI,
                                            "--out", str(t / "out")], "frozen_groups"),
    ("option-empty-key", lambda t, c: [*FT, "--option", "=3", *TINY_CLI, "--out",
                                       str(t / "out")], None),
    ("unknown-option", lambda t, c: [*FT, "--option", "bogus=1", *TINY_CLI, "--out",
                                     str(t / "out")], "bogus"),
    ("incompatible-frozen-groups", lambda t, c: [*FT, "--option", "frozen_groups=99",
                                                 *TINY_CLI, "--out", str(t / "out")], "99"),
    ("negative-epochs", lambda t, c: [*FT, *TINY_CLI, "--epochs", "-1", "--out",
                                      str(t / "out")], "epochs"),
    ("zero-epochs", lambda t, c: [*FT, *TINY_CLI, "--epochs", "0", "--out", str(t / "out")],
     "epochs"),
    ("non-integer-epochs", lambda t, c: [*FT, *TINY_CLI, "--epochs", "three", "--out",
                                         str(t / "out")], "three"),
    ("zero-batch-size", lambda t, c: [*FT, *TINY_CLI, "--batch-size", "0", "--out",
                                      str(t / "out")], "batch"),
    ("unknown-flag", lambda t, c: [*FT, *TINY_CLI, "--bogus-flag", "--out", str(t / "out")],
     "--bogus-flag"),
    ("missing-required-data", lambda t, c: [*FT, "--out", str(t / "out")], "--data"),
    ("unknown-command", lambda t, c: ["frobnicate"], "frobnicate"),
    ("bad-checkpoint-kind", lambda t, c: [*FT, *TINY_CLI, "--checkpoint", "half", "--out",
                                          str(t / "out")], "half"),
    ("info-unknown-name", lambda t, c: ["info", "resnet_nope"], "resnet_nope"),
    ("plan-unknown-strategy", lambda t, c: ["plan", "cifar_resnet20", "freezy"], "freezy"),
    ("plan-incompatible", lambda t, c: ["plan", "cifar_resnet20", "partial", "--option",
                                        "frozen_groups=99"], "99"),
    ("evaluate-missing-dir", lambda t, c: ["evaluate", str(t / "nope"), "--data", "digits"],
     "nope"),
    ("predict-missing-dir", lambda t, c: ["predict", str(t / "nope"), str(t / "x.png")],
     None),
    ("evaluate-not-a-checkpoint", lambda t, c: ["evaluate", str(_mkdir(t / "plain")),
                                                "--data", "digits"], "plain"),
    ("corrupt-config-json", lambda t, c: ["evaluate", _ckpt_with(
        c, t, lambda d: (d / "config.json").write_text("{not json")), "--data", "digits"],
     "config.json"),
    ("config-json-not-object", lambda t, c: ["evaluate", _ckpt_with(
        c, t, lambda d: (d / "config.json").write_text("[1, 2]")), "--data", "digits"],
     "config.json"),
    ("config-bad-num-classes", lambda t, c: ["evaluate", _ckpt_with(
        c, t, _set_config(num_classes="ten")), "--data", "digits"], "num_classes"),
    ("config-unknown-backbone", lambda t, c: ["evaluate", _ckpt_with(
        c, t, _set_config(backbone="resnet_nope")), "--data", "digits"], "resnet_nope"),
    ("config-bad-kind", lambda t, c: ["evaluate", _ckpt_with(
        c, t, _set_config(kind="pickle")), "--data", "digits"], "kind"),
    ("config-num-classes-mismatch", lambda t, c: ["evaluate", _ckpt_with(
        c, t, _set_config(num_classes=7, class_names=None)), "--data", "digits"], None),
    ("missing-safetensors", lambda t, c: ["evaluate", _ckpt_with(
        c, t, lambda d: (d / "model.safetensors").unlink()), "--data", "digits"],
     "model.safetensors"),
    ("truncated-safetensors", lambda t, c: ["evaluate", _ckpt_with(c, t, _truncate),
                                            "--data", "digits"], "corrupt"),
    ("safetensors-bad-header", lambda t, c: ["evaluate", _ckpt_with(c, t, _bad_header),
                                             "--data", "digits"], "corrupt"),
    ("safetensors-huge-header", lambda t, c: ["evaluate", _ckpt_with(c, t, _huge_header),
                                              "--data", "digits"], "corrupt"),
    ("safetensors-flipped-data", lambda t, c: ["evaluate", _ckpt_with(c, t, _flip_data),
                                               "--data", "digits"], "corrupt"),
    ("truncated-safetensors-no-hash", lambda t, c: [
        "evaluate", _ckpt_with(c, t, _no_hash(_truncate)), "--data", "digits"], "corrupt"),
    ("safetensors-bad-header-no-hash", lambda t, c: [
        "evaluate", _ckpt_with(c, t, _no_hash(_bad_header)), "--data", "digits"], "corrupt"),
    ("safetensors-huge-header-no-hash", lambda t, c: [
        "evaluate", _ckpt_with(c, t, _no_hash(_huge_header)), "--data", "digits"], "corrupt"),
    ("safetensors-overlapping-offsets", lambda t, c: [
        "evaluate", _ckpt_with(c, t, _strip_files_hash_and_flip_offsets), "--data", "digits"],
     "corrupt"),
    ("empty-image-folder", lambda t, c: [*FT, *TINY_CLI, "--data", str(_mkdir(t / "imgs")),
                                         "--out", str(t / "out")], None),
    ("class-folder-without-images", lambda t, c: [
        *FT, *TINY_CLI, "--data", str(_image_folder(t / "imgs", empty_class=True)),
        "--val", str(_image_folder(t / "val")), "--out", str(t / "out")], "dog"),
    ("corrupt-image-strict", lambda t, c: [
        *FT, *TINY_CLI, "--strict", "--data", str(_image_folder(t / "imgs", corrupt=True)),
        "--val", str(_image_folder(t / "val")), "--out", str(t / "out")], "broken.png"),
    ("predict-corrupt-image", lambda t, c: [
        "predict", str(c), str(_write_bytes(t / "bad.png", b"GIF89a nope"))], "bad.png"),
    ("predict-missing-image", lambda t, c: ["predict", str(c), str(t / "missing.png")],
     "missing.png"),
    ("resume-empty-dir", lambda t, c: [*FT, *TINY_CLI, "--resume", str(_mkdir(t / "run"))],
     None),
    ("resume-missing-dir", lambda t, c: [*FT, *TINY_CLI, "--resume", str(t / "never")],
     None),
    ("push-missing-dir", lambda t, c: ["push", str(t / "nope"), "user/repo", "--endpoint",
                                       "http://127.0.0.1:9"], None),
    ("weights-download-unknown", lambda t, c: ["weights", "download", "resnet_nope:foo"],
     "resnet_nope"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _assert_one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("zoo: error:"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("build", "expected"), [pytest.param(b, e, id=i)
                                                 for i, b, e in CLI_CASES])
def test_malformed_cli_input_is_one_clear_line(
    build: Callable[[Path, Path], list[str]], expected: str | None, checkpoint: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    COUNTS["malformed inputs"] += 1
    argv = build(tmp_path, checkpoint)
    before = snapshot(checkpoint)
    capsys.readouterr()
    code = zoo.cli.main(argv)
    line = _assert_one_line_error(code, capsys.readouterr().err)
    if os.environ.get("ZOO_SHOW_ERRORS"):
        sys.__stderr__.write(f"{line}\n")
    if expected is not None:
        assert expected in line
    if "--out" in argv:
        out = Path(argv[argv.index("--out") + 1])
        assert not out.exists() or not any(out.iterdir())
    assert snapshot(checkpoint) == before


MALFORMED_TOML = {
    "syntax": "[plugins\nbuiltin = [",
    "wrong-type": "plugins = 3\n",
    "builtin-not-list": "[plugins]\nbuiltin = \"zoo.models.build\"\n",
}


@pytest.fixture
def reset_plugins() -> Iterator[None]:
    zoo.plugins.manager.reset()
    yield
    zoo.plugins.manager.reset()


@pytest.mark.parametrize("text", list(MALFORMED_TOML.values()), ids=list(MALFORMED_TOML))
def test_malformed_registry_toml_names_the_file(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reset_plugins: None,
    capsys: pytest.CaptureFixture[str]
) -> None:
    COUNTS["malformed inputs"] += 1
    path = tmp_path / "registry.toml"
    path.write_text(text)
    monkeypatch.setenv("ZOO_REGISTRY", str(path))
    zoo.plugins.manager.reset()
    line = _assert_one_line_error(zoo.cli.main(["list"]), capsys.readouterr().err)
    assert "registry.toml" in line
    monkeypatch.delenv("ZOO_REGISTRY")
    zoo.plugins.manager.reset()


def test_missing_registry_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               reset_plugins: None, capsys: pytest.CaptureFixture[str]) -> None:
    COUNTS["malformed inputs"] += 1
    monkeypatch.setenv("ZOO_REGISTRY", str(tmp_path / "nowhere.toml"))
    zoo.plugins.manager.reset()
    line = _assert_one_line_error(zoo.cli.main(["list"]), capsys.readouterr().err)
    assert "nowhere.toml" in line
    monkeypatch.delenv("ZOO_REGISTRY")
    zoo.plugins.manager.reset()


def _labels_out_of_range(tmp: Path) -> None:
    x, y = tiny_xy()
    y = y.clone()
    y[0] = 99
    zoo.finetune("cifar_resnet20", "partial", (x, y), (x, y), epochs=1, weights=None,
                 num_classes=10, output_dir=tmp / "out", quiet=True)


def _negative_labels(tmp: Path) -> None:
    x, y = tiny_xy()
    y = y.clone()
    y[1] = -1
    zoo.finetune("cifar_resnet20", "partial", (x, y), (x, y), epochs=1, weights=None,
                 output_dir=tmp / "out", quiet=True)


def _mismatched_lengths(tmp: Path) -> None:
    x, y = tiny_xy()
    zoo.finetune("cifar_resnet20", "partial", (x, y[:-3]), epochs=1, weights=None,
                 output_dir=tmp / "out", quiet=True)


def _wrong_channels(tmp: Path) -> None:
    x = torch.zeros(4, 5, 8, 8)
    y = torch.tensor([0, 1, 0, 1])
    zoo.finetune("cifar_resnet20", "partial", (x, y), epochs=1, weights=None,
                 output_dir=tmp / "out", quiet=True)


def _empty_tensors(tmp: Path) -> None:
    x = torch.zeros(0, 3, 8, 8)
    y = torch.zeros(0, dtype=torch.long)
    zoo.finetune("cifar_resnet20", "partial", (x, y), epochs=1, weights=None,
                 output_dir=tmp / "out", quiet=True)


def _load_untrusted_base(tmp: Path) -> None:
    d = _mkdir(tmp / "delta")
    (d / "config.json").write_text(json.dumps({
        "backbone": "cifar_resnet20", "num_classes": 10, "kind": "delta",
        "weights": {"tag": "evil", "source": "file:/etc/passwd"}}))
    (d / "model.safetensors").write_bytes(safetensors_bytes({}, b""))
    zoo.load_checkpoint(d)


API_CASES = {
    "labels-out-of-range": _labels_out_of_range,
    "negative-labels": _negative_labels,
    "x-y-length-mismatch": _mismatched_lengths,
    "wrong-input-channels": _wrong_channels,
    "empty-tensors": _empty_tensors,
    "delta-base-arbitrary-path": _load_untrusted_base,
}


@pytest.mark.parametrize("case", list(API_CASES.values()), ids=list(API_CASES))
def test_malformed_python_api_input_is_a_zoo_error(case: Callable[[Path], None],
                                                   tmp_path: Path) -> None:
    COUNTS["malformed inputs"] += 1
    with pytest.raises(ZooError) as info:
        case(tmp_path)
    assert "Traceback" not in str(info.value) and str(info.value).strip()
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------- 3. --debug


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    result = subprocess.run(
        [sys.executable, "-m", "zoo.cli", "--debug", "evaluate", str(tmp_path / "nope"),
         "--data", "digits"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr


# --------------------------------------------------------------------------- 4. faults

SAVER = textwrap.dedent("""
    import sys, torch, zoo
    torch.manual_seed(0)
    model = zoo.create_model("cifar_resnet20", num_classes=10, weights=None)
    i = int(sys.argv[2])
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(i))
        zoo.save_checkpoint(model, sys.argv[1], kind="full")
        print(i, flush=True)
        i += 1
""")


@pytest.mark.slow
def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    rng = random.Random(8)
    start = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(target), str(start)],
                                stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # at least one save has completed
        assert first.strip(), "the saver died before its first save"
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
        COUNTS["faults injected"] += 1
        saved = [int(n) for n in (first + rest).split()]
        model = zoo.load_checkpoint(target)
        values = {float(p.detach().flatten()[0]) for p in model.parameters()}
        assert len(values) == 1
        (value,) = values
        # the last completed save, or the one being written when killed
        assert int(value) in (saved[-1], saved[-1] + 1)
        assert all(bool((p == value).all()) for p in model.parameters())
        start = saved[-1] + 2


TRAINER = textwrap.dedent("""
    import sys, torch, zoo
    torch.set_num_threads(1)
    data = zoo.load_data("digits", "train", limit_per_class=2)
    xy = data.tensors
    zoo.finetune("cifar_resnet20", "partial", xy, xy, epochs=5, weights=None,
                 output_dir=sys.argv[1], quiet=True, seed=3)
""")


@pytest.mark.slow
def test_kill_during_training_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "resume.pt").exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    COUNTS["faults injected"] += 1
    torch.set_num_threads(1)
    xy = tiny_xy()
    resumed = zoo.finetune("cifar_resnet20", "partial", xy, xy, epochs=5, weights=None,
                           resume=killed, quiet=True, seed=3)
    straight = zoo.finetune("cifar_resnet20", "partial", xy, xy, epochs=5, weights=None,
                            output_dir=tmp_path / "straight", quiet=True, seed=3)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    reloaded = zoo.load_checkpoint(killed).state_dict()
    for key in a:
        assert torch.equal(a[key], reloaded[key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_failing_hub_leaves_the_checkpoint_untouched_and_can_be_retried(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zoo.testing.hub_server import HubServer

    before = snapshot(checkpoint)
    dead = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ZooError):
        zoo.push_to_hub(checkpoint, "user/rel", token=TOKEN, endpoint=dead)
    COUNTS["faults injected"] += 1
    assert snapshot(checkpoint) == before
    # the server dies midway: after the repo is created, before the commit lands
    from huggingface_hub import HfApi

    server = HubServer(root=tmp_path / "hub", token=TOKEN, upload_mode="regular").start()
    original = HfApi.create_commit

    def dying(self: Any, *args: Any, **kwargs: Any) -> Any:
        server.stop()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", dying)
    with pytest.raises(ZooError):
        zoo.push_to_hub(checkpoint, "user/rel", token=TOKEN, endpoint=server.endpoint)
    monkeypatch.setattr(HfApi, "create_commit", original)
    COUNTS["faults injected"] += 1
    assert snapshot(checkpoint) == before
    with HubServer(root=tmp_path / "hub2", token=TOKEN, upload_mode="regular") as live:
        url = zoo.push_to_hub(checkpoint, "user/rel", token=TOKEN, endpoint=live.endpoint)
        assert "user/rel" in url
        folder = zoo.pull_from_hub("user/rel", token=TOKEN, endpoint=live.endpoint,
                                   cache_dir=tmp_path / "cache")
    assert snapshot(checkpoint) == before
    assert (folder / "model.safetensors").read_bytes() == before["model.safetensors"]


# --------------------------------------------------------------------------- 5. secrets


@pytest.mark.slow
def test_tokens_never_leak(checkpoint: Path, tmp_path: Path, zoo_home: Path,
                           capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    from zoo.testing.hub_server import HubServer

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    zoo_home.mkdir(parents=True, exist_ok=True)
    messages: list[str] = []
    cache = tmp_path / "cache"
    with HubServer(root=tmp_path / "hub", token=TOKEN, upload_mode="regular") as hub:
        zoo.push_to_hub(checkpoint, "user/secret", token=TOKEN, endpoint=hub.endpoint,
                        private=True)
        folder = zoo.pull_from_hub("user/secret", token=TOKEN, endpoint=hub.endpoint,
                                   cache_dir=cache)
        assert (folder / "config.json").is_file()
        for call in (
            lambda: zoo.push_to_hub(checkpoint, "user/secret", token=WRONG,
                                    endpoint=hub.endpoint),
            lambda: zoo.pull_from_hub("user/secret", token=WRONG, endpoint=hub.endpoint,
                                      cache_dir=tmp_path / "cache-wrong"),
            lambda: zoo.pull_from_hub("user/nope", token=TOKEN, endpoint=hub.endpoint,
                                      cache_dir=tmp_path / "cache-wrong"),
        ):
            with pytest.raises(ZooError) as info:
                call()
            COUNTS["malformed inputs"] += 1
            exc: BaseException | None = info.value
            while exc is not None:  # the message and everything chained to it
                messages.append(f"{exc!r} {exc}")
                exc = exc.__cause__ or exc.__context__
        for argv in (["push", str(checkpoint), "user/secret", "--token", WRONG,
                      "--endpoint", hub.endpoint],
                     ["pull", "user/secret", "--token", WRONG, "--endpoint", hub.endpoint],
                     ["pull", "user/secret", "--token", TOKEN, "--endpoint", hub.endpoint]):
            messages.append(str(zoo.cli.main(argv)))
    captured = capsys.readouterr()
    texts = [captured.out, captured.err, *messages]
    for root in (checkpoint, cache, zoo_home, tmp_path / "hf-home", tmp_path / "cache-wrong"):
        if root.exists():
            texts += [p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file()]
    assert len(texts) > 5
    for secret in (TOKEN, WRONG):
        assert not any(secret in text for text in texts), secret
