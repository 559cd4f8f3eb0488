"""I-BERT: integer-only (quant-mode) forward time against float-mode forward time, per backend.

``python -m benchmarks.ibert_quant [--smoke] [--out DIR] [--repeats N] [--backends pt,transformers]``

One roberta-base-size model (hidden 768, 12 layers, 12 heads, intermediate 3072; vocabulary reduced to
1000, which changes only the embedding lookup), random weights calibrated by two training-mode
forwards, run in eval mode under ``torch.inference_mode`` / the backend's equivalent, at batch x length
1 x 128 and 8 x 128.  Each figure is the median of ``--repeats`` timed forwards after one untimed
warm-up; torch uses 2 threads.  ``--smoke`` runs a tiny model in seconds (used by the tests).

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

from nezha_zoo.hardware import machine_info

BASE = dict(
    vocab_size=1000,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=514,
    layer_norm_eps=1e-5,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
SMOKE = dict(BASE, vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
SHAPES = ((1, 128), (8, 128))
SMOKE_SHAPES = ((1, 8), (2, 8))
THREADS = 2

Timings = dict[str, dict[str, float]]


def _inputs(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, seq_len), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (weight quantization caches, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _torch_timings(make_model: Callable[[bool], Any], config_kwargs: dict, shapes, repeats: int) -> Timings:
    """Shared driver for the two PyTorch implementations: calibrate once, time both modes."""
    import torch

    torch.set_num_threads(THREADS)
    out: Timings = {}
    state = None
    for quant in (False, True):
        model = make_model(quant)
        if state is None:
            # calibrate once (train-mode forwards, dropout off); both modes then load the same state
            calib = make_model(True)
            calib.train()
            with torch.no_grad():
                for s in range(2):
                    x = _inputs(*shapes[-1], config_kwargs["vocab_size"], seed=10 + s)
                    calib(**{k: torch.from_numpy(v) for k, v in x.items()})
            state = calib.state_dict()
        model.load_state_dict(state)
        model.eval()
        times = {}
        for b, L in shapes:
            x = {k: torch.from_numpy(v) for k, v in _inputs(b, L, config_kwargs["vocab_size"]).items()}

            def run(model=model, x=x):
                with torch.inference_mode():
                    model(**x)

            times[f"{b}x{L}"] = _median_time(run, repeats)
        out["quant" if quant else "float"] = times
    return out


def bench_pt(config_kwargs: dict, shapes, repeats: int) -> Timings:
    """nezha_zoo's PyTorch ``IBertModel`` (exact integer kernels, :mod:`nezha_zoo.pt.quant`)."""
    import torch

    from nezha_zoo import IBertConfig
    from nezha_zoo.pt import IBertModel

    def make(quant: bool):
        torch.manual_seed(0)
        return IBertModel(IBertConfig(**config_kwargs, quant_mode=quant))

    return _torch_timings(make, config_kwargs, shapes, repeats)


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
        x = _inputs(*shapes[-1], config_kwargs["vocab_size"], seed=10 + s)
        quant(input_ids=x["input_ids"].astype(np.int32), attention_mask=x["attention_mask"], training=True)
    floating = TFIBertModel(IBertConfig(**config_kwargs, quant_mode=False), seed=0)
    source = quant.variables_by_key()
    for key, var in floating.variables_by_key().items():
        var.assign(source[key])
    quant.freeze_integer_weights()  # inference: integer weights computed once (same numbers)
    out: Timings = {}
    for mode, model in (("float", floating), ("quant", quant)):
        fn = tf.function(
            lambda ids, mask, model=model: model(input_ids=ids, attention_mask=mask).last_hidden_state,
            jit_compile=jit_compile,
        )
        times = {}
        for b, L in shapes:
            x = _inputs(b, L, config_kwargs["vocab_size"])
            ids, mask = tf.constant(x["input_ids"], tf.int32), tf.constant(x["attention_mask"], tf.int32)
            times[f"{b}x{L}"] = _median_time(lambda fn=fn, ids=ids, mask=mask: fn(ids, mask).numpy(), repeats)
        out[mode] = times
    return out


def bench_tf(config_kwargs: dict, shapes, repeats: int) -> Timings:
    """nezha_zoo's Keras 3 ``TFIBertModel`` under ``tf.function`` (graph mode, no XLA)."""
    return _tf_timings(config_kwargs, shapes, repeats, jit_compile=False)


def bench_tf_xla(config_kwargs: dict, shapes, repeats: int) -> Timings:
    """nezha_zoo's Keras 3 ``TFIBertModel`` under ``tf.function(jit_compile=True)`` (XLA)."""
    return _tf_timings(config_kwargs, shapes, repeats, jit_compile=True)


#: backend name -> timing function; the TF and Flax engineers register theirs here.
def bench_flax(config_kwargs: dict, shapes, repeats: int) -> Timings:
    """nezha_zoo's Flax ``FlaxIBertModel`` under ``jax.jit`` (int8 x int8 -> int32 ``dot_general`` products).

    Random weights (numpy seed 0, the spec's init), calibrated by two ``train=True`` forwards of the
    quant-mode model; both modes then run the same params and buffers.  The weight quantization is
    part of every quant-mode forward, as in transformers.
    """
    import jax

    from nezha_zoo import IBertConfig
    from nezha_zoo.flax import FlaxIBertModel

    quant = FlaxIBertModel(IBertConfig(**config_kwargs, quant_mode=True), seed=0)
    buffers = quant.buffers
    for s in range(2):
        x = _inputs(*shapes[-1], config_kwargs["vocab_size"], seed=10 + s)
        _, state = quant(**x, buffers=buffers, train=True)
        buffers = state["buffers"]
    out: Timings = {}
    for mode in ("float", "quant"):
        model = quant if mode == "quant" else FlaxIBertModel(IBertConfig(**config_kwargs), _do_init=False)
        fwd = jax.jit(lambda p, b, ids, m, model=model: model(ids, m, params=p, buffers=b).last_hidden_state)
        times = {}
        for b, L in shapes:
            x = _inputs(b, L, config_kwargs["vocab_size"])
            ids, mask = jax.numpy.asarray(x["input_ids"]), jax.numpy.asarray(x["attention_mask"])

            def run(fwd=fwd, ids=ids, mask=mask):
                fwd(quant.params, buffers, ids, mask).block_until_ready()

            times[f"{b}x{L}"] = _median_time(run, repeats)
        out[mode] = times
    return out


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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per figure")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ",".join(BACKENDS))
    args = p.parse_args(argv)
    names = [n for n in args.backends.split(",") if n]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        p.error(f"unknown backends {unknown}; known: {sorted(BACKENDS)}")
    cfg = SMOKE if args.smoke else BASE
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    repeats = args.repeats or (3 if args.smoke else 5)
    result: dict[str, Any] = {
        "model": "tiny (smoke)" if args.smoke else "roberta-base size, vocab 1000",
        "config": cfg,
        "shapes": [f"{b}x{L}" for b, L in shapes],
        "repeats": repeats,
        "threads": THREADS,
        "machine": machine_info(THREADS),
        "backends": {},
    }
    for name in names:
        result["backends"][name] = BACKENDS[name](cfg, shapes, repeats)
        sys.stdout.write(f"{name}: {json.dumps(result['backends'][name])}\n")
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
