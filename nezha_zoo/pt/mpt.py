"""MPT in PyTorch: a decoder-only pre-LN transformer with ALiBi, a fused QKV projection and a KV cache.

The computation at transformers' defaults is transformers 4.57.6's ``modeling_mpt.py``
(hf_implementation_notes §1.6):

* ``wte`` embeddings, no position table; each block is ``x + attn(norm_1(x))`` then
  ``h + ffn(norm_2(h))``; a final ``norm_f``; LayerNorms without bias, linear layers without bias;
* attention: ``Wqkv`` gives query | key | value, optionally clamped to ``+-clip_qkv``; scores
  ``q k^T * softmax_scale`` plus the ALiBi bias ``slope_h * (j - (K - 1))`` for key ``j`` of ``K``
  (it depends on the key index only: softmax is invariant to a per-row constant, so this equals the
  causal form ``-slope_h * (i - j)``); causal and padding positions are *replaced* by
  ``finfo.min`` (so a row with no visible key is uniform over all keys, as in transformers); softmax
  in float32; dropout ``attn_pdrop`` on the probabilities, the attention output and the MLP output;
* ``lm_head`` tied to ``wte``.

The MosaicML (llm-foundry) settings transformers ignores are honoured here, and at their defaults
change nothing: ``expansion_ratio`` (MLP width), ``no_bias=False`` (biases on every linear layer and
LayerNorm of the base model), ``attn_config.alibi_bias_max`` (slopes), ``clip_qkv``, ``qk_ln``
(``q_ln`` / ``k_ln`` on the full query and key projections, after clipping, before the heads are
split), ``softmax_scale``, ``attn_type="multiquery_attention"`` (one key/value head shared by all
query heads) and ``logit_scale`` (multiplies the causal-LM logits; ``"inv_sqrt_d_model"`` is
``1 / sqrt(d_model)``).  ``emb_pdrop``, ``resid_pdrop`` and ``embedding_fraction`` are kept in the
config but, as in transformers, do not act; ALiBi is used even with ``attn_config.alibi=False``
(llm-foundry's learned positions are not implemented), with a warning.

Key/value cache: a tuple per layer of ``(key, value)``, each ``(B, kv_heads, past, head_dim)``
(``kv_heads`` is 1 for multi-query attention); ``attention_mask`` covers cached + new positions.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nezha_zoo.config import classifier_dropout_rate
from nezha_zoo.families.mpt import MPT, MptConfig
from nezha_zoo.generation import keep_last_positions
from nezha_zoo.outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from nezha_zoo.pt import losses
from nezha_zoo.pt.generation import GenerationMixin
from nezha_zoo.pt.heads import (
    POSITIONS_TO_KEEP_DOC,
    QA_LABELS_DOC,
    SEQUENCE_LABELS_DOC,
    TOKEN_LABELS_DOC,
    VocabProjection,
    question_answering_output,
    token_classification_output,
)
from nezha_zoo.pt.layers import (
    PackedLinear,
    append_to_cache,
    check_positions_to_keep,
    dropout_kept_rows,
    fused_attention,
    keep_positions,
)
from nezha_zoo.pt.modeling_utils import PreTrainedModel, validate_inputs
from nezha_zoo.spec.pooling import can_keep_positions
from nezha_zoo.validation import InputError, check_length

logger = logging.getLogger("nezha_zoo")

__all__ = [
    "alibi_slopes",
    "alibi_bias",
    "alibi_mask",
    "causal_visibility",
    "MptAttention",
    "MptMLP",
    "MptBlock",
    "MptPreTrainedModel",
    "MptModel",
    "MptForCausalLM",
    "MptForSequenceClassification",
    "MptForTokenClassification",
    "MptForQuestionAnswering",
]

LayerPast = tuple[torch.Tensor, torch.Tensor]


# --- ALiBi and masks -----------------------------------------------------------------------------


def alibi_slopes(num_heads: int, alibi_bias_max: int = 8, device: torch.device | None = None) -> torch.Tensor:
    """ALiBi slopes (num_heads,) float32, as MosaicML defines them.

    With ``P`` the next power of two ``>= num_heads``: ``slope_k = 2 ** -(k * alibi_bias_max / P)``
    for ``k = 1..P``; when ``P != num_heads`` the odd-indexed slopes come first, then the even ones,
    cut to ``num_heads`` (so 6 heads at 8: 1/4, 1/16, 1/64, 1/256, 1/2, 1/8).
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    pow2 = 2 ** math.ceil(math.log2(num_heads))
    exponents = torch.arange(1, pow2 + 1, dtype=torch.float32, device=device) * (alibi_bias_max / pow2)
    slopes = 1.0 / torch.pow(2, exponents)
    if pow2 != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def alibi_bias(slopes: torch.Tensor, key_length: int) -> torch.Tensor:
    """The additive ALiBi bias (1, H, 1, K): ``slope_h * (j - (K - 1))`` for key ``j``.

    Keys count from the first position (cached ones included), so a prefix + cached continuation gets
    the same per-row offsets as the full pass.
    """
    # int32 offsets times float32 slopes: the exact values transformers builds (then slices).
    offsets = torch.arange(1 - key_length, 1, dtype=torch.int32, device=slopes.device)  # (K,)
    return (offsets[None, :] * slopes[:, None])[None, :, None, :]  # (H, K) -> (1, H, 1, K)


