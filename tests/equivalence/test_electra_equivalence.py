"""Electra: the three backends against each other and against transformers 4.57.6 PyTorch.

One seeded canonical checkpoint per head (drawn by the framework-neutral spec, so no backend is
privileged) is loaded by PyTorch, TensorFlow, Flax and transformers; every output field must agree
within SPEC.md §5 with padded attention masks and token types, and with optional inputs left out.
Training: from the same weights with dropout off, the first step's loss and every gradient agree.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import nezha_zoo.flax as nz_flax  # noqa: E402
import nezha_zoo.pt as nz_pt  # noqa: E402
import nezha_zoo.tf as nz_tf  # noqa: E402
from nezha_zoo import ElectraConfig  # noqa: E402
from nezha_zoo.flax import losses as flax_losses  # noqa: E402
from nezha_zoo.modeling import random_weights, save_weights  # noqa: E402
from nezha_zoo.spec import LAYOUTS, get_family  # noqa: E402
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs, to_numpy  # noqa: E402
from nezha_zoo.tf.modeling_utils import variable_key  # noqa: E402

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax, pytest.mark.hf]

for _fw in ("pt", "tf", "flax"):
    pin_precision(_fw)

FAMILY = get_family("electra")
HEADS = FAMILY.heads
BACKENDS = ("pt", "tf", "flax", "hf")
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, summary_last_dropout=0.0)
TINY = dict(
    vocab_size=99,
    embedding_size=24,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    num_labels=3,
    **NO_DROPOUT,
)
B, L, C = 2, 9, 3


def _seed(head: str) -> int:
    return HEADS.index(head) + 1


def _config(head: str, **extra) -> ElectraConfig:
    """Three labels exercise the label axis; question answering needs exactly two (start, end)."""
    return ElectraConfig(**{**TINY, **extra, **({"num_labels": 2} if head == "ForQuestionAnswering" else {})})


def _save(root, head, **extra) -> str:
    config = _config(head, **extra)
    spec = FAMILY.model_spec(config, head)
    path = str(root / head)
    save_weights(path, config, spec, FAMILY, random_weights(spec, config, seed=_seed(head)))
    return path


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("electra_equiv")
    return {head: _save(root, head) for head in HEADS}


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("electra_equiv_decoder")
    return {head: _save(root, head, is_decoder=True, add_cross_attention=True) for head in ("Model", "ForCausalLM")}


class Loaded:
    """Models loaded lazily, once per (backend, directory)."""

    def __init__(self):
        self._cache = {}

    def get(self, backend: str, head: str, path: str):
        key = (backend, path)
        if key not in self._cache:
            name = FAMILY.class_name(head, "pt" if backend == "hf" else backend)
            if backend == "pt":
                m = getattr(nz_pt, name).from_pretrained(path).eval()
            elif backend == "tf":
                m = getattr(nz_tf, name).from_pretrained(path)
            elif backend == "flax":
                m = getattr(nz_flax, name).from_pretrained(path)
            else:
                m = getattr(transformers, name).from_pretrained(path).eval()
            self._cache[key] = m
        return self._cache[key]


@pytest.fixture(scope="module")
def loaded():
    return Loaded()


def _forward(backend: str, model, inputs: dict, **kw):
    """Run ``model`` on numpy ``inputs``; return its output mapping with numpy values."""
    if backend in ("pt", "hf"):
        t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        with torch.no_grad():
            out = model(**t, **kw)
    elif backend == "tf":
        out = model(**{k: tf.constant(v) for k, v in inputs.items()}, **kw, training=False)
    else:
        out = model(**{k: jnp.asarray(v) for k, v in inputs.items()}, **kw)
    return {k: to_numpy(v) for k, v in out.items()}


def _inputs(head: str, kind: str) -> dict:
    x = tiny_inputs(batch=B, seq_len=L, vocab_size=TINY["vocab_size"], seed=3, num_choices=C if head == "ForMultipleChoice" else None)
    if kind == "ids-only":
        return {"input_ids": x["input_ids"]}
    return x


def _tol(field: str) -> float:
    return TOLERANCES["hidden"] if field in ("last_hidden_state", "hidden_states", "attentions") else TOLERANCES["logits"]


def _compare(a: dict, b: dict, what: str) -> float:
    """Every field both outputs carry; hidden states and attentions element by element."""
    shared = [k for k in a if k in b and k != "past_key_values"]
    assert shared, f"{what}: no common output fields ({list(a)} vs {list(b)})"
    worst = 0.0
    for k in shared:
        va, vb = a[k], b[k]
        if isinstance(va, (tuple, list)):
            assert len(va) == len(vb), f"{what}.{k}: {len(va)} vs {len(vb)} entries"
            for i, (x, y) in enumerate(zip(va, vb)):
                worst = max(worst, assert_close(x, y, _tol(k), f"{what}.{k}[{i}]"))
        else:
            worst = max(worst, assert_close(va, vb, _tol(k), f"{what}.{k}"))
    return worst


@pytest.mark.parametrize("kind", ["padded+token-types", "ids-only"])
@pytest.mark.parametrize("head", HEADS)
def test_every_backend_agrees_on_every_output(head, kind, encoder_dirs, loaded):
    inputs = _inputs(head, kind)
    outs = {
        b: _forward(b, loaded.get(b, head, encoder_dirs[head]), inputs, output_hidden_states=True, output_attentions=True)
        for b in BACKENDS
    }
    for b in ("pt", "tf", "flax"):
        assert set(outs[b]) == set(outs["hf"]) - {"loss"}, f"{b} fields {list(outs[b])} vs transformers {list(outs['hf'])}"
    for i, a in enumerate(BACKENDS):
        for b in BACKENDS[i + 1 :]:
            _compare(outs[a], outs[b], f"{FAMILY.class_name(head)} {kind} {a} vs {b}")


def test_decoder_with_cross_attention_and_cache_agrees(decoder_dirs, loaded):
    """ForCausalLM as a decoder over encoder states: full pass, then prefix + cached continuation."""
    rng = np.random.default_rng(7)
    ids = rng.integers(1, TINY["vocab_size"], size=(B, L), dtype=np.int64)
    enc = rng.standard_normal((B, 5, TINY["hidden_size"])).astype(np.float32)
    enc_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
    full_in = {"input_ids": ids, "encoder_hidden_states": enc, "encoder_attention_mask": enc_mask}
    head, path = "ForCausalLM", decoder_dirs["ForCausalLM"]
    full = {b: _forward(b, loaded.get(b, head, path), full_in, output_attentions=True) for b in BACKENDS}
    for i, a in enumerate(BACKENDS):
        for b in BACKENDS[i + 1 :]:
            _compare(full[a], full[b], f"decoder full {a} vs {b}")

    k = 5  # prefix length; positions k.. come from the cache
    steps = {}
    for b in ("pt", "tf"):
        m = loaded.get(b, head, path)
        first = _forward_raw(b, m, {**full_in, "input_ids": ids[:, :k]}, use_cache=True)
        rest = _forward_raw(b, m, {**full_in, "input_ids": ids[:, k:]}, use_cache=True, past_key_values=first["past_key_values"])
        steps[b] = to_numpy(rest["logits"])
    fm = loaded.get("flax", head, path)
    cache = fm.init_cache(B, L)
    mask = jnp.ones((B, L), jnp.int32)
    first = fm(jnp.asarray(ids[:, :k]), attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask, past_key_values=cache)
    rest = fm(jnp.asarray(ids[:, k:]), attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask, past_key_values=first["past_key_values"])
    steps["flax"] = to_numpy(rest["logits"])
    for b, logits in steps.items():
        assert_close(logits, full["hf"]["logits"][:, k:], TOLERANCES["logits"], f"{b} cached continuation vs transformers full pass")


def _forward_raw(backend, model, inputs, **kw):
    if backend == "pt":
        with torch.no_grad():
            return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, **kw)
    return model(**{k: tf.constant(v) for k, v in inputs.items()}, **kw, training=False)


# --- losses and the first training step ---------------------------------------------------------


def _labels(head: str, rng: np.random.Generator, mask: np.ndarray) -> dict:
    V, N = TINY["vocab_size"], TINY["num_labels"]
    if head in ("ForMaskedLM", "ForCausalLM"):
        lab = rng.integers(0, V, size=(B, L), dtype=np.int64)
        return {"labels": np.where(mask == 1, lab, -100)}
    if head == "ForPreTraining":
        return {"labels": rng.integers(0, 2, size=(B, L), dtype=np.int64)}
    if head == "ForSequenceClassification":
        return {"labels": rng.integers(0, N, size=(B,), dtype=np.int64)}
    if head == "ForMultipleChoice":
        return {"labels": rng.integers(0, C, size=(B,), dtype=np.int64)}
    if head == "ForTokenClassification":
        lab = rng.integers(0, N, size=(B, L), dtype=np.int64)
        return {"labels": np.where(mask == 1, lab, -100)}
    if head == "ForQuestionAnswering":
        return {"start_positions": np.array([1, L + 4]), "end_positions": np.array([3, 2])}
    raise AssertionError(head)


def _flax_loss(head: str, out, labels: dict, inputs: dict):
    if head == "ForMaskedLM":
        return flax_losses.masked_lm_loss(out.logits, labels["labels"])
    if head == "ForCausalLM":
        return flax_losses.causal_lm_loss(out.logits, labels["labels"])
    if head == "ForPreTraining":
        return flax_losses.electra_pretraining_loss(out.logits, labels["labels"], inputs["attention_mask"])
    if head == "ForSequenceClassification":
        return flax_losses.sequence_classification_loss(out.logits, labels["labels"], TINY["num_labels"])
    if head == "ForMultipleChoice":
        return flax_losses.multiple_choice_loss(out.logits, labels["labels"])
    if head == "ForTokenClassification":
        return flax_losses.token_classification_loss(out.logits, labels["labels"])
    return flax_losses.question_answering_loss(out.start_logits, out.end_logits, labels["start_positions"], labels["end_positions"])


def _pt_step(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(**{k: torch.from_numpy(v) for k, v in {**inputs, **labels}.items()})
    out.loss.backward()
    model.eval()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), grads


def _tf_step(model, inputs, labels, spec):
    by_key = {LAYOUTS["keras"].key(p): p for p in spec}
    with tf.GradientTape() as tape:
        out = model({k: tf.constant(v) for k, v in {**inputs, **labels}.items()}, training=True)
    variables = model.trainable_variables
    grads = tape.gradient(out.loss, variables)
    canon = {}
    for v, g in zip(variables, grads):
        p = by_key[variable_key(v)]
        canon[p.name] = LAYOUTS["keras"].from_stored(p, np.asarray(tf.convert_to_tensor(g)))
    return float(out.loss), canon


def _flax_step(head, model, inputs, labels, spec):
    by_key = {LAYOUTS["flax"].key(p): p for p in spec}

    def loss_fn(params):
        out = model.module.apply(
            {"params": params},
            *[jnp.asarray(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")],
            deterministic=True,
        )
        return _flax_loss(head, out, labels, inputs)

    loss, grads = jax.value_and_grad(loss_fn)(model.params)
    canon = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        key = "/".join(k.key for k in path)
        p = by_key[key]
        canon[p.name] = LAYOUTS["flax"].from_stored(p, np.asarray(g))
    return float(loss), canon


@pytest.mark.parametrize("head", [h for h in HEADS if h != "Model"])
def test_first_training_step_agrees(head, encoder_dirs, loaded):
    """Loss and every gradient of one step, dropout off: PyTorch = TensorFlow = Flax = transformers."""
    path = encoder_dirs[head]
    rng = np.random.default_rng(11)
    inputs = _inputs(head, "padded+token-types")
    labels = _labels(head, rng, inputs["attention_mask"])
    spec = FAMILY.model_spec(_config(head), head)
    results = {
        "pt": _pt_step(getattr(nz_pt, FAMILY.class_name(head)).from_pretrained(path), inputs, labels),
        "hf": _pt_step(getattr(transformers, FAMILY.class_name(head)).from_pretrained(path), inputs, labels),
        "tf": _tf_step(loaded.get("tf", head, path), inputs, labels, spec),
        "flax": _flax_step(head, loaded.get("flax", head, path), inputs, labels, spec),
    }
    ref_loss, ref_grads = results["hf"]
    assert set(ref_grads) == {p.name for p in spec}, "transformers' gradients should cover exactly the spec"
    scale = max(float(np.abs(g).max()) for g in ref_grads.values())
    for b in ("pt", "tf", "flax"):
        loss, grads = results[b]
        assert abs(loss - ref_loss) <= TOLERANCES["loss"], f"{b} loss {loss} vs transformers {ref_loss}"
        assert set(grads) == set(ref_grads), f"{b} gradients cover {sorted(set(grads) ^ set(ref_grads))} differently"
        for name, g in ref_grads.items():
            assert_close(grads[name] / scale, g / scale, TOLERANCES["grad_rel"], f"{b} grad {name} (relative to max {scale:.3g})")
