"""The model-class registry: (family, head, framework) -> class, the backends' exports, one vocabulary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nezha_zoo.auto import AUTO_MODEL_HEADS
from nezha_zoo.families.electra import ELECTRA
from nezha_zoo.spec import registry
from nezha_zoo.spec.registry import BASE_HEAD, FRAMEWORKS, families, model_class, register_model_class

REPO = Path(__file__).resolve().parents[2]

#: SPEC.md §1, the matrix: 40 classes per framework.
MATRIX = {
    "nezha": ("Model", "ForPreTraining", "ForMaskedLM", "ForNextSentencePrediction", "ForSequenceClassification",
              "ForMultipleChoice", "ForTokenClassification", "ForQuestionAnswering"),
    "xlm_roberta_xl": ("Model", "ForCausalLM", "ForMaskedLM", "ForSequenceClassification", "ForMultipleChoice",
                       "ForTokenClassification", "ForQuestionAnswering"),
    "electra": ("Model", "ForPreTraining", "ForMaskedLM", "ForCausalLM", "ForSequenceClassification",
                "ForMultipleChoice", "ForTokenClassification", "ForQuestionAnswering"),
    "ibert": ("Model", "ForMaskedLM", "ForSequenceClassification", "ForMultipleChoice", "ForTokenClassification",
              "ForQuestionAnswering"),
    "mpnet": ("Model", "ForMaskedLM", "ForSequenceClassification", "ForMultipleChoice", "ForTokenClassification",
              "ForQuestionAnswering"),
    "mpt": ("Model", "ForCausalLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"),
}  # fmt: skip

#: names each backend exports besides the registry's classes (and, for Flax, their linen modules).
EXTRAS = {
    "pt": {"PreTrainedModel", "mean_pool", "export_onnx", "set_packed_linear", "packed_linear"},  # #19, #23
    # checked: issue #22 (compiled bad input); the packed-products switch: #23
    "tf": {"TFPreTrainedModel", "mean_pool", "checked", "set_packed_linear", "packed_linear"},
    "flax": {
        "FlaxPreTrainedModel",
        "mean_pool",
        "losses",
        "checked",
        "set_packed_linear",
        "packed_linear",
        "inference_jit",
    },
}
for _fw, _prefix in (("pt", ""), ("tf", "TF"), ("flax", "Flax")):
    EXTRAS[_fw] |= {_prefix + name for name in AUTO_MODEL_HEADS}  # the Auto classes (<backend>/auto.py)

# Runs in a fresh interpreter per framework: the lookup must import the backend itself.
PROBE = """
import inspect, sys
from nezha_zoo.spec.registry import BASE_HEAD, families, model_class, model_classes

fw, extras = sys.argv[1], set(sys.argv[2].split(","))
assert f"nezha_zoo.{fw}" not in sys.modules
count = 0
for fam in families().values():
    base = model_class(fam.key, BASE_HEAD, fw)
    assert base.family is fam and base.__name__ == fam.class_name(BASE_HEAD, fw), base
    for head in fam.heads:
        cls = model_class(fam.key, head, fw)
        assert f"nezha_zoo.{fw}" in sys.modules
        assert cls is model_class(fam.model_type, head, fw) is model_class(fam, head, fw)
        assert cls.family is fam and cls.head == head, (cls, cls.family, cls.head)
        assert cls.__name__ == fam.class_name(head, fw) and issubclass(cls, base), cls
        # one vocabulary: the same names on every model class of every backend
        for name in ("gradient_checkpointing_enable", "gradient_checkpointing_disable", "from_pretrained",
                     "save_pretrained"):
            assert callable(getattr(cls, name, None)), (cls, name)
        for name in ("spec", "is_gradient_checkpointing"):
            assert isinstance(inspect.getattr_static(cls, name), property), (cls, name)
        count += 1
import importlib
pkg = importlib.import_module(f"nezha_zoo.{fw}")
classes = model_classes(fw)
modules = {c.module_class.__name__ for c in classes.values() if "module_class" in vars(c)}
assert len(pkg.__all__) == len(set(pkg.__all__)), pkg.__all__
assert set(pkg.__all__) == set(classes) | modules | extras, set(pkg.__all__) ^ (set(classes) | modules | extras)
for name in pkg.__all__:
    assert getattr(pkg, name) is not None, name
for name, cls in classes.items():
    assert getattr(pkg, name) is cls, name
print(count)
"""


def test_family_heads_are_the_spec_matrix():
    assert {fam.key: fam.heads for fam in families().values()} == MATRIX


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_every_class_of_the_matrix_resolves_and_is_exported(framework):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(
        [sys.executable, "-c", PROBE, framework, ",".join(sorted(EXTRAS[framework]))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip().splitlines()[-1] == str(sum(len(h) for h in MATRIX.values())) == "40"


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_every_public_class_is_a_class_statement(framework):
    # grep finds every class: no class of the matrix is made by type() or a factory.
    for fam in families().values():
        source = (REPO / "nezha_zoo" / framework / f"{fam.key}.py").read_text(encoding="utf-8")
        for head in (BASE_HEAD, *fam.heads):
            name = fam.class_name(head, framework)
            assert re.search(rf"^class {name}\(", source, re.M), f"no `class {name}(` in {framework}/{fam.key}.py"
    source = (REPO / "nezha_zoo" / framework / "auto.py").read_text(encoding="utf-8")
    prefix = {"pt": "", "tf": "TF", "flax": "Flax"}[framework]
    for name, head in AUTO_MODEL_HEADS.items():
        declaration = f'class {prefix}{name}(BaseAutoModel, framework="{framework}", head="{head}"):'
        assert declaration in source, f"no `{declaration}` in {framework}/auto.py"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("bert", "Model", "pt"), "unknown model family 'bert'"),
        (("electra", "ForNothing", "pt"), "electra has no head 'ForNothing'"),
        (("nezha", "ForCausalLM", "flax"), "nezha has no head 'ForCausalLM'"),
        (("electra", "Model", "jax"), "unknown framework 'jax'"),
    ],
)
def test_unknown_keys_raise(args, match):
    with pytest.raises(ValueError, match=match):
        model_class(*args)


def test_register_model_class_rules(monkeypatch):
    monkeypatch.setattr(registry, "_CLASSES", {})

    def make(name: str, module: str, head: str = "Model") -> type:
        return type(name, (), {"family": ELECTRA, "head": head, "__module__": module})

    first = make("ElectraModel", "somewhere")
    assert register_model_class(first, "pt") is first
    assert registry._CLASSES == {("electra", "Model", "pt"): first}
    register_model_class(make("ElectraModel", "somewhere"), "pt")  # the same class again (a module reload)
    with pytest.raises(ValueError, match="registered twice"):
        register_model_class(make("ElectraModel", "elsewhere"), "pt")
    with pytest.raises(ValueError, match="declares head 'ForMaskedLM'"):
        register_model_class(make("TFElectraModel", "somewhere", head="ForMaskedLM"), "tf")
    register_model_class(make("_ElectraGenerator", "somewhere"), "pt")  # private helpers stay out
    register_model_class(type("Plain", (), {}), "pt")  # no family: not a model class
    assert len(registry._CLASSES) == 1
    with pytest.raises(ValueError, match="unknown framework"):
        register_model_class(first, "torch")
