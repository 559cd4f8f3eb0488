"""XLM-RoBERTa-XL in Flax linen: the base module, six heads and their wrappers.

Composition of the shared blocks (:mod:`nezha_zoo.flax.layers`, :mod:`nezha_zoo.flax.heads`); the
family's own choices (``nezha_zoo/families/xlm_roberta_xl.py``): pre-LN layers
(``XLM_ROBERTA_XL_NAMES``, the cross-attention pre-normed too, no dropout on the feed-forward's output:
``output_dropout=False``), a final ``encoder.LayerNorm``, no embedding LayerNorm, RoBERTa positions
(pads keep ``pad_token_id``, tokens count from ``pad_token_id + 1``, continuing after the cache fill
when decoding; ``pad_token_id + 1 ..`` with ``inputs_embeds``), the pooler only in ``Model`` and
``ForMultipleChoice``, the tied RoBERTa ``lm_head`` and the tanh ``classifier``.  transformers has no
Flax port of this family; the numbers are its PyTorch ones.  Flax takes no labels:
:func:`token_classification_loss` applies the family's rule that positions with
``attention_mask != 1`` carry no token-classification loss.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from nezha_zoo.families.xlm_roberta_xl import HEADS_WITH_POOLER, XLM_ROBERTA_XL
from nezha_zoo.flax import losses
from nezha_zoo.flax.generation import FlaxGenerationMixin
from nezha_zoo.flax.heads import BertPooler, ClassificationHead, RobertaLMHead, tied_embedding_table
from nezha_zoo.flax.layers import (
    POSITIONS_TO_KEEP_DOC,
    BertEmbeddings,
    BertEncoder,
    Dropout,
    cache_index,
    padding_aware_position_ids,
    sequential_position_ids,
)
from nezha_zoo.flax.modeling_utils import (
    FlaxHeadModule,
    FlaxPreTrainedModel,
    cache_info,
    finish_output,
    validate_inputs,
)
from nezha_zoo.generation import keep_last_positions
from nezha_zoo.outputs import (
    IGNORE_INDEX,
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from nezha_zoo.spec.blocks import XLM_ROBERTA_XL_NAMES
from nezha_zoo.spec.positions import padding_aware_max_length
from nezha_zoo.validation import check_length

__all__ = [
    "token_classification_loss",
    "FlaxXLMRobertaXLModule",
    "FlaxXLMRobertaXLForCausalLMModule",
    "FlaxXLMRobertaXLForMaskedLMModule",
    "FlaxXLMRobertaXLForSequenceClassificationModule",
    "FlaxXLMRobertaXLForMultipleChoiceModule",
    "FlaxXLMRobertaXLForTokenClassificationModule",
    "FlaxXLMRobertaXLForQuestionAnsweringModule",
    "FlaxXLMRobertaXLPreTrainedModel",
    "FlaxXLMRobertaXLModel",
    "FlaxXLMRobertaXLForCausalLM",
    "FlaxXLMRobertaXLForMaskedLM",
    "FlaxXLMRobertaXLForSequenceClassification",
    "FlaxXLMRobertaXLForMultipleChoice",
    "FlaxXLMRobertaXLForTokenClassification",
    "FlaxXLMRobertaXLForQuestionAnswering",
]


def token_classification_loss(logits: jax.Array, labels: jax.Array, attention_mask: jax.Array | None = None):
    """Mean cross-entropy of logits (B, L, n) vs labels (B, L), -100 and ``attention_mask != 1`` ignored.

    transformers' XLM-R-XL token-classification loss (its PyTorch head masks by ``attention_mask``).
    """
    labels = jnp.asarray(labels)
    if attention_mask is not None:
        labels = jnp.where(jnp.asarray(attention_mask).reshape(labels.shape) == 1, labels, IGNORE_INDEX)
    return losses.token_classification_loss(logits, labels)


_MODULE_DOC = """
    Attributes:
        config (XLMRobertaXLConfig): model configuration.
        dtype (jnp.dtype): computation dtype (params are float32).
        gradient_checkpointing (bool): rematerialise encoder layers in the backward pass.

    Call args (all optional but one of ``input_ids``/``inputs_embeds``; at most
    ``max_position_embeddings - pad_token_id - 1`` tokens):
        input_ids: (B, L) int ids{mc}.
        attention_mask: (B, L) 0/1, default ones; with a cache (B, cache_length).
        token_type_ids: (B, L) int in ``[0, type_vocab_size)``, default zeros.
        position_ids: (B, L) int, default RoBERTa-style from the ids (pads ``pad_token_id``, tokens
            from ``pad_token_id + 1``), ``pad_token_id + 1 ..`` with ``inputs_embeds``.
        head_mask: (heads,) or (layers, heads).
        encoder_hidden_states: (B, Le, H) for cross-attention (Model, CausalLM, MaskedLM; decoders
            with add_cross_attention).
        encoder_attention_mask: (B, Le) 0/1, default ones.
        inputs_embeds: (B, L, H) instead of ``input_ids``.
        init_cache (bool): create the ``"cache"`` collection (Model and CausalLM; used by ``init_cache``).
        deterministic (bool): dropout off.
        output_attentions, output_hidden_states, return_dict (bool).
