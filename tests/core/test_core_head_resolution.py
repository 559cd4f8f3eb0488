"""The tensors decide which head a checkpoint is (issue 24): ``resolve_head`` and the tools.

Checkpoints are built in each shape they are published in -- a head named in ``config.json`` but the
base stored (with or without its pooler), the base named but a head stored, extra legacy buffers
such as ``position_ids`` -- for every family, from tiny configs and random tensors written with the
project's own safetensors writer.  ``inspect``, ``convert`` and ``verify`` must use the head the
tensors are and say so in one line, and name the closest head and its ``--head`` when none fits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from nezha_zoo.cli.main import main
from nezha_zoo.config import CONFIG_NAME
from nezha_zoo.conversion import verify as verify_mod
from nezha_zoo.conversion.convert import ConversionError, convert
from nezha_zoo.conversion.inspect import inspect_checkpoint
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.head_resolution import resolve_head, without_pooler
from nezha_zoo.io.writer import save_state_dict
from nezha_zoo.pretrained import random_weights
from nezha_zoo.spec import get_family
from tests.core.test_core_convert_formats import CONFIGS  # tiny configs of every family

FAMILIES = list(CONFIGS)
#: Families whose base model declares a pooler (the others have none: Electra, MPT).
POOLED = [f for f in FAMILIES if any(p.name.startswith("pooler.") for p in get_family(f).model_spec(CONFIGS[f]()))]
#: Heads whose tensors are exactly another head's, which comes first in the family's order:
#: Electra's causal LM is the generator head of its masked LM, XLM-RoBERTa-XL's causal and masked LM
#: share one ``lm_head``, and MPT's causal LM ties its only weight to the embeddings.
SAME_TENSORS = {
    ("electra", "ForCausalLM"): "ForMaskedLM",
    ("xlm-roberta-xl", "ForMaskedLM"): "ForCausalLM",
    ("mpt", "ForCausalLM"): "Model",
}


def _also(fam: str, head: str) -> str:
    """The note's mention of the other heads with the very same tensors."""
    family = get_family(fam)
    same = [family.class_name(h) for (f, h), w in SAME_TENSORS.items() if f == fam and w == head]
    return f" (as are {', '.join(same)}'s: --head chooses)" if same else ""


def _expected_note(fam: str, claimed: str | None, tensors: str, using: str) -> str:
    family = get_family(fam)
    said = f"names {family.class_name(claimed)}" if claimed else f"names no {family.class_prefix} class"
    return f"config.json {said}; the tensors are {tensors}: using {using}"


HEAD_CASES = [(f, h) for f in FAMILIES for h in get_family(f).heads if h != "Model"]


def _legacy_key(spec) -> str | None:
    """A concrete legacy buffer name the spec ignores (``embeddings.position_ids``), if it has one."""
    names = [pat for pat in spec.ignored if pat.endswith("embeddings.position_ids")]
    return names[0] if names else None


def _published(directory, fam: str, spec, claimed: str | None, legacy: bool = False):
    """:func:`_publish`, then the head :func:`resolve_head` decides for it; returns the resolution."""
    config, tensors = _publish(directory, fam, spec, claimed, legacy)
    return resolve_head(get_family(fam), config, tensors, lambda k: tensors[k].shape)


def _publish(directory, fam: str, spec, claimed: str | None, legacy: bool = False):
    """Write ``spec``'s random tensors with a ``config.json`` whose ``architectures`` names ``claimed``.

    Returns the config as written and the tensors (canonical names).
    """
    config = CONFIGS[fam]()
    family = get_family(fam)
    tensors = dict(random_weights(spec, config, seed=0))
    if legacy:
        key = _legacy_key(spec)
        tensors[key] = np.arange(config.max_position_embeddings, dtype=np.int64)[None]
    cfg = config.copy()
    cfg.architectures = [family.class_name(claimed)] if claimed else None
    save_state_dict(directory, tensors, extra_files={CONFIG_NAME: cfg.to_json_string()})
    return cfg, tensors


# --- the decision, every family and head ---------------------------------------------------------


@pytest.mark.parametrize(("fam", "head"), HEAD_CASES, ids=[f"{f}-{h}" for f, h in HEAD_CASES])
def test_base_named_but_a_head_stored(tmp_path, fam, head):
    family = get_family(fam)
    spec = family.model_spec(CONFIGS[fam](), head)
    found = _published(tmp_path, fam, spec, "Model")
    want = SAME_TENSORS.get((fam, head), head)
    assert (found.head, found.exact, found.claimed) == (want, True, "Model")
    assert sorted(found.plan.sources.values()) == sorted(spec.names)  # every stored tensor is used
    if want == "Model":
        assert found.note is None  # the claim fits the tensors: nothing to say
    else:
        name = family.class_name(want)
        assert found.note == _expected_note(fam, "Model", name + _also(fam, want), name)


