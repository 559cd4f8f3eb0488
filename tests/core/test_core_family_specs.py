"""Parameter specs of Nezha, XLM-RoBERTa-XL, I-BERT, MPNet and MPT against transformers 4.57.6.

For every family, head and tiny config variant: the declared tensors (params + tied aliases) are
exactly transformers' PyTorch ``state_dict()`` (names and shapes; non-persistent buffers are not in it),
parameters and persistent buffers are told apart as transformers does, tied aliases are the very same
tensor there, initial constants match, and every key of transformers' ``save_pretrained`` safetensors
is consumed by :func:`nezha_zoo.io.plan.plan_load` with nothing missing or unexpected.  MPT settings
transformers ignores (llm-foundry's ``no_bias``, ``expansion_ratio``, multi-query attention,
``qk_ln``) are checked against the shapes llm-foundry declares.

torch and transformers are imported inside the tests only.
"""

from __future__ import annotations

import numpy as np
import pytest

from nezha_zoo.families.ibert import IBertConfig, ibert_spec
from nezha_zoo.families.mpnet import MPNetConfig, mpnet_spec
from nezha_zoo.families.mpt import MptConfig, mpt_spec
from nezha_zoo.families.nezha import NezhaConfig, nezha_spec
from nezha_zoo.families.xlm_roberta_xl import XLMRobertaXLConfig, xlm_roberta_xl_spec
from nezha_zoo.io.plan import plan_load
from nezha_zoo.spec import Kind, get_family
from nezha_zoo.spec.param import Init, Param

_BERT = dict(
    vocab_size=37,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    max_position_embeddings=20,
    num_labels=3,
)

# family key -> (our config class, spec function, {variant id: config kwargs})
FAMILIES = {
    "nezha": (
        NezhaConfig,
        nezha_spec,
        {
            "base": dict(_BERT, type_vocab_size=3, max_relative_position=4),
            "decoder-cross": dict(_BERT, is_decoder=True, add_cross_attention=True),
            "wide-untied": dict(
                _BERT,
                hidden_size=24,
                num_attention_heads=3,
                intermediate_size=40,
                num_hidden_layers=1,
                tie_word_embeddings=False,
                pad_token_id=2,
            ),
        },
    ),
    "xlm-roberta-xl": (
        XLMRobertaXLConfig,
        xlm_roberta_xl_spec,
        {
            "base": dict(_BERT, type_vocab_size=3),
            "decoder-cross": dict(_BERT, is_decoder=True, add_cross_attention=True),
            "wide-untied": dict(
                _BERT,
                hidden_size=24,
                num_attention_heads=3,
                intermediate_size=40,
                num_hidden_layers=1,
                tie_word_embeddings=False,
            ),
        },
    ),
    "ibert": (
        IBertConfig,
        ibert_spec,
        {
            "base": dict(_BERT),
            "wide-untied": dict(
                _BERT,
                hidden_size=24,
                num_attention_heads=3,
                intermediate_size=40,
                num_hidden_layers=1,
                type_vocab_size=3,
                tie_word_embeddings=False,
            ),
            "quant-mode": dict(_BERT, num_hidden_layers=1, quant_mode=True, force_dequant="softmax"),
        },
    ),
    "mpnet": (
        MPNetConfig,
        mpnet_spec,
        {
            "base": dict(_BERT),
            "buckets16-untied": dict(
                _BERT, relative_attention_num_buckets=16, num_hidden_layers=1, tie_word_embeddings=False
            ),
        },
    ),
    "mpt": (
        MptConfig,
        mpt_spec,
        {
            "base": dict(d_model=16, n_heads=4, n_layers=2, vocab_size=37, max_seq_len=20, num_labels=3),
            "heads2-untied": dict(
                d_model=24,
                n_heads=2,
                n_layers=1,
                vocab_size=37,
                max_seq_len=20,
                num_labels=5,
                tie_word_embeddings=False,
            ),
        },
    ),
}

CASES = [
    (fam, variant, head)
    for fam, (_, _, variants) in FAMILIES.items()
    for variant in variants
    for head in get_family(fam).heads
]


def _config(fam: str, variant: str):
    cls, _, variants = FAMILIES[fam]
    return cls(**variants[variant])


def _hf_config(ours):
    import transformers

    cls = getattr(transformers, f"{get_family(ours.model_type).class_prefix}Config")
    data = {k: v for k, v in ours.to_dict().items() if k not in ("model_type", "transformers_version")}
    return cls(**data)


