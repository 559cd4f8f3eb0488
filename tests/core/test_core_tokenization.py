"""``nezha_zoo.AutoTokenizer`` against transformers 4.57.6's tokenizers, for every family's tokenizer kind.

Every vocabulary is made here, offline: a WordPiece ``vocab.txt`` (Nezha/Electra BERT-style, MPNet),
a byte-level BPE ``vocab.json`` + ``merges.txt`` trained with ``tokenizers`` (I-BERT/RoBERTa), a
SentencePiece model trained with ``sentencepiece`` (XLM-R-XL), a GPT-NeoX ``tokenizer.json`` (MPT),
and ``tokenizer.json`` files saved by transformers' fast classes.  Ids, masks, token types,
offsets and decodes must equal transformers' slow and fast classes on the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.hf

transformers = pytest.importorskip("transformers")

from nezha_zoo import AutoTokenizer
from nezha_zoo.tokenization import TOKENIZER_FILES, Tokenizer

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, isn't it? Yes, it is.",
    "Café naïve résumé: accents and CASES, numbers 1234 and 56.",
    "中国 北京 and Tokyo are cities; so is Zürich.",
    "I'm sure they've gone, we're late and you'd better hurry!",
    "tokenizers split text into pieces, and pieces into ids.",
]
TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France , isn't it ?",
    "Café  naïve 中国 ☃ Zürich",
    "",
    "  spaced   out  ",
]
PAIRS = [
    ("Hello world!", "The quick brown fox jumps."),
    ("Paris is the capital of France.", "Yes"),
    ("I'm sure they've gone.", "we're late and you'd better hurry!"),
]
_WP_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>", "<pad>", "<mask>"]
_RB_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _write_json(path, data) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)


def _wordpiece_dir(root, tokenizer_class: str, **config):
    """vocab.txt: the corpus' words (both cases), every character alone and as ##continuation."""
    os.makedirs(root)
    words, chars = set(), set()
    for line in CORPUS:
        for p in ",.!?;:":
            line = line.replace(p, f" {p} ")
        for w in line.split():
            words.update([w, w.lower()])
        chars.update(line.lower() + line)
    chars.discard(" ")
    vocab = _WP_SPECIALS + sorted(words - set(_WP_SPECIALS)) + sorted(chars) + [f"##{c}" for c in sorted(chars)]
    vocab += ["##s", "##ed", "##ing", "jump", "cap", "##ital"]
    with open(os.path.join(root, "vocab.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(dict.fromkeys(vocab)) + "\n")
    _write_json(os.path.join(root, "tokenizer_config.json"), {"tokenizer_class": tokenizer_class, **config})
    return str(root)


def _bpe_dir(root):
    from tokenizers import ByteLevelBPETokenizer

    os.makedirs(root)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=1000, min_frequency=1, special_tokens=_RB_SPECIALS)
    bpe.save_model(str(root))
    _write_json(os.path.join(root, "tokenizer_config.json"), {"tokenizer_class": "RobertaTokenizer"})
    return str(root)


def _spm_dir(root, model_type: str):
    import sentencepiece as spm

    os.makedirs(root)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_prefix=os.path.join(root, "spm"),
        vocab_size=90,
        model_type=model_type,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    os.rename(os.path.join(root, "spm.model"), os.path.join(root, "sentencepiece.bpe.model"))
    os.remove(os.path.join(root, "spm.vocab"))
    _write_json(os.path.join(root, "tokenizer_config.json"), {"tokenizer_class": "XLMRobertaTokenizer"})
    return str(root)


def _neox_dir(root, **config):
    """A GPT-NeoX style tokenizer.json: byte-level BPE, ByteLevel post-processor (as EleutherAI's)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    os.makedirs(root)
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(os.path.join(root, "tokenizer.json"))
    _write_json(os.path.join(root, "tokenizer_config.json"), {"tokenizer_class": "GPTNeoXTokenizer", **config})
    return str(root)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        "bert": _wordpiece_dir(root / "bert", "BertTokenizer", model_max_length=64),
        "electra-cased": _wordpiece_dir(root / "electra", "ElectraTokenizer", do_lower_case=False),
        "mpnet": _wordpiece_dir(root / "mpnet", "MPNetTokenizer"),
        "roberta": _bpe_dir(root / "roberta"),
        "xlmr": _spm_dir(root / "xlmr", "unigram"),
        "xlmr-bpe": _spm_dir(root / "xlmr_bpe", "bpe"),
        "neox": _neox_dir(root / "neox", pad_token="<|padding|>"),
    }


#: (directory, transformers' slow class or None, fast class)
KINDS = {
    "bert": ("BertTokenizer", "BertTokenizerFast"),
    "electra-cased": ("ElectraTokenizer", "ElectraTokenizerFast"),
    "mpnet": ("MPNetTokenizer", "MPNetTokenizerFast"),
    "roberta": ("RobertaTokenizer", "RobertaTokenizerFast"),
    "xlmr": ("XLMRobertaTokenizer", "XLMRobertaTokenizerFast"),
    "xlmr-bpe": ("XLMRobertaTokenizer", "XLMRobertaTokenizerFast"),
    "neox": (None, "GPTNeoXTokenizerFast"),
}


def _oracles(directory: str, kind: str) -> dict[str, object]:
    slow, fast = KINDS[kind]
    out = {"fast": getattr(transformers, fast).from_pretrained(directory)}
    if slow is not None:
        out["slow"] = getattr(transformers, slow).from_pretrained(directory)
    return out


def _calls() -> dict[str, dict]:
    """Keyword sets each tokenizer is called with (transformers' and ours alike), by label."""
    calls = {f"text{i}": dict(text=t) for i, t in enumerate(TEXTS)}
    firsts, seconds = [a for a, _ in PAIRS], [b for _, b in PAIRS]
    calls.update(
        batch_padded=dict(text=TEXTS, padding=True),
        batch_padded_left=dict(text=TEXTS, padding="longest", padding_side="left"),
        max_length_padded=dict(text=TEXTS[:3], padding="max_length", max_length=20, truncation=True),
        truncated=dict(text=TEXTS[1], truncation=True, max_length=6),
        multiple_of=dict(text=TEXTS[:2], truncation="longest_first", max_length=8, padding=True, pad_to_multiple_of=4),
        pair=dict(text=PAIRS[0][0], text_pair=PAIRS[0][1]),
        pairs_padded=dict(text=firsts, text_pair=seconds, padding=True),
        pairs_longest_first=dict(text=firsts, text_pair=seconds, truncation=True, max_length=12),
        pairs_only_first=dict(text=firsts, text_pair=["Yes", "No", "ok"], truncation="only_first", max_length=12),
        pairs_only_second=dict(
            text=[PAIRS[0][0]], text_pair=[PAIRS[2][1] * 2], truncation="only_second", max_length=20
        ),
        masks=dict(
            text=TEXTS[:2], return_token_type_ids=True, return_attention_mask=False, return_special_tokens_mask=True
        ),
        length=dict(text=TEXTS[1], add_special_tokens=False, return_length=True),
        words=dict(text=["hello", "world", "!"], is_split_into_words=True),
    )
    return calls


#: Calls where transformers' slow class disagrees with its own fast class (ours follows the fast one,
#: built on the same ``tokenizers`` library); the sets are exact, so a new difference fails the test.
#: ``pairs_longest_first``: slow drops one token at a time from the longer text, tokenizers shares
#: the budget; ``length``: slow unwraps a single text's ``length``; ``words``: RobertaTokenizerFast
#: refuses split words without add_prefix_space (so do we), the slow class takes them; XLM-R's
#: ``truncated``/``max_length_padded``/``pairs_longest_first``: SentencePiece drops the space of a
#: cut-off trailing ``▁`` when decoding, tokenizers' Metaspace decoder keeps it; ``text3`` on a BPE
#: SentencePiece model: the slow ``tokenize`` shows an unknown character itself, not ``<unk>``.
SLOW_DIFFERS = {
    "bert": {"pairs_longest_first", "length"},
    "electra-cased": {"pairs_longest_first", "length"},
    "mpnet": {"length"},
    "roberta": {"length", "words"},
    "xlmr": {"truncated", "max_length_padded", "pairs_longest_first", "length"},
    "xlmr-bpe": {"text3", "length"},
}


def _lists(enc) -> dict:
    return {
        k: [list(r) if isinstance(r, tuple) else r for r in v] if k == "offset_mapping" else v for k, v in enc.items()
    }


def _outcome(tok, kw: dict):
    """What a call gives: the encoding, the decodes of its rows and their tokens; or that it raised."""
    try:
        enc = dict(tok(**kw))
    except (ValueError, AssertionError) as e:
        return ("raises", "add_prefix_space" in str(e))
    ids = enc["input_ids"]
    rows = ids if ids and isinstance(ids[0], list) else [ids]
    decodes = [tok.batch_decode(rows, skip_special_tokens=skip) for skip in (False, True)]
    tokens = tok.tokenize(kw["text"]) if isinstance(kw["text"], str) else None
    return enc, decodes, tok.decode(rows[0]), tok.convert_ids_to_tokens(rows[0]), tokens


@pytest.mark.parametrize("kind", list(KINDS))
def test_ids_masks_types_and_decodes_match_transformers(dirs, kind):
    ours = AutoTokenizer.from_pretrained(dirs[kind])
    oracles = _oracles(dirs[kind], kind)
    for name, hf in oracles.items():
        assert ours.model_input_names == list(hf.model_input_names), name
        assert (ours.pad_token_id, ours.mask_token, ours.cls_token) == (hf.pad_token_id, hf.mask_token, hf.cls_token)
        assert len(ours) == len(hf) and ours.get_vocab() == hf.get_vocab(), name
    differs = set()
    for label, kw in _calls().items():
        got, fast = _outcome(ours, kw), _outcome(oracles["fast"], kw)
        assert got == fast, (label, kw)
        if "slow" in oracles and _outcome(oracles["slow"], kw) != fast:
            differs.add(label)
    assert differs == SLOW_DIFFERS.get(kind, set())
    # offsets and overflowing windows: fast tokenizers only
    fast = oracles["fast"]
    for kw in (
        dict(text=TEXTS, padding=True, return_offsets_mapping=True),
        dict(text=[a for a, _ in PAIRS], text_pair=[b for _, b in PAIRS], return_offsets_mapping=True),
        dict(text=TEXTS[1:3], truncation=True, max_length=8, stride=2, return_overflowing_tokens=True),
    ):
        assert _lists(ours(**kw)) == _lists(fast(**kw)), kw
    probe = ["fox", "☃", "<unk>", "[MASK]", "<mask>"]
    assert ours.convert_tokens_to_ids(probe) == fast.convert_tokens_to_ids(probe)
    assert ours.convert_tokens_to_ids(ours.all_special_tokens) == fast.convert_tokens_to_ids(fast.all_special_tokens)


@pytest.mark.parametrize("kind", ["bert", "mpnet", "roberta", "xlmr", "neox"])
def test_tokenizer_json_saved_by_transformers_and_by_us(dirs, kind, tmp_path):
    """tokenizer.json alone (vocabulary files removed) gives the same; our save_pretrained too, both ways."""
    fast = _oracles(dirs[kind], kind)["fast"]
    fast.save_pretrained(tmp_path / "hf")
    for name in os.listdir(tmp_path / "hf"):
        if name not in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            os.remove(tmp_path / "hf" / name)
    from_json = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = AutoTokenizer.from_pretrained(dirs[kind])
    written = ours.save_pretrained(tmp_path / "ours")
    assert sorted(os.path.basename(p) for p in written) == sorted(
        ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    )
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.path.basename(p) for p in written)  # nothing staged left
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "ours")
    hf_reads_ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    assert type(hf_reads_ours).__name__ == KINDS[kind][1]
    for kw in [kw for label, kw in _calls().items() if label.startswith("pair")]:
        want = fast(**kw)
        for tok in (from_json, reloaded, hf_reads_ours):
            assert dict(tok(**kw)) == dict(want), (tok, kw)
    for tok in (from_json, reloaded):
        assert (tok.tokenizer_class, tok.model_input_names, tok.special_tokens_map) == (
            ours.tokenizer_class,
            ours.model_input_names,
            ours.special_tokens_map,
        )


