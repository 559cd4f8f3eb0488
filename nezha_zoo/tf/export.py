"""TF serving export: the default signature (integer ids, dynamic batch and length) of every TF class.

``model.export(path)`` (Keras 3 ``ExportArchive``) and ``tf.saved_model.save(model, path)`` both serve
:func:`serving_function`, whose inputs and outputs follow :func:`nezha_zoo.spec.serving.serving_signature`.
:func:`export_tflite` converts that SavedModel to a TFLite flatbuffer with builtin ops only;
:func:`load_tflite` runs it in the TFLite interpreter.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from nezha_zoo.spec.serving import ServingSignature, model_serving_signature, tflite_refusal

__all__ = [
    "serving_input_signature",
    "serving_function",
    "export_saved_model",
    "serialize_tflite",
    "export_tflite",
    "tflite_interpreter",
    "load_tflite",
]


def serving_input_signature(model: Any) -> dict[str, tf.TensorSpec]:
    """``{name: tf.TensorSpec((None,) * rank, int32, name)}``: every axis dynamic."""
    sig = model_serving_signature(model)
    shape = (None,) * len(sig.dims)
    return {n: tf.TensorSpec(shape, tf.as_dtype(sig.dtype), name=n) for n in sig.inputs}


def serving_function(model: Any) -> tf.types.experimental.PolymorphicFunction:
    """A ``tf.function`` taking a dict of integer inputs and returning a dict of the signature's outputs.

    Ids go through unchanged (int32 indexes embeddings natively); the mask is the model's own input.
    """
    return tf.function(_serve(model), input_signature=[serving_input_signature(model)])


def _serve(model: Any):
    outputs = model_serving_signature(model).outputs

    def serve(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = model(**inputs, training=False)
        return {name: out[name] for name in outputs}

    return serve


def export_saved_model(model: Any, filepath: str | os.PathLike, verbose: bool | None = None) -> None:
    """Write a SavedModel whose ``serve`` endpoint and ``serving_default`` signature take integer ids.

    Args:
        model: a built TF model of the zoo.
        filepath: destination directory.
        verbose: print the endpoint summary (Keras' default: True).
    """
    import keras

    archive = keras.export.ExportArchive()
    # No archive.track(model): add_endpoint tracks the variables the endpoint uses, and tracking the
    # model as well stores every variable twice (Keras 3.15).
    archive.add_endpoint("serve", _serve(model), input_signature=[serving_input_signature(model)])
    archive.write_out(os.fspath(filepath), verbose=True if verbose is None else verbose)


def serialize_tflite(model: Any) -> tuple[bytes, ServingSignature]:
    """TFLite flatbuffer of ``model``'s serving signature (builtin ops only) -> (bytes, signature).

    The model goes through :func:`export_saved_model` (in a temporary directory) and
    ``TFLiteConverter.from_saved_model``: converting the live function instead keeps the weights as
    resource variables that nothing initialises, so the interpreter reads garbage (NaN logits).  The
    flatbuffer's ``serving_default`` signature has the SavedModel's inputs and outputs with every axis
    dynamic (-1): the interpreter resizes them per call.

    Raises:
        ValueError: a model TFLite's builtin ops cannot run (I-BERT quant mode), or a graph the
            converter cannot lower to builtins (the message lists the ops).
    """
    from tensorflow.lite.python.convert_phase import ConverterError

    sig = model_serving_signature(model)
    reason = tflite_refusal(sig.family, model.config)
    if reason is not None:
        raise ValueError(reason)
    with tempfile.TemporaryDirectory(prefix="nezha-zoo-tflite-") as tmp:
        export_saved_model(model, tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["serving_default"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            data = converter.convert()
        except ConverterError as e:
            raise ValueError(
                f"{type(model).__name__} does not convert to TFLite with builtin ops only: {_converter_summary(e)}"
            ) from e
    return bytes(data), sig


def _converter_summary(error: Exception) -> str:
    """The converter's lines naming the ops it could not lower (its message is an MLIR dump)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    ops = [line for line in lines if line.startswith(("TF Select ops:", "Custom ops:"))]
    return "; ".join(ops) if ops else (lines[-1] if lines else type(error).__name__)


def export_tflite(model: Any, path: str | os.PathLike) -> ServingSignature:
    """Write :func:`serialize_tflite`'s flatbuffer to ``path`` (overwritten; ``nezha-zoo export`` writes
    atomically and checks the file in the interpreter).

    Args:
        model: a built float32 TF model of the zoo.
        path: destination ``.tflite`` file.

    Returns:
        The serving signature written.
    """
    data, sig = serialize_tflite(model)
    with open(path, "wb") as f:
        f.write(data)
    return sig


def tflite_interpreter(path: str | os.PathLike, num_threads: int | None = None) -> tf.lite.Interpreter:
    """``tf.lite.Interpreter`` on the flatbuffer at ``path`` (the TF 2.20+ deprecation notice silenced:
    the interpreter still runs the file; ``ai_edge_litert``'s runs it the same way)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
        return tf.lite.Interpreter(model_path=os.fspath(path), num_threads=num_threads)


def load_tflite(path: str | os.PathLike, num_threads: int | None = None) -> Callable[..., dict[str, np.ndarray]]:
    """Load an artifact of :func:`export_tflite` into the TFLite interpreter.

    Returns:
        ``fn(**inputs)``: int32 numpy arrays by name (``input_ids`` (B, L) ...) -> dict of output
        fields (numpy).  Each call may have a new batch and length (the runner resizes the inputs).
    """
    return tflite_interpreter(path, num_threads).get_signature_runner("serving_default")
