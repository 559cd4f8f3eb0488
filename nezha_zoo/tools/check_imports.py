"""Fail if the framework-neutral core imports a deep-learning framework.

Run as ``python -m nezha_zoo.tools.check_imports`` (``make check``).  Each module is imported in a
fresh interpreter so one module's imports cannot hide another's.
"""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax", "transformers")

#: Modules that must stay framework-free.
CORE_MODULES = (
    "nezha_zoo",
    "nezha_zoo.spec",
    "nezha_zoo.families",
    "nezha_zoo.checkpoint",
    "nezha_zoo.loading",
    "nezha_zoo.modeling",
    "nezha_zoo.outputs",
    "nezha_zoo.testing",
    "nezha_zoo.validation",
    "nezha_zoo.torch_pickle",
    "nezha_zoo.conversion",
)

_PROBE = (
    "import importlib, sys\n"
    "importlib.import_module({mod!r})\n"
    "bad = sorted(m for m in {fws!r} if m in sys.modules)\n"
    "print(','.join(bad))\n"
)


def main() -> int:
    failed = False
    for mod in CORE_MODULES:
        try:
            __import__("importlib").util.find_spec(mod)
        except ModuleNotFoundError:
            continue
        if __import__("importlib").util.find_spec(mod) is None:
            continue
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
