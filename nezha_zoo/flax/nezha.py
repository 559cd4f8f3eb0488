"""Nezha in Flax linen: the base module, seven heads and their wrappers.

Composition of the shared blocks (:mod:`nezha_zoo.flax.layers`, :mod:`nezha_zoo.flax.heads`); the
family's own choices are: word + token-type embeddings only (no absolute positions, no
``position_ids`` input), a pooler for the heads that use it, BERT's ``cls`` heads, and the
*functional relative position encoding* of every attention layer.

Relative positions (transformers 4.57.6 ``NezhaRelativePositionsEncoding``): a fixed sinusoid table
of the relative distances clipped to ``+-max_relative_position`` (:func:`~nezha_zoo.families.nezha.
relative_position_table`), gathered over the (query, key) grid of each call
(:func:`relative_position_encoding`) and used twice per attention: ``q_i . R[i, j]``
joins the scores before the ``1/sqrt(head_dim)`` scaling, and ``sum_j p_ij R[i, j]`` (``p`` after
dropout and ``head_mask``) joins the context.  It is computed, not stored, so:

* any sequence length works (transformers sizes its table by ``max_position_embeddings`` and fails on
  longer inputs; up to that limit the numbers are the same);
* with a key/value cache, query ``i`` sits at absolute position ``cache_index + i`` and key ``j`` at
  ``j``, so cached decoding equals a full pass (transformers' own cache path assumes equal query and
  key lengths and is wrong);
* cross-attention gets the relative terms too, as in transformers (its ``NezhaSelfAttention`` serves
  both), with decoder query ``i`` at position ``i`` (plus the cache fill) and encoder key ``j`` at
  ``j``.  transformers only runs when the encoder length equals the decoder length; here any
  encoder length works and equal lengths give transformers' numbers.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from nezha_zoo.config import classifier_dropout_rate
from nezha_zoo.families.nezha import HEADS_WITH_POOLER, NEZHA, relative_position_table
from nezha_zoo.flax.heads import (
    BertLMPredictionHead,
    BertPooler,
    tied_embedding_table,
    token_classifier,
)
from nezha_zoo.flax.layers import (
    POSITIONS_TO_KEEP_DOC,
    BertEmbeddings,
    BertEncoder,
    Dropout,
    cache_index,
    cache_length,
    dense,
)
from nezha_zoo.flax.modeling_utils import (
    FlaxHeadModule,
    FlaxPreTrainedModel,
    cache_info,
    finish_output,
    validate_inputs,
)
from nezha_zoo.outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    MaskedLMOutput,
    NextSentencePredictorOutput,
    NezhaForPreTrainingOutput,
    SequenceClassifierOutput,
)
from nezha_zoo.spec.positions import relative_position_index

__all__ = [
    "relative_position_encoding",
    "FlaxNezhaModule",
    "FlaxNezhaForPreTrainingModule",
    "FlaxNezhaForMaskedLMModule",
    "FlaxNezhaForNextSentencePredictionModule",
    "FlaxNezhaForSequenceClassificationModule",
    "FlaxNezhaForMultipleChoiceModule",
    "FlaxNezhaForTokenClassificationModule",
    "FlaxNezhaForQuestionAnsweringModule",
    "FlaxNezhaPreTrainedModel",
    "FlaxNezhaModel",
    "FlaxNezhaForPreTraining",
    "FlaxNezhaForMaskedLM",
    "FlaxNezhaForNextSentencePrediction",
    "FlaxNezhaForSequenceClassification",
    "FlaxNezhaForMultipleChoice",
    "FlaxNezhaForTokenClassification",
    "FlaxNezhaForQuestionAnswering",
]

_MODULE_DOC = """
    Attributes:
        config (NezhaConfig): model configuration.
        dtype (jnp.dtype): computation dtype (params are float32).
        gradient_checkpointing (bool): rematerialise encoder layers in the backward pass.

    Call args (all optional but one of ``input_ids``/``inputs_embeds``; there is no ``position_ids``):
        input_ids: (B, L) int ids{mc}.
        attention_mask: (B, L) 0/1, default ones; with a cache (B, cache_length).
        token_type_ids: (B, L) int, default zeros.
        head_mask: (heads,) or (layers, heads) multiplier of the attention probabilities.{dec}
        deterministic (bool): dropout off.
        output_attentions, output_hidden_states, return_dict (bool).
        inputs_embeds: (B, L, H) instead of ``input_ids``.
