"""Forward-pass speed of every family in every backend, beside transformers, on the same weights.

``make bench`` (or ``python -m benchmarks.forward``) measures, for each family at its base size
(XLM-R-XL and MPT on reduced configs, see :data:`BENCH_CONFIGS`), the base model's forward pass:

* ours: PyTorch eager (``pt``), eager with the opt-in packed weights (``pt-packed``,
  :func:`nezha_zoo.pt.set_packed_linear`) and ``torch.compile`` (``pt-compile``), TensorFlow under
  ``tf.function`` without and with XLA (``tf``, ``tf-xla``) and with the packed weights (``tf-packed``),
  Flax under :func:`nezha_zoo.flax.inference_jit` (``jax.jit`` with our XLA CPU options; ``flax``) and
  the wrapper's own compiled call with the packed weights (``flax-packed``): the one switch of
  :mod:`nezha_zoo.packing`, which acts at 32 token rows or fewer;
* transformers 4.57.6 for the same framework where it has the class: ``hf-pt`` (all six families) and
  ``hf-pt-compile`` (its model under the same ``torch.compile``: a compiling user compiles both),
  ``hf-tf`` / ``hf-tf-xla`` (Electra, MPNet; under tf-keras, which coexists with our Keras 3) and
  ``hf-flax`` (Electra).

Every (family, framework) runs in a fresh process with the same thread count on one seeded
checkpoint per family, and that process holds all of the framework's backends, ours and
transformers': they are timed call by call in turn, with a float32 matrix product after each round.
On a shared machine whose speed drifts by tens of percent from one minute to the next, this is what
makes "ours vs transformers" and "share of the matmul rate" comparisons of the same moment.
Shapes: batch 1 x 16 tokens (latency), 8 x 128 (throughput), 1 x 512 (long).  Warm-up (tracing,
compilation) is timed separately and excluded; the figure is the median of repeated runs.
FLOPs are counted from the family's parameter
spec: every dense weight is one multiply-add per token (per sequence for the pooler), plus the two
attention products.

Output under ``--out`` (default ``benchmarks/results``): ``forward.json`` (machine, versions, every
measurement), ``forward.md`` (tables and target verdicts) and ``forward.png`` (chart).
``--smoke`` runs tiny configs in-process in seconds; CI runs that to keep this script working.
``--render forward.json`` writes the markdown and the chart again from saved measurements.  The last
full run is committed in ``docs/benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.harness import (
    REFERENCE_N,
    SMOKE_REFERENCE_N,
    machine_line,
    matmul_rate,
    run_in_fresh_process,
    time_interleaved,
)
from benchmarks.harness import machine as _machine
from benchmarks.harness import pt_packed_linear_setting as _pt_packed_linear_setting
from benchmarks.harness import reference_product as _reference_product
from benchmarks.harness import set_threads as _set_threads
from benchmarks.harness import timed as _timed
from benchmarks.harness import versions as _versions
from benchmarks.harness import write_atomic as _write_atomic
from nezha_zoo.config import PretrainedConfig
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.param import Kind
from nezha_zoo.spec.registry import get_family

#: (family key, config fields, what the size stands for).  Sizes of the published base checkpoints;
#: XLM-R-XL keeps its layer width but only 2 of 36 layers and a small vocabulary (the forward pass of
#: the base model never touches more than the looked-up rows); MPT's smallest release is 7B, so a
#: 125M-parameter MPT (GPT-2-small shape) stands in.
BENCH_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "electra": (
        dict(vocab_size=30522, embedding_size=768, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, max_position_embeddings=512),
        "electra-base",
    ),
    "nezha": (
        dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             max_position_embeddings=512, max_relative_position=64),
        "nezha-cn-base",
    ),
    "mpnet": (
        dict(vocab_size=30527, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             max_position_embeddings=514),
        "mpnet-base",
    ),
    "ibert": (
        dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             max_position_embeddings=514, quant_mode=False),
        "ibert-roberta-base (float mode)",
    ),
    "xlm_roberta_xl": (
        dict(vocab_size=8192, hidden_size=2560, num_hidden_layers=2, num_attention_heads=32, intermediate_size=10240,
             max_position_embeddings=514),
        "xlm-roberta-xl layer width, 2 of 36 layers",
    ),
    "mpt": (
        dict(vocab_size=50368, d_model=768, n_heads=12, n_layers=12, max_seq_len=2048),
        "mpt 125M (GPT-2-small shape)",
    ),
}  # fmt: skip

#: Tiny configs for ``--smoke``.
SMOKE_CONFIGS: dict[str, dict[str, Any]] = {
    "electra": dict(vocab_size=99, embedding_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=37, max_position_embeddings=64),
    "nezha": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64, max_relative_position=8),
    "mpnet": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=66),
    "ibert": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=66),
    "xlm_roberta_xl": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=66),
    "mpt": dict(vocab_size=99, d_model=32, n_heads=4, n_layers=2, max_seq_len=64),
}  # fmt: skip

SHAPES = ((1, 16), (8, 128), (1, 512))
#: The throughput shape: the matmul-rate target and the operator profile are taken here.
PROFILE_SHAPE = (8, 128)
SMOKE_SHAPES = ((1, 8), (2, 16))

#: Backend -> (framework, implementation, compile mode).
BACKENDS: dict[str, tuple[str, str, str]] = {
    "pt": ("pt", "ours", "eager"),
    "pt-packed": ("pt", "ours", "eager+packed"),
    "pt-compile": ("pt", "ours", "torch.compile"),
    "tf": ("tf", "ours", "tf.function"),
    "tf-xla": ("tf", "ours", "tf.function+XLA"),
    "tf-packed": ("tf", "ours", "tf.function+packed"),
    "flax": ("flax", "ours", "jax.jit"),
    "flax-packed": ("flax", "ours", "jax.jit+packed"),
    "hf-pt": ("pt", "transformers", "eager"),
    "hf-pt-compile": ("pt", "transformers", "torch.compile"),
    "hf-tf": ("tf", "transformers", "tf.function"),
    "hf-tf-xla": ("tf", "transformers", "tf.function+XLA"),
    "hf-flax": ("flax", "transformers", "jax.jit"),
}

#: Families with transformers classes per framework (4.57.6).
TRANSFORMERS_HAS = {
    "pt": {"electra", "nezha", "mpnet", "ibert", "xlm_roberta_xl", "mpt"},
    "tf": {"electra", "mpnet"},
    "flax": {"electra"},
}

#: The throughput target: this fraction of the measured float32 matrix-multiply rate at PROFILE_SHAPE.
MATMUL_TARGET = 0.85

#: Extra (query x relative-table) products per layer, in units of one attention product: Nezha adds
#: a relative key term and a relative value term.
RELATIVE_PRODUCTS = {"nezha": 2}


def bench_config(family: str, smoke: bool = False) -> PretrainedConfig:
    """The benchmark config of ``family`` (base size, or tiny with ``smoke``)."""
    fields = SMOKE_CONFIGS[family] if smoke else BENCH_CONFIGS[family][0]
    return get_family(family).config_class(**fields)


def forward_flops(family: str, config: PretrainedConfig, batch: int, seq: int) -> int:
    """Floating-point operations of the base model's forward pass (multiply-add = 2), from the spec."""
    spec = get_family(family).model_spec(config, "Model")
    tokens = batch * seq
    flops = 0
    for p in spec:
        if p.kind is Kind.DENSE:
            per_use = 2 * math.prod(p.shape)
            flops += per_use * (batch if p.name.startswith("pooler.") else tokens)
    layers, hidden = config.num_hidden_layers, config.hidden_size
    products = 2 + RELATIVE_PRODUCTS.get(family, 0)  # q.k^T and probs.v (+ relative terms)
    flops += layers * products * 2 * batch * seq * seq * hidden
    return flops


