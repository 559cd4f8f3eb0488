"""The parameter spec: Electra against transformers' PyTorch state dicts, layouts, ModelSpec rules."""

from __future__ import annotations

import numpy as np
import pytest

from nezha_zoo import ElectraConfig
from nezha_zoo.families.electra import HEADS, electra_spec
from nezha_zoo.spec import LAYOUTS, Kind, ModelSpec, Param, get_family, get_layout
from nezha_zoo.spec.blocks import dense, embedding, layer_norm


def _tiny(embedding_size: int, cross: bool, **kw) -> ElectraConfig:
    return ElectraConfig(
        vocab_size=37,
        embedding_size=embedding_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=20,
        type_vocab_size=3,
        is_decoder=cross,
        add_cross_attention=cross,
        num_labels=2,
        **kw,  # QA needs exactly 2
    )


VARIANTS = [(8, False), (16, False), (8, True), (16, True)]
VARIANT_IDS = ["E<H", "E=H", "E<H-cross", "E=H-cross"]


@pytest.fixture(scope="module")
def hf_state_dicts():
    """transformers state dicts (name -> shape) of every Electra head in every variant, built once."""
    import torch
    import transformers

    torch.manual_seed(0)
    out = {}
    for e, cross in VARIANTS:
        ours = _tiny(e, cross)
        theirs_cfg = transformers.ElectraConfig(
            **{k: v for k, v in ours.to_dict().items() if k not in ("model_type", "transformers_version")}
        )
        for head in HEADS:
            cls = getattr(transformers, f"Electra{head}")
            sd = cls(theirs_cfg).state_dict()
            out[(e, cross, head)] = {k: tuple(v.shape) for k, v in sd.items()}
    return out


@pytest.mark.hf
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_electra_spec_equals_transformers_state_dict(hf_state_dicts, variant, head):
    e, cross = variant
    spec = electra_spec(_tiny(e, cross), head)
    want = hf_state_dicts[(e, cross, head)]
    declared = {p.name: p.shape for p in spec}
    for alias, target in spec.ties.items():
        declared[alias] = spec[target].shape
    # The legacy position_ids buffer is no longer persistent in transformers 4.57.6.
    assert declared == want
    assert spec.head == head and spec.family == "electra"
    assert spec.base_prefix == ("" if head == "Model" else "electra")
    assert ("embeddings_project.weight" in spec) == (e != 16 and head == "Model")
    assert any(".crossattention." in n for n in spec.names) == cross


def test_electra_spec_via_registry_matches_function():
    c = _tiny(8, False)
    fam = get_family("electra")
    for head in HEADS:
        assert fam.model_spec(c, head) == electra_spec(c, head)


def test_electra_summary_proj_to_labels_changes_summary_width():
    c = _tiny(8, False, summary_proj_to_labels=True)
    spec = electra_spec(c, "ForMultipleChoice")
    assert spec["sequence_summary.summary.weight"].shape == (2, 16)


def test_electra_spec_rejects_unknown_head():
    with pytest.raises(ValueError, match="ForNothing"):
        electra_spec(_tiny(8, False), "ForNothing")


# --- layouts --------------------------------------------------------------------------------------


def _all_params():
    ps = []
    for e, cross in VARIANTS:
        for head in HEADS:
            ps.extend(electra_spec(_tiny(e, cross), head))
    ps.append(Param("quant.act_scaling_factor", (1,), ("scalar",), Kind.BUFFER))
    ps.append(Param("quant.table", (3, 4), ("heads", "buckets"), Kind.BUFFER))
    return ps


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_layouts_round_trip_bit_exactly(layout_name):
    layout = get_layout(layout_name)
    rng = np.random.default_rng(0)
    seen = set()
    for p in _all_params():
        if p.name in seen:
            continue
        seen.add(p.name)
        x = rng.standard_normal(p.shape).astype(np.float32)
        stored = layout.to_stored(p, x)
        assert stored.shape == layout.shape(p), p.name
        back = layout.from_stored(p, stored)
        assert back.shape == p.shape and back.dtype == x.dtype
        assert back.tobytes() == x.tobytes(), p.name
        assert len(layout.axes(p)) == len(p.shape)


