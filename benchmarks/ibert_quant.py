"""I-BERT: integer-only (quant-mode) forward time against float-mode forward time, per backend.

``python -m benchmarks.ibert_quant [--smoke] [--out DIR] [--repeats N] [--layers N] [--backends pt,transformers]``

One roberta-base-size model (hidden 768, 12 layers, 12 heads, intermediate 3072; vocabulary reduced to
1000, which changes only the embedding lookup), random weights calibrated by two training-mode
forwards, run in eval mode under ``torch.inference_mode`` / the backend's equivalent, at batch x length
1 x 128 and 8 x 128 (``--layers`` reduces the depth, for loaded machines).  The modes of one backend
and shape run call by call in turn (float, quant, ...), so a slow spell of a shared machine lands on
all of them alike; each figure is the median of ``--repeats`` timed forwards after one untimed
warm-up; torch uses 2 threads.  ``--smoke`` runs a tiny model in seconds (used by the tests).  The
configs are the tests' (``nezha_zoo.testing.IBERT_BASE``, ``IBERT_SMOKE``).

Where the CPU has int8 units (:func:`nezha_zoo.families.ibert.int8_products`), the backends with an
int8 path (pt, tf-xla, flax) also time quant mode with the exact float32 products instead
(``set_int8_products(False)``, the path of CPUs without them): ``float_products`` in the report.
The report's machine section lists the CPU flags (:func:`nezha_zoo.hardware.machine_info`).

Each backend is one function ``bench_<name>(config_kwargs, shapes, repeats) -> {mode: {shape: s}}``
registered in :data:`BACKENDS`; the TensorFlow and Flax columns are added the same way.  Results go
to ``<out>/ibert_quant[_smoke].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nezha_zoo.families.ibert import int8_products, set_int8_products
from nezha_zoo.hardware import machine_info
from nezha_zoo.testing import IBERT_BASE as BASE
from nezha_zoo.testing import IBERT_SMOKE as SMOKE
from nezha_zoo.testing import ibert_inputs

SHAPES = ((1, 128), (8, 128))
# one shape: every backend traces (TF, XLA, jax.jit) each mode once per shape, and those traces are
# nearly all of a smoke run's time
SMOKE_SHAPES = ((2, 8),)
THREADS = 2

Timings = dict[str, dict[str, float]]


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed call by call in turn after one warm-up call each."""
    for fn in fns.values():
        fn()  # warm-up (traces, weight quantization caches, allocator)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _products(enabled: bool | None, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with the int8-product switch set (traced functions read it when first called)."""

    def run():
        previous = set_int8_products(enabled)
        try:
            return fn()
        finally:
            set_int8_products(previous)

    return run


def _modes(fns: dict[str, Callable[[], Any]], has_int8_path: bool) -> dict[str, Callable[[], Any]]:
    """``{"float": f, "quant": q}`` plus ``quant_float_products`` where the int8 path is in use here."""
    out = {"float": fns["float"], "quant": _products(None, fns["quant"])}
    if has_int8_path and int8_products():
        out["quant_float_products"] = _products(False, fns["quant_float_products"])
    return out


def _by_mode(per_shape: dict[str, dict[str, float]]) -> Timings:
    """``{shape: {mode: s}}`` -> ``{mode: {shape: s}}``."""
    out: Timings = {}
    for shape, modes in per_shape.items():
        for mode, t in modes.items():
            out.setdefault(mode, {})[shape] = t
    return out


def _torch_timings(
    make_model: Callable[[bool], Any], config_kwargs: dict, shapes, repeats: int, has_int8_path: bool = False
) -> Timings:
    """Shared driver for the two PyTorch implementations: calibrate once, time the modes in turn."""
    import torch

    torch.set_num_threads(THREADS)
    # calibrate once (train-mode forwards, dropout off); both modes then load the same state
    calib = make_model(True)
    calib.train()
    with torch.no_grad():
        for s in range(2):
            x = ibert_inputs(*shapes[-1], config_kwargs["vocab_size"], seed=10 + s)
            calib(**{k: torch.from_numpy(v) for k, v in x.items()})
    state = calib.state_dict()
    models = {}
    for quant in (False, True):
        model = make_model(quant)
        model.load_state_dict(state)
        models[quant] = model.eval()
    per_shape = {}
    for b, L in shapes:
        x = {k: torch.from_numpy(v) for k, v in ibert_inputs(b, L, config_kwargs["vocab_size"]).items()}

        def run(model, x=x):
            def call():
                with torch.inference_mode():
                    model(**x)

            return call

        fns = {"float": run(models[False]), "quant": run(models[True]), "quant_float_products": run(models[True])}
        per_shape[f"{b}x{L}"] = _interleaved(_modes(fns, has_int8_path), repeats)
    return _by_mode(per_shape)