# --- the worker: one (family, framework) in its own process --------------------------------------


def _make_runner(
    backend: str, family: str, path: str, threads: int
) -> tuple[Callable[[np.ndarray, np.ndarray], Any], Callable]:
    """Load ``path`` and return ``(run(ids, mask) -> output, materialise(output))``."""
    fw, impl, mode = BACKENDS[backend]
    fam = get_family(family)
    name = fam.class_name("Model", fw)
    if fw == "pt":
        import torch

        torch.set_num_threads(threads)
        if impl == "ours":
            import nezha_zoo.pt as module
        else:
            import transformers as module

            module.logging.set_verbosity_error()
        from nezha_zoo.pt import packed_linear

        model = getattr(module, name).from_pretrained(path).eval()
        call = torch.compile(model, dynamic=False) if mode == "torch.compile" else model
        setting = _pt_packed_linear_setting(backend)  # process-wide: set around each call, as backends take turns

        def run_pt(ids, mask):
            with torch.inference_mode(), packed_linear(setting):
                return call(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0]

        return run_pt, lambda out: out
    if fw == "tf":
        import tensorflow as tf

        if impl == "ours":
            import nezha_zoo.tf as module

            model = getattr(module, name).from_pretrained(path)
        else:
            import transformers as module

            module.logging.set_verbosity_error()
            model = getattr(module, name).from_pretrained(path, from_pt=True)
        from nezha_zoo.tf import packed_linear

        fn = tf.function(
            lambda ids, mask: model(input_ids=ids, attention_mask=mask, training=False)[0],
            jit_compile=mode.endswith("XLA"),
        )
        packed = mode.endswith("+packed")  # read at trace time; set around each call all the same

        def run_tf(ids, mask):
            with packed_linear(packed):
                return fn(tf.constant(ids), tf.constant(mask))

        return run_tf, (lambda out: out.numpy())
    import jax

    if impl == "ours":
        import nezha_zoo.flax as module

        model = getattr(module, name).from_pretrained(path)
    else:
        import transformers as module

        module.logging.set_verbosity_error()
        model = getattr(module, name).from_pretrained(path, from_pt=True)
    if mode.endswith("+packed"):
        # the packed kernels live in the wrapper's own compiled call (a params tree traced by an outer
        # jax.jit cannot be packed ahead): call the wrapper, compiled from its first call, switch on
        model.jit_after_calls = 0

        def run_flax_packed(ids, mask):
            with module.packed_linear(True):
                return model(ids, attention_mask=mask)[0]

        return run_flax_packed, (lambda out: out.block_until_ready())
    # ours: the documented helper for a user's own jitted forward (our XLA CPU options for float32
    # inference, nezha_zoo.flax.inference_jit); transformers: plain jax.jit, as its users write it
    jit = module.inference_jit if impl == "ours" else jax.jit
    fn = jit(lambda params, ids, mask: model(ids, attention_mask=mask, params=params)[0])
    params = model.params
    return (lambda ids, mask: fn(params, ids, mask)), (lambda out: out.block_until_ready())


