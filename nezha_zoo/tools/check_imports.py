"""Fail if the framework-neutral core imports a deep-learning framework.

Run as ``python -m nezha_zoo.tools.check_imports`` (``make check``).  Each module is imported in a
fresh interpreter so one module's imports cannot hide another's.
"""

from __future__ import annotations

import os
import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax", "transformers")

#: Subpackages that are allowed (meant) to import their framework.
BACKENDS = ("pt", "tf", "flax")

#: Programs that run the backends (the ``nezha-zoo`` command, the demo): outside the core.
PROGRAMS = ("cli",)


def core_modules() -> list[str]:
    """Every module of the package outside the backends and programs, found on disk (nothing is imported here)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../nezha_zoo
    mods = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, os.path.dirname(root))
        parts = rel.split(os.sep)
        if len(parts) > 1 and parts[1] in BACKENDS + PROGRAMS:
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for f in sorted(filenames):
            if f.endswith(".py"):
                name = parts + ([] if f == "__init__.py" else [f[:-3]])
                mods.append(".".join(name))
    return mods


_PROBE = (
    "import importlib, sys\n"
    "importlib.import_module({mod!r})\n"
    "bad = sorted(m for m in {fws!r} if m in sys.modules)\n"
    "print(','.join(bad))\n"
)


def main() -> int:
    failed = False
    for mod in core_modules():
        res = subprocess.run(
            [sys.executable, "-c", _PROBE.format(mod=mod, fws=FRAMEWORKS)], capture_output=True, text=True
        )
        if res.returncode != 0:
            sys.stderr.write(f"check_imports: importing {mod} failed:\n{res.stderr}")
            failed = True
        elif res.stdout.strip():
            sys.stderr.write(f"check_imports: {mod} imports {res.stdout.strip()}\n")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