@pytest.mark.parametrize("fam", FAMILIES)
def test_head_named_but_the_base_stored_with_its_legacy_buffers(tmp_path, fam):
    family = get_family(fam)
    base = family.model_spec(CONFIGS[fam](), "Model")
    legacy = _legacy_key(base) is not None  # MPT has no position ids (ALiBi), so no legacy buffer
    found = _published(tmp_path, fam, base, "ForSequenceClassification", legacy=legacy)
    pooler = True if fam in POOLED else None
    assert (found.head, found.exact, found.pooler, found.spec) == ("Model", True, pooler, base)
    assert found.plan.ignored_keys == ([_legacy_key(base)] if legacy else [])
    what = family.class_name("Model") + (" (with pooler)" if pooler else "") + _also(fam, "Model")
    assert found.note == _expected_note(fam, "ForSequenceClassification", what, family.class_name("Model"))


@pytest.mark.parametrize("fam", POOLED)
def test_base_stored_without_its_pooler(tmp_path, fam):
    family = get_family(fam)
    bare = without_pooler(family.model_spec(CONFIGS[fam](), "Model"))
    for claimed in ("Model", "ForMaskedLM", None):
        found = _published(tmp_path / str(claimed), fam, bare, claimed, legacy=True)
        assert (found.head, found.exact, found.pooler, found.spec) == ("Model", True, False, bare)
        name = family.class_name("Model")
        assert found.note == _expected_note(fam, claimed, f"{name} (without pooler)", f"{name} without pooler")


