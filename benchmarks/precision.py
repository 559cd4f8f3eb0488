"""bfloat16 against float32: Electra-base forward and one AdamW training step, per framework (issue #23).

``python -m benchmarks.precision [--smoke] [--frameworks pt,tf,flax] [--out DIR] [--repeats N]``

For each framework one fresh process loads the same seeded Electra-base checkpoint twice, in float32
and in bfloat16 (``dtype="bfloat16"``: weights and compute), and times, call by call in turn:

* the forward pass at 8 x 128 (``torch.inference_mode`` eager; ``tf.function`` without and with XLA;
  ``jax.jit``), together with one of the model's FFN products (1024 x 768 x 3072) done by the
  framework itself in each dtype (what its bfloat16 matrix product gives on this CPU);
* one training step: dropout on, loss = mean square of the last hidden state (in float32), gradients
  and an AdamW update (``torch.optim.AdamW``, ``keras.optimizers.AdamW`` in the same
  ``tf.function``, ``optax.adamw`` in the same ``jax.jit``).

A float32 numpy product is timed after every round, as in :mod:`benchmarks.forward`, so each model's
GFLOP/s is set against the machine's matmul rate of the same window; the headline is the median
bfloat16 time over the median float32 time of the same process (< 1: bfloat16 is faster).  Training
FLOPs are counted as three forward passes.  Where the compiler's program is readable (XLA) the
report counts the dtypes of its dot products, which shows whether bfloat16 products stay bfloat16 or
are widened to float32.

Output under ``--out`` (default ``benchmarks/results``): ``precision.json`` and ``precision.md``.
``--smoke`` runs a tiny config in-process in seconds (the test).  The last full run is committed in
``docs/benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from benchmarks import forward

FAMILY = "electra"
DTYPES = ("float32", "bfloat16")
#: Mode -> (framework, how it is compiled).
MODES: dict[str, tuple[str, str]] = {
    "pt": ("pt", "eager"),
    "tf": ("tf", "tf.function"),
    "tf-xla": ("tf", "tf.function+XLA"),
    "flax": ("flax", "jax.jit"),
}
TASKS = ("forward", "train")
SHAPE = (8, 128)
SMOKE_SHAPE = (2, 16)
#: One FFN product of Electra-base at 8 x 128: (tokens, hidden) @ (hidden, intermediate).
GEMM = (1024, 768, 3072)
SMOKE_GEMM = (32, 32, 37)
LEARNING_RATE = 1e-5
#: Why the XLA rows widen bf16 dots (probed with jax 0.10.2 and TF 2.21; details in docs/benchmarks/README.md).
XLA_BF16_NOTE = (
    "No XLA flag makes these dots native (the oneDNN, XNNPACK/YNNPACK, ISA and precision flags were each "
    "tried): XLA's CPU compiler keeps a bf16 dot only in the form its YNNPACK fusion runs, bf16 operands with "
    "a float32 result, and widens a `bf16 x bf16 -> bf16` dot whole.  Written as `bf16 x bf16 -> f32` "
    "(`preferred_element_type=jnp.float32` in JAX, `tf.linalg.matmul(..., output_type=tf.float32)` under "
    "XLA) and cast back, the 1024 x 768 x 3072 product took 0.57-0.64x and a Flax Electra-base bf16 forward "
    '0.56x the float32 time in a probe; see docs/benchmarks/README.md, "Why XLA widens bfloat16 dots '
    'on the CPU".'
)


def _ids(batch: int, seq: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    return forward._inputs(batch, seq, vocab)


def _hlo_dots(hlo: str) -> dict[str, int]:
    """``{"<operand dtypes> -> <result dtype>": count}`` of the ``dot`` instructions of an XLA HLO text
    (operand dtypes looked up from the instructions that define them)."""
    defined = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    counts: Counter[str] = Counter()
    for out_dtype, operands in re.findall(r"= (\w+)\[[^\]]*\]\S* dot\(([^)]*)\)", hlo):
        names = re.findall(r"%([\w.\-]+)", operands)
        dtypes = [defined.get(n, "?") for n in names] or re.findall(r"(\w+)\[", operands)
        counts[f"{' x '.join(dtypes)} -> {out_dtype}"] += 1
    return dict(counts)


# --- runners: (run(ids, mask) -> output, materialise(output)) per framework ---------------------------


def _pt_runners(modes: list[str], path: str, smoke: bool) -> tuple[dict, dict, dict]:
    import torch

    from nezha_zoo.pt import ElectraModel

    forward_runners, train_runners, gemms = {}, {}, {}
    for dtype in DTYPES:
        model = ElectraModel.from_pretrained(path, dtype=dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

        def fwd(ids, mask, model=model):
            model.eval()
            with torch.inference_mode():
                return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0]

        def step(ids, mask, model=model, opt=opt):
            model.train()
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0]
            loss = out.float().square().mean()
            loss.backward()
            opt.step()
            return loss.detach()

        forward_runners[f"pt {dtype}"] = (fwd, lambda out: out)
        train_runners[f"pt {dtype}"] = (step, lambda out: out)
        m, k, n = SMOKE_GEMM if smoke else GEMM
        a, b = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype))
        gemms[f"pt matmul {dtype}"] = ((lambda _i, _m, a=a, b=b: torch.mm(a, b)), lambda out: out)
    info = {
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }
    return {**forward_runners, **gemms}, train_runners, info


def _tf_functions(model: Any, xla: bool) -> tuple[Callable, Callable]:
    """``(forward(ids, mask) -> (B, L, H), train_step(ids, mask) -> loss)`` of one Keras model as
    ``tf.function``s (XLA when ``xla``); the step owns its AdamW."""
    import keras
    import tensorflow as tf

    opt = keras.optimizers.AdamW(learning_rate=LEARNING_RATE)
    opt.build(model.trainable_variables)

    def fwd(ids, mask):
        return model(input_ids=ids, attention_mask=mask, training=False)[0]

    def step(ids, mask):
        with tf.GradientTape() as tape:
            out = model(input_ids=ids, attention_mask=mask, training=True)[0]
            loss = tf.reduce_mean(tf.square(tf.cast(out, tf.float32)))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return tf.function(fwd, jit_compile=xla), tf.function(step, jit_compile=xla)


def _tf_runners(modes: list[str], path: str, smoke: bool) -> tuple[dict, dict, dict]:
    import tensorflow as tf

    from nezha_zoo.tf import TFElectraModel

    forward_runners, train_runners, info = {}, {}, {}
    for dtype in DTYPES:
        model = TFElectraModel.from_pretrained(path, dtype=dtype)
        for mode in modes:
            xla = MODES[mode][1].endswith("XLA")
            fwd, train_fn = _tf_functions(model, xla)
            forward_runners[f"{mode} {dtype}"] = (
                lambda ids, mask, fn=fwd: fn(tf.constant(ids), tf.constant(mask)),
                lambda out: out.numpy(),
            )
            train_runners[f"{mode} {dtype}"] = (
                lambda ids, mask, fn=train_fn: fn(tf.constant(ids), tf.constant(mask)),
                lambda out: out.numpy(),
            )
            if xla:
                ids, mask = _ids(*(SMOKE_SHAPE if smoke else SHAPE), model.config.vocab_size)
                hlo = fwd.experimental_get_compiler_ir(tf.constant(ids), tf.constant(mask))(stage="optimized_hlo")
                info[f"{mode} {dtype} forward dots"] = _hlo_dots(hlo)
    m, k, n = SMOKE_GEMM if smoke else GEMM
    rng = np.random.default_rng(0)
    for dtype in DTYPES:
        a = tf.cast(tf.constant(rng.standard_normal((m, k), dtype=np.float32)), dtype)
        b = tf.cast(tf.constant(rng.standard_normal((k, n), dtype=np.float32)), dtype)
        mm = tf.function(tf.matmul)
        forward_runners[f"tf matmul {dtype}"] = ((lambda _i, _m, a=a, b=b, mm=mm: mm(a, b)), lambda out: out.numpy())
    return forward_runners, train_runners, info


def _flax_runners(modes: list[str], path: str, smoke: bool) -> tuple[dict, dict, dict]:
    import jax
    import jax.numpy as jnp
    import optax

    from nezha_zoo.flax import FlaxElectraModel

    forward_runners, train_runners, info = {}, {}, {}
    tx = optax.adamw(LEARNING_RATE)
    for dtype in DTYPES:
        model = FlaxElectraModel.from_pretrained(path, dtype=dtype)
        fwd = jax.jit(lambda params, ids, mask, model=model: model(ids, attention_mask=mask, params=params)[0])

        def loss_fn(params, ids, mask, rng, model=model):
            out = model(ids, attention_mask=mask, params=params, dropout_rng=rng, train=True)[0]
            return jnp.mean(jnp.square(out.astype(jnp.float32)))

        @jax.jit
        def train_step(params, opt_state, ids, mask, rng, loss_fn=loss_fn):
            loss, grads = jax.value_and_grad(loss_fn)(params, ids, mask, rng)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        state = {"params": model.params, "opt": tx.init(model.params), "rng": jax.random.PRNGKey(0)}

        def step(ids, mask, state=state, train_step=train_step):
            state["rng"], rng = jax.random.split(state["rng"])
            state["params"], state["opt"], loss = train_step(state["params"], state["opt"], ids, mask, rng)
            return loss

        forward_runners[f"flax {dtype}"] = (
            lambda ids, mask, fwd=fwd, params=model.params: fwd(params, ids, mask),
            lambda out: out.block_until_ready(),
        )
        train_runners[f"flax {dtype}"] = (step, lambda out: out.block_until_ready())
        ids, mask = _ids(*(SMOKE_SHAPE if smoke else SHAPE), model.config.vocab_size)
        info[f"flax {dtype} forward dots"] = _hlo_dots(fwd.lower(model.params, ids, mask).compile().as_text())
        m, k, n = SMOKE_GEMM if smoke else GEMM
        key_a, key_b = jax.random.split(jax.random.PRNGKey(1))
        a, b = jax.random.normal(key_a, (m, k), dtype), jax.random.normal(key_b, (k, n), dtype)
        mm = jax.jit(jnp.matmul)
        forward_runners[f"flax matmul {dtype}"] = (
            (lambda _i, _m, a=a, b=b, mm=mm: mm(a, b)),
            lambda out: out.block_until_ready(),
        )
    return forward_runners, train_runners, info


RUNNERS: dict[str, Callable[[list[str], str, bool], tuple[dict, dict, dict]]] = {
    "pt": _pt_runners,
    "tf": _tf_runners,
    "flax": _flax_runners,
}


def run_worker(framework: str, path: str, smoke: bool, min_time: float, repeats: int) -> dict[str, Any]:
    """Time every (mode, dtype) of ``framework`` in this process: forwards (and the framework's own
    products) interleaved in one series, training steps in another, each with the numpy reference.

    Returns ``{"framework", "info", "reference_n", "tasks": {task: {name: {"times_s", "warmup_s"},
    "reference_s": [...]}}}``.
    """
    modes = [m for m, (fw, _) in MODES.items() if fw == framework]
    forward_runners, train_runners, info = RUNNERS[framework](modes, path, smoke)
    n = forward.SMOKE_REFERENCE_N if smoke else forward.REFERENCE_N
    reference = forward._reference_product(n)
    batch, seq = SMOKE_SHAPE if smoke else SHAPE
    vocab = forward.bench_config(FAMILY, smoke).vocab_size
    tasks = {}
    for task, runners in (("forward", forward_runners), ("train", train_runners)):
        timed = forward._time_interleaved(runners, reference, batch, seq, vocab, min_time, repeats)
        tasks[task] = {
            "reference_s": timed["reference_s"],
            **{b: {"times_s": timed["times_s"][b], "warmup_s": timed["warmup_s"][b]} for b in runners},
        }
    return {"framework": framework, "info": info, "reference_n": n, "batch": batch, "seq": seq, "tasks": tasks}


def _subprocess_worker(args: argparse.Namespace, framework: str, path: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [
        sys.executable, "-m", "benchmarks.precision", "--worker", framework, "--checkpoint", path,
        "--threads", str(args.threads), "--min-time", str(args.min_time), "--repeats", str(args.repeats),
        "--result", result_path,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:  # a negative code is a signal (-9: killed, e.g. out of memory)
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            return {"framework": framework, "error": f"exit code {proc.returncode}: {tail}"}
        with open(result_path) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        return {"framework": framework, "error": f"timed out after {args.timeout:.0f} s"}
    finally:
        os.unlink(result_path)


def summarise(result: dict[str, Any], smoke: bool, numpy_to_best: float) -> list[dict[str, Any]]:
    """One row per (mode or framework product, task): both dtypes' medians, the bfloat16/float32 time
    ratio, GFLOP/s and the share of the same window's float32 matmul rate."""
    if "error" in result:
        return [{"framework": result["framework"], "error": result["error"]}]
    config = forward.bench_config(FAMILY, smoke)
    batch, seq, n = result["batch"], result["seq"], result["reference_n"]
    m, k, nn = SMOKE_GEMM if smoke else GEMM
    rows = []
    for task, timed in result["tasks"].items():
        reference = 2 * n**3 / statistics.median(timed["reference_s"]) / 1e9 * numpy_to_best
        names = dict.fromkeys(name.rsplit(" ", 1)[0] for name in timed if name != "reference_s")
        for what in names:
            flops = 2 * m * k * nn if what.endswith("matmul") else forward.forward_flops(FAMILY, config, batch, seq)
            flops *= 3 if task == "train" else 1  # backward: two products per forward product
            row: dict[str, Any] = {"framework": result["framework"], "what": what, "task": task}
            for dtype in DTYPES:
                median = statistics.median(timed[f"{what} {dtype}"]["times_s"])
                row[f"{dtype}_ms"] = median * 1e3
                row[f"{dtype}_gflops"] = flops / median / 1e9
                row[f"{dtype}_matmul_fraction"] = flops / median / 1e9 / reference
                row[f"{dtype}_runs"] = len(timed[f"{what} {dtype}"]["times_s"])
            row["bf16_over_f32"] = row["bfloat16_ms"] / row["float32_ms"]
            row["reference_gflops"] = reference
            rows.append(row)
    return rows


