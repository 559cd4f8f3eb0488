"""Auto classes in all three backends (issue 24): every family, every head it has, every framework.

Checkpoints are written once per module, framework-free (spec-drawn random tensors and the project's
own safetensors writer): one per family and head, and each shape published checkpoints come in --
a head named but the base stored (with its legacy ``position_ids`` buffer), a head named but the base
stored without its pooler, the base named but a head stored.  Each loads through ``AutoModel`` /
``AutoModelFor<head>`` (``TF...``, ``Flax...``) into the registry's class, with exactly the tensors
the class and the checkpoint share; MPNet's outputs are identical across the three backends.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")

import jax.numpy as jnp

import nezha_zoo.flax as nz_flax
import nezha_zoo.pt as nz_pt
import nezha_zoo.tf as nz_tf
from nezha_zoo.auto import AUTO_MODEL_HEADS
from nezha_zoo.config import CONFIG_NAME
from nezha_zoo.io.head_resolution import without_pooler
from nezha_zoo.io.writer import save_state_dict
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec import get_family, model_class
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs, to_numpy
from tests.core.test_core_convert_formats import CONFIGS  # tiny configs of every family

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax]

FRAMEWORKS = ("pt", "tf", "flax")
for _fw in FRAMEWORKS:
    pin_precision(_fw)

#: framework -> head -> the backend's Auto class, by the public name transformers spells it.
AUTO = {
    fw: {head: vars(module)[f"{prefix}{name}"] for name, head in AUTO_MODEL_HEADS.items()}
    for fw, module, prefix in (("pt", nz_pt, ""), ("tf", nz_tf, "TF"), ("flax", nz_flax, "Flax"))
}
FAMILIES = list(CONFIGS)
CASES = [(fw, fam) for fw in FRAMEWORKS for fam in FAMILIES]
IDS = [f"{fw}-{fam}" for fw, fam in CASES]


def _names(fam: str, head: str) -> set[str]:
    """The head's tensor names, its base model's without their prefix (as a base model names them)."""
    family = get_family(fam)
    prefix = family.base_prefix + "."
    return {n.removeprefix(prefix) for n in family.model_spec(CONFIGS[fam](), head).names}


def _pooler(fam: str) -> set[str]:
    return {n for n in _names(fam, "Model") if n.startswith("pooler.")}


def _publish(directory, fam: str, stored_head: str, claimed: str, pooler: bool = True, legacy: bool = False) -> str:
    """A checkpoint whose ``architectures`` names ``claimed`` while its tensors are ``stored_head``."""
    config = CONFIGS[fam]()
    family = get_family(fam)
    spec = family.model_spec(config, stored_head)
    tensors = random_weights(spec if pooler else without_pooler(spec), config, seed=1)
    legacy_keys = [k for k in spec.ignored if k.endswith("embeddings.position_ids")]
    if legacy and legacy_keys:  # MPT has no position ids (ALiBi), so no legacy buffer
        tensors[legacy_keys[0]] = np.arange(config.max_position_embeddings, dtype=np.int64)[None]
    cfg = config.copy(architectures=[family.class_name(claimed)])
    save_state_dict(directory, tensors, extra_files={CONFIG_NAME: cfg.to_json_string()})
    return str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``(family, head)`` -> a checkpoint saved as that head; ``(family, shape)`` -> a published shape."""
    root = tmp_path_factory.mktemp("auto")
    made = {}
    for fam in FAMILIES:
        config = CONFIGS[fam]()
        family = get_family(fam)
        for head in family.heads:
            spec = family.model_spec(config, head)
            save_weights(root / fam / head, config, spec, family, random_weights(spec, config, seed=0))
            made[fam, head] = str(root / fam / head)
        made[fam, "head-named-base-stored"] = _publish(
            root / fam / "p1", fam, "Model", "ForSequenceClassification", legacy=True
        )
        made[fam, "head-named-bare-base-stored"] = _publish(
            root / fam / "p2", fam, "Model", "ForMaskedLM" if "ForMaskedLM" in family.heads else "ForCausalLM", False
        )
        made[fam, "base-named-head-stored"] = _publish(root / fam / "p3", fam, "ForTokenClassification", "Model")
    return made


def _load(fw: str, head: str, path: str, **kwargs):
    model, info = AUTO[fw][head].from_pretrained(path, output_loading_info=True, **kwargs)
    return model, {k: set(v) for k, v in info.items()}


