"""I-BERT in PyTorch, TensorFlow, Flax and transformers 4.57.6 on one calibrated checkpoint per head.

The checkpoint: transformers' model (quant-mode config, dropout off, realistic weight scales) is
calibrated by training-mode forwards, its query/key ranges are widened to power-of-two scales (so
transformers' float32 attention scores are exact integers; see ``tests/pt/test_ibert_pt.py``), and
saved.  Every backend loads it, in float mode (``quant_mode=False`` override) and in quant mode.

* Float mode: every output field of every class agrees between all four within SPEC §5 tolerances,
  with padding and token types and with the optional inputs left out.
* Quant mode against transformers: its encoder is patched to feed every layer its input's true scale
  (transformers passes the embeddings' scale to every layer, a bug the backends do not copy); the
  quantized fields (hidden states = 8-bit integers x scale, probabilities = integers x 2**-8) are
  then equal to ours, bit for bit, on the padded inputs; the float heads on top within tolerance.
* Integer tensors of the three backends: every hidden state (the embeddings' and every layer's
  8-bit output) and every attention-probability tensor is *identical* across PyTorch, TensorFlow
  and Flax (padded and defaulted inputs), and so are the calibrated quantization states when each
  backend calibrates the same uncalibrated checkpoint on the same batches.  The logits come from
  float layers and agree within the float tolerance.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp
from safetensors.numpy import load_file

import nezha_zoo.flax as nz_flax
import nezha_zoo.pt as nz_pt
import nezha_zoo.tf as nz_tf
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs, to_numpy

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax, pytest.mark.hf]

for _fw in ("pt", "tf", "flax"):
    pin_precision(_fw)
transformers.logging.set_verbosity_error()

HEADS = (
    "Model",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)
CONFIG = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
    layer_norm_eps=1e-5,
    initializer_range=0.2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    quant_mode=True,
)
QUANTIZED = ("last_hidden_state", "hidden_states", "attentions")
MODULES = {"pt": nz_pt, "tf": nz_tf, "flax": nz_flax, "hf": transformers}


def cls_name(head: str, backend: str) -> str:
    prefix = {"pt": "", "hf": "", "tf": "TF", "flax": "Flax"}[backend]
    return f"{prefix}IBert{'Model' if head == 'Model' else head}"


def inputs_for(head: str, seed: int = 3) -> dict:
    choices = 3 if head == "ForMultipleChoice" else None
    return tiny_inputs(batch=2, seq_len=9, vocab_size=99, seed=seed, pad=1, num_choices=choices)


def _hf_config(head: str) -> dict:
    extra = {"num_labels": 2} if head == "ForQuestionAnswering" else {"num_labels": 3}
    return {**CONFIG, **extra}


def forward(backend: str, model, inputs: dict, **kw) -> dict:
    if backend in ("pt", "hf"):
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}, **kw)
    elif backend == "tf":
        out = model(**{k: tf.constant(v) for k, v in inputs.items()}, **kw, training=False)
    else:
        out = model(**{k: jnp.asarray(v) for k, v in inputs.items()}, **kw)
    return {k: to_numpy(v) for k, v in out.items() if v is not None and k != "loss"}


@torch.no_grad()
def _snap(model) -> None:
    """Widen every query/key activation range to ``127 * 2**k`` (power-of-two scales)."""
    for m in model.modules():
        for attr in ("query_activation", "key_activation"):
            act = getattr(m, attr, None)
            if act is not None:
                r = torch.maximum(act.x_min.abs(), act.x_max.abs())
                p2 = 2.0 ** torch.ceil(torch.log2(r / 127))
                act.x_min.copy_(-127 * p2)
                act.x_max.copy_(127 * p2)


class _TrueScale(torch.nn.Module):
    """Feeds a transformers ``IBertLayer`` the previous layer's output scale (not the embeddings')."""

    def __init__(self, layer, prev) -> None:
        super().__init__()
        self.inner, self.prev = layer, prev

    def forward(self, hidden, scale, *args, **kwargs):
        if self.prev is not None and scale is not None:
            scale = self.prev.output.output_activation.act_scaling_factor
        return self.inner(hidden, scale, *args, **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """head -> directory of a calibrated, q/k-snapped transformers checkpoint (built on demand)."""
    cache: dict = {}

    def get(head: str) -> str:
        if head not in cache:
            torch.manual_seed(zlib.crc32(head.encode()))
            hf = getattr(transformers, cls_name(head, "hf"))(transformers.IBertConfig(**_hf_config(head)))
            hf.train()
            for s in range(3):
                forward("hf", hf, inputs_for(head, seed=100 + s))
            hf.eval()
            _snap(hf)
            path = tmp_path_factory.mktemp(f"ibert_{head}")
            hf.save_pretrained(path)
            cache[head] = str(path)
        return cache[head]

    return get


def load(backend: str, head: str, path: str, quant_mode: bool):
    model = getattr(MODULES[backend], cls_name(head, backend)).from_pretrained(path, quant_mode=quant_mode)
    if backend in ("pt", "hf"):
        model.eval()
    if backend == "hf" and quant_mode:
        layers = model.base_model.encoder.layer
        model.base_model.encoder.layer = torch.nn.ModuleList(
            _TrueScale(layer, layers[i - 1] if i else None) for i, layer in enumerate(layers)
        )
    return model


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """(backend, head, quant_mode) -> that backend's model of the head's checkpoint, loaded once."""
    cache: dict = {}

    def get(backend: str, head: str, quant_mode: bool):
        key = (backend, head, quant_mode)
        if key not in cache:
            cache[key] = load(backend, head, checkpoints(head), quant_mode)
        return cache[key]

    return get


def _pairs_of(a: dict, b: dict, what: str):
    assert set(a) == set(b), f"{what}: fields {sorted(a)} vs {sorted(b)}"
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, (tuple, list)):
            assert len(va) == len(vb), f"{what}.{k}: {len(va)} vs {len(vb)} entries"
            for i, (x, y) in enumerate(zip(va, vb)):
                yield f"{k}[{i}]", k, x, y
        else:
            yield k, k, va, vb


@pytest.mark.parametrize("kind", ["padded+token-types", "ids-only"])
@pytest.mark.parametrize("head", HEADS)
def test_float_mode_every_backend_agrees(head, kind, loaded):
    x = inputs_for(head)
    x = {"input_ids": x["input_ids"]} if kind == "ids-only" else x
    kw = dict(output_hidden_states=True, output_attentions=True)
    outs = {b: forward(b, loaded(b, head, False), x, **kw) for b in ("hf", "pt", "tf", "flax")}
    for other in ("pt", "tf", "flax"):
        for name, field, a, b in _pairs_of(outs[other], outs["hf"], f"float {head} {other}"):
            tol = TOLERANCES["hidden"] if field in QUANTIZED + ("pooler_output",) else TOLERANCES["logits"]
            assert_close(a, b, tol, f"float {head} {kind} {other}.{name} vs transformers")


@pytest.mark.parametrize("head", HEADS)
def test_quant_mode_integers_identical_across_backends_and_equal_to_transformers(head, checkpoints):
    path = checkpoints(head)
    kw = dict(output_hidden_states=True, output_attentions=True)
    models = {b: load(b, head, path, True) for b in ("hf", "pt", "tf", "flax")}
    for kind in ("padded+token-types", "ids-only"):
        x = inputs_for(head, seed=4)
        x = {"input_ids": x["input_ids"]} if kind == "ids-only" else x
        outs = {b: forward(b, m, x, **kw) for b, m in models.items()}
        for other in ("tf", "flax"):
            for name, field, a, b in _pairs_of(outs[other], outs["pt"], f"quant {head} {other} vs pt"):
                if field in QUANTIZED:  # integers x identical scales: bit for bit
                    assert np.array_equal(a, b), f"quant {head} {kind}: {other}.{name} differs from pt"
                else:  # float heads on top
                    assert_close(a, b, TOLERANCES["logits"], f"quant {head} {kind} {other}.{name} vs pt")
        if kind == "padded+token-types":
            for name, field, a, b in _pairs_of(outs["pt"], outs["hf"], f"quant {head} pt vs transformers"):
                tol = 0.0 if field in QUANTIZED else TOLERANCES["logits"]
                assert_close(a, b, tol, f"quant {head} pt.{name} vs transformers")


def _state(path) -> dict[str, np.ndarray]:
    return load_file(f"{path}/model.safetensors")


def test_quant_calibration_identical_across_backends(tmp_path):
    """From one uncalibrated checkpoint, three training-mode passes give every backend the same state."""
    head = "ForSequenceClassification"
    torch.manual_seed(5)
    hf = transformers.IBertForSequenceClassification(transformers.IBertConfig(**_hf_config(head)))
    hf.save_pretrained(tmp_path / "init")
    batches = [inputs_for(head, seed=200 + s) for s in range(3)]
    pt = nz_pt.IBertForSequenceClassification.from_pretrained(tmp_path / "init").train()
    tfm = nz_tf.TFIBertForSequenceClassification.from_pretrained(str(tmp_path / "init"))
    fx = nz_flax.FlaxIBertForSequenceClassification.from_pretrained(str(tmp_path / "init"))
    buffers = fx.buffers
    for x in batches:
        with torch.no_grad():
            pt(**{k: torch.from_numpy(v) for k, v in x.items()})
        tfm(**{k: tf.constant(v) for k, v in x.items()}, training=True)
        _, state = fx(**x, buffers=buffers, train=True)
        buffers = state["buffers"]
    fx.buffers = buffers
    assert not fx._jit_compiled  # calibration runs op by op, never through the wrapper's cached jit
    for name, model in (("pt", pt), ("tf", tfm), ("flax", fx)):
        model.save_pretrained(tmp_path / name)
    ref = _state(tmp_path / "pt")
    differ = {}
    for name in ("flax", "tf"):
        got = _state(tmp_path / name)
        assert set(got) == set(ref), name
        differ[name] = {k: float(np.abs(got[k] - ref[k]).max()) for k in ref if not np.array_equal(got[k], ref[k])}
    assert not any(differ.values()), f"calibrated state differs from pt: {differ}"
