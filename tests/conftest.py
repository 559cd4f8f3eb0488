"""Suite mechanics shared by every test directory (see tests/README.md).

``make test`` runs the suite on pytest-xdist workers (``-n 2 --dist loadfile``): each test file runs whole
on one worker, so its module-scoped models and transformers oracles are built once.  Two workers on two
cores must not each start a thread pool per core, so a worker caps the threads of every framework to its
share of the cores.  The caps are environment variables that the frameworks read when they are first
imported, which is why this file imports no framework and sets them at import, before any test module.
Subprocesses (torchrun ranks, TF and JAX interpreters) inherit them.
"""

from __future__ import annotations

import os


def _threads_per_worker() -> int | None:
    """Cores // workers under pytest-xdist (at least 1); None when pytest runs in one process."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def _cap_threads(n: int) -> None:
    # torch (OpenMP / MKL), numpy's BLAS, TensorFlow's intra-op pool; a value set by the caller wins.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ.setdefault(var, str(n))
    if n == 1:  # XLA:CPU runs its Eigen kernels on a pool of one thread per core unless told otherwise
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            extra = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()


_n = _threads_per_worker()
if _n is not None:
    _cap_threads(_n)