def _hf_model(fam: str, ours, head: str):
    import torch
    import transformers

    torch.manual_seed(0)
    cls = getattr(transformers, get_family(fam).class_name(head))
    return cls(_hf_config(ours)).eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Per case: transformers' state dict, parameter/buffer names and the saved safetensors keys/shapes."""
    from safetensors import safe_open

    out = {}
    for fam, variant, head in CASES:
        model = _hf_model(fam, _config(fam, variant), head)
        d = tmp_path_factory.mktemp(f"{fam}-{variant}-{head}")
        model.save_pretrained(d)
        with safe_open(str(d / "model.safetensors"), "np") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        out[(fam, variant, head)] = {
            "sd": model.state_dict(),
            "params": {n for n, _ in model.named_parameters(remove_duplicate=False)},
            "buffers": {n for n, _ in model.named_buffers(remove_duplicate=False)},
            "saved": saved,
        }
    return out


def _spec(fam, variant, head):
    return FAMILIES[fam][1](_config(fam, variant), head)


@pytest.mark.hf
@pytest.mark.parametrize(("fam", "variant", "head"), CASES, ids=["-".join(c) for c in CASES])
def test_spec_equals_transformers_state_dict(hf, fam, variant, head):
    spec = _spec(fam, variant, head)
    got = hf[(fam, variant, head)]
    sd = got["sd"]
    declared = {p.name: p.shape for p in spec}
    for alias, target in spec.ties.items():
        declared[alias] = spec[target].shape
    assert declared == {k: tuple(v.shape) for k, v in sd.items()}

    # Parameters vs persistent buffers, as transformers has them (tied aliases are parameters).
    buffers = {p.name for p in spec if p.kind is Kind.BUFFER}
    assert buffers == got["buffers"] & sd.keys()
    assert {p.name for p in spec if p.kind is not Kind.BUFFER} | set(spec.ties) == got["params"]

    # Tied aliases are the very tensor of their target.
    for alias, target in spec.ties.items():
        assert sd[alias].data_ptr() == sd[target].data_ptr(), alias

    # Initial constants and padding rows agree with transformers' fresh model.
    for p in spec:
        t = sd[p.name].detach().numpy()
        if p.init is not Init.NORMAL and p.kind in (Kind.BUFFER, Kind.NORM_SCALE, Kind.NORM_BIAS):
            np.testing.assert_array_equal(t, np.full(p.shape, p.fill_value, np.float32), err_msg=p.name)
        if p.padding_idx is not None:
            assert not t[p.padding_idx].any(), p.name

    assert spec.family == get_family(fam).key and spec.head == head
    assert spec.base_prefix == ("" if head == "Model" else get_family(fam).base_prefix)


@pytest.mark.hf
@pytest.mark.parametrize(("fam", "variant", "head"), CASES, ids=["-".join(c) for c in CASES])
def test_save_pretrained_checkpoint_is_consumed_exactly(hf, fam, variant, head):
    spec = _spec(fam, variant, head)
    saved = hf[(fam, variant, head)]["saved"]
    plan = plan_load(spec, saved, saved.__getitem__, get_family(fam).base_prefix)
    assert plan.missing_keys == [] and plan.unexpected_keys == []
    assert set(plan.sources) == set(spec.names)


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_registry_serves_the_spec_and_rejects_unknown_heads(fam):
    c = _config(fam, "base")
    family = get_family(fam)
    spec_fn = FAMILIES[fam][1]
    for head in family.heads:
        assert family.model_spec(c, head) == spec_fn(c, head)
    with pytest.raises(ValueError, match="ForNothing"):
        spec_fn(c, "ForNothing")


# --- pooler presence per head -------------------------------------------------------------------

POOLED = {
    "nezha": {"Model", "ForPreTraining", "ForNextSentencePrediction", "ForSequenceClassification", "ForMultipleChoice"},
    "xlm-roberta-xl": {"Model", "ForMultipleChoice"},
    "ibert": {"Model", "ForMultipleChoice"},
    "mpnet": {"Model", "ForMultipleChoice"},
    "mpt": set(),
}


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_pooler_only_in_heads_that_use_it(fam):
    for head in get_family(fam).heads:
        has = any(".pooler." in f".{n}" for n in _spec(fam, "base", head).names)
        assert has == (head in POOLED[fam]), head


