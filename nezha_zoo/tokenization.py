"""Framework-free tokenizers: text in, ``input_ids`` out, for every family of the zoo.

``AutoTokenizer.from_pretrained(DIR)`` reads the tokenizer files a checkpoint directory ships and
builds a `tokenizers <https://github.com/huggingface/tokenizers>`_ pipeline identical to the one
transformers' fast tokenizer would build from the same files:

* ``tokenizer.json`` when present (any family; MPT's GPT-NeoX BPE ships only this);
* else ``vocab.txt``: WordPiece, BERT-style (Nezha, Electra) or MPNet's ``<s> A </s></s> B </s>``;
* else ``vocab.json`` + ``merges.txt``: RoBERTa's byte-level BPE (I-BERT);
* else ``sentencepiece.bpe.model``: XLM-R's SentencePiece model with fairseq's id offset (read with
  ``sentencepiece``, the only place that library is used).

The kind is ``tokenizer_class`` of ``tokenizer_config.json``, else the family's (``config.json``'s
``model_type``), else guessed from the files.  Special tokens, ``model_max_length`` and the padding
and truncation sides come from ``tokenizer_config.json`` / ``special_tokens_map.json``.

Where transformers only warns, this module refuses: a text longer than ``max_length`` (or the
tokenizer's ``model_max_length``) without ``truncation`` raises ``ValueError`` naming the limit,
since a model would otherwise fail deep inside a framework (position embeddings) or silently read
past its trained length.  Non-string input raises ``TypeError``; an empty string is a defined input
(only the special tokens).

Importing this module imports neither ``tokenizers`` nor any framework; ``return_tensors`` imports
only the framework it names.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nezha_zoo.io.atomic import staged_directory

__all__ = [
    "AutoTokenizer",
    "BatchEncoding",
    "Tokenizer",
    "TOKENIZER_CLASSES",
    "TOKENIZER_FILES",
    "SENTENCE_TRANSFORMERS_FILES",
    "copy_tokenizer_files",
    "tokenizer_files",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"

#: Every file a checkpoint directory may carry for its tokenizer; ``nezha-zoo convert`` copies them
#: unchanged and ``nezha-zoo inspect`` lists them.
TOKENIZER_FILES = (
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    ADDED_TOKENS_FILE,
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
)

#: What a sentence-transformers directory adds (pooling and normalisation); files and folders.
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling",
    "2_Normalize",
)

#: transformers' stand-in for "no limit" (``PreTrainedTokenizerBase.model_max_length``'s default).
VERY_LARGE_INTEGER = int(1e30)

_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_PADDING = {True: "longest", "longest": "longest", "max_length": "max_length", False: None, "do_not_pad": None}
_TRUNCATION = {
    True: "longest_first",
    "longest_first": "longest_first",
    "only_first": "only_first",
    "only_second": "only_second",
    False: None,
    "do_not_truncate": None,
}
_TENSOR_TYPES = ("np", "pt", "tf", "jax")


@dataclass(frozen=True)
class _Kind:
    """One transformers tokenizer class: its inputs, default special tokens and vocabulary files."""

    name: str
    model_input_names: tuple[str, ...]
    specials: dict[str, str | None]
    #: the file a tokenizer of this kind is built from when there is no tokenizer.json
    builder: str | None
    #: special tokens matched with the whitespace on their left (``"<mask>"`` of RoBERTa-likes)
    lstrip: tuple[str, ...] = ()
    clean_up_tokenization_spaces: bool = False


_BERT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]"}
_BERT_SPECIALS["mask_token"] = "[MASK]"
_ROBERTA_SPECIALS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}
_WITH_TYPES = ("input_ids", "token_type_ids", "attention_mask")
_NO_TYPES = ("input_ids", "attention_mask")

#: transformers' tokenizer classes this module builds, by name (a ``Fast`` suffix is accepted too).
TOKENIZER_CLASSES: dict[str, _Kind] = {
    k.name: k
    for k in (
        _Kind("BertTokenizer", _WITH_TYPES, _BERT_SPECIALS, "wordpiece", clean_up_tokenization_spaces=True),
        _Kind("ElectraTokenizer", _WITH_TYPES, _BERT_SPECIALS, "wordpiece", clean_up_tokenization_spaces=True),
        _Kind(
            "MPNetTokenizer",
            _NO_TYPES,
            {**_ROBERTA_SPECIALS, "unk_token": "[UNK]"},
            "wordpiece",
            lstrip=("mask_token",),
            clean_up_tokenization_spaces=True,
        ),
        _Kind("RobertaTokenizer", _NO_TYPES, _ROBERTA_SPECIALS, "bpe", lstrip=("mask_token",)),
        _Kind("XLMRobertaTokenizer", _NO_TYPES, _ROBERTA_SPECIALS, "sentencepiece", lstrip=("mask_token",)),
        _Kind(
            "GPTNeoXTokenizer",
            _NO_TYPES,
            {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
            None,
        ),
        _Kind("PreTrainedTokenizer", _WITH_TYPES, {}, None),
    )
}

_BUILDER_FILES = {
    "wordpiece": ("vocab.txt",),
    "bpe": ("vocab.json", "merges.txt"),
    "sentencepiece": ("sentencepiece.bpe.model",),
}


def tokenizer_files(path: str | os.PathLike) -> list[str]:
    """The names in :data:`TOKENIZER_FILES` and :data:`SENTENCE_TRANSFORMERS_FILES` present in ``path``.

    Args:
        path (str | os.PathLike): a checkpoint directory.

    Returns:
        list[str]: file (and sentence-transformers folder) names, in the order of those lists.
    """
    path = os.fspath(path)
    return [n for n in TOKENIZER_FILES + SENTENCE_TRANSFORMERS_FILES if os.path.exists(os.path.join(path, n))]


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the files :func:`tokenizer_files` finds in ``src`` into ``dst``, unchanged.

    Args:
        src (str | os.PathLike): a checkpoint directory.
        dst (str | os.PathLike): an existing directory (``nezha-zoo convert``'s staging directory).

    Returns:
        list[str]: the names copied (folders such as ``1_Pooling`` copied whole).
    """
    names = tokenizer_files(src)
    for name in names:
        source, target = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(source):
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
    return names


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _token_content(value: Any, where: str) -> str | None:
    """A special token as written in tokenizer_config / special_tokens_map: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: a special token must be a string or {{'content': ...}}, not {value!r}")


def _kind_of(path: str, config: dict[str, Any]) -> _Kind:
    """The tokenizer kind: tokenizer_config's class, else the family's, else guessed from the files."""
    name = config.get("tokenizer_class")
    if name is None:
        cfg = os.path.join(path, "config.json")
        model_type = _read_json(cfg).get("model_type") if os.path.isfile(cfg) else None
        if model_type is not None:
            from nezha_zoo.spec.registry import families

            family = families().get(model_type)
            name = family.tokenizer_class if family is not None else None
    if name is None:
        for kind in ("BertTokenizer", "RobertaTokenizer", "XLMRobertaTokenizer"):
            if all(os.path.isfile(os.path.join(path, f)) for f in _BUILDER_FILES[TOKENIZER_CLASSES[kind].builder]):
                return TOKENIZER_CLASSES[kind]
        return TOKENIZER_CLASSES["PreTrainedTokenizer"]
    if not isinstance(name, str):
        raise ValueError(f"{path}: tokenizer_class must be a string, not {name!r}")
    stem = name[: -len("Fast")] if name.endswith("Fast") else name
    if stem not in TOKENIZER_CLASSES:
        raise ValueError(
            f"{path}: unknown tokenizer type {name!r}; nezha_zoo builds {sorted(TOKENIZER_CLASSES)} "
            "(or their Fast names)"
        )
    return TOKENIZER_CLASSES[stem]


class AutoTokenizer:
    """Entry point: :meth:`from_pretrained` picks the tokenizer a checkpoint directory declares."""

    def __init__(self) -> None:
        raise TypeError("use AutoTokenizer.from_pretrained(directory)")

    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> Tokenizer:
        """Load the tokenizer in ``path``; see :meth:`Tokenizer.from_pretrained`."""
        return Tokenizer.from_pretrained(path, **kwargs)


class BatchEncoding(dict):
    """A tokenizer's output: ``input_ids``, ``attention_mask`` (and ``token_type_ids``...) by name.

    A plain ``dict`` (so ``model(**enc)`` works) whose values are lists, or arrays of the framework
    asked for.  ``encodings`` keeps the ``tokenizers.Encoding`` of each row for word/sequence maps.
    """

    def __init__(self, data: Mapping[str, Any], encodings: list[Any] | None = None) -> None:
        super().__init__(data)
        self.encodings = encodings

    def _encoding(self, batch_index: int) -> Any:
        if not self.encodings:
            raise ValueError("this BatchEncoding keeps no encodings (it was not made by a Tokenizer call)")
        return self.encodings[batch_index]

    def tokens(self, batch_index: int = 0) -> list[str]:
        """The token strings of row ``batch_index``."""
        return list(self._encoding(batch_index).tokens)

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of row ``batch_index``, the index of the word it comes from (None: special/pad)."""
        return list(self._encoding(batch_index).word_ids)

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of row ``batch_index``: 0 (text), 1 (text_pair) or None (special/pad)."""
        return list(self._encoding(batch_index).sequence_ids)

    def convert_to_tensors(self, tensor_type: str) -> BatchEncoding:
        """Turn every value into an array of ``tensor_type`` (``"np"|"pt"|"tf"|"jax"``), in place.

        Raises:
            ValueError: an unknown type, or rows of different lengths (pad them first).
        """
        import numpy as np

        if tensor_type not in _TENSOR_TYPES:
            raise ValueError(f"return_tensors must be one of {list(_TENSOR_TYPES)} or None, not {tensor_type!r}")
        if tensor_type == "pt":
            convert = importlib.import_module("torch").tensor
        elif tensor_type == "tf":
            convert = importlib.import_module("tensorflow").constant
        elif tensor_type == "jax":
            convert = importlib.import_module("jax.numpy").asarray
        else:
            convert = np.asarray
        for key, value in self.items():
            lengths = (
                {len(row) for row in value}
                if isinstance(value, list) and value and isinstance(value[0], list)
                else set()
            )
            if len(lengths) > 1:
                raise ValueError(
                    f"cannot make {tensor_type!r} tensors of {key!r}: the rows have lengths {sorted(lengths)}; "
                    "pass padding=True (or truncation with max_length) to make them equal"
                )
            self[key] = convert(value)
        return self


class Tokenizer:
    """A framework-free tokenizer over a ``tokenizers.Tokenizer``, called like transformers' tokenizers.

    Build it with :meth:`from_pretrained` (or :class:`AutoTokenizer`).  Thread-safe: a call sets the
    backend's padding and truncation under a lock.

    Attributes:
        backend_tokenizer (tokenizers.Tokenizer): the pipeline (normalizer, pre-tokenizer, model,
            post-processor, decoder); no padding or truncation is set on it between calls.
        tokenizer_class (str): transformers' class this tokenizer reproduces (``"BertTokenizer"``).
        model_input_names (list[str]): the keys a call returns by default.
        model_max_length (int): the longest input the model takes (``VERY_LARGE_INTEGER``: no limit).
        padding_side, truncation_side (str): ``"right"`` or ``"left"``.
        clean_up_tokenization_spaces (bool): the default of ``decode``'s clean-up.
    """

    def __init__(
        self,
        backend: Any,
        *,
        tokenizer_class: str,
        special_tokens: Mapping[str, str | None],
        model_max_length: int = VERY_LARGE_INTEGER,
        padding_side: str = "right",
        truncation_side: str = "right",
        clean_up_tokenization_spaces: bool | None = None,
        model_input_names: Sequence[str] | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        stem = tokenizer_class[: -len("Fast")] if tokenizer_class.endswith("Fast") else tokenizer_class
        if stem not in TOKENIZER_CLASSES:
            raise ValueError(
                f"unknown tokenizer type {tokenizer_class!r}; nezha_zoo builds {sorted(TOKENIZER_CLASSES)}"
            )
        kind = TOKENIZER_CLASSES[stem]
        for side, value in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if value not in ("right", "left"):
                raise ValueError(f"{side} must be 'right' or 'left', not {value!r}")
        if not isinstance(model_max_length, int) or model_max_length <= 0:
            raise ValueError(f"model_max_length must be a positive int, not {model_max_length!r}")
        self.backend_tokenizer = backend
        self.tokenizer_class = kind.name
        self.model_input_names = list(model_input_names or kind.model_input_names)
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = (
            kind.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        )
        self._specials = {k: v for k, v in special_tokens.items() if k in _SPECIAL_ATTRS and v is not None}
        self.additional_special_tokens = list(special_tokens.get("additional_special_tokens") or [])
        self.init_kwargs = dict(init_kwargs or {})
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Tokenizer:
        """Build the tokenizer of a checkpoint directory (see the module docstring for the files read).

        Args:
            path (str | os.PathLike): a directory with ``tokenizer.json``, or ``vocab.txt``, or
                ``vocab.json`` + ``merges.txt``, or ``sentencepiece.bpe.model`` (and optionally
                ``tokenizer_config.json`` / ``special_tokens_map.json``).
            **overrides: values that replace ``tokenizer_config.json``'s (``model_max_length``,
                ``padding_side``, ``do_lower_case``, ``add_prefix_space``, special tokens...).

        Raises:
            FileNotFoundError: ``path`` is not a directory, or holds no file a tokenizer is built from.
            ValueError: an unknown ``tokenizer_class``, or malformed tokenizer files.
            TypeError: an unknown keyword argument.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a directory")
        config: dict[str, Any] = {}
        added: dict[str, Any] = {}
        cfg_file = os.path.join(path, TOKENIZER_CONFIG_FILE)
        if os.path.isfile(cfg_file):
            config = _read_json(cfg_file)
            added = config.pop("added_tokens_decoder", None) or {}
        map_file = os.path.join(path, SPECIAL_TOKENS_MAP_FILE)
        special_map = _read_json(map_file) if os.path.isfile(map_file) else {}
        unknown = sorted(set(overrides) - set(_OVERRIDABLE))
        if unknown:
            raise TypeError(f"unknown keyword arguments {unknown}; a tokenizer takes {sorted(_OVERRIDABLE)}")
        file_config = dict(config)
        config.update(overrides)
        kind = _kind_of(path, config)
        tok_file = os.path.join(path, TOKENIZER_FILE)
        from tokenizers import Tokenizer as Backend

        if os.path.isfile(tok_file):
            try:
                backend = Backend.from_file(tok_file)
            except Exception as e:  # tokenizers raises a bare Exception on a malformed file
                raise ValueError(f"{tok_file} is not a tokenizers file: {e}") from e
        elif kind.builder is not None and all(
            os.path.isfile(os.path.join(path, f)) for f in _BUILDER_FILES[kind.builder]
        ):
            backend = None  # built below, once the special tokens are known
        else:
            wanted = [TOKENIZER_FILE] + ([" + ".join(_BUILDER_FILES[kind.builder])] if kind.builder else [])
            raise FileNotFoundError(
                f"{path!r} has no tokenizer files for a {kind.name}: looked for {' or '.join(wanted)}"
            )
        # As transformers: special_tokens_map.json overrides tokenizer_config.json only in directories
        # saved before added_tokens_decoder existed; keyword arguments override both.
        specials: dict[str, Any] = dict(kind.specials)
        sources = [(file_config, cfg_file)] + ([(special_map, map_file)] if not added else [])
        for source, where in sources + [(overrides, "from_pretrained")]:
            for attr in _SPECIAL_ATTRS:
                if attr in source:
                    specials[attr] = _token_content(source[attr], where)
            if "additional_special_tokens" in source:
                extra = source["additional_special_tokens"] or []
                specials["additional_special_tokens"] = [_token_content(t, where) for t in extra]
        if backend is None:
            backend = _BUILDERS[kind.builder](path, specials, config)
        backend.no_padding()
        backend.no_truncation()
        _sync_backend(backend, kind, config, specials)
        _add_special_tokens(backend, kind, specials)
        _add_declared_tokens(backend, added, cfg_file)
        _add_legacy_added_tokens(backend, path)
        max_len = config.get("model_max_length", VERY_LARGE_INTEGER)
        if isinstance(max_len, float) and max_len >= VERY_LARGE_INTEGER:
            max_len = VERY_LARGE_INTEGER  # json round-trips transformers' int(1e30) as 1e+30
        names = config.get("model_input_names")
        return cls(
            backend,
            tokenizer_class=kind.name,
            special_tokens=specials,
            model_max_length=max_len,
            padding_side=config.get("padding_side", "right"),
            truncation_side=config.get("truncation_side", "right"),
            clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces"),
            model_input_names=names,
            init_kwargs={k: config[k] for k in _INIT_KEYS if k in config},
        )

    # ------------------------------------------------------------------ special tokens
    def __getattr__(self, name: str) -> Any:
        # bos_token ... mask_token and their *_id twins; None where the tokenizer has none
        if name in _SPECIAL_ATTRS:
            return self.__dict__.get("_specials", {}).get(name)
        if name.endswith("_id") and name[:-3] in _SPECIAL_ATTRS:
            token = self.__dict__.get("_specials", {}).get(name[:-3])
            return None if token is None else self.convert_tokens_to_ids(token)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """The special tokens by role (``{"cls_token": "[CLS]", ...}``)."""
        out: dict[str, Any] = dict(self._specials)
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    @property
    def all_special_tokens(self) -> list[str]:
        """Every special token, each once, in role order."""
        seen: list[str] = []
        for t in [*self._specials.values(), *self.additional_special_tokens]:
            if t not in seen:
                seen.append(t)
        return seen

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    @property
    def pad_token_type_id(self) -> int:
        return 0

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens)."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many special tokens a call adds to a single text (or a pair)."""
        return self.backend_tokenizer.num_special_tokens_to_add(pair)

    # ------------------------------------------------------------------ ids <-> tokens
    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id of a token (or a list of them); unknown tokens map to ``unk_token_id`` (None without one)."""
        if tokens is None:
            return None
        if isinstance(tokens, str):
            tid = self.backend_tokenizer.token_to_id(tokens)
            if tid is None and self._specials.get("unk_token") not in (None, tokens):
                return self.convert_tokens_to_ids(self._specials["unk_token"])
            return tid
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Token of an id (or a list of them); ids outside the vocabulary raise ``ValueError``."""
        if isinstance(ids, int):
            token = self.backend_tokenizer.id_to_token(ids)
            if token is None:
                raise ValueError(f"id {ids} is outside the vocabulary of {len(self)} tokens")
            return token
        ids = _as_id_list(ids, "ids")
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.convert_ids_to_tokens(i) for i in ids if i not in special]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Join token strings into text with the tokenizer's decoder (``["hel", "##lo"]`` -> ``"hello"``)."""
        if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
            raise TypeError("tokens must be a list of token strings")
        decoder = self.backend_tokenizer.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """The token strings of ``text`` (and ``pair``), without special tokens unless asked."""
        _check_text(text, "text")
        if pair is not None:
            _check_text(pair, "pair")
        with self._lock:
            self._configure(None, None, 0, None, None, None)
            return list(self.backend_tokenizer.encode(text, pair, add_special_tokens=add_special_tokens).tokens)

    # ------------------------------------------------------------------ encoding
    def __call__(
        self,
        text: str | Sequence[str] | Sequence[Sequence[str]],
        text_pair: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
    ) -> BatchEncoding:
        """Tokenize one text (or pair) or a batch of them.

        Args:
            text (str | list[str]): a text or a batch of texts (with ``is_split_into_words``: a list of
                words, or a batch of such lists).
            text_pair (str | list[str] | None): the second text of each pair, matching ``text``.
            add_special_tokens (bool): add ``[CLS]``/``<s>``... as the model expects.
            padding (bool | str): ``False``; ``True``/``"longest"`` (to the batch's longest row);
                ``"max_length"`` (to ``max_length``, else ``model_max_length``).
            truncation (bool | str | None): ``True``/``"longest_first"``, ``"only_first"``,
                ``"only_second"`` or ``False``; None truncates exactly when ``max_length`` is given.
            max_length (int | None): length limit of truncation and ``"max_length"`` padding; without
                truncation, rows longer than it (or than ``model_max_length``) raise ``ValueError``.
            stride (int): overlap of overflowing windows (with ``return_overflowing_tokens``).
            is_split_into_words (bool): ``text`` is already split into words.
            pad_to_multiple_of (int | None): round padded lengths up to a multiple of this.
            padding_side (str | None): ``"right"``/``"left"``; default ``self.padding_side``.
            return_tensors (str | None): ``"np"``, ``"pt"``, ``"tf"``, ``"jax"`` (arrays of shape
                ``[batch, seq]``, a batch of one for a single text) or None (Python lists).
            return_token_type_ids, return_attention_mask (bool | None): default: whether the key is
                in ``model_input_names``.
            return_overflowing_tokens (bool): also return the truncated-away windows as extra rows,
                with ``overflow_to_sample_mapping`` naming each row's text.
            return_special_tokens_mask, return_offsets_mapping, return_length (bool): add
                ``special_tokens_mask`` (1 on special tokens), ``offset_mapping`` (character
                ``(start, end)`` of each token in its text) and ``length``.

        Returns:
            BatchEncoding: ``input_ids`` etc.; lists of ints for a single text, lists of lists (or arrays)
            for a batch.

        Raises:
            TypeError: a text that is not a string (or a word list that holds a non-string).
            ValueError: an empty batch, mismatched ``text_pair``, an unknown option, or a row longer
                than the limit without truncation.
        """
        batched, inputs = self._inputs(text, text_pair, is_split_into_words)
        pad = _option(padding, _PADDING, "padding")
        trunc = _option(truncation, _TRUNCATION, "truncation") if truncation is not None else None
        if truncation is None:
            trunc = "longest_first" if max_length is not None else None
        if max_length is not None and (
            not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1
        ):
            raise ValueError(f"max_length must be a positive int or None, not {max_length!r}")
        if (trunc is not None or pad == "max_length") and max_length is None:
            if self.model_max_length >= VERY_LARGE_INTEGER:
                what = "truncation" if trunc is not None else "padding='max_length'"
                raise ValueError(f"{what} needs max_length: this tokenizer declares no model_max_length")
            max_length = self.model_max_length
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive int or None, not {pad_to_multiple_of!r}")
            if trunc is not None and pad is not None and max_length % pad_to_multiple_of:
                raise ValueError(
                    f"truncation to max_length={max_length} and padding to a multiple of {pad_to_multiple_of} "
                    "contradict each other; make max_length a multiple of pad_to_multiple_of"
                )
        if return_tensors is not None and return_tensors not in _TENSOR_TYPES:
            raise ValueError(f"return_tensors must be one of {list(_TENSOR_TYPES)} or None, not {return_tensors!r}")
        if padding_side is not None and padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
        if not isinstance(stride, int) or stride < 0:
            raise ValueError(f"stride must be a non-negative int, not {stride!r}")
        if is_split_into_words and self.tokenizer_class == "RobertaTokenizer":
            state = json.loads(self.backend_tokenizer.pre_tokenizer.__getstate__())
            if not state.get("add_prefix_space", True):  # each word would lose the space its ids encode
                raise ValueError(
                    "a RobertaTokenizer takes words (is_split_into_words=True) only with add_prefix_space=True; "
                    "load it with AutoTokenizer.from_pretrained(dir, add_prefix_space=True)"
                )
        with self._lock:
            self._configure(pad, trunc, stride, max_length, pad_to_multiple_of, padding_side)
            try:
                encodings = self.backend_tokenizer.encode_batch(
                    inputs, add_special_tokens=add_special_tokens, is_pretokenized=is_split_into_words
                )
            except Exception as e:  # tokenizers raises a bare Exception, e.g. "Truncation error: ..."
                raise ValueError(f"cannot tokenize with truncation={trunc!r}, max_length={max_length}: {e}") from e
            finally:
                self._configure(None, None, 0, None, None, None)
        if trunc is None:  # transformers only warns; a model would fail later, deep in a framework
            limit = self.model_max_length if max_length is None else max_length
            what = f"the tokenizer's model_max_length ({limit})" if max_length is None else f"max_length={limit}"
            for i, enc in enumerate(encodings):
                n = sum(enc.attention_mask)  # without padding
                if n > limit:
                    raise ValueError(
                        f"text {i} is {n} tokens long, more than {what}; pass truncation=True to cut it "
                        "(or a larger max_length)"
                    )

        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        rows, sample = [], []
        for i, enc in enumerate(encodings):
            for e in [enc, *enc.overflowing] if return_overflowing_tokens else [enc]:
                rows.append(e)
                sample.append(i)
        data: dict[str, list[Any]] = {"input_ids": [e.ids for e in rows]}
        if return_token_type_ids:
            data["token_type_ids"] = [e.type_ids for e in rows]
        if return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in rows]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [e.special_tokens_mask for e in rows]
        if return_offsets_mapping:
            data["offset_mapping"] = [[list(o) if return_tensors else tuple(o) for o in e.offsets] for e in rows]
        if return_length:
            data["length"] = [len(e.ids) for e in rows]
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = sample
        if not batched and not return_overflowing_tokens and return_tensors is None:
            # as transformers: only per-token rows lose the batch axis (``length`` stays a list)
            data = {k: v[0] if v and isinstance(v[0], list) else v for k, v in data.items()}
        out = BatchEncoding(data, rows)
        if return_tensors is not None:
            out.convert_to_tensors(return_tensors)
        return out

    def _inputs(self, text: Any, text_pair: Any, split: bool) -> tuple[bool, list[Any]]:
        """Check the texts; return (batched, the backend's input list)."""

        def is_batch(x: Any) -> bool:
            if split:
                return isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], (list, tuple))
            return isinstance(x, (list, tuple))

        def check(x: Any, where: str) -> Any:
            if split:
                if not isinstance(x, (list, tuple)):
                    raise TypeError(
                        f"{where} must be a list of words (is_split_into_words=True), not {type(x).__name__}"
                    )
                for j, w in enumerate(x):
                    _check_text(w, f"{where}[{j}]")
                return list(x)
            _check_text(x, where)
            return x

        batched = is_batch(text)
        if not batched:
            if text_pair is not None and is_batch(text_pair):
                raise ValueError("text is a single text but text_pair is a batch; pass both as lists")
            first = check(text, "text")
            return False, [first if text_pair is None else (first, check(text_pair, "text_pair"))]
        if len(text) == 0:
            raise ValueError("text is an empty batch; pass at least one text")
        firsts = [check(t, f"text[{i}]") for i, t in enumerate(text)]
        if text_pair is None:
            return True, firsts
        if not is_batch(text_pair) or len(text_pair) != len(text):
            n = len(text_pair) if is_batch(text_pair) else "a single text"
            raise ValueError(f"text_pair must be a batch as long as text ({len(text)} texts), got {n}")
        return True, [(a, check(b, f"text_pair[{i}]")) for i, (a, b) in enumerate(zip(firsts, text_pair))]

    def _configure(
        self,
        pad: str | None,
        trunc: str | None,
        stride: int,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        padding_side: str | None,
    ) -> None:
        """Set (or clear) the backend's truncation and padding as transformers' fast tokenizers do."""
        backend = self.backend_tokenizer
        if trunc is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(max_length, stride=stride, strategy=trunc, direction=self.truncation_side)
        if pad is None:
            backend.no_padding()
        else:
            pad_token = self._specials.get("pad_token")
            if pad_token is None:
                raise ValueError(f"this {self.tokenizer_class} has no pad_token, so it cannot pad")
            backend.enable_padding(
                direction=padding_side or self.padding_side,
                pad_id=self.convert_tokens_to_ids(pad_token),
                pad_type_id=self.pad_token_type_id,
                pad_token=pad_token,
                length=max_length if pad == "max_length" else None,
                pad_to_multiple_of=pad_to_multiple_of,
            )

    # ------------------------------------------------------------------ decoding
    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """The text of a sequence of ids (a list, or a 1-D array / tensor of any framework).

        Args:
            token_ids: ids of one sequence.
            skip_special_tokens (bool): leave out special tokens (and padding).
            clean_up_tokenization_spaces (bool | None): remove the spaces before punctuation and
                English contractions (``" ,"`` -> ``","``); default ``self.clean_up_tokenization_spaces``.
        """
        ids = _as_id_list(token_ids, "token_ids")
        text = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = (
            self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        )
        return _clean_up_tokenization(text) if clean else text

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """:meth:`decode` of each row of ``sequences`` (a list of id lists or a 2-D array)."""
        rows = _to_list(sequences)
        if isinstance(rows, (str, bytes)) or not isinstance(rows, (list, tuple)):
            raise TypeError(f"sequences must be a batch of id sequences, not {type(sequences).__name__}")
        return [self.decode(r, skip_special_tokens, clean_up_tokenization_spaces) for r in rows]

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | os.PathLike) -> list[str]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``path``.

        The files appear together or not at all (staged beside ``path``, then renamed); other files
        in ``path`` are left alone.  transformers' ``AutoTokenizer`` reads the result too.

        Returns:
            list[str]: the paths written.
        """
        path = os.fspath(path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{path!r} exists and is not a directory")
        with self._lock:
            self._configure(None, None, 0, None, None, None)
            tokenizer_json = self.backend_tokenizer.to_str(pretty=True)
        config: dict[str, Any] = {
            # transformers has no slow PreTrainedTokenizer to build from tokenizer.json
            "tokenizer_class": self.tokenizer_class + ("Fast" if self.tokenizer_class == "PreTrainedTokenizer" else ""),
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "model_input_names": self.model_input_names,
            **self.init_kwargs,
            **self.special_tokens_map,
        }
        config.update(_backend_options(self.backend_tokenizer, self.tokenizer_class))
        files = {
            TOKENIZER_FILE: tokenizer_json,
            TOKENIZER_CONFIG_FILE: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            SPECIAL_TOKENS_MAP_FILE: json.dumps(self.special_tokens_map, indent=2, ensure_ascii=False) + "\n",
        }
        with staged_directory(path) as stage:
            for name, text in files.items():
                with open(os.path.join(stage, name), "w", encoding="utf-8") as fh:
                    fh.write(text)
        return [os.path.join(path, n) for n in files]

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.tokenizer_class}, vocab_size={len(self)}, model_max_length={self.model_max_length}, "
            f"padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})"
        )


#: tokenizer_config keys kept as they were read and written back by save_pretrained
_INIT_KEYS = ("do_lower_case", "strip_accents", "tokenize_chinese_chars", "add_prefix_space", "trim_offsets")
_INIT_KEYS += ("add_bos_token", "add_eos_token")


#: keyword arguments of from_pretrained: tokenizer_config.json fields they replace
_OVERRIDABLE = _INIT_KEYS + _SPECIAL_ATTRS + ("additional_special_tokens", "tokenizer_class", "model_max_length")
_OVERRIDABLE += ("padding_side", "truncation_side", "clean_up_tokenization_spaces", "model_input_names")


def _option(value: Any, table: dict[Any, str | None], name: str) -> str | None:
    try:
        return table[value]
    except (KeyError, TypeError):
        known = [k for k in table if not isinstance(k, bool)]
        raise ValueError(f"{name} must be True, False or one of {known}, not {value!r}") from None


def _check_text(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, not {type(text).__name__} ({text!r:.60})")


def _to_list(x: Any) -> Any:
    """Python lists of a numpy/torch/jax array or a TF tensor (which has no ``tolist``)."""
    if hasattr(x, "numpy") and not hasattr(x, "tolist"):
        x = x.numpy()
    return x.tolist() if hasattr(x, "tolist") else x


def _as_id_list(token_ids: Any, where: str) -> list[int]:
    ids = _to_list(token_ids)
    if isinstance(ids, int) and not isinstance(ids, bool):
        return [ids]
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"{where} must be a sequence of ints (one sequence; use batch_decode for a batch)")
    return list(ids)


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


# ---------------------------------------------------------------------- builders from vocabulary files


def _wordpiece(path: str, specials: dict[str, Any], config: dict[str, Any]) -> Any:
    """BERT's (and MPNet's) WordPiece from ``vocab.txt``, as transformers' Bert/MPNet converters build it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    vocab: dict[str, int] = {}
    with open(os.path.join(path, "vocab.txt"), encoding="utf-8") as fh:
        for index, line in enumerate(fh):  # one token a line, id = line number (a repeated token: the last)
            vocab[line.rstrip("\n")] = index
    unk = specials.get("unk_token")
    if unk not in vocab:
        raise ValueError(f"{path}/vocab.txt has no unk_token {unk!r}")
    backend = Backend(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),
        lowercase=config.get("do_lower_case", True),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _byte_level_bpe(path: str, specials: dict[str, Any], config: dict[str, Any]) -> Any:
    """RoBERTa's byte-level BPE from ``vocab.json`` + ``merges.txt`` (transformers' RobertaConverter)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = _read_json(os.path.join(path, "vocab.json"))
    merges = []
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if (n == 0 and line.startswith("#version")) or not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}/merges.txt line {n + 1}: expected two tokens, got {line.strip()!r}")
            merges.append((parts[0], parts[1]))
    backend = Backend(
        models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=config.get("add_prefix_space", False))
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(path: str, specials: dict[str, Any], config: dict[str, Any]) -> Any:
    """XLM-R's model from ``sentencepiece.bpe.model``, with fairseq's ids (transformers' XLMRobertaConverter).

    fairseq puts ``<s> <pad> </s> <unk>`` at 0-3 and shifts SentencePiece's pieces (from its id 3) by
    one; ``<mask>`` comes last.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        raise ImportError(
            "reading sentencepiece.bpe.model needs the sentencepiece package (and protobuf): "
            "pip install 'nezha-zoo[sentencepiece]'"
        ) from e
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    file = os.path.join(path, "sentencepiece.bpe.model")
    proto = sentencepiece_model_pb2.ModelProto()
    with open(file, "rb") as fh:
        try:
            proto.ParseFromString(fh.read())
        except Exception as e:  # protobuf's DecodeError
            raise ValueError(f"{file} is not a SentencePiece model: {e}") from e
    if len(proto.pieces) < 3:
        raise ValueError(f"{file} holds {len(proto.pieces)} pieces; a SentencePiece model has at least 3")
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p.piece, p.score) for p in proto.pieces[3:]]
    vocab += [("<mask>", 0.0)]
    model_type = proto.trainer_spec.model_type
    if model_type == 1:  # unigram
        backend = Backend(models.Unigram(vocab, 3, False))
    elif model_type == 2:  # BPE: merges recovered from the scores, as transformers' SentencePieceExtractor
        ids = {p.piece: i for i, p in enumerate(proto.pieces)}
        merges = _sentencepiece_merges(ids, vocab)
        bpe_vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
        backend = Backend(
            models.BPE(bpe_vocab, merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True, dropout=None)
        )
    else:
        raise ValueError(f"{file}: SentencePiece model type {model_type} is not supported (unigram and BPE are)")
    backend.add_tokens(
        [AddedToken(p.piece, normalized=False, special=p.type == 3) for p in proto.pieces if p.type in (3, 4)]
    )
    charsmap = proto.normalizer_spec.precompiled_charsmap
    steps = [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    backend.normalizer = normalizers.Sequence(([normalizers.Precompiled(charsmap)] if charsmap else []) + steps)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return backend


def _sentencepiece_merges(ids: dict[str, int], vocab_scores: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE model: every split of a piece into two pieces, by score."""
    merges = []
    for piece, score in dict(vocab_scores).items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        merges.extend(sorted(local, key=lambda m: (ids[m[0]], ids[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


_BUILDERS = {"wordpiece": _wordpiece, "bpe": _byte_level_bpe, "sentencepiece": _sentencepiece}


def _sync_backend(backend: Any, kind: _Kind, config: dict[str, Any], specials: dict[str, Any]) -> None:
    """Apply tokenizer_config's options to the pipeline, as transformers' fast classes do on load.

    BERT-likes re-set the normalizer's lower-casing, accents and CJK handling from ``do_lower_case``
    etc. (defaults True/None/True); RoBERTa-likes the post-processor's ``add_prefix_space`` and
    ``trim_offsets``; GPT-NeoX replaces the post-processor by one from ``add_bos_token``/``add_eos_token``.
    """
    from tokenizers import processors

    def tid(token: str) -> int:
        i = backend.token_to_id(token)
        if i is None:
            raise ValueError(f"the special token {token!r} is not in the {kind.name}'s vocabulary")
        return i

    if kind.builder == "wordpiece":
        if backend.normalizer is not None:
            state = json.loads(backend.normalizer.__getstate__())
            want = {
                "lowercase": config.get("do_lower_case", True),
                "strip_accents": config.get("strip_accents"),
                "handle_chinese_chars": config.get("tokenize_chinese_chars", True),
            }
            if state.get("type") == "BertNormalizer" and any(state.get(k, v) != v for k, v in want.items()):
                from tokenizers import normalizers

                state.pop("type")
                backend.normalizer = normalizers.BertNormalizer(**{**state, **want})
        if backend.post_processor is None:
            cls, sep = specials["cls_token"], specials["sep_token"]
            pair = f"{cls}:0 $A:0 {sep}:0 {sep}:0 $B:1 {sep}:1" if kind.name == "MPNetTokenizer" else None
            backend.post_processor = processors.TemplateProcessing(
                single=f"{cls}:0 $A:0 {sep}:0",
                pair=pair or f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
                special_tokens=[(cls, tid(cls)), (sep, tid(sep))],
            )
    elif kind.name == "RobertaTokenizer":
        options = {
            "add_prefix_space": config.get("add_prefix_space", False),
            "trim_offsets": config.get("trim_offsets", True),
        }
        if backend.post_processor is None:
            cls, sep = specials["cls_token"], specials["sep_token"]
            backend.post_processor = processors.RobertaProcessing(sep=(sep, tid(sep)), cls=(cls, tid(cls)), **options)
        else:
            state = json.loads(backend.post_processor.__getstate__())
            if state.get("type") == "RobertaProcessing" and any(state.get(k, v) != v for k, v in options.items()):
                backend.post_processor = processors.RobertaProcessing(
                    sep=tuple(state["sep"]), cls=tuple(state["cls"]), **options
                )
    elif kind.name == "XLMRobertaTokenizer":
        if backend.post_processor is None:
            cls, sep = specials["cls_token"], specials["sep_token"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{cls} $A {sep}",
                pair=f"{cls} $A {sep} {sep} $B {sep}",
                special_tokens=[(cls, tid(cls)), (sep, tid(sep))],
            )
    elif kind.name == "GPTNeoXTokenizer":
        bos = specials.get("bos_token") if config.get("add_bos_token", False) else None
        eos = specials.get("eos_token") if config.get("add_eos_token", False) else None
        single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
        used = [t for t in dict.fromkeys([bos, eos]) if t]
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tid(t)) for t in used]
        )


def _backend_options(backend: Any, tokenizer_class: str) -> dict[str, Any]:
    """The tokenizer_config options that reproduce ``backend`` when transformers (or we) read them back."""
    out: dict[str, Any] = {}
    kind = TOKENIZER_CLASSES[tokenizer_class]
    if kind.builder == "wordpiece" and backend.normalizer is not None:
        state = json.loads(backend.normalizer.__getstate__())
        if state.get("type") == "BertNormalizer":
            out["do_lower_case"] = state["lowercase"]
            out["strip_accents"] = state["strip_accents"]
            out["tokenize_chinese_chars"] = state["handle_chinese_chars"]
    if tokenizer_class == "RobertaTokenizer" and backend.post_processor is not None:
        state = json.loads(backend.post_processor.__getstate__())
        if state.get("type") == "RobertaProcessing":
            out["add_prefix_space"] = state["add_prefix_space"]
            out["trim_offsets"] = state["trim_offsets"]
    return out


def _add_special_tokens(backend: Any, kind: _Kind, specials: dict[str, Any]) -> None:
    """Register the special tokens with the backend (so they are never split, and skipped on decode)."""
    from tokenizers import AddedToken

    tokens = []
    for attr in _SPECIAL_ATTRS:
        token = specials.get(attr)
        if token is not None:
            tokens.append(AddedToken(token, lstrip=attr in kind.lstrip, normalized=False, special=True))
    for token in specials.get("additional_special_tokens") or []:
        tokens.append(AddedToken(token, normalized=False, special=True))
    backend.add_special_tokens(tokens)


def _add_declared_tokens(backend: Any, added: dict[str, Any], where: str) -> None:
    """tokenizer_config's ``added_tokens_decoder`` (``{id: AddedToken fields}``), added in id order.

    As transformers does, the file's flags (``lstrip``, ``special``...) win for tokens already in
    the vocabulary; a token that would land on another id than declared is an error.
    """
    from tokenizers import AddedToken

    fields = ("lstrip", "rstrip", "single_word", "normalized", "special")
    try:
        entries = sorted((int(i), d) for i, d in added.items())
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: added_tokens_decoder must map ids to tokens: {e}") from e
    for want, entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ValueError(f"{where}: added_tokens_decoder[{want}] must be {{'content': ..., ...}}, not {entry!r}")
        token = AddedToken(entry["content"], **{k: bool(entry[k]) for k in fields if k in entry})
        if entry.get("special"):
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        got = backend.token_to_id(entry["content"])
        if got != want:
            raise ValueError(f"{where}: added token {entry['content']!r} is declared with id {want} but gets {got}")


def _add_legacy_added_tokens(backend: Any, path: str) -> None:
    """``added_tokens.json`` (``{token: id}``) of older checkpoints: added in id order, ids checked."""
    file = os.path.join(path, ADDED_TOKENS_FILE)
    if not os.path.isfile(file):
        return
    from tokenizers import AddedToken

    for token, want in sorted(_read_json(file).items(), key=lambda kv: kv[1]):
        if backend.token_to_id(token) is None:
            backend.add_tokens([AddedToken(token)])
        got = backend.token_to_id(token)
        if got != want:
            raise ValueError(f"{file}: token {token!r} should have id {want} but gets {got}")