def test_family_config_picks_the_tokenizer_without_tokenizer_config(dirs, tmp_path):
    """Only vocab.txt and config.json (model_type nezha) -> BERT WordPiece, lower-cased by default."""
    shutil.copytree(dirs["bert"], tmp_path / "nezha")
    os.remove(tmp_path / "nezha" / "tokenizer_config.json")
    _write_json(tmp_path / "nezha" / "config.json", {"model_type": "nezha"})
    ours = AutoTokenizer.from_pretrained(tmp_path / "nezha")
    hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "nezha"))
    assert ours.tokenizer_class == "BertTokenizer" and ours.model_input_names == list(hf.model_input_names)
    assert dict(ours(TEXTS, padding=True)) == dict(hf(TEXTS, padding=True))
    with open(tmp_path / "nezha" / "vocab.txt", "a", encoding="utf-8") as fh:
        fh.write("hello\n")  # a repeated token takes its last line's id, as transformers reads it
    ours = AutoTokenizer.from_pretrained(tmp_path / "nezha")
    for hf in (transformers.BertTokenizer, transformers.BertTokenizerFast):
        hf = hf.from_pretrained(str(tmp_path / "nezha"))
        assert dict(ours(TEXTS, padding=True)) == dict(hf(TEXTS, padding=True))
        last_line = len((tmp_path / "nezha" / "vocab.txt").read_text(encoding="utf-8").splitlines()) - 1
        assert ours.convert_tokens_to_ids("hello") == hf.convert_tokens_to_ids("hello") == last_line
    _write_json(tmp_path / "nezha" / "config.json", {"model_type": "mpnet"})
    mpnet = AutoTokenizer.from_pretrained(tmp_path / "nezha")
    assert mpnet.tokenizer_class == "MPNetTokenizer" and "token_type_ids" not in mpnet("a b")