def _inputs(batch: int, seq: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int64)
    return ids, np.ones((batch, seq), dtype=np.int64)


def _time_interleaved(
    runners: dict[str, tuple[Callable, Callable]],
    reference: Callable[[], Any],
    batch: int,
    seq: int,
    vocab: int,
    min_time: float,
    repeats: int,
) -> dict[str, Any]:
    """Time every backend of one process at one shape, call by call in turn, with the reference product.

    Each round runs every backend once (the order rotates from round to round) and then the
    reference matrix product, so a slow spell of a shared machine lands on all of them alike: the
    medians compare backends, and the model's rate is set against the matmul rate of the same
    window.  Rounds go on until every backend has ``min_time`` seconds of runs (at least
    ``repeats``, at most 200).
    """
    timed = time_interleaved(runners, reference, _inputs(batch, seq, vocab), min_time, repeats)
    return {"batch": batch, "seq": seq, **timed}


#: PyTorch operators that are matrix products (the FLOPs the model is counted for).
_PT_MATMUL_OPS = {
    "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
}  # fmt: skip


def _pt_profile(run, batch: int, seq: int, vocab: int, top: int = 6) -> dict[str, Any]:
    """Self CPU time of one forward pass by operator: the matrix-product share and the largest others."""
    from torch.profiler import ProfilerActivity, profile

    ids, mask = _inputs(batch, seq, vocab)
    run(ids, mask)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(ids, mask)
    ops = sorted(
        ((e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages() if e.self_cpu_time_total > 0),
        key=lambda kv: -kv[1],
    )
    total = sum(ms for _, ms in ops)
    matmul = sum(ms for name, ms in ops if name in _PT_MATMUL_OPS)
    others = [(name, round(ms, 2)) for name, ms in ops if name not in _PT_MATMUL_OPS][:top]
    return {"shape": f"{batch}x{seq}", "total_ms": total, "matmul_ms": matmul, "others_ms": others}


def run_worker(
    backends: list[str],
    family: str,
    path: str,
    shapes,
    smoke: bool,
    min_time: float,
    repeats: int,
    threads: int,
) -> list[dict[str, Any]]:
    """Time ``family``'s base model in each of ``backends`` (one framework) in this process, interleaved.

    Returns one result per backend: ``{"family", "backend", "load_s", "shapes": [{"batch", "seq",
    "warmup_s", "times_s", "reference_s"}], "profile"?}`` or ``{"family", "backend", "error"}``.
    """
    config = bench_config(family, smoke)
    runners: dict[str, tuple[Callable, Callable]] = {}
    results: dict[str, dict[str, Any]] = {}
    for b in backends:
        t0 = time.perf_counter()
        try:
            runners[b] = _make_runner(b, family, path, threads)
        except Exception as e:  # one backend that cannot load does not stop the others
            results[b] = {"family": family, "backend": b, "error": f"{type(e).__name__}: {e}"}
            continue
        results[b] = {"family": family, "backend": b, "load_s": time.perf_counter() - t0, "shapes": []}
    reference = _reference_product(SMOKE_REFERENCE_N if smoke else REFERENCE_N)
    # Where the time goes, at the throughput shape (or the largest one asked for): the model's dense
    # products alone, as each framework and mode runs them, timed in turn with the forward passes.
    pb, ps = max(shapes, key=lambda bs: (bs == PROFILE_SHAPE, bs[0] * bs[1]))
    products = dense_products(family, config, pb, ps)
    flops = sum(2 * m * k * n for m, k, n in products)
    product_key = {b: "dense products ({} {})".format(*BACKENDS[b][::2]) for b in runners}
    product_runners: dict[str, tuple[Callable, Callable]] = {}
    for b, key in product_key.items():
        if key not in product_runners:
            run, materialise = _gemm_runner(b, products)
            product_runners[key] = (lambda _ids, _mask, run=run: run()), materialise
    for batch, seq in shapes:
        extra = product_runners if (batch, seq) == (pb, ps) else {}
        timed = _time_interleaved({**runners, **extra}, reference, batch, seq, config.vocab_size, min_time, repeats)
        for b in runners:
            results[b]["shapes"].append(
                {
                    "batch": batch,
                    "seq": seq,
                    "warmup_s": timed["warmup_s"][b],
                    "times_s": timed["times_s"][b],
                    "reference_s": timed["reference_s"],
                }
            )
            if extra:
                median = statistics.median(timed["times_s"][product_key[b]])
                results[b]["gemms"] = {
                    "shape": f"{pb}x{ps}",
                    "gemm_ms": median * 1e3,
                    "gemm_gflops": flops / median / 1e9,
                }
    for b in runners:
        results[b]["reference_n"] = SMOKE_REFERENCE_N if smoke else REFERENCE_N
        if BACKENDS[b][0] == "pt" and BACKENDS[b][2] == "eager":  # and operator by operator
            results[b]["profile"] = _pt_profile(runners[b][0], pb, ps, config.vocab_size)
    return [results[b] for b in backends]


def dense_products(family: str, config: PretrainedConfig, batch: int, seq: int) -> list[tuple[int, int, int]]:
    """``(rows, in, out)`` of every dense weight product of the base model's forward pass, from the spec:
    one row per token (per sequence for the pooler)."""
    spec = get_family(family).model_spec(config, "Model")
    return [
        (batch if p.name.startswith("pooler.") else batch * seq, p.shape[1], p.shape[0])
        for p in spec
        if p.kind is Kind.DENSE
    ]


def _gemm_runner(backend: str, products: list[tuple[int, int, int]]) -> tuple[Callable, Callable]:
    """The model's dense products alone, run the way ``backend``'s framework and mode run them:
    ``torch.mm`` one by one (eager; on oneDNN-packed weights for ``pt-packed``), one ``tf.function`` (with XLA
    for ``-xla``), one ``jax.jit``."""
    fw, _, mode = BACKENDS[backend]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((m, k), dtype=np.float32) for m, k, _ in products]
    ws = [rng.standard_normal((k, n), dtype=np.float32) for _, k, n in products]  # x (M, in) @ W^T (in, out)
    if fw == "pt":
        import torch

        txs, tws = [torch.from_numpy(x) for x in xs], [torch.from_numpy(w) for w in ws]
        if mode == "torch.compile":
            fn = torch.compile(lambda a, b: [x @ w for x, w in zip(a, b)], dynamic=False)
            return (lambda: fn(txs, tws)), (lambda out: out)
        if mode.endswith("+packed") and torch.backends.mkldnn.is_available():  # PackedLinear's kernel
            pws = [torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous()) for w in tws]
            run = torch.ops.mkldnn._linear_pointwise
            return (lambda: [run(x, w, None, "none", [], "") for x, w in zip(txs, pws)]), (lambda out: out)
        return (lambda: [torch.mm(x, w) for x, w in zip(txs, tws)]), (lambda out: out)
    if fw == "tf":
        import tensorflow as tf

        fxs, fws = [tf.constant(x) for x in xs], [tf.constant(w) for w in ws]
        tf_fn = tf.function(lambda a, b: [tf.matmul(x, w) for x, w in zip(a, b)], jit_compile=mode.endswith("XLA"))
        return (lambda: tf_fn(fxs, fws)), (lambda out: [o.numpy() for o in out][-1])
    import jax

    jxs, jws = [jax.numpy.asarray(x) for x in xs], [jax.numpy.asarray(w) for w in ws]
    jax_fn = jax.jit(lambda a, b: [x @ w for x, w in zip(a, b)])
    return (lambda: jax_fn(jxs, jws)), (lambda out: jax.block_until_ready(out))