# --- legacy keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fam", "head", "legacy"),
    [
        (
            "nezha",
            "Model",
            [
                "embeddings.position_ids",
                "encoder.layer.0.attention.self.relative_positions_encoding.positions_encoding",
                "encoder.layer.1.crossattention.self.relative_positions_encoding.positions_encoding",
            ],
        ),
        (
            "nezha",
            "ForMaskedLM",
            ["nezha.encoder.layer.1.attention.self.relative_positions_encoding.positions_encoding"],
        ),
        ("xlm-roberta-xl", "ForMaskedLM", ["roberta.embeddings.position_ids"]),
        ("ibert", "Model", ["embeddings.position_ids"]),
        ("mpnet", "ForSequenceClassification", ["mpnet.embeddings.position_ids"]),
    ],
)
def test_legacy_buffers_are_ignored_on_load(fam, head, legacy):
    spec = _spec(fam, "decoder-cross" if fam == "nezha" else "base", head)
    shapes = {p.name: p.shape for p in spec}
    shapes.update({k: (1, 20) for k in legacy})
    plan = plan_load(spec, shapes, shapes.__getitem__, get_family(fam).base_prefix)
    assert plan.missing_keys == [] and plan.unexpected_keys == []
    assert sorted(plan.ignored_keys) == sorted(legacy)


# --- I-BERT quantization state --------------------------------------------------------------------


def test_ibert_buffer_count_and_initial_values():
    c = IBertConfig(**_BERT)
    spec = ibert_spec(c)
    assert len(spec) == 182  # transformers' IBertModel state dict at 2 layers
    buffers = [p for p in spec if p.kind is Kind.BUFFER]
    assert all(not p.trainable for p in buffers)
    x_min = [p for p in buffers if p.leaf == "x_min"]
    assert x_min and all(p.init is Init.CONSTANT and p.init_value == -1e-5 for p in x_min)
    assert all(spec[p.name[: -len("x_min")] + "x_max"].fill_value == 1e-5 for p in x_min)
    others = [p for p in buffers if p.leaf not in ("x_min", "x_max")]
    assert all(p.init is Init.ZEROS for p in others)
    assert spec["encoder.layer.0.intermediate.dense.fc_scaling_factor"].shape == (24,)
    assert spec["embeddings.word_embeddings.weight_integer"].axes == ("vocab", "embed")


def test_constant_init_needs_a_value():
    p = Param("a.x_min", (1,), ("scalar",), Kind.BUFFER, init_value=-1e-5)
    assert p.init is Init.CONSTANT and p.fill_value == -1e-5
    assert Param("a.b", (2,), ("hidden",), Kind.BIAS).fill_value == 0.0
    assert Param("a.w", (2, 2), ("hidden", "hidden"), Kind.DENSE).fill_value is None
    with pytest.raises(ValueError, match="init_value"):
        Param("a.x", (1,), ("scalar",), Kind.BUFFER, init=Init.CONSTANT)
    with pytest.raises(ValueError, match="init_value"):
        Param("a.x", (1,), ("scalar",), Kind.BUFFER, init=Init.ONES, init_value=2.0)


# --- MPT: llm-foundry settings transformers ignores -------------------------------------------------

_MPT = dict(d_model=16, n_heads=4, n_layers=2, vocab_size=37, max_seq_len=20, num_labels=3)
_MPT_BIASED = ["norm_1", "attn.Wqkv", "attn.out_proj", "norm_2", "ffn.up_proj", "ffn.down_proj"]


