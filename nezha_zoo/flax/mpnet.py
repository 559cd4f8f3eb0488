"""MPNet in Flax linen: the base module, five heads, their wrappers and sentence embeddings.

Composition of the shared blocks (:mod:`nezha_zoo.flax.layers`, :mod:`nezha_zoo.flax.heads`); the
family's own choices, all following transformers 4.57.6 PyTorch (``models/mpnet/modeling_mpnet.py``):

* embeddings are word + absolute position (no token types), LayerNorm, dropout; the padding row of
  both tables is hard-coded to 1 (whatever ``pad_token_id`` says) and gets no gradient;
* positions are RoBERTa-style: pads (id 1) sit at position 1 and real tokens count from 2
  (``cumsum(ids != 1) * (ids != 1) + 1``); with ``inputs_embeds`` they are ``arange(2, L + 2)``; so
  sequences may hold at most ``max_position_embeddings - 2`` tokens;
* attention projections ``attention.attn.{q,k,v,o}`` (post-LN), plus one relative-position bias table
  ``encoder.relative_attention_bias`` (buckets x heads) shared by every layer, looked up once per
  forward from T5-style bidirectional buckets of ``j - i`` over ``arange`` positions (transformers
  ignores ``position_ids`` there, and so do we) and added to the scores after the 1/sqrt(d) scaling;
* the pooler exists only in ``Model`` and ``ForMultipleChoice`` (``HEADS_WITH_POOLER``); heads are the
  RoBERTa-style ``lm_head`` and ``classifier``.

Bucket count: transformers PyTorch hard-codes 32 buckets in ``compute_position_bias`` (while the table
has ``relative_attention_num_buckets`` rows; its TF port uses the config value).  We use
``config.relative_attention_num_buckets`` everywhere: at the default 32 the two agree exactly; with
more buckets transformers PyTorch leaves rows unused, with fewer it indexes past its own table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from nezha_zoo.families.mpnet import (
    EMBEDDING_PADDING_IDX,
    HEADS_WITH_POOLER,
    MPNET,
    relative_bucket_table,
    relative_position_bucket,
)
from nezha_zoo.flax.heads import BertPooler, ClassificationHead, RobertaLMHead, mean_pool, tied_embedding_table
from nezha_zoo.flax.layers import (
    POSITIONS_TO_KEEP_DOC,
    BertLayerCollection,
    Dropout,
    freeze_padding_row,
    layer_norm,
    padding_aware_position_ids,
    sequential_position_ids,
)
from nezha_zoo.flax.modeling_utils import (
    FlaxHeadModule,
    FlaxPreTrainedModel,
    finish_output,
    validate_inputs,
)
from nezha_zoo.outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    SentenceEmbeddingOutput,
    SequenceClassifierOutput,
)
from nezha_zoo.spec.blocks import MPNET_NAMES
from nezha_zoo.spec.positions import padding_aware_max_length
from nezha_zoo.validation import check_length

__all__ = [
    "FlaxMPNetEmbeddings",
    "FlaxMPNetEncoder",
    "FlaxMPNetModule",
    "FlaxMPNetForMaskedLMModule",
    "FlaxMPNetForSequenceClassificationModule",
    "FlaxMPNetForMultipleChoiceModule",
    "FlaxMPNetForTokenClassificationModule",
    "FlaxMPNetForQuestionAnsweringModule",
    "FlaxMPNetPreTrainedModel",
    "FlaxMPNetModel",
    "FlaxMPNetForMaskedLM",
    "FlaxMPNetForSequenceClassification",
    "FlaxMPNetForMultipleChoice",
    "FlaxMPNetForTokenClassification",
    "FlaxMPNetForQuestionAnswering",
]


class FlaxMPNetEmbeddings(nn.Module):
    """``embeddings``: word + position tables (padding row 1 frozen), LayerNorm, dropout.

    Call args:
        input_ids: (B, L) int, or None with ``inputs_embeds`` (B, L, H).
        position_ids: (B, L) int (already defaulted by the caller).

    Returns:
        (B, L, H).
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, position_ids, inputs_embeds=None, deterministic: bool = True):
        c = self.config
        init = jax.nn.initializers.normal(c.initializer_range)

        def table(rows: int, name: str) -> nn.Embed:
            return nn.Embed(
                rows, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, embedding_init=init, name=name
            )

        words = table(c.vocab_size, "word_embeddings")
        if inputs_embeds is None:
            ids = input_ids.astype("i4")
            x = freeze_padding_row(words(ids), ids, EMBEDDING_PADDING_IDX)
        else:
            x = inputs_embeds.astype(self.dtype)
        pos = position_ids.astype("i4")
        x = x + freeze_padding_row(
            table(c.max_position_embeddings, "position_embeddings")(pos), pos, EMBEDDING_PADDING_IDX
        )
        x = layer_norm("LayerNorm", c, self.dtype)(x)
        return Dropout(c.hidden_dropout_prob, name="dropout")(x, deterministic=deterministic)