def test_special_tokens_and_padding_side_from_the_files(dirs, tmp_path):
    shutil.copytree(dirs["roberta"], tmp_path / "r")
    _write_json(
        tmp_path / "r" / "tokenizer_config.json",
        {"tokenizer_class": "RobertaTokenizerFast", "padding_side": "left", "model_max_length": 16},
    )
    _write_json(tmp_path / "r" / "special_tokens_map.json", {"pad_token": {"content": "<unk>", "lstrip": False}})
    ours = AutoTokenizer.from_pretrained(tmp_path / "r")
    hf = transformers.RobertaTokenizerFast.from_pretrained(str(tmp_path / "r"))
    assert (ours.padding_side, ours.model_max_length, ours.pad_token, ours.pad_token_id) == (
        hf.padding_side,
        hf.model_max_length,
        hf.pad_token,
        hf.pad_token_id,
    )
    assert dict(ours(TEXTS, padding=True)) == dict(hf(TEXTS, padding=True))
    # special_tokens_map.json wins over tokenizer_config.json unless the latter has added_tokens_decoder
    _write_json(tmp_path / "r" / "tokenizer_config.json", {"tokenizer_class": "RobertaTokenizer", "pad_token": "</s>"})
    assert AutoTokenizer.from_pretrained(tmp_path / "r").pad_token == "<unk>"
    assert transformers.RobertaTokenizerFast.from_pretrained(str(tmp_path / "r")).pad_token == "<unk>"
    declared = {"1": {"content": "<pad>", "special": True}}
    cfg = {"tokenizer_class": "RobertaTokenizer", "pad_token": "</s>", "added_tokens_decoder": declared}
    _write_json(tmp_path / "r" / "tokenizer_config.json", cfg)
    for tok in (
        AutoTokenizer.from_pretrained(tmp_path / "r"),
        transformers.RobertaTokenizer.from_pretrained(str(tmp_path / "r")),
    ):
        assert tok.pad_token == "</s>"
    assert AutoTokenizer.from_pretrained(tmp_path / "r", pad_token="<s>").pad_token == "<s>"
    enc = ours(TEXTS, truncation=True, padding="max_length")  # model_max_length is the default limit
    assert all(len(r) == 16 for r in enc["input_ids"]) and enc == hf(TEXTS, truncation=True, padding="max_length")


