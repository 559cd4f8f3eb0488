"""The float32 CPU inference products of a few rows, one thread, interleaved (issue #23, session 12).

Times ``F.linear`` (MKL) against the products :func:`nezha_zoo.pt.layers.linear_route` chooses among:
``addmm`` with the weight on the left (``wx``), oneDNN's ``_linear_pointwise`` on the plain weight
(``onednn``) and the same op with the weight as its left operand (``onednn_wx``), plus ``addmv`` at one
row.  Each product reads its weight from DRAM, as in a base model's forward: the timed loop cycles
through copies of the weight totalling :data:`COLD_BYTES` (``--hot`` times one copy from the cache).
Run it in a fresh process with ``MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`` for an
AVX2-only machine.  Prints one line per (shape, rows): median microseconds, speed against
``F.linear``, the weight's bytes read per second, min-max; ``--out`` writes the medians as json.

``--others tf,jax`` adds, on the same weights, TF's and XLA's products as our Keras and Flax layers run
them: ``x @ K + b`` with the kernel ``K`` in their (in, out) layout, every copy's product in one
``tf.function`` / jitted call (so the time is the products', not the per-call dispatch; JAX's compiled
with the options of the Flax wrapper's forward, :func:`nezha_zoo.flax.layers.inference_jit`), and
``read``: PyTorch summing each copy, the rate one thread streams the same bytes at.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from benchmarks.harness import set_threads

#: The weights cycled through per product (more than any last-level cache of the machines measured).
COLD_BYTES = 400e6
#: Block products of Electra-base / MPT-125M (in, out, bias) and vocabulary projections.
DEFAULT_SHAPES = "768:768:b,768:3072:b,3072:768:b,768:2304:n"


def _products(torch, weights, biases, x) -> dict[str, Callable]:
    """The candidate products of ``x`` (rows, in), each taking the next weight copy in turn."""
    F = torch.nn.functional
    lp = torch.ops.mkldnn._linear_pointwise
    turn = itertools.cycle(range(len(weights)))

    def linear():
        k = next(turn)
        return F.linear(x, weights[k], biases[k])

    def wx():
        k = next(turn)
        w, b = weights[k], biases[k]
        return (torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())).t().contiguous()

    def onednn():
        k = next(turn)
        return lp(x, weights[k], biases[k], "none", [], "")

    def onednn_wx():
        k = next(turn)
        out = lp(weights[k], x, None, "none", [], "").t().contiguous()
        return out if biases[k] is None else out.add_(biases[k])

    def mv():
        k = next(turn)
        w, b = weights[k], biases[k]
        return (torch.mv(w, x[0]) if b is None else torch.addmv(b, w, x[0]))[None]

    found = {"F.linear": linear, "wx": wx, "onednn": onednn, "onednn_wx": onednn_wx}
    if x.shape[0] == 1:
        found["mv"] = mv
    return found


def _reader(weights) -> Callable:
    """Sums the next weight copy in turn: one thread reading the same bytes as a product, nothing else."""
    turn = itertools.cycle(weights)
    return lambda: next(turn).sum()


def _other_products(framework: str, weights, biases, x) -> tuple[Callable, Callable]:
    """``framework``'s product ``x @ K + b`` on every copy in one call (kernels (in, out), as its layers
    keep them).  Returns ``(run_all, first)``: ``run_all()`` runs every copy's product to completion,
    ``first()`` returns copy 0's result as a numpy array (checked against ``F.linear``)."""
    kernels = [w.t().contiguous().numpy() for w in weights]
    bias_arrays = [None if b is None else b.numpy() for b in biases]
    rows = x.numpy()
    if framework == "tf":
        import tensorflow as tf

        ks = [tf.Variable(k) for k in kernels]
        bs = [None if b is None else tf.Variable(b) for b in bias_arrays]
        xs = tf.constant(rows)

        @tf.function
        def every(inputs):
            return [tf.matmul(inputs, k) if b is None else tf.matmul(inputs, k) + b for k, b in zip(ks, bs)]

        return (lambda: every(xs)[-1].numpy()), (lambda: every(xs)[0].numpy())
    import jax.numpy as jnp

    from nezha_zoo.flax.layers import inference_jit  # the options the Flax wrapper's forward compiles with

    ks = [jnp.asarray(k) for k in kernels]
    bs = [None if b is None else jnp.asarray(b) for b in bias_arrays]
    xs = jnp.asarray(rows)
    every = inference_jit(lambda inputs, ks, bs: [inputs @ k if b is None else inputs @ k + b for k, b in zip(ks, bs)])
    return (lambda: every(xs, ks, bs)[-1].block_until_ready()), (lambda: np.asarray(every(xs, ks, bs)[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="in:out:b|n (with or without bias), comma-separated")
    parser.add_argument("--rows", default="1,2,4,8,16,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hot", action="store_true", help="one weight copy, read from the cache")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    parser.add_argument("--out", help="write the medians (microseconds) here as json")
    parser.add_argument("--others", default="", help="also time these frameworks' products: tf, jax")
    args = parser.parse_args(argv)
    others = [f for f in args.others.split(",") if f]
    if set(others) - {"tf", "jax"}:
        parser.error(f"--others takes tf and jax, not {sorted(set(others) - {'tf', 'jax'})}")
    set_threads(1, jax="jax" in others)
    if "jax" in others:
        import jax

        jax.config.update("jax_default_matmul_precision", "float32")
    import torch

    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    result = {}
    for spec in args.shapes.split(","):
        n_in, n_out, has_bias = spec.split(":")
        n_in, n_out = int(n_in), int(n_out)
        copies = 1 if args.hot else max(1, int(COLD_BYTES / (4 * n_in * n_out)))
        weights = [torch.randn(n_out, n_in, generator=gen) * 0.02 for _ in range(copies)]
        biases = [torch.randn(n_out, generator=gen) if has_bias == "b" else None for _ in range(copies)]
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, n_in, generator=gen)
            products = _products(torch, weights, biases, x)
            reps = copies if copies > 1 else 200
            # (callable, calls per timing, products per call): ours one product a call, the others' every copy
            timed = {name: (product, reps, 1) for name, product in products.items()}
            with torch.no_grad():
                want = torch.nn.functional.linear(x, weights[0], biases[0])
                for name, product in products.items():  # each starts at copy 0 once: check it
                    torch.testing.assert_close(product(), want, rtol=1e-4, atol=1e-4, msg=name)
                    for _ in range(copies - 1):
                        product()
                for framework in others:
                    every, first = _other_products(framework, weights, biases, x)
                    torch.testing.assert_close(
                        torch.from_numpy(np.array(first())), want, rtol=1e-4, atol=1e-4, msg=framework
                    )
                    every()
                    timed[framework] = (every, max(1, 200 // copies), copies)
                if others:
                    timed["read"] = (_reader(weights), reps, 1)
                times: dict[str, list[float]] = {name: [] for name in timed}
                for _ in range(args.rounds):
                    for name, (call, calls, per_call) in timed.items():
                        start = clock()
                        for _ in range(calls):
                            call()
                        times[name].append((clock() - start) / (calls * per_call) * 1e6)
            base = statistics.median(times["F.linear"])
            cells = []
            for name, t in times.items():
                med = statistics.median(t)
                rate = 4 * n_in * n_out / med / 1e3  # GB/s of weight read
                cells.append(f"{name}={med:.1f}us (x{base / med:.2f}, {rate:.1f}GB/s, {min(t):.0f}-{max(t):.0f})")
                result[f"{n_in}->{n_out}|{rows}|{name}"] = med
            label = f"{n_in}->{n_out}{'' if has_bias == 'b' else ' no bias'} rows={rows}"
            sys.stdout.write(f"{label}  {'  '.join(cells)}\n")
            sys.stdout.flush()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
