"""Decoding speed of every causal-LM family in every backend beside transformers, and their tokens side by side.

``python -m benchmarks.generation`` builds one seeded checkpoint per causal-LM family at a small but
real size (:data:`BENCH_CONFIGS`) and, for each backend, times ``generate`` in each decoding mode
(:data:`MODES`: greedy, sampling with ``top_k=50`` and a seed, 4-beam search; prompt of 16 tokens, 64
new tokens, no eos so every run decodes all of them) at batch 1 and 8:

* ``pt``: PyTorch eager loop over the key/value cache;
* ``tf`` / ``tf-xla``: the whole loop (beams included) in one ``tf.function`` over the fixed-size
  KVCache, without and with XLA (``jit_compile``);
* ``flax``: the whole loop under one ``jax.jit`` over the fixed-size cache;
* ``hf``: transformers' PyTorch class on the same weights, ``generate(..., use_cache=True)``.

The first call (tracing and compilation included) is timed separately as ``warmup_s``; then
``--repeats`` rounds call every backend once in turn (so the backends compared, transformers
included, share the loaded machine's moment), and the figure is each backend's median, as tokens/s
= batch x new tokens / median.  The
same run checks that the greedy and beam-search continuations of all backends (transformers
included) are identical and says so per row; the "Against transformers" table gives each of our
backends' tokens/s over transformers' (``N.NNx``, above 1: ours is faster).

Output under ``--out`` (default ``benchmarks/results``): ``generation.json`` (machine, versions,
every measurement, the tokens' agreement) and ``generation.md``.  ``--smoke`` runs tiny configs in
seconds of decoding (plus compilation); ``tests/equivalence/test_bench_generation_smoke.py`` runs that.
A backend or mode that fails is reported as an ``error`` row (exit status 1), not fatal to the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.harness import start_jax
from nezha_zoo.hardware import machine_info
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.registry import get_family, model_class

BACKENDS = ("pt", "tf", "tf-xla", "flax", "hf")

#: decoding mode -> generate settings (besides max_new_tokens and eos_token_id=None)
MODES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "sample": dict(do_sample=True, top_k=50, seed=0),
    "beam4": dict(num_beams=4),
}
#: modes whose tokens must agree across backends (sampling draws from each framework's own RNG)
DETERMINISTIC = ("greedy", "beam4")

#: family key -> (config fields, what the size stands for).  No eos: every run decodes all tokens.
BENCH_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "electra": (
        dict(vocab_size=30522, embedding_size=128, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
             intermediate_size=1024, max_position_embeddings=512, is_decoder=True, eos_token_id=None),
        "electra-small generator shape (decoder)",
    ),
    "xlm_roberta_xl": (
        dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048,
             max_position_embeddings=514, is_decoder=True, eos_token_id=None),
        "XLM-R-XL layers at width 512, 4 layers",
    ),
    "mpt": (
        dict(vocab_size=32000, d_model=512, n_heads=8, n_layers=4, max_seq_len=512, eos_token_id=None),
        "MPT d_model 512, 4 layers",
    ),
}  # fmt: skip

#: ``--smoke``: one layer each, since the smoke run is compile-bound (a decoding loop per backend and
#: mode) and tests the benchmark's machinery; the backends' agreement over deeper caches is
#: tests/equivalence/test_generation_cross_backend.py's.
SMOKE_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "electra": (
        dict(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=64, is_decoder=True),
        "tiny",
    ),
    "xlm_roberta_xl": (
        dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=64, is_decoder=True),
        "tiny",
    ),
    "mpt": (dict(vocab_size=99, d_model=32, n_heads=4, n_layers=1, max_seq_len=64), "tiny"),
}  # fmt: skip


def build_checkpoint(family_key: str, fields: dict[str, Any], directory: str, seed: int = 0) -> str:
    """Write a seeded random ``ForCausalLM`` checkpoint of ``family_key`` with config ``fields``."""
    family = get_family(family_key)
    config = family.config_class(**fields)
    spec = family.model_spec(config, "ForCausalLM")
    save_weights(directory, config, spec, family, random_weights(spec, config, seed))
    return directory


def _generator(backend: str, family_key: str, path: str) -> Callable[[np.ndarray, int, dict], np.ndarray]:
    """``(input_ids, max_new_tokens, settings) -> tokens`` for one backend, model loaded from ``path``."""
    if backend in ("pt", "hf"):
        import torch

        if backend == "pt":
            model = model_class(family_key, "ForCausalLM", "pt").from_pretrained(path).eval()
        else:
            import transformers

            transformers.logging.set_verbosity_error()
            name = get_family(family_key).class_name("ForCausalLM", "pt")
            model = getattr(transformers, name).from_pretrained(path).eval()

        def run_pt(ids, new, settings):
            settings = dict(settings)
            if backend == "hf":  # transformers samples from torch's global generator
                torch.manual_seed(settings.pop("seed", 0))
                settings.update(use_cache=True, pad_token_id=model.config.pad_token_id or 0)
                ids = torch.from_numpy(ids)
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=new, eos_token_id=None, **settings).numpy()

        return run_pt
    if backend in ("tf", "tf-xla"):
        model = model_class(family_key, "ForCausalLM", "tf").from_pretrained(path)
        xla = backend == "tf-xla"
        return lambda ids, new, settings: model.generate(
            ids, max_new_tokens=new, eos_token_id=None, jit_compile=xla, **settings
        ).numpy()
    if backend == "flax":
        model = model_class(family_key, "ForCausalLM", "flax").from_pretrained(path)
        return lambda ids, new, settings: np.asarray(
            model.generate(ids, max_new_tokens=new, eos_token_id=None, **settings)
        )
    raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")


def measure(
    runs: dict[str, Callable[[np.ndarray, int, dict], np.ndarray]],
    ids: np.ndarray,
    new: int,
    repeats: int,
    settings: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Time every backend of ``runs`` on the same call, in turn.

    Each backend's warm-up call is timed apart; then ``repeats`` rounds call every backend once, so
    that the backends compared share the machine's moment (a loaded host drifts by tens of percent
    from one minute to the next); the figure is each backend's median.  A backend whose call raises
    gets ``{"error": ...}`` and leaves the rounds.

    Returns:
        ``(figures, tokens)``: per backend its figures (or error) and its last tokens.
    """
    settings = settings or {}
    figures: dict[str, dict[str, Any]] = {}
    tokens: dict[str, np.ndarray] = {}
    warmup: dict[str, float] = {}
    for backend, run in runs.items():
        start = time.perf_counter()
        try:
            tokens[backend] = run(ids, new, settings)
        except Exception as err:  # noqa: BLE001  (e.g. a backend without this mode: reported, not fatal)
            figures[backend] = {"error": repr(err)[:300]}
            continue
        warmup[backend] = time.perf_counter() - start
    times: dict[str, list[float]] = {b: [] for b in warmup}
    for _ in range(repeats):
        for backend in warmup:
            start = time.perf_counter()
            tokens[backend] = runs[backend](ids, new, settings)
            times[backend].append(time.perf_counter() - start)
    for backend in warmup:
        median = statistics.median(times[backend])
        generated = tokens[backend].shape[1] - ids.shape[1]
        figures[backend] = {
            "warmup_s": warmup[backend],
            "median_s": median,
            "repeats": repeats,
            "new_tokens": int(generated),
            "tokens_per_s": ids.shape[0] * generated / median,
        }
    return figures, tokens