def test_added_tokens_declared_in_tokenizer_config(dirs, tmp_path):
    shutil.copytree(dirs["bert"], tmp_path / "b")
    n = len(AutoTokenizer.from_pretrained(dirs["bert"]))
    added = {
        str(n): {"content": "<ent>", "lstrip": False, "rstrip": False, "normalized": False, "special": True},
        str(n + 1): {"content": "newword", "lstrip": False, "rstrip": False, "normalized": True, "special": False},
    }
    _write_json(
        tmp_path / "b" / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", "added_tokens_decoder": added}
    )
    ours = AutoTokenizer.from_pretrained(tmp_path / "b")
    text = ["Hello <ent> world NEWWORD!", "newword <ent>"]
    for hf in (transformers.BertTokenizer, transformers.BertTokenizerFast):
        hf = hf.from_pretrained(str(tmp_path / "b"))
        assert len(ours) == len(hf) == n + 2
        assert dict(ours(text, padding=True)) == dict(hf(text, padding=True))
    # the slow class skips only the special tokens its attributes name, so "<ent>" stays there
    ids = ours(text)["input_ids"][0]
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == hf.decode(ids) == "[CLS] hello <ent> world newword! [SEP]"
    added[str(n + 5)] = {"content": "<gap>", "special": True}
    _write_json(tmp_path / "b" / "tokenizer_config.json", {"added_tokens_decoder": added})
    with pytest.raises(ValueError, match="'<gap>' is declared with id .* but gets"):
        AutoTokenizer.from_pretrained(tmp_path / "b")