class FlaxMPNetEncoder(nn.Module):
    """``encoder``: the ``layer`` list (MPNet names) and the shared ``relative_attention_bias`` table.

    The bias (1, heads, L, L) is computed once per forward from ``arange`` positions and passed to every
    layer's attention (added after scaling).

    Call args:
        hidden_states (B, L, H); attention_mask (B, L) 0/1; head_mask (layers, heads), (heads,) or None;
        positions_to_keep (B, R) int or None: the last layer at those rows only (output (B, R, H)).

    Returns:
        ``(last_hidden (B, L, H), all_hidden_states | None, all_attentions | None)``.
    """

    config: Any
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        positions_to_keep=None,
    ):
        c = self.config
        seq_len = hidden_states.shape[1]
        bias_table = nn.Embed(
            c.relative_attention_num_buckets,
            c.num_attention_heads,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=jax.nn.initializers.normal(c.initializer_range),
            name="relative_attention_bias",
        )
        if isinstance(seq_len, int):
            positions = np.arange(seq_len)
            buckets = relative_position_bucket(
                positions[None, :] - positions[:, None], c.relative_attention_num_buckets
            )
        else:  # symbolic length (jax.export): look the distances up in the static table of every one
            positions = jnp.arange(seq_len)
            table = jnp.asarray(relative_bucket_table(c))  # (2S + 1,), row d + S
            buckets = table[positions[None, :] - positions[:, None] + c.max_position_embeddings]
        # (L, L, heads) -> (1, heads, L, L), broadcast over the batch
        position_bias = jnp.transpose(bias_table(jnp.asarray(buckets)), (2, 0, 1))[None]
        if head_mask is not None:
            head_mask = jnp.asarray(head_mask)
            if head_mask.ndim == 1:  # one mask for every layer
                head_mask = jnp.broadcast_to(head_mask, (c.num_hidden_layers, head_mask.shape[0]))
        h, all_hidden, all_attn, _ = BertLayerCollection(
            c, names=MPNET_NAMES, dtype=self.dtype, gradient_checkpointing=self.gradient_checkpointing, name="layer"
        )(
            hidden_states,
            attention_mask,
            head_mask,
            None,
            None,
            position_bias,
            None,
            False,
            deterministic,
            output_attentions,
            output_hidden_states,
            positions_to_keep=positions_to_keep,
        )
        if output_hidden_states:
            all_hidden += (h,)
        return h, all_hidden, all_attn


_MODULE_DOC = """
    Attributes:
        config (MPNetConfig): model configuration.
        dtype (jnp.dtype): computation dtype (params are float32).
        gradient_checkpointing (bool): rematerialise encoder layers in the backward pass.

    Call args (all optional but one of ``input_ids``/``inputs_embeds``):
        input_ids: (B, L) int ids{mc}; padding id 1.
        attention_mask: (B, L) 0/1, default ones.
        position_ids: (B, L) int, default RoBERTa-style from the ids (pads 1, tokens 2, 3...), or
            ``arange(2, L + 2)`` with ``inputs_embeds``.
        head_mask: (heads,) or (layers, heads).
        inputs_embeds: (B, L, H) instead of ``input_ids``.
        deterministic (bool): dropout off.
        output_attentions, output_hidden_states, return_dict (bool).
"""


