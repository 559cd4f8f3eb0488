"""Electra in Flax linen: the base module, seven heads and their wrappers.

Composition of the shared blocks (:mod:`nezha_zoo.flax.layers`, :mod:`nezha_zoo.flax.heads`); the
family's own choices are: embeddings of width ``embedding_size`` projected by ``embeddings_project``
when it differs from ``hidden_size``, no pooler, a GELU classification head, an always-GELU generator
head tied to the word embeddings, and positions ``arange(past, past + L)``.

Defaults follow transformers PyTorch, not its Flax port: ``token_type_ids`` default to zeros and the
generator head's activation is exact GELU whatever ``hidden_act`` is.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from nezha_zoo.families.electra import ELECTRA
from nezha_zoo.flax.generation import FlaxGenerationMixin
from nezha_zoo.flax.heads import (
    ClassificationHead,
    LMHeadTransform,
    PredictionHead,
    SequenceSummary,
    TiedLMBias,
    tied_embedding_table,
)
from nezha_zoo.flax.layers import POSITIONS_TO_KEEP_DOC, BertEmbeddings, BertEncoder, cache_index, dense
from nezha_zoo.flax.modeling_utils import (
    FlaxHeadModule,
    FlaxPreTrainedModel,
    cache_info,
    finish_output,
    validate_inputs,
)
from nezha_zoo.generation import keep_last_positions
from nezha_zoo.outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    ElectraForPreTrainingOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)

__all__ = [
    "FlaxElectraModule",
    "FlaxElectraForPreTrainingModule",
    "FlaxElectraForMaskedLMModule",
    "FlaxElectraForCausalLMModule",
    "FlaxElectraForSequenceClassificationModule",
    "FlaxElectraForMultipleChoiceModule",
    "FlaxElectraForTokenClassificationModule",
    "FlaxElectraForQuestionAnsweringModule",
    "FlaxElectraPreTrainedModel",
    "FlaxElectraModel",
    "FlaxElectraForPreTraining",
    "FlaxElectraForMaskedLM",
    "FlaxElectraForCausalLM",
    "FlaxElectraForSequenceClassification",
    "FlaxElectraForMultipleChoice",
    "FlaxElectraForTokenClassification",
    "FlaxElectraForQuestionAnswering",
]

_MODULE_DOC = """
    Attributes:
        config (ElectraConfig): model configuration.
        dtype (jnp.dtype): computation dtype (params are float32).
        gradient_checkpointing (bool): rematerialise encoder layers in the backward pass.

    Call args (all optional but one of ``input_ids``/``inputs_embeds``):
        input_ids: (B, L) int ids{mc}.
        attention_mask: (B, L) 0/1, default ones; with a cache (B, cache_length).
        token_type_ids: (B, L) int, default zeros.
        position_ids: (B, L) int, default ``arange(past, past + L)``.
        head_mask: (heads,) or (layers, heads).
        encoder_hidden_states: (B, Le, H) for cross-attention (Model and CausalLM; decoders with
            add_cross_attention).
        encoder_attention_mask: (B, Le) 0/1, default ones (Model and CausalLM).
        inputs_embeds: (B, L, embedding_size) instead of ``input_ids``.
        init_cache (bool): create the ``"cache"`` collection (Model and CausalLM; used by ``init_cache``).
        deterministic (bool): dropout off.
        output_attentions, output_hidden_states, return_dict (bool).
