"""Text in, answers out: ``nezha_zoo.pipeline`` in PyTorch, TensorFlow and Flax, and ``model(enc)``.

Tiny seeded checkpoints (drawn from the spec, saved with ``save_weights``) and tokenizer files built
here: a WordPiece ``vocab.txt`` (Electra heads), MPNet with a sentence-transformers layout, MPT with a
byte-level BPE ``tokenizer.json``.  Every task's answers are the same in the three frameworks, and
equal to transformers 4.57's pipelines on the same files where transformers has the task.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nezha_zoo import AutoConfig, pipeline
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec import get_family
from nezha_zoo.testing import pin_precision, to_numpy

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax]

FRAMEWORKS = ("pt", "tf", "flax")
WORDS = (
    "the a is of in and paris france capital city river john smith lives works london berlin germany "
    "what where who which quick brown fox jumps over lazy dog hello world good bad movie great terrible"
).split()
PIECES = ["##s", "##ed", "##ing", "##er", "##ly"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CONTEXT = (
    "John Smith lives in Paris , the capital of France . The river of the city is quick . "
    "Berlin is the capital of Germany and London is a city . John works in Berlin ."
)
TEXTS = ["John Smith lives in Paris .", "the quick brown fox jumps over the lazy dog", "hello world"]
NER = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _electra(path, head: str, **extra) -> str:
    cfg = dict(
        vocab_size=len(SPECIALS) + len(WORDS) + len(PIECES) + 3,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    return _save(path, "electra", head, {**cfg, **extra}, _wordpiece)


def _save(path, family: str, head: str, cfg: dict, tokenizer) -> str:
    fam = get_family(family)
    config = fam.config_class(**cfg)
    spec = fam.model_spec(config, head)
    save_weights(path, config, spec, fam, random_weights(spec, config, seed=7))
    tokenizer(path)
    return str(path)


def _wordpiece(path, **config) -> None:
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(SPECIALS + WORDS + PIECES + [",", ".", "?"]) + "\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "ElectraTokenizer", "do_lower_case": True, "model_max_length": 64, **config}, fh)


def _neox(path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CONTEXT] * 4 + TEXTS * 4, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump(
            {"tokenizer_class": "GPTNeoXTokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>",
             "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, fh,
        )  # fmt: skip


def _sentence_transformers(path) -> None:
    _wordpiece(path, model_input_names=["input_ids", "attention_mask"])  # MPNet takes no token types
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    with open(os.path.join(path, "modules.json"), "w") as fh:
        json.dump(modules, fh)  # no Normalize module: no normalisation
    os.makedirs(os.path.join(path, "1_Pooling"))
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as fh:
        json.dump(
            {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, fh
        )


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    id2label = {i: n for i, n in enumerate(NER)}
    mpnet = dict(vocab_size=len(SPECIALS) + len(WORDS) + len(PIECES) + 3, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=37, max_position_embeddings=66, pad_token_id=0)  # fmt: skip
    mpt = dict(d_model=32, n_heads=4, n_layers=2, vocab_size=300, max_seq_len=64, init_device="cpu")
    return {
        "fill-mask": _electra(root / "mlm", "ForMaskedLM"),
        "text-classification": _electra(
            root / "cls", "ForSequenceClassification", id2label={0: "negative", 1: "neutral", 2: "positive"}
        ),
        "token-classification": _electra(root / "ner", "ForTokenClassification", id2label=id2label),
        "question-answering": _electra(root / "qa", "ForQuestionAnswering"),
        "feature-extraction": _electra(root / "base", "Model"),
        "sentence-embedding": _save(root / "st", "mpnet", "Model", mpnet, _sentence_transformers),
        "text-generation": _save(root / "gen", "mpt", "ForCausalLM", mpt, _neox),
    }


CALLS = {
    "fill-mask": (["paris is the [MASK] of france .", "the [MASK] brown [MASK] jumps"], {"top_k": 3}),
    "text-classification": (TEXTS, {"top_k": None}),
    "token-classification": (TEXTS, {"aggregation_strategy": "simple"}),
    "question-answering": (
        (),
        {
            "question": "where does john smith live ?",
            "context": CONTEXT,
            "top_k": 2,
            "max_seq_len": 24,
            "doc_stride": 8,
        },
    ),  # fmt: skip
    "feature-extraction": (TEXTS, {}),
    "sentence-embedding": (TEXTS, {}),
    "text-generation": (["John Smith lives", "the quick brown fox jumps over"], {"max_new_tokens": 5}),
}


def _run(task, directory, framework, device=None):
    pin_precision(framework)
    args, kw = CALLS[task]
    pipe = pipeline(task, model=directory, framework=framework, batch_size=2, device=device)
    return pipe(*(args,) if args else (), **kw)


def _assert_same(a, b, where="result"):
    """Equal structure, labels and spans; scores and vectors within 1e-4."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, (float, np.ndarray, np.floating)):
        np.testing.assert_allclose(
            np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=1e-4, err_msg=where
        )
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def pt_results(dirs):
    pytest.importorskip("torch")
    return {task: _run(task, d, "pt", "cpu" if task == "fill-mask" else None) for task, d in dirs.items()}


