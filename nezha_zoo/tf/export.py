"""TF serving export: the default signature (integer ids, dynamic batch and length) of every TF class.

``model.export(path)`` (Keras 3 ``ExportArchive``) and ``tf.saved_model.save(model, path)`` both serve
:func:`serving_function`, whose inputs and outputs follow :func:`nezha_zoo.spec.serving.serving_signature`.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf

from nezha_zoo.spec.serving import model_serving_signature

__all__ = ["serving_input_signature", "serving_function", "export_saved_model"]


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
