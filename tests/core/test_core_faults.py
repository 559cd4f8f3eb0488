"""Conversion and saving under faults: kill -9 and rerun, two writers at once, orphans, bad destinations.

Writers are stopped mid-write deterministically: ``$NEZHA_ZOO_TEST_PAUSE=commit:<fifo>`` makes a
staged write report its pid through the FIFO once every file is staged and none is in place, then
wait on the FIFO (:func:`nezha_zoo.io.atomic.pause_point`).  The test kills it there or releases it;
nothing depends on timing.  ``save_weights`` is the core half of every backend's ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nezha_zoo.auto import AutoConfig
from nezha_zoo.cli.main import main
from nezha_zoo.conversion.convert import convert
from nezha_zoo.conversion.inspect import inspect_checkpoint
from nezha_zoo.families.electra import ElectraConfig
from nezha_zoo.io.atomic import PAUSE_ENV
from nezha_zoo.io.errors import DestinationError, DestinationLockedError
from nezha_zoo.io.lock import _pid_alive
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.io.writer import save_state_dict
from nezha_zoo.pretrained import random_weights, resolve_config, save_weights
from nezha_zoo.spec import get_family

FAMILY = get_family("electra")
DEADLINE = 120.0  # seconds: only a broken run ever waits this long


def _config() -> ElectraConfig:
    return ElectraConfig(
        vocab_size=37,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=20,
        embedding_size=8,
    )


def _save(directory, seed: int) -> dict[str, np.ndarray]:
    config = _config()
    spec = FAMILY.model_spec(config, "Model")
    weights = random_weights(spec, config, seed=seed)
    save_weights(directory, config, spec, FAMILY, weights)
    return weights


def _files(directory) -> dict[str, bytes]:
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def _hidden(parent) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


class _Paused:
    """A writer subprocess stopped at the ``commit`` pause point (see the module docstring)."""

    def __init__(self, tmp_path, args: list[str]):
        self.fifo = str(tmp_path / "pause.fifo")
        os.mkfifo(self.fifo)
        reader = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)  # before the writer opens it
        env = dict(os.environ, **{PAUSE_ENV: f"commit:{self.fifo}"})
        self.proc = subprocess.Popen(
            [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        data, end = b"", time.monotonic() + DEADLINE
        try:
            while not data.endswith(b"\n"):
                ready, _, _ = select.select([reader], [], [], 0.2)
                if ready:
                    data += os.read(reader, 64)
                elif self.proc.poll() is not None:
                    pytest.fail(f"the writer ended before its pause point: {self.proc.communicate()}")
                if time.monotonic() > end:
                    self.proc.kill()
                    pytest.fail("the writer did not reach its pause point")
        finally:
            os.close(reader)
        self.pid = int(data)
        assert self.pid == self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def release(self) -> tuple[int, str, str]:
        os.close(os.open(self.fifo, os.O_WRONLY))  # the writer's read of the FIFO returns: it goes on
        out, err = self.proc.communicate(timeout=DEADLINE)
        return self.proc.returncode, out, err


def _convert_args(src, dst, *extra: str) -> list[str]:
    return ["-m", "nezha_zoo.cli.main", "convert", str(src), str(dst), "--to", "safetensors", "-q", *extra]


def _save_args(dst, seed: int) -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [
        "-c",
        f"import sys; sys.path.insert(0, {here!r}); import test_core_faults as t; t._save({str(dst)!r}, {seed})",
    ]


# --- kill -9, then run again ----------------------------------------------------------------------


def test_convert_killed_mid_write_keeps_the_old_output_and_the_next_run_leaves_no_litter(tmp_path):
    _save(tmp_path / "old", seed=0)
    new = _save(tmp_path / "new", seed=1)
    dst = tmp_path / "out"
    assert main(["convert", str(tmp_path / "old"), str(dst), "--to", "safetensors", "-q"]) == 0
    before = _files(dst)
    writer = _Paused(tmp_path, _convert_args(tmp_path / "new", dst, "--force"))
    staging = [n for n in _hidden(tmp_path) if n.endswith(".staging")]
    assert staging == [n for n in staging if n.startswith(f".out.{writer.pid}.")] and len(staging) == 1
    assert os.listdir(tmp_path / staging[0])  # every file staged, none moved into place
    writer.kill()
    assert _files(dst) == before  # the old output is intact
    assert _hidden(tmp_path) == sorted([".out.lock", staging[0]])  # what kill -9 leaves
    # leftovers of older versions (no pid, nested) go too; a live writer's and another target's stay
    os.makedirs(tmp_path / ".out.abcdefgh.staging")
    os.makedirs(tmp_path / "..out.abcdefgh.staging.ijklmnop.staging")
    live = f".out.{os.getppid()}.qrstuvwx.staging"
    os.makedirs(tmp_path / live)
    other = ".out.b.4242.abcdefgh.staging"  # the staging directory of a target called "out.b"
    os.makedirs(tmp_path / other)
    assert main(["convert", str(tmp_path / "new"), str(dst), "--to", "safetensors", "--force", "-q"]) == 0
    assert _hidden(tmp_path) == sorted([live, other])
    with open_checkpoint(dst) as reader:
        for name, arr in new.items():
            np.testing.assert_array_equal(reader.read(name), arr)


def test_save_pretrained_killed_mid_write_keeps_the_old_save_and_the_next_save_leaves_no_litter(tmp_path):
    dst = tmp_path / "model"
    _save(dst, seed=0)
    before = _files(dst)
    writer = _Paused(tmp_path, _save_args(dst, seed=1))
    assert [n for n in _hidden(tmp_path) if n.startswith(f".model.{writer.pid}.")]
    writer.kill()
    assert _files(dst) == before
    assert len(_hidden(tmp_path)) == 2  # the lock file and the staging directory
    new = _save(dst, seed=1)
    assert _hidden(tmp_path) == []
    with open_checkpoint(dst) as reader:
        for name, arr in new.items():
            np.testing.assert_array_equal(reader.read(name), arr)


def test_sigterm_unwinds_a_conversion_and_leaves_nothing(tmp_path):
    _save(tmp_path / "a", seed=0)
    writer = _Paused(tmp_path, _convert_args(tmp_path / "a", tmp_path / "out"))
    writer.proc.send_signal(signal.SIGTERM)
    _, err = writer.proc.communicate(timeout=DEADLINE)
    assert writer.proc.returncode == 143 and err == "nezha-zoo: interrupted; nothing was written\n"
    assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []  # staging and lock file gone


# --- two writers ----------------------------------------------------------------------------------


def test_two_converts_into_one_destination_one_wins_the_other_fails_at_once(tmp_path, capsys):
    first = _save(tmp_path / "a", seed=0)
    _save(tmp_path / "b", seed=1)
    dst = tmp_path / "out"
    writer = _Paused(tmp_path, _convert_args(tmp_path / "a", dst))
    start = time.monotonic()
    assert main(["convert", str(tmp_path / "b"), str(dst), "--to", "safetensors", "-q"]) == 2
    assert time.monotonic() - start < DEADLINE / 4  # did not wait for the holder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"being written by another process (pid {writer.pid}" in err
    with pytest.raises(DestinationLockedError, match=f"pid {writer.pid}"):
        save_state_dict(dst, {"x": np.zeros(2, np.float32)})  # save_pretrained meets the same lock
    with pytest.raises(DestinationLockedError):
        convert(tmp_path / "b", dst, "safetensors", force=True)
    code, _, stderr = writer.release()
    assert code == 0, stderr
    info = inspect_checkpoint(dst)
    assert info["errors"] == [] and info["class"] == "ElectraModel"
    with open_checkpoint(dst) as reader:
        for name, arr in first.items():
            np.testing.assert_array_equal(reader.read(name), arr)
    assert _hidden(tmp_path) == []


# --- child processes ------------------------------------------------------------------------------

_CHILD = "import os, signal, sys; open(sys.argv[1], 'w').write(f'{os.getpid()}\\n'); signal.pause()"
_PARENT = (
    "import sys; from nezha_zoo.io.child import run_child; run_child([sys.executable, '-c', sys.argv[1], sys.argv[2]])"
)


def test_a_child_process_dies_with_its_parent(tmp_path):
    fifo = str(tmp_path / "child.fifo")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, fifo])
    data, end = b"", time.monotonic() + DEADLINE
    while not data.endswith(b"\n") and time.monotonic() < end and parent.poll() is None:
        if select.select([reader], [], [], 0.2)[0]:
            data += os.read(reader, 64)
    os.close(reader)
    assert data.endswith(b"\n"), "the child did not start"
    child = int(data)
    assert _pid_alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    end = time.monotonic() + DEADLINE
    while _pid_alive(child) and time.monotonic() < end:  # the kernel sends SIGKILL as the parent dies
        time.sleep(0.02)
    assert not _pid_alive(child)


# --- destinations that cannot be written ----------------------------------------------------------


def _writable(path) -> bool:
    try:
        open(os.path.join(path, ".probe"), "w").close()
    except OSError:
        return False
    os.remove(os.path.join(path, ".probe"))
    return True


@contextlib.contextmanager
def _read_only(path):
    """``path`` made read-only: by its mode, or for root (who ignores modes) immutable (chattr +i)."""
    os.chmod(path, 0o555)
    immutable = _writable(path)
    try:
        if immutable:
            subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        assert not _writable(path)
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)
        os.chmod(path, 0o755)


def test_a_read_only_destination_is_one_line_exit_2_before_any_work(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(_config().to_json_string())
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\x00" * 4)  # reading it would fail: it is never read
    (tmp_path / "ro").mkdir()
    (tmp_path / "empty").mkdir()
    with _read_only(tmp_path / "ro"), _read_only(tmp_path / "empty"):
        for dst in (tmp_path / "ro" / "out", tmp_path / "empty"):
            assert main(["convert", str(tmp_path / "src"), str(dst), "--to", "hf-flax"]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "not writable" in err and "model.safetensors" not in err
        with pytest.raises(DestinationError, match="not writable"):
            _save(tmp_path / "ro" / "model", seed=0)
        assert os.listdir(tmp_path / "ro") == [] and os.listdir(tmp_path / "empty") == []
    assert _hidden(tmp_path) == []


# --- bad config.json, invalid checkpoints, the CLI's errors ----------------------------------------


@pytest.mark.parametrize("text", ["[]", "null", "[1, 2]"])
def test_a_config_json_that_is_not_an_object_is_a_clear_error(tmp_path, capsys, text):
    _save(tmp_path / "a", seed=0)
    (tmp_path / "a" / "config.json").write_text(text)
    with pytest.raises(ValueError, match="expected a JSON object"):
        AutoConfig.from_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="expected a JSON object"):
        resolve_config(FAMILY, tmp_path / "a")  # the core half of every backend's from_pretrained
    for argv in (["inspect", str(tmp_path / "a")], ["verify", str(tmp_path / "a")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "expected a JSON object" in err
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "flax"]) == 2
    assert "expected a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and _hidden(tmp_path) == []


def test_inspect_verify_and_convert_agree_that_int64_weights_are_invalid(tmp_path, capsys):
    config = _config()
    spec = FAMILY.model_spec(config, "Model")
    weights = random_weights(spec, config)
    weights["embeddings.word_embeddings.weight"] = np.arange(37 * 8, dtype=np.int64).reshape(37, 8)
    save_state_dict(tmp_path / "a", weights, extra_files={"config.json": config.to_json_string()})
    message = "'embeddings.word_embeddings.weight' has dtype I64, expected floating point"
    assert message in inspect_checkpoint(tmp_path / "a")["errors"][0]
    assert main(["inspect", str(tmp_path / "a")]) == 1
    assert message in capsys.readouterr().err
    for argv in (
        ["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "hf-flax"],
        ["verify", str(tmp_path / "a"), "--backends", "pt,tf"],  # refused before any backend starts
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "b").exists()


def test_every_cli_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import nezha_zoo.conversion.convert as convert_module

    _save(tmp_path / "a", seed=0)

    def broken(*args, **kwargs):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(convert_module, "convert", broken)
    argv = ["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "flax"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "nezha-zoo: error: something unexpected\n"
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("nezha-zoo: error: something unexpected\n")
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
