"""Configs of all six families against transformers 4.57.6's config classes.

transformers is the oracle here (its config classes only).
"""

from __future__ import annotations

import inspect
import json

import pytest
import transformers

import nezha_zoo
from nezha_zoo import (
    AutoConfig,
    ElectraConfig,
    IBertConfig,
    MPNetConfig,
    MptAttentionConfig,
    MptConfig,
    NezhaConfig,
    PretrainedConfig,
    XLMRobertaXLConfig,
)
from nezha_zoo.spec.registry import families, get_family

pytestmark = pytest.mark.hf

#: ours -> transformers' class
PAIRS = {
    ElectraConfig: transformers.ElectraConfig,
    NezhaConfig: transformers.NezhaConfig,
    XLMRobertaXLConfig: transformers.XLMRobertaXLConfig,
    IBertConfig: transformers.IBertConfig,
    MPNetConfig: transformers.MPNetConfig,
    MptConfig: transformers.MptConfig,
}

#: small non-default values for every family (each validates)
TINY = {
    ElectraConfig: dict(
        vocab_size=99,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_act="relu",
        classifier_dropout=0.2,
    ),
    NezhaConfig: dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        max_relative_position=8,
        layer_norm_eps=1e-6,
        classifier_dropout=None,
    ),
    XLMRobertaXLConfig: dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=66,
        type_vocab_size=2,
        use_cache=False,
    ),
    IBertConfig: dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=66,
        quant_mode=True,
        force_dequant="softmax",
        layer_norm_eps=1e-5,
    ),
    MPNetConfig: dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=66,
        relative_attention_num_buckets=16,
        hidden_act="gelu_new",
    ),
    MptConfig: dict(
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=64,
        vocab_size=99,
        use_cache=True,
        attn_config={"attn_pdrop": 0.1, "clip_qkv": 6.0, "softmax_scale": 0.25, "alibi_bias_max": 4},
        logit_scale="inv_sqrt_d_model",
        no_bias=False,
    ),
}

ALL = list(PAIRS)
ids = [c.__name__ for c in ALL]


def _normalise(value):
    """Comparable form of a config value (nested configs as dicts without transformers bookkeeping)."""
    if hasattr(value, "to_dict"):
        d = dict(value.to_dict())
        d.pop("model_type", None)
        d.pop("transformers_version", None)
        return d
    return value


def _theirs_field(theirs, name):
    value = getattr(theirs, name)
    if name == "attn_config":
        fields = [f.name for f in MptAttentionConfig.fields]
        return {k: getattr(value, k) for k in fields}
    return value


def _ours_field(ours, name):
    value = getattr(ours, name)
    if name == "attn_config":
        return {f.name: getattr(value, f.name) for f in MptAttentionConfig.fields}
    return value


