"""PyTorch MPNet (nezha_zoo.pt) against transformers 4.57.6 PyTorch, plus sentence embeddings and API.

Each transformers model is built from a tiny config with a fixed seed, saved with its own
``save_pretrained``, and loaded by our class from that directory; both run in eval mode, float32.
Padding uses id 1 (MPNet's padding row), so the padding-aware positions are exercised.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import nezha_zoo.pt as zoo
from nezha_zoo import MPNetConfig
from nezha_zoo.families.mpnet import relative_position_bucket
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.outputs import SentenceEmbeddingOutput
from nezha_zoo.pt.layers import padding_aware_position_ids, sequential_position_ids
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs
from nezha_zoo.validation import InputError

pytestmark = [pytest.mark.pt, pytest.mark.hf]

HEADS = (
    "Model",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)
WITH_POOLER = ("Model", "ForMultipleChoice")

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
    relative_attention_num_buckets=32,
)
PAD = 1
HIDDEN_FIELDS = {"last_hidden_state", "pooler_output", "hidden_states", "attentions"}

#: Worst difference seen per (head, field), printed at the end of the module (run with -s).
MAX_DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("pt")
    yield
    if MAX_DIFFS:
        width = max(len(k) for k in MAX_DIFFS)
        lines = [f"  {k:<{width}}  {v:.3e}" for k, v in sorted(MAX_DIFFS.items())]
        print("\nmax-abs differences vs transformers:\n" + "\n".join(lines))  # shown with pytest -s


class Pairs:
    """Builds (transformers model, our model, checkpoint dir) once per (head, config) for the module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict = {}

    def get(self, head: str, **overrides):
        key = (head, tuple(sorted(overrides.items())))
        if key not in self.cache:
            kw = {**TINY, **overrides}
            torch.manual_seed(100 + len(self.cache))
            hf = getattr(transformers, f"MPNet{head}")(transformers.MPNetConfig(**kw)).eval()
            with torch.no_grad():  # non-zero biases and LayerNorm affine params, so every term matters
                for name, p in hf.named_parameters():
                    if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                        p.add_(0.1 * torch.randn_like(p))
            path = self.root / f"{head}_{len(self.cache)}"
            hf.save_pretrained(path)
            ours = getattr(zoo, f"MPNet{head}").from_pretrained(path, strict=True)
            self.cache[key] = (hf, ours, path)
        return self.cache[key]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Pairs:
    return Pairs(tmp_path_factory.mktemp("hf_mpnet"))


def inputs_for(head: str, seed: int = 0, seq_len: int = 9, left: bool = False) -> dict:
    """Padded ids (padding id 1) and attention mask ((B, C, L) for multiple choice); right or left padding."""
    choices = 3 if head == "ForMultipleChoice" else None
    arr = tiny_inputs(
        batch=2,
        seq_len=seq_len,
        vocab_size=TINY["vocab_size"],
        type_vocab_size=None,
        seed=seed,
        pad=PAD,
        num_choices=choices,
    )
    if left:  # the padding moves to the front of each row
        arr = {k: np.flip(v, axis=-1).copy() for k, v in arr.items()}
    return {k: torch.from_numpy(v) for k, v in arr.items()}


def _leaves(x, prefix: str):
    if isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def compare(hf_out, our_out, what: str) -> float:
    """Every field of transformers' output equals ours (same fields, same structure, SPEC §5 tolerances)."""
    assert list(our_out.keys()) == list(hf_out.keys()), (
        f"{what}: fields {list(our_out.keys())} vs {list(hf_out.keys())}"
    )
    worst = 0.0
    for field in hf_out.keys():
        tol = TOLERANCES["hidden"] if field in HIDDEN_FIELDS else TOLERANCES["logits"]
        a, b = list(_leaves(hf_out[field], field)), list(_leaves(our_out[field], field))
        assert [n for n, _ in a] == [n for n, _ in b], f"{what}: structure of {field} differs"
        for (name, x), (_, y) in zip(a, b, strict=True):
            d = assert_close(y, x, tol, f"{what} {name}")
            worst = max(worst, d)
            key = f"{what.split('[')[0]}.{field}"
            MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), d)
    return worst