def test_the_auto_classes_are_exported_as_transformers_spells_them():
    for fw, module in (("pt", nz_pt), ("tf", nz_tf), ("flax", nz_flax)):
        for head, cls in AUTO[fw].items():
            assert (cls.framework, cls.head) == (fw, head)
            assert cls.__name__ in module.__all__


@pytest.mark.parametrize(("fw", "fam"), CASES, ids=IDS)
def test_every_head_loads_through_its_auto_class(fw, fam, checkpoints):
    family = get_family(fam)
    for head in family.heads:
        model, info = _load(fw, head, checkpoints[fam, head])
        assert type(model) is model_class(fam, head, fw), head
        assert info["missing_keys"] == info["unexpected_keys"] == set(), head
    # AutoModel on a head checkpoint: the base model, its tensors taken from the head's
    last = family.heads[-1]
    model, info = _load(fw, "Model", checkpoints[fam, last])
    assert type(model) is model_class(fam, "Model", fw)
    assert info["missing_keys"] == _names(fam, "Model") - _names(fam, last)  # a pooler the head lacks
    assert info["unexpected_keys"] == _names(fam, last) - _names(fam, "Model")  # the head's own tensors
    assert type(AUTO[fw][last].from_config(CONFIGS[fam]())) is model_class(fam, last, fw)
    absent = [h for h in AUTO_MODEL_HEADS.values() if h not in family.heads]
    for head in absent:
        with pytest.raises(ValueError, match=rf"the {family.class_prefix} family .* has no {head} head; its heads"):
            AUTO[fw][head].from_pretrained(checkpoints[fam, "Model"])


@pytest.mark.parametrize(("fw", "fam"), CASES, ids=IDS)
def test_published_shapes_load_as_transformers_auto_classes_do(fw, fam, checkpoints, caplog):
    family = get_family(fam)
    base, pooler = _names(fam, "Model"), _pooler(fam)
    path = checkpoints[fam, "head-named-base-stored"]
    model, info = _load(fw, "Model", path, strict=True)  # the legacy position_ids are ignored, as loading does
    assert type(model) is model_class(fam, "Model", fw)
    with caplog.at_level(logging.WARNING, logger="nezha_zoo.auto"):
        model, info = _load(fw, "ForSequenceClassification", path)
    assert type(model) is model_class(fam, "ForSequenceClassification", fw)
    assert info["missing_keys"] == _names(fam, "ForSequenceClassification") - base  # a fresh classifier
    said = f"config.json names {family.class_name('ForSequenceClassification')}"
    found = family.class_name("Model") + (" (with pooler)" if pooler else "")
    auto = AUTO[fw]["ForSequenceClassification"].__name__
    built = model_class(fam, "ForSequenceClassification", fw).__name__
    assert f"{path}: {said}; the tensors are {found}: {auto} builds {built}" in caplog.messages

    model, info = _load(fw, "Model", checkpoints[fam, "head-named-bare-base-stored"])
    assert type(model) is model_class(fam, "Model", fw)
    assert (info["missing_keys"], info["unexpected_keys"]) == (pooler, set())

    path = checkpoints[fam, "base-named-head-stored"]
    model, info = _load(fw, "Model", path)
    assert type(model) is model_class(fam, "Model", fw)
    assert info["unexpected_keys"] == _names(fam, "ForTokenClassification") - base  # the classifier
    model, info = _load(fw, "ForTokenClassification", path, strict=True)
    assert type(model) is model_class(fam, "ForTokenClassification", fw)


def _forward(fw: str, model, inputs: dict) -> dict:
    if fw == "pt":
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    elif fw == "tf":
        out = model(**{k: tf.constant(v) for k, v in inputs.items()}, training=False)
    else:
        out = model(**{k: jnp.asarray(v) for k, v in inputs.items()})
    return {k: to_numpy(v) for k, v in out.items()}


def test_a_published_mpnet_checkpoint_gives_identical_outputs_in_every_backend(checkpoints):
    path = checkpoints["mpnet", "head-named-base-stored"]  # MPNetForSequenceClassification named, base stored
    config = CONFIGS["mpnet"]()
    inputs = tiny_inputs(vocab_size=config.vocab_size, type_vocab_size=None, pad=config.pad_token_id, seed=3)
    outs = {fw: _forward(fw, AUTO[fw]["Model"].from_pretrained(path), inputs) for fw in FRAMEWORKS}
    assert set(outs["pt"]) >= {"last_hidden_state", "pooler_output"}
    for fw in ("tf", "flax"):
        for name in ("last_hidden_state", "pooler_output"):
            assert_close(outs["pt"][name], outs[fw][name], TOLERANCES["hidden"], f"{fw}.{name}")
