"""The PyTorch base class: spec-driven init, ties, checkpoints, gradient checkpointing, input checks.

Everything that names a weight comes from the family's :class:`~nezha_zoo.spec.param.ModelSpec` and
``LAYOUTS["pt"]``; checkpoint reading and writing is :mod:`nezha_zoo.pretrained`'s.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from nezha_zoo.config import PretrainedConfig
from nezha_zoo.dtypes import canonical_dtype, numpy_dtype
from nezha_zoo.inputs import accepts_encodings
from nezha_zoo.outputs import OUTPUT_CLASSES, ModelOutput
from nezha_zoo.pretrained import load_weights, resized_vocab, resolve_config, save_weights
from nezha_zoo.pt.layers import encoder_attention_bias, expand_head_mask, extended_attention_mask
from nezha_zoo.pt.lora import LoraMixin
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.spec.param import Init, Kind, ModelSpec
from nezha_zoo.spec.pooling import FIRST, keeps_positions
from nezha_zoo.spec.registry import Family, register_model_class
from nezha_zoo.validation import ID_INPUTS, InputError, check_id_dtype, check_id_range, check_input_shapes, check_length

__all__ = [
    "PreTrainedModel",
    "validate_inputs",
    "EncoderInputs",
    "prepare_encoder_inputs",
    "flatten_choices",
    "BASE_ARGS",
    "CHOICE_ARGS",
]

logger = logging.getLogger("nezha_zoo")

LAYOUT = LAYOUTS["pt"]

#: The base-model arguments a head passes on (each head declares those its base model takes).
BASE_ARGS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "head_mask",
    "inputs_embeds",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "past_key_values",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
)
#: The multiple-choice inputs with a choices axis (B, C, L[, E]), flattened to (B * C, L[, E]).
CHOICE_ARGS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


def _register_outputs() -> None:
    """Make the output classes torch pytrees (torch.compile, torch.export, DataParallel gathering)."""
    from torch.utils import _pytree

    def flatten(out: ModelOutput):
        return list(out.values()), list(out.keys())

    for cls in OUTPUT_CLASSES:

        def unflatten(values, keys, cls=cls):
            return cls(**dict(zip(keys, values)))

        try:
            name = f"{cls.__module__}.{cls.__name__}"
            _pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=name)
        except ValueError:  # already registered (module re-imported)
            pass


_register_outputs()


class PreTrainedModel(LoraMixin, nn.Module):
    """Base class of every PyTorch model of the zoo.

    Subclasses set ``family`` (a :class:`~nezha_zoo.spec.registry.Family`) and ``head``
    (``"Model"``, ``"ForMaskedLM"``...), build their modules in ``__init__`` under transformers' names and end it with
    :meth:`post_init`, which ties weights, checks the module tree against the spec and initialises
    every parameter by its spec rule.

    Args:
        config (PretrainedConfig): the family's config.
    """

    family: ClassVar[Family]
    head: ClassVar[str] = "Model"
    # What the PyTorch ecosystem (transformers' Trainer, PEFT, accelerate) looks for on a model.
    #: the input a batch is keyed by (Trainer, pipelines).
    main_input_name: ClassVar[str] = "input_ids"
    #: every family's layers honour :meth:`gradient_checkpointing_enable`.
    supports_gradient_checkpointing: ClassVar[bool] = True
    #: no tensor-parallel ``parallelize()`` API (use :mod:`nezha_zoo.pt.distributed`).
    is_parallelizable: ClassVar[bool] = False
    _keys_to_ignore_on_save: ClassVar[list[str] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:  # model(enc) / model(**enc) with a tokenizer's output (nezha_zoo.inputs)
            cls.forward = accepts_encodings(cls.forward)
        register_model_class(cls, "pt")  # (family, head, "pt") -> cls for nezha_zoo.spec.model_class

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        fam = self.family
        if not isinstance(config, fam.config_class):
            raise TypeError(f"{type(self).__name__} needs a {fam.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    # --- spec ------------------------------------------------------------------------------------

    @property
    def base_model_prefix(self) -> str:
        return self.family.base_prefix

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    @property
    def _no_split_modules(self) -> list[str]:
        """Class names accelerate must keep whole on one device: the repeated blocks (layers)."""
        return sorted({type(m).__name__ for lst in self.modules() if isinstance(lst, nn.ModuleList) for m in lst})

    @property
    def device(self) -> torch.device:
        """Device of the first parameter."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the first floating-point parameter (the model's weights dtype)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @classmethod
    def can_generate(cls) -> bool:
        """Whether the class decodes with ``generate`` (its causal-LM heads)."""
        return callable(getattr(cls, "generate", None))

    @property
    def spec(self) -> ModelSpec:
        """The declaration of this class for its current config."""
        return self.family.model_spec(self.config, self.head)

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and persistent buffer by PyTorch name (tied aliases included)."""
        return dict(self.state_dict(keep_vars=True))

    def post_init(self) -> None:
        """Tie weights, check the module tree equals the spec, initialise by the spec's rules.

        A model built on the meta device (``from_pretrained``) has no values to initialise: its
        weights are allocated later, in the target dtype, and filled from the checkpoint.
        """
        self.tie_weights()
        self._check_spec()
        if not any(t.is_meta for t in self._tensors().values()):
            self.init_weights()

    def _check_spec(self) -> None:
        spec = self.spec
        want = {LAYOUT.key(p) for p in spec} | set(spec.ties)
        have = set(self.state_dict().keys())
        if want != have:
            raise RuntimeError(
                f"{type(self).__name__} does not match its spec: not built {sorted(want - have)}, "
                f"not declared {sorted(have - want)}"
            )

    def tie_weights(self) -> None:
        """Make every tied alias of the spec the very same Parameter as its target."""
        spec = self.spec
        for alias, target in spec.ties.items():
            owner_path, _, leaf = alias.rpartition(".")
            owner = self.get_submodule(owner_path)
            setattr(owner, leaf, self.get_parameter(target))

    @torch.no_grad()
    def init_weights(self, names: Collection[str] | None = None) -> None:
        """Fresh weights: N(0, initializer_range) or the ``Param.fill_value`` constant; padding row zero.

        Args:
            names: canonical names of the params to initialise (default: all of them).
        """
        std = self.config.initializer_range
        tensors = self._tensors()
        for p in self.spec:
            if names is not None and p.name not in names:
                continue
            t = tensors[LAYOUT.key(p)]
            if p.init is Init.NORMAL:
                t.normal_(mean=0.0, std=std)
            else:
                t.fill_(p.fill_value)
            if p.padding_idx is not None:
                t[p.padding_idx].zero_()

    # --- embeddings ------------------------------------------------------------------------------

    def _vocab_embedding_path(self) -> str:
        for p in self.spec:
            if p.kind is Kind.EMBEDDING and p.axes[0] == "vocab":
                return p.module
        raise AttributeError(f"{type(self).__name__} has no vocabulary embedding")

    def get_input_embeddings(self) -> nn.Module:
        """The word-embedding module (``nn.Embedding``)."""
        return self.get_submodule(self._vocab_embedding_path())

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the word-embedding module (its weight must keep the spec's shape); tied heads follow."""
        owner, _, leaf = self._vocab_embedding_path().rpartition(".")
        setattr(self.get_submodule(owner), leaf, value)
        self.tie_weights()

    def get_output_embeddings(self) -> nn.Module | None:
        """The projection onto the vocabulary (an LM head's decoder), tied or not; None without one."""
        spec = self.spec
        for alias in spec.ties:
            return self.get_submodule(alias.rpartition(".")[0])
        for p in spec:
            if p.kind is not Kind.EMBEDDING and p.axes and p.axes[0] == "vocab" and len(p.shape) == 2:
                return self.get_submodule(p.module)
        return None

    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None):
        """Give the vocabulary ``new_num_tokens`` rows (after adding tokens to a tokenizer).

        Old rows are kept, new ones drawn by the spec's init rule; an untied output projection and
        LM biases are resized too, tied heads follow the embedding, ``config.vocab_size`` is updated
        (so the model saves and loads in every backend).

        Args:
            new_num_tokens: the new vocabulary size (None: keep it, only pad).
            pad_to_multiple_of: round the size up to a multiple of this.

        Returns:
            nn.Embedding: the new word-embedding module, as transformers.
        """
        n = self.config.vocab_size if new_num_tokens is None else new_num_tokens
        tensors = self._tensors()
        spec = self.spec

        def old(name: str) -> np.ndarray:
            t = tensors[LAYOUT.key(spec[name])].detach().float().cpu()
            return LAYOUT.from_stored(spec[name], t.numpy())

        new_config, new_spec, arrays = resized_vocab(self.config, self.family, self.head, n, old, pad_to_multiple_of)
        for name, arr in arrays.items():
            key = LAYOUT.key(new_spec[name])
            before = tensors[key]
            owner, _, leaf = key.rpartition(".")
            value = torch.from_numpy(LAYOUT.to_stored(new_spec[name], arr)).to(before.device, before.dtype)
            setattr(self.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=before.requires_grad))
        self.config.vocab_size = new_config.vocab_size
        self.tie_weights()
        for m in self.modules():  # keep the modules' size attributes truthful (repr, reshapes)
            if isinstance(m, nn.Embedding):
                m.num_embeddings = m.weight.shape[0]
            elif isinstance(m, nn.Linear):
                m.out_features = m.weight.shape[0]
        self._check_spec()
        return self.get_input_embeddings()

    # --- sizes and training helpers --------------------------------------------------------------

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of (unique) parameters; tied weights count once."""
        emb = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if (p.requires_grad or not only_trainable) and id(p) not in emb)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer in the backward pass (``torch.utils.checkpoint``, non-reentrant)."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Store activations for the backward pass again (the default)."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether any layer is recomputed in the backward pass."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    # --- checkpoints -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        config: PretrainedConfig | None = None,
        strict: bool = False,
        output_loading_info: bool = False,
        dtype: Any = None,
        torch_dtype: Any = None,
        ignore_mismatched_sizes: bool = False,
        **config_overrides: Any,
    ) -> PreTrainedModel | tuple[PreTrainedModel, dict[str, list[str]]]:
        """Build the model from a directory (transformers' or ours) and load its weights.

        Args:
            pretrained_model_name_or_path: a local directory with ``config.json`` and weights
                (``model.safetensors``, sharded safetensors, or ``pytorch_model.bin``).
            config: use this config instead of the directory's ``config.json``.
            strict: raise on missing or unexpected tensors instead of logging them.
            output_loading_info: also return ``{"missing_keys", "unexpected_keys", "mismatched_keys"}``.
            dtype: weights and compute dtype: None (float32), ``"float32"``, ``"bfloat16"``,
                ``"float16"`` or a ``torch.dtype``; a checkpoint of any of them loads into any.
            torch_dtype: transformers' name for ``dtype`` (give one of the two).
            ignore_mismatched_sizes: initialise afresh (by the spec) every weight whose checkpoint
                shape differs, logging each with both shapes, instead of raising -- a new head on a
                pretrained body: ``from_pretrained(path, num_labels=3, ignore_mismatched_sizes=True)``.
            **config_overrides: config fields to change (``num_labels=3``...); anything else raises
                ``TypeError`` (see :data:`nezha_zoo.pretrained.LOADER_HINTS`).

        Low memory: the module is built on the meta device (no random init), its weights are then
        allocated once in ``dtype`` and filled piece by piece from the file, so loading never holds
        a second copy of the weights.  Shape mismatches raise, naming the tensor and both shapes
        (unless ``ignore_mismatched_sizes``).  The model is returned in eval mode, as transformers does.
        """
        target = _resolve_dtype(dtype, torch_dtype)
        fam = cls.family
        cfg = resolve_config(
            fam, pretrained_model_name_or_path, config, f"{cls.__name__}.from_pretrained", **config_overrides
        )
        model = cls._empty(cfg, target)
        spec = model.spec
        tensors = model._tensors()
        views: dict[str, np.ndarray] = {}

        def view(name: str) -> np.ndarray:
            if name not in views:
                views[name] = _numpy_view(tensors[LAYOUT.key(spec[name])])
            return views[name]

        def write(name: str, index: tuple[slice, ...], piece: np.ndarray) -> None:
            view(name)[index] = piece

        plan = load_weights(
            pretrained_model_name_or_path,
            spec,
            fam,
            LAYOUT,
            None,
            model_name=cls.__name__,
            strict=strict,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            write=write,
            dtype_of=lambda name: view(name).dtype,
            done=views.pop,
        )
        if plan.fresh_keys:
            model.init_weights(set(plan.fresh_keys))
        model.eval()
        return (model, plan.info()) if output_loading_info else model

    @classmethod
    def _empty(cls, config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
        """The model with uninitialised CPU weights in ``dtype``, tied as the spec says.

        Built on the meta device, so no random init is computed and each weight is allocated once;
        a module with non-persistent buffers (values not in the checkpoint) is built normally.
        """
        with torch.device("meta"):
            model = cls(config)
        persistent = set(model.state_dict(keep_vars=True))
        if any(name not in persistent for name, _ in model.named_buffers()):
            model = cls(config)  # its buffers must be computed, not left empty
            model._apply(lambda t: _on_huge_pages(t, copy=True) if t.device.type == "cpu" else t)
        else:
            # ``to_empty(device="cpu")``, with the large weights on huge pages.
            model = model.to(dtype)._apply(lambda t: _on_huge_pages(t, copy=False))
        model.tie_weights()  # to_empty / _apply give each alias its own tensor; share them again
        return model.to(dtype)

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> list[str]:
        """Write ``config.json`` + safetensors in transformers' names and layout (tied weights once).

        Weights are written in the model's dtype (bfloat16 stays bfloat16), straight from their
        memory: no copy of the model is made.  Returns the written file names.
        """
        spec = self.spec
        tensors = self._tensors()

        def arrays():
            for p in spec:
                t = tensors[LAYOUT.key(p)].detach().cpu()
                yield p.name, LAYOUT.from_stored(p, _numpy_view(t.contiguous()))

        return save_weights(save_directory, self.config, spec, self.family, arrays(), max_shard_size=max_shard_size)

    # --- outputs ---------------------------------------------------------------------------------

    def _resolve_flags(
        self, output_attentions: bool | None, output_hidden_states: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        c = self.config
        return (
            c.output_attentions if output_attentions is None else output_attentions,
            c.output_hidden_states if output_hidden_states is None else output_hidden_states,
            c.return_dict if return_dict is None else return_dict,
        )

    def _run_base(self, args: Mapping[str, Any], **overrides: Any) -> ModelOutput:
        """Run the base model (``self.<base_prefix>``) on a head's forward arguments, ``return_dict=True``.

        ``args`` is the head's ``locals()``: of it only the names in :data:`BASE_ARGS` are passed on
        (a head declares just the ones its base model takes); ``overrides`` replace or add arguments
        (the flattened multiple-choice inputs).
        """
        kwargs = {k: args[k] for k in BASE_ARGS if k in args}
        kwargs.update(overrides)
        return getattr(self, self.base_model_prefix)(**kwargs, return_dict=True)

    def _run_base_choices(
        self, args: Mapping[str, Any], embed_width: int | None = None, positions: bool = True, pooled: bool = False
    ) -> tuple[ModelOutput, int]:
        """Multiple choice: check the (B, C, L[, E]) inputs, run the base on (B * C, L[, E]).

        Returns the base output and C.  ``embed_width`` is the width of ``inputs_embeds``
        (``hidden_size`` when None); ``positions=False`` skips the position checks (Nezha);
        ``pooled``: the head reads the pooled position only (:meth:`_pooled_positions`).
        """
        input_ids, inputs_embeds = args.get("input_ids"), args.get("inputs_embeds")
        validate_inputs(
            self.config,
            input_ids,
            inputs_embeds,
            args.get("attention_mask"),
            args.get("token_type_ids"),
            args.get("position_ids"),
            embed_width=self.config.hidden_size if embed_width is None else embed_width,
            rank=3,
            positions=positions,
        )
        num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        flat = {k: flatten_choices(args[k]) for k in CHOICE_ARGS if k in args}  # (B, C, L[, E]) -> (B * C, L[, E])
        if pooled:
            flat["positions_to_keep"] = self._pooled_positions(args)  # (B * C, 1) or None
        return self._run_base(args, **flat), num_choices

    def _pooled_positions(self, args: Mapping[str, Any], last_index: torch.Tensor | None = None) -> torch.Tensor | None:
        """A sequence-level head's ``positions_to_keep`` (issue #23, :mod:`nezha_zoo.spec.pooling`).

        Args:
            args (Mapping[str, Any]): the head's ``forward`` arguments (its ``locals()``).
            last_index (LongTensor (N,) | None): the position each row's head reads, for the family's
                :data:`~nezha_zoo.spec.pooling.LAST_NON_PAD` rule (MPT); unused for ``FIRST``.

        Returns:
            LongTensor (N, 1) or None.  N counts every row the base model runs (multiple choice: B * C):
            zeros for :data:`~nezha_zoo.spec.pooling.FIRST`, ``last_index`` for ``LAST_NON_PAD``.  None
            (every position) when :func:`~nezha_zoo.spec.pooling.keeps_positions` forbids it (hidden
            states, attentions, a cache, cross-attention, I-BERT's quant mode) or the inputs are malformed
            (the base model reports them).
        """
        if not keeps_positions(args, self.config):
            return None
        lead, embeds = args.get("input_ids"), args.get("inputs_embeds")
        lead = embeds if lead is None else lead
        lead_dims = 2 if lead is embeds else 1  # (..., L[, E])
        if not isinstance(lead, torch.Tensor) or lead.dim() < lead_dims + 1:
            return None  # the base model reports the bad input
        if self.family.pooling != FIRST:
            return None if last_index is None else last_index.long()[:, None]  # (N,) -> (N, 1)
        rows = math.prod(lead.shape[:-lead_dims])
        return torch.zeros((rows, 1), dtype=torch.long, device=lead.device)

    @staticmethod
    def _finish(output: ModelOutput, return_dict: bool) -> ModelOutput | tuple[Any, ...]:
        return output if return_dict else output.to_tuple()


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: Any, torch_dtype: Any) -> torch.dtype:
    """``dtype`` / transformers' ``torch_dtype`` (one of them) -> ``torch.float32``, ``bfloat16`` or ``float16``."""
    if dtype is not None and torch_dtype is not None and canonical_dtype(dtype) != canonical_dtype(torch_dtype):
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one of them")
    if dtype is None:
        return _TORCH_DTYPES[canonical_dtype(torch_dtype, "torch_dtype")]
    return _TORCH_DTYPES[canonical_dtype(dtype)]


#: Weights of this many bytes or more get memory that Linux may back with transparent huge pages
#: (:func:`_on_huge_pages`).
HUGE_PAGE_BYTES = 4 << 20


def _on_huge_pages(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """A CPU tensor shaped and typed as ``t``: with ``copy``, ``t``'s values (``t`` itself when it is small),
    else uninitialised; allocated, when it is large, so that the kernel may back it with transparent huge pages.

    Why: at a few rows (1 x 16 tokens) a forward pass streams every weight from memory once per product,
    and with 4 KiB pages the TLB misses of that stream cost about 5-10% of the pass (XLM-R-XL at 1 x 16:
    0.93-0.97x transformers, whose weights are views of the memory-mapped checkpoint, against 1.03-1.07x
    on huge pages, identical code).  torch's CPU allocator asks for no huge pages (unless the process sets
    ``THP_MEM_ALLOC_ENABLE=1`` before its first allocation); numpy's asks (``madvise(MADV_HUGEPAGE)``) for
    every block of 4 MiB and more, so large weights are numpy-owned bytes viewed as ``t.dtype``.  Where
    transparent huge pages are off this is a plain allocation; the values and layout are the same either way.
    """
    nbytes = t.numel() * t.element_size()
    if nbytes < HUGE_PAGE_BYTES or t.dtype.is_complex:
        return t if copy else torch.empty_like(t, device="cpu")
    out = torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(t.dtype).view(t.shape)
    return out.copy_(t.detach()) if copy else out


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy array sharing ``t``'s memory (bfloat16 through ``ml_dtypes``; numpy has none of its own)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return t.numpy()


def _concrete(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read (not a meta tensor, not being traced or compiled)."""
    if t.is_meta:
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return False
    return not torch.jit.is_tracing()


def check_id_dtypes(inputs: dict[str, torch.Tensor | None]) -> None:
    """Every id input has an integer dtype (an embedding lookup would fail deep in torch, a cast truncate)."""
    for name, _, _ in ID_INPUTS:
        t = inputs.get(name)
        if t is not None:
            check_id_dtype(name, str(t.dtype))


def validate_inputs(
    config: PretrainedConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_len: int = 0,
    embed_width: int | None = None,
    rank: int = 2,
    positions: bool = True,
) -> tuple[int, ...]:
    """Raise :class:`~nezha_zoo.validation.InputError` for inputs that cannot be right.

    Checks, before any model op: exactly one of ``input_ids``/``inputs_embeds``; shapes of
    ``attention_mask`` (length ``past_len + L`` when decoding), ``token_type_ids``, ``position_ids``;
    ids inside the vocabulary and the token-type table; sequence length (plus cached positions)
    within ``max_position_embeddings`` when ``positions``.  Returns the ids' shape.
    """
    ids_shape = tuple(input_ids.shape) if input_ids is not None else None
    emb_shape = tuple(inputs_embeds.shape) if inputs_embeds is not None else None
    others: dict[str, Any] = {
        "token_type_ids": tuple(token_type_ids.shape) if token_type_ids is not None else None,
        "position_ids": tuple(position_ids.shape) if position_ids is not None else None,
    }
    if attention_mask is not None:
        # A 3-D (B, Lq, Lk) mask is accepted by the 2-D models, as in transformers.
        if attention_mask.dim() != rank and not (rank == 2 and attention_mask.dim() == 3):
            raise InputError(f"attention_mask must have rank {rank}, got shape {tuple(attention_mask.shape)}")
        if attention_mask.dim() == rank and past_len == 0:
            others["attention_mask"] = tuple(attention_mask.shape)
    shape = check_input_shapes(ids_shape, emb_shape, others, hidden_size=embed_width, rank=rank)
    if attention_mask is not None and attention_mask.dim() == rank and past_len:
        want = (*shape[:-1], past_len + shape[-1])
        if tuple(attention_mask.shape) != want:
            raise InputError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; with {past_len} cached positions it "
                f"must cover cached + new positions, {want}"
            )
    check_id_dtypes({"input_ids": input_ids, "token_type_ids": token_type_ids, "position_ids": position_ids})
    for name, t, size, what in (
        ("input_ids", input_ids, config.vocab_size, "vocabulary"),
        ("token_type_ids", token_type_ids, getattr(config, "type_vocab_size", None), "token types"),
        ("position_ids", position_ids, config.max_position_embeddings if positions else None, "position table"),
    ):
        if t is not None and size is not None and t.numel() and _concrete(t):
            check_id_range(name, int(t.min()), int(t.max()), size, what)
    if positions and position_ids is None:
        check_length(shape[-1], past_len, config.max_position_embeddings)
    return shape


@dataclass
class EncoderInputs:
    """A BERT-style base model's inputs after checking and defaulting (see :func:`prepare_encoder_inputs`).

    Attributes:
        batch (int), seq_len (int): shape of the new positions (B, L).
        past_len (int): cached positions before them (0 without a cache).
        attention_mask (Tensor): additive self-attention mask (B, 1, L or 1, past_len + L).
        encoder_hidden_states (Tensor | None): (B, Lenc, H), None unless cross-attention runs.
        encoder_attention_mask (Tensor | None): additive cross-attention mask (B, 1, 1, Lenc) or None.
        head_mask (list | None): per-layer (1, heads, 1, 1) multipliers, or None.
        use_cache (bool): return a key/value cache (only ``use_cache=True`` in a decoder).
    """

    batch: int
    seq_len: int
    past_len: int
    attention_mask: torch.Tensor
    encoder_hidden_states: torch.Tensor | None
    encoder_attention_mask: torch.Tensor | None
    head_mask: list[Any] | None
    use_cache: bool


def prepare_encoder_inputs(
    config: PretrainedConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    head_mask: torch.Tensor | None,
    encoder_hidden_states: torch.Tensor | None,
    encoder_attention_mask: torch.Tensor | None,
    past_key_values: Any,
    use_cache: bool | None,
    dtype: torch.dtype,
    position_ids: torch.Tensor | None = None,
    embed_width: int | None = None,
    positions: bool = True,
) -> EncoderInputs:
    """Check a BERT-style base model's inputs and build its masks (shared by the families' base models).

    Raises :class:`~nezha_zoo.validation.InputError` for a cache without a decoder or with the wrong
    number of layers, bad ids/shapes (:func:`validate_inputs`), and encoder states or masks of the wrong
    shape.  Defaults: ``attention_mask`` ones over cached + new positions, ``encoder_attention_mask``
    ones.  ``positions=False`` (Nezha) skips the ``max_position_embeddings`` length check.
    """
    if past_key_values is not None and not config.is_decoder:
        raise InputError("past_key_values needs a decoder (config.is_decoder=True)")
    if past_key_values is not None and len(past_key_values) != config.num_hidden_layers:
        raise InputError(f"past_key_values has {len(past_key_values)} layers, the model has {config.num_hidden_layers}")
    past_len = past_key_values[0][0].shape[-2] if past_key_values else 0
    batch, seq_len = validate_inputs(
        config,
        input_ids,
        inputs_embeds,
        attention_mask,
        token_type_ids,
        position_ids,
        past_len=past_len,
        embed_width=embed_width,
        positions=positions,
    )
    cross = config.is_decoder and encoder_hidden_states is not None
    if cross:
        if not config.add_cross_attention:
            raise InputError("encoder_hidden_states given, but the config has add_cross_attention=False")
        enc_shape = tuple(encoder_hidden_states.shape)
        if len(enc_shape) != 3 or enc_shape[0] != batch or enc_shape[2] != config.hidden_size:
            raise InputError(
                f"encoder_hidden_states must have shape ({batch}, Lenc, {config.hidden_size}), got {enc_shape}"
            )
        if encoder_attention_mask is not None and encoder_attention_mask.dim() == 2:
            check_input_shapes(enc_shape[:2], None, {"encoder_attention_mask": tuple(encoder_attention_mask.shape)})
    layer_head_mask = None
    if head_mask is not None:
        layer_head_mask = expand_head_mask(head_mask, config.num_hidden_layers, dtype, config.num_attention_heads)
    device = (input_ids if input_ids is not None else inputs_embeds).device
    if attention_mask is None:
        attention_mask = torch.ones((batch, past_len + seq_len), device=device)
    mask = extended_attention_mask(attention_mask, seq_len, dtype, causal=config.is_decoder)
    enc_mask = None
    if cross:
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=device)
        enc_mask = encoder_attention_bias(encoder_attention_mask, dtype)
    return EncoderInputs(
        batch=batch,
        seq_len=seq_len,
        past_len=past_len,
        attention_mask=mask,
        encoder_hidden_states=encoder_hidden_states if cross else None,
        encoder_attention_mask=enc_mask,
        head_mask=layer_head_mask,
        use_cache=bool(use_cache) and config.is_decoder,
    )


def flatten_choices(t: torch.Tensor | None) -> torch.Tensor | None:
    """Multiple choice: (B, C, L[, E]) -> (B * C, L[, E]); None stays None."""
    return None if t is None else t.reshape(-1, *t.shape[2:])
