"""Child processes that die with their parent (the keras writer's and ``verify``'s TF/torch/jax workers).

A converter killed by ``kill -9`` must not leave its TensorFlow subprocess writing into an orphaned
staging directory.  On Linux the child asks the kernel for ``SIGKILL`` when its parent dies
(``prctl(PR_SET_PDEATHSIG)``, through ctypes); everywhere, an exception in the parent while it
waits (``KeyboardInterrupt``, the CLI's ``SIGTERM``) kills the child before it propagates.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

__all__ = ["run_child"]

_PR_SET_PDEATHSIG = 1


def _death_signal_setter() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return None
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return set_death_signal


def run_child(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion, capturing its output as text; it dies with this process.

    Args:
        cmd (Sequence[str]): the command line.
        env (Mapping[str, str] | None): its environment (default: this process's).

    Returns:
        ``subprocess.CompletedProcess`` with ``returncode``, ``stdout`` and ``stderr`` (str).
    """
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else dict(env),
        preexec_fn=_death_signal_setter(),  # noqa: PLW1509 - only prctl, looked up before the fork
    )
    try:
        out, err = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
