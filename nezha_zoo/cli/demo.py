"""``make demo``: one seeded checkpoint, three frameworks, the same numbers.

For every head of every family with a complete spec, the demo draws canonical weights from a numpy
seed (:func:`nezha_zoo.pretrained.random_weights`), saves them as a transformers-format directory,
loads that directory in PyTorch, TensorFlow and Flax, runs one
padded batch, and prints the largest difference between every pair of backends and each backend's
forward time.  It needs no network and no hub.  Run it as ``python -m nezha_zoo.cli.demo`` (``make demo``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from nezha_zoo.config import PretrainedConfig
from nezha_zoo.families.electra import ElectraConfig
from nezha_zoo.families.mpnet import MPNetConfig
from nezha_zoo.families.mpt import MptConfig
from nezha_zoo.families.nezha import NezhaConfig
from nezha_zoo.families.xlm_roberta_xl import XLMRobertaXLConfig
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.registry import Family, get_family, model_class
from nezha_zoo.testing import TOLERANCES, max_abs_diff, tiny_inputs

__all__ = ["DEMO_CONFIGS", "main"]

logger = logging.getLogger("nezha_zoo.cli.demo")

#: The embedded defaults: small models with every documented default except the sizes.
DEMO_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "electra": lambda: ElectraConfig(
        vocab_size=1000,
        embedding_size=64,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
        num_labels=2,
    ),
    "nezha": lambda: NezhaConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
        max_relative_position=16,
        num_labels=2,
    ),
    "mpnet": lambda: MPNetConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=130,
        num_labels=2,
    ),
    "xlm_roberta_xl": lambda: XLMRobertaXLConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=130,
        num_labels=2,
    ),
    "mpt": lambda: MptConfig(
        vocab_size=1000,
        d_model=128,
        n_heads=4,
        n_layers=2,
        max_seq_len=128,
        pad_token_id=0,
        num_labels=2,
    ),
}

BACKENDS = ("pt", "tf", "flax")
SEED = 0
REPEATS = 5


def _main_output(out: Any) -> dict[str, np.ndarray]:
    """The tensor fields that carry a head's result (logits, last hidden state, pooled output), as numpy."""
    from nezha_zoo.testing import to_numpy

    skip = ("loss", "past_key_values", "hidden_states", "attentions", "cross_attentions")
    return {k: np.asarray(to_numpy(v)) for k, v in out.items() if k not in skip}


Runner = Callable[[dict[str, np.ndarray]], Any]
#: ``(family, head, checkpoint_dir) -> run``: how an outside reference (e.g. transformers) loads a class.
RunnerFactory = Callable[[Family, str, str], Runner]


def _runner(backend: str, family: Family, head: str, path: str) -> Runner:
    """Load ``path`` in ``backend`` and return ``run(inputs) -> output``."""
    model = model_class(family, head, backend).from_pretrained(path)
    if backend == "pt":
        torch = importlib.import_module("torch")  # only when the PyTorch backend is in use
        model.eval()

        def run(inputs: dict[str, np.ndarray]) -> Any:
            with torch.no_grad():
                return model(**{k: torch.from_numpy(v) for k, v in inputs.items()})

        return run
    if backend == "tf":
        return lambda inputs: model(dict(inputs), training=False)
    # The demo calls each model 1 + REPEATS times on one batch: compile at the first call (its
    # warm-up) rather than after an op-by-op call (the wrapper's default), which adds 0.3-0.8 s a class.
    model.jit_after_calls = 0
    return lambda inputs: model(**inputs)


def _timed(run: Callable[[dict[str, np.ndarray]], Any], inputs: dict[str, np.ndarray]) -> tuple[Any, float]:
    out = run(inputs)  # warm-up: builds, traces, caches
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = run(inputs)
        _main_output(out)  # materialise (TF/JAX dispatch asynchronously)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times) * 1e3


def _available(backend: str) -> bool:
    try:
        importlib.import_module(f"nezha_zoo.{backend}")
    except ImportError:
        return False
    return True


def run_demo(out_dir: str, references: dict[str, RunnerFactory] | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Build, save, load and compare every demo class; returns the table rows and whether all agree.

    ``references`` adds outside implementations (name -> runner factory) compared with each backend;
    ``benchmarks/parity.py`` passes transformers here (the package itself never imports it).
    """
    backends = [b for b in BACKENDS if _available(b)]
    references = dict(references or {})
    reference = list(references)
    rows: list[dict[str, Any]] = []
    ok = True
    for key, make_config in DEMO_CONFIGS.items():
        family = get_family(key)
        config = make_config()
        for head in family.heads:
            # A causal LM is meant to run as a decoder (causal self-attention).
            head_config = config.copy(is_decoder=True) if head == "ForCausalLM" else config
            spec = family.model_spec(head_config, head)
            path = os.path.join(out_dir, f"{key}-{head}")
            save_weights(path, head_config, spec, family, random_weights(spec, head_config, seed=SEED))
            mc = head == "ForMultipleChoice"
            inputs = tiny_inputs(
                batch=2,
                seq_len=16,
                vocab_size=config.vocab_size,
                type_vocab_size=getattr(config, "type_vocab_size", None),
                pad=config.pad_token_id,
                seed=SEED,
                num_choices=3 if mc else None,
            )
            results: dict[str, dict[str, np.ndarray]] = {}
            row: dict[str, Any] = {"class": family.class_name(head), "params": spec.num_parameters()}
            for b in backends + reference:
                factory = references.get(b) or (lambda f, h, p, b=b: _runner(b, f, h, p))
                out, ms = _timed(factory(family, head, path), inputs)
                results[b] = _main_output(out)
                row[f"{b} ms"] = ms
            pairs = [(a, c) for i, a in enumerate(backends) for c in backends[i + 1 :]]
            pairs += [(b, r) for r in reference for b in backends]
            for a, c in pairs:
                diff = max(max_abs_diff(results[a][k], results[c][k]) for k in results[a])
                row[f"{a}|{c}"] = diff
                ok &= diff <= TOLERANCES["logits"]
            rows.append(row)
    return rows, ok


def _table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    cells = [[_fmt(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _fmt(col: str, v: Any) -> str:
    if v is None:
        return "-"
    if col.endswith(" ms"):
        return f"{v:.2f}"
    if "|" in col:
        return f"{v:.1e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def main(argv: list[str] | None = None, references: dict[str, RunnerFactory] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nezha_zoo.cli.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="keep the demo checkpoints in this directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    if args.out:
        rows, ok = run_demo(args.out, references)
    else:
        with tempfile.TemporaryDirectory(prefix="nezha_zoo_demo_") as tmp:
            rows, ok = run_demo(tmp, references)
    sys.stdout.write(
        "nezha_zoo demo: seeded checkpoints (seed 0) loaded in every backend; one padded batch each.\n"
        "Columns a|b: max |a - b| over the head's outputs; '<backend> ms': median forward time (eager).\n\n"
    )
    sys.stdout.write(_table(rows) + "\n\n")
    verdict = "all backends agree" if ok else "DISAGREEMENT beyond"
    sys.stdout.write(f"{verdict} (tolerance {TOLERANCES['logits']:.0e}); {time.perf_counter() - t0:.1f} s in all\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
