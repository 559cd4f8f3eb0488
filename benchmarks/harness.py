"""What the timing benchmarks share: threads, the reference matrix product, interleaved timing, the
machine's description (CPU flags and load included), peak-memory readings, atomic report writes and the
product switch's setting for each PyTorch backend (:data:`PT_PACKED_LINEAR_SETTINGS`).

``benchmarks.forward``, ``benchmarks.train`` and ``benchmarks.small_shapes`` use these; the method is described in
``docs/benchmarks/README.md`` (backends of one framework timed call by call in turn inside one
process, the order rotating, with a float32 matrix product after each round).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from nezha_zoo.hardware import machine_info

#: Side of the reference matrix product timed between the model runs (the physical reference).
REFERENCE_N = 2048
SMOKE_REFERENCE_N = 256
#: Pause before the reference product, so no framework thread is still spinning from the last run.
REFERENCE_PAUSE_S = 0.05

#: The setting of the process-wide product switch (:func:`nezha_zoo.packing.set_packed_linear`) each PyTorch
#: backend of ours runs under, in every benchmark (``forward``, ``small_shapes``, ``train``): ``pt`` is what a
#: user gets, the default ``None`` (oneDNN training products where faster, no-grad products by row count);
#: ``pt-plain`` the switch off (plain ``F.linear``); ``pt-packed`` on (packed copies, oneDNN everywhere).
#: ``pt-compile`` keeps the default (compiled code reads no switch).
PT_PACKED_LINEAR_SETTINGS: dict[str, bool | None] = {
    "pt": None,
    "pt-compile": None,
    "pt-plain": False,
    "pt-packed": True,
}


def set_threads(threads: int, jax: bool = False) -> int | None:
    """Same thread count for every framework; must run before any framework is imported.

    PyTorch, MKL and TF read variables.  JAX's CPU client reads none: with ``jax`` (a process that times
    Flax) it is started here on ``threads`` CPUs (:func:`start_jax`); processes that time no Flax do not
    import JAX for it.

    Returns:
        int | None: the CPUs JAX's client started on, None where it was not started here.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return start_jax(threads) if jax else None


def start_jax(threads: int) -> int:
    """Start JAX's CPU client with a thread pool of ``threads`` workers; returns the CPUs it started on.

    XLA's CPU client sizes its pool from the CPUs the process may run on when the client starts
    (``sched_getaffinity``), and nothing else sets it: ``XLA_FLAGS=intra_op_parallelism_threads=1`` leaves
    two pool threads on a 2-CPU machine (jax 0.10).  So the calling thread is held to the first ``threads``
    of its CPUs while the client starts and given them all back after; the pool's threads, created
    meanwhile, keep the narrower set.  With ``threads`` <= 0, at least as many as the CPUs allowed, or no
    ``sched_setaffinity`` (macOS), the client starts as it would.

    Args:
        threads (int): the pool's size.
    Returns:
        int: the number of CPUs the client saw when it started.
    Raises:
        RuntimeError: JAX's backends already started (the pool cannot be resized).
    """
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("JAX's CPU client already started: call start_jax before anything uses JAX")
    if not hasattr(os, "sched_setaffinity"):
        jax.devices("cpu")
        return os.cpu_count() or 1
    allowed = os.sched_getaffinity(0)
    if threads <= 0 or threads >= len(allowed):
        jax.devices("cpu")
        return len(allowed)
    os.sched_setaffinity(0, sorted(allowed)[:threads])
    try:
        jax.devices("cpu")
    finally:
        os.sched_setaffinity(0, allowed)
    return threads


def pt_packed_linear_setting(backend: str) -> bool | None:
    """The switch's setting a PyTorch backend runs under (:data:`PT_PACKED_LINEAR_SETTINGS`).

    Args:
        backend (str): a benchmark's backend name: ours (``"pt"``, ``"pt-packed"``, ``"pt+lora"``: a
            ``+variant`` runs as its base) or transformers' (``"hf-pt"``...: ``None``, it reads no switch).
    Returns:
        bool | None: the argument of ``nezha_zoo.pt.packed_linear`` around each call.
    Raises:
        KeyError: a PyTorch backend of ours with no declared setting.
    """
    base = backend.partition("+")[0]
    return None if base.startswith("hf-") else PT_PACKED_LINEAR_SETTINGS[base]


