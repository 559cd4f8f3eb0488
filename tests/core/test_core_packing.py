"""The process-wide packed-products switch (``nezha_zoo.packing``, issue #23): read from the environment,
restored by the context manager, and the one switch every backend re-exports."""

from __future__ import annotations

import pytest

from nezha_zoo import packing
from nezha_zoo.packing import packed_linear


def test_environment_switch_is_parsed_strictly(monkeypatch):
    monkeypatch.delenv(packing.PACKED_LINEAR_ENV, raising=False)
    assert packing._from_env() is None  # the default: no packed inference copy, oneDNN training where faster
    monkeypatch.setenv(packing.PACKED_LINEAR_ENV, "0")
    assert packing._from_env() is False
    monkeypatch.setenv(packing.PACKED_LINEAR_ENV, "1")
    assert packing._from_env() is True
    monkeypatch.setenv(packing.PACKED_LINEAR_ENV, "yes")
    with pytest.raises(ValueError, match="NEZHA_ZOO_PACKED_LINEAR must be '0' or '1'"):
        packing._from_env()


def test_context_manager_nests_and_restores():
    before = packing.packed_linear_enabled()
    with packed_linear():
        assert packing.packed_linear_enabled() is True
        with packed_linear(False):
            assert packing.packed_linear_enabled() is False
        assert packing.packed_linear_enabled() is True
    assert packing.packed_linear_enabled() is before
    with pytest.raises(RuntimeError), packed_linear():
        raise RuntimeError("restored on the way out")
    assert packing.packed_linear_enabled() is before
    setting = packing.packed_linear_setting()
    with packed_linear(None):  # the default: packed inference products stay off
        assert packing.packed_linear_setting() is None and packing.packed_linear_enabled() is False
        with packed_linear(False):
            assert packing.packed_linear_setting() is False
        assert packing.packed_linear_setting() is None
    assert packing.set_packed_linear(setting) is setting


def test_importing_the_switch_imports_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, nezha_zoo.packing as p; p.set_packed_linear(True); "
        "bad = [m for m in ('torch', 'tensorflow', 'jax', 'flax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
