"""I-BERT in PyTorch: RoBERTa whose embeddings, linears, GELU, softmax and LayerNorm can run integer-only.

``config.quant_mode=False``: every quantized module computes its float op (``F.embedding``,
``F.linear``, exact GELU, softmax, ``F.layer_norm``) and the model is RoBERTa (post-LN, padding-aware
positions).  ``config.quant_mode=True``: the integer kernels of :mod:`nezha_zoo.pt.quant`, with the bit
widths of transformers' ``modeling_ibert.py``; ``config.force_dequant`` keeps GELU, softmax, LayerNorm
or all three (``"nonlinear"``) in float.  Hidden states between modules are ``(x, scale)`` pairs with
``x = q * scale`` (``scale`` None in float mode), as in transformers.

The module tree mirrors transformers' (so the state dict, quantization buffers included, is the spec's
and transformers' checkpoints load as they are):
``embeddings.{word,token_type,position}_embeddings`` (``QuantEmbedding``), ``embeddings_act1``
(applied twice: after the token types and after the positions; ``embeddings_act2`` exists but is
unused, as in transformers), ``LayerNorm`` (``IntLayerNorm``), ``output_activation``; per layer
``attention.self.{query,key,value}`` + ``{query,key,value,output}_activation`` + ``softmax``,
``attention.output.{dense,ln_input_act,LayerNorm,output_activation}``, ``pre_intermediate_act``,
``intermediate.{dense,intermediate_act_fn,output_activation}``, ``pre_output_act``,
``output.{dense,ln_input_act,LayerNorm,output_activation}``.  Heads and the pooler are float layers,
the shared ones of :mod:`nezha_zoo.pt.heads`.

Calibration: in ``train()`` mode every ``QuantAct`` updates its ``x_min``/``x_max`` range (also in
float mode); run a few training-mode forwards (dropout off: ``hidden_dropout_prob=0``, or under
``torch.no_grad()`` with the model in train mode) on representative inputs, then ``eval()``.  Without
calibration the ranges are +-1e-5 and quant-mode outputs are meaningless, as in transformers.
Quantization-aware fine-tuning: train in quant mode; rounding has straight-through gradients.

Eval-mode inference (quant mode, no autograd, eager, no hook on a sublayer) runs the embeddings and
each layer on integers end to end: the kernels' ``_forward_int`` chained, no dequantized tensor
between them (only each layer's output is dequantized, for the caller), over groups of sequences and
blocks of feed-forward rows whose temporaries stay cache-sized (``INT_BLOCK_BYTES``); the same
integers as the module-by-module path, which runs everywhere else (tested bit for bit).

Exactness (see :mod:`nezha_zoo.pt.quant`): every integer is exact here (the attention products
``q_int @ k_int^T`` (|.| <= head_dim * 2**14) and ``prob_int @ v_int`` (|.| <= 2**15) are exact in
float32).  transformers rounds some of its float32-emulated integers; at small sizes the requantized
tensors agree bit for bit, at roberta-base sizes rare elements differ by one quantization step.

Deliberate difference from transformers: with ``inputs_embeds`` in quant mode, transformers quantizes
the word embeddings alone and drops the token-type embeddings (``QuantAct`` ignores its ``identity``
when the input has no scale); here their sum is quantized.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nezha_zoo.families.ibert import (
    ACT_BIT,
    BIAS_BIT,
    EMBEDDING_ACT_BIT,
    EMBEDDING_BIT,
    HEADS_WITH_POOLER,
    IBERT,
    INT_BLOCK_BYTES,
    LN_INPUT_BIT,
    LN_OUTPUT_BIT,
    WEIGHT_BIT,
    IBertConfig,
)
from nezha_zoo.outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from nezha_zoo.pt.heads import (
    MLM_LABELS_DOC,
    QA_LABELS_DOC,
    SEQUENCE_LABELS_DOC,
    TOKEN_LABELS_DOC,
    BertPooler,
    ClassificationHead,
    RobertaLMHead,
    masked_lm_output,
    multiple_choice_output,
    question_answering_output,
    sequence_classification_output,
    token_classification_output,
)
from nezha_zoo.pt.layers import padding_aware_position_ids, sequential_position_ids
from nezha_zoo.pt.modeling_utils import PreTrainedModel, prepare_encoder_inputs
from nezha_zoo.pt.quant import (
    EvalConstants,
    IntGELU,
    IntLayerNorm,
    IntSoftmax,
    QuantAct,
    QuantEmbedding,
    QuantLinear,
    attach_integer,
    integer_of,
    round_ste,
)
from nezha_zoo.spec.param import ModelSpec
from nezha_zoo.spec.positions import padding_aware_max_length
from nezha_zoo.validation import InputError

__all__ = [
    "IBertPreTrainedModel",
    "IBertModel",
    "IBertForMaskedLM",
    "IBertForSequenceClassification",
    "IBertForMultipleChoice",
    "IBertForTokenClassification",
    "IBertForQuestionAnswering",
]

Scaled = tuple[torch.Tensor, "torch.Tensor | None"]
IntPair = tuple[torch.Tensor, torch.Tensor]  # (exact integers in an integer dtype, their scale)


def _linear(config: IBertConfig, in_dim: int, out_dim: int) -> QuantLinear:
    return QuantLinear(
        in_dim, out_dim, weight_bit=WEIGHT_BIT, bias_bit=BIAS_BIT, per_channel=True, quant_mode=config.quant_mode
    )


def _act(config: IBertConfig, bits: int = ACT_BIT) -> QuantAct:
    return QuantAct(bits, quant_mode=config.quant_mode)


def _layer_norm(config: IBertConfig) -> IntLayerNorm:
    return IntLayerNorm(
        config.hidden_size,
        eps=config.layer_norm_eps,
        output_bit=LN_OUTPUT_BIT,
        quant_mode=config.quant_mode,
        force_dequant=config.force_dequant,
    )


def _on_integers(module: nn.Module) -> bool:
    """Whether ``module`` may run on integers end to end (its ``_forward_int``): eval mode, no
    autograd, eager (not traced or compiled), and no hook below it (that path calls no sublayer's
    ``forward``, so their hooks would not run)."""
    if module.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module)


def _blocks(total: int, unit_bytes: int) -> list[slice]:
    """``total`` units (sequences or rows) as equal blocks whose temporaries, ``unit_bytes`` a unit,
    stay within :data:`INT_BLOCK_BYTES` per intra-op thread (one unit at least)."""
    count = -(-total // max(1, INT_BLOCK_BYTES * torch.get_num_threads() // unit_bytes))
    size = -(-total // max(1, count))
    return [slice(start, min(total, start + size)) for start in range(0, total, size)]


def _blockwise(run, total: int, unit_bytes: int):
    """``run(block)`` over :func:`_blocks`, stitched: ``run`` returns ``(tensors, rest)`` (each tensor
    holds the block's units on its first axis, or is None) or None (so does this).  Returns
    ``(tensors of all units, rest of the last block)``.

    PyTorch runs one op at a time: each op's pass over a cache-sized block stays in cache, and the
    blocks' temporaries are reused instead of freshly mapped."""
    out = rest = None
    for block in _blocks(total, unit_bytes):
        done = run(block)
        if done is None:
            return None
        parts, rest = done
        if block.stop - block.start == total:
            return parts, rest
        if out is None:
            out = tuple(None if p is None else p.new_empty(total, *p.shape[1:]) for p in parts)
        for whole, part in zip(out, parts):
            if whole is not None:
                whole[block] = part
    return out, rest


class IBertEmbeddings(nn.Module):
    """Word + token-type + position embeddings (16-bit sums), LayerNorm, dropout, 8-bit output.

    Forward: ``input_ids`` or ``inputs_embeds`` (B, L[, H]), ``token_type_ids`` and ``position_ids``
    (B, L) -> ``(x (B, L, H), scale (1,) or None)``.
    """

    def __init__(self, config: IBertConfig) -> None:
        super().__init__()
        H, q = config.hidden_size, config.quant_mode
        pad = config.pad_token_id
        self.word_embeddings = QuantEmbedding(config.vocab_size, H, pad, EMBEDDING_BIT, q)
        self.token_type_embeddings = QuantEmbedding(config.type_vocab_size, H, None, EMBEDDING_BIT, q)
        self.position_embeddings = QuantEmbedding(config.max_position_embeddings, H, pad, EMBEDDING_BIT, q)
        self.embeddings_act1 = _act(config, EMBEDDING_ACT_BIT)
        self.embeddings_act2 = _act(config, EMBEDDING_ACT_BIT)  # saved, never applied (transformers)
        self.LayerNorm = _layer_norm(config)
        self.output_activation = _act(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> Scaled:
        if inputs_embeds is None and _on_integers(self):
            done = self._forward_int(input_ids, token_type_ids, position_ids)
            if done is not None:
                return attach_integer(*done), done[1]
        if inputs_embeds is None:
            words, words_scale = self.word_embeddings(input_ids)
        else:
            words, words_scale = inputs_embeds, None
        types, types_scale = self.token_type_embeddings(token_type_ids)
        x, scale = self.embeddings_act1(words, words_scale, identity=types, identity_scaling_factor=types_scale)
        positions, positions_scale = self.position_embeddings(position_ids)
        x, scale = self.embeddings_act1(x, scale, identity=positions, identity_scaling_factor=positions_scale)
        x, scale = self.LayerNorm(x, scale)
        x = self.dropout(x)
        return self.output_activation(x, scale)

    @torch.no_grad()
    def _forward_int(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> IntPair | None:
        """Eval-mode :meth:`forward` of ``input_ids`` on exact integers, over groups of sequences
        (:func:`_blockwise`): ``(int8 (B, L, H), scale)``, or None where a kernel's integer rule does not
        apply."""
        B, L = input_ids.shape

        def group(block):
            done = self._forward_int_group(input_ids[block], token_type_ids[block], position_ids[block])
            return None if done is None else ((done[0],), done[1])

        done = _blockwise(group, B, 8 * L * self.LayerNorm.normalized_shape)
        return None if done is None else (done[0][0], done[1])

    def _forward_int_group(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> IntPair | None:
        words = self.word_embeddings._forward_int(input_ids)
        types = self.token_type_embeddings._forward_int(token_type_ids)
        positions = self.position_embeddings._forward_int(position_ids)
        if words is None or types is None or positions is None:
            return None
        x = self.embeddings_act1._forward_int(*words, *types)
        done = self.LayerNorm._forward_int(*self.embeddings_act1._forward_int(*x, *positions))
        return None if done is None else self.output_activation._forward_int(*done)


class IBertSelfAttention(nn.Module):
    """Multi-head self-attention with 8-bit q/k/v, integer softmax and 8-bit context.

    Quant mode: the scores are the exact integers ``q_int @ k_int^T`` with scale
    ``s_q * s_k / sqrt(head_dim)``; masked keys get ``mask / scale`` added (hugely negative, so the
    integer softmax clamps them to its smallest exponent); the context is ``prob_int @ v_int`` (after
    dropout and ``head_mask``) with scale ``2**-8 * s_v``, requantized to 8 bits.

    Forward: ``(x (B, L, H), scale)``, additive ``attention_mask`` (B, 1, 1 or L, L), ``head_mask``
    (1, heads, 1, 1) or None -> ``((context (B, L, H), scale), probs (B, heads, L, L))``.
    """

    def __init__(self, config: IBertConfig) -> None:
        super().__init__()
        H = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = H // config.num_attention_heads
        self.quant_mode = config.quant_mode
        self.query = _linear(config, H, H)
        self.key = _linear(config, H, H)
        self.value = _linear(config, H, H)
        self.query_activation = _act(config)
        self.key_activation = _act(config)
        self.value_activation = _act(config)
        self.output_activation = _act(config)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.softmax = IntSoftmax(ACT_BIT, quant_mode=config.quant_mode, force_dequant=config.force_dequant)
        self._score_scale = EvalConstants()  # s_q * s_k / sqrt(head_dim) of the frozen scales
        self._context_scale = EvalConstants()  # s_p * s_v

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, h, L, d)

    def forward(
        self,
        hidden: torch.Tensor,
        scale: torch.Tensor | None,
        attention_mask: torch.Tensor,
        head_mask: torch.Tensor | None = None,
    ) -> tuple[Scaled, torch.Tensor]:
        q, s_q = self.query_activation(*self.query(hidden, scale))
        k, s_k = self.key_activation(*self.key(hidden, scale))
        v, s_v = self.value_activation(*self.value(hidden, scale))
        # inference: the activations' exact integers (int8), reused instead of recovered from q, k, v
        q_i, k_i, v_i = integer_of(q, s_q), integer_of(k, s_k), integer_of(v, s_v)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        root = math.sqrt(self.attention_head_size)
        if self.softmax.quant_mode:
            s_scores = s_q * s_k / root
            scores_int = None
            if q_i is not None and k_i is not None:
                # exact integers: |q_int . k_int| <= head_dim * 2**14 < 2**24 (float32 product)
                prods = torch.matmul(self._heads(q_i).float(), self._heads(k_i).float().transpose(-1, -2))
                scores_int = self.softmax.mask_scores_int(prods.to(torch.int32), attention_mask, s_scores)
            if scores_int is None:
                scores_int = torch.matmul(round_ste(q / s_q), round_ste(k / s_k).transpose(-1, -2)).double()
                scores_int = scores_int + attention_mask.double() / s_scores.double()
            prob_int, s_p = self.softmax.forward_int(scores_int, s_scores)
            probs = prob_int * s_p  # (B, h, L, L) dequantized probabilities
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / root + attention_mask
            probs, s_p = self.softmax(scores, None)
        probs = self.dropout(probs)
        if head_mask is not None:
            probs = probs * head_mask
        if s_p is not None and s_v is not None:
            # prob_int @ v_int is exact in float32 (|.| <= 256 * 128); dropout/head_mask may make it fractional
            ctx_scale = s_p * s_v
            if v_i is not None and not self.training and head_mask is None:
                # probs unchanged by dropout: exact integers |prob_int @ v_int| <= 256 * 128, kept for
                # output_activation's integer requantization
                ctx_int = torch.matmul(prob_int, self._heads(v_i).float()).to(torch.int32)
                ctx_int = ctx_int.transpose(1, 2).reshape(ctx_int.shape[0], ctx_int.shape[2], -1)  # (B, L, H)
                return self.output_activation(attach_integer(ctx_int, ctx_scale), ctx_scale), probs
            context = torch.matmul(probs / s_p, round_ste(v / s_v)) * ctx_scale
        else:
            ctx_scale = None
            context = torch.matmul(probs, v)
        B, _, L, _ = context.shape
        context = context.transpose(1, 2).reshape(B, L, -1)  # (B, h, L, d) -> (B, L, H)
        return self.output_activation(context, ctx_scale), probs

    @torch.no_grad()
    def _forward_int(
        self, x: torch.Tensor, scale: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[IntPair, IntPair] | None:
        """The eval-mode forward on exact integers, without dequantizing (same integers as :meth:`forward`).

        Args:
            x (int8 Tensor (B, L, H)): the input activation's integers; ``scale`` (1,) its scale.
            attention_mask (float Tensor (B, 1, 1 or L, L)): additive mask.
        Returns:
            ``((context int8 (B, L, H), scale), (prob_int float32 (B, heads, L, L), 2**-8))``, or None
            where a kernel's integer rule does not apply (the caller then runs :meth:`forward`).
        """
        if not self.softmax.quant_mode:
            return None
        projected = []
        for linear, act in (
            (self.query, self.query_activation),
            (self.key, self.key_activation),
            (self.value, self.value_activation),
        ):
            done = linear._forward_int(x, scale)
            if done is None:
                return None
            projected.append(act._forward_int(*done))
        (q_i, s_q), (k_i, s_k), (v_i, s_v) = projected
        s_scores = self._score_scale.get((s_q, s_k), lambda: s_q * s_k / math.sqrt(self.attention_head_size))
        # exact integers: |q_int . k_int| <= head_dim * 2**14 < 2**24 (float32 product)
        prods = torch.matmul(self._heads(q_i).float(), self._heads(k_i).float().transpose(-1, -2))
        scores = self.softmax.mask_scores_int(prods.to(torch.int32), attention_mask, s_scores)
        if scores is None:
            return None
        prob_int, s_p = self.softmax.forward_int(scores, s_scores)
        ctx_scale = self._context_scale.get((s_p, s_v), lambda: s_p * s_v)
        # |prob_int @ v_int| <= 256 * 128: exact in float32
        ctx = torch.matmul(prob_int, self._heads(v_i).float()).to(torch.int32)
        ctx = ctx.transpose(1, 2).reshape(ctx.shape[0], ctx.shape[2], -1)  # (B, L, H)
        return self.output_activation._forward_int(ctx, ctx_scale), (prob_int, s_p)


class IBertResidualOutput(nn.Module):
    """``dense``, dropout, 22-bit ``ln_input_act`` adding the residual, ``LayerNorm``, 8-bit ``output_activation``.

    Both ``attention.output`` and ``output`` have this layout (``in_dim`` H or intermediate_size).
    Forward: ``(x (B, L, in_dim), scale)``, residual ``(r (B, L, H), r_scale)`` -> ``(y (B, L, H), scale)``.
    """

    def __init__(self, config: IBertConfig, in_dim: int) -> None:
        super().__init__()
        self.dense = _linear(config, in_dim, config.hidden_size)
        self.ln_input_act = _act(config, LN_INPUT_BIT)
        self.LayerNorm = _layer_norm(config)
        self.output_activation = _act(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None, residual: torch.Tensor, residual_scale: torch.Tensor | None
    ) -> Scaled:
        x, scale = self.dense(x, scale)
        x = self.dropout(x)
        x, scale = self.ln_input_act(x, scale, identity=residual, identity_scaling_factor=residual_scale)
        x, scale = self.LayerNorm(x, scale)
        return self.output_activation(x, scale)

    @torch.no_grad()
    def _forward_int(
        self, x: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor, residual_scale: torch.Tensor
    ) -> IntPair | None:
        """Eval-mode :meth:`forward` on exact integers (int8 ``x`` and ``residual``): ``(int8 (..., H),
        scale)``, or None where a kernel's integer rule does not apply."""
        done = self.dense._forward_int(x, scale)
        if done is None:
            return None
        done = self.LayerNorm._forward_int(*self.ln_input_act._forward_int(*done, residual, residual_scale))
        return None if done is None else self.output_activation._forward_int(*done)


class IBertAttention(nn.Module):
    """``self`` (:class:`IBertSelfAttention`) and ``output`` (:class:`IBertResidualOutput`)."""

    def __init__(self, config: IBertConfig) -> None:
        super().__init__()
        self.self = IBertSelfAttention(config)
        self.output = IBertResidualOutput(config, config.hidden_size)

    def forward(self, hidden, scale, attention_mask, head_mask=None) -> tuple[Scaled, torch.Tensor]:
        (context, context_scale), probs = self.self(hidden, scale, attention_mask, head_mask)
        return self.output(context, context_scale, hidden, scale), probs

    def _forward_int(
        self, x: torch.Tensor, scale: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[IntPair, IntPair] | None:
        """Eval-mode :meth:`forward` on exact integers (see :meth:`IBertSelfAttention._forward_int`)."""
        done = self.self._forward_int(x, scale, attention_mask)
        if done is None:
            return None
        context, probs = done
        done = self.output._forward_int(*context, x, scale)
        return None if done is None else (done, probs)


class IBertIntermediate(nn.Module):
    """``dense`` (H -> intermediate), ``intermediate_act_fn`` (:class:`IntGELU`), 8-bit ``output_activation``."""

    def __init__(self, config: IBertConfig) -> None:
        super().__init__()
        self.dense = _linear(config, config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = IntGELU(quant_mode=config.quant_mode, force_dequant=config.force_dequant)
        self.output_activation = _act(config)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None) -> Scaled:
        x, scale = self.intermediate_act_fn(*self.dense(x, scale))
        return self.output_activation(x, scale)

    @torch.no_grad()
    def _forward_int(self, x: torch.Tensor, scale: torch.Tensor) -> IntPair | None:
        """Eval-mode :meth:`forward` on exact integers (int8 ``x``): ``(int8 (..., intermediate), scale)``,
        or None where a kernel's integer rule does not apply."""
        done = self.dense._forward_int(x, scale)
        if done is not None:
            done = self.intermediate_act_fn._forward_int(*done)
        return None if done is None else self.output_activation._forward_int(*done)


class IBertLayer(nn.Module):
    """One post-LN encoder layer, transformers' order: attention, ``pre_intermediate_act``,
    intermediate, ``pre_output_act``, output (whose residual is the ``pre_intermediate_act`` output).

    Forward: ``(hidden (B, L, H), scale)``, additive ``attention_mask`` (B, 1, 1 or L, L), ``head_mask``
    (1, heads, 1, 1) or None, ``output_attentions`` -> ``((hidden (B, L, H), scale), probs (B, heads, L,
    L))``; ``probs`` may be None when ``output_attentions`` is False.  In eval inference (quant mode,
    no autograd) the layer runs on integers end to end (:meth:`_forward_int`).
    """

    def __init__(self, config: IBertConfig) -> None:
        super().__init__()
        self.attention = IBertAttention(config)
        self.intermediate = IBertIntermediate(config)
        self.output = IBertResidualOutput(config, config.intermediate_size)
        self.pre_intermediate_act = _act(config)
        self.pre_output_act = _act(config)

    def forward(
        self, hidden, scale, attention_mask, head_mask=None, output_attentions: bool = True
    ) -> tuple[Scaled, torch.Tensor | None]:
        q = self._integers(hidden, scale) if head_mask is None else None
        done = None if q is None else self._forward_int(q, scale, attention_mask, output_attentions)
        if done is not None:
            (q, scale), probs = done
            return (attach_integer(q, scale), scale), None if probs is None else probs[0] * probs[1]
        (attn, attn_scale), probs = self.attention(hidden, scale, attention_mask, head_mask)
        attn, attn_scale = self.pre_intermediate_act(attn, attn_scale)
        inter, inter_scale = self.pre_output_act(*self.intermediate(attn, attn_scale))
        return self.output(inter, inter_scale, attn, attn_scale), probs

    def _integers(self, hidden: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor | None:
        """The int8 integers behind ``hidden`` where the layer can run on integers end to end
        (quant mode, :func:`_on_integers`, an int8 activation attached), else None."""
        if scale is None or not _on_integers(self):
            return None
        q = integer_of(hidden, scale)
        return q if q is not None and q.dtype == torch.int8 else None

    @torch.no_grad()
    def _forward_int(
        self, x: torch.Tensor, scale: torch.Tensor, attention_mask: torch.Tensor, output_attentions: bool = True
    ) -> tuple[IntPair, IntPair | None] | None:
        """The eval-mode layer on exact integers: the same integers as :meth:`forward`, computed
        without dequantizing between kernels, over groups of sequences and, for the token-by-token
        feed-forward part, blocks of rows (:func:`_blockwise`).

        Args:
            x (int8 Tensor (B, L, H)), scale (float32 (1,)): the layer input's integers and scale.
            attention_mask (float Tensor (B or 1, 1, 1 or L, L)): additive mask.
            output_attentions (bool): also return the probabilities' integers.
        Returns:
            ``((int8 (B, L, H), scale), (prob_int float32 (B, heads, L, L), 2**-8) or None)``, or None
            where a kernel's integer rule does not apply (the caller then runs :meth:`forward`).
        """
        B, L, H = x.shape

        def group(block):
            mask = attention_mask if attention_mask.shape[0] == 1 else attention_mask[block]
            done = self._forward_int_group(x[block], scale, mask)
            if done is None:
                return None
            (q, out_scale), (prob_int, s_p) = done
            return (q, prob_int if output_attentions else None), (out_scale, s_p)

        # a sequence's widest temporaries: float64 rows of the projections, int64 scores
        done = _blockwise(group, B, 8 * L * max(H, self.attention.self.num_attention_heads * L))
        if done is None:
            return None
        (q, probs), (out_scale, s_p) = done
        return (q, out_scale), None if probs is None else (probs, s_p)

    def _forward_int_group(
        self, x: torch.Tensor, scale: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[IntPair, IntPair] | None:
        """:meth:`_forward_int` of one group of sequences, the feed-forward part over row blocks."""
        done = self.attention._forward_int(x, scale, attention_mask)
        if done is None:
            return None
        (attn, attn_scale), probs = done
        attn, attn_scale = self.pre_intermediate_act._forward_int(attn, attn_scale)
        rows = attn.reshape(-1, attn.shape[-1])

        def feed_forward(block):
            part = rows[block]
            done = self.intermediate._forward_int(part, attn_scale)
            if done is not None:
                done = self.output._forward_int(*self.pre_output_act._forward_int(*done), part, attn_scale)
            return None if done is None else ((done[0],), done[1])

        done = _blockwise(feed_forward, rows.shape[0], 8 * self.intermediate.dense.out_features)
        if done is None:
            return None
        (out,), out_scale = done
        return (out.view(attn.shape), out_scale), probs


class IBertEncoder(nn.Module):
    """``layer``: ``num_hidden_layers`` :class:`IBertLayer`.

    ``gradient_checkpointing`` (set by ``gradient_checkpointing_enable()``) recomputes each layer in the
    backward pass (``torch.utils.checkpoint``, non-reentrant), in float and quant mode.  In training
    mode the forward is stateful (every ``QuantAct`` updates its range, ``IntLayerNorm`` may raise its
    ``shift``), so the recomputation replays the calibration from the state the original forward
    started from (:func:`_calibration_replay`): the recomputed tensors, the gradients and the ranges
    after the step equal those without checkpointing (tested).
    """

    def __init__(self, config: IBertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(IBertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False


def _calibration_replay(layer: nn.Module) -> tuple[Any, Any]:
    """``context_fn`` of the checkpoint: the recomputation starts from the calibration state the
    original forward started from (each ``QuantAct``'s ``x_min``/``x_max``/``act_scaling_factor``,
    each ``IntLayerNorm``'s ``shift``), so it repeats the same updates with the same ops (the same
    tensors saved for backward: torch's checkpoint requires it) and recomputes the same values; the
    state the original forward left is put back afterwards (range updates happen once per step)."""
    state = [b for m in layer.modules() if isinstance(m, (QuantAct, IntLayerNorm)) for b in m.buffers(recurse=False)]
    before: list[torch.Tensor] = []

    @contextlib.contextmanager
    def forward():
        before[:] = [b.clone() for b in state]
        yield

    @contextlib.contextmanager
    def recompute():
        after = [b.clone() for b in state]
        with torch.no_grad():
            for b, v in zip(state, before):
                b.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, v in zip(state, after):
                    b.copy_(v)

    return forward(), recompute()


def _checkpointed(layer: nn.Module, *args: Any) -> tuple[Scaled, torch.Tensor]:
    return checkpoint(layer, *args, use_reentrant=False, context_fn=lambda: _calibration_replay(layer))


_ARGS_DOC = """
    Forward arguments (B = batch, L = sequence length <= max_position_embeddings - pad_token_id - 1;
    all optional except one of ``input_ids`` / ``inputs_embeds``):
        input_ids (LongTensor (B, L)): token ids in ``[0, vocab_size)``; ``pad_token_id`` marks padding
            for the positions.
        attention_mask ((B, L) or (B, L, L)): 1 = attend, 0 = padding; ones when omitted.
        token_type_ids (LongTensor (B, L)): segment ids; zeros when omitted.
        position_ids (LongTensor (B, L)): RoBERTa-style from the ids when omitted (padding at
            ``pad_token_id``, tokens from ``pad_token_id + 1``); ``pad + 1 .. pad + L`` with ``inputs_embeds``.
        head_mask ((heads,) or (layers, heads)): multiplies attention probabilities.
        inputs_embeds ((B, L, hidden_size)): instead of ``input_ids``.
        output_attentions / output_hidden_states / return_dict (bool): config defaults when None.
"""


class IBertPreTrainedModel(PreTrainedModel):
    """Base of the I-BERT classes (family ``"ibert"``).

    Parameters and the persistent quantization buffers come from ``nezha_zoo.families.ibert.ibert_spec``
    (buffers start at transformers' constants: ``x_min = -1e-5``, ``x_max = 1e-5``, zeros elsewhere).
    """

    family = IBERT
    config_class = IBertConfig

    @property
    def quant_mode(self) -> bool:
        return self.config.quant_mode

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None) -> None:
        """Not supported (as in transformers): the quantization state is tied to the table size."""
        raise NotImplementedError("resize_token_embeddings is not supported for I-BERT")


def _check_length(config: IBertConfig, seq_len: int) -> None:
    limit = padding_aware_max_length(config.max_position_embeddings, config.pad_token_id)
    if seq_len > limit:
        raise InputError(
            f"sequence of length {seq_len} exceeds the longest I-BERT input, max_position_embeddings - "
            f"pad_token_id - 1 = {limit} (positions start at pad_token_id + 1)"
        )


class IBertModel(IBertPreTrainedModel):
    """The I-BERT encoder with an optional pooler (float ``dense`` + tanh on the first token).

    Args:
        config (IBertConfig): model configuration (``quant_mode``, ``force_dequant``).
        add_pooling_layer (bool): build ``pooler``.
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + """
    Returns BaseModelOutputWithPooling: ``last_hidden_state`` (B, L, hidden_size) (dequantized in quant
    mode), ``pooler_output`` (B, hidden_size) or None, ``hidden_states`` (layers + 1 tensors),
    ``attentions`` (layers tensors (B, heads, L, L)).  ``return_dict=False`` gives transformers' tuple.
    """
    )

    head = "Model"

    def __init__(self, config: IBertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = IBertEmbeddings(config)
        self.encoder = IBertEncoder(config)
        self.pooler = BertPooler(config.hidden_size) if add_pooling_layer else None
        self.post_init()

    @property
    def spec(self) -> ModelSpec:
        spec = super().spec
        if self.pooler is not None:
            return spec
        params = tuple(p for p in spec if not p.name.startswith("pooler."))
        return ModelSpec(spec.family, spec.head, spec.base_prefix, params, spec.ties, spec.ignored)

    def set_input_embeddings(self, value: QuantEmbedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple[Any, ...]:
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        cfg = self.config
        output_attentions, output_hidden_states, return_dict = self._resolve_flags(
            output_attentions, output_hidden_states, return_dict
        )
        prep = prepare_encoder_inputs(
            cfg,
            input_ids,
            inputs_embeds,
            attention_mask,
            token_type_ids,
            head_mask,
            None,
            None,
            None,
            None,
            dtype=torch.float32,
            position_ids=position_ids,
            embed_width=cfg.hidden_size,
        )
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if position_ids is None:
            _check_length(cfg, prep.seq_len)
            if input_ids is not None:
                position_ids = padding_aware_position_ids(input_ids, cfg.pad_token_id)  # (B, L)
            else:
                position_ids = sequential_position_ids(inputs_embeds.shape, cfg.pad_token_id, device)
        if token_type_ids is None:
            token_type_ids = torch.zeros((prep.batch, prep.seq_len), dtype=torch.long, device=device)
        hidden, scale = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        all_hidden: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        attentions: tuple[torch.Tensor, ...] | None = () if output_attentions else None
        checkpointing = self.encoder.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.encoder.layer):
            if all_hidden is not None:
                all_hidden += (hidden,)
            layer_head_mask = prep.head_mask[i] if prep.head_mask is not None else None
            args = (hidden, scale, prep.attention_mask, layer_head_mask)
            if checkpointing:
                (hidden, scale), probs = _checkpointed(layer, *args)
            else:
                (hidden, scale), probs = layer(*args, output_attentions=attentions is not None)
            if attentions is not None:
                attentions += (probs,)
        if all_hidden is not None:
            all_hidden += (hidden,)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        if not return_dict:
            return (hidden, pooled) + tuple(v for v in (all_hidden, attentions) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden, pooler_output=pooled, hidden_states=all_hidden, attentions=attentions
        )


# --- heads ---------------------------------------------------------------------------------------


def _base_for(head: str, config: IBertConfig) -> IBertModel:
    return IBertModel(config, add_pooling_layer=head in HEADS_WITH_POOLER)


class IBertForMaskedLM(IBertPreTrainedModel):
    """I-BERT with the float masked-LM head ``lm_head`` (dense, gelu, layer_norm, decoder tied to the
    word embeddings, bias): logits (B, L, vocab_size).

    Args:
        config (IBertConfig): model configuration.
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + MLM_LABELS_DOC

    head = "ForMaskedLM"

    def __init__(self, config: IBertConfig) -> None:
        super().__init__(config)
        self.ibert = _base_for(self.head, config)
        self.lm_head = RobertaLMHead(config, activation="gelu")
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MaskedLMOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals())
        logits = self.lm_head(base.last_hidden_state)  # (B, L, vocab)
        return self._finish(masked_lm_output(logits, base, labels), return_dict)


class IBertForSequenceClassification(IBertPreTrainedModel):
    """I-BERT with ``classifier`` (dropout, dense, tanh, dropout, out_proj) on the first token: (B, num_labels).

    Args:
        config (IBertConfig): model configuration (``num_labels``, ``problem_type``).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + SEQUENCE_LABELS_DOC

    head = "ForSequenceClassification"

    def __init__(self, config: IBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.ibert = _base_for(self.head, config)
        self.classifier = ClassificationHead(config, activation="tanh")
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals())
        logits = self.classifier(base.last_hidden_state)  # (B, num_labels)
        out = sequence_classification_output(logits, base, labels, self.num_labels, self.config.problem_type)
        return self._finish(out, return_dict)


class IBertForMultipleChoice(IBertPreTrainedModel):
    """I-BERT scoring C choices: dropout + ``classifier`` (H -> 1) on each pooled output; logits (B, C).

    Args:
        config (IBertConfig): model configuration.
    """

    __doc__ = (
        (__doc__ or "")
        + """
    Forward arguments (transformers' order: ``input_ids, token_type_ids, attention_mask, labels,
    position_ids, head_mask, inputs_embeds, ...``) are the other heads' with a choices axis:
    ``input_ids``, ``token_type_ids``, ``attention_mask``, ``position_ids`` (B, C, L);
    ``inputs_embeds`` (B, C, L, hidden_size); ``labels`` (B,) the right choice (cross-entropy).
    """
    )

    head = "ForMultipleChoice"

    def __init__(self, config: IBertConfig) -> None:
        super().__init__(config)
        self.ibert = _base_for(self.head, config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MultipleChoiceModelOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base, num_choices = self._run_base_choices(locals())
        logits = self.classifier(self.dropout(base.pooler_output))  # (B * C, 1)
        out = multiple_choice_output(logits, num_choices, base, labels)  # logits (B, C)
        return self._finish(out, return_dict)


class IBertForTokenClassification(IBertPreTrainedModel):
    """I-BERT with dropout + a per-token ``classifier``: logits (B, L, num_labels).

    Args:
        config (IBertConfig): model configuration (``num_labels``).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + TOKEN_LABELS_DOC

    head = "ForTokenClassification"

    def __init__(self, config: IBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.ibert = _base_for(self.head, config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> TokenClassifierOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals())
        out = token_classification_output(self.dropout, self.classifier, base, labels)
        return self._finish(out, return_dict)


class IBertForQuestionAnswering(IBertPreTrainedModel):
    """I-BERT with ``qa_outputs`` (H -> 2): span start and end logits, each (B, L).

    Args:
        config (IBertConfig): model configuration (``num_labels`` = 2).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + QA_LABELS_DOC

    head = "ForQuestionAnswering"

    def __init__(self, config: IBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.ibert = _base_for(self.head, config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> QuestionAnsweringModelOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals())
        out = question_answering_output(self.qa_outputs, base, start_positions, end_positions)
        return self._finish(out, return_dict)
