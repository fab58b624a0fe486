"""Run files: a run's fully resolved ``finetune`` settings as YAML (``run.yaml``), replayed
with ``zoo.finetune(**zoo.load_run("run.yaml"))`` or ``zoo finetune --config run.yaml``.

Keys are ``finetune``'s parameter names; an unknown key is refused naming it and the valid
ones. Values are plain (numbers, strings, booleans, null, lists, mappings). Written with
PyYAML when installed, else as JSON (a subset of YAML); a ``.json`` file as JSON and a
``.toml`` file as TOML (which has no null: a None setting is left out where None is its
default, refused otherwise); always atomically.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zoo.core._io import write_text_atomic
from zoo.core.arguments import check_arguments
from zoo.core.errors import ZooError
from zoo.persist.folder import claim_output_dir

MAX_RUN_FILE_BYTES = 1024 * 1024
RUN_FILE = "run.yaml"  # what a run with an output folder writes beside its checkpoint
# Settings that say where a run goes, not how it trains: never in run.yaml.
_NOT_IN_RUN_FILE = ("output_dir", "resume", "overwrite", "callbacks", "feature_store", "quiet")
HEADER = "# zoo run settings: replay with `zoo finetune --config FILE` or\n" \
         "# zoo.finetune(**zoo.load_run(FILE))\n"


def run_keys() -> list[str]:
    """The settings a run file may hold: ``finetune``'s parameters."""
    from zoo.training.runner import finetune  # late: zoo.training.runner imports this module

    return list(inspect.signature(finetune).parameters)


def _plain(value: Any, where: str) -> Any:
    """``value`` as YAML/JSON-safe plain data, or a ZooError naming ``where``."""
    if isinstance(value, str):
        return str(value)  # a str subclass (zoo.data.hf.DataSource) as the plain name
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ZooError(f"run setting {where} is {value}; only finite numbers can be saved")
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value).__name__ == "device" and type(value).__module__ == "torch":
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ZooError(f"run setting {where} is a {type(value).__name__}, which a run file cannot "
                   "hold; pass it from Python, or use a name (e.g. a preset, a registered "
                   "backbone or strategy)")


def check_keys(settings: Mapping[str, Any], source: str = "run settings") -> None:
    """Refuse keys that are not ``finetune`` parameters, naming them and the valid ones."""
    valid = run_keys()
    unknown = [k for k in settings if k not in valid]
    if unknown:
        raise ZooError(f"{source}: unknown setting {unknown[0]!r}; valid settings: "
                       f"{', '.join(valid)}")


def write_run(path: str | os.PathLike[str], settings: Mapping[str, Any]) -> Path:
    """Write ``settings`` (``finetune`` keyword arguments) to ``path`` atomically: JSON for a
    ``.json`` file, TOML for ``.toml``, else YAML."""
    check_keys(settings)
    data = {key: _plain(value, key) for key, value in settings.items()}
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    elif suffix == ".toml":
        text = HEADER + _toml(data)
    else:
        try:
            import yaml  # optional: without PyYAML, JSON

            text = HEADER + yaml.safe_dump(data, sort_keys=False, default_flow_style=False,
                                           allow_unicode=True)
        except ImportError:
            text = HEADER + json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    write_text_atomic(path, text)
    return Path(path)


def write_run_file(out: Path, values: Mapping[str, Any]) -> None:
    """``run.yaml`` in run folder ``out``: every ``finetune`` setting in ``values`` a file can
    hold (names, numbers, paths); Python objects (tensors, callables, Datasets) are left
    out, and so are the settings that only say where the run goes."""
    settings = {}
    for key in run_keys():
        if key in _NOT_IN_RUN_FILE or key not in values:
            continue
        try:
            settings[key] = _plain(values[key], key)
        except ZooError:
            continue
    claim_output_dir(out)
    write_run(out / RUN_FILE, settings)


def _toml(data: Mapping[str, Any]) -> str:
    """Plain settings as TOML lines. TOML has no null: a None setting is left out when None
    is its ``finetune`` default, and refused otherwise (it would load as the default)."""
    from zoo.training.runner import finetune  # late: zoo.training.runner imports this module

    defaults = {name: p.default for name, p in inspect.signature(finetune).parameters.items()}
    lines = []
    for key, value in data.items():
        if value is None and defaults.get(key) is None:
            continue
        lines.append(f"{_toml_key(key)} = {_toml_value(value, key)}")
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any, where: str) -> str:
    """One plain value (``_plain`` output) as TOML."""
    if value is None:
        raise ZooError(f"run setting {where} is None, which TOML cannot hold (it has no "
                       "null); save the settings as .json or .yaml instead")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, f"{where}[{i}]") for i, v in enumerate(value)) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v, f'{where}.{k}')}"
                           for k, v in value.items()) + "}"


def load_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``finetune`` keyword arguments saved in run file ``path``, checked: a mapping of
    known settings whose values pass ``finetune``'s argument rules."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_RUN_FILE_BYTES:
            raise ZooError(f"{path} is {size} bytes; a run file is at most "
                           f"{MAX_RUN_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ZooError(f"cannot read run file {path}: {type(exc).__name__}; check the path"
                       ) from None
    data = _parse(text, path)
    if not isinstance(data, dict):
        raise ZooError(f"{path} must hold a mapping of settings (key: value lines), got "
                       f"{type(data).__name__}")
    check_keys(data, str(path))
    try:
        check_arguments(data)
    except ZooError as exc:
        raise ZooError(f"{path}: {exc}") from None
    return data


def _parse(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":  # not through YAML 1.1, which reads 1e-05 as a string
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ZooError(f"{path} is not valid JSON (line {exc.lineno}); fix the file"
                           ) from None
    if path.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ZooError(f"{path} is not valid TOML ({exc}); fix the file") from None
    try:
        import yaml  # optional: without PyYAML, JSON
    except ImportError:
        body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        try:
            return json.loads(body)
        except json.JSONDecodeError as exc:
            raise ZooError(f"{path} is not valid JSON-style YAML (line {exc.lineno}); "
                           "install PyYAML to read full YAML") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ZooError(f"{path} is not valid YAML{where}; fix the file") from None
