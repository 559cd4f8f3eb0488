"""Serving export (issue #19): every family's exported artifact against the live model, in each framework.

TF: ``model.export`` and ``tf.saved_model.save`` reloaded with ``tf.saved_model.load``, and TFLite
(builtin ops only) run in ``tf.lite.Interpreter``; PyTorch:
``export_onnx`` run in onnxruntime; Flax: ``jax.export`` bytes reloaded in a fresh process.  Each
artifact takes int32 ids with dynamic batch and length (two shapes are run through one artifact) and
must match the live model within SPEC.md §5 (max-abs <= 1e-4 on logits, float32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nezha_zoo.spec import get_family
from nezha_zoo.spec.serving import EXPORT_TOLERANCE, serving_signature
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs

COMMON = dict(vocab_size=99, num_labels=3)
BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
#: family key -> (head, tiny config): one head per family, together every signature shape
#: (pooler/no pooler, two outputs, multiple choice, no token types, no length limit).
CASES = {
    "electra": ("ForSequenceClassification", dict(embedding_size=24, max_position_embeddings=64, **BERT)),
    "nezha": ("ForPreTraining", dict(max_position_embeddings=16, max_relative_position=3, **BERT)),
    "mpnet": ("ForMultipleChoice", dict(max_position_embeddings=40, **BERT)),
    "xlm_roberta_xl": ("ForQuestionAnswering", dict(max_position_embeddings=40, type_vocab_size=2, **BERT)),
    "ibert": ("ForTokenClassification", dict(max_position_embeddings=40, **BERT)),
    "mpt": ("ForCausalLM", dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, initializer_range=0.2)),
}
#: (batch, length): two shapes through one artifact prove the axes are dynamic.
SHAPES = ((2, 7), (3, 11))


def _config(key: str):
    head, cfg = CASES[key]
    if head == "ForQuestionAnswering":
        cfg = {**cfg, "num_labels": 2}
    return get_family(key).config_class(**{**COMMON, **cfg})


def _inputs(sig, shape, seed=0) -> dict[str, np.ndarray]:
    b, n = shape
    x = tiny_inputs(
        batch=b,
        seq_len=n,
        type_vocab_size=2 if "token_type_ids" in sig.inputs else None,
        num_choices=3 if "choices" in sig.dims else None,
        seed=seed,
    )
    return {k: x[k].astype(np.int32) for k in sig.inputs}


def _check(sig, got: dict, want, what: str) -> None:
    assert EXPORT_TOLERANCE == TOLERANCES["logits"]
    assert sorted(got) == sorted(sig.outputs), (what, sorted(got), sig.outputs)
    for name in sig.outputs:
        assert_close(got[name], want[name], EXPORT_TOLERANCE, f"{what}: {name}")


def test_serving_signature_reads_the_spec():
    sigs = {k: serving_signature(get_family(k), _config(k), CASES[k][0]) for k in CASES}
    assert sigs["electra"].inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert sigs["mpnet"].inputs == ("input_ids", "attention_mask")  # no token-type table
    assert sigs["mpt"].inputs == ("input_ids", "attention_mask")
    assert sigs["mpnet"].dims == ("batch", "choices", "length")
    assert sigs["nezha"].outputs == ("prediction_logits", "seq_relationship_logits")
    assert sigs["xlm_roberta_xl"].outputs == ("start_logits", "end_logits")
    assert (sigs["nezha"].max_length, sigs["electra"].max_length, sigs["xlm_roberta_xl"].max_length) == (None, 64, 38)
    assert {s.dtype for s in sigs.values()} == {"int32"}
    mpnet_base = serving_signature(get_family("mpnet"), _config("mpnet"), "Model")
    electra_base = serving_signature(get_family("electra"), _config("electra"), "Model")
    assert mpnet_base.outputs == ("last_hidden_state", "pooler_output")
    assert electra_base.outputs == ("last_hidden_state",)  # Electra has no pooler
    with pytest.raises(ValueError, match="no head"):
        serving_signature(get_family("mpt"), _config("mpt"), "ForMultipleChoice")


@pytest.mark.tf
@pytest.mark.parametrize("key", sorted(CASES))
def test_tf_saved_model(key, tmp_path):
    tf = pytest.importorskip("tensorflow")
    pin_precision("tf")
    from nezha_zoo.spec.registry import model_class

    model = model_class(key, CASES[key][0], "tf")(_config(key), seed=0)
    sig = serving_signature(model.family, model.config, model.head)
    model.export(tmp_path / "export", verbose=False)
    tf.saved_model.save(model, str(tmp_path / "saved"))
    weights = sum(v.numpy().nbytes for v in model.variables)
    for kind in ("export", "saved"):
        variables = tmp_path / kind / "variables"
        stored = sum(f.stat().st_size for f in variables.iterdir())
        assert stored < 1.5 * weights, (kind, stored, weights)  # each variable stored once (not 2x)
        served = tf.saved_model.load(str(tmp_path / kind)).signatures["serving_default"]
        specs = served.structured_input_signature[1]
        assert sorted(specs) == sorted(sig.inputs), (kind, specs)
        for spec in specs.values():
            assert spec.dtype == tf.int32 and spec.shape.as_list() == [None] * len(sig.dims), (kind, spec)
        for shape in SHAPES:
            x = _inputs(sig, shape)
            got = served(**{k: tf.constant(v) for k, v in x.items()})
            _check(sig, got, model(**x, training=False), f"{key} {kind} {shape}")


#: Ops a flatbuffer of builtin ops only never holds: Select TF ops (Flex*), custom ops, and the resource
#: variables a live-function conversion would leave uninitialised (weights must be constants).
_NOT_BUILTIN = ("CUSTOM", "DELEGATE", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE")


@pytest.mark.tf
@pytest.mark.parametrize("key", sorted(CASES))
def test_tf_tflite_builtin_ops_in_the_interpreter(key, tmp_path):
    pytest.importorskip("tensorflow")
    pin_precision("tf")
    from nezha_zoo.spec.registry import model_class
    from nezha_zoo.tf.export import export_tflite, load_tflite, tflite_interpreter

    model = model_class(key, CASES[key][0], "tf")(_config(key), seed=0)
    path = tmp_path / "model.tflite"
    sig = export_tflite(model, path)
    interpreter = tflite_interpreter(path)
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not [op for op in ops if op.startswith("Flex") or op in _NOT_BUILTIN], sorted(ops)
    runner = interpreter.get_signature_runner("serving_default")
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    assert sorted(inputs) == sorted(sig.inputs) and sorted(outputs) == sorted(sig.outputs), (inputs, outputs)
    for detail in inputs.values():  # every axis dynamic, int32
        assert detail["dtype"] == np.int32 and list(detail["shape_signature"]) == [-1] * len(sig.dims), detail
    served = load_tflite(path)
    # Several (batch, length) shapes through one interpreter: it resizes the dynamic inputs per call.
    for shape in (*SHAPES, (1, 5), *SHAPES[:1]):
        x = _inputs(sig, shape, seed=sum(shape))
        _check(sig, served(**x), model(**x, training=False), f"{key} tflite {shape}")


@pytest.mark.tf
def test_tf_tflite_refuses_ibert_quant_mode(tmp_path):
    pytest.importorskip("tensorflow")
    from nezha_zoo.spec.registry import model_class
    from nezha_zoo.tf.export import export_tflite

    config = _config("ibert")
    config.quant_mode = True
    model = model_class("ibert", CASES["ibert"][0], "tf")(config, seed=0)
    with pytest.raises(ValueError, match="quant mode cannot be exported to TFLite with builtin ops only"):
        export_tflite(model, tmp_path / "model.tflite")
    assert os.listdir(tmp_path) == []


@pytest.mark.tf
def test_tf_tflite_names_the_ops_builtins_lack(tmp_path, monkeypatch):
    """A graph with an op outside TFLite's builtins: ValueError naming it, no file written."""
    tf = pytest.importorskip("tensorflow")
    from nezha_zoo.spec.registry import model_class
    from nezha_zoo.tf import export as tf_export

    serve = tf_export._serve

    def with_a_custom_op(model):
        inner = serve(model)
        return lambda inputs: {k: v + 0.0 * tf.math.bessel_i1e(v) for k, v in inner(inputs).items()}

    monkeypatch.setattr(tf_export, "_serve", with_a_custom_op)
    model = model_class("electra", CASES["electra"][0], "tf")(_config("electra"), seed=0)
    with pytest.raises(ValueError, match="does not convert to TFLite with builtin ops only: Custom ops: BesselI1e$"):
        tf_export.export_tflite(model, tmp_path / "model.tflite")
    assert os.listdir(tmp_path) == []