@pytest.mark.parametrize("framework", ["tf", "flax"])
def test_every_task_gives_the_same_answers_in_every_framework(dirs, pt_results, framework):
    pytest.importorskip({"tf": "tensorflow", "flax": "jax"}[framework])
    for task, directory in dirs.items():
        device = {"tf": "/CPU:0", "flax": "cpu"}[framework] if task == "fill-mask" else None  # device= runs too
        _assert_same(pt_results[task], _run(task, directory, framework, device), f"{task}/{framework}")


def test_answers_have_the_documented_shapes(dirs, pt_results):
    r = pt_results
    assert [len(x) for x in r["fill-mask"]] == [3, 2] and len(r["fill-mask"][1][0]) == 3  # one list per mask
    assert {"score", "token", "token_str", "sequence"} == set(r["fill-mask"][0][0])
    assert [len(x) for x in r["text-classification"]] == [3, 3, 3]
    assert {x["label"] for x in r["text-classification"][0]} == {"negative", "neutral", "positive"}
    assert all(e["entity_group"] in {"PER", "LOC"} for row in r["token-classification"] for e in row)
    for ans in r["question-answering"]:
        assert CONTEXT[ans["start"] : ans["end"]] == ans["answer"] and ans["answer"]
    assert [x.shape for x in r["feature-extraction"]] == [(8, 32), (11, 32), (4, 32)]
    assert r["sentence-embedding"].shape == (3, 64)  # cls + mean, not normalised
    assert r["text-generation"][0][0]["generated_text"].startswith("John Smith lives")


def test_sentence_embedding_pooling_against_the_hidden_states(dirs, pt_results):
    hidden = pipeline("feature-extraction", model=dirs["sentence-embedding"])(TEXTS)
    want = np.stack([np.concatenate([h[0], h.mean(0)]) for h in hidden])
    np.testing.assert_allclose(pt_results["sentence-embedding"], want, atol=1e-5)
    os.remove(os.path.join(dirs["sentence-embedding"], "modules.json"))  # the default: mean + L2 normalise
    try:
        emb = pipeline("sentence-embedding", model=dirs["sentence-embedding"])(TEXTS[0])
    finally:
        _sentence_transformers_modules(dirs["sentence-embedding"])
    mean = hidden[0].mean(0)
    np.testing.assert_allclose(emb, mean / np.linalg.norm(mean), atol=1e-5)


def _sentence_transformers_modules(path) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    with open(os.path.join(path, "modules.json"), "w") as fh:
        json.dump(modules, fh)


@pytest.mark.hf
@pytest.mark.parametrize("task", [t for t in CALLS if t != "sentence-embedding"])  # transformers has no such task
def test_answers_equal_transformers_pipelines(dirs, pt_results, task):
    transformers = pytest.importorskip("transformers")
    args, kw = CALLS[task]
    hf = transformers.pipeline(task, model=dirs[task], tokenizer=dirs[task], framework="pt")
    if task == "question-answering":
        want = hf(**kw)
    elif task == "feature-extraction":  # transformers: a (1, L, H) nested list per text
        want = [np.asarray(x, dtype=np.float32)[0] for x in hf(list(args))]
    elif task == "text-generation":
        want = hf(list(args), do_sample=False, **kw)
    else:
        want = hf(list(args), **kw)
    _assert_same(pt_results[task], _plain(want), task)


@pytest.mark.hf
@pytest.mark.parametrize("strategy", ["none", "first"])
def test_token_classification_strategies_equal_transformers(dirs, strategy):
    transformers = pytest.importorskip("transformers")
    texts = ["John Smithed lives in Parising ,", "berliner works quickly"]
    ours = pipeline("token-classification", model=dirs["token-classification"])
    got = ours(texts, aggregation_strategy=strategy, ignore_labels=[])  # "O" too: every word is compared
    assert all(got)
    hf = transformers.pipeline("token-classification", model=dirs["token-classification"], framework="pt")
    _assert_same(got, _plain(hf(texts, aggregation_strategy=strategy, ignore_labels=[])), strategy)
    label = "entity" if strategy == "none" else "entity_group"
    assert ours(texts, aggregation_strategy=strategy) == [[e for e in row if e[label] != "O"] for row in got]


