"""``nezha-zoo convert`` on files written by transformers 4.57.6 itself, and our files read by it.

- transformers PyTorch ``save_pretrained`` (safetensors and ``pytorch_model.bin``), every family:
  converted to every format and back; transformers PyTorch and our backends load the result and
  compute the same numbers as the original model (the weights come back bit-identical).
- transformers TF ``save_pretrained`` (Electra, MPNet; a tf-keras subprocess): ``tf_model.h5`` converts
  to canonical safetensors that transformers PyTorch loads with the TF model's outputs; our
  ``hf-tf`` output loads in transformers TF with nothing missing or unexpected and the same outputs.
- transformers Flax ``save_pretrained`` (Electra): the same both ways, in-process.
- our native Flax variables and Keras ``.weights.h5`` load in flax / Keras and give our backends'
  numbers; a Keras file written by ``save_weights`` converts back to the canonical weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from nezha_zoo.cli.main import main
from nezha_zoo.conversion.convert import convert
from nezha_zoo.spec import get_family
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs

pytestmark = [pytest.mark.hf, pytest.mark.pt]
pin_precision("pt")

_BERT = dict(
    vocab_size=37,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    max_position_embeddings=24,
    num_labels=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
HF_CONFIGS = {
    "nezha": lambda: transformers.NezhaConfig(**_BERT, max_relative_position=4),
    "xlm-roberta-xl": lambda: transformers.XLMRobertaXLConfig(**_BERT),
    "electra": lambda: transformers.ElectraConfig(**_BERT, embedding_size=8),
    "ibert": lambda: transformers.IBertConfig(**_BERT),
    "mpnet": lambda: transformers.MPNetConfig(**_BERT),
    "mpt": lambda: transformers.MptConfig(
        d_model=16, n_heads=4, n_layers=2, vocab_size=37, max_seq_len=24, pad_token_id=0
    ),
}
PT_CASES = [
    ("nezha", "ForPreTraining"),
    ("nezha", "ForQuestionAnswering"),
    ("xlm-roberta-xl", "ForMaskedLM"),
    ("xlm-roberta-xl", "ForSequenceClassification"),
    ("electra", "ForPreTraining"),
    ("electra", "ForMaskedLM"),
    ("ibert", "ForMaskedLM"),
    ("ibert", "ForTokenClassification"),
    ("mpnet", "ForMaskedLM"),
    ("mpnet", "ForMultipleChoice"),
    ("mpt", "ForCausalLM"),
    ("mpt", "ForSequenceClassification"),
]
FRAMEWORK_FREE = ("hf-tf", "hf-flax", "flax")


def _inputs(fam: str, head: str) -> dict[str, np.ndarray]:
    types = 2 if fam in ("nezha", "electra") else None  # RoBERTa-style configs have one token type
    pad = 1 if fam in ("xlm-roberta-xl", "ibert", "mpnet") else 0
    return tiny_inputs(
        batch=2, seq_len=7, vocab_size=37, type_vocab_size=types, pad=pad, num_choices=2 if "Multiple" in head else None
    )


def _hf_pt(fam: str, head: str, seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(transformers, get_family(fam).class_name(head))(HF_CONFIGS[fam]())
    with torch.no_grad():  # non-trivial norms and biases, so a swapped gamma/beta would show
        for name, t in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias") or "norm" in name:
                t.add_(0.1 * torch.randn_like(t))
    return model.eval()


def _run_pt(model, inputs) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return {k: v.detach().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _compare(ref: dict, got: dict, what: str) -> None:
    assert ref, what
    for k, v in ref.items():
        tol = TOLERANCES["hidden" if k in ("last_hidden_state", "pooler_output") else "logits"]
        assert_close(got[k], v, tol, f"{what} {k}")


@pytest.mark.parametrize(("fam", "head"), PT_CASES, ids=[f"{f}-{h}" for f, h in PT_CASES])
def test_transformers_pytorch_files_through_every_format(tmp_path, fam, head):
    model = _hf_pt(fam, head)
    inputs = _inputs(fam, head)
    ref = _run_pt(model, inputs)
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    for src in ("st", "bin"):
        for fmt in FRAMEWORK_FREE:
            info = convert(tmp_path / src, tmp_path / f"{src}-{fmt}", fmt)
            assert info["from"] == ("safetensors" if src == "st" else "pytorch-bin") and info["head"] == head
            convert(tmp_path / f"{src}-{fmt}", tmp_path / f"{src}-{fmt}-back", "safetensors")
            back = type(model).from_pretrained(tmp_path / f"{src}-{fmt}-back").eval()
            want, have = _state(model), _state(back)
            for k, v in want.items():
                np.testing.assert_array_equal(have[k], v, err_msg=f"{src}->{fmt}->safetensors {k}")
            _compare(ref, _run_pt(back, inputs), f"{src}->{fmt}->transformers")
    import nezha_zoo.pt as ours

    cls = getattr(ours, get_family(fam).class_name(head), None)
    if cls is not None:  # backend classes of the families still being built are checked once they exist
        mine = cls.from_pretrained(tmp_path / "bin-hf-flax-back", strict=True).eval()
        _compare(ref, _run_pt(mine, inputs), f"{fam} {head} nezha_zoo.pt")


# --- transformers TF (tf-keras, in a subprocess) ------------------------------------------------

TF_CASES = [("electra", "ForMaskedLM"), ("electra", "ForSequenceClassification"), ("mpnet", "ForMaskedLM")]

_TF_SCRIPT = textwrap.dedent(
    """
    import json, sys, numpy as np, os
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    import transformers
    tf.config.experimental.enable_tensor_float_32_execution(False)
    jobs = json.load(open(sys.argv[1]))
    for job in jobs:
        inputs = dict(np.load(job["inputs"]))
        cls = getattr(transformers, job["cls"])
        if job["mode"] == "save":
            tf.random.set_seed(0)
            model = cls(transformers.AutoConfig.from_pretrained(job["config"]))
            model(model.dummy_inputs)
            for w in model.weights:  # non-trivial norms and biases
                if "LayerNorm" in w.name or "layer_norm" in w.name or w.name.endswith("bias:0"):
                    w.assign(w + tf.random.normal(w.shape, stddev=0.1, seed=1))
            model.save_pretrained(job["dir"])
            info = {"missing_keys": [], "unexpected_keys": []}
        else:
            model, info = cls.from_pretrained(job["dir"], output_loading_info=True)
        out = model({k: tf.constant(v) for k, v in inputs.items()}, training=False)
        np.savez(job["out"], **{k: v.numpy() for k, v in out.items() if hasattr(v, "numpy")})
        json.dump({k: list(v) for k, v in info.items()}, open(job["out"] + ".json", "w"))
    """
)


def _run_tf(tmp_path, jobs: list[dict]) -> None:
    script = tmp_path / "tf_jobs.py"
    script.write_text(_TF_SCRIPT)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "jobs.json")], env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


def _load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


@pytest.mark.tf
def test_transformers_tf_files_convert_and_ours_load_in_transformers_tf(tmp_path):
    pytest.importorskip("tf_keras")
    jobs = []
    for fam, head in TF_CASES:
        d = tmp_path / f"{fam}-{head}"
        d.mkdir()
        HF_CONFIGS[fam]().save_pretrained(d / "config")
        np.savez(d / "inputs.npz", **_inputs(fam, head))
        cls = get_family(fam).class_name(head, "tf")
        jobs.append(
            dict(
                mode="save",
                cls=cls,
                config=str(d / "config"),
                dir=str(d / "tf"),
                inputs=str(d / "inputs.npz"),
                out=str(d / "tf_out.npz"),
            )
        )
    # our hf-tf, from transformers PyTorch's own file, for transformers TF to read: converted up
    # front so that one TF process runs both job lists (a TF + transformers import costs seconds)
    load_jobs = []
    for (fam, head), job in zip(TF_CASES, jobs):
        d = tmp_path / f"{fam}-{head}"
        _hf_pt(fam, head, seed=1).save_pretrained(d / "pt")
        convert(d / "pt", d / "ours-tf", "hf-tf")
        load_jobs.append(dict(job, mode="load", dir=str(d / "ours-tf"), out=str(d / "ours_tf_out.npz")))
    _run_tf(tmp_path, jobs + load_jobs)
    for (fam, head), job in zip(TF_CASES, jobs):
        d = tmp_path / f"{fam}-{head}"
        tf_out = _load_npz(job["out"])
        info = convert(d / "tf", d / "st", "safetensors")
        assert (info["from"], info["head"]) == ("hf-tf", head)
        if fam == "mpnet":  # TF MPNet builds a pooler in every head; transformers PyTorch has none here
            assert info["dropped_keys"] == ["mpnet.pooler.dense.weight", "mpnet.pooler.dense.bias"]
        pt = getattr(transformers, get_family(fam).class_name(head)).from_pretrained(d / "st").eval()
        _compare(tf_out, _run_pt(pt, _load_npz(d / "inputs.npz")), f"TF {fam} {head} -> transformers PT")
    for (fam, head), job in zip(TF_CASES, load_jobs):
        d = tmp_path / f"{fam}-{head}"
        info = json.loads(open(job["out"] + ".json").read())
        assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
        ref = _run_pt(_hf_pt(fam, head, seed=1), _load_npz(d / "inputs.npz"))
        _compare(ref, _load_npz(job["out"]), f"our hf-tf {fam} {head} in transformers TF")


# --- transformers Flax (in-process) ------------------------------------------------------------


@pytest.mark.flax
@pytest.mark.parametrize("head", ["ForMaskedLM", "Model", "ForQuestionAnswering"])
def test_transformers_flax_files_convert_and_ours_load_in_transformers_flax(tmp_path, head):
    pytest.importorskip("flax")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    cls = getattr(transformers, get_family("electra").class_name(head, "flax"))
    inputs = _inputs("electra", head)  # token_type_ids explicit: transformers Flax defaults them to ones
    model = cls(HF_CONFIGS["electra"](), seed=3)
    model.save_pretrained(tmp_path / "fx")
    fx_out = {k: np.asarray(v) for k, v in model(**inputs).items() if hasattr(v, "shape")}
    info = convert(tmp_path / "fx", tmp_path / "st", "safetensors")
    assert (info["from"], info["head"]) == ("hf-flax", head)
    pt = getattr(transformers, get_family("electra").class_name(head)).from_pretrained(tmp_path / "st").eval()
    _compare(fx_out, _run_pt(pt, inputs), f"Flax {head} -> transformers PT")
    # ours, from transformers PyTorch's file, read by transformers Flax
    ref_model = _hf_pt("electra", head, seed=2)
    ref_model.save_pretrained(tmp_path / "pt")
    convert(tmp_path / "pt", tmp_path / "ours-fx", "hf-flax")
    loaded = cls.from_pretrained(tmp_path / "ours-fx")
    got = {k: np.asarray(v) for k, v in loaded(**inputs).items() if hasattr(v, "shape")}
    _compare(_run_pt(ref_model, inputs), got, f"our hf-flax {head} in transformers Flax")


# --- our native formats in flax and Keras 3 -------------------------------------------------------


@pytest.mark.flax
def test_native_flax_variables_load_with_flax_serialization(tmp_path):
    flax = pytest.importorskip("flax")
    import jax

    import nezha_zoo.flax as nz_flax

    jax.config.update("jax_default_matmul_precision", "highest")
    for fam, head in (("electra", "ForPreTraining"), ("nezha", "ForMaskedLM"), ("mpnet", "Model")):
        d = tmp_path / fam
        model = _hf_pt(fam, head)
        inputs = _inputs(fam, head)
        model.save_pretrained(d / "pt")
        convert(d / "pt", d / "flax", "flax")
        variables = flax.serialization.msgpack_restore((d / "flax" / "flax_variables.msgpack").read_bytes())
        ours = getattr(nz_flax, get_family(fam).class_name(head, "flax")).from_pretrained(d / "pt")
        assert set(variables) == {"params"}
        jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"], ours.params)
        out = ours.module.apply(variables, **inputs, deterministic=True)
        got = {k: np.asarray(v) for k, v in out.items() if hasattr(v, "shape")}
        _compare(_run_pt(model, inputs), got, f"{fam} flax variables")


@pytest.mark.tf
def test_native_keras_weights_both_ways(tmp_path):
    pytest.importorskip("tensorflow")
    import nezha_zoo.tf as nz_tf

    pin_precision("tf")
    for fam, head in (("electra", "ForMaskedLM"), ("nezha", "ForSequenceClassification"), ("mpnet", "ForMaskedLM")):
        d = tmp_path / fam
        model = _hf_pt(fam, head)
        inputs = _inputs(fam, head)
        model.save_pretrained(d / "pt")
        info = convert(d / "pt", d / "keras", "keras")
        assert info["files"] == ["config.json", "model.weights.h5"]
        cls = getattr(nz_tf, get_family(fam).class_name(head, "tf"))
        tf_model = cls.from_pretrained(d / "pt")
        for v in tf_model.weights:  # scramble, then load our file with Keras itself
            v.assign(v * 0.0)
        tf_model.load_weights(str(d / "keras" / "model.weights.h5"))
        out = tf_model(inputs, training=False)
        _compare(_run_pt(model, inputs), {k: np.asarray(v) for k, v in out.items() if hasattr(v, "shape")}, fam)
        # a file Keras wrote converts back to the canonical weights
        os.makedirs(d / "saved")
        tf_model.save_weights(str(d / "saved" / "model.weights.h5"))
        (d / "saved" / "config.json").write_text((d / "keras" / "config.json").read_text())
        convert(d / "saved", d / "back", "safetensors")
        convert(d / "pt", d / "canonical", "safetensors")
        assert (d / "back" / "model.safetensors").read_bytes() == (d / "canonical" / "model.safetensors").read_bytes()


# --- verify --------------------------------------------------------------------------------------


@pytest.mark.tf
@pytest.mark.flax
def test_verify_table_on_a_transformers_checkpoint(tmp_path, capsys):
    _hf_pt("electra", "ForMaskedLM").save_pretrained(tmp_path / "pt")
    convert(tmp_path / "pt", tmp_path / "fx", "hf-flax")
    assert main(["verify", str(tmp_path / "fx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {b: s["status"] for b, s in info["backends"].items()} == {"pt": "ok", "tf": "ok", "flax": "ok"}
    assert [(r["field"], r["backend"]) for r in info["rows"]] == [("logits", "tf"), ("logits", "flax")]
    assert all(r["max_abs_diff"] <= TOLERANCES["logits"] for r in info["rows"])
    # one backend is nothing to compare against: verify fails loudly rather than pass vacuously
    assert main(["verify", str(tmp_path / "fx"), "--backends", "pt"]) == 1
    assert "FAILED" in capsys.readouterr().out