def compare_tuples(hf_tup, our_tup, what: str) -> None:
    assert len(hf_tup) == len(our_tup), f"{what}: tuple lengths {len(hf_tup)} vs {len(our_tup)}"
    for i, (x, y) in enumerate(zip(hf_tup, our_tup, strict=True)):
        if x is None:
            assert y is None, f"{what}[{i}]"
            continue
        for (name, a), (_, b) in zip(_leaves(x, f"[{i}]"), _leaves(y, f"[{i}]"), strict=True):
            assert_close(b, a, TOLERANCES["logits"], f"{what}{name}")


# --- relative attention buckets ------------------------------------------------------------------


def numpy_buckets(relative: np.ndarray, num_buckets: int, max_distance: int = 128) -> np.ndarray:
    """T5's bidirectional bucket formula, written out in numpy (float64 logs) as the reference."""
    half = num_buckets // 2
    n = -relative
    ret = np.where(n < 0, half, 0)
    n = np.abs(n)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        large = max_exact + np.floor(
            np.log(np.maximum(n, 1) / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
        ).astype(np.int64)
    large = np.minimum(large, half - 1)
    return ret + np.where(n < max_exact, n, large)


@pytest.mark.parametrize("num_buckets", [16, 32, 64])
def test_buckets_equal_numpy_formula(num_buckets):
    rel = np.arange(-300, 301)[None, :]
    ours = relative_position_bucket(rel, num_buckets=num_buckets)
    np.testing.assert_array_equal(ours, numpy_buckets(rel, num_buckets))
    assert ours.min() == 0 and ours.max() == num_buckets - 1  # the whole table is used


def test_buckets_equal_transformers_at_32():
    rel = torch.arange(-300, 301)[:, None] - torch.arange(0, 5)[None, :]
    hf = transformers.models.mpnet.modeling_mpnet.MPNetEncoder.relative_position_bucket(rel, num_buckets=32)
    np.testing.assert_array_equal(relative_position_bucket(rel.numpy(), num_buckets=32), hf.numpy())


def test_position_bias_uses_config_buckets(pairs):
    """16 buckets: our bias is table[numpy buckets(16)]; transformers (hard-coded 32) fails (§5.2 D)."""
    hf, ours, _ = pairs.get("Model", relative_attention_num_buckets=16)
    L = 30
    bias = ours.compute_position_bias(L, torch.zeros(1)).detach().numpy()  # (1, heads, L, L)
    table = ours.encoder.relative_attention_bias.weight.detach().numpy()  # (16, heads)
    pos = np.arange(L)
    want = table[numpy_buckets(pos[None, :] - pos[:, None], 16)].transpose(2, 0, 1)[None]
    assert_close(bias, want, 0.0, "bias(16)")
    # transformers with its bucket count set to the config's equals ours on every output ...
    inp = inputs_for("Model", seed=3, seq_len=30)
    enc = hf.encoder
    with torch.no_grad():
        # transformers' hard-coded 32 buckets index rows 16..31 of a 16-row table: it cannot run.
        with pytest.raises(IndexError):
            hf(**inp)
        enc.compute_position_bias = functools.partial(type(enc).compute_position_bias, enc, num_buckets=16)
        try:
            compare(
                hf(**inp, output_attentions=True, output_hidden_states=True),
                ours(**inp, output_attentions=True, output_hidden_states=True),
                "Model(16 buckets)",
            )
        finally:
            del enc.compute_position_bias


def test_position_ids_from_padding():
    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [1, 1, 0, 7, 2, 9]])
    assert padding_aware_position_ids(ids, 1).tolist() == [[2, 3, 4, 5, 1, 1], [1, 1, 2, 3, 4, 5]]
    assert sequential_position_ids((2, 4), 1).tolist() == [[2, 3, 4, 5]] * 2
    hf = transformers.models.mpnet.modeling_mpnet.create_position_ids_from_input_ids(ids, 1)
    assert torch.equal(padding_aware_position_ids(ids, 1), hf)


