"""Loading plans (checkpoint keys -> spec) and the backend-independent from/save_pretrained halves."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from nezha_zoo import ElectraConfig, MPNetConfig
from nezha_zoo.families.electra import electra_spec
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.plan import plan_load, read_planned
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.io.writer import save_state_dict
from nezha_zoo.pretrained import load_weights, resolve_config, save_weights
from nezha_zoo.spec import get_family, get_layout

CFG = ElectraConfig(
    vocab_size=30,
    embedding_size=8,
    hidden_size=12,
    num_hidden_layers=1,
    num_attention_heads=3,
    intermediate_size=10,
    max_position_embeddings=16,
    num_labels=2,
)  # QA needs 2
FAM = get_family("electra")


def _ckpt(spec, prefix_for_base: bool = False, extra: dict | None = None):
    """name -> shape of a checkpoint holding exactly ``spec``'s params (optionally base names prefixed)."""
    shapes = {}
    for p in spec:
        name = f"electra.{p.name}" if prefix_for_base else p.name
        shapes[name] = p.shape
    shapes.update(extra or {})
    return shapes


def _plan(spec, shapes):
    return plan_load(spec, list(shapes), lambda k: shapes[k], "electra")


def test_exact_head_checkpoint_loads_everything():
    spec = electra_spec(CFG, "ForMaskedLM")
    shapes = _ckpt(spec, extra={"generator_lm_head.weight": (30, 8), "electra.embeddings.position_ids": (1, 16)})
    plan = _plan(spec, shapes)
    assert plan.sources == {p.name: p.name for p in spec}
    assert plan.missing_keys == [] and plan.unexpected_keys == []
    # The tied alias is consumed, and the legacy buffer is ignored silently.
    assert sorted(plan.ignored_keys) == ["electra.embeddings.position_ids", "generator_lm_head.weight"]


def test_base_checkpoint_into_head_class():
    base = electra_spec(CFG, "Model")
    head = electra_spec(CFG, "ForSequenceClassification")
    shapes = _ckpt(base, extra={"embeddings.position_ids": (1, 16)})
    plan = _plan(head, shapes)
    for p in base:
        assert plan.sources[f"electra.{p.name}"] == p.name
    assert plan.missing_keys == [
        "classifier.dense.weight",
        "classifier.dense.bias",
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
    ]
    assert plan.unexpected_keys == [] and plan.ignored_keys == ["embeddings.position_ids"]


def test_head_checkpoint_into_base_class():
    base = electra_spec(CFG, "Model")
    head = electra_spec(CFG, "ForPreTraining")
    shapes = _ckpt(head, extra={"electra.embeddings.position_ids": (1, 16)})
    plan = _plan(base, shapes)
    for p in base:
        assert plan.sources[p.name] == f"electra.{p.name}"
    assert plan.missing_keys == []
    assert sorted(plan.unexpected_keys) == sorted(p.name for p in head if not p.name.startswith("electra."))
    assert plan.ignored_keys == ["electra.embeddings.position_ids"]


def test_head_checkpoint_into_other_head_lists_keys_by_name():
    mlm = electra_spec(CFG, "ForMaskedLM")
    qa = electra_spec(CFG, "ForQuestionAnswering")
    shapes = _ckpt(mlm, extra={"generator_lm_head.weight": (30, 8), "some.random.key": (2,)})
    plan = _plan(qa, shapes)
    assert plan.missing_keys == ["qa_outputs.weight", "qa_outputs.bias"]
    assert sorted(plan.unexpected_keys) == sorted(
        [p.name for p in mlm if not p.name.startswith("electra.")] + ["generator_lm_head.weight", "some.random.key"]
    )
    assert plan.info() == {
        "missing_keys": plan.missing_keys,
        "unexpected_keys": plan.unexpected_keys,
        "mismatched_keys": [],
    }


