"""Latency of one small forward pass (1 x 16 by default) in every framework, interleaved in one process.

``python -m benchmarks.small_shapes`` saves one seeded base checkpoint (Electra-base unless
``--family``), loads it into every backend below in the same process, and then times one call of each
in turn, the order rotating every round, so that a slow spell of a shared machine lands on all of
them alike.  The figure is the median over the rounds (with the minimum and the interquartile spread).

Backends, each the way a user calls it:

* ``pt``: ``model(input_ids=..., attention_mask=...)`` under ``torch.inference_mode`` (eager);
* ``pt-packed``: the same with the opt-in packed weights on (``nezha_zoo.pt.packed_linear()``);
* ``tf``: ``model(...)`` called directly (Keras eager);
* ``tf-function``: the same call inside one ``tf.function`` (no XLA);
* ``tf-packed``: the same ``tf.function`` with packed kernels on (``nezha_zoo.tf.packed_linear()``: blocked
  copies of the kernels, :class:`nezha_zoo.tf.layers.Dense`; the switch is read when the function traces);
* ``tf-predict``: ``model.predict({...}, verbose=0)``, Keras' own inference loop (a ``tf.function``,
  XLA only off-CPU: Keras' ``jit_compile="auto"``), its per-call data handling included;
* ``flax``: ``model(...)`` called directly (no ``jax.jit`` of the user's own): the wrapper runs a
  repeated call signature through its cached ``jax.jit`` (``jit_after_calls``);
* ``flax-packed``: the same with packed kernels on (``nezha_zoo.flax.packed_linear()``: blocked copies of
  the block kernels, :class:`nezha_zoo.flax.layers.Dense`);
* ``flax-op-by-op``: the same call with ``model.jit_after_calls = None`` (op by op, as transformers'
  Flax classes; what ``flax`` was before the cached ``jax.jit``);
* ``flax-jit``: ``jax.jit(lambda params, ids, mask: model(ids, attention_mask=mask, params=params))``;
* ``hf-pt``: transformers' PyTorch class on the same checkpoint (the oracle, when installed).

``--threads N`` sets every framework's intra-op threads before it starts (PyTorch, MKL, TF by their
variables; JAX's CPU client, whose pool no flag sizes, is started on N CPUs: ``harness.start_jax``);
``--pause S`` is the idleness before each call (default :data:`PAUSE_S`: a sporadic request; 0.01 and less:
calls that follow each other, where the runtimes' worker threads are still awake); ``--isolate`` runs each
backend alone in a fresh process, one after the other (as a user runs one framework), instead of
interleaved in one.

``--clock cpu`` times the process's CPU seconds (``time.process_time``) instead of the wall clock;
with ``--threads 1`` that measures the work of a call on a shared machine whose wall clock measures
the neighbours (an idle worker thread that spins is counted, so keep one thread).

Inputs arrive as numpy arrays (int64, as a tokenizer returns them) and the conversion to each
framework's tensor is part of the timed call.  Output: a markdown table on stdout and, with
``--out DIR``, ``small_shapes.json`` and ``small_shapes.md`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.forward import BENCH_CONFIGS, SMOKE_CONFIGS, _set_threads
from benchmarks.harness import machine, machine_line, pt_packed_linear_setting, run_in_fresh_process, write_atomic
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.registry import get_family

#: ``pt-packed``: PyTorch eager with the opt-in packed weights (:func:`nezha_zoo.pt.set_packed_linear`).
BACKENDS = (
    "pt",
    "pt-packed",
    "tf",
    "tf-function",
    "tf-packed",
    "tf-predict",
    "flax",
    "flax-packed",
    "flax-op-by-op",
    "flax-jit",
    "hf-pt",
)
#: Pause before each timed call (``--pause``): three frameworks' thread pools share the cores, and one
#: that is still spinning after its call would be timed as part of the next backend's.  It also makes
#: each call a sporadic request's, on a machine idle for that long: on the 2-core VM measured, TF's and
#: XLA's two-thread pools then take 5-11 ms longer over an Electra-base 1x16 call than when calls
#: follow each other within 10 ms (docs/benchmarks/small_shapes.md, "Session 14").
PAUSE_S = 0.1
#: Seconds one backend's process may take with ``--isolate`` (load, warm-up and the rounds).
ISOLATE_TIMEOUT_S = 1800


def _runner(backend: str, family: str, path: str, threads: int) -> Callable[[np.ndarray, np.ndarray], Any]:
    """Load ``path`` into ``backend``; returns ``call(ids, mask)`` that runs one pass to completion."""
    name = get_family(family).class_name("Model", backend.split("-")[0] if backend != "hf-pt" else "pt")
    if backend in ("pt", "pt-packed", "hf-pt"):
        import torch

        from nezha_zoo.pt import packed_linear

        if threads > 0:
            torch.set_num_threads(threads)
        if backend in ("pt", "pt-packed"):
            import nezha_zoo.pt as module
        else:
            import transformers as module

            module.logging.set_verbosity_error()
        model = getattr(module, name).from_pretrained(path).eval()

        setting = pt_packed_linear_setting(backend)  # process-wide: set around each call, as backends take turns

        def run_pt(ids, mask):
            with torch.inference_mode(), packed_linear(setting):
                return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0]

        return run_pt
    if backend.startswith("tf"):
        import tensorflow as tf

        import nezha_zoo.tf as module

        model = getattr(module, name).from_pretrained(path)
        if backend == "tf":
            return lambda ids, mask: model(input_ids=ids, attention_mask=mask)[0].numpy()
        if backend == "tf-predict":
            return lambda ids, mask: model.predict({"input_ids": ids, "attention_mask": mask}, verbose=0)[0]
        fn = tf.function(lambda ids, mask: model(input_ids=ids, attention_mask=mask, training=False)[0])
        packed = backend == "tf-packed"  # read at trace time; set around each call all the same

        def run_tf(ids, mask):
            with module.packed_linear(packed):
                return fn(tf.constant(ids), tf.constant(mask)).numpy()

        return run_tf
    import jax

    import nezha_zoo.flax as module

    model = getattr(module, name).from_pretrained(path)
    if backend in ("flax", "flax-packed", "flax-op-by-op"):
        if backend == "flax-op-by-op":
            model.jit_after_calls = None
        packed = backend == "flax-packed"  # a process-wide switch: set around each call, as backends take turns

        def run_flax(ids, mask):
            with module.packed_linear(packed):
                return model(ids, attention_mask=mask)[0].block_until_ready()

        return run_flax
    fn = jax.jit(lambda params, ids, mask: model(ids, attention_mask=mask, params=params)[0])
    params = model.params
    return lambda ids, mask: fn(params, ids, mask).block_until_ready()


def measure(
    family: str,
    path: str,
    backends: list[str],
    batch: int,
    seq: int,
    rounds: int,
    threads: int,
    clock: Callable[[], float] = time.perf_counter,
    pause: float = PAUSE_S,
) -> dict[str, Any]:
    """Warm every backend up, then ``rounds`` rotating rounds of one call each, ``pause`` seconds before
    each; times in seconds."""
    vocab = get_family(family).config_class.from_pretrained(path).vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), np.int64)
    runners, warmup = {}, {}
    for b in backends:
        runners[b] = _runner(b, family, path, threads)
        t = time.perf_counter()
        runners[b](ids, mask)  # traces / compiles
        warmup[b] = time.perf_counter() - t
        runners[b](ids, mask)
    times: dict[str, list[float]] = {b: [] for b in backends}
    for k in range(rounds):
        for b in backends[k % len(backends) :] + backends[: k % len(backends)]:
            if pause > 0:
                time.sleep(pause)  # let the last framework's worker threads park (they spin a while)
            t = clock()
            runners[b](ids, mask)
            times[b].append(clock() - t)
    return {"family": family, "batch": batch, "seq": seq, "warmup_s": warmup, "times_s": times, "pause_s": pause}


def measure_isolated(args: argparse.Namespace, backends: list[str]) -> dict[str, Any]:
    """Each backend alone in a fresh process (as a user runs one framework), one after the other, with
    the same options; the results merged as :func:`measure`'s."""
    merged: dict[str, Any] = {"warmup_s": {}, "times_s": {}, "isolated": True, "pid": {}, "jax_cpus": {}}
    for b in backends:
        argv = ["--family", args.family, "--shape", args.shape, "--backends", b, "--rounds", str(args.rounds)]
        argv += ["--threads", str(args.threads), "--clock", args.clock, "--pause", str(args.pause)]
        argv += ["--workdir", args.workdir] + (["--smoke"] if args.smoke else [])
        got = run_in_fresh_process("benchmarks.small_shapes", argv, ISOLATE_TIMEOUT_S)
        for key in ("family", "batch", "seq", "pause_s"):
            merged[key] = got[key]
        for key in ("warmup_s", "times_s"):
            merged[key][b] = got[key][b]
        merged["pid"][b], merged["jax_cpus"][b] = got["pid"], got["jax_cpus"]
    return merged