class FlaxMPNetModule(nn.Module):
    """The MPNet encoder (``mpnet``): ``embeddings``, ``encoder``, optional ``pooler``.

    Returns ``BaseModelOutputWithPooling``: ``last_hidden_state`` (B, L, H), ``pooler_output`` (B, H)
    (with ``add_pooling_layer``), ``hidden_states`` (layers + 1) x (B, L, H), ``attentions``
    layers x (B, heads, L, L).  With ``positions_to_keep`` ``last_hidden_state`` is (B, R, H) and the
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
        position_ids=None,
        head_mask=None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        inputs_embeds=None,
        positions_to_keep=None,
    ):
        c = self.config
        # Direct module users get the wrapper's checks too (values only when concrete, i.e. not under jit).
        validate_inputs(
            c,
            input_ids,
            attention_mask,
            None,
            position_ids,
            inputs_embeds,
            embed_width=c.hidden_size,
            positions=False,
        )
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        if position_ids is None:
            # Real tokens take positions 2 .. L + 1, so the table holds max_position_embeddings - 2 of them.
            check_length(
                shape[-1],
                0,
                padding_aware_max_length(c.max_position_embeddings, EMBEDDING_PADDING_IDX),
                "max_position_embeddings - 2",
            )
            if input_ids is not None:
                position_ids = padding_aware_position_ids(jnp.asarray(input_ids), EMBEDDING_PADDING_IDX)
            else:
                position_ids = sequential_position_ids(shape, EMBEDDING_PADDING_IDX)
        if attention_mask is None:
            attention_mask = jnp.ones(shape, jnp.int32)
        h = FlaxMPNetEmbeddings(c, dtype=self.dtype, name="embeddings")(
            input_ids, position_ids, inputs_embeds, deterministic
        )
        h, all_hidden, all_attn = FlaxMPNetEncoder(
            c, dtype=self.dtype, gradient_checkpointing=self.gradient_checkpointing, name="encoder"
        )(h, attention_mask, head_mask, deterministic, output_attentions, output_hidden_states, positions_to_keep)
        pooled = BertPooler(c, dtype=self.dtype, name="pooler")(h) if self.add_pooling_layer else None
        return finish_output(
            BaseModelOutputWithPooling,
            return_dict,
            last_hidden_state=h,
            pooler_output=pooled,
            hidden_states=all_hidden,
            attentions=all_attn,
        )


class _MPNetHead(FlaxHeadModule):
    """Shared fields of the head modules; ``_backbone`` runs the ``mpnet`` submodule."""

    backbone_class = FlaxMPNetModule
    backbone_name = "mpnet"
    head_name = "Model"

    def _backbone_options(self) -> dict:
        # Only Model and ForMultipleChoice carry the pooler (transformers' add_pooling_layer).
        return {"add_pooling_layer": self.head_name in HEADS_WITH_POOLER}


class FlaxMPNetForMaskedLMModule(_MPNetHead):
    """Masked LM: ``lm_head`` (dense, GELU, ``layer_norm``, decoder tied to the word embeddings, ``bias``).

    Returns ``MaskedLMOutput`` with ``logits`` (B, L, V).
    """

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForMaskedLM"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        def head(mpnet, out):
            c = self.config
            table = None
            if c.tie_word_embeddings:
                table = tied_embedding_table(mpnet, c)  # (V, H)
            lm_head = RobertaLMHead(c, tied=c.tie_word_embeddings, dtype=self.dtype, name="lm_head")
            return {"logits": lm_head(out.last_hidden_state, table)}

        return self._head_output(locals(), MaskedLMOutput, head)


class FlaxMPNetForSequenceClassificationModule(_MPNetHead):
    """Sequence classification: ``classifier`` (dense, tanh, ``out_proj``) on token 0 -> (B, num_labels)."""

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForSequenceClassification"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
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


class FlaxMPNetForMultipleChoiceModule(_MPNetHead):
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


class FlaxMPNetForTokenClassificationModule(_MPNetHead):
    """Token classification: dropout + ``classifier`` -> (B, L, num_labels)."""

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForTokenClassification"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        head_mask=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        inputs_embeds=None,
    ):
        return self._token_classification(locals())


class FlaxMPNetForQuestionAnsweringModule(_MPNetHead):
    """Extractive QA: ``qa_outputs`` -> ``start_logits`` (B, L), ``end_logits`` (B, L)."""

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForQuestionAnswering"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
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


class FlaxMPNetPreTrainedModel(FlaxPreTrainedModel):
    """Base of the MPNet wrappers (see :class:`~nezha_zoo.flax.modeling_utils.FlaxPreTrainedModel`).

    The call convention is transformers' Flax one without ``token_type_ids`` (MPNet has none) and
    without decoder inputs (MPNet is an encoder only).  :meth:`encode` gives sentence embeddings.
    """

    family = MPNET
    base_model_prefix = "mpnet"

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        head_mask=None,
        params=None,
        dropout_rng=None,
        train: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds=None,
    ):
        """Run the module.

        Args:
            input_ids: (B, L) int ids ((B, C, L) for multiple choice), or None with ``inputs_embeds``;
                padding id 1.
            attention_mask: (B, L) 0/1, default ones.
            position_ids: (B, L) int in ``[0, max_position_embeddings)``, default RoBERTa-style from the
                ids (pads 1, real tokens 2, 3...) or ``arange(2, L + 2)`` with ``inputs_embeds``.
            head_mask: (heads,) or (layers, heads) multiplier of the attention probabilities.
            params: params tree to use instead of ``self.params``.
            dropout_rng: PRNG key for dropout (needed with ``train=True``).
            train (bool): dropout on.
            output_attentions, output_hidden_states, return_dict (bool | None): config defaults when None.
            inputs_embeds: (B, L, H) embeddings instead of ``input_ids``.

        Returns:
            The head's output class (``return_dict``) or its tuple.

        Raises:
            InputError: ids outside the vocabulary, more than ``max_position_embeddings - 2`` tokens,
                mismatched shapes.
        """
        return self._forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=None,
            head_mask=head_mask,
            encoder_hidden_states=None,
            encoder_attention_mask=None,
            params=params,
            dropout_rng=dropout_rng,
            train=train,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            past_key_values=None,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
        )

    def encode(self, input_ids, attention_mask=None, normalize: bool = True, params=None) -> SentenceEmbeddingOutput:
        """Sentence embeddings: masked mean of the last hidden states, L2-normalised (sentence-transformers).

        As sentence-transformers' MPNet models (``Transformer`` -> ``Pooling(mean)`` -> ``Normalize``).
        Runs the base model (``mpnet``) of any MPNet class in eval mode; the pooler, if any, is not
        used.  Pure function of ``params``: usable under ``jax.jit``/``jax.grad`` with ``params`` passed.

        Args:
            input_ids: (B, L) int ids (padding id 1).
            attention_mask: (B, L) 0/1, default ones; only tokens with 1 are averaged.
            normalize (bool): divide by the L2 norm (guarded by eps 1e-12), as ``Normalize()``.
            params: params tree to use instead of ``self.params``.

        Returns:
            ``SentenceEmbeddingOutput``: ``embeddings`` (B, H), ``last_hidden_state`` (B, L, H).

        Raises:
            InputError: as the forward pass (vocabulary, length, shapes).
        """
        params = self.params if params is None else params
        base_params = params if self.head == "Model" else params[self.base_model_prefix]
        base = FlaxMPNetModule(self.config, dtype=self.dtype, add_pooling_layer=False)
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        out = base.apply({"params": base_params}, ids, mask, deterministic=True)
        embeddings = mean_pool(out.last_hidden_state, mask, normalize=normalize)
        return SentenceEmbeddingOutput(embeddings=embeddings, last_hidden_state=out.last_hidden_state)


class FlaxMPNetModel(FlaxMPNetPreTrainedModel):
    """The bare MPNet encoder (with pooler).

    Wraps :class:`FlaxMPNetModule`; arguments as :class:`FlaxMPNetPreTrainedModel`.
    """

    head = "Model"
    module_class = FlaxMPNetModule


class FlaxMPNetForMaskedLM(FlaxMPNetPreTrainedModel):
    """MPNet masked language model.

    Wraps :class:`FlaxMPNetForMaskedLMModule`; arguments as :class:`FlaxMPNetPreTrainedModel`.
    """

    head = "ForMaskedLM"
    module_class = FlaxMPNetForMaskedLMModule


class FlaxMPNetForSequenceClassification(FlaxMPNetPreTrainedModel):
    """MPNet sequence classifier.

    Wraps :class:`FlaxMPNetForSequenceClassificationModule`; arguments as :class:`FlaxMPNetPreTrainedModel`.
    """

    head = "ForSequenceClassification"
    module_class = FlaxMPNetForSequenceClassificationModule


class FlaxMPNetForMultipleChoice(FlaxMPNetPreTrainedModel):
    """MPNet multiple choice.

    Wraps :class:`FlaxMPNetForMultipleChoiceModule`; arguments as :class:`FlaxMPNetPreTrainedModel`.
    """

    head = "ForMultipleChoice"
    module_class = FlaxMPNetForMultipleChoiceModule
    input_rank = 3


class FlaxMPNetForTokenClassification(FlaxMPNetPreTrainedModel):
    """MPNet token classifier.

    Wraps :class:`FlaxMPNetForTokenClassificationModule`; arguments as :class:`FlaxMPNetPreTrainedModel`.
    """

    head = "ForTokenClassification"
    module_class = FlaxMPNetForTokenClassificationModule


class FlaxMPNetForQuestionAnswering(FlaxMPNetPreTrainedModel):
    """MPNet extractive question answering.

    Wraps :class:`FlaxMPNetForQuestionAnsweringModule`; arguments as :class:`FlaxMPNetPreTrainedModel`.
    """

    head = "ForQuestionAnswering"
    module_class = FlaxMPNetForQuestionAnsweringModule