def alibi_mask(alibi: torch.Tensor, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi and the visibility as one additive mask (B, H, L, K) in ``dtype``: the bias where a key is
    visible, ``finfo(dtype).min`` where not (so a row with no visible key stays uniform, as with
    ``masked_fill``)."""
    return torch.where(visible, alibi.to(dtype), torch.finfo(dtype).min)


def causal_visibility(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Which keys each new position may attend to: (B, 1, Lq, K) bool.

    Args:
        attention_mask (Tensor (B, K)): 1 = real token, 0 = padding, over cached + new positions.
        query_length (int): new positions ``Lq``, the last ``Lq`` of the ``K`` keys.

    Query ``i`` sees key ``j`` when ``j <= past + i`` and ``attention_mask[:, j]`` is set.
    """
    key_length = attention_mask.shape[-1]
    past = key_length - query_length
    q_pos = torch.arange(query_length, device=attention_mask.device)[:, None] + past  # (Lq, 1)
    k_pos = torch.arange(key_length, device=attention_mask.device)[None, :]  # (1, K)
    causal = k_pos <= q_pos  # (Lq, K)
    return causal[None, None] & (attention_mask != 0)[:, None, None, :]  # (B, 1, Lq, K)


# --- layers --------------------------------------------------------------------------------------


class MptAttention(nn.Module):
    """MPT self-attention: fused ``Wqkv``, optional clipping and ``q_ln`` / ``k_ln``, ALiBi, ``out_proj``.

    Args:
        config (MptConfig): ``d_model``, ``n_heads``, ``no_bias``, ``layer_norm_epsilon`` and
            ``attn_config`` (``attn_type``, ``clip_qkv``, ``qk_ln``, ``softmax_scale``, ``attn_pdrop``).

    Forward:
        hidden_states (Tensor (B, L, d_model)): the normalised block input.
        alibi (Tensor (1, H, 1, K)): ALiBi bias over the ``K = past + L`` keys; or, with ``visible``
            None, the whole additive mask (B, H, L, K): ALiBi where visible, ``finfo.min`` elsewhere
            (see :func:`alibi_mask`), and the attention runs as one fused kernel without probabilities.
        visible (Tensor (B, 1, L, K) bool | None): which keys each query may attend to.
        layer_past (tuple of two Tensors (B, kv_heads, past, head_dim) | None): cached key, value.
        use_cache (bool): also return the keys and values over all ``K`` positions.
        positions_to_keep (Tensor (B, R) int | None): queries at these rows only (keys and values at
            every row; the query projection on the R rows only); the bias and visibility are taken at
            those rows and the probabilities' dropout mask is drawn at the full shape.

    Returns ``(output (B, L or R, d_model), probs (B, H, L or R, K) or None, present (key, value) or None)``.
    """

    def __init__(self, config: MptConfig) -> None:
        super().__init__()
        ac = config.attn_config
        d, bias = config.d_model, not config.no_bias
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.kv_width = config.qkv_widths[1]  # query | key | value rows of Wqkv: d, kv_width, kv_width
        self.kv_heads = self.kv_width // self.head_dim
        self.softmax_scale = ac.softmax_scale if ac.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.clip_qkv = ac.clip_qkv
        self.Wqkv = PackedLinear(d, d + 2 * self.kv_width, bias=bias)
        if ac.qk_ln:
            self.q_ln = nn.LayerNorm(d, eps=config.layer_norm_epsilon, bias=bias)
            self.k_ln = nn.LayerNorm(self.kv_width, eps=config.layer_norm_epsilon, bias=bias)
        self.out_proj = PackedLinear(d, d, bias=bias)
        self.attn_dropout = nn.Dropout(ac.attn_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        alibi: torch.Tensor,
        visible: torch.Tensor | None,
        layer_past: LayerPast | None = None,
        use_cache: bool = False,
        positions_to_keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, LayerPast | None]:
        B, L, d = hidden_states.shape
        keep = positions_to_keep
        proj = self.Wqkv
        if keep is not None and not (proj._forward_hooks or proj._forward_pre_hooks):
            # The query rows of Wqkv on the kept rows only, its key/value rows on every row.  (A hooked
            # projection, LoRA's, runs whole so that its hooks see the whole input.)
            w, b = proj.weight, proj.bias
            query = F.linear(keep_positions(hidden_states, keep), w[:d], None if b is None else b[:d])  # (B, R, d)
            kv = F.linear(hidden_states, w[d:], None if b is None else b[d:])  # (B, L, 2 * kv_width)
            if self.clip_qkv:
                query = query.clamp(min=-self.clip_qkv, max=self.clip_qkv)
                kv = kv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
            key, value = kv.split([self.kv_width, self.kv_width], dim=-1)
        else:
            qkv = proj(hidden_states)  # (B, L, d + 2 * kv_width)
            if self.clip_qkv:
                qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
            query, key, value = qkv.split([d, self.kv_width, self.kv_width], dim=-1)
            if keep is not None:
                query = keep_positions(query, keep)  # (B, R, d)
        if keep is not None:
            alibi = keep_positions(alibi, keep, dim=2)  # (B, H, R, K) or (1, H, 1, K)
            visible = None if visible is None else keep_positions(visible, keep, dim=2)  # (B, 1, R, K)
        if hasattr(self, "q_ln"):
            # llm-foundry normalises the whole projections, before the heads are split.
            query, key = self.q_ln(query), self.k_ln(key)
        Lq = query.shape[1]
        query = query.view(B, Lq, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, Lq, hd)
        key = key.view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kv_heads, L, hd)
        value = value.view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        if layer_past is not None:
            key = append_to_cache(layer_past[0], key)  # (B, kv_heads, past + L, hd)
            value = append_to_cache(layer_past[1], value)
        present = (key, value) if use_cache else None
        if visible is None:
            p = self.attn_dropout.p if self.training else 0.0
            gqa = self.kv_heads != self.n_heads
            context = fused_attention(
                query, key, value, alibi, self.softmax_scale, p, gqa, positions_to_keep=keep, query_len=L
            )  # (B, H, Lq, hd)
            return self.out_proj(context.transpose(1, 2).reshape(B, Lq, d)), None, present  # (B, Lq, H * hd)
        # One key/value head broadcasts over all query heads (multi-query attention).
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.softmax_scale  # (B, H, L, K)
        scores = scores + alibi
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
        if keep is None:
            probs = self.attn_dropout(probs)
        else:
            probs = dropout_kept_rows(probs, keep, L, self.attn_dropout.p, self.training, dim=2)
        context = torch.matmul(probs, value)  # (B, H, Lq, hd)
        context = context.transpose(1, 2).reshape(B, Lq, d)  # (B, Lq, H * hd)
        return self.out_proj(context), probs, present


