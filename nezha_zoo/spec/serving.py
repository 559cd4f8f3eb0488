"""The serving signature of a model class, framework-free: what every export format takes and returns.

Every exporter (TF SavedModel, ONNX, ``jax.export``) builds its entry point from :func:`serving_signature`,
so the three backends agree on input names, their integer dtype, which axes are dynamic and which
output fields come back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nezha_zoo.config import PretrainedConfig
from nezha_zoo.spec.positions import padding_aware_max_length
from nezha_zoo.spec.registry import Family

__all__ = [
    "ServingSignature",
    "serving_signature",
    "model_serving_signature",
    "tflite_refusal",
    "SERVING_INT_DTYPE",
    "EXPORT_TOLERANCE",
]

#: Integer dtype of every serving input: int32 is native to TFLite and JAX (without x64) and ONNX
#: runtimes accept it; exporters cast to the framework's own index dtype inside the graph.
SERVING_INT_DTYPE = "int32"
#: SPEC.md §5: an exported artifact against the live model, float32 logits.
EXPORT_TOLERANCE = 1e-4

#: Output fields of each head in eval mode without labels (transformers' order).
_HEAD_OUTPUTS: dict[str, tuple[str, ...]] = {
    "ForMaskedLM": ("logits",),
    "ForCausalLM": ("logits",),
    "ForSequenceClassification": ("logits",),
    "ForMultipleChoice": ("logits",),
    "ForTokenClassification": ("logits",),
    "ForQuestionAnswering": ("start_logits", "end_logits"),
    "ForNextSentencePrediction": ("logits",),
    "ForPreTraining": ("logits",),
}
#: Heads whose outputs differ by family.
_FAMILY_HEAD_OUTPUTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("nezha", "ForPreTraining"): ("prediction_logits", "seq_relationship_logits"),
}


def _max_length(family: str, config: PretrainedConfig) -> int | None:
    """The longest input each family's forward accepts (the limit its input checks enforce)."""
    if family == "electra":
        return config.max_position_embeddings
    if family in ("xlm_roberta_xl", "ibert"):  # RoBERTa's padding-aware positions
        return padding_aware_max_length(config.max_position_embeddings, config.pad_token_id)
    if family == "mpnet":  # positions start after MPNet's fixed padding row 1
        from nezha_zoo.families.mpnet import EMBEDDING_PADDING_IDX

        return padding_aware_max_length(config.max_position_embeddings, EMBEDDING_PADDING_IDX)
    if family == "mpt":  # ALiBi table size
        return config.max_seq_len
    return None  # Nezha: relative positions only, no limit


@dataclass(frozen=True)
class ServingSignature:
    """What an exported model takes and returns.

    Args:
        family: family key (``"electra"``).
        head: head name (``"ForSequenceClassification"``).
        inputs: input names in call order: ``input_ids``, ``attention_mask`` and ``token_type_ids``
            where the family has a token-type table.
        dims: symbolic names of the input axes, all dynamic: ``("batch", "length")``, or
            ``("batch", "choices", "length")`` for multiple choice.
        dtype: integer dtype of every input (:data:`SERVING_INT_DTYPE`).
        outputs: output fields returned, in order.
        max_length: the longest ``length`` the model takes (what its input checks allow), None
            for Nezha (relative positions only).
    """

    family: str
    head: str
    inputs: tuple[str, ...]
    dims: tuple[str, ...]
    dtype: str
    outputs: tuple[str, ...]
    max_length: int | None = None


def serving_signature(family: Family, config: PretrainedConfig, head: str) -> ServingSignature:
    """The serving signature of ``family``'s ``head`` class for ``config``, read from its spec.

    Raises:
        ValueError: ``head`` is not a head of ``family``.
    """
    spec = family.model_spec(config, head)
    names = [p.name for p in spec.params]
    inputs = ["input_ids", "attention_mask"]
    if any(n.endswith("embeddings.token_type_embeddings.weight") for n in names):
        inputs.append("token_type_ids")
    dims = ("batch", "choices", "length") if head == "ForMultipleChoice" else ("batch", "length")
    if head == "Model":
        # The base class's spec names carry no prefix.
        outputs: tuple[str, ...] = ("last_hidden_state",)
        if any(n.startswith("pooler.") for n in names):
            outputs += ("pooler_output",)
    else:
        outputs = _FAMILY_HEAD_OUTPUTS.get((family.key, head), _HEAD_OUTPUTS[head])
    max_length = _max_length(family.key, config)
    return ServingSignature(family.key, head, tuple(inputs), dims, SERVING_INT_DTYPE, outputs, max_length)


def model_serving_signature(model: Any) -> ServingSignature:
    """The serving signature of a model instance of any backend (its ``family``, ``config``, ``head``)."""
    return serving_signature(model.family, model.config, model.head)


def tflite_refusal(family: str, config: PretrainedConfig) -> str | None:
    """Why ``family``'s model with ``config`` cannot be exported to TFLite with builtin ops only, or None.

    I-BERT's quant mode computes its integer kernels in float64 (transformers' numerics), which
    TFLite's builtin kernels lack.
    """
    if family == "ibert" and getattr(config, "quant_mode", False):
        return (
            "I-BERT in quant mode cannot be exported to TFLite with builtin ops only: its integer kernels "
            "compute in float64, which TFLite's builtin ops lack; export the float model "
            "(quant_mode=False) to tflite, or a saved-model"
        )
    return None