# --- outputs against transformers ---------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_outputs_match_transformers(pairs, head):
    hf, ours, _ = pairs.get(head)
    flags = dict(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        for left in (False, True):
            inp = inputs_for(head, seed=1, left=left)
            compare(hf(**inp, **flags), ours(**inp, **flags), f"{head}[{'left' if left else 'right'}]")
        inp = inputs_for(head, seed=2)
        compare_tuples(hf(**inp, **flags, return_dict=False), ours(**inp, **flags, return_dict=False), f"{head}[tuple]")
        # defaulted inputs: ids only (no mask, positions from the ids)
        ids = inputs_for(head, seed=3)["input_ids"]
        compare(hf(input_ids=ids), ours(input_ids=ids), f"{head}[defaults]")
        compare_tuples(hf(input_ids=ids, return_dict=False), ours(input_ids=ids, return_dict=False), f"{head}[dtuple]")


@pytest.mark.parametrize("head", ["Model", "ForMultipleChoice", "ForQuestionAnswering"])
def test_inputs_embeds_and_position_ids_match(pairs, head):
    hf, ours, _ = pairs.get(head)
    inp = inputs_for(head, seed=4)
    flags = dict(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        embeds = ours.get_input_embeddings()(inp["input_ids"])  # (B[, C], L, H)
        e_inp = {"inputs_embeds": embeds, "attention_mask": inp["attention_mask"]}
        compare(hf(**e_inp, **flags), ours(**e_inp, **flags), f"{head}[embeds]")
        compare(hf(inputs_embeds=embeds), ours(inputs_embeds=embeds), f"{head}[embeds-defaults]")
        pos = torch.randint(
            0, TINY["max_position_embeddings"], inp["input_ids"].shape, generator=torch.Generator().manual_seed(5)
        )
        compare(hf(**inp, position_ids=pos, **flags), ours(**inp, position_ids=pos, **flags), f"{head}[position_ids]")


def test_head_mask_matches(pairs):
    hf, ours, _ = pairs.get("ForSequenceClassification")
    inp = inputs_for("ForSequenceClassification", seed=6)
    for hm in (torch.tensor([1.0, 0.0, 1.0, 0.5]), torch.rand(2, 4, generator=torch.Generator().manual_seed(7))):
        with torch.no_grad():
            compare(
                hf(**inp, head_mask=hm, output_attentions=True),
                ours(**inp, head_mask=hm, output_attentions=True),
                "SeqCls[head_mask]",
            )


LOSS_CASES = [
    ("ForMaskedLM", {}, "mlm"),
    ("ForSequenceClassification", {"num_labels": 3}, "single"),
    ("ForSequenceClassification", {"num_labels": 1}, "regression"),
    ("ForSequenceClassification", {"num_labels": 3, "problem_type": "multi_label_classification"}, "multi"),
    ("ForMultipleChoice", {}, "mc"),
    ("ForTokenClassification", {"num_labels": 5}, "token"),
    ("ForQuestionAnswering", {}, "qa"),
]


@pytest.mark.parametrize("head,overrides,kind", LOSS_CASES)
def test_losses_match_transformers(pairs, head, overrides, kind):
    hf, ours, _ = pairs.get(head, **overrides)
    inp = inputs_for(head, seed=8)
    g = torch.Generator().manual_seed(9)
    B, L = 2, inp["input_ids"].shape[-1]
    if kind == "mlm":
        labels = torch.randint(0, TINY["vocab_size"], (B, L), generator=g)
        labels[0, :3] = -100
        extra = {"labels": labels}
    elif kind == "single":
        extra = {"labels": torch.tensor([0, 2])}
    elif kind == "regression":
        extra = {"labels": torch.tensor([0.5, -1.25])}
    elif kind == "multi":
        extra = {"labels": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])}
    elif kind == "mc":
        extra = {"labels": torch.tensor([2, 0])}
    elif kind == "token":
        labels = torch.randint(0, 5, (B, L), generator=g)
        labels[inp["attention_mask"] == 0] = -100
        extra = {"labels": labels}
    else:  # qa: one end position outside the sequence is clamped and ignored
        extra = {"start_positions": torch.tensor([1, 3]), "end_positions": torch.tensor([4, 50])}
    with torch.no_grad():
        a, b = hf(**inp, **extra), ours(**inp, **extra)
        compare(a, b, f"{head}[loss-{kind}]")
        assert b.loss is not None and torch.isfinite(b.loss)
        compare_tuples(hf(**inp, **extra, return_dict=False), ours(**inp, **extra, return_dict=False), f"{kind}[tuple]")