def test_tied_alias_alone_fills_its_target():
    spec = electra_spec(CFG, "ForMaskedLM")
    shapes = _ckpt(spec, extra={"generator_lm_head.weight": (30, 8)})
    del shapes["electra.embeddings.word_embeddings.weight"]
    plan = _plan(spec, shapes)
    assert plan.sources["electra.embeddings.word_embeddings.weight"] == "generator_lm_head.weight"
    assert plan.missing_keys == [] and plan.unexpected_keys == []


def test_shape_mismatch_names_tensor_and_both_shapes():
    spec = electra_spec(CFG, "ForTokenClassification")
    shapes = _ckpt(spec)
    shapes["classifier.weight"] = (5, 12)
    with pytest.raises(CheckpointError) as info:
        _plan(spec, shapes)
    msg = str(info.value)
    assert "classifier.weight" in msg and "(5, 12)" in msg and "(2, 12)" in msg
    # Also through the base prefix, naming the checkpoint's key.
    base = electra_spec(CFG, "Model")
    shapes = _ckpt(base)
    shapes["encoder.layer.0.intermediate.dense.weight"] = (11, 12)
    pattern = r"encoder\.layer\.0\.intermediate\.dense\.weight.*\(11, 12\).*\(10, 12\)"
    with pytest.raises(CheckpointError, match=pattern):
        _plan(electra_spec(CFG, "ForMaskedLM"), shapes)
    shapes = _ckpt(electra_spec(CFG, "ForMaskedLM"), extra={"generator_lm_head.weight": (31, 8)})
    with pytest.raises(CheckpointError, match=r"generator_lm_head\.weight.*\(31, 8\).*\(30, 8\)"):
        _plan(electra_spec(CFG, "ForMaskedLM"), shapes)


def test_ignore_mismatched_sizes_plans_fresh_params_and_reports_both_shapes(caplog):
    spec = electra_spec(CFG, "ForTokenClassification")
    shapes = _ckpt(spec)
    shapes["classifier.weight"], shapes["classifier.bias"] = (5, 12), (5,)
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True"):
        _plan(spec, shapes)
    plan = plan_load(spec, list(shapes), lambda k: shapes[k], "electra", ignore_mismatched_sizes=True)
    assert plan.mismatched_keys == [("classifier.weight", (5, 12), (2, 12)), ("classifier.bias", (5,), (2,))]
    assert plan.fresh_keys == ["classifier.weight", "classifier.bias"]
    assert "classifier.weight" not in plan.sources and plan.missing_keys == [] and plan.unexpected_keys == []
    assert plan.info()["mismatched_keys"] == plan.mismatched_keys
    with caplog.at_level(logging.WARNING, logger="nezha_zoo"):
        plan.report("ElectraForTokenClassification", strict=True)  # mismatches are reported, not raised
    assert "classifier.weight (checkpoint (5, 12), model (2, 12))" in caplog.text
    # A mismatched tied alias whose target is absent leaves the target to be initialised.
    mlm = electra_spec(CFG, "ForMaskedLM")
    shapes = _ckpt(mlm, extra={"generator_lm_head.weight": (31, 8)})
    del shapes["electra.embeddings.word_embeddings.weight"]
    plan = plan_load(mlm, list(shapes), lambda k: shapes[k], "electra", ignore_mismatched_sizes=True)
    assert plan.mismatched_keys == [("generator_lm_head.weight", (31, 8), (30, 8))]
    assert plan.fresh_keys == ["electra.embeddings.word_embeddings.weight"] and plan.unexpected_keys == []