class MptMLP(nn.Module):
    """``up_proj`` (d_model -> expansion_ratio * d_model), exact GELU, ``down_proj`` back.

    Forward: (B, L, d_model) -> (B, L, d_model).
    """

    def __init__(self, config: MptConfig) -> None:
        super().__init__()
        width, bias = config.expansion_ratio * config.d_model, not config.no_bias
        self.up_proj = PackedLinear(config.d_model, width, bias=bias)
        self.down_proj = PackedLinear(width, config.d_model, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.gelu(self.up_proj(hidden_states)))


class MptBlock(nn.Module):
    """One pre-LN decoder block: ``x + drop(attn(norm_1(x)))``, then ``h + drop(ffn(norm_2(h)))``.

    Args:
        config (MptConfig): model configuration (dropout on both residual branches is
            ``attn_config.attn_pdrop``, as transformers).

    Forward: as :class:`MptAttention` with the block input ``hidden_states`` (B, L, d_model);
    returns ``(hidden (B, L, d_model), probs (B, H, L, K) or None, present or None)``.  With
    ``positions_to_keep`` (B, R) the output is those rows only (B, R, d_model): residuals, ``norm_2`` and
    the MLP on R rows, every dropout mask drawn at the full shape (:func:`dropout_kept_rows`).
    """

    def __init__(self, config: MptConfig) -> None:
        super().__init__()
        d, eps, bias = config.d_model, config.layer_norm_epsilon, not config.no_bias
        self.norm_1 = nn.LayerNorm(d, eps=eps, bias=bias)
        self.attn = MptAttention(config)
        self.norm_2 = nn.LayerNorm(d, eps=eps, bias=bias)
        self.ffn = MptMLP(config)
        self.resid_dropout = nn.Dropout(config.attn_config.attn_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        alibi: torch.Tensor,
        visible: torch.Tensor | None,
        layer_past: LayerPast | None = None,
        use_cache: bool = False,
        positions_to_keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, LayerPast | None]:
        keep = positions_to_keep
        h = self.norm_1(hidden_states)
        attn_out, probs, present = self.attn(h, alibi, visible, layer_past, use_cache, positions_to_keep=keep)
        if keep is None:
            hidden_states = hidden_states + self.resid_dropout(attn_out)
            hidden_states = hidden_states + self.resid_dropout(self.ffn(self.norm_2(hidden_states)))
            return hidden_states, probs, present
        L, p = hidden_states.shape[1], self.resid_dropout.p
        hidden_states = keep_positions(hidden_states, keep) + dropout_kept_rows(attn_out, keep, L, p, self.training)
        ffn = self.ffn(self.norm_2(hidden_states))  # (B, R, d_model)
        return hidden_states + dropout_kept_rows(ffn, keep, L, p, self.training), probs, present


