"""``nezha-zoo verify DIR``: load a checkpoint in every installed backend and compare their outputs.

Each backend runs in its own subprocess (``python -m nezha_zoo.conversion.verify --worker ...``), so
TensorFlow, torch and jax never share a process and the converter core imports none of them.  A
checkpoint in a non-canonical format is first converted to canonical safetensors in a temporary
directory.  The first backend that loads is the reference; every output field of every other
backend must agree within ``nezha_zoo.testing.TOLERANCES`` (hidden states 1e-5, logits 1e-4).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile
from typing import Any

import numpy as np

from nezha_zoo.auto import AutoConfig
from nezha_zoo.conversion.formats import detect_format, droppable, open_source
from nezha_zoo.io.child import run_child
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.head_resolution import resolve_head, validity_errors
from nezha_zoo.spec.registry import family_of_config, model_class
from nezha_zoo.testing import TOLERANCES, max_abs_diff, tiny_inputs

__all__ = ["verify", "BACKENDS", "installed_backends"]

BACKENDS = ("pt", "tf", "flax")
_FRAMEWORK = {"pt": "torch", "tf": "tensorflow", "flax": "flax"}
#: Output fields compared at the hidden-state tolerance; every other field is a logit.
_HIDDEN_FIELDS = ("last_hidden_state", "pooler_output")


def installed_backends() -> list[str]:
    """The backends whose framework is importable here (checked without importing it); no arguments."""
    return [b for b in BACKENDS if importlib.util.find_spec(_FRAMEWORK[b]) is not None]


def _probe_inputs(config: Any, head: str) -> dict[str, np.ndarray]:
    types = getattr(config, "type_vocab_size", None)
    pad = getattr(config, "pad_token_id", None)
    limit = getattr(config, "max_position_embeddings", None) or 64
    seq = max(2, min(8, limit - 3))
    return tiny_inputs(
        batch=2,
        seq_len=seq,
        vocab_size=config.vocab_size,
        type_vocab_size=types if types else None,
        pad=pad if pad is not None else 0,
        num_choices=2 if head == "ForMultipleChoice" else None,
    )


def _run_worker(backend: str, directory: str, head: str, inputs: str, out: str, pooler: bool = True) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "nezha_zoo.conversion.verify", "--worker", backend, directory, head, inputs, out]
    if not pooler:
        cmd.append("--without-pooler")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = run_child(cmd, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"status": "error", "detail": tail[0]}
    with open(out + ".json", encoding="utf-8") as fh:
        return json.load(fh)


def checked_head(path: str, fmt: str, family: Any, config: Any, head: str | None) -> Any:
    """The head the checkpoint at ``path`` (format ``fmt``) is loaded as (``head``, or the head its
    tensors are), as :func:`~nezha_zoo.io.head_resolution.resolve_head` finds it.

    Raises:
        CheckpointError: the checkpoint is not valid (the tensors fit no head exactly; integer weights).
    """
    source = open_source(path, fmt, family, config)
    try:
        found = resolve_head(family, config, source.keys(), source.shape, head, lambda k: droppable(fmt, family, k))
        errors = validity_errors(found, source.dtype)
    finally:
        source.close()
    if errors:
        raise CheckpointError(f"{path}: {'; '.join(errors)}")
    return found


def verify(path: str | os.PathLike, backends: list[str] | None = None, head: str | None = None) -> dict[str, Any]:
    """Load the checkpoint at ``path`` in each backend, run probe inputs, compare the outputs.

    Args:
        path (str | os.PathLike): checkpoint directory of any readable format.
        backends (list[str] | None): backends to run (default: every installed one).
        head (str | None): class head (default: the head the tensors are, as ``convert`` decides).

    Returns:
        ``{"path", "format", "family", "head", "class", "head_note", "backends": {backend: status},
        "rows": [{"field", "backend", "max_abs_diff", "tolerance", "ok"}], "ok"}``; ``ok`` is False
        when any difference is beyond tolerance or fewer than two backends could load the checkpoint.
        A base saved without its pooler is loaded without one (``pooler_output`` is not compared).

    Raises:
        CheckpointError: the checkpoint is not valid (:func:`~nezha_zoo.io.head_resolution.validity_errors`:
            the tensors fit no head exactly, naming the closest and its ``--head``; integer weights).
    """
    from nezha_zoo.conversion.convert import convert

    path = os.fspath(path)
    backends = list(backends or installed_backends())
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; choose from {list(BACKENDS)}")
    fmt = detect_format(path)
    config = AutoConfig.from_pretrained(path)
    family = family_of_config(config)
    with tempfile.TemporaryDirectory(prefix="nezha-zoo-verify-") as tmp:
        found = checked_head(path, fmt, family, config, head)
        head, pooler = found.head, found.pooler is not False
        directory = path
        if fmt not in ("safetensors", "pytorch-bin"):
            directory = os.path.join(tmp, "canonical")
            convert(path, directory, "safetensors", source_format=fmt, head=head)
        inputs = _probe_inputs(config, head)
        inputs_file = os.path.join(tmp, "inputs.npz")
        np.savez(inputs_file, **inputs)
        status: dict[str, Any] = {}
        outputs: dict[str, dict[str, np.ndarray]] = {}
        for b in backends:
            out = os.path.join(tmp, f"out-{b}.npz")
            status[b] = _run_worker(b, directory, head, inputs_file, out, pooler)
            if status[b]["status"] == "ok":
                with np.load(out) as data:
                    outputs[b] = {k: data[k] for k in data.files}
    rows = []
    ran = list(outputs)
    if ran:
        ref = ran[0]
        for b in ran[1:]:
            for field, value in outputs[ref].items():
                tol = TOLERANCES["hidden" if field in _HIDDEN_FIELDS else "logits"]
                if field not in outputs[b]:
                    rows.append({"field": field, "backend": b, "max_abs_diff": None, "tolerance": tol, "ok": False})
                    continue
                d = max_abs_diff(value, outputs[b][field])
                ok = bool(np.isfinite(d) and d <= tol)
                rows.append(
                    {"field": field, "backend": b, "reference": ref, "max_abs_diff": d, "tolerance": tol, "ok": ok}
                )
    return {
        "path": path,
        "format": fmt,
        "family": family.key,
        "head": head,
        "class": family.class_name(head),
        "head_note": found.note,
        "backends": status,
        "rows": rows,
        "ok": len(ran) >= 2 and all(r["ok"] for r in rows),
    }


# --- worker (runs in a subprocess, imports one framework) -----------------------------------------


def _worker(backend: str, directory: str, head: str, inputs_file: str, out: str, pooler: bool = True) -> int:
    from nezha_zoo.testing import pin_precision, to_numpy

    config = AutoConfig.from_pretrained(directory)
    family = family_of_config(config)
    name = family.class_name(head, backend)
    result: dict[str, Any] = {"status": "ok", "class": name}
    try:
        cls = model_class(family, head, backend)
    except ValueError as err:  # the backend does not define this head
        cls, result = None, {"status": "skipped", "detail": str(err)}
    if cls is not None:
        pin_precision(backend)
        with np.load(inputs_file) as data:
            inputs = {k: data[k] for k in data.files}
        if pooler:
            model = cls.from_pretrained(directory, strict=True)
        else:  # a base saved without its pooler: the pooler is the only thing left at initial values
            model, info = cls.from_pretrained(directory, output_loading_info=True)
            fresh = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
            if fresh or info["unexpected_keys"]:
                raise CheckpointError(f"missing {fresh}; unexpected {info['unexpected_keys']}")
        if backend == "pt":
            import torch

            model.eval()
            with torch.no_grad():
                output = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        elif backend == "tf":
            output = model(inputs, training=False)
        else:
            output = model(**inputs)
        arrays = {k: np.asarray(to_numpy(v), dtype=np.float32) for k, v in output.items() if _is_array(v)}
        if not pooler:
            arrays.pop("pooler_output", None)  # from the freshly initialised pooler, not the checkpoint
        np.savez(out, **arrays)
    with open(out + ".json", "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    return 0


def _is_array(v: Any) -> bool:
    return v is not None and not isinstance(v, (tuple, list, dict)) and hasattr(v, "shape")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nezha_zoo.conversion.verify")
    parser.add_argument("--worker", nargs=5, metavar=("BACKEND", "DIR", "HEAD", "INPUTS", "OUT"), required=True)
    parser.add_argument("--without-pooler", action="store_true", help="the checkpoint is a base without pooler")
    args = parser.parse_args(argv)
    return _worker(*args.worker, pooler=not args.without_pooler)


if __name__ == "__main__":
    sys.exit(_main())