"""

_DECODER_DOC = """
        encoder_hidden_states: (B, Le, H) for cross-attention (decoders with add_cross_attention).
        encoder_attention_mask: (B, Le) 0/1, default ones.
        init_cache (bool): create the ``"cache"`` collection (used by the wrapper's ``init_cache``)."""


def relative_position_encoding(table: Any, q_len: int, k_len: int, query_offset: Any = 0) -> jax.Array:
    """``R`` (q_len, k_len, depth): ``table[clip(j - (query_offset + i), -K, K) + K]``, ``table`` (2K + 1, depth).

    Query ``i`` sits at absolute position ``query_offset + i`` (the cache fill when decoding with a
    cache; it may be traced) and key ``j`` at ``j``.  Only this call's (q_len, k_len) grid is gathered,
    so any length works.
    """
    table = jnp.asarray(table)
    k = (table.shape[0] - 1) // 2
    q_pos = jnp.asarray(query_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)  # absolute query positions
    index = relative_position_index(q_pos, jnp.arange(k_len, dtype=jnp.int32), k, jnp.clip)  # (q_len, k_len)
    return jnp.take(table, index, axis=0)  # (q_len, k_len, depth)


class FlaxNezhaModule(nn.Module):
    """The Nezha encoder (``nezha``): ``embeddings``, ``encoder`` with relative positions, ``pooler``.

    Returns ``BaseModelOutputWithPoolingAndCrossAttentions``: ``last_hidden_state`` (B, L, H),
    ``pooler_output`` (B, H) (with ``add_pooling_layer``), ``hidden_states`` (layers + 1) x (B, L, H),
    ``attentions`` layers x (B, heads, L, Lk), ``cross_attentions`` layers x (B, heads, L, Le).
    The field ``add_pooling_layer`` (bool, default True) builds ``pooler`` (tanh(dense(token 0))).
    With ``positions_to_keep`` ``last_hidden_state`` is (B, R, H) and the pooler reads its row 0.
    """

    __doc__ += _MODULE_DOC.format(mc="", dec=_DECODER_DOC) + POSITIONS_TO_KEEP_DOC

    config: Any
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
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
        # No length limit: positions are relative; a cache bounds only cached decoding.
        past_len, cache_len = (0, None) if init_cache else cache_info(self.variables.get("cache"))
        validate_inputs(
            c,
            input_ids,
            attention_mask,
            token_type_ids,
            None,
            inputs_embeds,
            past_len=past_len,
            cache_length=cache_len,
            embed_width=c.hidden_size,
            positions=False,
        )
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)
        if encoder_hidden_states is not None and encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)

        # Relative encodings over this call's (query, key) grid, shared by all layers.
        table = relative_position_table(c.max_relative_position, c.hidden_size // c.num_attention_heads)  # (2K+1, hd)
        seq_len = shape[-1]
        past = None if init_cache else cache_index(self.variables)
        offset = 0 if past is None else past  # absolute position of query 0 (traced under jit)
        keys = seq_len if past is None else cache_length(self.variables)  # self-attention keys: the cache
        rel = relative_position_encoding(table, seq_len, keys, offset)  # (L, Lk, head_dim)
        cross_rel = None
        if encoder_hidden_states is not None:
            cross = relative_position_encoding(table, seq_len, encoder_hidden_states.shape[1], offset)  # (L, Le, d)
            cross_rel = (cross, cross)

        h = BertEmbeddings(c, use_position=False, dtype=self.dtype, name="embeddings")(
            input_ids, token_type_ids, None, inputs_embeds, deterministic
        )
        h, all_hidden, all_attn, all_cross = BertEncoder(
            c, dtype=self.dtype, gradient_checkpointing=self.gradient_checkpointing, name="encoder"
        )(
            h,
            attention_mask,
            head_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            None,
            (rel, rel),
            init_cache,
            deterministic,
            output_attentions,
            output_hidden_states,
            cross_relative=cross_rel,
            positions_to_keep=positions_to_keep,
        )
        pooled = BertPooler(c, dtype=self.dtype, name="pooler")(h) if self.add_pooling_layer else None
        return finish_output(
            BaseModelOutputWithPoolingAndCrossAttentions,
            return_dict,
            last_hidden_state=h,
            pooler_output=pooled,
            hidden_states=all_hidden,
            attentions=all_attn,
            cross_attentions=all_cross,
        )


class _NezhaHead(FlaxHeadModule):
    """Shared fields of the head modules; the ``nezha`` submodule has a pooler as the head needs."""

    backbone_class = FlaxNezhaModule
    backbone_name = "nezha"
    #: the PyTorch head class name suffix; decides whether the base model has a pooler.
    head: ClassVar[str] = ""

    def _backbone_options(self) -> dict:
        return {"add_pooling_layer": self.head in HEADS_WITH_POOLER}


def _word_embeddings(nezha: nn.Module):
    """The word-embedding table (V, H) of a run ``nezha`` module (the tied MLM decoder)."""
    return tied_embedding_table(nezha, nezha.config)


class FlaxNezhaForPreTrainingModule(_NezhaHead):
    """Pre-training heads ``cls``: masked LM ``predictions`` (B, L, V) and NSP ``seq_relationship`` (B, 2)."""

    __doc__ += _MODULE_DOC.format(mc="", dec="")
    head = "ForPreTraining"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        def head(nezha, out):
            # PyTorch's NezhaPreTrainingHeads: one ``cls`` module holding both heads.
            cls = _PreTrainingHeads(self.config, self.dtype, name="cls")
            prediction, relationship = cls(_word_embeddings(nezha), out.last_hidden_state, out.pooler_output)
            return {"prediction_logits": prediction, "seq_relationship_logits": relationship}

        return self._head_output(locals(), NezhaForPreTrainingOutput, head)


class _PreTrainingHeads(nn.Module):
    """``cls``: ``predictions`` (when ``mlm``) and ``seq_relationship`` (when ``nsp``).

    Call args: table (V, H) word embeddings (the tied decoder); sequence_output (B, L, H);
    pooled_output (B, H).  Returns ``(prediction logits (B, L, V) | None, NSP logits (B, 2) | None)``.
    """

    config: Any
    dtype: Any = jnp.float32
    mlm: bool = True
    nsp: bool = True

    @nn.compact
    def __call__(self, table, sequence_output, pooled_output):
        c = self.config
        prediction = relationship = None
        if self.mlm:
            head = BertLMPredictionHead(c, tied=c.tie_word_embeddings, dtype=self.dtype, name="predictions")
            prediction = head(sequence_output, table)
        if self.nsp:
            relationship = dense(2, "seq_relationship", c, self.dtype)(pooled_output)
        return prediction, relationship


class FlaxNezhaForMaskedLMModule(_NezhaHead):
    """Masked LM: ``cls.predictions`` tied to the word embeddings -> logits (B, L, V)."""

    __doc__ += _MODULE_DOC.format(mc="", dec="")
    head = "ForMaskedLM"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        def head(nezha, out):
            cls = _PreTrainingHeads(self.config, self.dtype, nsp=False, name="cls")
            return {"logits": cls(_word_embeddings(nezha), out.last_hidden_state, None)[0]}

        return self._head_output(locals(), MaskedLMOutput, head)


class FlaxNezhaForNextSentencePredictionModule(_NezhaHead):
    """Next-sentence prediction: ``cls.seq_relationship`` on the pooled output -> logits (B, 2)."""

    __doc__ += _MODULE_DOC.format(mc="", dec="")
    head = "ForNextSentencePrediction"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        def head(_, out):
            cls = _PreTrainingHeads(self.config, self.dtype, mlm=False, name="cls")
            return {"logits": cls(None, None, out.pooler_output)[1]}

        keep = self._pooled_positions(locals())  # the pooler reads position 0 only
        return self._head_output(locals(), NextSentencePredictorOutput, head, positions_to_keep=keep)


class FlaxNezhaForSequenceClassificationModule(_NezhaHead):
    """Sequence classification: dropout + ``classifier`` on the pooled output -> logits (B, num_labels)."""

    __doc__ += _MODULE_DOC.format(mc="", dec="")
    head = "ForSequenceClassification"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        def head(_, out):
            return {"logits": token_classifier(self.config, out.pooler_output, deterministic, self.dtype)}

        keep = self._pooled_positions(locals())  # the pooler reads position 0 only
        return self._head_output(locals(), SequenceClassifierOutput, head, positions_to_keep=keep)


class FlaxNezhaForMultipleChoiceModule(_NezhaHead):
    """Multiple choice: dropout + ``classifier`` (H -> 1) on each choice's pooled output -> (B, C).

    Inputs are (B, C, L) and are flattened to (B * C, L); hidden states and attentions are returned
    in that flattened form (as transformers does).
    """

    __doc__ += _MODULE_DOC.format(mc=" of shape (B, C, L); every input likewise has a choice axis", dec="")
    head = "ForMultipleChoice"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        def pool(out):  # dropout on the pooler output (B * C, H)
            dropout = Dropout(classifier_dropout_rate(self.config), name="dropout")
            return dropout(out.pooler_output, deterministic=deterministic)

        return self._multiple_choice(locals(), pool, pooled=True)  # the pooler reads position 0 only


class FlaxNezhaForTokenClassificationModule(_NezhaHead):
    """Token classification: dropout + ``classifier`` -> logits (B, L, num_labels)."""

    __doc__ += _MODULE_DOC.format(mc="", dec="")
    head = "ForTokenClassification"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        return self._token_classification(locals())


class FlaxNezhaForQuestionAnsweringModule(_NezhaHead):
    """Extractive QA: ``qa_outputs`` -> ``start_logits`` (B, L), ``end_logits`` (B, L)."""

    __doc__ += _MODULE_DOC.format(mc="", dec="")
    head = "ForQuestionAnswering"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        return self._question_answering(locals())


# --- wrappers ------------------------------------------------------------------------------------


class FlaxNezhaPreTrainedModel(FlaxPreTrainedModel):
    """Base of the Nezha wrappers (see :class:`~nezha_zoo.flax.modeling_utils.FlaxPreTrainedModel`).

    The call convention is transformers' Flax one without ``position_ids`` (Nezha's positions are
    relative): there is no length limit, except the cache size when decoding with a cache.
    """

    family = NEZHA
    base_model_prefix = "nezha"
    has_position_ids = False

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        params=None,
        dropout_rng=None,
        train: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values=None,
        inputs_embeds=None,
    ):
        """Run the module.

        Args:
            input_ids: (B, L) int ids ((B, C, L) for multiple choice), or None with ``inputs_embeds``.
            attention_mask: (B, L) 0/1, default ones; with ``past_key_values`` (B, cache_length).
            token_type_ids: (B, L) int, default zeros.
            head_mask: (heads,) or (layers, heads) multiplier of the attention probabilities.
            encoder_hidden_states: (B, Le, H) for cross-attention (``FlaxNezhaModel`` as a decoder with
                ``add_cross_attention``).
            encoder_attention_mask: (B, Le) 0/1, default ones.
            params: params tree to use instead of ``self.params``.
            dropout_rng: PRNG key for dropout (needed with ``train=True``).
            train (bool): dropout on.
            output_attentions, output_hidden_states, return_dict (bool | None): config defaults when None.
            past_key_values: cache from :meth:`init_cache` or a previous call (``FlaxNezhaModel`` with
                ``config.is_decoder``); the updated cache is returned in ``past_key_values``.
            inputs_embeds: (B, L, H) embeddings instead of ``input_ids``.

        Returns:
            The head's output class (``return_dict``) or its tuple.
        """
        return self._forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            head_mask=head_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            params=params,
            dropout_rng=dropout_rng,
            train=train,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
        )


