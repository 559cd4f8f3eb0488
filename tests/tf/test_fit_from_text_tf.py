"""Keras ``fit`` from raw strings (examples/tf_fit_from_text.py): tokenized in the tf.data pipeline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")

pytestmark = pytest.mark.tf


def test_fit_from_text_example_learns_and_answers(tmp_path):
    path = Path(__file__).resolve().parents[2] / "examples" / "tf_fit_from_text.py"
    spec = importlib.util.spec_from_file_location("tf_fit_from_text", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    from nezha_zoo import AutoTokenizer

    tok_dir = tmp_path / "tok"
    module.write_tokenizer(str(tok_dir))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    texts, labels = module.make_texts(5)
    batch = next(iter(module.text_dataset(tok, texts, labels, batch_size=5)))
    want = tok(texts, padding=True, truncation=True, max_length=32)
    assert batch["input_ids"].numpy().tolist() == want["input_ids"]  # the map tokenized each string
    assert batch["attention_mask"].numpy().tolist() == want["attention_mask"]
    assert batch["labels"].numpy().tolist() == labels.tolist()

    result = module.main(epochs=4, out_dir=str(tmp_path / "run"))
    loss = result["loss"]
    assert loss[-1] < 0.5 * loss[0], loss
    assert [a["label"] for a in result["answers"]] == ["positive", "negative"], result["answers"]
    assert (Path(result["dir"]) / "vocab.txt").is_file() or (Path(result["dir"]) / "tokenizer.json").is_file()