def test_overrides_must_be_config_fields(tmp_path):
    CFG.save_pretrained(tmp_path)
    assert resolve_config(FAM, tmp_path, num_labels=3, max_length=7).num_labels == 3  # transformers' common key
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'num_label'.*did you mean 'num_labels'"):
        resolve_config(FAM, tmp_path, num_label=3)
    with pytest.raises(TypeError, match=r"ElectraForMaskedLM.from_pretrained does not take 'device_map'"):
        resolve_config(FAM, tmp_path, None, "ElectraForMaskedLM.from_pretrained", device_map="auto")
    with pytest.raises(TypeError, match="'hiden_size'.*'hidden_size'"):
        resolve_config(FAM, tmp_path, CFG, hiden_size=4)  # also with a config object
    with pytest.raises(TypeError, match=r"ElectraConfig.from_pretrained .*'vocab_sise'.*'vocab_size'"):
        ElectraConfig.from_pretrained(tmp_path, vocab_sise=3)
    from nezha_zoo import AutoConfig

    with pytest.raises(TypeError, match="AutoConfig.from_pretrained .*'typo'"):
        AutoConfig.from_pretrained(tmp_path, typo=1)
    assert "typo" not in (tmp_path / "config.json").read_text()


def test_report_logs_and_strict_raises(caplog):
    spec = electra_spec(CFG, "ForQuestionAnswering")
    plan = _plan(spec, _ckpt(electra_spec(CFG, "Model"), extra={"junk": (1,)}))
    with caplog.at_level(logging.WARNING, logger="nezha_zoo"):
        plan.report("ElectraForQuestionAnswering")
    text = caplog.text
    assert "qa_outputs.weight" in text and "qa_outputs.bias" in text and "junk" in text
    with pytest.raises(CheckpointError, match="qa_outputs.weight"):
        plan.report("ElectraForQuestionAnswering", strict=True)


# --- reading planned tensors and the modeling halves ----------------------------------------------


def _random_state(spec, seed=0):
    rng = np.random.default_rng(seed)
    return {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in spec}


@pytest.mark.parametrize("layout_name", ["pt", "keras", "flax"])
def test_save_weights_then_load_weights_round_trip(tmp_path, layout_name):
    spec = FAM.model_spec(CFG, "ForMaskedLM")
    state = _random_state(spec)
    written = save_weights(tmp_path, CFG, spec, FAM, state)
    assert "config.json" in written and "model.safetensors" in written
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["ElectraForMaskedLM"] and cfg["model_type"] == "electra"
    assert CFG.architectures is None  # the caller's config is not modified
    with open_checkpoint(tmp_path) as r:
        assert r.metadata["format"] == "pt" and r.metadata["head"] == "ForMaskedLM"
        assert "generator_lm_head.weight" not in r  # tied weights are stored once
    layout = get_layout(layout_name)
    got = {}
    plan = load_weights(tmp_path, spec, FAM, layout, got.__setitem__, "ElectraForMaskedLM", strict=True)
    assert plan.missing_keys == [] and plan.unexpected_keys == []
    assert sorted(got) == sorted(state)
    for name, stored in got.items():
        p = spec[name]
        assert stored.shape == layout.shape(p)
        assert layout.from_stored(p, stored).tobytes() == state[name].tobytes()
    # The same directory resolves its own config.
    assert resolve_config(FAM, tmp_path) == CFG.copy(architectures=["ElectraForMaskedLM"])


def test_base_checkpoint_into_head_through_load_weights(tmp_path, caplog):
    base = FAM.model_spec(CFG, "Model")
    state = _random_state(base, seed=3)
    save_weights(tmp_path, CFG, base, FAM, state)
    head = FAM.model_spec(CFG, "ForPreTraining")
    got = {}
    with caplog.at_level(logging.WARNING, logger="nezha_zoo"):
        plan = load_weights(tmp_path, head, FAM, get_layout("pt"), got.__setitem__, "ElectraForPreTraining")
    assert plan.missing_keys == [p.name for p in head if not p.name.startswith("electra.")]
    assert "discriminator_predictions.dense.weight" in caplog.text
    for name, arr in state.items():
        np.testing.assert_array_equal(got[f"electra.{name}"], arr)


