"""nezha_zoo.dtypes, streamed (low-memory) loading and saving in the core, bfloat16 checkpoints."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from nezha_zoo import ElectraConfig
from nezha_zoo.dtypes import SUPPORTED, canonical_dtype, itemsize, numpy_dtype
from nezha_zoo.io.plan import plan_load, stream_planned
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.io.shards import SAFE_WEIGHTS_INDEX_NAME
from nezha_zoo.io.writer import save_state_dict
from nezha_zoo.pretrained import iter_random_weights, load_weights, random_weights, save_weights
from nezha_zoo.spec.layouts import get_layout
from nezha_zoo.spec.registry import get_family

FAM = get_family("electra")
CFG = ElectraConfig(
    vocab_size=50, embedding_size=8, hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
)


@pytest.mark.parametrize(
    "given, want",
    [
        (None, "float32"),
        ("float32", "float32"),
        ("fp32", "float32"),
        ("bf16", "bfloat16"),
        ("BFloat16", "bfloat16"),
        ("torch.bfloat16", "bfloat16"),
        ("fp16", "float16"),
        ("half", "float16"),
        ("torch.float16", "float16"),
        (np.float16, "float16"),
        (np.float32, "float32"),
        (np.dtype("float32"), "float32"),
        (ml_dtypes.bfloat16, "bfloat16"),
        (np.dtype(ml_dtypes.bfloat16), "bfloat16"),
    ],
)
def test_canonical_dtype_spellings(given, want):
    assert canonical_dtype(given) == want


def test_unsupported_dtypes_raise_clearly():
    with pytest.raises(
        ValueError, match=r"dtype='float64' is not supported; models run in one of float32, bfloat16, float16"
    ):
        canonical_dtype("float64")
    with pytest.raises(ValueError, match="torch_dtype='int8'"):
        canonical_dtype("int8", argument="torch_dtype")
    with pytest.raises(ValueError, match="not supported"):
        canonical_dtype(np.float64)
    with pytest.raises(TypeError, match="dtype must be None, a string or a dtype object"):
        canonical_dtype(3)


def test_numpy_dtype_and_itemsize():
    assert numpy_dtype(None) == np.float32 and numpy_dtype("bf16") == np.dtype(ml_dtypes.bfloat16)
    assert [itemsize(d) for d in SUPPORTED] == [4, 2, 2]
    assert numpy_dtype("fp16") == np.float16


def test_iter_random_weights_per_param_streams():
    spec = FAM.model_spec(CFG, "ForMaskedLM")
    full = random_weights(spec, CFG, seed=3)
    some = random_weights(spec, CFG, seed=3, names={spec.names[-1], spec.names[0]})
    assert set(some) == {spec.names[-1], spec.names[0]}
    for name, arr in some.items():  # a param's values do not depend on which others are drawn
        np.testing.assert_array_equal(arr, full[name])
    assert all(a.dtype == np.float32 for _, a in iter_random_weights(spec, CFG))
    word = full["electra.embeddings.word_embeddings.weight"]
    assert np.all(word[CFG.pad_token_id] == 0) and 0.01 < word.std() < 0.03


def test_streamed_save_writes_shards_from_an_iterator_and_bf16_stays_bf16(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.normal(size=(40, 30)).astype(ml_dtypes.bfloat16) for i in range(5)}
    consumed = []

    def gen():
        for k, v in tensors.items():
            consumed.append(k)
            yield k, v

    written = save_state_dict(tmp_path, gen(), max_shard_size=5000)  # 2400 bytes each: 2 per shard
    assert SAFE_WEIGHTS_INDEX_NAME in written and len(written) == 4
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 5 * 40 * 30 * 2
    assert consumed == list(tensors)
    with open_checkpoint(tmp_path) as r:
        assert {r.dtype(k) for k in r.keys()} == {"BF16"}
        for k, v in tensors.items():
            np.testing.assert_array_equal(r.get(k).view(np.uint16), v.view(np.uint16))
    # The files are plain safetensors: the reference library parses them (headers, dtypes, metadata).
    from safetensors import safe_open

    for name in set(index["weight_map"].values()):
        h = safe_open(str(tmp_path / name), framework="np")
        assert h.metadata()["format"] == "pt"
        assert {h.get_slice(k).get_dtype() for k in h.keys()} == {"BF16"}
        assert all(h.get_slice(k).get_shape() == [40, 30] for k in h.keys())


def test_failing_export_leaves_directory_untouched(tmp_path):
    spec = FAM.model_spec(CFG, "Model")
    save_weights(tmp_path, CFG, spec, FAM, random_weights(spec, CFG), max_shard_size=2000)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def partial():
        yield from list(iter_random_weights(spec, CFG, seed=1))[:-1]  # the last param never comes

    with pytest.raises(ValueError, match="export is missing"):
        save_weights(tmp_path, CFG, spec, FAM, partial(), max_shard_size=2000)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("layout_name", ["pt", "keras", "flax"])
@pytest.mark.parametrize(
    "ckpt_dtype, target", [("float32", "bfloat16"), ("bfloat16", "float32"), ("float32", "float32")]
)
def test_stream_planned_fills_in_pieces(tmp_path, layout_name, ckpt_dtype, target):
    spec = FAM.model_spec(CFG, "ForMaskedLM")
    state = random_weights(spec, CFG, seed=0)
    src = numpy_dtype(ckpt_dtype)
    save_weights(tmp_path, CFG, spec, FAM, {k: v.astype(src) for k, v in state.items()}, max_shard_size=3000)
    layout = get_layout(layout_name)
    want_dtype = numpy_dtype(target)
    bufs = {p.name: np.full(layout.shape(p), np.nan, want_dtype) for p in spec}
    pieces: dict[str, int] = {}
    finished: list[str] = []

    def write(name, index, piece):
        assert piece.dtype == want_dtype
        bufs[name][index] = piece
        pieces[name] = pieces.get(name, 0) + 1

    with open_checkpoint(tmp_path) as reader:
        plan = plan_load(spec, reader.keys(), reader.shape, FAM.base_prefix)
        stream_planned(reader, spec, plan, layout, lambda _: want_dtype, write, finished.append, chunk_bytes=256)
    assert finished == list(plan.sources)
    assert pieces["electra.embeddings.word_embeddings.weight"] > 1  # really read in pieces
    for p in spec:
        expect = layout.to_stored(p, state[p.name].astype(src).astype(want_dtype))
        np.testing.assert_array_equal(bufs[p.name].astype(np.float32), expect.astype(np.float32), err_msg=p.name)


def test_load_weights_needs_one_receiver(tmp_path):
    spec = FAM.model_spec(CFG, "Model")
    save_weights(tmp_path, CFG, spec, FAM, random_weights(spec, CFG))
    with pytest.raises(TypeError, match="exactly one of assign= and write="):
        load_weights(tmp_path, spec, FAM, get_layout("pt"), None, "ElectraModel")