class FlaxNezhaModel(FlaxNezhaPreTrainedModel):
    """The bare Nezha encoder (a decoder with cross-attention and a cache when configured).

    Wraps :class:`FlaxNezhaModule`; arguments as :class:`FlaxNezhaPreTrainedModel`.
    """

    head = "Model"
    module_class = FlaxNezhaModule


class FlaxNezhaForPreTraining(FlaxNezhaPreTrainedModel):
    """Nezha with masked-LM and next-sentence heads.

    Wraps :class:`FlaxNezhaForPreTrainingModule`; arguments as :class:`FlaxNezhaPreTrainedModel`.
    """

    head = "ForPreTraining"
    module_class = FlaxNezhaForPreTrainingModule


class FlaxNezhaForMaskedLM(FlaxNezhaPreTrainedModel):
    """Nezha masked language model.

    Wraps :class:`FlaxNezhaForMaskedLMModule`; arguments as :class:`FlaxNezhaPreTrainedModel`.
    """

    head = "ForMaskedLM"
    module_class = FlaxNezhaForMaskedLMModule


class FlaxNezhaForNextSentencePrediction(FlaxNezhaPreTrainedModel):
    """Nezha next-sentence prediction.

    Wraps :class:`FlaxNezhaForNextSentencePredictionModule`; arguments as :class:`FlaxNezhaPreTrainedModel`.
    """

    head = "ForNextSentencePrediction"
    module_class = FlaxNezhaForNextSentencePredictionModule


