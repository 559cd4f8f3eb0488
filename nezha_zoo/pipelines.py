"""Task pipelines: text in, answers out, the same in PyTorch, TensorFlow and Flax.

``pipeline(task, model=DIR, framework="pt"|"tf"|"flax")`` loads the directory's tokenizer
(:class:`~nezha_zoo.AutoTokenizer`) and the model class of the task's head through the class registry
(:func:`nezha_zoo.spec.model_class`).  Everything before and after the forward pass (tokenizing,
padding, softmax, top-k, word grouping, answer spans, pooling) is written once here in numpy; a
backend only runs the model (:class:`_Runner`), so the three frameworks give the same answers.

The post-processing follows transformers 4.57's pipelines (``fill-mask``, ``text-classification``,
``token-classification``, ``question-answering``, ``text-generation``, ``feature-extraction``) and
sentence-transformers' ``Pooling``/``Normalize`` modules (``sentence-embedding``).  A single text gives
a single result, a list of texts a list of results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nezha_zoo.tokenization import BatchEncoding, Tokenizer

__all__ = ["TASKS", "pipeline", "Pipeline"]

#: task -> the head its model class has.
TASKS: dict[str, str] = {
    "feature-extraction": "Model",
    "sentence-embedding": "Model",
    "fill-mask": "ForMaskedLM",
    "text-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "question-answering": "ForQuestionAnswering",
    "text-generation": "ForCausalLM",
}
_TENSOR_TYPE = {"pt": "pt", "tf": "tf", "flax": "jax"}
_AGGREGATIONS = ("none", "simple", "first")


def pipeline(
    task: str,
    model: str | os.PathLike,
    framework: str = "pt",
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    device: str | None = None,
    batch_size: int = 8,
) -> Pipeline:
    """Build the pipeline of ``task`` over a checkpoint directory.

    Args:
        task (str): one of :data:`TASKS`.
        model (str | os.PathLike): a directory with ``config.json``, weights and (unless ``tokenizer``
            is given) tokenizer files.
        framework (str): ``"pt"``, ``"tf"`` or ``"flax"``.
        tokenizer (Tokenizer | str | None): a tokenizer or a directory to read one from; default ``model``.
        device (str | None): where the model runs: a torch device (``"cuda:0"``), a TF device
            (``"/GPU:0"``) or a JAX platform (``"gpu"``); None: the framework's default.
        batch_size (int): texts per forward pass (each batch is padded to its longest text).

    Returns:
        Pipeline: call it with a text or a list of texts (see each task's ``__call__``).

    Raises:
        ValueError: an unknown task or framework, or a directory that is not a checkpoint.
        FileNotFoundError: no tokenizer files in the directory (and no ``tokenizer`` given).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; nezha_zoo.pipeline knows {sorted(TASKS)}")
    if framework not in _TENSOR_TYPE:
        raise ValueError(f"unknown framework {framework!r}; use one of {sorted(_TENSOR_TYPE)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, not {batch_size!r}")
    directory = os.fspath(model)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"{directory!r} is not a checkpoint directory: it has no config.json")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_pretrained(directory if tokenizer is None else tokenizer)
    elif not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a nezha_zoo Tokenizer or a directory, not {type(tokenizer).__name__}")
    return _PIPELINES[task](task, directory, framework, tokenizer, device, batch_size)