def bench_pt(config_kwargs: dict, shapes, repeats: int) -> Timings:
    """nezha_zoo's PyTorch ``IBertModel`` (exact integer kernels, :mod:`nezha_zoo.pt.quant`)."""
    import torch

    from nezha_zoo import IBertConfig
    from nezha_zoo.pt import IBertModel

    def make(quant: bool):
        torch.manual_seed(0)
        return IBertModel(IBertConfig(**config_kwargs, quant_mode=quant))

    return _torch_timings(make, config_kwargs, shapes, repeats, has_int8_path=True)


def bench_transformers(config_kwargs: dict, shapes, repeats: int) -> Timings:
    """transformers 4.57.6 ``IBertModel`` (float-emulated integers), for reference."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()

    def make(quant: bool):
        torch.manual_seed(0)
        return transformers.IBertModel(transformers.IBertConfig(**config_kwargs, quant_mode=quant))

    return _torch_timings(make, config_kwargs, shapes, repeats)


def _tf_timings(config_kwargs: dict, shapes, repeats: int, jit_compile: bool) -> Timings:
    """nezha_zoo's Keras ``TFIBertModel`` under ``tf.function`` (XLA when ``jit_compile``).

    One quant-mode model is calibrated (two training-mode forwards, dropout off); the float-mode model
    gets the very same variables.  The quant model's integer weights are frozen
    (``freeze_integer_weights``: quantized once, not on every call as transformers does).  The timed
    call is the traced forward on int32 ids and a mask.
    """
    import os

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(THREADS)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already initialised in this process: keep its pools
        pass
    from nezha_zoo import IBertConfig
    from nezha_zoo.tf import TFIBertModel

    quant = TFIBertModel(IBertConfig(**config_kwargs, quant_mode=True), seed=0)
    for s in range(2):
        x = ibert_inputs(*shapes[-1], config_kwargs["vocab_size"], seed=10 + s)
        quant(input_ids=x["input_ids"].astype(np.int32), attention_mask=x["attention_mask"], training=True)
    floating = TFIBertModel(IBertConfig(**config_kwargs, quant_mode=False), seed=0)
    source = quant.variables_by_key()
    for key, var in floating.variables_by_key().items():
        var.assign(source[key])
    quant.freeze_integer_weights()  # inference: integer weights computed once (same numbers)
    per_shape = {}
    for b, L in shapes:
        x = ibert_inputs(b, L, config_kwargs["vocab_size"])
        ids, mask = tf.constant(x["input_ids"], tf.int32), tf.constant(x["attention_mask"], tf.int32)

        def run(model, ids=ids, mask=mask):
            fn = tf.function(
                lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state,
                jit_compile=jit_compile,
            )
            return lambda: fn(ids, mask).numpy()

        fns = {"float": run(floating), "quant": run(quant), "quant_float_products": run(quant)}
        per_shape[f"{b}x{L}"] = _interleaved(_modes(fns, has_int8_path=jit_compile), repeats)
    return _by_mode(per_shape)


def bench_tf(config_kwargs: dict, shapes, repeats: int) -> Timings:
    """nezha_zoo's Keras 3 ``TFIBertModel`` under ``tf.function`` (graph mode, no XLA)."""
    return _tf_timings(config_kwargs, shapes, repeats, jit_compile=False)


def bench_tf_xla(config_kwargs: dict, shapes, repeats: int) -> Timings:
    """nezha_zoo's Keras 3 ``TFIBertModel`` under ``tf.function(jit_compile=True)`` (XLA)."""
    return _tf_timings(config_kwargs, shapes, repeats, jit_compile=True)