# --- models --------------------------------------------------------------------------------------


def _as_layer_tuples(past_key_values: Any, config: MptConfig) -> tuple[LayerPast, ...] | None:
    """Our cache (tuple per layer of (key, value)) from itself, a list, or a transformers ``Cache``.

    Checks the layer count and that every tensor is ``(B, kv_heads, P, head_dim)`` with one ``B`` and
    ``P`` throughout; an empty cache is None.
    """
    if past_key_values is None:
        return None
    if hasattr(past_key_values, "to_legacy_cache"):  # transformers' DynamicCache holds the same tensors
        past_key_values = past_key_values.to_legacy_cache()
    if not isinstance(past_key_values, (tuple, list)):
        raise InputError(
            f"past_key_values must be a tuple per layer of (key, value), got {type(past_key_values).__name__}"
        )
    if len(past_key_values) == 0:
        return None
    if len(past_key_values) != config.n_layers:
        raise InputError(f"past_key_values has {len(past_key_values)} layers, the model has {config.n_layers}")
    kv_heads = 1 if config.attn_config.attn_type == "multiquery_attention" else config.n_heads
    want: tuple[int, ...] | None = None
    for i, layer in enumerate(past_key_values):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise InputError(f"past_key_values[{i}] must be a (key, value) pair")
        for name, t in zip(("key", "value"), layer):
            shape = tuple(t.shape)
            if want is None and len(shape) == 4:
                want = (shape[0], kv_heads, shape[2], config.head_dim)  # B and P from the first tensor
            if shape != want:
                raise InputError(
                    f"past_key_values[{i}] {name} has shape {shape}; every cached key and value must be "
                    f"(batch, kv_heads={kv_heads}, cached positions, head_dim={config.head_dim})"
                    + (f" with the first one's batch and length: {want}" if want else "")
                )
    return tuple((k, v) for k, v in past_key_values)