class _Runner:
    """Loads the model of a head in one framework and runs it on numpy inputs, returning numpy outputs."""

    def __init__(self, directory: str, head: str, framework: str, device: str | None) -> None:
        from nezha_zoo.auto import AutoConfig
        from nezha_zoo.spec.registry import family_of_config, model_class

        config = AutoConfig.from_pretrained(directory)
        self.framework = framework
        self.device = device
        self.model = model_class(family_of_config(config), head, framework).from_pretrained(directory)
        self.config = self.model.config
        if framework == "pt":
            self.model.eval()
            if device is not None:
                self.model.to(device)

    def _inputs(self, arrays: Mapping[str, np.ndarray]) -> BatchEncoding:
        enc = BatchEncoding({k: np.asarray(v) for k, v in arrays.items()})
        if self.framework == "flax" and self.device is not None:
            import jax

            target = jax.devices(self.device)[0]
            return BatchEncoding({k: jax.device_put(v, target) for k, v in enc.items()})
        enc.convert_to_tensors(_TENSOR_TYPE[self.framework])
        if self.framework == "pt" and self.device is not None:
            return BatchEncoding({k: v.to(self.device) for k, v in enc.items()})
        return enc

    def _run(self, fn: Any) -> Any:
        if self.framework == "pt":
            import torch

            with torch.no_grad():
                return fn()
        if self.framework == "tf" and self.device is not None:
            import tensorflow as tf

            with tf.device(self.device):
                return fn()
        return fn()

    def forward(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's output fields (as float32/int numpy arrays) for a padded batch."""
        enc = self._inputs(arrays)
        if self.framework == "tf":
            out = self._run(lambda: self.model(enc, training=False))
        else:
            out = self._run(lambda: self.model(enc))
        return {k: _numpy(v) for k, v in out.items() if not isinstance(v, (tuple, list, dict))}

    def generate(self, arrays: Mapping[str, np.ndarray], **settings: Any) -> np.ndarray:
        """``model.generate`` on a left-padded batch; (B, P + n) ids."""
        enc = self._inputs(arrays)
        return _numpy(self._run(lambda: self.model.generate(**enc, **settings)))


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch: leave the graph and the device (bfloat16 has no numpy dtype)
        x = x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
    return np.asarray(x)


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _texts(inputs: Any, what: str = "inputs") -> tuple[bool, list[str]]:
    """(single, texts): a text or a non-empty list of non-empty texts, else a clear error."""
    single = isinstance(inputs, str)
    texts = [inputs] if single else inputs
    if not isinstance(texts, (list, tuple)) or not texts:
        raise TypeError(f"{what} must be a string or a non-empty list of strings, not {type(inputs).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] must be a string, not {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"{what}[{i}] is an empty string; a pipeline needs some text")
    return single, list(texts)


def _top_k(top_k: Any, default_none_ok: bool = False) -> int | None:
    if top_k is None and default_none_ok:
        return None
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, not {top_k!r}")
    return top_k


class Pipeline:
    """Base of the task pipelines.

    Attributes:
        task (str): the task name.
        framework (str): ``"pt"``, ``"tf"`` or ``"flax"``.
        tokenizer (Tokenizer): the tokenizer.
        model: the backend model (``nezha_zoo.pt.ElectraForMaskedLM``...).
        batch_size (int): texts per forward pass.
    """

    def __init__(
        self, task: str, directory: str, framework: str, tokenizer: Tokenizer, device: str | None, batch_size: int
    ) -> None:
        self.task = task
        self.framework = framework
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.directory = directory
        self._runner = _Runner(directory, TASKS[task], framework, device)
        self.model = self._runner.model
        self.config = self._runner.config

    def __repr__(self) -> str:
        model = type(self.model).__name__
        return f"{type(self).__name__}(task={self.task!r}, model={model}, framework={self.framework!r})"

    def _encode(self, texts: list[str], **kw: Any) -> BatchEncoding:
        return self.tokenizer(texts, padding=True, return_tensors="np", **kw)

    def _model_inputs(self, enc: Mapping[str, Any], rows: slice | None = None) -> dict[str, np.ndarray]:
        names = [k for k in self.tokenizer.model_input_names if k in enc]
        return {k: np.asarray(enc[k])[rows if rows is not None else slice(None)] for k in names}

    def _batches(self, texts: list[str], **kw: Any):
        """(texts of the batch, its encoding (numpy, padded), the model's numpy outputs) per batch."""
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i : i + self.batch_size]
            enc = self._encode(chunk, **kw)
            yield chunk, enc, self._runner.forward(self._model_inputs(enc))


class FeatureExtractionPipeline(Pipeline):
    """``feature-extraction``: the last hidden states of each text, ``(L_i, H)`` float32 without padding."""

    def __call__(self, inputs: str | Sequence[str], truncation: bool | None = None) -> Any:
        single, texts = _texts(inputs)
        out = []
        for _chunk, enc, res in self._batches(texts, truncation=truncation):
            hidden = res["last_hidden_state"]
            for row, mask in zip(hidden, enc["attention_mask"]):
                out.append(row[mask.astype(bool)])
        return out[0] if single else out


class SentenceEmbeddingPipeline(Pipeline):
    """``sentence-embedding``: one vector per text, pooled and normalised as the directory declares.

    A sentence-transformers directory's ``modules.json`` names its modules; ``1_Pooling/config.json``
    (the Pooling module's folder) gives the pooling modes, concatenated in sentence-transformers' order
    (cls, max, mean, mean_sqrt_len, weightedmean, lasttoken); a ``Normalize`` module L2-normalises.
    Without ``modules.json``: mean pooling and L2 normalisation.  ``sentence_bert_config.json``'s
    ``max_seq_length`` truncates.
    """

    _MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.pooling, self.normalize, self.max_seq_length = _sentence_transformers_setup(self.directory)

    def __call__(self, inputs: str | Sequence[str]) -> np.ndarray:
        """Returns (H',) for a text, (B, H') for a list (H' = H times the number of pooling modes)."""
        single, texts = _texts(inputs)
        kw = {"truncation": True, "max_length": self.max_seq_length} if self.max_seq_length else {}
        rows = []
        for _chunk, enc, res in self._batches(texts, **kw):
            rows.append(self._pool(res["last_hidden_state"], np.asarray(enc["attention_mask"])))
        emb = np.concatenate(rows, axis=0)
        if self.normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        return emb[0] if single else emb

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        m = mask[..., None].astype(hidden.dtype)
        parts = []
        for mode in self.pooling:
            if mode == "cls_token":
                parts.append(hidden[:, 0])
            elif mode == "max_tokens":
                parts.append(np.where(m > 0, hidden, -1e9).max(axis=1))
            elif mode in ("mean_tokens", "mean_sqrt_len_tokens"):
                total, count = (hidden * m).sum(axis=1), np.maximum(m.sum(axis=1), 1e-9)
                parts.append(total / (count if mode == "mean_tokens" else np.sqrt(count)))
            elif mode == "weightedmean_tokens":
                w = m * np.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype)[None, :, None]
                parts.append((hidden * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-9))
            else:  # lasttoken: the last unmasked position of each row
                last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
                parts.append(hidden[np.arange(hidden.shape[0]), last])
        return np.concatenate(parts, axis=-1)


