"""``nezha-zoo convert`` without any framework: every family through every format and back.

Checkpoints are drawn from each family's spec (``random_weights``) and saved as canonical safetensors;
each is converted to hf-tf, hf-flax and flax and back, and must come back byte-identical.  Files
written by transformers and loading in the frameworks are covered in
tests/equivalence/test_convert_transformers.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from nezha_zoo.cli.main import main
from nezha_zoo.conversion import msgpack_io
from nezha_zoo.conversion.convert import ConversionError, convert
from nezha_zoo.conversion.formats import detect_format, open_source, spec_index
from nezha_zoo.conversion.inspect import inspect_checkpoint
from nezha_zoo.families.electra import ElectraConfig
from nezha_zoo.families.ibert import IBertConfig
from nezha_zoo.families.mpnet import MPNetConfig
from nezha_zoo.families.mpt import MptConfig
from nezha_zoo.families.nezha import NezhaConfig
from nezha_zoo.families.xlm_roberta_xl import XLMRobertaXLConfig
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.torch_pickle import UnsafePickleError
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec import LAYOUTS, Kind, get_family

_BERT = dict(
    vocab_size=37,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    max_position_embeddings=20,
    num_labels=2,
)
CONFIGS = {
    "nezha": lambda: NezhaConfig(**_BERT, max_relative_position=4),
    "xlm-roberta-xl": lambda: XLMRobertaXLConfig(**_BERT),
    "electra": lambda: ElectraConfig(**_BERT, embedding_size=8),
    "ibert": lambda: IBertConfig(**_BERT),
    "mpnet": lambda: MPNetConfig(**_BERT),
    "mpt": lambda: MptConfig(d_model=16, n_heads=4, n_layers=2, vocab_size=37, max_seq_len=20, num_labels=2),
}
CASES = [(fam, head) for fam in CONFIGS for head in get_family(fam).heads]
FRAMEWORK_FREE = ("hf-tf", "hf-flax", "flax")


def _checkpoint(directory, fam: str, head: str, seed: int = 0, max_shard_size="5GB"):
    config = CONFIGS[fam]()
    family = get_family(fam)
    spec = family.model_spec(config, head)
    weights = random_weights(spec, config, seed=seed)
    save_weights(directory, config, spec, family, weights, max_shard_size=max_shard_size)
    return config, spec, weights


def _read_all(directory) -> dict[str, bytes]:
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


@pytest.mark.parametrize(("fam", "head"), CASES, ids=[f"{f}-{h}" for f, h in CASES])
def test_every_family_and_head_round_trips_byte_identical(tmp_path, fam, head):
    _, spec, weights = _checkpoint(tmp_path / "a", fam, head)
    original = _read_all(tmp_path / "a")
    for fmt in FRAMEWORK_FREE:
        info = convert(tmp_path / "a", tmp_path / fmt, fmt)
        assert detect_format(tmp_path / fmt) == fmt
        assert (info["family"], info["head"], info["tensors"]) == (get_family(fam).key, head, len(spec))
        seen = inspect_checkpoint(tmp_path / fmt)
        assert (seen["format"], seen["head"], seen["missing_keys"], seen["unexpected_keys"]) == (fmt, head, [], [])
        back = convert(tmp_path / fmt, tmp_path / f"{fmt}-back", "safetensors")
        assert back["from"] == fmt
        assert _read_all(tmp_path / f"{fmt}-back") == original, fmt


def test_values_survive_through_every_format(tmp_path):
    """Read each format's canonical view directly: the arrays equal the spec-drawn weights."""
    config, spec, weights = _checkpoint(tmp_path / "a", "electra", "ForPreTraining", seed=3)
    family = get_family("electra")
    for fmt in FRAMEWORK_FREE:
        convert(tmp_path / "a", tmp_path / fmt, fmt)
        src = open_source(tmp_path / fmt, fmt, family, config)
        try:
            assert sorted(src.keys()) == sorted(weights)
            for name, arr in weights.items():
                np.testing.assert_array_equal(src.get(name), arr, err_msg=f"{fmt} {name}")
        finally:
            src.close()