def reference_product(n: int) -> Callable[[], Any]:
    """One float32 ``n x n`` matrix product in numpy (the same library in every worker process)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return lambda: a @ b


def timed(runner: tuple[Callable, Callable], *inputs: Any) -> float:
    """Seconds of one ``materialise(run(*inputs))``."""
    run, materialise = runner
    t = time.perf_counter()
    materialise(run(*inputs))
    return time.perf_counter() - t


def time_interleaved(
    runners: dict[str, tuple[Callable, Callable]],
    reference: Callable[[], Any],
    inputs: tuple,
    min_time: float,
    repeats: int,
    max_rounds: int = 200,
) -> dict[str, Any]:
    """Time every runner of one process on ``inputs``, call by call in turn, with the reference product.

    Each runner is ``(run(*inputs) -> output, materialise(output))``.  Every runner is called twice
    first (the first call, which traces / compiles, is ``warmup_s``).  Each round then runs every
    runner once (the order rotates from round to round) and the reference matrix product twice, so
    a slow spell of a shared machine lands on all of them alike.  Rounds go on until every runner
    has ``min_time`` seconds of runs (at least ``repeats`` rounds, at most ``max_rounds``).

    Returns:
        dict: ``{"warmup_s": {name: s}, "times_s": {name: [s, ...]}, "reference_s": [s, ...]}``.
    """
    names = list(runners)
    out: dict[str, Any] = {"warmup_s": {}, "times_s": {b: [] for b in names}}
    for b in names:
        out["warmup_s"][b] = timed(runners[b], *inputs)  # traces / compiles
        timed(runners[b], *inputs)
    reference()
    out["reference_s"] = []
    start = time.perf_counter()
    k = 0
    while k < repeats or (time.perf_counter() - start < min_time * len(names) and k < max_rounds):
        for b in names[k % len(names) :] + names[: k % len(names)]:
            out["times_s"][b].append(timed(runners[b], *inputs))
        # The frameworks' worker threads spin for a while after a call and would slow the reference:
        # let them park first.
        time.sleep(REFERENCE_PAUSE_S)
        out["reference_s"] += [timed((reference, lambda out: out)) for _ in range(2)]
        k += 1
    return out


def matmul_rate(threads: int, n: int = REFERENCE_N, min_time: float = 3.0) -> dict[str, Any]:
    """The machine's float32 matrix-multiply rate (GFLOP/s): PyTorch (oneDNN/MKL) and numpy in turn, best of both.

    numpy's product is also the reference every worker times between its model runs;
    ``numpy_to_best`` (best rate / numpy's, measured here side by side) scales that reference to the
    faster library, so a model is never set against a slower matmul than the machine has.
    """
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    products = {"torch": lambda: torch.mm(a, b), "numpy": reference_product(n)}
    times: dict[str, list[float]] = {name: [] for name in products}
    for mm in products.values():
        mm()
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times["torch"]) < 5:
        for name, mm in products.items():  # alternating: both see the same machine
            times[name].append(timed((mm, lambda out: out)))
    rates = {name: 2 * n**3 / statistics.median(ts) / 1e9 for name, ts in times.items()}
    best = max(rates.values())
    return {"n": n, "gflops": best, "by_library": rates, "numpy_to_best": best / rates["numpy"]}


def versions() -> dict[str, str]:
    """Python's and the benchmarked distributions' versions."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in (
        "nezha-zoo", "torch", "tensorflow-cpu", "tf-keras", "keras", "jax", "flax", "optax", "transformers", "numpy",
    ):  # fmt: skip
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine(threads: int) -> dict[str, Any]:
    """:func:`nezha_zoo.hardware.machine_info` (CPU name, its vector / int8 / bf16 flags, cores,
    threads, platform) plus the load average when the run started."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {**machine_info(threads), "load_average": load}


def machine_line(m: dict[str, Any]) -> str:
    """One markdown line: CPU, flags, cores, threads and the load average when the run started."""
    flags = ", ".join(m.get("cpu_flags") or []) or "not read"
    load = " / ".join(map(str, m.get("load_average") or [])) or "not read"
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; CPU flags: {flags}; "
        f"load average (1 / 5 / 15 min) at the start: {load}."
    )


def ratio_cell(ratio: float) -> str:
    """``N.NNx``, rounded down (0.998 shows as 0.99x), bold below 1."""
    shown = f"{math.floor(ratio * 100) / 100:.2f}x"
    return shown if ratio >= 1.0 else f"**{shown}**"


# --- peak memory (resident set, Linux) -----------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident set size now (``VmRSS``), or None off Linux."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size since the last :func:`reset_peak_rss` (``VmHWM``)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Set the peak resident set size to the current one (``/proc/self/clear_refs`` = 5, Linux >= 4.0).

    Returns False where that is not possible; the peak then runs from the process's start.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_in_fresh_process(module: str, args: list[str], timeout: float, legacy_keras: bool = False) -> Any:
    """Run ``python -m module *args --result FILE`` in a fresh process and return the JSON it wrote to FILE.

    ``legacy_keras`` sets ``TF_USE_LEGACY_KERAS=1``: transformers' TF classes need tf-keras (Keras 2)
    as ``tf.keras``, while ours import Keras 3 as ``keras``, so both live in one process.

    Raises:
        RuntimeError: the process failed (the last lines of its output) or ran past ``timeout`` seconds.
    """
    env = dict(os.environ)
    if legacy_keras:
        env["TF_USE_LEGACY_KERAS"] = "1"
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, "-m", module, *args, "--result", result_path]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(" | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]))
        with open(result_path) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    finally:
        os.unlink(result_path)