def test_keras_and_flax_keys_and_shapes_follow_design():
    keras, flax, pt = get_layout("keras"), get_layout("flax"), get_layout("pt")
    checked = set()
    for p in _all_params():
        assert pt.key(p) == p.name and pt.shape(p) == p.shape
        mod = p.module.replace(".", "/")
        k, f = keras.key(p), flax.key(p)
        if p.kind is Kind.DENSE:
            assert (k, f) == (f"{mod}/kernel", f"{mod}/kernel")
            assert keras.shape(p) == flax.shape(p) == (p.shape[1], p.shape[0])
            assert keras.axes(p) == (p.axes[1], p.axes[0])
        else:
            leaf = {
                Kind.BIAS: ("bias", "bias"),
                Kind.EMBEDDING: ("embeddings", "embedding"),
                Kind.NORM_SCALE: ("gamma", "scale"),
                Kind.NORM_BIAS: ("beta", "bias"),
                Kind.BUFFER: (p.leaf, p.leaf),
            }[p.kind]
            assert (k, f) == (f"{mod}/{leaf[0]}", f"{mod}/{leaf[1]}")
            assert keras.shape(p) == flax.shape(p) == p.shape
        assert flax.path(p) == tuple(f.split("/"))
        assert flax.collection_of(p) == ("buffers" if p.kind is Kind.BUFFER else "params")
        assert keras.collection_of(p) == "params"
        checked.add(p.kind)
    assert checked == set(Kind)
    spec = electra_spec(_tiny(8, False), "ForMaskedLM")
    p = spec["electra.encoder.layer.0.attention.self.query.weight"]
    assert keras.key(p) == "electra/encoder/layer/0/attention/self/query/kernel"
    assert flax.key(spec["electra.embeddings.LayerNorm.weight"]) == "electra/embeddings/LayerNorm/scale"
    word = spec["electra.embeddings.word_embeddings.weight"]
    assert keras.key(word) == "electra/embeddings/word_embeddings/embeddings"


def test_layout_dense_transpose_is_the_transpose():
    p = dense("proj", 3, 5, "hidden", "mlp")[0]
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    for name in ("keras", "flax"):
        np.testing.assert_array_equal(get_layout(name).to_stored(p, x), x.T)
    np.testing.assert_array_equal(get_layout("pt").to_stored(p, x), x)


def test_layout_shape_checks_name_the_param():
    p = dense("proj", 3, 5, "hidden", "mlp")[0]
    with pytest.raises(ValueError, match=r"proj.weight.*\(3, 5\).*\(5, 3\)"):
        get_layout("keras").to_stored(p, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"proj.weight"):
        get_layout("flax").from_stored(p, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="unknown layout"):
        get_layout("onnx")


# --- Param and ModelSpec rules --------------------------------------------------------------------


def test_param_validation():
    with pytest.raises(ValueError, match="rank"):
        Param("w", (2, 3), ("hidden",), Kind.DENSE)
    with pytest.raises(ValueError, match="unknown logical axes"):
        Param("w", (2,), ("width",), Kind.BIAS)
    with pytest.raises(ValueError, match="non-positive"):
        Param("w", (0, 3), ("hidden", "mlp"), Kind.DENSE)
    p = embedding("emb", 10, 4, "vocab", padding_idx=0)[0]
    assert p.module == "emb" and p.leaf == "weight" and p.size == 40 and p.trainable and p.padding_idx == 0
    assert p.init.value == "normal"
    assert layer_norm("ln", 4)[0].init.value == "ones"
    assert not Param("b", (1,), ("scalar",), Kind.BUFFER).trainable


def test_model_spec_rejects_duplicates_and_dangling_ties():
    ps = tuple(dense("a", 2, 3, "hidden", "mlp") + embedding("emb", 5, 2, "vocab"))
    with pytest.raises(ValueError, match="declared twice"):
        ModelSpec("x", "Model", "", ps + (ps[0],))
    with pytest.raises(ValueError, match="undeclared"):
        ModelSpec("x", "ForMaskedLM", "x", ps, ties={"head.weight": "emb.missing"})
    with pytest.raises(ValueError, match="also declared"):
        ModelSpec("x", "ForMaskedLM", "x", ps, ties={"a.weight": "emb.weight"})
    spec = ModelSpec("x", "ForMaskedLM", "x", ps, ties={"head.weight": "emb.weight"}, ignored=("*.position_ids",))
    assert len(spec) == 3 and "a.bias" in spec and "head.weight" not in spec
    assert spec.names == ["a.weight", "a.bias", "emb.weight"]
    assert spec.is_ignored("x.embeddings.position_ids") and not spec.is_ignored("a.bias")
    assert spec.num_parameters() == 6 + 3 + 10 and not spec.is_base
    with pytest.raises(KeyError):
        spec["nope"]


@pytest.mark.hf
def test_electra_spec_counts_parameters_like_transformers(hf_state_dicts):
    # Tied weights count once: the spec's total equals the unique tensors of the state dict.
    for head in HEADS:
        spec = electra_spec(_tiny(8, False), head)
        sd = hf_state_dicts[(8, False, head)]
        unique = {k: v for k, v in sd.items() if k not in spec.ties}
        assert spec.num_parameters() == sum(int(np.prod(s)) for s in unique.values())