def _sentence_transformers_setup(directory: str) -> tuple[list[str], bool, int | None]:
    """(pooling modes, normalize, max_seq_length) from a sentence-transformers directory's files."""
    modules_file = os.path.join(directory, "modules.json")
    st_config = os.path.join(directory, "sentence_bert_config.json")
    max_len = None
    if os.path.isfile(st_config):
        with open(st_config, encoding="utf-8") as fh:
            max_len = json.load(fh).get("max_seq_length")
    if not os.path.isfile(modules_file):
        return ["mean_tokens"], True, max_len
    with open(modules_file, encoding="utf-8") as fh:
        modules = json.load(fh)
    pooling, normalize = None, False
    for mod in modules:
        kind = str(mod.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            path = os.path.join(directory, mod.get("path", ""), "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"modules.json names a Pooling module in {mod.get('path')!r}, but {path} is missing"
                )
            with open(path, encoding="utf-8") as fh:
                cfg = json.load(fh)
            pooling = [m for m in SentenceEmbeddingPipeline._MODES if cfg.get(f"pooling_mode_{m}")]
            if not pooling:
                raise ValueError(
                    f"{path} turns on no pooling mode; nezha_zoo knows {list(SentenceEmbeddingPipeline._MODES)}"
                )
        else:
            raise ValueError(
                f"modules.json of {directory!r} has a {mod.get('type')!r} module; the sentence-embedding pipeline "
                "runs Transformer, Pooling and Normalize modules only"
            )
    if pooling is None:
        raise ValueError(f"modules.json of {directory!r} declares no Pooling module")
    return pooling, normalize, max_len


class FillMaskPipeline(Pipeline):
    """``fill-mask``: the ``top_k`` likeliest tokens at each mask, as transformers' FillMaskPipeline.

    Each result is a list of ``{"score", "token", "token_str", "sequence"}``, best first; a text with
    several masks gives one such list per mask.
    """

    def __call__(self, inputs: str | Sequence[str], top_k: int = 5) -> Any:
        single, texts = _texts(inputs)
        top_k = _top_k(top_k)
        tok = self.tokenizer
        if tok.mask_token_id is None:
            raise ValueError("this tokenizer has no mask token; fill-mask needs one")
        out = []
        for chunk, enc, res in self._batches(texts):
            for i, text in enumerate(chunk):
                keep = np.asarray(enc["attention_mask"][i]).astype(bool)  # padding out, on either side
                ids = np.asarray(enc["input_ids"][i])[keep]
                masked = np.nonzero(ids == tok.mask_token_id)[0]
                if masked.size == 0:
                    raise ValueError(f"text {text!r} holds no mask token {tok.mask_token!r}")
                probs = _softmax(res["logits"][i][keep][masked].astype(np.float32))
                k = min(top_k, probs.shape[-1])
                single_mask = masked.size == 1
                rows = []
                for m, p in zip(masked, probs):
                    best = np.argsort(-p, kind="stable")[:k]
                    row = []
                    for t in best:
                        filled = ids.copy()
                        filled[m] = t
                        if tok.pad_token_id is not None:
                            filled = filled[filled != tok.pad_token_id]
                        row.append(
                            {
                                "score": float(p[t]),
                                "token": int(t),
                                "token_str": tok.decode([int(t)]),
                                "sequence": tok.decode(filled, skip_special_tokens=single_mask),
                            }
                        )
                    rows.append(row)
                out.append(rows[0] if single_mask else rows)
        return out[0] if single else out


class TextClassificationPipeline(Pipeline):
    """``text-classification``: labels from ``config.id2label``.

    Scores: sigmoid when ``problem_type`` is ``"multi_label_classification"`` or there is one label,
    raw logits for ``"regression"``, else softmax (transformers' rule).  ``top_k=1`` gives
    ``{"label", "score"}`` per text; another ``top_k`` (None: all) a list of them, best first.
    """

    def __call__(
        self, inputs: str | Sequence[str], text_pair: str | Sequence[str] | None = None, top_k: int | None = 1
    ) -> Any:
        single, texts = _texts(inputs)
        top_k = _top_k(top_k, default_none_ok=True)
        kw = {}
        if text_pair is not None:
            pair_single, pairs = _texts(text_pair, "text_pair")
            if pair_single != single or len(pairs) != len(texts):
                raise ValueError("text_pair must match inputs: a text for a text, a list as long as the list")
            kw["text_pair"] = pairs
        cfg = self.config
        out = []
        for i in range(0, len(texts), self.batch_size):
            sl = slice(i, i + self.batch_size)
            enc = self._encode(texts[sl], **({"text_pair": kw["text_pair"][sl]} if kw else {}))
            logits = self._runner.forward(self._model_inputs(enc))["logits"].astype(np.float32)
            if cfg.problem_type == "regression":
                scores = logits
            elif cfg.problem_type == "multi_label_classification" or cfg.num_labels == 1:
                scores = _sigmoid(logits)
            else:
                scores = _softmax(logits)
            for row in scores:
                if top_k == 1:
                    best = int(row.argmax())
                    out.append({"label": cfg.id2label[best], "score": float(row[best])})
                else:
                    order = np.argsort(-row, kind="stable")[:top_k]
                    out.append([{"label": cfg.id2label[int(j)], "score": float(row[j])} for j in order])
        return out[0] if single else out


class TokenClassificationPipeline(Pipeline):
    """``token-classification``: entities, grouped into words as transformers' TokenClassificationPipeline.

    ``aggregation_strategy``: ``"none"`` (one result per token: ``entity``, ``score``, ``index``, ``word``,
    ``start``, ``end``), ``"simple"`` (adjacent tokens of one entity grouped: ``entity_group``...),
    ``"first"`` (each word takes its first token's label, then grouped).  Labels in ``ignore_labels``
    (default ``["O"]``) are left out.
    """

    def __call__(
        self, inputs: str | Sequence[str], aggregation_strategy: str = "none", ignore_labels: Sequence[str] = ("O",)
    ) -> Any:
        single, texts = _texts(inputs)
        if aggregation_strategy not in _AGGREGATIONS:
            raise ValueError(f"aggregation_strategy must be one of {list(_AGGREGATIONS)}, not {aggregation_strategy!r}")
        out = []
        kw = {"return_offsets_mapping": True, "return_special_tokens_mask": True}
        for chunk, enc, res in self._batches(texts, **kw):
            for i, text in enumerate(chunk):
                keep = np.asarray(enc["attention_mask"][i]).astype(bool)
                scores = _softmax(res["logits"][i][keep].astype(np.float32))
                pre = self._pre_entities(
                    text, np.asarray(enc["input_ids"][i])[keep], scores, np.asarray(enc["offset_mapping"][i])[keep],
                    np.asarray(enc["special_tokens_mask"][i])[keep], aggregation_strategy,
                )  # fmt: skip
                ents = self._aggregate(pre, aggregation_strategy)
                out.append([e for e in ents if e.get("entity", e.get("entity_group")) not in ignore_labels])
        return out[0] if single else out

    def _pre_entities(self, text, ids, scores, offsets, special, strategy) -> list[dict]:
        tok = self.tokenizer
        word_aware = getattr(tok.backend_tokenizer.model, "continuing_subword_prefix", None)
        pre = []
        for idx, token_scores in enumerate(scores):
            if special[idx]:
                continue
            word = tok.convert_ids_to_tokens(int(ids[idx]))
            start, end = int(offsets[idx][0]), int(offsets[idx][1])
            word_ref = text[start:end]
            if word_aware:
                is_subword = len(word) != len(word_ref)
            else:  # transformers' fallback heuristic for tokenizers without a subword prefix
                is_subword = start > 0 and " " not in text[start - 1 : start + 1]
            if int(ids[idx]) == tok.unk_token_id:
                word, is_subword = word_ref, False
            pre.append(
                {
                    "word": word,
                    "scores": token_scores,
                    "start": start,
                    "end": end,
                    "index": idx,
                    "is_subword": is_subword,
                }
            )
        return pre

    def _aggregate(self, pre: list[dict], strategy: str) -> list[dict]:
        id2label = self.config.id2label
        if strategy in ("none", "simple"):
            entities = []
            for p in pre:
                j = int(p["scores"].argmax())
                entities.append(
                    {"entity": id2label[j], "score": float(p["scores"][j]), "index": p["index"], "word": p["word"],
                     "start": p["start"], "end": p["end"]}
                )  # fmt: skip
            if strategy == "none":
                return entities
        else:  # first: each word takes its first token's label
            entities, group = [], None
            for p in pre:
                if group is not None and p["is_subword"]:
                    group.append(p)
                    continue
                if group is not None:
                    entities.append(self._first(group))
                group = [p]
            if group is not None:
                entities.append(self._first(group))
        return self._group(entities)

    def _first(self, group: list[dict]) -> dict:
        scores = group[0]["scores"]
        j = int(scores.argmax())
        word = self.tokenizer.convert_tokens_to_string([g["word"] for g in group])
        return {"entity": self.config.id2label[j], "score": float(scores[j]), "word": word,
                "start": group[0]["start"], "end": group[-1]["end"]}  # fmt: skip

    @staticmethod
    def _tag(name: str) -> tuple[str, str]:
        if name.startswith("B-"):
            return "B", name[2:]
        if name.startswith("I-"):
            return "I", name[2:]
        return "I", name  # not B-/I-: a continuation

    def _group(self, entities: list[dict]) -> list[dict]:
        groups, current = [], []
        for e in entities:
            if current:
                bi, tag = self._tag(e["entity"])
                _, last = self._tag(current[-1]["entity"])
                if tag != last or bi == "B":
                    groups.append(self._close(current))
                    current = []
            current.append(e)
        if current:
            groups.append(self._close(current))
        return groups

    def _close(self, group: list[dict]) -> dict:
        return {
            "entity_group": group[0]["entity"].split("-", 1)[-1],
            "score": float(np.nanmean([g["score"] for g in group])),
            "word": self.tokenizer.convert_tokens_to_string([g["word"] for g in group]),
            "start": group[0]["start"],
            "end": group[-1]["end"],
        }


class QuestionAnsweringPipeline(Pipeline):
    """``question-answering``: the answer's text and character span in the context.

    Long contexts are cut into windows of ``max_seq_len`` tokens overlapping by ``doc_stride``
    (transformers' defaults: ``min(model_max_length, 384)`` and ``min(max_seq_len // 2, 128)``); spans
    longer than ``max_answer_len`` tokens are not considered; answers snap to whole words.  Returns
    ``{"score", "start", "end", "answer"}`` (``top_k > 1``: a list, best first).  The question comes
    first (transformers' order for right-padding tokenizers); impossible answers are not returned.
    """

    def __call__(
        self,
        question: str | Sequence[str],
        context: str | Sequence[str],
        top_k: int = 1,
        doc_stride: int | None = None,
        max_answer_len: int = 15,
        max_seq_len: int | None = None,
        stride: int | None = None,
    ) -> Any:
        single, questions = _texts(question, "question")
        csingle, contexts = _texts(context, "context")
        if csingle and not single:
            contexts = contexts * len(questions)
        if len(contexts) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
        top_k = _top_k(top_k)
        if not isinstance(max_answer_len, int) or max_answer_len < 1:
            raise ValueError(f"max_answer_len must be a positive int, not {max_answer_len!r}")
        if stride is not None and doc_stride is not None and stride != doc_stride:
            raise ValueError("give doc_stride or stride (the same setting), not both")
        doc_stride = stride if doc_stride is None else doc_stride
        tok = self.tokenizer
        max_seq_len = min(tok.model_max_length, 384) if max_seq_len is None else max_seq_len
        doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
        if doc_stride > max_seq_len:
            raise ValueError(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len})")
        out = []
        for q, c in zip(questions, contexts):
            enc = tok(
                [q], [c], padding=True, truncation="only_second", max_length=max_seq_len, stride=doc_stride,
                return_overflowing_tokens=True, return_offsets_mapping=True, return_tensors="np",
            )  # fmt: skip
            starts, ends = [], []
            n = len(enc["input_ids"])
            for i in range(0, n, self.batch_size):
                res = self._runner.forward(self._model_inputs(enc, slice(i, i + self.batch_size)))
                starts.append(res["start_logits"].astype(np.float32))
                ends.append(res["end_logits"].astype(np.float32))
            start_logits, end_logits = np.concatenate(starts), np.concatenate(ends)
            answers: list[dict] = []
            for span in range(n):
                encoding = enc.encodings[span]
                ids = np.asarray(enc["input_ids"][span])
                p_mask = np.array([s != 1 for s in encoding.sequence_ids], dtype=np.int64)
                if tok.cls_token_id is not None:
                    p_mask[ids == tok.cls_token_id] = 0
                mask = np.asarray(enc["attention_mask"][span])[None]
                s_idx, e_idx, scores = _select_starts_ends(
                    start_logits[span][None], end_logits[span][None], p_mask, mask, top_k * 2 + 10, max_answer_len
                )
                for s, e, score in zip(s_idx, e_idx, scores):
                    a, b = _word_span(encoding, int(s), int(e))
                    target = c[a:b]
                    same = next((x for x in answers if x["answer"].lower() == target.lower()), None)
                    if same is not None:
                        same["score"] += float(score)
                    else:
                        answers.append({"score": float(score), "start": a, "end": b, "answer": target})
            answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
            out.append(answers[0] if len(answers) == 1 else answers)
        return out[0] if single else out