def test_stored_names_and_layouts_follow_transformers_conventions(tmp_path):
    """Spot checks of the layouts' rules against names transformers TF and Flax write (see hf notes §2)."""
    config = CONFIGS["electra"]()
    family = get_family("electra")
    tf_keys = spec_index("hf-tf", family, config)
    assert tf_keys["electra/embeddings/word_embeddings/weight:0"][0] == "electra.embeddings.word_embeddings.weight"
    assert tf_keys["electra/embeddings/position_embeddings/embeddings:0"][1].kind is Kind.EMBEDDING
    assert tf_keys["electra/encoder/layer_._1/attention/self/query/kernel:0"][0] == (
        "electra.encoder.layer.1.attention.self.query.weight"
    )
    flax_keys = spec_index("hf-flax", family, config)
    assert flax_keys["encoder/layer/1/output/LayerNorm/scale"][0] == "encoder.layer.1.output.LayerNorm.weight"
    assert flax_keys["electra/encoder/layer/1/output/LayerNorm/scale"][0] == (
        "electra.encoder.layer.1.output.LayerNorm.weight"
    )
    _, spec, weights = _checkpoint(tmp_path / "a", "electra", "Model")
    convert(tmp_path / "a", tmp_path / "tf", "hf-tf")
    import h5py

    with h5py.File(tmp_path / "tf" / "tf_model.h5") as f:
        assert [n.decode() for n in f.attrs["layer_names"]] == ["electra"]
        names = [n.decode() for n in f["electra"].attrs["weight_names"]]
        assert names[0] == "tf_electra_model/electra/embeddings/word_embeddings/weight:0"
        kernel = f["electra"]["tf_electra_model/electra/encoder/layer_._0/intermediate/dense/kernel:0"][()]
    np.testing.assert_array_equal(kernel, weights["encoder.layer.0.intermediate.dense.weight"].T)


@pytest.mark.parametrize("fmt", FRAMEWORK_FREE)
def test_sharded_safetensors_round_trip_keeps_the_shard_plan(tmp_path, fmt):
    _checkpoint(tmp_path / "a", "mpnet", "ForMaskedLM", max_shard_size="20KB")
    original = _read_all(tmp_path / "a")
    assert "model.safetensors.index.json" in original and len(original) > 3
    convert(tmp_path / "a", tmp_path / "b", fmt)
    convert(tmp_path / "b", tmp_path / "c", "safetensors", max_shard_size="20KB")
    assert _read_all(tmp_path / "c") == original


def test_msgpack_chunked_arrays_round_trip(tmp_path, monkeypatch):
    """Arrays above flax's MAX_CHUNK_SIZE are written as flax chunk maps and read back whole."""
    monkeypatch.setattr(msgpack_io, "MAX_CHUNK_SIZE", 256)
    _checkpoint(tmp_path / "a", "electra", "ForMaskedLM")
    original = _read_all(tmp_path / "a")
    convert(tmp_path / "a", tmp_path / "b", "hf-flax")
    import msgpack

    tree = msgpack.unpackb(open(tmp_path / "b" / "flax_model.msgpack", "rb").read(), ext_hook=lambda c, d: c)
    assert tree["electra"]["embeddings"]["word_embeddings"]["embedding"]["__msgpack_chunked_array__"] is True
    convert(tmp_path / "b", tmp_path / "c", "safetensors")
    assert _read_all(tmp_path / "c") == original


# --- dtype casting -------------------------------------------------------------------------------


