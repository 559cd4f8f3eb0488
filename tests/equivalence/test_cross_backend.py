"""Every class in the three backends against each other and against transformers 4.57.6 PyTorch.

For each family and head, one seeded canonical checkpoint (drawn from the framework-neutral spec, so
no backend is privileged) is loaded by PyTorch, TensorFlow, Flax and transformers.  Every output
field must agree within SPEC.md §5 with padded attention masks and token types, and with optional
inputs left out.  From the same weights with dropout off, the first training step's loss and every
gradient agree.  Decoders: full and cached decoding agree with transformers' full pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp

import nezha_zoo.flax as nz_flax
import nezha_zoo.pt as nz_pt
import nezha_zoo.tf as nz_tf
from nezha_zoo.flax import losses as flax_losses
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec import LAYOUTS, get_family
from nezha_zoo.spec.param import Kind
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs, to_numpy
from nezha_zoo.tf.modeling_utils import variable_key

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax, pytest.mark.hf]

for _fw in ("pt", "tf", "flax"):
    pin_precision(_fw)

BACKENDS = ("pt", "tf", "flax", "hf")
B, L, C = 2, 9, 3
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _token_labels(rng, mask, n):
    return np.where(mask == 1, rng.integers(0, n, size=mask.shape, dtype=np.int64), -100)


@dataclass(frozen=True)
class Case:
    """What the harness needs to know about one family."""

    key: str
    config: dict
    token_types: bool = True
    decoder_head: str | None = None  # head run as a decoder with cross-attention and a cache
    labels: dict[str, Callable] = field(default_factory=dict)  # head -> (rng, mask) -> label dict
    flax_loss: dict[str, Callable] = field(default_factory=dict)  # head -> (out, labels, inputs) -> loss
    long_inputs: bool = False  # the family has no length limit: run 3x max_position_embeddings
    encoder_len: int = 5  # encoder states' length in the decoder test
    causal_cache_head: str | None = None  # decoder-only head: prefix + cached continuation vs full pass
    # config overrides transformers does not implement: run on causal_cache_head in our three backends
    config_variants: dict[str, dict] = field(default_factory=dict)


def _common_labels(vocab: int, n: int) -> tuple[dict, dict]:
    labels = {
        "ForMaskedLM": lambda r, m: {"labels": _token_labels(r, m, vocab)},
        "ForCausalLM": lambda r, m: {"labels": _token_labels(r, m, vocab)},
        "ForSequenceClassification": lambda r, m: {"labels": r.integers(0, n, size=(B,), dtype=np.int64)},
        "ForMultipleChoice": lambda r, m: {"labels": r.integers(0, C, size=(B,), dtype=np.int64)},
        "ForTokenClassification": lambda r, m: {"labels": _token_labels(r, m, n)},
        "ForQuestionAnswering": lambda r, m: {
            "start_positions": np.array([1, L + 4]),
            "end_positions": np.array([3, 2]),
        },
    }
    fl = flax_losses
    losses = {
        "ForMaskedLM": lambda o, y, x: fl.masked_lm_loss(o.logits, y["labels"]),
        "ForCausalLM": lambda o, y, x: fl.causal_lm_loss(o.logits, y["labels"]),
        "ForSequenceClassification": lambda o, y, x: fl.sequence_classification_loss(o.logits, y["labels"], n),
        "ForMultipleChoice": lambda o, y, x: fl.multiple_choice_loss(o.logits, y["labels"]),
        "ForTokenClassification": lambda o, y, x: fl.token_classification_loss(o.logits, y["labels"]),
        "ForQuestionAnswering": lambda o, y, x: fl.question_answering_loss(
            o.start_logits, o.end_logits, y["start_positions"], y["end_positions"]
        ),
    }
    return labels, losses


def _electra() -> Case:
    labels, losses = _common_labels(99, 3)
    labels["ForPreTraining"] = lambda r, m: {"labels": r.integers(0, 2, size=(B, L), dtype=np.int64)}
    losses["ForPreTraining"] = lambda o, y, x: flax_losses.electra_pretraining_loss(
        o.logits, y["labels"], x["attention_mask"]
    )
    cfg = dict(
        vocab_size=99,
        embedding_size=24,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
        summary_last_dropout=0.0,
        **NO_DROPOUT,
    )
    return Case("electra", cfg, decoder_head="ForCausalLM", labels=labels, flax_loss=losses)


def _nezha() -> Case:
    labels, losses = _common_labels(99, 3)
    nsp = lambda r, m: r.integers(0, 2, size=(B,), dtype=np.int64)  # noqa: E731
    labels["ForNextSentencePrediction"] = lambda r, m: {"labels": nsp(r, m)}
    labels["ForPreTraining"] = lambda r, m: {"labels": _token_labels(r, m, 99), "next_sentence_label": nsp(r, m)}
    losses["ForNextSentencePrediction"] = lambda o, y, x: flax_losses.next_sentence_prediction_loss(
        o.logits, y["labels"]
    )
    losses["ForPreTraining"] = lambda o, y, x: flax_losses.nezha_pretraining_loss(
        o.prediction_logits, o.seq_relationship_logits, y["labels"], y["next_sentence_label"]
    )
    cfg = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=16,
        max_relative_position=3,
        num_labels=3,
        classifier_dropout=0.0,
        **NO_DROPOUT,
    )
    # transformers' Nezha adds relative terms to cross-attention too, and its code only runs when the
    # encoder and decoder lengths are equal (ours takes any lengths).
    return Case("nezha", cfg, decoder_head="Model", labels=labels, flax_loss=losses, long_inputs=True, encoder_len=L)


def _mpnet() -> Case:
    labels, losses = _common_labels(99, 3)
    cfg = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        relative_attention_num_buckets=32,
        num_labels=3,
        **NO_DROPOUT,
    )
    return Case("mpnet", cfg, token_types=False, labels=labels, flax_loss=losses)


def _xlm_roberta_xl() -> Case:
    labels, losses = _common_labels(99, 3)
    cfg = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        # The published checkpoints have a one-row token-type table, where every type id is 0 (the
        # default); two rows make the token_type_ids of the inputs change the numbers.
        type_vocab_size=2,
        num_labels=3,
        **NO_DROPOUT,
    )
    return Case("xlm_roberta_xl", cfg, decoder_head="ForCausalLM", labels=labels, flax_loss=losses)


def _mpt() -> Case:
    labels, losses = _common_labels(99, 3)
    cfg = dict(
        vocab_size=99,
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=32,
        pad_token_id=0,
        num_labels=3,
        # Larger weights than the default 0.02, so attention is not decided by ALiBi alone.
        initializer_range=0.2,
        # transformers' token-classification dropout falls back to 0.1 without this key.
        classifier_dropout=0.0,
    )
    # MosaicML (llm-foundry) settings transformers ignores, and a head count that is not a power of two.
    variants = {
        "mosaicml": dict(
            no_bias=False,
            expansion_ratio=3,
            logit_scale=0.5,
            attn_config=dict(qk_ln=True, clip_qkv=0.5, softmax_scale=0.3, alibi_bias_max=4),
        ),
        "multiquery": dict(
            logit_scale="inv_sqrt_d_model", attn_config=dict(attn_type="multiquery_attention", qk_ln=True)
        ),
        "six-heads": dict(d_model=48, n_heads=6),
    }
    return Case(
        "mpt",
        cfg,
        token_types=False,
        labels=labels,
        flax_loss=losses,
        causal_cache_head="ForCausalLM",
        config_variants=variants,
    )


CASES = {c.key: c for c in (_electra(), _nezha(), _mpnet(), _xlm_roberta_xl(), _mpt())}
PARAMS = [(k, h) for k, c in CASES.items() for h in get_family(k).heads]


def _config(case: Case, head: str, **extra):
    fam = get_family(case.key)
    qa = {"num_labels": 2} if head == "ForQuestionAnswering" else {}  # start and end
    return fam.config_class(**{**case.config, **extra, **qa})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Seeded canonical checkpoints, written once per (family, head, variant) on first use."""
    root = tmp_path_factory.mktemp("cross_backend")
    made: dict = {}

    def get(key: str, head: str, decoder: bool = False) -> str:
        if (key, head, decoder) not in made:
            case, fam = CASES[key], get_family(key)
            extra = dict(is_decoder=True, add_cross_attention=True) if decoder else {}
            config = _config(case, head, **extra)
            spec = fam.model_spec(config, head)
            path = str(root / f"{key}-{head}-{'dec' if decoder else 'enc'}")
            seed = fam.heads.index(head) + (100 if decoder else 1)
            save_weights(path, config, spec, fam, random_weights(spec, config, seed=seed))
            made[(key, head, decoder)] = path
        return made[(key, head, decoder)]

    return get