@pytest.mark.parametrize(
    "framework, module, dtype",
    [("np", "numpy", "int64"), ("pt", "torch", "int64"), ("tf", "tensorflow", "int32")] + [("jax", "jax", "int32")],
)
def test_return_tensors_for_each_framework(dirs, framework, module, dtype):
    pytest.importorskip(module)
    ours = AutoTokenizer.from_pretrained(dirs["bert"])
    hf = transformers.BertTokenizerFast.from_pretrained(dirs["bert"])
    enc = ours(TEXTS[:3], padding=True, return_tensors=framework, return_offsets_mapping=True)
    want = hf(TEXTS[:3], padding=True, return_offsets_mapping=True)
    assert set(enc) == set(want)
    for key, value in enc.items():
        assert type(value).__module__.split(".")[0] in {"numpy": ["numpy"], "torch": ["torch"]}.get(
            module, ["tensorflow", "jax", "jaxlib"]
        )
        arr = np.asarray(value)
        assert str(arr.dtype) == dtype and arr.tolist() == [
            [list(o) for o in r] if key == "offset_mapping" else r for r in want[key]
        ]
    single = ours("Hello world!", return_tensors=framework)
    assert np.asarray(single["input_ids"]).shape == (1, len(ours("Hello world!")["input_ids"]))
    assert ours.decode(single["input_ids"][0]) == "[CLS] hello world! [SEP]"
    assert ours.batch_decode(enc["input_ids"], skip_special_tokens=True)[0] == "hello world!"
    with pytest.raises(ValueError, match="padding=True"):
        ours(TEXTS[:3], return_tensors=framework)  # ragged rows


def test_calls_from_several_threads_keep_their_own_padding_and_truncation(dirs):
    from concurrent.futures import ThreadPoolExecutor

    tok = AutoTokenizer.from_pretrained(dirs["bert"])
    calls = [dict(padding=True), dict(truncation=True, max_length=5), dict(padding="max_length", max_length=30), {}]
    want = [tok(TEXTS, **kw) for kw in calls]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: tok(TEXTS, **calls[i % 4]), range(200)))
    assert all(g == want[i % 4] for i, g in enumerate(got))
    assert tok.backend_tokenizer.padding is None and tok.backend_tokenizer.truncation is None


def test_import_nezha_zoo_imports_neither_tokenizers_nor_a_framework():
    code = (
        "import sys\nfrom nezha_zoo import AutoTokenizer\nimport nezha_zoo.tokenization\n"
        "print(sorted(m for m in ('tokenizers', 'sentencepiece', 'torch', 'tensorflow', 'jax', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_return_tensors_imports_only_the_framework_asked_for(dirs):
    code = (
        "import sys\nfrom nezha_zoo import AutoTokenizer\n"
        f"enc = AutoTokenizer.from_pretrained({dirs['bert']!r})(['a b', 'c'], padding=True, return_tensors='np')\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'jax', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- bad input ---------------------------------------------------------------------------------------


def test_generic_tokenizer_json_and_keyword_overrides(dirs, tmp_path):
    """A tokenizer.json with no tokenizer_class is transformers' PreTrainedTokenizerFast; kwargs override."""
    shutil.copy(os.path.join(dirs["neox"], "tokenizer.json"), tmp_path)
    ours = AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert ours.tokenizer_class == "PreTrainedTokenizer" and ours.model_input_names == list(hf.model_input_names)
    assert dict(ours(PAIRS[0][0], PAIRS[0][1])) == dict(hf(PAIRS[0][0], PAIRS[0][1]))
    ours.save_pretrained(tmp_path / "saved")
    assert (
        type(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))).__name__ == "PreTrainedTokenizerFast"
    )
    bert = AutoTokenizer.from_pretrained(dirs["bert"], model_max_length=8, padding_side="left", do_lower_case=False)
    assert (bert.model_max_length, bert.padding_side) == (8, "left")
    assert bert.tokenize("Hello world") == transformers.BertTokenizerFast.from_pretrained(
        dirs["bert"], do_lower_case=False
    ).tokenize("Hello world")
    with pytest.raises(TypeError, match=r"unknown keyword arguments \['lowercase'\]"):
        AutoTokenizer.from_pretrained(dirs["bert"], lowercase=True)