#: What each run of a merged report keeps of its own (the machine's state while it ran).
PART_KEYS = ("frameworks", "load_before", "load_after", "matmul", "wall_s")


def markdown(report: dict[str, Any]) -> str:
    """The report: machine line, the ratio table, the dot dtypes XLA compiled."""
    m = report["machine"]
    lines = [
        "# bfloat16 against float32 (Electra-base, 8 x 128)" + (" (smoke)" if report["smoke"] else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; unit flags: "
        f"{', '.join(report['cpu_flags']) or 'none'}.",
        "",
    ]
    for part in report.get("parts", [report]):
        lines.append(
            f"- {', '.join(part['frameworks'])}: load average (1 min) {part['load_before'][0]:.1f} before, "
            f"{part['load_after'][0]:.1f} after; float32 matmul at the start {part['matmul']['gflops']:.1f} GFLOP/s."
        )
    lines += [
        "",
        "bf16/f32 = median bfloat16 time / median float32 time, timed call by call in turn in one process "
        "(< 1.00: bfloat16 is faster).  `share` = GFLOP/s over the float32 matmul rate of the same window.  "
        "Training: dropout on, AdamW, counted as 3 forward passes.",
        "",
        "| framework | mode | task | float32 ms | bfloat16 ms | bf16/f32 | f32 GFLOP/s | bf16 GFLOP/s "
        "| f32 share | bf16 share | runs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['framework']} | error: {r['error']} | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['framework']} | {r['what']} | {r['task']} | {r['float32_ms']:.1f} | {r['bfloat16_ms']:.1f} "
            f"| {r['bf16_over_f32']:.2f} | {r['float32_gflops']:.1f} | {r['bfloat16_gflops']:.1f} "
            f"| {r['float32_matmul_fraction']:.0%} | {r['bfloat16_matmul_fraction']:.0%} "
            f"| {r['float32_runs']} |"
        )
    info = {k: v for res in report["results"] for k, v in res.get("info", {}).items()}
    if info:
        lines += ["", "## What the frameworks compile", ""]
        lines += [f"- {k}: {json.dumps(v)}" for k, v in info.items()]
    lines += ["", "## XLA and bfloat16 dots", "", XLA_BF16_NOTE]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", default="pt,tf,flax", help="comma-separated: pt, tf, flax")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--min-time", type=float, default=0.0, help="seconds of timed runs per runner")
    parser.add_argument("--repeats", type=int, default=5, help="at least this many timed runs per runner")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per framework process")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--workdir", help="keep the generated checkpoint here (reused across runs)")
    parser.add_argument("--smoke", action="store_true", help="tiny config, in-process: seconds")
    parser.add_argument(
        "--parallel", action="store_true", help="run the framework processes at once (ratios stay in-process)"
    )
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="only combine reports of separate runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # one framework in this fresh process
        forward._set_threads(args.threads, jax=args.worker == "flax")
        result = run_worker(args.worker, args.checkpoint, False, args.min_time, args.repeats)
        forward._write_atomic(args.result, json.dumps(result))
        return 0
    if args.merge:  # reports of runs made one framework at a time, into one
        parts = []
        for name in args.merge:
            with open(name) as f:
                parts.append(json.load(f))
        report = {**parts[0], "parts": [{k: p[k] for k in PART_KEYS} for p in parts]}
        for key in ("frameworks", "rows", "results"):
            report[key] = [x for p in parts for x in p[key]]
        _write_report(report, args.out)
        return 0
    frameworks = [f for f in args.frameworks.split(",") if f]
    unknown = [f for f in frameworks if f not in RUNNERS]
    if unknown:
        parser.error(f"unknown frameworks: {unknown} (known: {', '.join(RUNNERS)})")
    os.makedirs(args.out, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="nezha_zoo_precision_")
    path = forward._checkpoint(workdir, FAMILY, args.smoke)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    if not args.smoke:
        forward._set_threads(args.threads)
    matmul = forward.matmul_rate(args.threads, n=256, min_time=0.2) if args.smoke else forward.matmul_rate(args.threads)
    if args.smoke:
        results = [run_worker(fw, path, True, args.min_time, args.repeats) for fw in frameworks]
    else:
        with ThreadPoolExecutor(len(frameworks) if args.parallel else 1) as pool:
            results = list(pool.map(lambda fw: _subprocess_worker(args, fw, path), frameworks))
    for r in results:
        sys.stdout.write(f"{r['framework']}: {'error: ' + r['error'] if 'error' in r else 'done'}\n")
    rows = [row for r in results for row in summarise(r, args.smoke, matmul["numpy_to_best"])]
    machine = forward._machine(args.threads)  # nezha_zoo.hardware's CPU record plus the load average
    report = {
        "machine": machine,
        "cpu_flags": machine["cpu_flags"],
        "frameworks": frameworks,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "versions": forward._versions(),
        "matmul": matmul,
        "smoke": args.smoke,
        "shape": "x".join(map(str, SMOKE_SHAPE if args.smoke else SHAPE)),
        "rows": rows,
        "results": results,
        "wall_s": time.perf_counter() - t0,
    }
    _write_report(report, args.out)
    sys.stdout.write(markdown(report))
    return 0


def _write_report(report: dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    forward._write_atomic(os.path.join(out, "precision.json"), json.dumps(report, indent=1))
    forward._write_atomic(os.path.join(out, "precision.md"), markdown(report))


if __name__ == "__main__":
    sys.exit(main())