@pytest.fixture(scope="module")
def load():
    cache: dict = {}

    def get(backend: str, key: str, head: str, path: str):
        if (backend, path) not in cache:
            fam = get_family(key)
            name = fam.class_name(head, "pt" if backend == "hf" else backend)
            module = {"pt": nz_pt, "tf": nz_tf, "flax": nz_flax, "hf": transformers}[backend]
            model = getattr(module, name).from_pretrained(path)
            cache[(backend, path)] = model.eval() if backend in ("pt", "hf") else model
        return cache[(backend, path)]

    return get


def _forward(backend: str, model, inputs: dict, **kw) -> dict:
    if backend in ("pt", "hf"):
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, **kw)
    elif backend == "tf":
        out = model(**{k: tf.constant(v) for k, v in inputs.items()}, **kw, training=False)
    else:
        out = model(**{k: jnp.asarray(v) for k, v in inputs.items()}, **kw)
    # transformers' decoders that cache by default (XLM-R-XL) return a Cache object: its legacy tuples
    legacy = {k: v.to_legacy_cache() for k, v in out.items() if hasattr(v, "to_legacy_cache")}
    return {k: to_numpy(legacy.get(k, v)) for k, v in out.items()}


def _inputs(case: Case, head: str, kind: str, seq_len: int = L) -> dict:
    x = tiny_inputs(
        batch=B,
        seq_len=seq_len,
        vocab_size=case.config["vocab_size"],
        type_vocab_size=case.config.get("type_vocab_size", 2) if case.token_types else None,
        pad=_config(case, head).pad_token_id,
        seed=3,
        num_choices=C if head == "ForMultipleChoice" else None,
    )
    return {"input_ids": x["input_ids"]} if kind == "ids-only" else x