class MptPreTrainedModel(PreTrainedModel):
    """Base of the MPT classes (family ``"mpt"``).

    ALiBi is always on, as in transformers and the TF and Flax backends: with
    ``attn_config.alibi=False`` llm-foundry would use learned positions (``wpe``), which the spec does
    not declare; such a config is accepted with a warning.
    """

    family = MPT
    config_class = MptConfig

    def __init__(self, config: MptConfig) -> None:
        super().__init__(config)
        if not config.attn_config.alibi:
            logger.warning(
                "MptConfig.attn_config.alibi=False is not honoured: ALiBi is used, as transformers does "
                "(llm-foundry's learned position embeddings are not implemented)"
            )


_ARGS_DOC = """
    Forward arguments (B = batch, L = new positions, P = cached positions, P + L <= max_seq_len; one of
    ``input_ids`` / ``inputs_embeds`` is required):
        input_ids (LongTensor (B, L)): token ids in ``[0, vocab_size)``.
        past_key_values (tuple per layer of (key, value), each (B, kv_heads, P, head_dim)): cache of
            earlier positions (a transformers ``DynamicCache`` is accepted too).
        attention_mask ((B, P + L)): 1 = real token, 0 = padding, over cached + new positions; ones
            when omitted.  Left or right padding.
        inputs_embeds ((B, L, d_model)): instead of ``input_ids``.
        use_cache (bool): return ``past_key_values``; ``config.use_cache`` when None.
        output_attentions / output_hidden_states / return_dict (bool): config defaults when None.
"""


class MptModel(MptPreTrainedModel):
    """The MPT decoder: ``wte``, ``blocks``, ``norm_f``.

    Args:
        config (MptConfig): model configuration.

    Returns BaseModelOutputWithPastAndCrossAttentions: ``last_hidden_state`` (B, L, d_model) after
    ``norm_f``; ``past_key_values`` (with ``use_cache``); ``hidden_states`` (n_layers + 1 tensors: the
    embeddings, each block's input after the first, and the final normalised output, as
    transformers); ``attentions`` (B, H, L, P + L) per layer.  With ``positions_to_keep`` (B, R),
    ``last_hidden_state`` is (B, R, d_model): those rows of each sequence.
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + POSITIONS_TO_KEEP_DOC

    head = "Model"

    def __init__(self, config: MptConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList([MptBlock(config) for _ in range(config.n_layers)])
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=not config.no_bias)
        self.gradient_checkpointing = False
        self.post_init()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: tuple[LayerPast, ...] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        positions_to_keep: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPastAndCrossAttentions | tuple[Any, ...]:
        cfg = self.config
        output_attentions, output_hidden_states, return_dict = self._resolve_flags(
            output_attentions, output_hidden_states, return_dict
        )
        use_cache = cfg.use_cache if use_cache is None else bool(use_cache)
        past = _as_layer_tuples(past_key_values, cfg)
        past_len = past[0][0].shape[2] if past else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            raise InputError(
                f"attention_mask must have shape (batch, cached + new positions), got {tuple(attention_mask.shape)}"
            )
        batch, seq_len = validate_inputs(
            cfg, input_ids, inputs_embeds, attention_mask, past_len=past_len, embed_width=cfg.d_model, positions=False
        )
        check_length(seq_len, past_len, cfg.max_seq_len, "max_seq_len")
        if past and past[0][0].shape[0] != batch:
            raise InputError(f"past_key_values hold {past[0][0].shape[0]} rows, the inputs {batch}")
        if positions_to_keep is not None:
            ok = can_keep_positions(
                output_hidden_states=output_hidden_states, output_attentions=output_attentions, use_cache=use_cache
            )
            check_positions_to_keep(
                positions_to_keep, batch, seq_len, pooled_ok=ok and not past, why=", and no past_key_values"
            )

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        hidden = inputs_embeds
        key_len = past_len + seq_len
        if attention_mask is None:
            attention_mask = torch.ones((batch, key_len), dtype=torch.long, device=hidden.device)
        visible = causal_visibility(attention_mask.to(hidden.device), seq_len)  # (B, 1, L, K)
        # float32 like transformers' table, whatever the model's dtype
        alibi = alibi_bias(alibi_slopes(cfg.n_heads, cfg.attn_config.alibi_bias_max, hidden.device), key_len)
        if not output_attentions:  # fused attention: the mask is built once for every block
            alibi, visible = alibi_mask(alibi, visible, hidden.dtype), None

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and use_cache:
            logger.warning("use_cache=True is incompatible with gradient checkpointing; not returning a cache")
            use_cache = False
        all_hidden: list[torch.Tensor] | None = [] if output_hidden_states else None
        all_attn: list[torch.Tensor] | None = [] if output_attentions else None
        presents: list[LayerPast] | None = [] if use_cache else None
        for i, block in enumerate(self.blocks):
            if all_hidden is not None:
                all_hidden.append(hidden)
            layer_past = past[i] if past else None
            keep = positions_to_keep if i == len(self.blocks) - 1 else None  # the last block only
            if checkpointing:
                hidden, probs, present = checkpoint(
                    block, hidden, alibi, visible, layer_past, False, keep, use_reentrant=False
                )
            else:
                hidden, probs, present = block(hidden, alibi, visible, layer_past, use_cache, keep)
            if all_attn is not None:
                all_attn.append(probs)
            if presents is not None:
                presents.append(present)
        hidden = self.norm_f(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        out = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden,
            past_key_values=tuple(presents) if presents is not None else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attn) if all_attn is not None else None,
        )
        return self._finish(out, return_dict)


def _logit_scale(config: MptConfig) -> float | None:
    """llm-foundry's ``logit_scale``: None, a number, or ``"inv_sqrt_d_model"`` = 1 / sqrt(d_model)."""
    if config.logit_scale is None:
        return None
    if config.logit_scale == "inv_sqrt_d_model":
        return 1.0 / math.sqrt(config.d_model)
    return float(config.logit_scale)


