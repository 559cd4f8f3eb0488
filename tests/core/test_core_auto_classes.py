"""The framework-free half of the Auto classes (issue 24): the family from ``model_type``, the head
from the Auto class, clear errors, and the one-line note when the tensors are not what
``architectures`` says.  Every error here is raised before the class registry would import a
backend; the per-backend loading is in tests/equivalence/test_auto_classes.py.
"""

from __future__ import annotations

import json
import logging

import pytest

from nezha_zoo.auto import AUTO_MODEL_HEADS, BaseAutoModel, _head_note
from nezha_zoo.config import CONFIG_NAME
from nezha_zoo.io.head_resolution import without_pooler
from nezha_zoo.io.writer import save_state_dict
from nezha_zoo.pretrained import random_weights
from nezha_zoo.spec import get_family
from tests.core.test_core_convert_formats import CONFIGS  # tiny configs of every family


class CoreAutoModelForCausalLM(BaseAutoModel, framework="pt", head="ForCausalLM"):
    """An Auto class like the backends' (their modules import the framework; this file must not)."""


def test_a_family_without_the_head_is_a_clear_error(tmp_path):
    config = CONFIGS["mpnet"]()
    with pytest.raises(ValueError) as err:
        CoreAutoModelForCausalLM.from_config(config)
    assert str(err.value) == (
        "CoreAutoModelForCausalLM: the MPNet family (model_type 'mpnet') has no ForCausalLM head; its heads are "
        f"{list(get_family('mpnet').heads)}"
    )
    (tmp_path / CONFIG_NAME).write_text(config.to_json_string())
    with pytest.raises(ValueError, match="the MPNet family .* has no ForCausalLM head"):
        CoreAutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="the MPNet family .* has no ForCausalLM head"):
        CoreAutoModelForCausalLM.from_pretrained(tmp_path / "absent", config=config)  # config= decides the family


def test_unknown_or_missing_model_type_and_bad_arguments_are_clear_errors(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"unknown model family 'bert'; nezha_zoo knows \['electra'"):
        CoreAutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="config has no 'model_type'"):
        CoreAutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CoreAutoModelForCausalLM.from_pretrained(tmp_path / "absent")
    with pytest.raises(TypeError, match="needs a PretrainedConfig, got dict"):
        CoreAutoModelForCausalLM.from_config({"model_type": "mpt"})
    with pytest.raises(TypeError, match=r"use CoreAutoModelForCausalLM.from_pretrained\(directory\)"):
        CoreAutoModelForCausalLM()
    with pytest.raises(ValueError, match="unknown framework 'jnp'"):
        type("X", (BaseAutoModel,), {}, framework="jnp", head="Model")
    with pytest.raises(ValueError, match="unknown head 'ForPooling'"):
        type("X", (BaseAutoModel,), {}, framework="pt", head="ForPooling")


def test_the_auto_classes_cover_every_head_of_every_family():
    heads = {h for f in CONFIGS for h in get_family(f).heads}
    assert heads == set(AUTO_MODEL_HEADS.values())


def _publish(directory, fam: str, stored_head: str, claimed: str, pooler: bool = True) -> None:
    config = CONFIGS[fam]()
    family = get_family(fam)
    spec = family.model_spec(config, stored_head)
    spec = spec if pooler else without_pooler(spec)
    cfg = config.copy()
    cfg.architectures = [family.class_name(claimed)]
    save_state_dict(directory, random_weights(spec, config), extra_files={CONFIG_NAME: cfg.to_json_string()})


def test_the_note_says_what_the_tensors_are_when_architectures_disagrees(tmp_path, caplog):
    _publish(tmp_path / "a", "mpnet", "Model", "ForMaskedLM", pooler=False)
    config = CONFIGS["mpnet"]().copy(architectures=["MPNetForMaskedLM"])
    family = get_family("mpnet")
    assert _head_note(str(tmp_path / "a"), family, config) == (
        "config.json names MPNetForMaskedLM; the tensors are MPNetModel (without pooler)"
    )
    _publish(tmp_path / "b", "mpnet", "ForTokenClassification", "Model")
    config = CONFIGS["mpnet"]().copy(architectures=["MPNetModel"])
    assert _head_note(str(tmp_path / "b"), family, config) == (
        "config.json names MPNetModel; the tensors are MPNetForTokenClassification"
    )
    # the claim fits: nothing to say; an unreadable directory is left to the model class's loader
    _publish(tmp_path / "c", "mpnet", "ForMaskedLM", "ForMaskedLM")
    config = CONFIGS["mpnet"]().copy(architectures=["MPNetForMaskedLM"])
    assert _head_note(str(tmp_path / "c"), family, config) is None
    assert _head_note(str(tmp_path / "absent"), family, config) is None
    # the note is logged before the (framework) class is asked to load, so a family without the head
    # still raises first and logs nothing
    with caplog.at_level(logging.WARNING, logger="nezha_zoo.auto"), pytest.raises(ValueError):
        CoreAutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert caplog.records == []
