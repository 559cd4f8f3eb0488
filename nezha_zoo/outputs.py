"""Output classes shared by the three backends.

Field names and order follow transformers (``last_hidden_state``, ``logits``, ...).  An output is an
ordered mapping of its non-``None`` fields with attribute, key and index access; ``to_tuple()``
gives what ``return_dict=False`` returns.  The tensors are whatever the backend computes with
(``torch.Tensor``, ``tf.Tensor``, ``jax.Array``); each backend registers these classes with its tree
utilities so they pass through ``jax.jit``, ``tf.function`` and Keras.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

#: Label value every backend's losses skip (transformers' and ``torch.nn.CrossEntropyLoss``'s
#: ``ignore_index``); the outputs' ``loss`` fields are computed over the other labels.
IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "ModelOutput",
    "BaseModelOutput",
    "BaseModelOutputWithPooling",
    "BaseModelOutputWithPastAndCrossAttentions",
    "BaseModelOutputWithPoolingAndCrossAttentions",
    "MaskedLMOutput",
    "CausalLMOutputWithCrossAttentions",
    "SequenceClassifierOutput",
    "SequenceClassifierOutputWithPast",
    "MultipleChoiceModelOutput",
    "TokenClassifierOutput",
    "QuestionAnsweringModelOutput",
    "NextSentencePredictorOutput",
    "ElectraForPreTrainingOutput",
    "NezhaForPreTrainingOutput",
    "SentenceEmbeddingOutput",
    "GenerateDecoderOnlyOutput",
    "GenerateBeamDecoderOnlyOutput",
    "OUTPUT_CLASSES",
]


class ModelOutput(OrderedDict):
    """Ordered mapping of an output's non-``None`` fields.

    Subclasses list their ``_fields`` in transformers' order.  Missing fields read as ``None``.
    """

    _fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        if args:
            if len(args) > 1:
                raise TypeError(f"{type(self).__name__} takes at most one positional argument")
            kwargs = {**dict(args[0]), **kwargs}
        unknown = set(kwargs) - set(self._fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}; fields: {list(self._fields)}")
        for name in self._fields:
            value = kwargs.get(name)
            if value is not None:
                super().__setitem__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name in type(self)._fields:
            return self.get(name)
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in type(self)._fields:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        self[name] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in type(self)._fields:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        if value is None:
            self.pop(key, None)
            return
        # Keep the declared field order whatever the insertion order.
        items = dict(self)
        items[key] = value
        super().clear()
        for name in self._fields:
            if name in items:
                super().__setitem__(name, items[name])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def __reduce__(self):  # pickle by fields, not by OrderedDict internals
        return (type(self), (dict(self),))

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-``None`` fields in order: what ``return_dict=False`` returns."""
        return tuple(self.values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={_short(v)}" for k, v in self.items())
        return f"{type(self).__name__}({inner})"


def _short(v: Any) -> str:
    shape = getattr(v, "shape", None)
    if shape is not None:
        return f"<{type(v).__name__} shape={tuple(shape)}>"
    if isinstance(v, tuple):
        return f"<tuple of {len(v)}>"
    return repr(v)


def _output(name: str, fields: tuple[str, ...], doc: str) -> type[ModelOutput]:
    return type(name, (ModelOutput,), {"_fields": fields, "__doc__": doc, "__module__": __name__})


BaseModelOutput = _output(
    "BaseModelOutput",
    ("last_hidden_state", "hidden_states", "attentions"),
    "Encoder output: ``last_hidden_state`` (B, L, H); ``hidden_states`` L+1 tensors (B, L, H); "
    "``attentions`` (B, nh, L, L) per layer.",
)
BaseModelOutputWithPooling = _output(
    "BaseModelOutputWithPooling",
    ("last_hidden_state", "pooler_output", "hidden_states", "attentions"),
    "As BaseModelOutput plus ``pooler_output`` (B, H) (MPNet's base model).",
)
BaseModelOutputWithPastAndCrossAttentions = _output(
    "BaseModelOutputWithPastAndCrossAttentions",
    ("last_hidden_state", "past_key_values", "hidden_states", "attentions", "cross_attentions"),
    "Encoder/decoder output: ``last_hidden_state`` (B, L, H); ``past_key_values`` per layer "
    "(k, v[, cross_k, cross_v]) each (B, nh, L, hd); ``hidden_states`` L+1 tensors (B, L, H); "
    "``attentions``/``cross_attentions`` (B, nh, Lq, Lk) per layer.",
)
BaseModelOutputWithPoolingAndCrossAttentions = _output(
    "BaseModelOutputWithPoolingAndCrossAttentions",
    # transformers' order: hidden_states comes before past_key_values here (unlike the class above).
    ("last_hidden_state", "pooler_output", "hidden_states", "past_key_values", "attentions", "cross_attentions"),
    "As BaseModelOutputWithPastAndCrossAttentions plus ``pooler_output`` (B, H).",
)
MaskedLMOutput = _output(
    "MaskedLMOutput", ("loss", "logits", "hidden_states", "attentions"), "``logits`` (B, L, V); ``loss`` scalar."
)
CausalLMOutputWithCrossAttentions = _output(
    "CausalLMOutputWithCrossAttentions",
    ("loss", "logits", "past_key_values", "hidden_states", "attentions", "cross_attentions"),
    "``logits`` (B, L, V); ``loss`` scalar (next-token); ``past_key_values`` as the base output.",
)
SequenceClassifierOutput = _output(
    "SequenceClassifierOutput",
    ("loss", "logits", "hidden_states", "attentions"),
    "``logits`` (B, num_labels); ``loss`` scalar.",
)
SequenceClassifierOutputWithPast = _output(
    "SequenceClassifierOutputWithPast",
    ("loss", "logits", "past_key_values", "hidden_states", "attentions"),
    "``logits`` (B, num_labels); ``loss`` scalar; ``past_key_values`` as the base output (MPT).",
)
MultipleChoiceModelOutput = _output(
    "MultipleChoiceModelOutput",
    ("loss", "logits", "hidden_states", "attentions"),
    "``logits`` (B, C); ``loss`` scalar.",
)
TokenClassifierOutput = _output(
    "TokenClassifierOutput",
    ("loss", "logits", "hidden_states", "attentions"),
    "``logits`` (B, L, num_labels); ``loss`` scalar.",
)
QuestionAnsweringModelOutput = _output(
    "QuestionAnsweringModelOutput",
    ("loss", "start_logits", "end_logits", "hidden_states", "attentions"),
    "``start_logits``/``end_logits`` (B, L); ``loss`` scalar, the mean of start and end cross-entropy.",
)
NextSentencePredictorOutput = _output(
    "NextSentencePredictorOutput", ("loss", "logits", "hidden_states", "attentions"), "``logits`` (B, 2)."
)
ElectraForPreTrainingOutput = _output(
    "ElectraForPreTrainingOutput",
    ("loss", "logits", "hidden_states", "attentions"),
    "Replaced-token detection: ``logits`` (B, L); ``loss`` BCE over unmasked positions.",
)
NezhaForPreTrainingOutput = _output(
    "NezhaForPreTrainingOutput",
    ("loss", "prediction_logits", "seq_relationship_logits", "hidden_states", "attentions"),
    "``prediction_logits`` (B, L, V); ``seq_relationship_logits`` (B, 2); ``loss`` MLM + NSP.",
)
SentenceEmbeddingOutput = _output(
    "SentenceEmbeddingOutput", ("embeddings", "last_hidden_state"), "``embeddings`` (B, H), L2-normalised."
)

GenerateDecoderOnlyOutput = _output(
    "GenerateDecoderOnlyOutput",
    ("sequences", "scores", "logits"),
    "``generate(..., return_dict_in_generate=True)`` without beams: ``sequences`` (B*R, P+n) ids; "
    "``scores`` (``output_scores``) n tensors (B*R, V), the processed scores each token was chosen "
    "from; ``logits`` (``output_logits``) n tensors (B*R, V), the raw model logits.",
)
GenerateBeamDecoderOnlyOutput = _output(
    "GenerateBeamDecoderOnlyOutput",
    ("sequences", "sequences_scores", "scores", "logits", "beam_indices"),
    "As GenerateDecoderOnlyOutput for beam search (``R = num_return_sequences``): "
    "``sequences_scores`` (B*R,) the length-penalised beam scores (with ``output_scores``); ``scores`` n "
    "tensors (B*num_beams, V), the processed log-probabilities of each step (transformers 4.57: without "
    "the beams' running scores); ``logits`` n raw (B*num_beams, V); ``beam_indices`` (B*R, n) which row "
    "(``b * num_beams + beam``) each token came from (-1 after the end).",
)

#: Every output class, for backends that register them with their tree utilities.
OUTPUT_CLASSES: tuple[type[ModelOutput], ...] = tuple(
    v for v in list(globals().values()) if isinstance(v, type) and issubclass(v, ModelOutput) and v is not ModelOutput
)