def _plain(x):
    """transformers' numpy scalars and float32 scores as Python values."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def test_bad_input_is_a_clear_error(dirs, tmp_path):
    fill = pipeline("fill-mask", model=dirs["fill-mask"])
    with pytest.raises(ValueError, match="empty string"):
        fill("")
    with pytest.raises(TypeError, match="must be a string"):
        fill(42)
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a string"):
        fill(["a [MASK]", None])
    with pytest.raises(ValueError, match="no mask token"):
        fill("paris is nice")
    with pytest.raises(ValueError, match="unknown task"):
        pipeline("summarization", model=dirs["fill-mask"])
    with pytest.raises(ValueError, match="unknown framework"):
        pipeline("fill-mask", model=dirs["fill-mask"], framework="mxnet")
    bare = tmp_path / "bare"
    bare.mkdir()
    AutoConfig.from_pretrained(dirs["fill-mask"]).to_json_file(str(bare / "config.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        pipeline("fill-mask", model=bare)
    with pytest.raises(ValueError, match="no config.json"):
        pipeline("fill-mask", model=tmp_path)
    qa = pipeline("question-answering", model=dirs["question-answering"])
    with pytest.raises(ValueError, match="doc_stride"):
        qa(question="who ?", context=CONTEXT, max_seq_len=16, doc_stride=20)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_models_take_a_tokenizers_output_as_it_is(dirs, framework):
    """model(**enc) and model(enc), enc our BatchEncoding or transformers' (a Mapping, not a dict)."""
    pytest.importorskip({"pt": "torch", "tf": "tensorflow", "flax": "jax"}[framework])
    transformers = pytest.importorskip("transformers")
    from nezha_zoo import AutoTokenizer
    from nezha_zoo.spec import model_class

    pin_precision(framework)
    tensors = {"pt": "pt", "tf": "tf", "flax": "jax"}[framework]
    cases = (
        ("electra", "Model", dirs["feature-extraction"]),
        ("mpnet", "Model", dirs["sentence-embedding"]),
        ("mpt", "ForCausalLM", dirs["text-generation"]),
    )
    for family, head, directory in cases:
        model = model_class(family, head, framework).from_pretrained(directory)
        if hasattr(model, "jit_after_calls"):  # one path for every call: Flax compiles a repeated one
            model.jit_after_calls = None  # (XLA's fused rounding differs from op by op in the last bit)
        tok = AutoTokenizer.from_pretrained(directory)
        enc = tok(TEXTS, padding=True, return_tensors=tensors, return_offsets_mapping=True)
        want = to_numpy(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0])
        if family == "electra":
            want = to_numpy(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[0])
        hf_enc = transformers.BatchEncoding({k: v for k, v in enc.items() if k != "offset_mapping"})
        assert not isinstance(hf_enc, dict)
        for got in (model(**enc), model(enc), model(hf_enc), model(**hf_enc)):
            np.testing.assert_allclose(to_numpy(got[0]), want, atol=1e-6)
        bad = dict(tok(TEXTS, padding=True, return_tensors=tensors, return_token_type_ids=True))
        if family != "electra":  # MPNet and MPT take no token types: a clear error, not a silent drop
            with pytest.raises(TypeError, match="token_type_ids"):
                model(bad)
            with pytest.raises(TypeError, match="token_type_ids"):
                model(**bad)
            del bad["token_type_ids"]
        bad["input_idz"] = bad["input_ids"]
        with pytest.raises(TypeError, match="input_idz"):
            model(bad)
        with pytest.raises(TypeError, match="input_idz"):
            model(**bad)


def test_cli_run_answers_from_the_command_line(dirs, pt_results, capsys):
    from nezha_zoo.cli.main import main

    question = CALLS["question-answering"][1]
    argv = ["run", "question-answering", dirs["question-answering"], question["question"], "--context", CONTEXT]
    assert main([*argv, "--top-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == question["question"]
    # the pipeline's default window (max_seq_len 64 = the tokenizer's limit) differs from CALLS': compare to it
    want = pipeline("question-answering", model=dirs["question-answering"])(
        question=question["question"], context=CONTEXT, top_k=2
    )
    _assert_same(out["result"], want, "cli")
    assert main(["run", "fill-mask", dirs["fill-mask"], CALLS["fill-mask"][0][0], "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split()[1] == repr(pt_results["fill-mask"][0][0]["token_str"])
    assert main(["run", "text-classification", dirs["text-classification"], *TEXTS[:2], "--framework", "pt"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{TEXTS[0]}:" and lines[1].split()[0] == pt_results["text-classification"][0][0]["label"]
    assert main(["run", "question-answering", dirs["question-answering"], "who ?"]) == 2
    assert "--context" in capsys.readouterr().err
    assert main(["run", "fill-mask", dirs["fill-mask"], ""]) == 2
    assert "empty string" in capsys.readouterr().err


@pytest.mark.hf
@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_text_classification_scores_follow_problem_type(dirs, tmp_path, problem_type):
    """Sigmoid for multi-label, raw logits for regression, as transformers' pipeline."""
    import shutil

    transformers = pytest.importorskip("transformers")
    directory = shutil.copytree(dirs["text-classification"], tmp_path / "cls")
    with open(directory / "config.json") as fh:
        config = json.load(fh)
    with open(directory / "config.json", "w") as fh:
        json.dump({**config, "problem_type": problem_type}, fh)
    ours = pipeline("text-classification", model=directory)(TEXTS, top_k=None)
    hf = transformers.pipeline("text-classification", model=str(directory), framework="pt")
    _assert_same(ours, _plain(hf(TEXTS, top_k=None)), problem_type)
    softmax = pipeline("text-classification", model=dirs["text-classification"])(TEXTS, top_k=None)
    assert [r[0]["score"] for r in ours] != [r[0]["score"] for r in softmax]