@pytest.mark.pt
@pytest.mark.parametrize("key", sorted(CASES))
def test_pt_onnx(key, tmp_path):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    pin_precision("pt")
    from nezha_zoo.pt import export_onnx
    from nezha_zoo.spec.registry import model_class

    torch.manual_seed(0)
    model = model_class(key, CASES[key][0], "pt")(_config(key)).eval()
    path = tmp_path / "model.onnx"
    sig = export_onnx(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(sig.inputs)
    assert all(i.type == "tensor(int32)" for i in session.get_inputs())
    assert [o.name for o in session.get_outputs()] == list(sig.outputs)
    for shape in SHAPES:
        x = _inputs(sig, shape)
        got = dict(zip(sig.outputs, session.run(None, x)))
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v).long() for k, v in x.items()})
        _check(sig, got, want, f"{key} onnx {shape}")
    assert model.training is False


_FRESH = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from jax import export
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        with open(job["artifact"], "rb") as f:
            call = export.deserialize(bytearray(f.read())).call
        for i, names in enumerate(job["shapes"]):
            x = np.load(job["inputs"][i])
            out = call(*[x[n] for n in names])
            np.savez(job["outputs"][i], **{k: np.asarray(v) for k, v in out.items()})
    """
)


@pytest.mark.flax
def test_flax_jax_export_in_a_fresh_process(tmp_path):
    pytest.importorskip("jax")
    pin_precision("flax")
    from nezha_zoo.flax.export import export_jax
    from nezha_zoo.spec.registry import model_class

    jobs, expected = [], {}
    for key in sorted(CASES):
        model = model_class(key, CASES[key][0], "flax")(_config(key), seed=0)
        artifact = tmp_path / f"{key}.jax"
        sig = export_jax(model, artifact)
        job = {"artifact": str(artifact), "shapes": [], "inputs": [], "outputs": []}
        for i, shape in enumerate(SHAPES):
            x = _inputs(sig, shape)
            np.savez(tmp_path / f"{key}_in{i}.npz", **x)
            job["shapes"].append(list(sig.inputs))
            job["inputs"].append(str(tmp_path / f"{key}_in{i}.npz"))
            job["outputs"].append(str(tmp_path / f"{key}_out{i}.npz"))
            expected[key, i] = (sig, model(**x))
        jobs.append(job)
    # A fresh interpreter with only jax and numpy imported: the artifact carries the model.
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    res = subprocess.run(
        [sys.executable, "-c", _FRESH, json.dumps(jobs)], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for (key, i), (sig, want) in expected.items():
        got = dict(np.load(tmp_path / f"{key}_out{i}.npz"))
        _check(sig, got, want, f"{key} jax {SHAPES[i]}")


# --- the nezha-zoo export command ------------------------------------------------------------------


@pytest.fixture(scope="module")
def electra_dir(tmp_path_factory):
    """A saved tiny Electra sequence classifier (transformers PyTorch layout), and its live PyTorch model."""
    torch = pytest.importorskip("torch")
    from nezha_zoo.spec.registry import model_class

    torch.manual_seed(0)
    model = model_class("electra", "ForSequenceClassification", "pt")(_config("electra")).eval()
    path = tmp_path_factory.mktemp("ckpt") / "electra"
    model.save_pretrained(path)
    return str(path), model


def _run(argv, capsys):
    from nezha_zoo.cli.main import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.pt
def test_cli_export_onnx_writes_a_checked_artifact(electra_dir, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    src, model = electra_dir
    out = tmp_path / "onnx"
    code, stdout, err = _run(["export", src, str(out), "--to", "onnx", "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["class"] == "ElectraForSequenceClassification" and info["max_abs_diff"] <= EXPORT_TOLERANCE
    assert sorted(os.listdir(out)) == ["model.onnx", "serving.json"]
    assert sorted(os.listdir(tmp_path)) == ["onnx"]  # no staging or lock left beside it
    described = json.loads((out / "serving.json").read_text())
    assert described["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert described["outputs"] == ["logits"] and described["dtype"] == "int32"
    sig = serving_signature(model.family, model.config, model.head)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in SHAPES:
        x = _inputs(sig, shape, seed=3)
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v).long() for k, v in x.items()})
        _check(sig, dict(zip(sig.outputs, session.run(None, x))), want, f"cli onnx {shape}")


@pytest.mark.pt
@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--to", "torchscript"], "unknown export format 'torchscript'"),
        (["--to", ""], "unknown export format ''"),
    ],
)
def test_cli_export_refuses_bad_formats(electra_dir, tmp_path, capsys, argv_tail, message):
    src, _ = electra_dir
    out = tmp_path / "out"
    code, _, err = _run(["export", src, str(out), *argv_tail], capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("nezha-zoo: error:"), err
    assert os.listdir(tmp_path) == []


@pytest.mark.pt
def test_cli_export_refuses_an_existing_path(electra_dir, tmp_path, capsys):
    src, _ = electra_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(["export", src, str(out), "--to", "onnx"], capsys)
    assert code == 2 and "exists" in err and err.count("\n") == 1, err
    assert os.listdir(out) == ["keep.txt"] and os.listdir(tmp_path) == ["out"]


@pytest.mark.pt
def test_cli_export_leaves_nothing_when_the_check_fails(electra_dir, tmp_path, capsys, monkeypatch):
    """An artifact that disagrees with the live model is never moved into place."""
    from nezha_zoo.conversion import export as export_module

    def wrong(model, sig, path):
        with open(path, "wb") as fh:
            fh.write(b"half an artifact")
        return 0.5  # the max-abs difference a broken exporter would give

    monkeypatch.setitem(export_module._WRITERS, "onnx", wrong)
    code, _, err = _run(["export", src := electra_dir[0], str(tmp_path / "out"), "--to", "onnx"], capsys)
    assert code == 2 and "differs from the live model" in err and "5.000e-01" in err, (src, err)
    assert os.listdir(tmp_path) == []


@pytest.mark.pt
@pytest.mark.tf
@pytest.mark.flax
@pytest.mark.parametrize(
    "to, files", [("saved-model", "saved_model.pb"), ("tflite", "model.tflite"), ("jax", "model.jax")]
)
def test_cli_export_tf_and_jax(electra_dir, tmp_path, capsys, to, files):
    """The command's TF, TFLite and JAX artifacts (checked inside against the live model of that backend)."""
    pytest.importorskip("jax" if to == "jax" else "tensorflow")
    src, _ = electra_dir
    out = tmp_path / "out"
    code, stdout, err = _run(["export", src, str(out), "--to", to, "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["max_abs_diff"] <= EXPORT_TOLERANCE and files in info["files"] and "serving.json" in info["files"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.pt
@pytest.mark.tf
def test_cli_export_tflite_refuses_ibert_quant_mode(tmp_path, capsys):
    """A model the format cannot hold: a one-line error, exit 2, nothing written."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    from nezha_zoo.spec.registry import model_class

    config = _config("ibert")
    config.quant_mode = True
    torch.manual_seed(0)
    src = tmp_path / "ibert"
    model_class("ibert", CASES["ibert"][0], "pt")(config).save_pretrained(src)
    out = tmp_path / "out"
    code, _, err = _run(["export", str(src), str(out), "--to", "tflite"], capsys)
    assert code == 2 and "quant mode cannot be exported to TFLite" in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["ibert"]