def test_a_directory_without_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        AutoTokenizer.from_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files.*tokenizer.json"):
        AutoTokenizer.from_pretrained(tmp_path / "empty")
    _write_json(tmp_path / "empty" / "config.json", {"model_type": "electra"})
    with pytest.raises(FileNotFoundError, match="ElectraTokenizer.*vocab.txt"):
        AutoTokenizer.from_pretrained(tmp_path / "empty")


def test_an_unknown_tokenizer_type_is_a_clear_error(dirs, tmp_path):
    shutil.copytree(dirs["bert"], tmp_path / "b")
    _write_json(tmp_path / "b" / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer"})
    with pytest.raises(ValueError, match="unknown tokenizer type 'LlamaTokenizer'.*BertTokenizer"):
        AutoTokenizer.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AutoTokenizer.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / "tokenizer_config.json").unlink()
    (tmp_path / "b" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers file"):
        AutoTokenizer.from_pretrained(tmp_path / "b")


def test_too_long_without_truncation_names_the_limit(dirs):
    bert = AutoTokenizer.from_pretrained(dirs["bert"])  # model_max_length 64
    long = "the quick brown fox " * 20
    with pytest.raises(
        ValueError, match=r"text 1 is \d+ tokens long, more than the tokenizer's model_max_length \(64\)"
    ):
        bert(["short", long])
    with pytest.raises(ValueError, match=r"more than max_length=5; pass truncation=True"):
        bert("the quick brown fox jumps", max_length=5, truncation=False)
    with pytest.raises(ValueError, match="max_length=5"):
        bert("the quick brown fox jumps", max_length=5, padding="max_length", truncation=False)
    assert len(bert(long, truncation=True)["input_ids"]) == 64
    assert len(bert(long, max_length=10)["input_ids"]) == 10  # max_length alone truncates
    roberta = AutoTokenizer.from_pretrained(dirs["roberta"])  # no model_max_length: no limit, none needed
    assert len(roberta(long)["input_ids"]) > 64
    with pytest.raises(ValueError, match="truncation needs max_length"):
        roberta(long, truncation=True)
    with pytest.raises(ValueError, match=r"truncation='only_second'.*max_length=3"):
        bert("a b c d", truncation="only_second", max_length=3)


def test_empty_and_non_string_input(dirs):
    tok = AutoTokenizer.from_pretrained(dirs["bert"])
    assert tok("")["input_ids"] == [tok.cls_token_id, tok.sep_token_id]  # defined: only the special tokens
    assert tok.decode(tok("")["input_ids"], skip_special_tokens=True) == ""
    for bad, where in ((5, "text"), (None, "text"), (b"bytes", "text"), (["a", 3], r"text\[1\]")):
        with pytest.raises(TypeError, match=f"{where} must be a str, not"):
            tok(bad)
    with pytest.raises(TypeError, match="text_pair must be a str"):
        tok("a", 3)
    with pytest.raises(TypeError, match=r"text\[0\]\[1\] must be a str"):
        tok([["a", 2]], is_split_into_words=True)
    with pytest.raises(ValueError, match="empty batch"):
        tok([])
    with pytest.raises(ValueError, match="text_pair must be a batch as long as text"):
        tok(["a", "b"], text_pair=["c"])
    with pytest.raises(ValueError, match="padding must be"):
        tok("a", padding="longer")
    with pytest.raises(ValueError, match="truncation must be"):
        tok("a", truncation="only_third", max_length=4)
    with pytest.raises(ValueError, match="return_tensors must be one of"):
        tok("a", return_tensors="mx")
    with pytest.raises(TypeError, match="sequence of ints"):
        tok.decode(["a"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.convert_ids_to_tokens(10**6)
    neox = AutoTokenizer.from_pretrained(dirs["neox"], pad_token=None)
    with pytest.raises(ValueError, match="no pad_token"):
        neox(["a", "b c"], padding=True)


def test_tokenizer_files_list_covers_every_kind():
    for name in ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model"):
        assert name in TOKENIZER_FILES
    assert Tokenizer.__call__.__doc__ and "return_tensors" in Tokenizer.__call__.__doc__