def _tol(name: str) -> float:
    hidden = ("last_hidden_state", "hidden_states", "attentions", "cross_attentions", "pooler_output")
    return TOLERANCES["hidden"] if name in hidden else TOLERANCES["logits"]


def _compare(a: dict, b: dict, what: str) -> None:
    shared = [k for k in a if k in b and k not in ("past_key_values", "loss")]
    assert shared, f"{what}: no common output fields ({list(a)} vs {list(b)})"
    for k in shared:
        va, vb = a[k], b[k]
        if isinstance(va, (tuple, list)):
            assert len(va) == len(vb), f"{what}.{k}: {len(va)} vs {len(vb)} entries"
            for i, (x, y) in enumerate(zip(va, vb)):
                assert_close(x, y, _tol(k), f"{what}.{k}[{i}]")
        else:
            assert_close(va, vb, _tol(k), f"{what}.{k}")


def _all_pairs(outs: dict, what: str) -> None:
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            _compare(outs[a], outs[b], f"{what} {a} vs {b}")


@pytest.mark.parametrize("kind", ["padded+token-types", "ids-only"])
@pytest.mark.parametrize("key,head", PARAMS)
def test_every_backend_agrees_on_every_output(key, head, kind, checkpoints, load):
    case = CASES[key]
    path = checkpoints(key, head)
    inputs = _inputs(case, head, kind)
    outs = {
        b: _forward(b, load(b, key, head, path), inputs, output_hidden_states=True, output_attentions=True)
        for b in BACKENDS
    }
    for b in ("pt", "tf", "flax"):
        assert set(outs[b]) == set(outs["hf"]) - {"loss"}, (
            f"{b} fields {list(outs[b])} vs transformers {list(outs['hf'])}"
        )
    _all_pairs(outs, f"{get_family(key).class_name(head)} {kind}")


