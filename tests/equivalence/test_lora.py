"""LoRA adapters (issue #21): targets from the spec, the three backends, PEFT's format both ways.

One tiny Electra checkpoint is loaded by every backend and by transformers.  An adapter saved by any
backend loads into every other (and into ``peft.PeftModel`` over transformers), and a PEFT-saved
adapter loads into every backend, each with hidden states equal to the adapter owner's (and to its
merged model) within SPEC.md §5's hidden tolerance.  One training step in each framework changes the
adapter alone.  Bad input raises a clear error and changes nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import keras  # noqa: E402
import optax  # noqa: E402

import nezha_zoo.flax as nz_flax  # noqa: E402
import nezha_zoo.pt as nz_pt  # noqa: E402
import nezha_zoo.tf as nz_tf  # noqa: E402
from nezha_zoo import ElectraConfig, MPNetConfig, MptConfig  # noqa: E402
from nezha_zoo.adapters import ADAPTER_CONFIG_NAME, LoraConfig, lora_targets, write_adapter  # noqa: E402
from nezha_zoo.io.errors import CheckpointError  # noqa: E402
from nezha_zoo.spec import get_family  # noqa: E402
from nezha_zoo.testing import (  # noqa: E402
    TOLERANCES,
    assert_close,
    foreign_destination_lock,
    op_by_op,
    pin_precision,
    tiny_inputs,
    to_numpy,
)

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax, pytest.mark.hf]

for _fw in ("pt", "tf", "flax"):
    pin_precision(_fw)

TINY = dict(
    vocab_size=99,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
    embedding_size=8,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
TOL = TOLERANCES["hidden"]
INPUTS = {k: v for k, v in tiny_inputs(vocab_size=99, seed=3).items()}
CLASSES = {"pt": nz_pt.ElectraModel, "tf": nz_tf.TFElectraModel, "flax": nz_flax.FlaxElectraModel}


def hidden(fw: str, model) -> np.ndarray:
    if fw == "pt":
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in INPUTS.items()}).last_hidden_state.numpy()
    if fw == "hf":
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in INPUTS.items()}).last_hidden_state.numpy()
    return to_numpy(model(**INPUTS).last_hidden_state)


def randomize_b(fw: str, model, seed: int) -> None:
    """Non-zero B (a fresh adapter is the identity), drawn in canonical shapes."""
    rng = np.random.default_rng(seed)
    weights = {
        m: (a, rng.normal(0, 0.5, size=b.shape).astype(np.float32)) for m, (a, b) in model.lora_weights().items()
    }
    if fw == "pt":
        layers = model._lora_layers()
        with torch.no_grad():
            for m, (_, b) in weights.items():
                layers[m].lora_B.weight.copy_(torch.from_numpy(b))
    elif fw == "tf":
        for m, (_, b) in weights.items():
            model._lora_layer_map[m].lora_kernel_b.assign(b.T)
    else:
        lora = jax.tree_util.tree_map(np.asarray, model.lora_params)
        from flax.traverse_util import flatten_dict, unflatten_dict

        flat = flatten_dict(lora)
        for t in model._lora_targets:
            path = tuple(t.module.split(".")) + ("lora_B", "kernel")
            flat[path] = weights[t.module][1].T
        model.lora_params = unflatten_dict(flat)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("lora") / "base"
    nz_pt.ElectraModel(ElectraConfig(**TINY)).save_pretrained(d)
    return d


def load(fw: str, base_dir):
    if fw == "hf":
        return transformers.ElectraModel.from_pretrained(base_dir).eval()
    return CLASSES[fw].from_pretrained(base_dir)


@pytest.fixture(scope="module")
def saved(base_dir, tmp_path_factory):
    """Per backend: (adapter dir, hidden states with the adapter, hidden states of the base model)."""
    out = {}
    for i, fw in enumerate(("pt", "tf", "flax")):
        model = load(fw, base_dir)
        plain = hidden(fw, model)
        model.enable_lora(4, alpha=8, target_modules=["query", "value", "ffn"])
        randomize_b(fw, model, seed=i)
        with_adapter = hidden(fw, model)
        assert np.abs(with_adapter - plain).max() > 1e-3  # the adapter changes the outputs
        model.merge_lora()
        assert_close(hidden(fw, model), with_adapter, TOL, f"{fw} merged")
        model.unmerge_lora()
        assert_close(hidden(fw, model), with_adapter, TOL, f"{fw} unmerged")
        d = tmp_path_factory.mktemp(f"adapter_{fw}")
        model.save_adapter(d)
        out[fw] = (d, with_adapter, plain)
    return out


# --- targets --------------------------------------------------------------------------------------


def test_targets_by_name_role_and_regex():
    electra = get_family("electra").model_spec(ElectraConfig(**TINY), "ForMaskedLM")
    leaves = lambda ts: sorted({t.module.rpartition(".")[2] for t in ts})  # noqa: E731
    assert leaves(lora_targets(electra, ["qkv"])) == ["key", "query", "value"]
    assert len(lora_targets(electra, ["qkv"])) == 6
    assert [t.module for t in lora_targets(electra, ["attention_output"])] == [
        f"electra.encoder.layer.{i}.attention.output.dense" for i in range(2)
    ]
    assert len(lora_targets(electra, ["ffn"])) == 4 and len(lora_targets(electra, ["ffn_in"])) == 2
    assert len(lora_targets(electra, ["attention.self.query"])) == 2
    assert [t.module for t in lora_targets(electra, r".*layer\.1\.attention\.self\.value")] == [
        "electra.encoder.layer.1.attention.self.value"
    ]
    mpt = get_family("mpt").model_spec(MptConfig(d_model=16, n_heads=2, n_layers=2, vocab_size=50), "Model")
    assert [t.module for t in lora_targets(mpt, ["qkv"])] == ["blocks.0.attn.Wqkv", "blocks.1.attn.Wqkv"]
    assert lora_targets(mpt, ["Wqkv"]) == lora_targets(mpt, ["qkv"])
    with pytest.raises(ValueError, match=r"\['nope'\].*dense module names: .*'query'.*roles: .*'qkv'"):
        lora_targets(electra, ["query", "nope"])
    assert LoraConfig(r=4, lora_alpha=8).scaling == 2.0
    assert LoraConfig(r=4, lora_alpha=8, use_rslora=True).scaling == 4.0


@pytest.mark.parametrize("fw", ["pt", "tf", "flax"])
def test_bad_rank_and_targets_change_nothing(fw, base_dir):
    model = load(fw, base_dir)
    before = hidden(fw, model)
    for kwargs, match in [
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(rank=2, target_modules=["nope"]), "match no dense layer.*query"),
        (dict(rank=2, dropout=1.5), "lora_dropout"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.enable_lora(**kwargs)
        assert model.lora_config is None
    with op_by_op(model):  # ``before`` ran op by op; Flax compiles a signature at its second call
        np.testing.assert_array_equal(hidden(fw, model), before)
    with pytest.raises(ValueError, match="has no LoRA adapter"):
        model.merge_lora()


# --- portability ----------------------------------------------------------------------------------


def test_saved_config_is_peft_lora(saved):
    body = json.loads((saved["pt"][0] / ADAPTER_CONFIG_NAME).read_text())
    assert body["peft_type"] == "LORA" and body["r"] == 4 and body["lora_alpha"] == 8
    assert body["bias"] == "none" and body["fan_in_fan_out"] is False and body["modules_to_save"] is None
    assert body["use_rslora"] is False
    # "dense" would also select attention.output.dense, so the paths inside the base model are written
    mods = ("attention.self.query", "attention.self.value", "intermediate.dense", "output.dense")
    assert body["target_modules"] == sorted(f"encoder.layer.{i}.{m}" for i in range(2) for m in mods)


@pytest.mark.parametrize("src", ["pt", "tf", "flax"])
def test_adapter_loads_in_every_backend_and_peft(src, saved, base_dir):
    adapter, want, _ = saved[src]
    for dst in ("pt", "tf", "flax"):
        if dst == src:
            continue
        model = load(dst, base_dir)
        model.load_adapter(adapter)
        assert_close(hidden(dst, model), want, TOL, f"{src} adapter in {dst}")
        model.merge_lora()
        assert_close(hidden(dst, model), want, TOL, f"{src} adapter in {dst}, merged")
    hf = peft.PeftModel.from_pretrained(load("hf", base_dir), adapter).eval()
    assert_close(hidden("hf", hf), want, TOL, f"{src} adapter in PEFT")


def test_peft_saved_adapter_loads_in_every_backend(base_dir, tmp_path):
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["key", "output.dense"], init_lora_weights=False)
    hf = peft.get_peft_model(load("hf", base_dir), cfg).eval()
    want = hidden("hf", hf)
    hf.save_pretrained(tmp_path)
    for fw in ("pt", "tf", "flax"):
        model = load(fw, base_dir)
        model.load_adapter(tmp_path)
        assert model.lora_config.r == 3 and model.lora_config.scaling == 5 / 3
        assert_close(hidden(fw, model), want, TOL, f"PEFT adapter in {fw}")
        out = tmp_path.parent / f"resaved_{fw}"
        model.save_adapter(out)
        back = peft.PeftModel.from_pretrained(load("hf", base_dir), out).eval()
        assert_close(hidden("hf", back), want, TOL, f"PEFT -> {fw} -> PEFT")


def test_adapter_into_base_and_head_classes(saved, base_dir, tmp_path):
    """An adapter saved by the base class loads into a head class (paths under the base prefix) and back."""
    adapter, want, _ = saved["pt"]
    head = nz_pt.ElectraForMaskedLM.from_pretrained(base_dir)
    head.load_adapter(adapter)
    with torch.no_grad():
        got = head.electra(**{k: torch.from_numpy(v) for k, v in INPUTS.items()}).last_hidden_state.numpy()
    assert_close(got, want, TOL, "base adapter in head class")
    head.save_adapter(tmp_path)
    base = nz_pt.ElectraModel.from_pretrained(base_dir)
    base.load_adapter(tmp_path)
    assert_close(hidden("pt", base), want, TOL, "head adapter in base class")


# --- bad adapters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fw", ["pt", "tf", "flax"])
def test_bad_adapters_change_nothing(fw, saved, base_dir, tmp_path):
    model = load(fw, base_dir)
    before = hidden(fw, model)
    mpnet = get_family("mpnet").model_spec(
        MPNetConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24),
        "Model",
    )
    q = "encoder.layer.0.attention.attn.q"
    write_adapter(
        tmp_path / "mpnet", LoraConfig(r=2, lora_alpha=2), mpnet, "mpnet", {q: (np.ones((2, 16)), np.ones((16, 2)))}
    )
    wide = get_family("electra").model_spec(ElectraConfig(**{**TINY, "hidden_size": 32}), "Model")
    query = "encoder.layer.0.attention.self.query"
    write_adapter(
        tmp_path / "wide", LoraConfig(r=2, lora_alpha=2), wide, "electra", {query: (np.ones((2, 32)), np.ones((32, 2)))}
    )
    bias = tmp_path / "bias"
    os.makedirs(bias)
    for name in os.listdir(saved["pt"][0]):
        (bias / name).write_bytes((saved["pt"][0] / name).read_bytes())
    body = json.loads((bias / ADAPTER_CONFIG_NAME).read_text())
    (bias / ADAPTER_CONFIG_NAME).write_text(json.dumps({**body, "bias": "all"}))
    cases = [
        (tmp_path / "mpnet", "made for family 'mpnet'"),
        (tmp_path / "wide", r"lora_A \(2, 32\).*needs \(2, 16\)"),
        (bias, "bias='all' is not supported"),
        (tmp_path / "missing", "no adapter_config.json"),
    ]
    for path, match in cases:
        with pytest.raises(CheckpointError, match=match):
            model.load_adapter(path)
        assert model.lora_config is None
    with op_by_op(model):  # ``before`` ran op by op; Flax compiles a signature at its second call
        np.testing.assert_array_equal(hidden(fw, model), before)
    model.load_adapter(saved[fw][0])
    lora = model.lora_weights()
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        model.load_adapter(saved["pt"][0])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        model.enable_lora(2)
    for m, (a, b) in model.lora_weights().items():
        np.testing.assert_array_equal(a, lora[m][0])
        np.testing.assert_array_equal(b, lora[m][1])


# --- training -------------------------------------------------------------------------------------


def test_pt_training_step_changes_only_the_adapter(base_dir):
    model = load("pt", base_dir)
    n = model.enable_lora(2, target_modules=["qkv"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert n == sum(p.numel() for p in trainable) == 6 * (2 * 16 + 16 * 2)  # 2 layers x q/k/v
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    out = model(**{k: torch.from_numpy(v) for k, v in INPUTS.items()}).last_hidden_state
    out.pow(2).mean().backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert sum(s.numel() for st in opt.state.values() for s in st.values() if s.ndim) == 2 * n


def test_tf_fit_trains_only_the_adapter(base_dir):
    keras.utils.set_random_seed(0)
    model = nz_tf.TFElectraForSequenceClassification.from_pretrained(base_dir)
    n = model.enable_lora(2, alpha=4)
    assert n == sum(int(np.prod(v.shape)) for v in model.trainable_weights) == 6 * 2 * (16 + 16)
    assert all("lora_kernel" in v.path for v in model.trainable_weights)
    before = {v.path: np.array(v.numpy()) for v in model.weights}
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    ids = INPUTS["input_ids"]
    model.fit(
        {"input_ids": ids, "attention_mask": INPUTS["attention_mask"], "labels": np.array([0, 1])}, epochs=1, verbose=0
    )
    changed = {v.path for v in model.weights if not np.array_equal(before[v.path], v.numpy())}
    assert changed and all("lora_kernel" in p for p in changed), changed


def test_flax_grad_and_optax_state_hold_only_the_adapter(base_dir):
    model = load("flax", base_dir)
    n = model.enable_lora(2, target_modules=["value"])
    params = model.params
    lora = model.lora_params
    tx = optax.adam(1e-2)
    state = tx.init(lora)
    assert sum(np.size(x) for x in jax.tree_util.tree_leaves(state)) == 2 * n + 1  # mu, nu and the count

    def loss_fn(lora):
        return (model(**INPUTS, params=model.apply_lora(params, lora)).last_hidden_state ** 2).mean()

    grads = jax.grad(loss_fn)(lora)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(lora)
    updates, state = tx.update(grads, state, lora)
    model.lora_params = optax.apply_updates(lora, updates)
    old_b = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(lora) if "lora_B" in str(p)]
    new_b = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(model.lora_params) if "lora_B" in str(p)]
    assert len(new_b) == 2 and all(not np.array_equal(a, b) for a, b in zip(old_b, new_b))  # B starts at 0
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), params, model.params))
    assert np.isfinite(float(loss_fn(model.lora_params)))


# --- nezha-zoo merge ------------------------------------------------------------------------------


def test_merge_command_writes_the_merged_checkpoint(saved, base_dir, tmp_path, capsys):
    from nezha_zoo.cli.main import main

    adapter, want, _ = saved["flax"]
    out = tmp_path / "merged"
    with foreign_destination_lock(out):
        assert main(["merge", str(base_dir), str(adapter), str(out), "-q"]) == 2
    assert "nezha-zoo: error:" in capsys.readouterr().err and not os.path.exists(out / "model.safetensors")
    assert main(["merge", str(base_dir), str(tmp_path / "nothing"), str(out), "-q"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err and not os.path.exists(out / "model.safetensors")
    assert main(["merge", str(base_dir), str(adapter), str(out), "-q"]) == 0
    merged = nz_pt.ElectraModel.from_pretrained(out, strict=True)
    assert merged.lora_config is None
    assert_close(hidden("pt", merged), want, TOL, "nezha-zoo merge")


def test_mpt_fused_wqkv_adapter_pt_flax_peft(tmp_path):
    """MPT's fused ``Wqkv`` (role ``qkv``): PyTorch's adapter in Flax and in PEFT over transformers."""
    torch.manual_seed(0)
    cfg = MptConfig(d_model=16, n_heads=2, n_layers=2, vocab_size=99, max_seq_len=16, pad_token_id=0)
    nz_pt.MptModel(cfg).save_pretrained(tmp_path / "base")
    inputs = {k: INPUTS[k] for k in ("input_ids", "attention_mask")}
    model = nz_pt.MptModel.from_pretrained(tmp_path / "base")
    model.enable_lora(2, alpha=3)
    assert sorted(model._lora_layers()) == ["blocks.0.attn.Wqkv", "blocks.1.attn.Wqkv"]
    randomize_b("pt", model, seed=5)
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).last_hidden_state.numpy()
    model.save_adapter(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())["target_modules"] == ["Wqkv"]
    flax_model = nz_flax.FlaxMptModel.from_pretrained(tmp_path / "base")
    flax_model.load_adapter(tmp_path / "adapter")
    assert_close(to_numpy(flax_model(**inputs).last_hidden_state), want, TOL, "MPT adapter in Flax")
    hf = peft.PeftModel.from_pretrained(transformers.MptModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        got = hf.eval()(**{k: torch.from_numpy(v) for k, v in inputs.items()}).last_hidden_state.numpy()
    assert_close(got, want, TOL, "MPT adapter in PEFT")


def test_example_flax_trained_adapter_served_by_pytorch_and_peft(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "lora_flax_to_pt.py")
    spec = importlib.util.spec_from_file_location("lora_flax_to_pt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(steps=30, workdir=str(tmp_path))
    assert np.mean(result["losses"][-3:]) < np.mean(result["losses"][:3]), result["losses"]
    for server in ("pt", "peft"):
        assert_close(result[server], result["flax"], TOLERANCES["logits"], f"Flax-trained adapter in {server}")
        np.testing.assert_array_equal(result[server].argmax(-1), result["flax"].argmax(-1))


def test_flax_generate_uses_the_adapter(tmp_path):
    torch.manual_seed(0)
    cfg = MptConfig(d_model=16, n_heads=2, n_layers=2, vocab_size=99, max_seq_len=16, pad_token_id=0)
    nz_pt.MptForCausalLM(cfg).save_pretrained(tmp_path)
    model = nz_flax.FlaxMptForCausalLM.from_pretrained(tmp_path)
    prompt = INPUTS["input_ids"][:, :3]
    plain = np.asarray(model.generate(prompt, max_new_tokens=6))
    model.enable_lora(4, alpha=64, target_modules=["qkv", "ffn"])
    randomize_b("flax", model, seed=2)
    adapted = np.asarray(model.generate(prompt, max_new_tokens=6))
    assert not np.array_equal(adapted, plain)  # the adapter changes the greedy tokens
    model.merge_lora()
    np.testing.assert_array_equal(np.asarray(model.generate(prompt, max_new_tokens=6)), adapted)


@pytest.mark.parametrize("fw", ["pt", "tf", "flax"])
def test_save_pretrained_with_an_adapter_writes_base_then_merged_weights(fw, saved, base_dir, tmp_path):
    _, want, plain = saved[fw]
    model = load(fw, base_dir)
    model.load_adapter(saved[fw][0])
    model.save_pretrained(tmp_path / "base")
    assert_close(hidden("pt", nz_pt.ElectraModel.from_pretrained(tmp_path / "base", strict=True)), plain, TOL, fw)
    model.merge_lora()
    model.save_pretrained(tmp_path / "merged")
    assert_close(hidden("pt", nz_pt.ElectraModel.from_pretrained(tmp_path / "merged", strict=True)), want, TOL, fw)