#: backend name -> timing function; the TF and Flax engineers register theirs here.
def bench_flax(config_kwargs: dict, shapes, repeats: int) -> Timings:
    """nezha_zoo's Flax ``FlaxIBertModel``, the wrapper's own compiled call (int8 x int8 -> int32
    ``dot_general`` products).

    Random weights (numpy seed 0, the spec's init), calibrated by two ``train=True`` forwards of the
    quant-mode model; every mode then runs the same params and buffers, on a wrapper of its own (each
    keeps its compiled programs; ``jit_after_calls=0``: the warm-up call compiles).  As PyTorch's cached
    quantized weights, the quant-mode calls quantize the weights once per params array, outside the
    compiled forward (``nezha_zoo.flax.quant.QUANTIZED``); a ``jax.jit`` of the wrapper call would trace
    the params and quantize them in every forward, as transformers.
    """
    from nezha_zoo import IBertConfig
    from nezha_zoo.flax import FlaxIBertModel

    quant = FlaxIBertModel(IBertConfig(**config_kwargs, quant_mode=True), seed=0)
    buffers = quant.buffers
    for s in range(2):
        x = ibert_inputs(*shapes[-1], config_kwargs["vocab_size"], seed=10 + s)
        _, state = quant(**x, buffers=buffers, train=True)
        buffers = state["buffers"]
    params = quant.params
    models = {
        "float": FlaxIBertModel(IBertConfig(**config_kwargs), _do_init=False),
        "quant": quant,
        # the int8-product switch is read when a program compiles: a wrapper (jit cache) of its own
        "quant_float_products": FlaxIBertModel(IBertConfig(**config_kwargs, quant_mode=True), _do_init=False),
    }
    for model in models.values():
        model.jit_after_calls = 0
    per_shape = {}
    for b, L in shapes:
        x = ibert_inputs(b, L, config_kwargs["vocab_size"])
        ids, mask = np.asarray(x["input_ids"]), np.asarray(x["attention_mask"])

        def run(model, ids=ids, mask=mask):
            state = {"buffers": buffers} if model.config.quant_mode else {}
            return lambda: model(ids, mask, params=params, **state).last_hidden_state.block_until_ready()

        fns = {mode: run(model) for mode, model in models.items()}
        per_shape[f"{b}x{L}"] = _interleaved(_modes(fns, has_int8_path=True), repeats)
    return _by_mode(per_shape)


BACKENDS: dict[str, Callable[[dict, Any, int], Timings]] = {
    "pt": bench_pt,
    "transformers": bench_transformers,
    "tf": bench_tf,
    "tf-xla": bench_tf_xla,
    "flax": bench_flax,
}


def _markdown(result: dict) -> str:
    shapes, m = result["shapes"], result["machine"]
    lines = [
        f"# I-BERT quant-mode vs float-mode forward ({result['model']})",
        "",
        f"Median of {result['repeats']} forwards after a warm-up, {THREADS} threads, {m['cpu']} ({m['cores']} cores), "
        f"CPU flags: {', '.join(m['cpu_flags']) or 'none'}.",
        "",
        "| backend | " + " | ".join(f"float {s} (ms) | quant {s} (ms) | quant/float {s}" for s in shapes) + " |",
        "|---|" + "---|---|---|" * len(shapes),
    ]
    for name, t in result["backends"].items():
        cells = []
        for s in shapes:
            f, q = t["float"][s], t["quant"][s]
            cells += [f"{f * 1e3:.1f}", f"{q * 1e3:.1f}", f"{q / f:.2f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("float_products"):
        lines += [
            "",
            "Quant mode with the exact float32 products instead of the int8 units (the path of CPUs "
            "without VNNI/AMX), timed in turn with the rows above:",
            "",
            "| backend | " + " | ".join(f"quant, float products {s} (ms) | its quant/float {s}" for s in shapes) + " |",
            "|---|" + "---|---|" * len(shapes),
        ]
        for name, t in result["float_products"].items():
            cells = []
            for s in shapes:
                q, f = t[s], result["backends"][name]["float"][s]
                cells += [f"{q * 1e3:.1f}", f"{q / f:.2f}x"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per figure")
    p.add_argument("--layers", type=int, default=None, help="encoder layers (default: the model's)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ",".join(BACKENDS))
    args = p.parse_args(argv)
    names = [n for n in args.backends.split(",") if n]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        p.error(f"unknown backends {unknown}; known: {sorted(BACKENDS)}")
    cfg = SMOKE if args.smoke else BASE
    if args.layers is not None:
        if args.layers < 1:
            p.error("--layers must be positive")
        cfg = dict(cfg, num_hidden_layers=args.layers)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    repeats = args.repeats or (3 if args.smoke else 5)
    result: dict[str, Any] = {
        "model": ("tiny (smoke)" if args.smoke else "roberta-base size, vocab 1000")
        + ("" if args.layers is None else f", {args.layers} layers"),
        "config": cfg,
        "shapes": [f"{b}x{L}" for b, L in shapes],
        "repeats": repeats,
        "threads": THREADS,
        "machine": machine_info(THREADS),
        "backends": {},
        "float_products": {},
    }
    for name in names:
        timings = BACKENDS[name](cfg, shapes, repeats)
        if "quant_float_products" in timings:
            result["float_products"][name] = timings.pop("quant_float_products")
        result["backends"][name] = timings
        sys.stdout.write(f"{name}: {json.dumps(timings)}\n")
        sys.stdout.flush()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "ibert_quant_smoke" if args.smoke else "ibert_quant"
    # write atomically: a concurrent reader never sees half a file
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", _markdown(result))):
        with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as f:
            f.write(text)
        Path(f.name).replace(out / (stem + suffix))
    sys.stdout.write(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
