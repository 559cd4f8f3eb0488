"""One training step (forward, backward, AdamW update) of every family in every backend, beside
transformers; with ``--lora``, LoRA adapters against full fine-tuning.

``python -m benchmarks.train`` (part of ``make bench``) times, for each family's sequence-classification
model at base size (the sizes of :data:`benchmarks.forward.BENCH_CONFIGS`: XLM-R-XL at its layer width
with 2 of 36 layers, MPT as a 125M GPT-2-small shape), dropout on, at batch 8 x 128 tokens:

* ours: PyTorch eager as a user gets it (``pt``: training products on oneDNN where that is faster, the
  default of :func:`nezha_zoo.pt.set_packed_linear`), eager with the switch off (``pt-plain``: ``F.linear``
  products), eager with the switch on (``pt-packed``: oneDNN products everywhere) and ``torch.compile``
  (``pt-compile``), all with ``torch.optim.AdamW``;
  Keras ``train_on_batch`` as ``compile()`` sets it up by default (``tf``: ``jit_compile="auto"``,
  which is no XLA on a CPU-only TensorFlow) and with XLA (``tf-xla``), ``keras.optimizers.AdamW``;
  Flax under ``jax.jit`` with ``optax.adamw`` (``flax``);
* transformers 4.57.6 where it has the class: ``hf-pt`` (all six) and ``hf-pt-compile`` (the same
  ``torch.compile(model, dynamic=False)`` as ours), ``hf-tf`` / ``hf-tf-xla``
  (Electra, MPNet; tf-keras ``train_on_batch``) and ``hf-flax`` (Electra).

``--lora`` instead times Electra-base in each framework with full fine-tuning (``pt``, ``tf``,
``flax``) against rank-8 LoRA adapters on the query and value projections (``pt+lora``...,
via our ``enable_lora``), and reports the trainable parameters and the optimizer state.

The method is the forward benchmark's (``docs/benchmarks/README.md``): one seeded checkpoint per
family; one process per (family, framework) holds all its backends and runs them step by step in
turn, the order rotating, with a float32 matrix product after each round; warm-up (tracing,
compilation, the optimizer's state) is timed apart.  Peak memory is measured apart, one fresh process
per backend: the resident set size (``VmHWM`` of ``/proc/self/status``) above the one with the model
loaded, (a) over the first steps (compilation and the optimizer state's creation included) and (b)
over later steps after resetting the peak (``/proc/self/clear_refs``): the steady step.  Optimizer
state bytes count the optimizer's own tensors: ``torch.optim`` ``optimizer.state``, Keras
``optimizer.variables``, the leaves of the optax state.

Output under ``--out`` (default ``benchmarks/results``): ``train.json`` + ``train.md`` + ``train.png``
(``lora.json`` + ``lora.md`` with ``--lora``).  ``--smoke`` runs tiny configs at 2 x 16 in-process;
``--render JSON`` rewrites the report from saved measurements.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.forward import BACKENDS as FORWARD_BACKENDS
from benchmarks.forward import BENCH_CONFIGS, SMOKE_CONFIGS, TRANSFORMERS_HAS
from benchmarks.harness import (
    REFERENCE_N,
    SMOKE_REFERENCE_N,
    machine,
    machine_line,
    matmul_rate,
    peak_rss_bytes,
    pt_packed_linear_setting,
    ratio_cell,
    reference_product,
    reset_peak_rss,
    rss_bytes,
    run_in_fresh_process,
    set_threads,
    time_interleaved,
    versions,
    write_atomic,
)
from nezha_zoo.config import PretrainedConfig
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.registry import get_family

HEAD = "ForSequenceClassification"
NUM_LABELS = 2
SHAPE = (8, 128)
SMOKE_SHAPE = (2, 16)
LEARNING_RATE = 1e-5
#: LoRA as the issue asks: rank 8 on the query and value projections.
LORA_RANK = 8
LORA_TARGETS = ("query", "value")
LORA_FAMILY = "electra"

#: Config fields on top of the forward benchmark's sizes: two labels, dropout where the family's
#: default has none (MPT), and a pad id so transformers' MPT classifier accepts batches above 1.
TRAIN_FIELDS: dict[str, dict[str, Any]] = {
    "mpt": dict(attn_config=dict(attn_pdrop=0.1), pad_token_id=0),
}

#: Backend -> (framework, implementation, mode): the forward benchmark's backends, Keras stepping with
#: ``train_on_batch`` where the forward pass was a ``tf.function``.  ``NAME+lora``: ours with a LoRA adapter.
BACKENDS: dict[str, tuple[str, str, str]] = {
    name: (fw, impl, mode.replace("tf.function", "train_on_batch"))
    for name, (fw, impl, mode) in FORWARD_BACKENDS.items()
}
#: Training only: ours with the switch off (``F.linear`` products), the path ``pt`` left before it took
#: oneDNN's training products by default.
BACKENDS["pt-plain"] = ("pt", "ours", "eager+plain")
LORA_BACKENDS = ("pt", "pt+lora", "tf", "tf+lora", "flax", "flax+lora")


def _spec_of(key: str) -> tuple[str, bool]:
    """``"pt+lora"`` -> ``("pt", True)``."""
    base, _, variant = key.partition("+")
    if base not in BACKENDS or variant not in ("", "lora") or (variant and BACKENDS[base][1] != "ours"):
        raise ValueError(f"unknown backend {key!r}: one of {', '.join(BACKENDS)}, or ours with '+lora'")
    return base, variant == "lora"


def train_config(family: str, smoke: bool = False) -> PretrainedConfig:
    """The benchmark config of ``family`` (base size, or tiny with ``smoke``) with two labels and dropout on."""
    fields = dict(SMOKE_CONFIGS[family] if smoke else BENCH_CONFIGS[family][0])
    fields.update(num_labels=NUM_LABELS, **TRAIN_FIELDS.get(family, {}))
    return get_family(family).config_class(**fields)


def _checkpoint(workdir: str, family: str, smoke: bool) -> str:
    """One seeded sequence-classification checkpoint per family, reused across runs of the same workdir."""
    path = os.path.join(workdir, f"{family}-{'smoke' if smoke else 'base'}-{HEAD}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        fam, config = get_family(family), train_config(family, smoke)
        spec = fam.model_spec(config, HEAD)
        save_weights(path, config, spec, fam, random_weights(spec, config, seed=0))
    return path


def _inputs(batch: int, seq: int, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input_ids (B, L) int64, attention_mask (B, L) ones, labels (B,) in {0, 1})``, seeded."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int64)
    return ids, np.ones((batch, seq), dtype=np.int64), rng.integers(0, NUM_LABELS, size=(batch,), dtype=np.int64)


# --- one training step per backend ---------------------------------------------------------------
# Each maker loads the checkpoint, calls ``loaded()`` (the memory worker's baseline), and returns
# ``(step(ids, mask, labels) -> loss, materialise(loss), info() -> {trainable_params, optimizer_state_bytes})``.


def _variable_bytes(v) -> int:
    """Bytes of a Keras 3 or tf-keras variable (Keras 3 dtypes are strings, TF's are ``tf.DType``)."""
    dtype = getattr(v.dtype, "as_numpy_dtype", v.dtype)
    return int(np.prod(tuple(v.shape), dtype=np.int64)) * np.dtype(dtype).itemsize


def _pt_step(
    impl: str, mode: str, lora: bool, family: str, path: str, loaded: Callable[[], None], setting: bool | None
):
    """The maker for ours and transformers' PyTorch backends; ``setting`` is the product switch's around each
    step (:func:`benchmarks.harness.pt_packed_linear_setting`)."""
    import torch

    from nezha_zoo.pt import packed_linear

    fam = get_family(family)
    if impl == "ours":
        import nezha_zoo.pt as module
    else:
        import transformers as module

        module.logging.set_verbosity_error()
    model = getattr(module, fam.class_name(HEAD, "pt")).from_pretrained(path)
    if lora:
        model.enable_lora(LORA_RANK, target_modules=list(LORA_TARGETS))
    model.train()  # dropout on
    loaded()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    call = torch.compile(model, dynamic=False) if mode == "torch.compile" else model
    tensors: dict[int, Any] = {}

    def step(ids, mask, labels):
        if id(ids) not in tensors:  # the same numpy inputs every call: convert once
            tensors[id(ids)] = [torch.from_numpy(x) for x in (ids, mask, labels)]
        t_ids, t_mask, t_labels = tensors[id(ids)]
        with packed_linear(setting):  # process-wide: set around each step, as backends take turns
            optimizer.zero_grad(set_to_none=True)
            loss = call(input_ids=t_ids, attention_mask=t_mask, labels=t_labels).loss
            loss.backward()
            optimizer.step()
        return loss

    def info():
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return {
            "trainable_params": int(sum(p.numel() for p in trainable)),
            "optimizer_state_bytes": int(sum(t.numel() * t.element_size() for t in state)),
            "optimizer_state_tensors": len(state),
        }

    return step, (lambda loss: loss.item()), info


def _tf_step(impl: str, mode: str, lora: bool, family: str, path: str, loaded: Callable[[], None]):
    fam = get_family(family)
    if impl == "ours":
        import keras

        import nezha_zoo.tf as module

        model = getattr(module, fam.class_name(HEAD, "tf")).from_pretrained(path)
        if lora:
            model.enable_lora(LORA_RANK, target_modules=list(LORA_TARGETS))
        optimizer = keras.optimizers.AdamW(LEARNING_RATE)
        jit = True if mode.endswith("XLA") else "auto"
    else:
        import tensorflow as tf  # tf.keras is tf-keras here (TF_USE_LEGACY_KERAS=1)
        import transformers as module

        module.logging.set_verbosity_error()
        model = getattr(module, fam.class_name(HEAD, "tf")).from_pretrained(path, from_pt=True)
        optimizer = tf.keras.optimizers.AdamW(LEARNING_RATE)
        jit = True if mode.endswith("XLA") else None  # tf-keras' default
    loaded()
    model.compile(optimizer=optimizer, jit_compile=jit)  # the loss: the model's own, from "labels"
    feeds: dict[int, dict] = {}

    def step(ids, mask, labels):
        if id(ids) not in feeds:
            feeds[id(ids)] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return model.train_on_batch(feeds[id(ids)])

    def info():
        state = optimizer.variables
        state = list(state() if callable(state) else state)  # a method in some tf-keras optimizers
        return {
            "trainable_params": int(sum(np.prod(tuple(v.shape)) for v in model.trainable_weights)),
            "optimizer_state_bytes": int(sum(_variable_bytes(v) for v in state)),
            "optimizer_state_tensors": len(state),
            "jit_compile": bool(getattr(model, "jit_compile", False)),
        }

    return step, (lambda loss: float(np.asarray(loss).reshape(-1)[0])), info


def _flax_step(impl: str, mode: str, lora: bool, family: str, path: str, loaded: Callable[[], None]):
    import jax
    import optax

    fam = get_family(family)
    if impl == "ours":
        import nezha_zoo.flax as module
    else:
        import transformers as module

        module.logging.set_verbosity_error()
    cls = getattr(module, fam.class_name(HEAD, "flax"))
    model = cls.from_pretrained(path) if impl == "ours" else cls.from_pretrained(path, from_pt=True)
    if lora:
        model.enable_lora(LORA_RANK, target_modules=list(LORA_TARGETS))
        base, trained = model.params, model.lora_params

        def params_of(trained, base):
            return model.apply_lora(base, trained)
    else:
        base, trained = {}, model.params

        def params_of(trained, base):
            return trained

    loaded()
    tx = optax.adamw(LEARNING_RATE)

    def loss_fn(trained, base, rng, ids, mask, labels):
        out = model(ids, attention_mask=mask, params=params_of(trained, base), dropout_rng=rng, train=True)
        if type(out) is tuple:  # I-BERT's buffers are mutable in training: (output, {"buffers": ...})
            out = out[0]
        logits = out.logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    # The trained tree and the optimizer state are donated (updated in place); base params are an
    # argument, not differentiated, not in the optimizer state (never a closed-over constant).
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(trained, opt_state, base, rng, ids, mask, labels):
        rng, dropout_rng = jax.random.split(rng)
        loss, grads = jax.value_and_grad(loss_fn)(trained, base, dropout_rng, ids, mask, labels)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, rng, loss

    state = {"trained": trained, "opt": tx.init(trained), "rng": jax.random.PRNGKey(0)}

    def step(ids, mask, labels):
        state["trained"], state["opt"], state["rng"], loss = train_step(
            state["trained"], state["opt"], base, state["rng"], ids, mask, labels
        )
        return loss

    def info():
        leaves = jax.tree_util.tree_leaves(state["opt"])
        return {
            "trainable_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(state["trained"]))),
            "optimizer_state_bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
            "optimizer_state_tensors": len(leaves),
        }

    return step, (lambda loss: float(loss)), info


def make_step(key: str, family: str, path: str, threads: int, loaded: Callable[[], None] = lambda: None):
    """Load ``path`` for backend ``key`` (``"pt"``, ``"hf-tf"``, ``"flax+lora"``...) and build its training step.

    Returns:
        tuple: ``(step(ids, mask, labels) -> loss, materialise(loss) -> float, info() -> dict)``.
    """
    base, lora = _spec_of(key)
    fw, impl, mode = BACKENDS[base]
    if fw == "pt":
        import torch

        torch.set_num_threads(threads)
        return _pt_step(impl, mode, lora, family, path, loaded, pt_packed_linear_setting(base))
    maker = {"tf": _tf_step, "flax": _flax_step}[fw]
    return maker(impl, mode, lora, family, path, loaded)


# --- workers ---------------------------------------------------------------------------------------


def run_worker(
    keys: list[str], family: str, path: str, shape: tuple[int, int], smoke: bool, min_time: float, repeats: int,
    threads: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Time the training step of ``family`` in each of ``keys`` (one framework) in this process, interleaved.

    Returns one result per key: ``{"family", "backend", "load_s", "warmup_s", "times_s", "reference_s",
    "losses", "info"}`` or ``{"family", "backend", "error"}``.
    """
    config = train_config(family, smoke)
    runners: dict[str, tuple[Callable, Callable]] = {}
    infos: dict[str, Callable] = {}
    results: dict[str, dict[str, Any]] = {}
    for k in keys:
        t0 = time.perf_counter()
        try:
            step, materialise, info = make_step(k, family, path, threads)
            runners[k], infos[k] = (step, materialise), info
            results[k] = {"family": family, "backend": k, "load_s": time.perf_counter() - t0}
        except Exception as e:  # reported in the table, the other backends still run
            results[k] = {"family": family, "backend": k, "error": f"{type(e).__name__}: {e}"[:300]}
    inputs = _inputs(*shape, config.vocab_size)
    n = SMOKE_REFERENCE_N if smoke else REFERENCE_N
    if runners:
        timed = time_interleaved(runners, reference_product(n), inputs, min_time, repeats)
        for k in runners:
            results[k].update(
                batch=shape[0], seq=shape[1], warmup_s=timed["warmup_s"][k], times_s=timed["times_s"][k],
                reference_s=timed["reference_s"], reference_n=n, loss=runners[k][1](runners[k][0](*inputs)),
                info=infos[k](),
            )  # fmt: skip
    return [results[k] for k in keys]


def run_memory_worker(key: str, family: str, path: str, shape: tuple[int, int], smoke: bool, threads: int, steps: int):
    """Peak resident memory of ``key``'s training step, above the model-loaded baseline (own process).

    Returns ``{"family", "backend", "loaded_bytes", "first_steps_peak_bytes", "step_peak_bytes"}``: the
    peak over the first two steps (compilation, optimizer state creation) and over ``steps`` later
    steps, both minus the resident set with the model loaded.
    """
    config = train_config(family, smoke)
    baseline: dict[str, int | None] = {}

    def loaded():
        gc.collect()
        baseline["rss"] = rss_bytes()
        baseline["reset"] = reset_peak_rss()

    step, materialise, info = make_step(key, family, path, threads, loaded)
    inputs = _inputs(*shape, config.vocab_size)
    for _ in range(2):
        materialise(step(*inputs))
    first = peak_rss_bytes()
    gc.collect()
    reset_peak_rss()
    for _ in range(steps):
        materialise(step(*inputs))
    later = peak_rss_bytes()
    rss = baseline.get("rss")
    if rss is None or first is None or later is None or not baseline.get("reset"):
        return {"family": family, "backend": key, "error": "no /proc/self/status or clear_refs (Linux only)"}
    return {
        "family": family,
        "backend": key,
        "loaded_bytes": rss,
        "first_steps_peak_bytes": first - rss,
        "step_peak_bytes": later - rss,
        "info": info(),
    }


# --- the orchestrator ------------------------------------------------------------------------------


def _keys_for(family: str, wanted: list[str]) -> list[str]:
    out = []
    for k in wanted:
        fw, impl, _ = BACKENDS[_spec_of(k)[0]]
        if impl == "transformers" and family not in TRANSFORMERS_HAS[fw]:
            continue
        out.append(k)
    return out


def _framework(key: str) -> str:
    return BACKENDS[_spec_of(key)[0]][0]


def _legacy_keras(keys: list[str]) -> bool:
    return any(BACKENDS[_spec_of(k)[0]][:2] == ("tf", "transformers") for k in keys)


def summarise(results: list[dict[str, Any]], memory: dict[tuple[str, str], dict]) -> list[dict[str, Any]]:
    """One row per (family, backend): step-time statistics, the same window's matmul rate, memory, state sizes."""
    rows = []
    for r in results:
        mem = memory.get((r["family"], r["backend"]), {})
        base = {"family": r["family"], "backend": r["backend"], "framework": _framework(r["backend"])}
        if "error" in r:
            rows.append({**base, "error": r["error"]})
            continue
        times = r["times_s"]
        median = statistics.median(times)
        n = r["reference_n"]
        row = {
            **base,
            "mode": BACKENDS[_spec_of(r["backend"])[0]][2],
            "shape": f"{r['batch']}x{r['seq']}",
            "median_ms": median * 1e3,
            "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3,
            "spread": (np.percentile(times, 75) - np.percentile(times, 25)) / median,
            "runs": len(times),
            "warmup_s": r["warmup_s"],
            "reference_gflops": 2 * n**3 / statistics.median(r["reference_s"]) / 1e9,
            "loss": r["loss"],
            **r["info"],
        }
        for field in ("loaded_bytes", "first_steps_peak_bytes", "step_peak_bytes"):
            if field in mem:
                row[field] = mem[field]
        if "error" in mem:
            row["memory_error"] = mem["error"]
        rows.append(row)
    return rows


def merge_reports(paths: list[str]) -> dict[str, Any]:
    """One report from the json of one or more runs of the same kind (say, one run per framework).

    The first run's header (machine, versions, matmul rate) is kept, each run's own in ``runs``;
    rows and results are concatenated in order.
    """
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    kinds = {r["kind"] for r in reports}
    if len(kinds) != 1:
        raise ValueError(f"cannot merge reports of different kinds: {sorted(kinds)}")
    if len(reports) == 1:
        return reports[0]
    merged = {**reports[0], "rows": [], "results": [], "sizes": {}, "runs": []}
    for r in reports:
        merged["rows"] += r["rows"]
        merged["results"] += r["results"]
        merged["sizes"].update(r["sizes"])
        merged["runs"].append({k: r[k] for k in ("machine", "matmul", "wall_s") if k in r})
    merged["wall_s"] = sum(r.get("wall_s", 0.0) for r in reports)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", action="store_true", help="LoRA adapters against full fine-tuning (Electra)")
    parser.add_argument("--families", help="comma-separated family keys (default: all; electra with --lora)")
    parser.add_argument("--backends", help="comma-separated: " + ", ".join(BACKENDS) + " (ours also NAME+lora)")
    parser.add_argument("--shape", help="BxL (default 8x128; 2x16 with --smoke)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--min-time", type=float, default=5.0, help="seconds of timed steps per backend")
    parser.add_argument("--repeats", type=int, default=5, help="at least this many timed steps per backend")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps timed for the steady-step peak")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--workdir", help="keep the generated checkpoints here (reused across runs)")
    parser.add_argument("--smoke", action="store_true", help="tiny configs, in-process (memory in fresh processes)")
    parser.add_argument(
        "--render", metavar="JSON", help="only write the report from saved json (several, comma-separated: merged)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split("x")) if args.shape else (SMOKE_SHAPE if args.smoke else SHAPE)
    if args.render:
        _write_report(merge_reports(args.render.split(",")), args.out)
        return 0
    if args.worker:  # one (family, framework) in this fresh process
        set_threads(args.threads, jax=_framework(args.worker.split(",")[0]) == "flax")
        result = run_worker(
            args.worker.split(","), args.family, args.checkpoint, shape, args.smoke, args.min_time, args.repeats,
            args.threads,
        )  # fmt: skip
        write_atomic(args.result, json.dumps(result))
        return 0
    if args.memory_worker:  # one backend alone in this fresh process
        set_threads(args.threads, jax=_framework(args.memory_worker) == "flax")
        result = run_memory_worker(
            args.memory_worker, args.family, args.checkpoint, shape, args.smoke, args.threads, args.memory_steps
        )
        write_atomic(args.result, json.dumps(result))
        return 0

    default_families = LORA_FAMILY if args.lora else ",".join(BENCH_CONFIGS)
    families = [f for f in (args.families or default_families).split(",") if f]
    wanted = [k for k in (args.backends or ",".join(LORA_BACKENDS if args.lora else BACKENDS)).split(",") if k]
    unknown = [f for f in families if f not in BENCH_CONFIGS]
    for k in wanted:
        try:
            _spec_of(k)
        except ValueError as e:
            unknown.append(str(e))
    if unknown:
        parser.error(f"unknown families/backends: {unknown}")
    os.makedirs(args.out, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="nezha_zoo_bench_train_")
    t0 = time.perf_counter()
    m = machine(args.threads)  # the load average before this run adds to it
    if not args.smoke:
        set_threads(args.threads)
    matmul = matmul_rate(args.threads, n=SMOKE_REFERENCE_N if args.smoke else REFERENCE_N,
                         min_time=0.2 if args.smoke else 3.0)  # fmt: skip
    sys.stdout.write(f"float32 matmul: {matmul['gflops']:.1f} GFLOP/s\n")
    jobs = []
    for f in families:
        keys = _keys_for(f, wanted)
        path = _checkpoint(workdir, f, args.smoke)
        for fw in dict.fromkeys(_framework(k) for k in keys):
            jobs.append((f, [k for k in keys if _framework(k) == fw], path))
    common = ["--threads", str(args.threads), "--shape", "x".join(map(str, shape))] + (
        ["--smoke"] if args.smoke else []
    )
    results = []
    for family, keys, path in jobs:
        if args.smoke and not _legacy_keras(keys):  # tf-keras must be chosen before TensorFlow is imported
            got = run_worker(keys, family, path, shape, True, args.min_time, args.repeats, args.threads)
        else:
            worker = ["--worker", ",".join(keys), "--family", family, "--checkpoint", path, "--min-time",
                      str(args.min_time), "--repeats", str(args.repeats), *common]  # fmt: skip
            try:
                got = run_in_fresh_process("benchmarks.train", worker, args.timeout, _legacy_keras(keys))
            except RuntimeError as e:
                got = [{"family": family, "backend": k, "error": str(e)} for k in keys]
        for r in got:
            status = r.get("error") or f"{statistics.median(r['times_s']) * 1e3:.1f} ms"
            sys.stdout.write(f"{family:>15} {r['backend']:<11} {status}\n")
            sys.stdout.flush()
        results += got
    memory: dict[tuple[str, str], dict] = {}
    if not args.no_memory:
        for family, keys, path in jobs:
            for k in keys:
                worker = ["--memory-worker", k, "--family", family, "--checkpoint", path,
                          "--memory-steps", str(args.memory_steps), *common]  # fmt: skip
                try:
                    memory[family, k] = run_in_fresh_process(
                        "benchmarks.train", worker, args.timeout, _legacy_keras([k])
                    )
                except RuntimeError as e:
                    memory[family, k] = {"error": str(e)}
                got = memory[family, k]
                status = got.get("error") or f"{got['step_peak_bytes'] / 2**20:.0f} MiB"
                sys.stdout.write(f"{family:>15} {k:<11} peak {status}\n")
                sys.stdout.flush()
    report = {
        "kind": "lora" if args.lora else "train",
        "machine": m,
        "versions": versions(),
        "matmul": matmul,
        "smoke": args.smoke,
        "shape": "x".join(map(str, shape)),
        "sizes": {f: ("smoke" if args.smoke else BENCH_CONFIGS[f][1]) for f in families},
        "lora": {"rank": LORA_RANK, "target_modules": list(LORA_TARGETS)},
        "rows": summarise(results, memory),
        "results": results,
        "wall_s": time.perf_counter() - t0,
    }
    _write_report(report, args.out)
    sys.stdout.write(markdown(report) + "\n")
    return 0


# --- the report ------------------------------------------------------------------------------------


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _header(report: dict[str, Any], title: str) -> list[str]:
    m, mm = report["machine"], report["matmul"]
    return [
        f"# {title}",
        "",
        machine_line(m),
        f"float32 matmul ({mm['n']}^2) at the start: {mm['gflops']:.0f} GFLOP/s. "
        + "Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        f"One training step (forward, backward, AdamW update; dropout on) at {report['shape']} tokens, learning rate "
        f"{LEARNING_RATE:g}. One process per (family, framework) holds all its backends and runs them step by step "
        "in turn, the order rotating, with a float32 matmul after each round: their ratios compare the same "
        "moments of a shared machine. Warm-up (tracing, compilation, optimizer state) is timed apart. Peak "
        "memory: resident set size above the model-loaded one, each backend in its own fresh process; "
        "'first steps' includes compilation and the optimizer state's creation, 'step' is a later steady step "
        "(peak reset in between). RSS counts what the allocators keep, not only live tensors."
        + (" Smoke run: tiny configs." if report.get("smoke") else ""),
        "",
        *(
            f"- run {i + 1}: load average {' / '.join(map(str, run['machine'].get('load_average', [])))}, "
            f"matmul {run['matmul']['gflops']:.0f} GFLOP/s at its start, {run.get('wall_s', 0) / 60:.0f} min"
            for i, run in enumerate(report.get("runs", []))
        ),
        "",
    ]


def _measurements(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| family | backend | mode | median ms | min ms | max ms | spread | runs | warm-up s | matmul GFLOP/s "
        "| trainable params | optimizer state MiB | peak MiB (first steps) | peak MiB (step) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['family']} | {r['backend']} | error: {r['error'][:100]} |" + " |" * 11)
            continue
        out.append(
            f"| {r['family']} | {r['backend']} | {r['mode']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
            f"{r['max_ms']:.1f} | {100 * r['spread']:.0f}% | {r['runs']} | {r['warmup_s']:.1f} | "
            f"{r['reference_gflops']:.0f} | {r['trainable_params']:,} | {_mib(r['optimizer_state_bytes'])} | "
            f"{_mib(r.get('first_steps_peak_bytes'))} | {_mib(r.get('step_peak_bytes'))} |"
        )
    return [*out, ""]


def against_transformers(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: transformers' median step time over ours, best mode of each side in the same framework."""
    ok = [r for r in rows if "error" not in r]
    out = [
        "## Against transformers",
        "",
        "transformers' median step time over ours, best mode of each side in the same framework (above 1: ours is "
        "faster; misses in bold, rounded down). Both sides ran in the same process, step by step in turn.",
        "",
        "| family | pt | tf | flax |",
        "|---|---:|---:|---:|",
    ]
    cells_seen = False
    for fam in dict.fromkeys(r["family"] for r in ok):
        cells = []
        for fw in ("pt", "tf", "flax"):
            group = [r for r in ok if (r["family"], r["framework"]) == (fam, fw)]
            ours = [r["median_ms"] for r in group if BACKENDS[_spec_of(r["backend"])[0]][1] == "ours"]
            theirs = [r["median_ms"] for r in group if BACKENDS[_spec_of(r["backend"])[0]][1] == "transformers"]
            cells.append(ratio_cell(min(theirs) / min(ours)) if ours and theirs else "")
        cells_seen |= any(cells)
        out.append(f"| {fam} | " + " | ".join(cells) + " |")
    if not cells_seen:
        out.append("| (no pair of ours and transformers in this run) | | | |")
    out += ["", "Each mode against transformers' best in its framework:", ""]
    for r in ok:
        theirs = [
            x
            for x in ok
            if (x["family"], x["framework"]) == (r["family"], r["framework"])
            and BACKENDS[_spec_of(x["backend"])[0]][1] == "transformers"
        ]
        if theirs and BACKENDS[_spec_of(r["backend"])[0]][1] == "ours":
            best = min(theirs, key=lambda x: x["median_ms"])
            out.append(
                f"- {r['family']} {r['backend']}: {r['median_ms']:.1f} ms vs {best['backend']} "
                f"{best['median_ms']:.1f} ms "
                f"-> {ratio_cell(best['median_ms'] / r['median_ms'])}"
            )
    return [*out, ""]


def lora_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: per family and framework, full fine-tuning against LoRA (times, ratios, sizes, memory)."""
    ok = {(r["family"], r["backend"]): r for r in rows if "error" not in r}
    out = [
        "## LoRA against full fine-tuning",
        "",
        "Step time: median (min-max) of the interleaved steps; ratio = LoRA / full of the medians (below 1: LoRA "
        "is faster). State: the optimizer's own tensors. Peak: steady-step resident memory above the loaded "
        "model, each in its own process.",
        "",
        "| family | framework | full step ms | LoRA step ms | time LoRA / full | trainable full | trainable LoRA "
        "| state full MiB | state LoRA MiB | peak full MiB | peak LoRA MiB | peak LoRA / full |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fam, key in list(ok):
        if "+" in key or (fam, f"{key}+lora") not in ok:
            continue
        full, lora = ok[fam, key], ok[fam, f"{key}+lora"]
        peak_f, peak_l = full.get("step_peak_bytes"), lora.get("step_peak_bytes")
        peak_ratio = f"{peak_l / peak_f:.2f}" if peak_f and peak_l is not None else "-"
        out.append(
            f"| {fam} | {key} | {full['median_ms']:.0f} ({full['min_ms']:.0f}-{full['max_ms']:.0f}) | "
            f"{lora['median_ms']:.0f} ({lora['min_ms']:.0f}-{lora['max_ms']:.0f}) | "
            f"{lora['median_ms'] / full['median_ms']:.2f} | {full['trainable_params']:,} | "
            f"{lora['trainable_params']:,} | "
            f"{_mib(full['optimizer_state_bytes'])} | {lora['optimizer_state_bytes'] / 2**20:.2f} | {_mib(peak_f)} | "
            f"{_mib(peak_l)} | {peak_ratio} |"
        )
    return [*out, ""]


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    if report["kind"] == "lora":
        lo = report["lora"]
        head = _header(report, f"LoRA against full fine-tuning: one training step (rank {lo['rank']} on "
                       f"{', '.join(lo['target_modules'])})")  # fmt: skip
        body = lora_table(rows)
    else:
        head = _header(report, "Training-step benchmark")
        body = against_transformers(rows)
    sizes = "Sizes: " + "; ".join(f"{k}: {v}" for k, v in report["sizes"].items())
    return "\n".join([*head, *body, "## Every measurement", "", *_measurements(rows), sizes, ""])


def chart(report: dict[str, Any], path: str) -> None:
    """Median step time per family and backend (log scale), one bar group per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "error" not in r]
    families = list(dict.fromkeys(r["family"] for r in rows))
    keys = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(families) * max(1, len(keys)) / 3), 4.5))
    width = 0.8 / max(1, len(keys))
    for i, k in enumerate(keys):
        vals = [next((r["median_ms"] for r in rows if (r["family"], r["backend"]) == (f, k)), 0.0) for f in families]
        ax.bar(np.arange(len(families)) + i * width, vals, width, label=k)
    ax.set_xticks(np.arange(len(families)) + width * (len(keys) - 1) / 2)
    ax.set_xticklabels(families, rotation=20)
    ax.set_ylabel("median training step, ms")
    ax.set_title(f"one AdamW step at {report['shape']} (lower is better)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_report(report: dict[str, Any], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    name = report["kind"]
    write_atomic(os.path.join(out_dir, f"{name}.json"), json.dumps(report, indent=1))
    write_atomic(os.path.join(out_dir, f"{name}.md"), markdown(report))
    chart(report, os.path.join(out_dir, f"{name}.png"))


if __name__ == "__main__":
    sys.exit(main())