# --- sentence embeddings -------------------------------------------------------------------------


def numpy_mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling + Normalize, in float64 numpy."""
    m = mask.astype(np.float64)[:, :, None]
    pooled = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


@pytest.mark.parametrize("left", [False, True])
def test_encode_equals_numpy_reference_from_transformers(pairs, left):
    hf, ours, _ = pairs.get("Model")
    inp = inputs_for("Model", seed=10, left=left)
    with torch.no_grad():
        hf_last = hf(**inp).last_hidden_state.numpy()
        out = ours.encode(inp["input_ids"], inp["attention_mask"])
    assert isinstance(out, SentenceEmbeddingOutput)
    want = numpy_mean_pool(hf_last, inp["attention_mask"].numpy())
    assert_close(out.embeddings, want, TOLERANCES["hidden"], "encode")
    assert_close(out.last_hidden_state, hf_last, TOLERANCES["hidden"], "encode last_hidden_state")
    np.testing.assert_allclose(np.linalg.norm(out.embeddings.numpy(), axis=1), 1.0, atol=1e-6)
    # not normalised: the plain masked mean
    m = inp["attention_mask"].numpy()[:, :, None]
    raw = ours.encode(inp["input_ids"], inp["attention_mask"], normalize=False).embeddings.detach().numpy()
    assert_close(raw, (hf_last * m).sum(1) / m.sum(1), TOLERANCES["hidden"], "encode(normalize=False)")
    # any MPNet class encodes with its base model
    _, mlm, _ = pairs.get("ForMaskedLM")
    with torch.no_grad():
        base_last = mlm.mpnet(**inp).last_hidden_state.numpy()
        assert_close(
            mlm.encode(inp["input_ids"], inp["attention_mask"]).embeddings,
            numpy_mean_pool(base_last, inp["attention_mask"].numpy()),
            TOLERANCES["hidden"],
            "mlm.encode",
        )


def test_mean_pool_edge_cases():
    h = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(11))
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = zoo.mean_pool(h, mask)
    assert out.shape == (3, 5)
    assert torch.equal(out[1], torch.zeros(5))  # no token: zeros, not NaN
    assert_close(out, numpy_mean_pool(h.numpy(), mask.numpy()), TOLERANCES["hidden"], "mean_pool")
    assert_close(zoo.mean_pool(h, None), numpy_mean_pool(h.numpy(), np.ones((3, 4))), TOLERANCES["hidden"], "no mask")
    assert torch.equal(zoo.mean_pool(torch.zeros(1, 2, 5), torch.ones(1, 2)), torch.zeros(1, 5))  # eps guard
    with pytest.raises(InputError, match="attention_mask"):
        zoo.mean_pool(h, mask[:, :3])
    with pytest.raises(InputError, match="last_hidden_state"):
        zoo.mean_pool(h[0], mask[0])


def test_example_runs_and_embeds(monkeypatch):
    path = Path(__file__).resolve().parents[2] / "examples" / "sentence_embeddings_mpnet.py"
    spec = importlib.util.spec_from_file_location("sentence_embeddings_mpnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(backends=("pt",))
    emb = results["pt"]
    assert emb.shape == (len(module.SENTENCES), 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    sims = emb @ emb.T
    assert sims[0, 1] == max(sims[i, j] for i in range(4) for j in range(4) if i < j)  # the near-duplicate pair
    # the same checkpoint loaded directly gives the same embeddings
    ids, mask = module.batch()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model = zoo.MPNetModel.from_pretrained(module.make_checkpoint(Path(tmp) / "ck"), strict=True)
        with torch.no_grad():
            again = model.encode(torch.from_numpy(ids), torch.from_numpy(mask)).embeddings.numpy()
    assert_close(again, emb, 0.0, "example embeddings")


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_saved_checkpoint_loads_in_transformers(tmp_path, head):
    torch.manual_seed(20)
    model = getattr(zoo, f"MPNet{head}")(MPNetConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    hf, info = getattr(transformers, f"MPNet{head}").from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    inp = inputs_for(head, seed=21)
    with torch.no_grad():
        compare(hf.eval()(**inp), model(**inp), f"{head}[saved]")
    back = getattr(zoo, f"MPNet{head}").from_pretrained(tmp_path, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    if head == "ForMaskedLM":
        assert back.lm_head.decoder.weight is back.mpnet.embeddings.word_embeddings.weight
        assert back.lm_head.decoder.bias is back.lm_head.bias
        assert back.get_output_embeddings() is back.lm_head.decoder


def test_base_into_head_and_head_into_base(pairs):
    hf_base, _, base_dir = pairs.get("Model")
    head, info = zoo.MPNetForSequenceClassification.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == [
        "classifier.dense.bias",
        "classifier.dense.weight",
        "classifier.out_proj.bias",
        "classifier.out_proj.weight",
    ]
    assert sorted(info["unexpected_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]  # no pooler in SeqCls
    for k, v in head.mpnet.state_dict().items():
        assert torch.equal(hf_base.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="classifier"):
        zoo.MPNetForSequenceClassification.from_pretrained(base_dir, strict=True)
    mc, info = zoo.MPNetForMultipleChoice.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert info["unexpected_keys"] == []
    assert torch.equal(mc.mpnet.pooler.dense.weight, hf_base.pooler.dense.weight)

    hf_mlm, _, mlm_dir = pairs.get("ForMaskedLM")
    base, info = zoo.MPNetModel.from_pretrained(mlm_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert sorted(info["unexpected_keys"]) == [
        "lm_head.bias",
        "lm_head.dense.bias",
        "lm_head.dense.weight",
        "lm_head.layer_norm.bias",
        "lm_head.layer_norm.weight",
    ]
    inp = inputs_for("Model", seed=25)
    with torch.no_grad():
        assert_close(base(**inp).last_hidden_state, hf_mlm.mpnet(**inp).last_hidden_state, TOLERANCES["hidden"], "h->b")


def test_shape_mismatch_names_the_tensor(pairs):
    _, _, path = pairs.get("ForTokenClassification")
    with pytest.raises(CheckpointError, match=r"mpnet\.embeddings\.word_embeddings\.weight.*\(99, 32\).*\(100, 32\)"):
        zoo.MPNetForTokenClassification.from_pretrained(path, vocab_size=100)


# --- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_variables_equal_spec(pairs, head):
    hf, ours, _ = pairs.get(head)
    spec = ours.spec
    layout = LAYOUTS["pt"]
    declared = {layout.key(p) for p in spec}
    assert set(dict(ours.named_parameters()).keys()) == declared
    assert set(ours.state_dict().keys()) == declared | set(spec.ties)
    assert set(ours.state_dict().keys()) == set(hf.state_dict().keys())
    has_pooler = any("pooler" in k for k in ours.state_dict())
    assert has_pooler == (head in WITH_POOLER)
    assert sum(k.endswith("relative_attention_bias.weight") for k in ours.state_dict()) == 1  # shared by all layers
    assert any(".attention.attn.o.weight" in k for k in ours.state_dict())
    for p in spec:
        assert tuple(ours.get_parameter(layout.key(p)).shape) == layout.shape(p)
    for alias, target in spec.ties.items():
        assert ours.get_parameter(alias) is ours.get_parameter(target)
    assert ours.num_parameters() == spec.num_parameters() == hf.num_parameters()
    no_pool = zoo.MPNetModel(MPNetConfig(**TINY), add_pooling_layer=False)
    assert not any(k.startswith("pooler") for k in no_pool.state_dict())


def test_padding_rows_get_no_gradient():
    torch.manual_seed(0)
    model = zoo.MPNetModel(MPNetConfig(**TINY))
    ids = torch.tensor([[0, 5, 1, 1]])
    # A fixed random projection: the plain sum of a LayerNorm output has a zero gradient up to rounding,
    # so the last check would depend on the rounding left by whatever ran before.
    weights = torch.randn(TINY["hidden_size"], generator=torch.Generator().manual_seed(1))
    (model(input_ids=ids).last_hidden_state * weights).sum().backward()
    assert torch.all(model.embeddings.word_embeddings.weight.grad[PAD] == 0)
    assert torch.all(model.embeddings.position_embeddings.weight.grad[PAD] == 0)
    assert model.embeddings.word_embeddings.weight.grad[5].abs().sum() > 0


def test_bad_inputs_raise_input_error(pairs):
    _, ours, _ = pairs.get("ForSequenceClassification")
    ids = inputs_for("Model", seed=30)["input_ids"]
    with pytest.raises(InputError, match="vocabulary"):
        ours(input_ids=torch.full((1, 4), 99))
    with pytest.raises(InputError, match="vocabulary"):
        ours(input_ids=torch.tensor([[0, -1, 2]]))
    with pytest.raises(InputError, match="max_position_embeddings - 2"):
        ours(input_ids=torch.full((1, 39), 5))  # 40 positions, 2 of them before the first token
    ours(input_ids=torch.full((1, 38), 5))  # the longest input runs
    with pytest.raises(InputError, match="max_position_embeddings - 2"):
        ours(inputs_embeds=torch.zeros(1, 39, 32))
    with pytest.raises(InputError, match="attention_mask"):
        ours(input_ids=ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(InputError, match="position_ids"):
        ours(input_ids=ids, position_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="position_ids"):
        ours(input_ids=ids, position_ids=torch.full(ids.shape, 40))
    with pytest.raises(InputError, match="either"):
        ours(input_ids=ids, inputs_embeds=torch.zeros(2, 9, 32))
    with pytest.raises(InputError, match="inputs_embeds"):
        ours(inputs_embeds=torch.zeros(2, 9, 31))
    with pytest.raises(InputError, match="integers"):
        ours(input_ids=ids.float())
    _, mc, _ = pairs.get("ForMultipleChoice")
    with pytest.raises(InputError, match="rank 3"):
        mc(input_ids=ids)
    with pytest.raises(TypeError, match="token_type_ids"):
        ours(input_ids=ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(InputError):
        ours.encode(ids, torch.ones(2, 4))


# --- training ------------------------------------------------------------------------------------


def test_training_step_gradients_match_transformers_and_loss_falls(tmp_path):
    kw = dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    torch.manual_seed(31)
    hf = transformers.MPNetForSequenceClassification(transformers.MPNetConfig(**kw))
    hf.save_pretrained(tmp_path)
    ours = zoo.MPNetForSequenceClassification.from_pretrained(tmp_path)
    hf.train()
    ours.train()
    inp = inputs_for("ForSequenceClassification", seed=32)
    labels = torch.tensor([1, 2])
    hf(**inp, labels=labels).loss.backward()
    loss0 = ours(**inp, labels=labels).loss
    loss0.backward()
    hf_grads = dict(hf.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in ours.parameters() if p.grad is not None)
    for name, p in ours.named_parameters():
        assert_close(p.grad / scale, hf_grads[name].grad / scale, TOLERANCES["grad_rel"], f"grad {name}")
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    losses = [float(loss0.detach())]
    for _ in range(15):
        opt.step()
        opt.zero_grad()
        loss = ours(**inp, labels=labels).loss
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_gradient_checkpointing_same_gradients():
    cfg = MPNetConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(40)
    model = zoo.MPNetForMaskedLM(cfg).train()
    inp = inputs_for("ForMaskedLM", seed=41)
    labels = inp["input_ids"].clone()

    def grads():
        model.zero_grad()
        model(**inp, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    ckpt = grads()
    for n in plain:
        assert_close(ckpt[n], plain[n], 1e-6, n)