class FlaxNezhaForSequenceClassification(FlaxNezhaPreTrainedModel):
    """Nezha sequence classifier.

    Wraps :class:`FlaxNezhaForSequenceClassificationModule`; arguments as :class:`FlaxNezhaPreTrainedModel`.
    """

    head = "ForSequenceClassification"
    module_class = FlaxNezhaForSequenceClassificationModule


class FlaxNezhaForMultipleChoice(FlaxNezhaPreTrainedModel):
    """Nezha multiple choice.

    Wraps :class:`FlaxNezhaForMultipleChoiceModule`; arguments as :class:`FlaxNezhaPreTrainedModel`.
    """

    head = "ForMultipleChoice"
    module_class = FlaxNezhaForMultipleChoiceModule
    input_rank = 3


class FlaxNezhaForTokenClassification(FlaxNezhaPreTrainedModel):
    """Nezha token classifier.

    Wraps :class:`FlaxNezhaForTokenClassificationModule`; arguments as :class:`FlaxNezhaPreTrainedModel`.
    """

    head = "ForTokenClassification"
    module_class = FlaxNezhaForTokenClassificationModule


class FlaxNezhaForQuestionAnswering(FlaxNezhaPreTrainedModel):
    """Nezha extractive question answering.

    Wraps :class:`FlaxNezhaForQuestionAnsweringModule`; arguments as :class:`FlaxNezhaPreTrainedModel`.
    """

    head = "ForQuestionAnswering"
    module_class = FlaxNezhaForQuestionAnsweringModule
