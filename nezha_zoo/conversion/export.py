"""``nezha-zoo export``: a checkpoint directory -> a checked serving artifact (SavedModel, TFLite, ONNX,
jax.export).

The artifact is written into a staging directory under the destination lock, reloaded and run on
probe inputs of two shapes against the live model (max-abs <= :data:`EXPORT_TOLERANCE`), and only
then moved into place: a failure at any step leaves nothing behind.  Imports the one framework the
format needs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from nezha_zoo.auto import AutoConfig
from nezha_zoo.conversion.formats import detect_format
from nezha_zoo.conversion.verify import checked_head
from nezha_zoo.io.atomic import staged_directory
from nezha_zoo.spec.registry import family_of_config, model_class
from nezha_zoo.spec.serving import EXPORT_TOLERANCE, ServingSignature, serving_signature
from nezha_zoo.testing import max_abs_diff, tiny_inputs

__all__ = ["EXPORT_FORMATS", "export"]

#: format -> (backend that writes it, artifact file inside the output directory or "" for the directory).
EXPORT_FORMATS: dict[str, tuple[str, str]] = {
    "saved-model": ("tf", ""),
    "tflite": ("tf", "model.tflite"),
    "onnx": ("pt", "model.onnx"),
    "jax": ("flax", "model.jax"),
}


def export(src: str | os.PathLike, out: str | os.PathLike, to: str, head: str | None = None) -> dict[str, Any]:
    """Export the checkpoint in ``src`` to the serving format ``to`` in the new directory ``out``.

    Args:
        src: checkpoint directory of any format ``convert`` reads.
        out: output directory; must not exist.
        to: one of :data:`EXPORT_FORMATS`.
        head: class head (default: the head the tensors are, as ``convert`` decides).

    Returns:
        ``{"source", "destination", "format", "family", "head", "class", "files", "bytes",
        "seconds", "max_abs_diff", "signature"}``.

    Raises:
        ValueError: unknown format, a model the format cannot hold (I-BERT quant mode to tflite), or
            an artifact that differs from the live model.
        FileExistsError: ``out`` exists.
        CheckpointError: ``src`` fits no head of its family.
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {to!r}; choose from {', '.join(EXPORT_FORMATS)}")
    src, out = os.fspath(src), os.fspath(out)
    if os.path.lexists(out):
        raise FileExistsError(f"{out!r} exists; export writes a new directory")
    backend, artifact = EXPORT_FORMATS[to]
    start = time.perf_counter()
    fmt = detect_format(src)
    config = AutoConfig.from_pretrained(src)
    family = family_of_config(config)
    with tempfile.TemporaryDirectory(prefix="nezha-zoo-export-") as tmp:
        head = checked_head(src, fmt, family, config, head).head
        directory = src
        if fmt not in ("safetensors", "pytorch-bin"):
            from nezha_zoo.conversion.convert import convert

            directory = os.path.join(tmp, "canonical")
            convert(src, directory, "safetensors", source_format=fmt, head=head)
        model = model_class(family, head, backend).from_pretrained(directory)
        sig = serving_signature(family, model.config, head)
        with staged_directory(out) as stage:
            if os.path.lexists(out):  # created since the first check, before the lock was ours
                raise FileExistsError(f"{out!r} exists; export writes a new directory")
            worst = _WRITERS[to](model, sig, os.path.join(stage, artifact) if artifact else stage)
            if not worst <= EXPORT_TOLERANCE:
                raise ValueError(
                    f"the exported {to} artifact differs from the live model: max |diff| = {worst:.3e} "
                    f"> {EXPORT_TOLERANCE:.0e}; nothing was written"
                )
            description = {"format": to, "class": family.class_name(head, backend), **_describe(sig)}
            with open(os.path.join(stage, "serving.json"), "w", encoding="utf-8") as fh:
                json.dump(description, fh, indent=2)
            files = sorted(os.listdir(stage))
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(stage) for f in fs)
    return {
        "source": src,
        "destination": out,
        "format": to,
        "family": family.key,
        "head": head,
        "class": family.class_name(head, backend),
        "files": files,
        "bytes": size,
        "seconds": time.perf_counter() - start,
        "max_abs_diff": worst,
        "signature": _describe(sig),
    }