def test_published_sentence_embedding_shape_through_the_cli(tmp_path, capsys):
    """The shape of issue 24: architectures says MPNetForMaskedLM, the file is MPNetModel + pooler."""
    family = get_family("mpnet")
    config = CONFIGS["mpnet"]()
    base = family.model_spec(config, "Model")
    _publish(tmp_path / "st", "mpnet", base, "ForMaskedLM", legacy=True)
    note = "nezha-zoo: config.json names MPNetForMaskedLM; the tensors are MPNetModel (with pooler): using MPNetModel\n"

    assert main(["inspect", str(tmp_path / "st")]) == 0
    out, err = capsys.readouterr()
    assert err == note
    assert "config      MPNetForMaskedLM\n" in out and "tensors are MPNetModel (with pooler)\n" in out
    assert "missing     none\nunexpected  none\n" in out

    assert main(["convert", str(tmp_path / "st"), str(tmp_path / "fx"), "--to", "hf-flax", "--quiet"]) == 0
    assert capsys.readouterr().err == note
    assert json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())["architectures"] == ["MPNetModel"]
    assert main(["inspect", str(tmp_path / "fx"), "--json"]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert (err, info["claimed_class"], info["tensors_class"], info["head_note"]) == (
        "",
        "MPNetModel",
        "MPNetModel (with pooler)",
        None,
    )

    # --head still overrides, and then the mismatch is an error naming what is missing
    args = ["convert", str(tmp_path / "st"), str(tmp_path / "mlm"), "--to", "hf-flax", "--head", "ForMaskedLM"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the tensors do not match MPNetForMaskedLM (--head ForMaskedLM): missing ['lm_head.dense.weight'" in err
    assert "unexpected ['pooler.dense.bias', 'pooler.dense.weight']" in err
    assert not (tmp_path / "mlm").exists()
    # a class name is accepted for --head, and an unknown one is refused by name
    assert main(["inspect", str(tmp_path / "st"), "--head", "MPNetModel"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "st"), "--head", "ForCausalLM"]) == 2
    assert "MPNet has no head 'ForCausalLM'" in capsys.readouterr().err


@pytest.mark.parametrize("fam", FAMILIES)
def test_convert_uses_the_head_the_tensors_are(tmp_path, fam):
    family = get_family(fam)
    config = CONFIGS[fam]()
    head = "ForTokenClassification"
    spec = family.model_spec(config, head)
    _, tensors = _publish(tmp_path / "src", fam, spec, "Model")
    info = convert(tmp_path / "src", tmp_path / "fx", "hf-flax")
    assert (info["head"], info["tensors"]) == (head, len(spec))
    assert info["head_note"].endswith(f"the tensors are {family.class_name(head)}: using {family.class_name(head)}")
    back = convert(tmp_path / "fx", tmp_path / "back", "safetensors")
    assert (back["head"], back["head_note"]) == (head, None)
    seen = inspect_checkpoint(tmp_path / "back")
    assert (seen["claimed_class"], seen["tensors_class"], seen["missing_keys"]) == (family.class_name(head),) * 2 + (
        [],
    )


@pytest.mark.parametrize("fam", POOLED)
def test_convert_keeps_a_base_without_pooler_as_it_is(tmp_path, fam):
    family = get_family(fam)
    config = CONFIGS[fam]()
    bare = without_pooler(family.model_spec(config, "Model"))
    _, tensors = _publish(tmp_path / "src", fam, bare, "ForMaskedLM")
    info = convert(tmp_path / "src", tmp_path / "tf", "hf-tf")
    assert (info["head"], info["tensors"], info["parameters"]) == ("Model", len(bare), bare.num_parameters())
    assert "(without pooler): using" in info["head_note"]
    back = convert(tmp_path / "tf", tmp_path / "back", "safetensors")
    assert back["tensors"] == len(bare)
    assert (tmp_path / "back" / "model.safetensors").read_bytes().count(b"pooler") == 0
    # --head Model is the same decision; the keras writer needs the TF class with its pooler: refused
    assert convert(tmp_path / "src", tmp_path / "fx", "hf-flax", head="Model")["tensors"] == len(bare)
    with pytest.raises(ConversionError, match="keras writer loads TF.*Model with its pooler"):
        convert(tmp_path / "src", tmp_path / "keras", "keras")
    assert not (tmp_path / "keras").exists()


# --- nothing fits: the closest head and the --head to pass ---------------------------------------


@pytest.mark.parametrize("fam", FAMILIES)
def test_nothing_fits_names_the_closest_head(tmp_path, fam, capsys):
    family = get_family(fam)
    config = CONFIGS[fam]()
    spec = family.model_spec(config, "ForQuestionAnswering")
    tensors = dict(random_weights(spec, config, seed=0))
    dropped = spec.names[0]
    del tensors[dropped]
    tensors["qa_outputs.extra"] = np.zeros(2, np.float32)
    cfg = config.copy()
    cfg.architectures = [family.class_name("Model")]
    save_state_dict(tmp_path / "src", tensors, extra_files={CONFIG_NAME: cfg.to_json_string()})
    closest = family.class_name("ForQuestionAnswering")
    want = (
        f"config.json names {family.class_name('Model')}; the tensors match no {family.class_prefix} head exactly; "
        f"the closest is {closest} (--head ForQuestionAnswering): "
        f"missing ['{dropped}']; unexpected ['qa_outputs.extra']"
    )
    with pytest.raises(ConversionError) as e:
        convert(tmp_path / "src", tmp_path / "out", "hf-flax")
    assert str(e.value).endswith(want)
    assert not (tmp_path / "out").exists()

    assert main(["inspect", str(tmp_path / "src")]) == 1
    out, err = capsys.readouterr()
    assert err == f"nezha-zoo: {want}\n"
    assert "tensors are no head exactly\n" in out and f"class       {closest}\n" in out

    with pytest.raises(CheckpointError, match="the closest is .*--head ForQuestionAnswering"):
        verify_mod.verify(tmp_path / "src", backends=["pt", "flax"])


def test_a_shape_that_fits_no_head_is_the_claimed_heads_error(tmp_path):
    family = get_family("electra")
    config = CONFIGS["electra"]()
    _publish(tmp_path / "src", "electra", family.model_spec(config, "ForMaskedLM"), "ForMaskedLM")
    cfg = json.loads((tmp_path / "src" / CONFIG_NAME).read_text())
    cfg["intermediate_size"] = 32
    (tmp_path / "src" / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(
        ConversionError, match=r"src \(safetensors\).*intermediate.dense.weight.*\(24, 16\).*ForMaskedLM"
    ):
        convert(tmp_path / "src", tmp_path / "out", "hf-flax")


# --- verify decides the same way ------------------------------------------------------------------


def test_verify_loads_the_head_the_tensors_are(tmp_path, monkeypatch, capsys):
    """The decision verify hands its workers (tests/equivalence/test_verify_head_resolution.py runs them)."""
    calls = []

    def fake_worker(backend, directory, head, inputs, out, pooler=True):
        calls.append((backend, head, pooler))
        return {"status": "error", "detail": "not run"}

    monkeypatch.setattr(verify_mod, "_run_worker", fake_worker)
    for fam in FAMILIES:
        family = get_family(fam)
        config = CONFIGS[fam]()
        _publish(tmp_path / fam, fam, family.model_spec(config, "ForSequenceClassification"), "Model")
        info = verify_mod.verify(tmp_path / fam, backends=["pt", "flax"])
        assert (info["head"], info["head_note"] is not None) == ("ForSequenceClassification", True)
    bare = without_pooler(get_family("mpnet").model_spec(CONFIGS["mpnet"](), "Model"))
    _publish(tmp_path / "bare", "mpnet", bare, "ForMaskedLM", legacy=True)
    calls.clear()
    assert main(["verify", str(tmp_path / "bare"), "--backends", "pt,tf"]) == 1  # the fake workers ran nothing
    assert calls == [("pt", "Model", False), ("tf", "Model", False)]
    err = capsys.readouterr().err
    assert err == (
        "nezha-zoo: config.json names MPNetForMaskedLM; the tensors are MPNetModel (without pooler): "
        "using MPNetModel without pooler\n"
    )