def test_dtype_cast_to_bfloat16_and_float16(tmp_path):
    _, spec, weights = _checkpoint(tmp_path / "a", "ibert", "ForMaskedLM")
    convert(tmp_path / "a", tmp_path / "bf16", "safetensors", dtype="bfloat16")
    info = inspect_checkpoint(tmp_path / "bf16")
    buffers = sum(1 for p in spec if p.kind is Kind.BUFFER)
    assert buffers and info["dtypes"] == {"BF16": len(spec) - buffers, "F32": buffers}  # buffers keep float32
    convert(tmp_path / "bf16", tmp_path / "flax", "hf-flax")  # msgpack holds bfloat16 as flax does
    convert(tmp_path / "flax", tmp_path / "f32", "safetensors", dtype="float32")
    got = open_source(tmp_path / "f32", "safetensors", get_family("ibert"), CONFIGS["ibert"]())
    name = "ibert.embeddings.word_embeddings.weight"
    np.testing.assert_allclose(got.get(name), weights[name], rtol=2**-7)
    got.close()
    convert(tmp_path / "a", tmp_path / "f16", "hf-tf", dtype="float16")
    assert set(inspect_checkpoint(tmp_path / "f16")["dtypes"]) == {"F16", "F32"}


def test_hdf5_refuses_bfloat16_and_leaves_nothing(tmp_path):
    _checkpoint(tmp_path / "a", "electra", "Model")
    with pytest.raises(CheckpointError, match="--dtype float32"):
        convert(tmp_path / "a", tmp_path / "tf", "hf-tf", dtype="bfloat16")
    assert not (tmp_path / "tf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no staging directory left either


# --- bad input ------------------------------------------------------------------------------------


def _only(tmp_path, *names):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


@pytest.mark.parametrize("fmt", ["safetensors", *FRAMEWORK_FREE])
def test_truncated_input_raises_naming_the_file_and_writes_nothing(tmp_path, fmt):
    _checkpoint(tmp_path / "a", "electra", "ForMaskedLM")
    if fmt != "safetensors":
        convert(tmp_path / "a", tmp_path / "src", fmt)
    else:
        os.rename(tmp_path / "a", tmp_path / "src")
    (weights,) = [n for n in os.listdir(tmp_path / "src") if n != "config.json"]
    path = tmp_path / "src" / weights
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises((CheckpointError, OSError), match=weights):
        convert(tmp_path / "src", tmp_path / "out", "safetensors" if fmt != "safetensors" else "hf-flax")
    assert not (tmp_path / "out").exists()


def test_corrupt_msgpack_raises_naming_the_file(tmp_path):
    _checkpoint(tmp_path / "a", "electra", "Model")
    convert(tmp_path / "a", tmp_path / "src", "hf-flax")
    path = tmp_path / "src" / "flax_model.msgpack"
    path.write_bytes(b"\xc1" + path.read_bytes()[1:])  # 0xc1 is never used by msgpack
    with pytest.raises(CheckpointError, match="flax_model.msgpack.*corrupt"):
        convert(tmp_path / "src", tmp_path / "out", "safetensors")
    assert not (tmp_path / "out").exists()


def test_checkpoint_that_does_not_match_its_config(tmp_path):
    _checkpoint(tmp_path / "a", "electra", "ForMaskedLM")
    convert(tmp_path / "a", tmp_path / "src", "hf-tf")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["intermediate_size"] = 32
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    msg = r"tf_model.h5 \(hf-tf\).*layer.0.intermediate.dense.weight.*\(24, 16\).*needs \(32, 16\)"
    with pytest.raises(CheckpointError, match=msg):
        convert(tmp_path / "src", tmp_path / "out", "safetensors")
    assert not (tmp_path / "out").exists()


def test_missing_and_unexpected_tensors_are_refused_by_name(tmp_path):
    config, spec, weights = _checkpoint(tmp_path / "a", "mpnet", "ForSequenceClassification")
    family = get_family("mpnet")
    partial = dict(weights)
    del partial["classifier.out_proj.bias"]
    save_weights(tmp_path / "missing", config, spec, family, weights)  # then drop one tensor by hand:
    from nezha_zoo.io.writer import save_state_dict

    save_state_dict(tmp_path / "missing", partial)
    with pytest.raises(ConversionError, match="missing.*classifier.out_proj.bias"):
        convert(tmp_path / "missing", tmp_path / "out", "hf-flax", head="ForSequenceClassification")
    save_state_dict(tmp_path / "extra", {**weights, "classifier.extra.weight": np.zeros(2, np.float32)})
    (tmp_path / "extra" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(ConversionError, match="unexpected.*classifier.extra.weight"):
        convert(tmp_path / "extra", tmp_path / "out", "hf-tf")
    assert not (tmp_path / "out").exists()


def test_tf_mpnet_pooler_is_dropped_as_framework_only(tmp_path):
    """transformers TF MPNet builds a pooler in every head; PyTorch has none outside Model/MC."""
    config, spec, weights = _checkpoint(tmp_path / "a", "mpnet", "ForMaskedLM")
    convert(tmp_path / "a", tmp_path / "tf", "hf-tf")
    import h5py

    with h5py.File(tmp_path / "tf" / "tf_model.h5", "a") as f:
        names = [n.decode() for n in f["mpnet"].attrs["weight_names"]]
        for leaf, shape in (("kernel", (16, 16)), ("bias", (16,))):
            full = f"tfmp_net_for_masked_lm/mpnet/pooler/dense/{leaf}:0"
            f["mpnet"].create_dataset(full, data=np.ones(shape, np.float32))
            names.append(full)
        f["mpnet"].attrs["weight_names"] = np.asarray([n.encode() for n in names])
    assert inspect_checkpoint(tmp_path / "tf")["framework_only_keys"] == [
        "mpnet.pooler.dense.weight",
        "mpnet.pooler.dense.bias",
    ]
    info = convert(tmp_path / "tf", tmp_path / "back", "safetensors")
    assert info["dropped_keys"] == ["mpnet.pooler.dense.weight", "mpnet.pooler.dense.bias"]
    assert _read_all(tmp_path / "back") == _read_all(tmp_path / "a")


def test_pickles_that_need_more_than_tensors_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "src").mkdir()
    with zipfile.ZipFile(tmp_path / "src" / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    (tmp_path / "src" / "config.json").write_text(CONFIGS["electra"]().to_json_string())
    with pytest.raises(UnsafePickleError, match="refusing to unpickle.*system"):
        convert(tmp_path / "src", tmp_path / "out", "safetensors")
    assert not (tmp_path / "out").exists()


def test_unknown_family_and_missing_config(tmp_path):
    _checkpoint(tmp_path / "a", "electra", "Model")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt9"}))
    with pytest.raises(ValueError, match="unknown model family 'gpt9'"):
        convert(tmp_path / "a", tmp_path / "out", "hf-flax")
    os.remove(tmp_path / "a" / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert(tmp_path / "a", tmp_path / "out", "hf-flax")
    _only(tmp_path, "a")


# --- the command line -----------------------------------------------------------------------------


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    _checkpoint(tmp_path / "a", "nezha", "ForPreTraining")
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "out"), "--to", "hf-tf", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    before = _read_all(tmp_path / "out")
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "out"), "--to", "hf-flax"]) == 2
    assert "--force" in capsys.readouterr().err
    assert _read_all(tmp_path / "out") == before
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "out"), "--to", "hf-flax", "--force", "-q"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "flax_model.msgpack"]  # old tf_model.h5 gone
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "a"), "--to", "hf-flax", "--force"]) == 2
    assert "same directory" in capsys.readouterr().err