def _describe(sig: ServingSignature) -> dict[str, Any]:
    return {
        "family": sig.family,
        "head": sig.head,
        "inputs": list(sig.inputs),
        "dims": list(sig.dims),
        "dtype": sig.dtype,
        "outputs": list(sig.outputs),
        "max_length": sig.max_length,
    }


def probe_inputs(sig: ServingSignature, vocab_size: int) -> list[dict[str, np.ndarray]]:
    """Int32 inputs of two shapes (batch 2 and 3, two lengths within ``max_length``) for ``sig``."""
    longest = sig.max_length or 16
    shapes = ((2, min(7, longest)), (3, min(11, longest)))
    probes = []
    for batch, length in shapes:
        x = tiny_inputs(
            batch=batch,
            seq_len=length,
            vocab_size=vocab_size,
            type_vocab_size=2 if "token_type_ids" in sig.inputs else None,
            num_choices=3 if "choices" in sig.dims else None,
        )
        if "token_type_ids" in x:
            x["token_type_ids"] = np.zeros_like(x["token_type_ids"])  # any family's table has row 0
        probes.append({k: x[k].astype(np.int32) for k in sig.inputs})
    return probes


def _worst(sig: ServingSignature, got: dict[str, Any], want: Any) -> float:
    missing = set(sig.outputs) - set(got)
    if missing:
        raise ValueError(f"the exported artifact lacks outputs {sorted(missing)}")
    return max(max_abs_diff(got[name], want[name]) for name in sig.outputs)


def _saved_model(model: Any, sig: ServingSignature, path: str) -> float:
    import tensorflow as tf

    from nezha_zoo.testing import pin_precision
    from nezha_zoo.tf.export import export_saved_model

    pin_precision("tf")
    export_saved_model(model, path, verbose=False)
    served = tf.saved_model.load(path).signatures["serving_default"]
    worst = 0.0
    for x in probe_inputs(sig, model.config.vocab_size):
        got = served(**{k: tf.constant(v) for k, v in x.items()})
        worst = max(worst, _worst(sig, got, model(**x, training=False)))
    return worst


def _tflite(model: Any, sig: ServingSignature, path: str) -> float:
    from nezha_zoo.testing import pin_precision
    from nezha_zoo.tf.export import export_tflite, load_tflite

    pin_precision("tf")
    export_tflite(model, path)
    served = load_tflite(path)  # the written file in the TFLite interpreter, as a device would run it
    worst = 0.0
    for x in probe_inputs(sig, model.config.vocab_size):
        worst = max(worst, _worst(sig, served(**x), model(**x, training=False)))
    return worst


def _onnx(model: Any, sig: ServingSignature, path: str) -> float:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ValueError("onnx export checks the file in onnxruntime: pip install 'nezha-zoo[export]'") from e
    import torch

    from nezha_zoo.pt.export import export_onnx
    from nezha_zoo.testing import pin_precision

    pin_precision("pt")
    export_onnx(model, path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    model.eval()
    for x in probe_inputs(sig, model.config.vocab_size):
        got = dict(zip(sig.outputs, session.run(None, x)))
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v).long() for k, v in x.items()})
        worst = max(worst, _worst(sig, got, want))
    return worst


def _jax(model: Any, sig: ServingSignature, path: str) -> float:
    from nezha_zoo.flax.export import export_jax, load_jax
    from nezha_zoo.testing import pin_precision

    pin_precision("flax")
    export_jax(model, path)
    call = load_jax(path)  # deserialized from the written bytes, as a server would
    worst = 0.0
    for x in probe_inputs(sig, model.config.vocab_size):
        worst = max(worst, _worst(sig, call(*[x[k] for k in sig.inputs]), model(**x)))
    return worst


_WRITERS = {"saved-model": _saved_model, "tflite": _tflite, "onnx": _onnx, "jax": _jax}