def _assert_same_fields(ours: PretrainedConfig, theirs) -> None:
    for f in ours.fields:
        assert _ours_field(ours, f.name) == _theirs_field(theirs, f.name), f.name
        assert type(_ours_field(ours, f.name)) is type(_theirs_field(theirs, f.name)) or f.name == "attn_config", f.name
    for name in (
        "num_labels",
        "is_decoder",
        "add_cross_attention",
        "tie_word_embeddings",
        "problem_type",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "architectures",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert {int(k): v for k, v in ours.id2label.items()} == dict(theirs.id2label)
    assert dict(ours.label2id) == dict(theirs.label2id)


# --- defaults and signatures ----------------------------------------------------------------------


@pytest.mark.parametrize("ours", ALL, ids=ids)
def test_signature_matches_transformers_order_and_defaults(ours):
    theirs = PAIRS[ours]
    want = [
        (p.name, p.default)
        for p in inspect.signature(theirs.__init__).parameters.values()
        if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    got = [
        (p.name, p.default)
        for p in inspect.signature(ours).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    assert got == want
    assert [f.name for f in ours.fields] == [n for n, _ in want]


@pytest.mark.parametrize("ours", ALL, ids=ids)
def test_defaults_equal_transformers(ours):
    theirs = PAIRS[ours]()
    mine = ours()
    _assert_same_fields(mine, theirs)
    assert mine.model_type == theirs.model_type


def test_mpt_attention_signature_and_defaults_match_transformers():
    theirs = transformers.models.mpt.configuration_mpt.MptAttentionConfig
    want = [
        (p.name, p.default)
        for p in inspect.signature(theirs.__init__).parameters.values()
        if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    got = [
        (p.name, p.default)
        for p in inspect.signature(MptAttentionConfig).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    assert got == want
    assert [f.name for f in MptAttentionConfig.fields] == [n for n, _ in want]


def test_each_family_has_its_own_signature():
    sigs = {c.__name__: tuple(inspect.signature(c).parameters) for c in ALL}
    assert len(set(sigs.values())) == len(sigs)
    assert "embedding_size" in sigs["ElectraConfig"] and "embedding_size" not in sigs["MptConfig"]


@pytest.mark.parametrize("ours", ALL, ids=ids)
def test_positional_construction_follows_field_order(ours):
    first = ours.fields[0]
    value = TINY[ours][first.name]
    kwargs = {k: v for k, v in TINY[ours].items() if k != first.name}
    cfg = ours(value, **kwargs)
    assert getattr(cfg, first.name) == value
    with pytest.raises(TypeError):
        ours(value, **{first.name: value})


# --- config.json round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("ours", ALL, ids=ids)
def test_ours_to_file_to_transformers(ours, tmp_path):
    cfg = ours(**TINY[ours], id2label={0: "neg", 1: "neu", 2: "pos"}, my_unknown_key={"nested": [1, 2]})
    cfg.save_pretrained(tmp_path)
    theirs = PAIRS[ours].from_pretrained(tmp_path)
    _assert_same_fields(cfg, theirs)
    assert theirs.num_labels == 3 and theirs.id2label[2] == "pos"
    assert theirs.my_unknown_key == {"nested": [1, 2]}
    # transformers' own dispatch reads the model_type we wrote.
    assert type(transformers.AutoConfig.from_pretrained(tmp_path)) is PAIRS[ours]


@pytest.mark.parametrize("ours", ALL, ids=ids)
def test_transformers_to_file_to_ours(ours, tmp_path):
    theirs = PAIRS[ours](
        **TINY[ours],
        num_labels=4,
        problem_type="multi_label_classification",
        custom_setting="kept",
        another=[1, {"a": None}],
    )
    theirs.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    cfg = ours.from_pretrained(tmp_path)
    assert type(cfg) is ours
    _assert_same_fields(cfg, theirs)
    assert cfg.num_labels == 4 and cfg.problem_type == "multi_label_classification"
    # Unknown keys are kept and written back unchanged.
    assert cfg.extra["custom_setting"] == "kept" and cfg.custom_setting == "kept"
    out = cfg.to_dict()
    for key, value in raw.items():
        if key in ("id2label",):
            assert {str(k): v for k, v in out[key].items()} == value
        else:
            assert out[key] == value, key
    # ... and transformers reads our rewrite as the same config.
    cfg.save_pretrained(tmp_path / "again")
    back = PAIRS[ours].from_pretrained(tmp_path / "again")
    _assert_same_fields(cfg, back)
    assert back.custom_setting == "kept" and back.another == [1, {"a": None}]


@pytest.mark.parametrize("ours", ALL, ids=ids)
def test_dict_and_json_round_trip(ours, tmp_path):
    cfg = ours(**TINY[ours], num_labels=3, unknown=1.5)
    assert ours.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.json"
    cfg.to_json_file(path)
    again = ours.from_json_file(path)
    assert again == cfg and again.unknown == 1.5
    assert again.to_json_string() == cfg.to_json_string()
    assert cfg.copy() == cfg and cfg.copy() is not cfg
    assert cfg.copy(num_labels=5).num_labels == 5
    assert repr(cfg).startswith(f"{ours.__name__}(")


def test_from_json_file_rejects_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        NezhaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        NezhaConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        NezhaConfig.from_pretrained(tmp_path / "absent")


def test_from_dict_refuses_another_family():
    data = MPNetConfig().to_dict()
    with pytest.raises(ValueError, match="mpnet"):
        NezhaConfig.from_dict(data)


# --- labels ---------------------------------------------------------------------------------------


def test_num_labels_and_id2label():
    c = NezhaConfig(num_labels=5)
    assert c.num_labels == 5 and c.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert c.label2id == {f"LABEL_{i}": i for i in range(5)}
    c = NezhaConfig(id2label={"0": "a", "1": "b", "2": "c"})
    assert c.num_labels == 3 and c.id2label == {0: "a", 1: "b", 2: "c"} and c.label2id == {"a": 0, "b": 1, "c": 2}
    c.num_labels = 2
    assert c.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    with pytest.raises(ValueError, match="num_labels"):
        NezhaConfig(num_labels=3, id2label={0: "a"})
    with pytest.raises(ValueError, match="num_labels"):
        NezhaConfig(num_labels=0)
    with pytest.raises(ValueError, match="num_labels"):
        c.num_labels = -1
    # A num_labels override replaces the file's label names.
    c = NezhaConfig.from_dict(NezhaConfig(id2label={0: "x", 1: "y", 2: "z"}).to_dict(), num_labels=4)
    assert c.num_labels == 4 and c.id2label[3] == "LABEL_3"


def test_num_labels_reaches_transformers(tmp_path):
    MPNetConfig(num_labels=7).save_pretrained(tmp_path)
    assert transformers.MPNetConfig.from_pretrained(tmp_path).num_labels == 7


# --- MPT: attn_config and aliases -----------------------------------------------------------------


def test_mpt_attn_config_from_dict_object_and_none():
    d = {"attn_type": "multiquery_attention", "attn_pdrop": 0.2, "clip_qkv": 8.0, "alibi": False}
    a = MptConfig(attn_config=d)
    b = MptConfig(attn_config=MptAttentionConfig(**d))
    assert isinstance(a.attn_config, MptAttentionConfig) and a.attn_config == b.attn_config
    assert a == b
    assert a.attn_config.attn_type == "multiquery_attention" and a.attn_config.alibi is False
    assert MptConfig().attn_config == MptAttentionConfig()
    # A nested object in config.json, both ways.
    js = a.to_dict()["attn_config"]
    assert isinstance(js, dict) and js["clip_qkv"] == 8.0 and js["attn_type"] == "multiquery_attention"
    assert MptConfig.from_dict(a.to_dict()) == a
    # The caller's dict and object are not aliased.
    d["attn_pdrop"] = 0.9
    assert a.attn_config.attn_pdrop == 0.2
    with pytest.raises(ValueError, match="attn_config"):
        MptConfig(attn_config=3)


def test_mpt_attn_config_with_transformers(tmp_path):
    ours = MptConfig(**TINY[MptConfig])
    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.MptConfig.from_pretrained(tmp_path / "ours")
    assert isinstance(theirs.attn_config, transformers.models.mpt.configuration_mpt.MptAttentionConfig)
    for f in MptAttentionConfig.fields:
        assert getattr(theirs.attn_config, f.name) == getattr(ours.attn_config, f.name), f.name
    theirs = transformers.MptConfig(
        attn_config=transformers.models.mpt.configuration_mpt.MptAttentionConfig(
            attn_type="multiquery_attention", softmax_scale=0.5, qk_ln=True
        )
    )
    theirs.save_pretrained(tmp_path / "theirs")
    raw = json.loads((tmp_path / "theirs" / "config.json").read_text())
    back = MptConfig.from_pretrained(tmp_path / "theirs")
    assert back.attn_config.attn_type == "multiquery_attention"
    assert back.attn_config.softmax_scale == 0.5 and back.attn_config.qk_ln is True
    # transformers' nested bookkeeping ("model_type": "") is kept and written back.
    assert back.attn_config.extra == {
        k: v for k, v in raw["attn_config"].items() if k not in {f.name for f in MptAttentionConfig.fields}
    }
    assert back.to_dict()["attn_config"] == raw["attn_config"]


def test_mpt_attribute_map_aliases():
    c = MptConfig(hidden_size=64, num_attention_heads=8, num_hidden_layers=3)
    assert (c.d_model, c.n_heads, c.n_layers) == (64, 8, 3)
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (64, 8, 3)
    c.hidden_size = 128
    assert c.d_model == 128
    c.num_attention_heads = 16
    assert c.n_heads == 16 and c.head_dim == 8
    d = c.to_dict()
    assert d["d_model"] == 128 and "hidden_size" not in d and "num_attention_heads" not in d
    with pytest.raises(ValueError, match="hidden_size"):
        MptConfig.from_dict({**d, "hidden_size": 256})
    with pytest.raises(ValueError, match="d_model"):
        MptConfig(hidden_size=64, d_model=64)
    theirs = transformers.MptConfig(hidden_size=64, num_attention_heads=8)
    assert (theirs.d_model, theirs.n_heads) == (64, 8)


def test_mpt_alias_in_config_json_maps_to_field():
    data = MptConfig().to_dict()
    data.pop("d_model")
    data["hidden_size"] = 96
    data["n_heads"] = 6
    c = MptConfig.from_dict(data)
    assert c.d_model == 96 and c.hidden_size == 96
    assert "hidden_size" not in c.extra


# --- validation -----------------------------------------------------------------------------------

INVALID = [
    (ElectraConfig, dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
    (ElectraConfig, dict(hidden_act="nope"), "hidden_act"),
    (ElectraConfig, dict(summary_type="attn"), "summary_type"),
    (NezhaConfig, dict(hidden_size=100, num_attention_heads=12), "hidden_size"),
    (NezhaConfig, dict(vocab_size=0), "vocab_size"),
    (NezhaConfig, dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    (NezhaConfig, dict(max_relative_position=-1), "max_relative_position"),
    (NezhaConfig, dict(hidden_act="swishy"), "hidden_act"),
    (NezhaConfig, dict(classifier_dropout=-0.1), "classifier_dropout"),
    (NezhaConfig, dict(pad_token_id=21128), "pad_token_id"),
    (NezhaConfig, dict(use_cache="yes"), "use_cache"),
    (NezhaConfig, dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (NezhaConfig, dict(num_hidden_layers=2.0), "num_hidden_layers"),
    (NezhaConfig, dict(add_cross_attention=True), "add_cross_attention"),
    (XLMRobertaXLConfig, dict(hidden_size=2561), "hidden_size"),
    (XLMRobertaXLConfig, dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (XLMRobertaXLConfig, dict(type_vocab_size=0), "type_vocab_size"),
    (XLMRobertaXLConfig, dict(pad_token_id=None), "pad_token_id"),
    (XLMRobertaXLConfig, dict(max_position_embeddings=1), "pad_token_id"),
    (XLMRobertaXLConfig, dict(attention_probs_dropout_prob=float("nan")), "attention_probs_dropout_prob"),
    (XLMRobertaXLConfig, dict(problem_type="ranking"), "problem_type"),
    (IBertConfig, dict(hidden_act="relu"), "hidden_act"),
    (IBertConfig, dict(position_embedding_type="relative_key_query"), "position_embedding_type"),
    (IBertConfig, dict(force_dequant="all"), "force_dequant"),
    (IBertConfig, dict(quant_mode=1), "quant_mode"),
    (IBertConfig, dict(num_attention_heads=7), "hidden_size"),
    (IBertConfig, dict(initializer_range=-0.02), "initializer_range"),
    (MPNetConfig, dict(relative_attention_num_buckets=0), "relative_attention_num_buckets"),
    (MPNetConfig, dict(relative_attention_num_buckets=1), "relative_attention_num_buckets"),
    (MPNetConfig, dict(hidden_size=770), "hidden_size"),
    (MPNetConfig, dict(intermediate_size=True), "intermediate_size"),
    (MPNetConfig, dict(max_position_embeddings=1), "max_position_embeddings"),
    (MPNetConfig, dict(pad_token_id=-1), "pad_token_id"),
    (MptConfig, dict(d_model=100, n_heads=16), "d_model"),
    (MptConfig, dict(hidden_size=100), "d_model"),
    (MptConfig, dict(n_layers=0), "n_layers"),
    (MptConfig, dict(resid_pdrop=2.0), "resid_pdrop"),
    (MptConfig, dict(embedding_fraction=0.0), "embedding_fraction"),
    (MptConfig, dict(logit_scale="big"), "logit_scale"),
    (MptConfig, dict(verbose=-1), "verbose"),
    (MptConfig, dict(norm_type=3), "norm_type"),
    (MptConfig, dict(attn_config={"attn_type": "cross"}), "attn_config.attn_type"),
    (MptConfig, dict(attn_config={"attn_pdrop": -0.5}), "attn_config.attn_pdrop"),
    (MptConfig, dict(attn_config={"attn_impl": "xformers"}), "attn_config.attn_impl"),
    (MptConfig, dict(attn_config={"clip_qkv": 0}), "attn_config.clip_qkv"),
    (MptConfig, dict(attn_config={"softmax_scale": "auto"}), "attn_config.softmax_scale"),
    (MptConfig, dict(attn_config={"alibi": "yes"}), "attn_config.alibi"),
    (MptConfig, dict(attn_config={"alibi_bias_max": 0}), "attn_config.alibi_bias_max"),
]


INVALID_IDS = [f"{c.__name__}-{f}-{i}" for i, (c, _, f) in enumerate(INVALID)]


@pytest.mark.parametrize("cls,kwargs,field", INVALID, ids=INVALID_IDS)
def test_invalid_value_raises_naming_field(cls, kwargs, field):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    assert field in str(info.value)
    assert cls.__name__ in str(info.value)


def test_invalid_value_in_config_json_raises_naming_field(tmp_path):
    data = IBertConfig().to_dict()
    data["force_dequant"] = "everything"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="force_dequant"):
        IBertConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="force_dequant"):
        AutoConfig.from_pretrained(tmp_path)


def test_ibert_values_transformers_refuses_at_model_build_are_refused_at_config():
    # transformers' own config accepts them (and its model raises later); ours raises at once.
    assert transformers.IBertConfig(hidden_act="relu").hidden_act == "relu"
    with pytest.raises(ValueError, match="IBertConfig.hidden_act"):
        IBertConfig(hidden_act="relu")


def test_attn_config_mutation_is_revalidated():
    c = MptConfig()
    c.attn_config.attn_pdrop = 3
    with pytest.raises(ValueError, match="attn_config.attn_pdrop"):
        c.validate()


@pytest.mark.parametrize("ours", ALL, ids=ids)
def test_valid_edge_values_are_accepted(ours):
    cfg = ours(**TINY[ours])
    cfg.validate()
    for f in ours.fields:
        if f.name.endswith("dropout_prob") or f.name.endswith("pdrop"):
            ours(**{**TINY[ours], f.name: 0})
            ours(**{**TINY[ours], f.name: 1.0})


# --- registry and AutoConfig ----------------------------------------------------------------------

FAMILY_FACTS = {
    "nezha": ("nezha", "Nezha", NezhaConfig, "nezha", 8, "ForNextSentencePrediction"),
    "xlm_roberta_xl": ("xlm-roberta-xl", "XLMRobertaXL", XLMRobertaXLConfig, "roberta", 7, "ForCausalLM"),
    "electra": ("electra", "Electra", ElectraConfig, "electra", 8, "ForPreTraining"),
    "ibert": ("ibert", "IBert", IBertConfig, "ibert", 6, "ForMultipleChoice"),
    "mpnet": ("mpnet", "MPNet", MPNetConfig, "mpnet", 6, "ForMultipleChoice"),
    "mpt": ("mpt", "Mpt", MptConfig, "transformer", 5, "ForCausalLM"),
}


@pytest.mark.parametrize("key", sorted(FAMILY_FACTS))
def test_registry_entries(key):
    model_type, prefix, cls, base, n_heads, some_head = FAMILY_FACTS[key]
    fam = get_family(key)
    assert fam is get_family(model_type)
    assert (fam.key, fam.model_type, fam.class_prefix, fam.config_class, fam.base_prefix) == (
        key,
        model_type,
        prefix,
        cls,
        base,
    )
    assert cls.model_type == model_type
    assert fam.heads[0] == "Model" and len(fam.heads) == n_heads and len(set(fam.heads)) == n_heads
    assert some_head in fam.heads
    assert fam.class_name("Model") == f"{prefix}Model"
    assert fam.class_name(some_head, "tf") == f"TF{prefix}{some_head}"
    assert fam.class_name(some_head, "flax") == f"Flax{prefix}{some_head}"
    # Every head name is a transformers PyTorch class of that family (the matrix of SPEC.md §1).
    for head in fam.heads:
        assert hasattr(transformers, fam.class_name(head)), fam.class_name(head)
    with pytest.raises(ValueError, match="no head"):
        fam.model_spec(cls(**TINY[cls]), "ForNothing")


def test_registry_has_six_families_and_40_classes():
    fams = families()
    assert sorted(fams) == ["electra", "ibert", "mpnet", "mpt", "nezha", "xlm-roberta-xl"]
    assert sum(len(f.heads) for f in fams.values()) == 40


@pytest.mark.parametrize("ours", ALL, ids=ids)
def test_autoconfig_dispatches_on_model_type(ours, tmp_path):
    PAIRS[ours](**TINY[ours]).save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert type(cfg) is ours
    assert type(AutoConfig.from_pretrained(tmp_path / "config.json")) is ours
    assert type(AutoConfig.from_dict(cfg.to_dict())) is ours
    assert type(AutoConfig.for_model(ours.model_type)) is ours
    assert AutoConfig.from_pretrained(tmp_path, num_labels=6).num_labels == 6


def test_autoconfig_unknown_or_missing_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="unknown model family 'bert'") as info:
        AutoConfig.from_pretrained(tmp_path)
    assert "electra" in str(info.value) and "mpt" in str(info.value)
    with pytest.raises(ValueError, match="model_type"):
        AutoConfig.from_dict({"hidden_size": 8})
    with pytest.raises(ValueError, match="unknown model family"):
        AutoConfig.for_model("gpt2")
    with pytest.raises(FileNotFoundError):
        AutoConfig.from_pretrained(tmp_path / "nowhere")


def test_package_exports_every_config():
    for cls in ALL:
        assert getattr(nezha_zoo, cls.__name__) is cls
        assert cls.__name__ in nezha_zoo.__all__
    assert nezha_zoo.MptAttentionConfig is MptAttentionConfig


@pytest.mark.parametrize("ours", ALL, ids=ids)
def test_docstring_documents_every_field_with_type(ours):
    doc = inspect.getdoc(ours)
    for f in ours.fields:
        assert f"    {f.name} (" in doc, f.name


# --- copies, pickling, isolation ------------------------------------------------------------------


@pytest.mark.parametrize("ours", ALL, ids=ids)
def test_configs_deepcopy_and_pickle(ours):
    import copy
    import pickle

    cfg = ours(**TINY[ours], num_labels=3, extra_key={"a": [1]})
    for other in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg)), copy.copy(cfg)):
        assert other == cfg and type(other) is ours
        assert other.extra_key == {"a": [1]}


def test_unknown_nested_values_are_private_copies():
    nested = {"a": [1, 2]}
    cfg = NezhaConfig(custom=nested)
    nested["a"].append(3)
    assert cfg.custom == {"a": [1, 2]}
    d = cfg.to_dict()
    d["custom"]["a"].append(4)
    assert cfg.custom == {"a": [1, 2]}


def test_bad_label_maps_raise_naming_the_field():
    with pytest.raises(ValueError, match="id2label"):
        NezhaConfig(id2label={"first": "a"})
    with pytest.raises(ValueError, match="label2id"):
        NezhaConfig(id2label={0: "a"}, label2id={"a": "zero"})


def test_mpt_head_dim_and_defaults_of_common_token_ids():
    c = MptConfig(d_model=48, n_heads=6)
    assert c.head_dim == 8
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (None, None, None)
    assert MptConfig(pad_token_id=0).pad_token_id == 0
    with pytest.raises(ValueError, match="MptConfig.pad_token_id"):
        MptConfig(pad_token_id="0")
    # Families declaring their own token ids keep their own defaults.
    assert (NezhaConfig().pad_token_id, NezhaConfig().bos_token_id, NezhaConfig().eos_token_id) == (0, 2, 3)


def test_llm_foundry_style_mpt_config_round_trips(tmp_path):
    # The shape of a config.json saved by MosaicML's own code (remote-code era): extra nested
    # sections, auto_map, a bfloat16 dtype and attention keys transformers does not know.
    data = {
        "architectures": ["MPTForCausalLM"],
        "attn_config": {
            "alibi": True,
            "alibi_bias_max": 8,
            "attn_impl": "triton",
            "attn_pdrop": 0,
            "attn_type": "multihead_attention",
            "attn_uses_sequence_id": False,
            "clip_qkv": None,
            "prefix_lm": False,
            "qk_ln": False,
            "softmax_scale": None,
            "rope": False,
        },
        "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig"},
        "d_model": 64,
        "emb_pdrop": 0,
        "embedding_fraction": 1.0,
        "expansion_ratio": 4,
        "init_config": {"emb_init_std": None, "init_nonlinearity": "relu", "name": "kaiming_normal_"},
        "init_device": "cpu",
        "learned_pos_emb": True,
        "logit_scale": None,
        "max_seq_len": 128,
        "model_type": "mpt",
        "n_heads": 4,
        "n_layers": 2,
        "no_bias": True,
        "norm_type": "low_precision_layernorm",
        "resid_pdrop": 0,
        "tokenizer_name": "EleutherAI/gpt-neox-20b",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.28.1",
        "use_cache": False,
        "verbose": 0,
        "vocab_size": 512,
    }
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, MptConfig) and cfg.attn_config.attn_impl == "triton"
    assert cfg.attn_config.rope is False and cfg.init_config["name"] == "kaiming_normal_"
    out = cfg.to_dict()
    for key, value in data.items():
        assert out[key] == value, key
    cfg.save_pretrained(tmp_path / "out")
    theirs = transformers.MptConfig.from_pretrained(tmp_path / "out")
    assert theirs.d_model == 64 and theirs.attn_config.attn_impl == "triton"
    assert theirs.auto_map == data["auto_map"]


def test_every_transformers_common_config_key_is_an_accepted_override(tmp_path):
    """transformers' PretrainedConfig keys are legal overrides; everything else raises (issue #20)."""
    keys = set(transformers.PretrainedConfig().to_dict())
    for ours in (ElectraConfig, MptConfig):
        ours.check_override_names(dict.fromkeys(keys - {"model_type"}))
        with pytest.raises(TypeError, match="not a field of"):
            ours.check_override_names({"num_label": 3})