def test_cli_json_summary_and_text_summary(tmp_path, capsys):
    _, spec, _ = _checkpoint(tmp_path / "a", "mpt", "ForCausalLM")
    args = ["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "flax", "--json"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["from"], info["to"], info["family"], info["head"]) == ("safetensors", "flax", "mpt", "ForCausalLM")
    assert info["tensors"] == len(spec) and info["files"] == ["config.json", "flax_variables.msgpack"]
    assert main(["convert", str(tmp_path / "b"), str(tmp_path / "c"), "--to", "safetensors"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flax -> safetensors: MptForCausalLM") and str(tmp_path / "c") in out
    assert main(["inspect", str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "flax"


def test_cli_reports_bad_input_as_an_error(tmp_path, capsys):
    _checkpoint(tmp_path / "a", "electra", "Model")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x00" * 4)
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "out"), "--to", "hf-tf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nezha-zoo: error:") and "model.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_cli_convert_carries_tokenizer_files_and_inspect_lists_them(tmp_path, capsys):
    from nezha_zoo import AutoTokenizer

    _checkpoint(tmp_path / "a", "electra", "Model")
    src = tmp_path / "a"
    tokenizer = {
        "vocab.txt": "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n!\n",
        "tokenizer_config.json": '{"tokenizer_class": "ElectraTokenizer", "model_max_length": 20}',
        "special_tokens_map.json": '{"unk_token": "[UNK]"}',
        "modules.json": "[]",
    }
    for name, text in tokenizer.items():
        (src / name).write_text(text)
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "hf-flax", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(tokenizer) | {"1_Pooling", "config.json", "flax_model.msgpack"} == set(info["files"])
    for name, text in tokenizer.items():
        assert (tmp_path / "out" / name).read_text() == text  # unchanged
    ids = AutoTokenizer.from_pretrained(tmp_path / "out")(["hello world!", "world"], padding=True)["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(src)(["hello world!", "world"], padding=True)["input_ids"]
    assert ids == [[2, 5, 6, 7, 3], [2, 6, 3, 0, 0]]
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "safetensors", "--force", "-q"]) == 0
    assert (tmp_path / "out" / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_cls_token": true}'
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging folder left
    main(["inspect", str(tmp_path / "out")])
    out = capsys.readouterr().out
    line = "tokenizer   tokenizer_config.json, special_tokens_map.json, vocab.txt, modules.json, 1_Pooling"
    assert line in out.splitlines()
    main(["inspect", str(tmp_path / "out"), "--json"])
    assert json.loads(capsys.readouterr().out)["tokenizer_files"] == line.split(None, 1)[1].split(", ")
    _checkpoint(tmp_path / "bare", "mpt", "Model")
    main(["inspect", str(tmp_path / "bare")])
    assert "tokenizer   none" in capsys.readouterr().out.splitlines()


def test_cli_help_lists_formats(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = capsys.readouterr().out
    for fmt in ("safetensors", "pytorch-bin", "hf-tf", "hf-flax", "keras", "flax", "--force", "--dtype"):
        assert fmt in out


def test_hf_layouts_are_data_on_the_layout():
    tf, fx = LAYOUTS["hf-tf"], LAYOUTS["hf-flax"]
    assert tf.base_scoped and not fx.base_scoped and tf.suffix == ":0" and tf.index_join == "_._"
    assert dict(tf.module_leaf) == {(Kind.EMBEDDING, "word_embeddings"): "weight"}


def test_msgpack_writer_matches_the_msgpack_library(tmp_path):
    """Our piecewise writer emits a file msgpack itself parses to the same tree."""
    import msgpack

    arrays = {("a", "b"): np.arange(6, dtype=np.float32).reshape(2, 3), ("a", "c"): np.float32(2.5) * np.ones(())}
    arrays[("d",)] = np.arange(70000, dtype=np.float16)
    msgpack_io.write_msgpack_tree(tmp_path / "t.msgpack", list(arrays), lambda p: arrays[p])

    def ext(code, data):
        shape, dtype, raw = msgpack.unpackb(data)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    tree = msgpack.unpackb(io.BytesIO((tmp_path / "t.msgpack").read_bytes()).read(), ext_hook=ext)
    np.testing.assert_array_equal(tree["a"]["b"], arrays[("a", "b")])
    np.testing.assert_array_equal(tree["a"]["c"], arrays[("a", "c")])
    np.testing.assert_array_equal(tree["d"], arrays[("d",)])