class MptForCausalLM(GenerationMixin, MptPreTrainedModel):
    """MPT language model: ``lm_head`` (tied to ``transformer.wte``) over the decoder; logits (B, L, vocab).

    Args:
        config (MptConfig): model configuration (``tie_word_embeddings``, ``logit_scale``).
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + """
        labels (LongTensor (B, L)): next-token targets (not shifted by the caller), -100 ignored.
        logits_to_keep (int): the LM head on the last this many positions only (0: all), without ``labels``.
        **kwargs: ``num_items_in_batch``, ``ignore_index``, ``shift_labels`` for the loss.

    Returns CausalLMOutputWithCrossAttentions (logits multiplied by ``logit_scale`` when set).
    """
    )

    head = "ForCausalLM"
    generation_position_rule = None  # ALiBi: no position ids, left padding works through the mask

    def __init__(self, config: MptConfig) -> None:
        super().__init__(config)
        self.transformer = MptModel(config)
        self.lm_head = VocabProjection(config.d_model, config.vocab_size, bias=False)
        self.logit_scale = _logit_scale(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: tuple[LayerPast, ...] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithCrossAttentions | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        unknown = set(kwargs) - {"num_items_in_batch", "ignore_index", "shift_labels"}
        if unknown:
            raise TypeError(f"MptForCausalLM.forward got unexpected keyword arguments {sorted(unknown)}")
        base = self._run_base(locals())
        logits = self.lm_head(keep_last_positions(base.last_hidden_state, logits_to_keep, labels))  # (B, L, vocab)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        loss = losses.causal_lm_loss(logits, labels, **kwargs) if labels is not None else None
        out = CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            past_key_values=base.past_key_values,
            hidden_states=base.hidden_states,
            attentions=base.attentions,
        )
        return self._finish(out, return_dict)


class MptForSequenceClassification(MptPreTrainedModel):
    """MPT with ``score`` (no bias) read at each row's last non-padding token: logits (B, num_labels).

    The pooled position is transformers': the rightmost position whose id is not ``pad_token_id``
    (left and right padding alike; a row of only padding pools position 0).  Without
    ``pad_token_id``, or with ``inputs_embeds``, it is the last position; a batch of more than one
    row without ``pad_token_id`` is refused.

    Args:
        config (MptConfig): model configuration (``num_labels``, ``problem_type``, ``pad_token_id``).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + SEQUENCE_LABELS_DOC

    head = "ForSequenceClassification"

    def __init__(self, config: MptConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = MptModel(config)
        self.score = nn.Linear(config.d_model, config.num_labels, bias=False)
        self.post_init()

    def _check_batch(self, batch: int) -> None:
        if self.config.pad_token_id is None and batch != 1:
            raise InputError(
                "MptForSequenceClassification needs config.pad_token_id to find each row's last token "
                f"when the batch has more than one row (got {batch} rows)"
            )

    def _last_token(self, input_ids: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | int:
        """Each row's pooled position: (B,) int32, or -1 (the last position) for every row."""
        self._check_batch(batch)
        pad = self.config.pad_token_id
        if pad is None:
            return -1
        if input_ids is None:
            logger.warning("MptForSequenceClassification cannot find padding in inputs_embeds; using the last position")
            return -1
        non_pad = (input_ids != pad).to(device=device, dtype=torch.int32)  # (B, L)
        positions = torch.arange(input_ids.shape[-1], device=device, dtype=torch.int32)
        return (positions * non_pad).argmax(-1)  # (B,) rightmost non-pad position

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: tuple[LayerPast, ...] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutputWithPast | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        lead = input_ids if input_ids is not None else inputs_embeds
        keep = last = None
        if lead is not None and lead.dim() >= 2:
            batch = lead.shape[0]
            self._check_batch(batch)  # before the model runs
            last = self._last_token(input_ids, batch, lead.device)
            rows = torch.full((batch,), lead.shape[1] - 1, device=lead.device) if isinstance(last, int) else last
            # The score reads each row's last token only: the last block computes just that row.
            keep = self._pooled_positions(locals(), last_index=rows)
        base = self._run_base(locals(), positions_to_keep=keep)
        logits = self.score(base.last_hidden_state)  # (B, L or 1, num_labels)
        batch = logits.shape[0]
        if keep is not None:
            pooled = logits[:, 0]  # (B, num_labels): the kept row
        else:
            if last is None:
                last = self._last_token(input_ids, batch, logits.device)
            pooled = logits[torch.arange(batch, device=logits.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = losses.sequence_classification_loss(pooled, labels, self.num_labels, self.config.problem_type)
        out = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled,
            past_key_values=base.past_key_values,
            hidden_states=base.hidden_states,
            attentions=base.attentions,
        )
        return self._finish(out, return_dict)


class MptForTokenClassification(MptPreTrainedModel):
    """MPT with dropout and a per-token ``classifier`` (with bias): logits (B, L, num_labels).

    Args:
        config (MptConfig): model configuration (``num_labels``; dropout ``classifier_dropout``, else
            ``hidden_dropout``, else 0.1, as transformers).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + TOKEN_LABELS_DOC

    head = "ForTokenClassification"

    def __init__(self, config: MptConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = MptModel(config)
        self.dropout = nn.Dropout(classifier_dropout_rate(config))
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: tuple[LayerPast, ...] | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> TokenClassifierOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals())
        out = token_classification_output(self.dropout, self.classifier, base, labels)
        return self._finish(out, return_dict)


class MptForQuestionAnswering(MptPreTrainedModel):
    """MPT with ``qa_outputs`` (d_model -> 2): span start and end logits, each (B, L).

    Takes no cache (transformers' signature: ``input_ids, attention_mask, inputs_embeds,
    start_positions, end_positions, output_attentions, output_hidden_states, return_dict``).

    Args:
        config (MptConfig): model configuration.
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + QA_LABELS_DOC

    head = "ForQuestionAnswering"

    def __init__(self, config: MptConfig) -> None:
        super().__init__(config)
        self.transformer = MptModel(config)
        self.qa_outputs = nn.Linear(config.d_model, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> QuestionAnsweringModelOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals(), use_cache=False)
        out = question_answering_output(self.qa_outputs, base, start_positions, end_positions)
        return self._finish(out, return_dict)