"""


class FlaxElectraModule(nn.Module):
    """The Electra encoder (``electra``): embeddings, optional ``embeddings_project``, ``encoder``.

    Returns ``BaseModelOutputWithPastAndCrossAttentions``: ``last_hidden_state`` (B, L, H) ((B, R, H)
    with ``positions_to_keep``), ``hidden_states`` (layers + 1) x (B, L, H), ``attentions``
    layers x (B, heads, L, Lk), ``cross_attentions``.
    """

    __doc__ += _MODULE_DOC.format(mc="") + POSITIONS_TO_KEEP_DOC

    config: Any
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        init_cache: bool = False,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        inputs_embeds=None,
        positions_to_keep=None,
    ):
        c = self.config
        # Direct module users get the wrapper's checks too (values only when concrete, i.e. not under jit).
        past_len, cache_len = (0, None) if init_cache else cache_info(self.variables.get("cache"))
        validate_inputs(
            c,
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            past_len=past_len,
            cache_length=cache_len,
            embed_width=c.embedding_size,
        )
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)  # transformers PyTorch's default (its Flax uses ones)
        if position_ids is None:
            past = None if init_cache else cache_index(self.variables)
            start = jnp.asarray(0 if past is None else past, jnp.int32)
            position_ids = jnp.broadcast_to(start + jnp.arange(shape[-1], dtype=jnp.int32), shape)
        if encoder_hidden_states is not None and encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)
        h = BertEmbeddings(c, embedding_size=c.embedding_size, dtype=self.dtype, name="embeddings")(
            input_ids, token_type_ids, position_ids, inputs_embeds, deterministic
        )
        if c.embedding_size != c.hidden_size:
            h = dense(c.hidden_size, "embeddings_project", c, self.dtype)(h)
        h, all_hidden, all_attn, all_cross = BertEncoder(
            c, dtype=self.dtype, gradient_checkpointing=self.gradient_checkpointing, name="encoder"
        )(
            h,
            attention_mask,
            head_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            None,
            None,
            init_cache,
            deterministic,
            output_attentions,
            output_hidden_states,
            positions_to_keep=positions_to_keep,
        )
        return finish_output(
            BaseModelOutputWithPastAndCrossAttentions,
            return_dict,
            last_hidden_state=h,
            hidden_states=all_hidden,
            attentions=all_attn,
            cross_attentions=all_cross,
        )


class _ElectraHead(FlaxHeadModule):
    """Shared fields of the head modules; ``_backbone`` runs the ``electra`` submodule."""

    backbone_class = FlaxElectraModule
    backbone_name = "electra"


class FlaxElectraForPreTrainingModule(_ElectraHead):
    """Replaced-token detection: ``discriminator_predictions`` -> logits (B, L)."""

    __doc__ += _MODULE_DOC.format(mc="")

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        def head(_, out):
            predictions = PredictionHead(self.config, 1, self.dtype, name="discriminator_predictions")
            return {"logits": predictions(out.last_hidden_state)}

        return self._head_output(locals(), ElectraForPreTrainingOutput, head)


class _GeneratorHead(_ElectraHead):
    def _lm_head(self, electra, out, logits_to_keep: int = 0) -> dict:
        """``generator_predictions`` + ``generator_lm_head`` -> ``{"logits": (B, L, V)}`` (the last
        ``logits_to_keep`` positions only when not 0: :func:`nezha_zoo.generation.keep_last_positions`)."""
        c = self.config
        # The generator transform always uses exact GELU (transformers' Flax port uses hidden_act: a bug).
        transform = LMHeadTransform(c, c.embedding_size, "gelu", dtype=self.dtype, name="generator_predictions")
        h = transform(keep_last_positions(out.last_hidden_state, logits_to_keep))
        table = tied_embedding_table(electra, c)  # (V, E)
        return {"logits": TiedLMBias(c.vocab_size, self.dtype, name="generator_lm_head")(h, table)}


class FlaxElectraForMaskedLMModule(_GeneratorHead):
    """Masked LM: ``generator_predictions`` + ``generator_lm_head`` tied to the word embeddings -> (B, L, V)."""

    __doc__ += _MODULE_DOC.format(mc="")

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        return self._head_output(locals(), MaskedLMOutput, self._lm_head)


class FlaxElectraForCausalLMModule(_GeneratorHead):
    """Causal LM (use with ``config.is_decoder=True``): the generator head over a causal encoder;
    ``logits_to_keep`` (static int): the head on the last this many positions only (0: all)."""

    __doc__ += _MODULE_DOC.format(mc="")

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        init_cache=False,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
        logits_to_keep: int = 0,
    ):
        def head(electra, out):
            return {**self._lm_head(electra, out, logits_to_keep), "cross_attentions": out.cross_attentions}

        return self._head_output(locals(), CausalLMOutputWithCrossAttentions, head)


class FlaxElectraForSequenceClassificationModule(_ElectraHead):
    """Sequence classification: ``classifier`` (dense, GELU, ``out_proj``) on token 0 -> (B, num_labels)."""

    __doc__ += _MODULE_DOC.format(mc="")

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        def head(_, out):
            classifier = ClassificationHead(self.config, activation="gelu", dtype=self.dtype, name="classifier")
            return {"logits": classifier(out.last_hidden_state, deterministic=deterministic)}

        keep = self._pooled_positions(locals())  # the classifier reads position 0 only
        return self._head_output(locals(), SequenceClassifierOutput, head, positions_to_keep=keep)


class FlaxElectraForMultipleChoiceModule(_ElectraHead):
    """Multiple choice: ``sequence_summary`` + ``classifier`` (H -> 1) per choice -> (B, C).

    Inputs are (B, C, L) and are flattened to (B * C, L); hidden states and attentions are returned
    in that flattened form (as transformers does).
    """

    __doc__ += _MODULE_DOC.format(mc=" of shape (B, C, L); every input likewise has a choice axis")

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        def pool(out):  # (B * C, L, H) -> (B * C, H)
            summary = SequenceSummary(self.config, self.dtype, name="sequence_summary")
            return summary(out.last_hidden_state, deterministic=deterministic)

        # summary_type "first" reads position 0 only: the last layer computes just that row.
        first = getattr(self.config, "summary_type", "last") == "first"
        return self._multiple_choice(locals(), pool, pooled=first)


class FlaxElectraForTokenClassificationModule(_ElectraHead):
    """Token classification: dropout + ``classifier`` -> (B, L, num_labels)."""

    __doc__ += _MODULE_DOC.format(mc="")

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        return self._token_classification(locals())


class FlaxElectraForQuestionAnsweringModule(_ElectraHead):
    """Extractive QA: ``qa_outputs`` -> ``start_logits`` (B, L), ``end_logits`` (B, L)."""

    __doc__ += _MODULE_DOC.format(mc="")

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        return self._question_answering(locals())


# --- wrappers ------------------------------------------------------------------------------------


class FlaxElectraPreTrainedModel(FlaxPreTrainedModel):
    """Base of the Electra wrappers (see :class:`~nezha_zoo.flax.modeling_utils.FlaxPreTrainedModel`)."""

    family = ELECTRA
    base_model_prefix = "electra"


class FlaxElectraModel(FlaxElectraPreTrainedModel):
    """The bare Electra encoder.

    Wraps :class:`FlaxElectraModule`; arguments as :class:`FlaxElectraPreTrainedModel`.
    """

    head = "Model"
    module_class = FlaxElectraModule


class FlaxElectraForPreTraining(FlaxElectraPreTrainedModel):
    """Electra discriminator (replaced-token detection).

    Wraps :class:`FlaxElectraForPreTrainingModule`; arguments as :class:`FlaxElectraPreTrainedModel`.
    """

    head = "ForPreTraining"
    module_class = FlaxElectraForPreTrainingModule


class FlaxElectraForMaskedLM(FlaxElectraPreTrainedModel):
    """Electra generator (masked LM).

    Wraps :class:`FlaxElectraForMaskedLMModule`; arguments as :class:`FlaxElectraPreTrainedModel`.
    """

    head = "ForMaskedLM"
    module_class = FlaxElectraForMaskedLMModule


# Learned absolute positions: generate numbers a left-padded row's tokens from 0 (see nezha_zoo.generation).
class FlaxElectraForCausalLM(FlaxGenerationMixin, FlaxElectraPreTrainedModel):
    """Electra causal LM (decoder).

    Wraps :class:`FlaxElectraForCausalLMModule`; arguments as :class:`FlaxElectraPreTrainedModel`.
    """

    head = "ForCausalLM"
    module_class = FlaxElectraForCausalLMModule
    generation_position_rule = "cumsum"


class FlaxElectraForSequenceClassification(FlaxElectraPreTrainedModel):
    """Electra sequence classifier.

    Wraps :class:`FlaxElectraForSequenceClassificationModule`; arguments as :class:`FlaxElectraPreTrainedModel`.
    """

    head = "ForSequenceClassification"
    module_class = FlaxElectraForSequenceClassificationModule


class FlaxElectraForMultipleChoice(FlaxElectraPreTrainedModel):
    """Electra multiple choice.

    Wraps :class:`FlaxElectraForMultipleChoiceModule`; arguments as :class:`FlaxElectraPreTrainedModel`.
    """

    head = "ForMultipleChoice"
    module_class = FlaxElectraForMultipleChoiceModule
    input_rank = 3


class FlaxElectraForTokenClassification(FlaxElectraPreTrainedModel):
    """Electra token classifier.

    Wraps :class:`FlaxElectraForTokenClassificationModule`; arguments as :class:`FlaxElectraPreTrainedModel`.
    """

    head = "ForTokenClassification"
    module_class = FlaxElectraForTokenClassificationModule


class FlaxElectraForQuestionAnswering(FlaxElectraPreTrainedModel):
    """Electra extractive question answering.

    Wraps :class:`FlaxElectraForQuestionAnsweringModule`; arguments as :class:`FlaxElectraPreTrainedModel`.
    """

    head = "ForQuestionAnswering"
    module_class = FlaxElectraForQuestionAnsweringModule
