"""PyTorch serving export: ONNX with the zoo's serving signature (integer ids, dynamic axes).

The graph takes the inputs of :func:`nezha_zoo.spec.serving.serving_signature` (int32, every axis
dynamic) and returns its output fields, in order, under their own names.
"""

from __future__ import annotations

import os
import warnings

import torch

from nezha_zoo.spec.serving import ServingSignature, model_serving_signature

__all__ = ["export_onnx", "ONNX_OPSET"]

#: Opset of the exported graphs (onnxruntime 1.31 runs it; torch's TorchScript exporter writes it).
ONNX_OPSET = 17


class _Serving(torch.nn.Module):
    """Positional int32 inputs in signature order -> tuple of the signature's outputs."""

    def __init__(self, model: torch.nn.Module, sig: ServingSignature) -> None:
        super().__init__()
        self.model = model
        self.sig = sig

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # int32 at the graph's edge (what servers send); torch indexes with int64 inside.
        kwargs = {n: x.long() for n, x in zip(self.sig.inputs, inputs)}
        out = self.model(**kwargs, return_dict=True)
        return tuple(out[name] for name in self.sig.outputs)


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, opset: int = ONNX_OPSET) -> ServingSignature:
    """Write ``model`` to the ONNX file ``path`` with dynamic batch (and choice) and length axes.

    The model is exported in eval mode (restored after).  Inputs: ``input_ids``, ``attention_mask``
    (and ``token_type_ids`` where the family uses them), int32, shape (B, L) or (B, C, L) for
    multiple choice.  Outputs: the signature's fields (``logits`` (B, num_labels) ...).

    Args:
        model: a zoo PyTorch model (float32 or bfloat16).
        path: destination ``.onnx`` file (overwritten; use the ``nezha-zoo export`` command for a
            checked, atomic write).
        opset: ONNX opset version.

    Returns:
        The serving signature written.
    """
    sig = model_serving_signature(model)
    shape = (2,) * (len(sig.dims) - 1) + (5,)
    example = tuple(torch.ones(shape, dtype=torch.int32) for _ in sig.inputs)
    dynamic_axes = {n: dict(enumerate(sig.dims)) for n in sig.inputs}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo (which needs onnxscript).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Serving(model, sig),
                example,
                os.fspath(path),
                input_names=list(sig.inputs),
                output_names=list(sig.outputs),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
            )
    finally:
        model.train(was_training)
    return sig