def test_save_weights_rejects_incomplete_or_wrong_exports(tmp_path):
    spec = FAM.model_spec(CFG, "ForTokenClassification")
    state = _random_state(spec)
    missing = dict(state)
    missing.pop("classifier.bias")
    with pytest.raises(ValueError, match="classifier.bias"):
        save_weights(tmp_path, CFG, spec, FAM, missing)
    with pytest.raises(ValueError, match="not a parameter"):
        save_weights(tmp_path, CFG, spec, FAM, {**state, "extra.weight": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match=r"classifier.weight.*\(4, 12\)"):
        save_weights(tmp_path, CFG, spec, FAM, {**state, "classifier.weight": np.zeros((4, 12), np.float32)})
    pairs = list(state.items())
    with pytest.raises(ValueError, match="twice"):
        save_weights(tmp_path, CFG, spec, FAM, pairs + pairs[:1])
    assert not list(tmp_path.iterdir())


def test_read_planned_refuses_integer_weights_and_casts_half(tmp_path):
    spec = FAM.model_spec(CFG, "ForQuestionAnswering")
    state = _random_state(spec)
    state["qa_outputs.bias"] = state["qa_outputs.bias"].astype(np.float16)
    save_state_dict(tmp_path, state)
    with open_checkpoint(tmp_path) as r:
        plan = plan_load(spec, r.keys(), r.shape, "electra")
        got = dict(read_planned(r, spec, plan, get_layout("pt")))
    assert got["qa_outputs.bias"].dtype == np.float32
    state["qa_outputs.bias"] = np.arange(3, dtype=np.int64)
    save_state_dict(tmp_path, state)
    with open_checkpoint(tmp_path) as r, pytest.raises(CheckpointError, match="qa_outputs.bias"):
        plan = plan_load(spec, r.keys(), r.shape, "electra")
        list(read_planned(r, spec, plan, get_layout("pt")))


def test_resolve_config_refuses_other_family_and_missing_config(tmp_path):
    MPNetConfig(
        vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'mpnet'"):
        resolve_config(FAM, tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_config(FAM, tmp_path / "empty")
    with pytest.raises(TypeError, match="ElectraConfig"):
        resolve_config(FAM, tmp_path, config=MPNetConfig())
    assert resolve_config(FAM, tmp_path, config=CFG) is CFG
    assert resolve_config(FAM, tmp_path, config=CFG, num_labels=5).num_labels == 5


def test_resized_vocab_keeps_rows_pads_and_validates():
    from nezha_zoo.pretrained import random_weights, resized_vocab

    spec = FAM.model_spec(CFG, "ForMaskedLM")
    state = random_weights(spec, CFG, seed=3)
    cfg, new_spec, arrays = resized_vocab(CFG, FAM, "ForMaskedLM", 33, state.__getitem__, pad_to_multiple_of=8)
    assert cfg.vocab_size == 40 and CFG.vocab_size == 30  # the caller's config is not modified
    assert sorted(arrays) == ["electra.embeddings.word_embeddings.weight", "generator_lm_head.bias"]
    emb = arrays["electra.embeddings.word_embeddings.weight"]
    assert emb.shape == new_spec["electra.embeddings.word_embeddings.weight"].shape == (40, 8)
    np.testing.assert_array_equal(emb[:30], state["electra.embeddings.word_embeddings.weight"])
    assert emb[30:].std() > 0 and not arrays["generator_lm_head.bias"][30:].any()  # the spec's init rules
    again = resized_vocab(CFG, FAM, "ForMaskedLM", 33, state.__getitem__, pad_to_multiple_of=8)[2]
    assert all(np.array_equal(again[k], v) for k, v in arrays.items())  # seeded: the same rows in every backend
    _, _, small = resized_vocab(CFG, FAM, "ForMaskedLM", 10, state.__getitem__)
    np.testing.assert_array_equal(small["generator_lm_head.bias"], state["generator_lm_head.bias"][:10])
    with pytest.raises(ValueError, match="new_num_tokens must be a positive integer"):
        resized_vocab(CFG, FAM, "ForMaskedLM", 0, state.__getitem__)
    with pytest.raises(ValueError, match="pad_token_id"):
        resized_vocab(CFG.copy(pad_token_id=20), FAM, "ForMaskedLM", 10, state.__getitem__)