def gemm_ceiling(family: str, config: PretrainedConfig, batch: int, seq: int, threads: int) -> dict[str, Any]:
    """The rate of the model's own dense products alone (``torch.mm`` one by one, summed).

    This is what a forward pass could reach if nothing but its weight products took time; shapes
    with few rows (batch 1 x 16) are bound by reading the weights from memory, not by arithmetic.
    """
    import torch

    torch.set_num_threads(threads)
    products = dense_products(family, config, batch, seq)
    runner = _gemm_runner("pt", products)
    _timed(runner)
    times = [_timed(runner) for _ in range(3)]
    flops = sum(2 * m * k * n for m, k, n in products)
    return {"gflop": flops / 1e9, "gflops": flops / statistics.median(times) / 1e9}


# --- the orchestrator ----------------------------------------------------------------------------


def _checkpoint(workdir: str, family: str, smoke: bool) -> str:
    """One seeded base-model checkpoint per family, reused across runs of the same workdir."""
    path = os.path.join(workdir, f"{family}-{'smoke' if smoke else 'base'}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        fam, config = get_family(family), bench_config(family, smoke)
        spec = fam.model_spec(config, "Model")
        save_weights(path, config, spec, fam, random_weights(spec, config, seed=0))
    return path


def _backends_for(family: str, wanted: list[str]) -> list[str]:
    out = []
    for b in wanted:
        fw, impl, _ = BACKENDS[b]
        if impl == "transformers" and family not in TRANSFORMERS_HAS[fw]:
            continue
        out.append(b)
    return out


def _subprocess_worker(
    args: argparse.Namespace, backends: list[str], family: str, path: str, shapes
) -> list[dict[str, Any]]:
    """Run :func:`run_worker` for ``backends`` (one framework) in a fresh process."""
    worker = [
        "--worker", ",".join(backends), "--family", family, "--checkpoint", path,
        "--shapes", ",".join(f"{b}x{s}" for b, s in shapes), "--threads", str(args.threads),
        "--min-time", str(args.min_time), "--repeats", str(args.repeats),
    ]  # fmt: skip
    legacy_keras = any(BACKENDS[b][:2] == ("tf", "transformers") for b in backends)
    try:
        return run_in_fresh_process("benchmarks.forward", worker, args.timeout, legacy_keras)
    except RuntimeError as e:
        return [{"family": family, "backend": b, "error": str(e)} for b in backends]


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One (family, backend)'s results from several rounds: the timed runs pooled per shape.

    Within a round the backends of one framework already run call by call in turn; further rounds
    repeat the whole list of processes, so a slow spell also spreads across families.
    """
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[-1]
    shapes = []
    for i, s in enumerate(ok[0]["shapes"]):
        per_round = [r["shapes"][i] for r in ok]
        shapes.append(
            {
                "batch": s["batch"],
                "seq": s["seq"],
                "warmup_s": min(x["warmup_s"] for x in per_round),
                "times_s": [t for x in per_round for t in x["times_s"]],
                "reference_s": [t for x in per_round for t in x["reference_s"]],
                "round_medians_s": [statistics.median(x["times_s"]) for x in per_round],
            }
        )
    merged = {**ok[-1], "shapes": shapes, "rounds": len(ok), "load_s": min(r["load_s"] for r in ok)}
    errors = [r["error"] for r in rounds if "error" in r]
    if errors:
        merged["round_errors"] = errors
    return merged


def summarise(
    results: list[dict[str, Any]],
    matmul: dict[str, Any],
    smoke: bool,
    ceilings: dict[tuple[str, str], dict] | None = None,
) -> list[dict[str, Any]]:
    """Add FLOPs, GFLOP/s, fraction of the matmul rate (and of the model's GEMM ceiling) and tokens/s."""
    rows = []
    for r in results:
        if "error" in r:
            rows.append({**r, "framework": BACKENDS[r["backend"]][0]})
            continue
        config = bench_config(r["family"], smoke)
        for s in r["shapes"]:
            shape = f"{s['batch']}x{s['seq']}"
            times = s["times_s"]
            median = statistics.median(times)
            flops = forward_flops(r["family"], config, s["batch"], s["seq"])
            gflops = flops / median / 1e9
            # The matmul rate of the same window (numpy's product timed between the runs, scaled to
            # the faster library); the start-of-run rate is kept beside it.
            n = r["reference_n"]
            reference = 2 * n**3 / statistics.median(s["reference_s"]) / 1e9 * matmul["numpy_to_best"]
            row = {
                "family": r["family"],
                "backend": r["backend"],
                "framework": BACKENDS[r["backend"]][0],
                "shape": shape,
                "median_ms": median * 1e3,
                "min_ms": min(times) * 1e3,
                # Spread of the timed runs: interquartile range over the median.
                "spread": (np.percentile(times, 75) - np.percentile(times, 25)) / median,
                "warmup_s": s["warmup_s"],
                "runs": len(times),
                "tokens_per_s": s["batch"] * s["seq"] / median,
                "gflop": flops / 1e9,
                "gflops": gflops,
                "reference_gflops": reference,
                "matmul_fraction": gflops / reference,
                "start_fraction": gflops / matmul["gflops"],
            }
            ceiling = (ceilings or {}).get((r["family"], shape))
            if ceiling:
                row["gemm_ceiling_fraction"] = ceiling["gflops"] / matmul["gflops"]
            rows.append(row)
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets: at least as fast as transformers in the same framework at every shape (best of
    our modes vs best of its modes), and >= 85% of the matmul rate at 8x128."""
    lines = []
    ok_rows = [r for r in rows if "error" not in r]
    keys = sorted({(r["family"], r["framework"], r["shape"]) for r in ok_rows})
    for fam, fw, shape in keys:
        group = [r for r in ok_rows if (r["family"], r["framework"], r["shape"]) == (fam, fw, shape)]
        ours = [r for r in group if BACKENDS[r["backend"]][1] == "ours"]
        theirs = [r for r in group if BACKENDS[r["backend"]][1] == "transformers"]
        if not ours or not theirs:
            continue
        best_ours = min(ours, key=lambda r: r["median_ms"])
        best_theirs = min(theirs, key=lambda r: r["median_ms"])
        ratio = best_theirs["median_ms"] / best_ours["median_ms"]
        status = "met" if ratio >= 1.0 else "MISSED"
        lines.append(
            f"- {fam} {fw} {shape}: ours {best_ours['backend']} {best_ours['median_ms']:.2f} ms vs transformers "
            f"{best_theirs['backend']} {best_theirs['median_ms']:.2f} ms -> {ratio:.2f}x ({status})"
        )
    target_shape = "x".join(map(str, PROFILE_SHAPE))
    for r in ok_rows:
        if r["shape"] == target_shape and BACKENDS[r["backend"]][1] == "ours":
            status = "met" if r["matmul_fraction"] >= MATMUL_TARGET else "MISSED"
            ceiling = (
                f"; its dense products alone reach {100 * r['gemm_ceiling_fraction']:.0f}%"
                if "gemm_ceiling_fraction" in r
                else ""
            )
            lines.append(
                f"- {r['family']} {r['backend']} {target_shape}: {r['gflops']:.0f} GFLOP/s = "
                f"{100 * r['matmul_fraction']:.0f}% of the matmul rate in the same window, "
                f"{r['reference_gflops']:.0f} GFLOP/s ({status}{ceiling})"
            )
    return lines


def _in_shape_order(shapes: set[str]) -> list[str]:
    """``"BxL"`` shapes in :data:`SHAPES` order (latency, throughput, long), others after them."""
    order = ["x".join(map(str, bs)) for bs in SHAPES]
    return sorted(shapes, key=lambda s: (order.index(s) if s in order else len(order), [int(x) for x in s.split("x")]))


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: the two targets at a glance (ours against transformers; share of the matmul rate)."""
    ok = [r for r in rows if "error" not in r]
    shapes = _in_shape_order({r["shape"] for r in ok})
    out = [
        "## Against transformers",
        "",
        "transformers' median time over ours, best mode of each side in the same framework (above 1: ours is "
        "faster; misses in bold). Both sides ran in the same process, call by call in turn.",
        "",
        "| framework | family | " + " | ".join(shapes) + " |",
        "|---|---|" + "---:|" * len(shapes),
    ]
    for fw in ("pt", "tf", "flax"):
        for fam in dict.fromkeys(r["family"] for r in ok):
            cells = []
            for shape in shapes:
                group = [r for r in ok if (r["family"], r["framework"], r["shape"]) == (fam, fw, shape)]
                ours = [r["median_ms"] for r in group if BACKENDS[r["backend"]][1] == "ours"]
                theirs = [r["median_ms"] for r in group if BACKENDS[r["backend"]][1] == "transformers"]
                if not ours or not theirs:
                    cells.append("")
                    continue
                ratio = min(theirs) / min(ours)
                shown = f"{math.floor(ratio * 100) / 100:.2f}x"  # rounded down: 0.998 shows as a miss
                cells.append(shown if ratio >= 1.0 else f"**{shown}**")
            if any(cells):
                out.append(f"| {fw} | {fam} | " + " | ".join(cells) + " |")
    target = "x".join(map(str, PROFILE_SHAPE))
    ours_backends = [b for b, (_, impl, _) in BACKENDS.items() if impl == "ours" and any(r["backend"] == b for r in ok)]
    out += [
        "",
        f"## Share of the matmul rate at {target}",
        "",
        f"Achieved GFLOP/s over the matmul rate measured between the same runs (target {100 * MATMUL_TARGET:.0f}%; "
        "misses in bold).",
        "",
        "| family | " + " | ".join(ours_backends) + " |",
        "|---|" + "---:|" * len(ours_backends),
    ]
    for fam in dict.fromkeys(r["family"] for r in ok):
        cells = []
        for b in ours_backends:
            r = next((r for r in ok if (r["family"], r["backend"], r["shape"]) == (fam, b, target)), None)
            if r is None:
                cells.append("")
                continue
            pct = f"{math.floor(100 * r['matmul_fraction']):.0f}%"
            cells.append(pct if r["matmul_fraction"] >= MATMUL_TARGET else f"**{pct}**")
        out.append(f"| {fam} | " + " | ".join(cells) + " |")
    return [*out, ""]


def gemm_breakdown(results: list[dict[str, Any]], matmul: dict[str, Any]) -> list[str]:
    """Markdown lines: each backend's forward pass at the throughput shape against its dense products alone,
    run by the same framework and mode (so what is left is everything that is not a weight product)."""
    lines = []
    for r in results:
        g = r.get("gemms")
        if not g or "error" in r:
            continue
        model_ms = next(
            (statistics.median(s["times_s"]) * 1e3 for s in r["shapes"] if f"{s['batch']}x{s['seq']}" == g["shape"]),
            None,
        )
        if model_ms is None:
            continue
        lines.append(
            f"| {r['family']} | {r['backend']} | {g['shape']} | {model_ms:.1f} | {g['gemm_ms']:.1f} | "
            f"{100 * g['gemm_ms'] / model_ms:.0f}% | {model_ms - g['gemm_ms']:.1f} | {g['gemm_gflops']:.0f} | "
            f"{100 * g['gemm_gflops'] / matmul['gflops']:.0f}% |"
        )
    if not lines:
        return []
    head = [
        "## Where the time goes: dense products against the rest",
        "",
        "The model's dense weight products alone (from the spec: one per weight, at the forward pass's row "
        "count), run as the backend's framework and mode run them (torch.mm one by one, one tf.function with "
        "or without XLA, one jax.jit), timed in turn with the forward passes in the same process. rest = model - "
        "products: attention, softmax, GELU, LayerNorm, embeddings, copies and dispatch. The products' "
        "own rate is set against the start-of-run matmul rate.",
        "",
        "| family | backend | shape | model ms | dense products ms | share | rest ms | products GFLOP/s "
        "| products % of matmul |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    return [*head, *lines, ""]


def profiles(results: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: where each PyTorch eager forward pass spends its time (self CPU time by operator)."""
    lines = []
    for r in results:
        prof = r.get("profile")
        if not prof:
            continue
        share = prof["matmul_ms"] / prof["total_ms"] if prof["total_ms"] else 0.0
        others = ", ".join(f"{name.removeprefix('aten::')} {ms:.1f}" for name, ms in prof["others_ms"])
        lines.append(
            f"| {r['family']} | {r['backend']} | {prof['shape']} | {prof['total_ms']:.1f} | "
            f"{100 * share:.0f}% | {others} |"
        )
    if not lines:
        return []
    head = [
        "## Where PyTorch eager spends its time",
        "",
        "One profiled forward pass (torch.profiler, self CPU time). Matrix products are addmm, mm, bmm, "
        "baddbmm, matmul, linear and the fused CPU attention kernel; the rest are the largest other "
        "operators, in ms.",
        "",
        "| family | backend | shape | total ms | matrix products | largest others (ms) |",
        "|---|---|---|---:|---:|---|",
    ]
    return [*head, *lines, ""]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        "# Forward-pass benchmark",
        "",
        machine_line(m),
        f"float32 matmul ({report['matmul']['n']}^2): {report['matmul']['gflops']:.0f} GFLOP/s.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"One process per (family, framework) holds our model and transformers' and runs them call by call "
        f"in turn, with a {report['matmul']['n']}^2 matmul after each round; "
        f"{report.get('rounds', 1)} round(s) of all processes. Median of the timed runs; spread = interquartile "
        "range / median. matmul = the matmul rate measured between the same runs; % of matmul = GFLOP/s over it. "
        "GEMM ceiling: the rate of the model's dense weight products alone at that shape, as % of the "
        "start-of-run matmul rate.",
        "",
        *summary(report["rows"]),
        "## Every measurement",
        "",
        "| family | backend | shape | median ms | min ms | spread | tokens/s | GFLOP/s | matmul GFLOP/s "
        "| % of matmul | GEMM ceiling | warm-up s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if "error" in r:
            out.append(f"| {r['family']} | {r['backend']} | - | error: {r['error'][:80]} | | | | | | | | |")
            continue
        ceiling = f"{100 * r['gemm_ceiling_fraction']:.0f}%" if "gemm_ceiling_fraction" in r else "-"
        out.append(
            f"| {r['family']} | {r['backend']} | {r['shape']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
            f"{100 * r['spread']:.0f}% | {r['tokens_per_s']:.0f} | {r['gflops']:.1f} | {r['reference_gflops']:.0f} | "
            f"{100 * r['matmul_fraction']:.0f}% | {ceiling} | {r['warmup_s']:.1f} |"
        )
    out += ["", "## Targets", "", *report["verdicts"], ""]
    out += report.get("profiles", [])
    out += ["Sizes: " + "; ".join(f"{k}: {v}" for k, v in report["sizes"].items()), ""]
    return "\n".join(out)


def chart(report: dict[str, Any], path: str) -> None:
    """Throughput (GFLOP/s at the middle shape) per family and backend, with the matmul rate as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "error" not in r]
    shapes = _in_shape_order({r["shape"] for r in rows})
    families = list(dict.fromkeys(r["family"] for r in rows))
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in rows)]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    width = 0.8 / max(1, len(backends))
    for ax, shape in zip(axes[0], shapes):
        for i, b in enumerate(backends):
            vals = [
                next((r["gflops"] for r in rows if (r["family"], r["backend"], r["shape"]) == (f, b, shape)), 0.0)
                for f in families
            ]
            ax.bar(np.arange(len(families)) + i * width, vals, width, label=b)
        ax.axhline(report["matmul"]["gflops"], color="black", linestyle="--", linewidth=1, label="float32 matmul")
        ax.set_xticks(np.arange(len(families)) + width * (len(backends) - 1) / 2)
        ax.set_xticklabels(families, rotation=20)
        ax.set_title(f"batch x tokens = {shape}")
        ax.set_ylabel("GFLOP/s")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forward", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(BENCH_CONFIGS), help="comma-separated family keys")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: " + ", ".join(BACKENDS))
    parser.add_argument("--shapes", help="comma-separated BxL (default 1x16,8x128,1x512)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per shape")
    parser.add_argument("--repeats", type=int, default=3, help="at least this many timed runs per shape and round")
    parser.add_argument("--rounds", type=int, default=1, help="run every (family, framework) process this many times")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per (family, backend) process")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--workdir", help="keep the generated checkpoints here (reused across runs)")
    parser.add_argument("--smoke", action="store_true", help="tiny configs and shapes, in-process: seconds")
    parser.add_argument("--render", metavar="JSON", help="only write forward.md and forward.png from a forward.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = (
        [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        if args.shapes
        else (SMOKE_SHAPES if args.smoke else SHAPES)
    )
    if args.render:  # the report again from saved measurements, without running anything
        with open(args.render) as f:
            report = json.load(f)
        report["verdicts"] = verdicts(report["rows"])
        os.makedirs(args.out, exist_ok=True)
        _write_atomic(os.path.join(args.out, "forward.md"), markdown(report))
        chart(report, os.path.join(args.out, "forward.png"))
        return 0
    if args.worker:  # one (family, framework) in this fresh process
        _set_threads(args.threads, jax=BACKENDS[args.worker.split(",")[0]][0] == "flax")
        result = run_worker(
            args.worker.split(","), args.family, args.checkpoint, shapes, args.smoke, args.min_time, args.repeats,
            args.threads,
        )  # fmt: skip
        _write_atomic(args.result, json.dumps(result))
        return 0

    families = [f for f in args.families.split(",") if f]
    wanted = [b for b in args.backends.split(",") if b]
    unknown = [f for f in families if f not in BENCH_CONFIGS] + [b for b in wanted if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown families/backends: {unknown}")
    os.makedirs(args.out, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="nezha_zoo_bench_")
    t0 = time.perf_counter()
    if args.smoke:  # in-process: the frameworks are imported once
        matmul = matmul_rate(args.threads, n=256, min_time=0.2)
    else:
        _set_threads(args.threads)
        matmul = matmul_rate(args.threads)
    sys.stdout.write(f"float32 matmul: {matmul['gflops']:.1f} GFLOP/s\n")
    ceilings = {
        (f, f"{b}x{s}"): gemm_ceiling(f, bench_config(f, args.smoke), b, s, args.threads)
        for f in families
        for b, s in shapes
    }
    # One job per (family, framework): its backends, ours and transformers', share the process.
    jobs = []
    for f in families:
        backends = _backends_for(f, wanted)
        path = _checkpoint(workdir, f, args.smoke)
        for fw in dict.fromkeys(BACKENDS[b][0] for b in backends):
            jobs.append((f, [b for b in backends if BACKENDS[b][0] == fw], path))
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {(f, b): [] for f, bs, _ in jobs for b in bs}
    for k in range(1 if args.smoke else args.rounds):
        for family, backends, path in jobs:
            if args.smoke:
                got = run_worker(backends, family, path, shapes, True, args.min_time, args.repeats, args.threads)
            else:
                got = _subprocess_worker(args, backends, family, path, shapes)
            for r in got:
                rounds[family, r["backend"]].append(r)
                status = r.get("error") or ", ".join(
                    f"{s['batch']}x{s['seq']} {statistics.median(s['times_s']) * 1e3:.2f} ms" for s in r["shapes"]
                )
                sys.stdout.write(f"round {k + 1} {family:>15} {r['backend']:<11} {status}\n")
            sys.stdout.flush()
    results = [merge_rounds(rs) for rs in rounds.values()]
    rows = summarise(results, matmul, args.smoke, ceilings)
    report = {
        "machine": _machine(args.threads),
        "versions": _versions(),
        "matmul": matmul,
        "gemm_ceilings": {f"{f} {shape}": c for (f, shape), c in ceilings.items()},
        "rounds": 1 if args.smoke else args.rounds,
        "smoke": args.smoke,
        "sizes": {f: ("smoke" if args.smoke else BENCH_CONFIGS[f][1]) for f in families},
        "rows": rows,
        "verdicts": verdicts(rows),
        "profiles": gemm_breakdown(results, matmul) + profiles(results),
        "results": results,
        "wall_s": time.perf_counter() - t0,
    }
    _write_atomic(os.path.join(args.out, "forward.json"), json.dumps(report, indent=1))
    _write_atomic(os.path.join(args.out, "forward.md"), markdown(report))
    chart(report, os.path.join(args.out, "forward.png"))
    sys.stdout.write(markdown(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