def _select_starts_ends(start, end, p_mask, attention_mask, top_k, max_answer_len):
    """transformers' ``select_starts_ends`` + ``decode_spans`` (no impossible answer), rows of shape (1, L)."""
    undesired = np.abs(np.array(p_mask) - 1) & attention_mask
    bad = undesired == 0.0
    start = np.exp(np.where(bad, -10000.0, start) - np.where(bad, -10000.0, start).max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(np.where(bad, -10000.0, end) - np.where(bad, -10000.0, end).max(axis=-1, keepdims=True))
    end = end / end.sum()
    start[0, 0] = end[0, 0] = 0.0
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    flat = candidates.flatten()
    if top_k == 1:
        order = [np.argmax(flat)]
    elif len(flat) < top_k:
        order = np.argsort(-flat)
    else:
        idx = np.argpartition(-flat, top_k)[0:top_k]
        order = idx[np.argsort(-flat[idx])]
    starts, ends = np.unravel_index(order, candidates.shape)[1:]
    wanted = np.isin(starts, undesired.nonzero()) & np.isin(ends, undesired.nonzero())
    starts, ends = starts[wanted], ends[wanted]
    return starts, ends, candidates[0, starts, ends]


def _word_span(encoding: Any, s: int, e: int) -> tuple[int, int]:
    """Character span of tokens s..e in the context, widened to whole words (transformers' get_indices)."""
    try:
        start_word, end_word = encoding.token_to_word(s), encoding.token_to_word(e)
        return encoding.word_to_chars(start_word, 1)[0], encoding.word_to_chars(end_word, 1)[1]
    except Exception:  # a token without a word (tokenizers raises TypeError on None): the token offsets
        return encoding.offsets[s][0], encoding.offsets[e][1]


class TextGenerationPipeline(Pipeline):
    """``text-generation``: each prompt continued by the model's ``generate``.

    Returns ``[{"generated_text": prompt + continuation}]`` per prompt (transformers' shape and
    ``return_full_text=True``).  Greedy unless ``do_sample=True``; prompts are left-padded in a batch.
    """

    def __call__(self, inputs: str | Sequence[str], max_new_tokens: int = 20, **settings: Any) -> Any:
        single, texts = _texts(inputs)
        tok = self.tokenizer
        batch = self.batch_size if tok.pad_token_id is not None else 1  # no pad token: one prompt at a time
        out = []
        for i in range(0, len(texts), batch):
            chunk = texts[i : i + batch]
            enc = tok(chunk, padding=True, padding_side="left", return_tensors="np")
            ids = self._runner.generate(self._model_inputs(enc), max_new_tokens=max_new_tokens, **settings)
            for row_in, row_out, prompt in zip(np.asarray(enc["input_ids"]), ids, chunk):
                full = tok.decode(row_out, skip_special_tokens=True)
                cut = len(tok.decode(row_in, skip_special_tokens=True))
                out.append([{"generated_text": prompt + full[cut:]}])
        return out[0] if single else out


_PIPELINES: dict[str, type[Pipeline]] = {
    "feature-extraction": FeatureExtractionPipeline,
    "sentence-embedding": SentenceEmbeddingPipeline,
    "fill-mask": FillMaskPipeline,
    "text-classification": TextClassificationPipeline,
    "token-classification": TokenClassificationPipeline,
    "question-answering": QuestionAnsweringPipeline,
    "text-generation": TextGenerationPipeline,
}
