"""The framework-neutral core imports no deep-learning framework."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax", "transformers")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_check_imports_tool_passes():
    res = _run("-m", "nezha_zoo.tools.check_imports")
    assert res.returncode == 0, res.stderr


def test_import_nezha_zoo_leaves_frameworks_out():
    probe = (
        "import sys, nezha_zoo, nezha_zoo.spec, nezha_zoo.pretrained\n"
        "import nezha_zoo.io.reader, nezha_zoo.io.writer, nezha_zoo.io.plan\n"
        "from nezha_zoo import AutoConfig, MptConfig, NezhaConfig\n"
        "from nezha_zoo.spec import families\n"
        "assert len(families()) == 6\n"
        "AutoConfig.for_model('mpt'); NezhaConfig()\n"
        f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))\n"
    )
    res = _run("-c", probe)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


def test_check_imports_tool_detects_a_framework_import(tmp_path):
    # The tool must be able to fail: point it at a module importing a stand-in named like a framework.
    pkg = tmp_path / "fake_fw_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import json\n")
    (tmp_path / "torch.py").write_text("")  # a stand-in named like a framework
    (pkg / "bad.py").write_text("import torch\n")
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import nezha_zoo.tools.check_imports as ci\n"
        "ci.core_modules = lambda: ['fake_fw_probe', 'fake_fw_probe.bad']\n"
        "import os\n"
        f"os.environ['PYTHONPATH'] = {str(tmp_path)!r} + os.pathsep + os.environ.get('PYTHONPATH', '')\n"
        "sys.exit(ci.main())\n"
    )
    res = _run("-c", probe)
    assert res.returncode == 1
    assert "fake_fw_probe.bad imports torch" in res.stderr
    assert "fake_fw_probe imports" not in res.stderr  # the clean module is not blamed


def test_check_imports_covers_every_core_module_and_no_backend():
    from nezha_zoo.tools.check_imports import core_modules

    mods = core_modules()
    for expected in (
        "nezha_zoo",
        "nezha_zoo.conversion.formats",
        "nezha_zoo.families.mpt",
        "nezha_zoo.spec.partitioning",
    ):
        assert expected in mods
    for expected in ("nezha_zoo.io.reader", "nezha_zoo.io.writer", "nezha_zoo.io.plan", "nezha_zoo.pretrained"):
        assert expected in mods
    assert not [m for m in mods if m.split(".")[1:2] in (["pt"], ["tf"], ["flax"], ["cli"])], mods