@pytest.mark.hf
@pytest.mark.parametrize("head", get_family("mpt").heads)
def test_mpt_no_bias_false_adds_a_bias_to_every_base_linear_and_norm(head):
    ours = MptConfig(**_MPT, no_bias=False)
    spec = mpt_spec(ours, head)
    pre = "" if head == "Model" else "transformer."
    want_biases = {f"{pre}blocks.{i}.{m}.bias" for i in range(2) for m in _MPT_BIASED} | {f"{pre}norm_f.bias"}
    base_biases = {n for n in spec.names if n.startswith(pre) and n.endswith(".bias")}
    assert base_biases == want_biases
    for name in want_biases:
        assert spec[name].shape == (spec[name[: -len("bias")] + "weight"].shape[0],)
    # Everything else is transformers' state dict (transformers ignores no_bias).
    sd = _hf_model("mpt", ours, head).state_dict()
    declared = {p.name: p.shape for p in spec if p.name not in want_biases}
    declared.update({a: spec[t].shape for a, t in spec.ties.items()})
    assert declared == {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("no_bias", [True, False])
@pytest.mark.parametrize("attn_type", ["multihead_attention", "multiquery_attention"])
def test_mpt_llm_foundry_shapes(attn_type, no_bias):
    c = MptConfig(**_MPT, no_bias=no_bias, expansion_ratio=3, attn_config={"attn_type": attn_type, "qk_ln": True})
    spec = mpt_spec(c, "ForCausalLM")
    d, hd = 16, 4
    kv = hd if attn_type == "multiquery_attention" else d
    b = "transformer.blocks.1."
    want = {
        "attn.Wqkv.weight": (d + 2 * kv, d),
        "attn.q_ln.weight": (d,),
        "attn.k_ln.weight": (kv,),
        "attn.out_proj.weight": (d, d),
        "ffn.up_proj.weight": (3 * d, d),
        "ffn.down_proj.weight": (d, 3 * d),
    }
    for leaf, shape in want.items():
        assert spec[b + leaf].shape == shape, leaf
        assert ((b + leaf[: -len("weight")] + "bias") in spec) == (not no_bias)
    assert spec[b + "attn.Wqkv.weight"].axes == ("qkv", "hidden")
    assert spec[b + "attn.k_ln.weight"].kind is Kind.NORM_SCALE
    assert ("transformer.norm_f.bias" in spec) == (not no_bias)
    assert spec.ties == {"lm_head.weight": "transformer.wte.weight"}
    # Without qk_ln there are no q_ln / k_ln.
    plain = mpt_spec(MptConfig(**_MPT, attn_config={"attn_type": attn_type}), "Model")
    assert not any("_ln." in n for n in plain.names)
    assert plain["blocks.0.attn.Wqkv.weight"].shape == (d + 2 * kv, d)


def test_mpt_question_answering_has_two_outputs_whatever_num_labels():
    spec = mpt_spec(MptConfig(**dict(_MPT, num_labels=5)), "ForQuestionAnswering")
    assert spec["qa_outputs.weight"].shape == (2, 16)


# --- layouts and logical axes -----------------------------------------------------------------------


def _all_specs():
    for fam, variant, head in CASES:
        yield f"{fam}/{variant}/{head}", _spec(fam, variant, head)
    for attn_type in ("multihead_attention", "multiquery_attention"):
        c = MptConfig(**_MPT, no_bias=False, expansion_ratio=3, attn_config={"attn_type": attn_type, "qk_ln": True})
        for head in get_family("mpt").heads:
            yield f"mpt/{attn_type}/{head}", mpt_spec(c, head)


def test_every_layout_gives_distinct_keys_and_round_trips():
    from nezha_zoo.spec import LAYOUTS, get_layout

    rng = np.random.default_rng(0)
    for layout_name in sorted(LAYOUTS):
        layout = get_layout(layout_name)
        for where, spec in _all_specs():
            keys = [layout.key(p) for p in spec]
            assert len(set(keys)) == len(keys), (layout_name, where)
            for p in spec:
                x = rng.standard_normal(p.shape).astype(np.float32)
                stored = layout.to_stored(p, x)
                assert stored.shape == layout.shape(p)
                assert layout.from_stored(p, stored).tobytes() == x.tobytes(), (layout_name, where, p.name)


#: Logical axes whose size is one config quantity throughout a spec.
_UNIFORM_AXES = ("vocab", "position", "token_type", "embed", "hidden", "mlp", "buckets", "heads", "qkv")


def test_logical_axes_have_one_size_per_spec():
    for where, spec in _all_specs():
        sizes: dict[str, set[int]] = {}
        for p in spec:
            for axis, n in zip(p.axes, p.shape):
                sizes.setdefault(axis, set()).add(n)
        for axis in _UNIFORM_AXES:
            assert len(sizes.get(axis, {0})) == 1, (where, axis, sizes[axis])
        if "multiquery" not in where:  # multi-query keys are one head wide; queries are all heads
            assert len(sizes.get("kv", {0})) == 1, (where, sizes["kv"])
        assert sizes.get("scalar", {1}) == {1}, where