def table(result: dict[str, Any]) -> str:
    """Markdown: median, min, spread (IQR / median) in ms and the ratio to the fastest median."""
    stats = {}
    for b, ts in result["times_s"].items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        stats[b] = (med, min(ts), (q3 - q1) / med)
    best = min(s[0] for s in stats.values())
    m = result.get("machine", {})
    where = "each backend alone in its process" if result.get("isolated") else "interleaved in one process"
    lines = [
        f"{result['family']} {result['batch']}x{result['seq']}, {len(next(iter(result['times_s'].values())))} rounds, "
        f"{result.get('clock', 'wall')} clock, {m.get('threads', '?')} thread(s) per "
        f"framework, {result.get('pause_s', PAUSE_S)} s pause before each call, {where}.",
        *([machine_line(m)] if "cpu" in m else []),
        "",
        "| backend | median ms | min ms | spread | / fastest |",
        "|---|---:|---:|---:|---:|",
    ]
    for b, (med, lo, spread) in stats.items():
        lines.append(f"| {b} | {med * 1e3:.1f} | {lo * 1e3:.1f} | {spread:.0%} | {med / best:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="electra")
    parser.add_argument("--shape", default="1x16", help="BATCHxSEQ")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="per framework; 0 leaves them alone")
    parser.add_argument("--pause", type=float, default=PAUSE_S, help="seconds of idleness before each call")
    parser.add_argument("--isolate", action="store_true", help="each backend alone in a fresh process")
    parser.add_argument("--result", help=argparse.SUPPRESS)  # --isolate's worker: its result as json
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--smoke", action="store_true", help="tiny config (seconds)")
    parser.add_argument("--workdir", help="keep the checkpoint here (reused across runs)")
    parser.add_argument("--out", help="write small_shapes.json and small_shapes.md here")
    args = parser.parse_args(argv)
    batch, seq = (int(x) for x in args.shape.split("x"))
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    if args.pause < 0:
        parser.error("--pause must be >= 0")
    jax_cpus = None
    if args.threads > 0 and not args.isolate:  # 0: leave the frameworks' (or the caller's) settings alone
        jax_cpus = _set_threads(args.threads, jax=any(b.startswith("flax") for b in backends))
    if "hf-pt" in backends:
        try:
            import transformers  # noqa: F401
        except ImportError:
            backends.remove("hf-pt")
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="nezha_small_")
    path = os.path.join(args.workdir, f"{args.family}-{'smoke' if args.smoke else 'base'}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        fam = get_family(args.family)
        fields = SMOKE_CONFIGS[args.family] if args.smoke else BENCH_CONFIGS[args.family][0]
        config = fam.config_class(**fields)
        spec = fam.model_spec(config, "Model")
        save_weights(path, config, spec, fam, random_weights(spec, config, seed=0))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    m = machine(args.threads)
    if args.isolate:
        result = measure_isolated(args, backends)
    else:
        result = measure(args.family, path, backends, batch, seq, args.rounds, args.threads, clock, args.pause)
    result["machine"] = m
    result["clock"] = args.clock
    if not args.isolate:
        result["pid"], result["jax_cpus"] = os.getpid(), jax_cpus
    if args.result:  # --isolate's worker
        write_atomic(args.result, json.dumps(result))
        return 0
    text = table(result)
    sys.stdout.write(text + "\n")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_atomic(os.path.join(args.out, "small_shapes.json"), json.dumps(result, indent=1))
        write_atomic(os.path.join(args.out, "small_shapes.md"), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