@pytest.mark.parametrize("key", [k for k, c in CASES.items() if c.decoder_head])
def test_decoder_full_and_cached_agree(key, checkpoints, load):
    """A decoder over encoder states: full pass in every backend, then prefix + cached continuation."""
    case = CASES[key]
    head = case.decoder_head
    path = checkpoints(key, head, decoder=True)
    rng = np.random.default_rng(7)
    ids = rng.integers(2, case.config["vocab_size"], size=(B, L), dtype=np.int64)
    enc = rng.standard_normal((B, case.encoder_len, case.config["hidden_size"])).astype(np.float32)
    enc_mask = np.ones((B, case.encoder_len), dtype=np.int64)
    enc_mask[1, -2:] = 0  # a padded encoder row
    full_in = {"input_ids": ids, "encoder_hidden_states": enc, "encoder_attention_mask": enc_mask}
    full = {b: _forward(b, load(b, key, head, path), full_in, output_attentions=True) for b in BACKENDS}
    _all_pairs(full, f"{key} decoder full pass")

    field_name = "logits" if "logits" in full["hf"] else "last_hidden_state"
    k = 5  # prefix length; positions k.. come from the cache
    steps = {}
    for b in ("pt", "tf"):
        m = load(b, key, head, path)
        first = _raw(b, m, {**full_in, "input_ids": ids[:, :k]}, use_cache=True)
        rest = _raw(
            b, m, {**full_in, "input_ids": ids[:, k:]}, use_cache=True, past_key_values=first["past_key_values"]
        )
        steps[b] = to_numpy(rest[field_name])
    fm = load("flax", key, head, path)
    mask = jnp.ones((B, L), jnp.int32)
    kw = dict(attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    first = fm(jnp.asarray(ids[:, :k]), past_key_values=fm.init_cache(B, L), **kw)
    rest = fm(jnp.asarray(ids[:, k:]), past_key_values=first["past_key_values"], **kw)
    steps["flax"] = to_numpy(rest[field_name])
    for b, got in steps.items():
        assert_close(
            got, full["hf"][field_name][:, k:], _tol(field_name), f"{key} {b} cached continuation vs transformers"
        )


@pytest.mark.parametrize("key", [k for k, c in CASES.items() if c.causal_cache_head])
def test_decoder_only_cached_continuation_agrees(key, checkpoints, load):
    """A decoder-only LM with left padding: full pass in every backend, then a prefix + cached continuation.

    Caches: PyTorch and TF growing ``(key, value)`` tuples, TF's fixed-size ``KVCache`` and Flax's
    cache from ``init_cache``; every continuation equals transformers' full pass.
    """
    case = CASES[key]
    head = case.causal_cache_head
    path = checkpoints(key, head)
    rng = np.random.default_rng(8)
    ids = rng.integers(2, case.config["vocab_size"], size=(B, L), dtype=np.int64)
    mask = np.ones((B, L), dtype=np.int64)
    mask[1, :2] = 0  # left padding inside the cached prefix
    ids[1, :2] = _config(case, head).pad_token_id
    full_in = {"input_ids": ids, "attention_mask": mask}
    full = {
        b: _forward(b, load(b, key, head, path), full_in, output_hidden_states=True, output_attentions=True)
        for b in BACKENDS
    }
    # Every position, padded ones included (a row with no visible key is uniform over all keys in each).
    _all_pairs(full, f"{key} left-padded full pass")

    k = 5  # prefix length; positions k.. come from the cache
    for what, got in _cached_continuations(key, head, path, load, ids, mask, k).items():
        assert_close(got, full["hf"]["logits"][:, k:], _tol("logits"), f"{key} {what} continuation vs transformers")


def _cached_continuations(key, head, path, load, ids, mask, k) -> dict:
    """Logits of positions k.. from a prefix of k positions and a cached continuation, per cache kind."""
    steps = {}
    for b in ("pt", "tf"):
        m = load(b, key, head, path)
        first = _raw(b, m, {"input_ids": ids[:, :k], "attention_mask": mask[:, :k]}, use_cache=True)
        rest = _raw(
            b,
            m,
            {"input_ids": ids[:, k:], "attention_mask": mask},
            use_cache=True,
            past_key_values=first["past_key_values"],
        )
        steps[f"{b} growing cache"] = to_numpy(rest["logits"])
    tm = load("tf", key, head, path)
    cache = tm.init_cache(ids.shape[0], ids.shape[1])  # fixed size: the mask covers every slot in both calls
    first = _raw("tf", tm, {"input_ids": ids[:, :k], "attention_mask": mask}, use_cache=True, past_key_values=cache)
    rest = _raw(
        "tf",
        tm,
        {"input_ids": ids[:, k:], "attention_mask": mask},
        use_cache=True,
        past_key_values=first["past_key_values"],
    )
    steps["tf KVCache"] = to_numpy(rest["logits"])
    fm = load("flax", key, head, path)
    cache = fm.init_cache(ids.shape[0], ids.shape[1])
    first = fm(jnp.asarray(ids[:, :k]), attention_mask=jnp.asarray(mask), past_key_values=cache)
    rest = fm(jnp.asarray(ids[:, k:]), attention_mask=jnp.asarray(mask), past_key_values=first["past_key_values"])
    steps["flax init_cache"] = to_numpy(rest["logits"])
    return steps


@pytest.mark.parametrize("key,variant", [(k, v) for k, c in CASES.items() for v in c.config_variants])
def test_config_variants_agree_across_backends(key, variant, load, tmp_path):
    """Settings transformers lacks (MPT's MosaicML fields): PyTorch = TF = Flax, full pass and cached.

    Norm scales and biases are drawn away from their 1 / 0 initialisation so that they count.
    """
    case, fam = CASES[key], get_family(key)
    head = case.causal_cache_head
    config = _config(case, head, **case.config_variants[variant])
    spec = fam.model_spec(config, head)
    weights = random_weights(spec, config, seed=31)
    rng = np.random.default_rng(32)
    for p in spec:
        if p.kind in (Kind.NORM_SCALE, Kind.NORM_BIAS, Kind.BIAS):
            weights[p.name] = weights[p.name] + (0.2 * rng.standard_normal(p.shape)).astype(np.float32)
    path = str(tmp_path)
    save_weights(path, config, spec, fam, weights)
    inputs = _inputs(case, head, "padded+token-types")
    outs = {
        b: _forward(b, load(b, key, head, path), inputs, output_hidden_states=True, output_attentions=True)
        for b in ("pt", "tf", "flax")
    }
    _all_pairs(outs, f"{key}[{variant}]")
    ids = np.random.default_rng(33).integers(2, case.config["vocab_size"], size=(B, L), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding inside the cached prefix
    ids[1, :2] = config.pad_token_id
    full = _forward("pt", load("pt", key, head, path), {"input_ids": ids, "attention_mask": mask})
    for what, got in _cached_continuations(key, head, path, load, ids, mask, 5).items():
        assert_close(got, full["logits"][:, 5:], _tol("logits"), f"{key}[{variant}] {what} vs PyTorch full pass")


def _raw(backend, model, inputs, **kw):
    if backend == "pt":
        with torch.no_grad():
            return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, **kw)
    return model(**{k: tf.constant(v) for k, v in inputs.items()}, **kw, training=False)


@pytest.mark.parametrize("key", [k for k, c in CASES.items() if c.long_inputs])
def test_inputs_longer_than_max_position_embeddings_agree(key, checkpoints, load):
    """Functional positions: 3x max_position_embeddings tokens, the same numbers in every backend."""
    case = CASES[key]
    path = checkpoints(key, "Model")
    inputs = _inputs(case, "Model", "padded+token-types", seq_len=3 * case.config["max_position_embeddings"])
    outs = {b: _forward(b, load(b, key, "Model", path), inputs) for b in ("pt", "tf", "flax")}
    _all_pairs(outs, f"{key} long input")


# --- the first training step ---------------------------------------------------------------------


def _pt_step(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(**{k: torch.from_numpy(v) for k, v in {**inputs, **labels}.items()})
    out.loss.backward()
    model.eval()
    return out.loss.item(), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


def _tf_step(model, inputs, labels, spec):
    by_key = {LAYOUTS["keras"].key(p): p for p in spec}
    with tf.GradientTape() as tape:
        out = model({k: tf.constant(v) for k, v in {**inputs, **labels}.items()}, training=True)
    variables = model.trainable_variables
    canon = {}
    for v, g in zip(variables, tape.gradient(out.loss, variables)):
        p = by_key[variable_key(v)]
        canon[p.name] = LAYOUTS["keras"].from_stored(p, np.asarray(tf.convert_to_tensor(g)))
    return float(out.loss), canon


def _flax_step(case, head, model, inputs, labels, spec):
    by_key = {LAYOUTS["flax"].key(p): p for p in spec}

    def loss_fn(params):
        out = model(**inputs, params=params)
        return case.flax_loss[head](out, labels, inputs)

    loss, grads = jax.value_and_grad(loss_fn)(model.params)
    canon = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        p = by_key["/".join(k.key for k in path)]
        canon[p.name] = LAYOUTS["flax"].from_stored(p, np.asarray(g))
    return float(loss), canon


@pytest.mark.parametrize("key,head", [(k, h) for k, h in PARAMS if h in CASES[k].labels])
def test_first_training_step_agrees(key, head, checkpoints, load):
    """Loss and every gradient of one step, dropout off: PyTorch = TensorFlow = Flax = transformers."""
    case, fam = CASES[key], get_family(key)
    path = checkpoints(key, head)
    inputs = _inputs(case, head, "padded+token-types")
    labels = case.labels[head](np.random.default_rng(11), inputs["attention_mask"])
    spec = fam.model_spec(_config(case, head), head)
    name = fam.class_name(head)
    results = {
        "pt": _pt_step(getattr(nz_pt, name).from_pretrained(path), inputs, labels),
        "hf": _pt_step(getattr(transformers, name).from_pretrained(path), inputs, labels),
        "tf": _tf_step(load("tf", key, head, path), inputs, labels, spec),
        "flax": _flax_step(case, head, load("flax", key, head, path), inputs, labels, spec),
    }
    ref_loss, ref_grads = results["hf"]
    assert set(ref_grads) == {p.name for p in spec if p.trainable}, "transformers' gradients should cover the spec"
    scale = max(float(np.abs(g).max()) for g in ref_grads.values())
    for b in ("pt", "tf", "flax"):
        loss, grads = results[b]
        assert abs(loss - ref_loss) <= TOLERANCES["loss"], f"{b} loss {loss} vs transformers {ref_loss}"
        assert set(grads) == set(ref_grads), f"{b} gradients differ in coverage: {sorted(set(grads) ^ set(ref_grads))}"
        for n, g in ref_grads.items():
            assert_close(grads[n] / scale, g / scale, TOLERANCES["grad_rel"], f"{b} grad {n} (relative to {scale:.3g})")