"""


class FlaxXLMRobertaXLModule(nn.Module):
    """The XLM-RoBERTa-XL encoder (``roberta``): embeddings, pre-LN ``encoder``, optional ``pooler``.

    Returns ``BaseModelOutputWithPoolingAndCrossAttentions``: ``last_hidden_state`` (B, L, H) after
    the final ``encoder.LayerNorm``, ``pooler_output`` (B, H) (with ``add_pooling_layer``),
    ``hidden_states`` (layers + 1) x (B, L, H), ``attentions`` layers x (B, heads, L, Lk),
    ``cross_attentions``.  With ``positions_to_keep`` ``last_hidden_state`` is (B, R, H) and the
    pooler reads its row 0.
    """

    __doc__ += (
        _MODULE_DOC.format(mc="")
        + "        add_pooling_layer (bool, attribute): build the ``pooler``.\n"
        + POSITIONS_TO_KEEP_DOC
    )

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
            embed_width=c.hidden_size,
        )
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)
        if position_ids is None:
            limit = padding_aware_max_length(c.max_position_embeddings, c.pad_token_id)
            what = "max_position_embeddings - pad_token_id - 1"
            if input_ids is not None:
                check_length(shape[-1], past_len, limit, what)
                past = None if init_cache else cache_index(self.variables)
                start = 0 if past is None else past  # the cache fill (traced under jit)
                position_ids = padding_aware_position_ids(jnp.asarray(input_ids), c.pad_token_id, start)
            else:
                # transformers numbers embeddings from pad + 1 whatever the cache holds.
                check_length(shape[-1], 0, limit, what)
                position_ids = sequential_position_ids(shape, c.pad_token_id)
        if encoder_hidden_states is not None and encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)
        # No embedding LayerNorm: every layer norms its own input, the encoder its output.
        embeddings = BertEmbeddings(
            c, use_norm=False, position_padding_idx=c.pad_token_id, dtype=self.dtype, name="embeddings"
        )
        h = embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, deterministic)
        h, all_hidden, all_attn, all_cross = BertEncoder(
            c,
            names=XLM_ROBERTA_XL_NAMES,
            final_norm="LayerNorm",
            dtype=self.dtype,
            gradient_checkpointing=self.gradient_checkpointing,
            name="encoder",
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


class _XLMRobertaXLHead(FlaxHeadModule):
    """Shared fields of the head modules; ``_backbone`` runs the ``roberta`` submodule."""

    backbone_class = FlaxXLMRobertaXLModule
    backbone_name = "roberta"
    head_name = "Model"

    def _backbone_options(self) -> dict:
        # Only Model and ForMultipleChoice carry the pooler (transformers' add_pooling_layer).
        return {"add_pooling_layer": self.head_name in HEADS_WITH_POOLER}

    def _lm_head(self, roberta, out, logits_to_keep: int = 0) -> dict:
        """``lm_head`` (dense, GELU, layer_norm, tied decoder, bias) -> ``{"logits": (B, L, V)}`` (the last
        ``logits_to_keep`` positions only when not 0: :func:`nezha_zoo.generation.keep_last_positions`)."""
        c = self.config
        table = tied_embedding_table(roberta, c) if c.tie_word_embeddings else None  # (V, H)
        lm_head = RobertaLMHead(c, tied=c.tie_word_embeddings, dtype=self.dtype, name="lm_head")
        return {"logits": lm_head(keep_last_positions(out.last_hidden_state, logits_to_keep), table)}


class FlaxXLMRobertaXLForCausalLMModule(_XLMRobertaXLHead):
    """Causal LM (use with ``config.is_decoder=True``): the tied ``lm_head`` over a causal encoder;
    ``logits_to_keep`` (static int): the head on the last this many positions only (0: all)."""

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForCausalLM"

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
        def head(roberta, out):
            return {**self._lm_head(roberta, out, logits_to_keep), "cross_attentions": out.cross_attentions}

        return self._head_output(locals(), CausalLMOutputWithCrossAttentions, head)


class FlaxXLMRobertaXLForMaskedLMModule(_XLMRobertaXLHead):
    """Masked LM: ``lm_head`` (dense, GELU, ``layer_norm``, decoder tied to the word embeddings, ``bias``)."""

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForMaskedLM"

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
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        return self._head_output(locals(), MaskedLMOutput, self._lm_head)


class FlaxXLMRobertaXLForSequenceClassificationModule(_XLMRobertaXLHead):
    """Sequence classification: ``classifier`` (dense, tanh, ``out_proj``) on token 0 -> (B, num_labels)."""

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForSequenceClassification"

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
            classifier = ClassificationHead(self.config, activation="tanh", dtype=self.dtype, name="classifier")
            return {"logits": classifier(out.last_hidden_state, deterministic=deterministic)}

        keep = self._pooled_positions(locals())  # the classifier reads position 0 only
        return self._head_output(locals(), SequenceClassifierOutput, head, positions_to_keep=keep)


class FlaxXLMRobertaXLForMultipleChoiceModule(_XLMRobertaXLHead):
    """Multiple choice: pooler output, dropout, ``classifier`` (H -> 1) per choice -> (B, C).

    Inputs are (B, C, L) and are flattened to (B * C, L); hidden states and attentions are returned
    in that flattened form (as transformers does).
    """

    __doc__ += _MODULE_DOC.format(mc=" of shape (B, C, L); every input likewise has a choice axis")
    head_name = "ForMultipleChoice"

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
        def pool(out):  # dropout on the pooler output (B * C, H)
            dropout = Dropout(self.config.hidden_dropout_prob, name="dropout")
            return dropout(out.pooler_output, deterministic=deterministic)

        return self._multiple_choice(locals(), pool, pooled=True)  # the pooler reads position 0 only


class FlaxXLMRobertaXLForTokenClassificationModule(_XLMRobertaXLHead):
    """Token classification: dropout + ``classifier`` -> (B, L, num_labels).

    Its loss is :func:`token_classification_loss` (positions with ``attention_mask != 1`` ignored).
    """

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForTokenClassification"

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


class FlaxXLMRobertaXLForQuestionAnsweringModule(_XLMRobertaXLHead):
    """Extractive QA: ``qa_outputs`` -> ``start_logits`` (B, L), ``end_logits`` (B, L)."""

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForQuestionAnswering"

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


class FlaxXLMRobertaXLPreTrainedModel(FlaxPreTrainedModel):
    """Base of the XLM-RoBERTa-XL wrappers (see :class:`~nezha_zoo.flax.modeling_utils.FlaxPreTrainedModel`)."""

    family = XLM_ROBERTA_XL
    base_model_prefix = "roberta"


class FlaxXLMRobertaXLModel(FlaxXLMRobertaXLPreTrainedModel):
    """The bare XLM-RoBERTa-XL encoder (with pooler).

    Wraps :class:`FlaxXLMRobertaXLModule`; arguments as :class:`FlaxXLMRobertaXLPreTrainedModel`.
    """

    head = "Model"
    module_class = FlaxXLMRobertaXLModule


# RoBERTa positions count from pad_token_id + 1: generate numbers a left-padded row from there.
class FlaxXLMRobertaXLForCausalLM(FlaxGenerationMixin, FlaxXLMRobertaXLPreTrainedModel):
    """XLM-RoBERTa-XL causal LM (decoder).

    Wraps :class:`FlaxXLMRobertaXLForCausalLMModule`; arguments as :class:`FlaxXLMRobertaXLPreTrainedModel`.
    """

    head = "ForCausalLM"
    module_class = FlaxXLMRobertaXLForCausalLMModule
    generation_position_rule = "padding_aware"


class FlaxXLMRobertaXLForMaskedLM(FlaxXLMRobertaXLPreTrainedModel):
    """XLM-RoBERTa-XL masked language model.

    Wraps :class:`FlaxXLMRobertaXLForMaskedLMModule`; arguments as :class:`FlaxXLMRobertaXLPreTrainedModel`.
    """

    head = "ForMaskedLM"
    module_class = FlaxXLMRobertaXLForMaskedLMModule


class FlaxXLMRobertaXLForSequenceClassification(FlaxXLMRobertaXLPreTrainedModel):
    """XLM-RoBERTa-XL sequence classifier.

    Wraps :class:`FlaxXLMRobertaXLForSequenceClassificationModule`; arguments as
    :class:`FlaxXLMRobertaXLPreTrainedModel`.
    """

    head = "ForSequenceClassification"
    module_class = FlaxXLMRobertaXLForSequenceClassificationModule


class FlaxXLMRobertaXLForMultipleChoice(FlaxXLMRobertaXLPreTrainedModel):
    """XLM-RoBERTa-XL multiple choice.

    Wraps :class:`FlaxXLMRobertaXLForMultipleChoiceModule`; arguments as :class:`FlaxXLMRobertaXLPreTrainedModel`.
    """

    head = "ForMultipleChoice"
    module_class = FlaxXLMRobertaXLForMultipleChoiceModule
    input_rank = 3


class FlaxXLMRobertaXLForTokenClassification(FlaxXLMRobertaXLPreTrainedModel):
    """XLM-RoBERTa-XL token classifier.

    Wraps :class:`FlaxXLMRobertaXLForTokenClassificationModule`; arguments as :class:`FlaxXLMRobertaXLPreTrainedModel`.
    """

    head = "ForTokenClassification"
    module_class = FlaxXLMRobertaXLForTokenClassificationModule


class FlaxXLMRobertaXLForQuestionAnswering(FlaxXLMRobertaXLPreTrainedModel):
    """XLM-RoBERTa-XL extractive question answering.

    Wraps :class:`FlaxXLMRobertaXLForQuestionAnsweringModule`; arguments as :class:`FlaxXLMRobertaXLPreTrainedModel`.
    """

    head = "ForQuestionAnswering"
    module_class = FlaxXLMRobertaXLForQuestionAnsweringModule