def _set_threads(threads: int) -> dict[str, Any]:
    """Pin each framework's intra-op thread count (before their runtimes start); report what holds."""
    if threads <= 0:
        return {"requested": "framework defaults"}
    jax_cpus = start_jax(threads)  # XLA's CPU pool is sized by the CPUs it sees at start-up, not by a flag
    import tensorflow as tf
    import torch

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"requested": threads, "torch": torch.get_num_threads()}
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        out["tf"] = threads
    except RuntimeError:  # TF already initialised in this process (e.g. under pytest)
        out["tf"] = "already initialised: default"
    out["jax"] = f"CPU client started on {jax_cpus} CPU(s)"
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "tensorflow-cpu", "tensorflow", "keras", "jax", "flax", "transformers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Generation speed",
        "",
        f"Prompt {report['prompt_len']} tokens, {report['new_tokens']} new tokens, no eos; modes: "
        + ", ".join(f"{m} {MODES[m] or '(argmax)'}" for m in report["modes"])
        + f".  Warm-up (tracing and compilation) excluded and listed apart; median of {report['repeats']} runs.  "
        f"`hf` is transformers' PyTorch class on the same weights (`use_cache=True`).  "
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, shared with other jobs "
        f"while measured; threads: {report['threads']}; "
        f"CPU flags: {', '.join(report['machine'].get('cpu_flags', [])) or 'none'}.",
        "",
        "| family | mode | batch | backend | tokens/s | median s | warm-up s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        head = f"| {r['family']} | {r['mode']} | {r['batch']} | {r['backend']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | |")
        else:
            lines.append(f"{head} {r['tokens_per_s']:.1f} | {r['median_s']:.3f} | {r['warmup_s']:.2f} |")
    ours = [b for b in report["backends"] if b != "hf"]
    if "hf" in report["backends"] and ours:
        lines += [
            "",
            "## Against transformers",
            "",
            "Our tokens/s over transformers PyTorch's in the same run (above 1: ours is faster).",
            "",
            "| family | mode | batch | " + " | ".join(ours) + " |",
            "|---|---|---|" + "---|" * len(ours),
        ]
        speed = {(r["family"], r["mode"], r["batch"], r["backend"]): r.get("tokens_per_s") for r in report["rows"]}
        for family, mode, batch in dict.fromkeys((r["family"], r["mode"], r["batch"]) for r in report["rows"]):
            theirs = speed.get((family, mode, batch, "hf"))
            cells = []
            for b in ours:
                mine = speed.get((family, mode, batch, b))
                cells.append(f"{mine / theirs:.2f}x" if mine and theirs else "n/a")
            lines.append(f"| {family} | {mode} | {batch} | " + " | ".join(cells) + " |")
    lines += ["", "## Continuations (greedy and beam search)", ""]
    for a in report["agreement"]:
        verdict = "identical in " + ", ".join(a["backends"]) if a["identical"] else "DIFFER: " + a["detail"]
        lines.append(f"- {a['family']} {a['mode']} batch {a['batch']}: {verdict}; row 0 continues with {a['row0']}")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(BENCH_CONFIGS), help="comma-separated family keys")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: " + ", ".join(BACKENDS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per framework (default 1: small decode ops on a shared host lose more to "
        "thread synchronisation than they gain; 0 leaves the frameworks' defaults)",
    )
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny configs, 4 + 4 tokens, batch 2")
    args = parser.parse_args(argv)
    configs = SMOKE_CONFIGS if args.smoke else BENCH_CONFIGS
    if args.smoke:
        args.prompt_len, args.new_tokens, args.repeats, args.batches = 4, 4, 1, "2"
    families = [f for f in args.families.split(",") if f]
    backends = [b for b in args.backends.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    unknown = (
        sorted(set(families) - set(configs)) + sorted(set(backends) - set(BACKENDS)) + sorted(set(modes) - set(MODES))
    )
    if unknown:
        parser.error(f"unknown families/backends/modes {unknown}")
    batches = [int(b) for b in args.batches.split(",")]
    threads = _set_threads(args.threads)

    from nezha_zoo.testing import pin_precision

    for framework in ("pt", "tf", "flax"):
        pin_precision(framework)
    rows, agreement = [], []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for family_key in families:
            fields, _ = configs[family_key]
            path = build_checkpoint(family_key, fields, os.path.join(tmp, family_key))
            prompts = {b: rng.integers(3, fields["vocab_size"], (b, args.prompt_len)) for b in batches}
            outputs: dict[tuple[str, str, int], np.ndarray] = {}
            runs = {}
            for backend in backends:
                try:
                    runs[backend] = _generator(backend, family_key, path)
                except Exception as err:  # noqa: BLE001  (a backend that cannot load is reported, not fatal)
                    rows += [
                        {"family": family_key, "backend": backend, "mode": m, "batch": b, "error": repr(err)}
                        for m in modes
                        for b in batches
                    ]
            for mode in modes:
                for b in batches:
                    figures, tokens = measure(runs, prompts[b], args.new_tokens, args.repeats, MODES[mode])
                    for backend, fig in figures.items():
                        rows.append({"family": family_key, "backend": backend, "mode": mode, "batch": b, **fig})
                        if backend in tokens and "error" not in fig:
                            outputs[(backend, mode, b)] = tokens[backend]
                            said = f"{fig['tokens_per_s']:9.1f} tokens/s (warm-up {fig['warmup_s']:.1f} s)"
                        else:
                            said = f"error {fig['error']:.200}"
                        sys.stdout.write(f"{family_key:15s} {backend:7s} {mode:7s} batch {b}: {said}\n")
                    sys.stdout.flush()
            for mode in (m for m in modes if m in DETERMINISTIC):
                for b in batches:
                    got = {be: outputs[(be, mode, b)] for be in backends if (be, mode, b) in outputs}
                    if not got:
                        continue
                    first = next(iter(got.values()))
                    differ = [be for be, t in got.items() if t.shape != first.shape or not np.array_equal(t, first)]
                    agreement.append(
                        {
                            "family": family_key,
                            "mode": mode,
                            "batch": b,
                            "backends": list(got),
                            "identical": not differ,
                            "detail": "" if not differ else f"{differ} differ from {next(iter(got))}",
                            "row0": first[0, args.prompt_len :].tolist(),
                        }
                    )
            _write(args, configs, families, backends, modes, rows, agreement, threads)
    return 0 if all("error" not in r for r in rows) and all(a["identical"] for a in agreement) else 1


def _write(args: argparse.Namespace, configs, families, backends, modes, rows, agreement, threads) -> None:
    """Write the report so far (after each family, so a long run leaves its finished part behind)."""
    report = {
        "machine": machine_info(threads),
        "versions": _versions(),
        "threads": threads,
        "smoke": args.smoke,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "backends": backends,
        "modes": modes,
        "configs": {f: configs[f][0] for f in families},
        "rows": rows,
        "agreement": agreement,
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generation.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "generation.md"), "w") as f:
        f.write(_markdown(report))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
