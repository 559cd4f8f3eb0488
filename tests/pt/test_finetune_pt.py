"""Fine-tuning ergonomics in PyTorch (issue #20): new heads, config overrides, resizing, ecosystem hooks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from nezha_zoo import ElectraConfig
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.pt import ElectraForSequenceClassification

CFG = ElectraConfig(
    vocab_size=40, embedding_size=8, hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
)


@pytest.fixture(scope="module")
def two_label_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("two_labels")
    torch.manual_seed(0)
    ElectraForSequenceClassification(CFG).save_pretrained(d)
    return d


def test_new_head_with_ignore_mismatched_sizes(two_label_dir, caplog):
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True"):
        ElectraForSequenceClassification.from_pretrained(two_label_dir, num_labels=3)
    old = ElectraForSequenceClassification.from_pretrained(two_label_dir)
    with caplog.at_level(logging.WARNING, logger="nezha_zoo"):
        new, info = ElectraForSequenceClassification.from_pretrained(
            two_label_dir, num_labels=3, ignore_mismatched_sizes=True, output_loading_info=True
        )
    assert "classifier.out_proj.weight (checkpoint (2, 12), model (3, 12))" in caplog.text
    assert info["mismatched_keys"] == [
        ("classifier.out_proj.weight", (2, 12), (3, 12)),
        ("classifier.out_proj.bias", (2,), (3,)),
    ]
    assert new.config.num_labels == 3 and new.classifier.out_proj.weight.shape == (3, 12)
    assert torch.all(new.classifier.out_proj.bias == 0)  # the spec's init: zero bias, N(0, 0.02) weight
    assert 0.005 < float(new.classifier.out_proj.weight.detach().std()) < 0.05
    for (name, a), b in zip(old.state_dict().items(), new.state_dict().values()):
        if not name.startswith("classifier.out_proj"):
            assert torch.equal(a, b), name  # the body is the pretrained one


def test_unknown_keyword_raises_type_error(two_label_dir):
    with pytest.raises(TypeError, match="'num_label'.*did you mean 'num_labels'"):
        ElectraForSequenceClassification.from_pretrained(two_label_dir, num_label=3)
    with pytest.raises(TypeError, match="does not take 'device_map'"):
        ElectraForSequenceClassification.from_pretrained(two_label_dir, device_map="auto")


# --- resize_token_embeddings -------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["ElectraForMaskedLM", "MptForCausalLM"])
def test_resize_token_embeddings_keeps_rows_ties_heads_and_round_trips(tmp_path, cls_name):
    import nezha_zoo.pt as zpt
    from nezha_zoo import MptConfig

    cls = getattr(zpt, cls_name)
    cfg = CFG.copy() if cls_name.startswith("Electra") else MptConfig(vocab_size=40, d_model=16, n_heads=2, n_layers=1)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = torch.tensor([[1, 5, 7, 39]])
    before = model(ids).logits
    old_emb = model.get_input_embeddings().weight.detach().clone()
    emb = model.resize_token_embeddings(45, pad_to_multiple_of=8)
    assert isinstance(emb, torch.nn.Embedding) and emb is model.get_input_embeddings()
    assert emb.weight.shape[0] == 48 == model.config.vocab_size and emb.num_embeddings == 48
    assert torch.equal(emb.weight[:40], old_emb)
    out = model.get_output_embeddings()
    assert out.weight is emb.weight and out.out_features == 48  # the tied head follows
    after = model(ids).logits
    assert after.shape[-1] == 48
    torch.testing.assert_close(after[..., :40], before)  # old tokens score as before
    model.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path, strict=True)
    torch.testing.assert_close(again(ids).logits, after)
    model.resize_token_embeddings(30)  # shrinking keeps the first rows
    assert model.config.vocab_size == 30 and torch.equal(model.get_input_embeddings().weight, old_emb[:30])
    with pytest.raises(ValueError, match="new_num_tokens must be a positive integer"):
        model.resize_token_embeddings(0)


# --- what the PyTorch ecosystem looks for --------------------------------------------------------


def test_ecosystem_attributes():
    from nezha_zoo.pt import ElectraForCausalLM, ElectraModel

    model = ElectraForSequenceClassification(CFG)
    assert model.main_input_name == "input_ids" and model.supports_gradient_checkpointing
    assert model._no_split_modules == ["BertLayer"] and model.base_model_prefix == "electra"
    assert model.can_generate() is False and ElectraForCausalLM.can_generate() is True
    assert model.config.use_return_dict is True and model.dtype == torch.float32 and model.device.type == "cpu"
    base = ElectraModel(CFG)
    assert base.get_output_embeddings() is None
    new = torch.nn.Embedding(40, 8)
    base.set_input_embeddings(new)
    assert base.get_input_embeddings() is new


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1, 40, (4, 6), generator=g), "labels": torch.tensor([0, 1, 1, 0])}


def test_peft_lora_trains_only_adapters(batch):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = ElectraForSequenceClassification(CFG).eval()
    with torch.no_grad():
        want = base(batch["input_ids"]).logits.clone()
    frozen = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, want)  # B = 0 at init
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(**batch).loss.backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    for k, v in model.get_base_model().state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k.replace(".base_layer", "")]), k


def test_accelerate_big_model_loading(two_label_dir, batch):
    accelerate = pytest.importorskip("accelerate")
    want = ElectraForSequenceClassification.from_pretrained(two_label_dir)
    with accelerate.init_empty_weights():
        empty = ElectraForSequenceClassification(CFG)
    assert all(p.is_meta for p in empty.parameters())
    model = accelerate.load_checkpoint_and_dispatch(
        empty, str(two_label_dir), device_map="auto", no_split_module_classes=empty._no_split_modules
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input_ids"]).logits, want(batch["input_ids"]).logits)


def test_transformers_trainer_lowers_the_loss(tmp_path, batch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = ElectraForSequenceClassification(CFG)
    rows = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(4)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=5e-3,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and losses[-1] < losses[0]


# --- float16 ---------------------------------------------------------------------------------------


def test_float16_matches_transformers_float16(tmp_path, batch):
    transformers = pytest.importorskip("transformers")
    from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision

    pin_precision("pt")
    torch.manual_seed(0)
    from nezha_zoo.pt import ElectraForMaskedLM

    ElectraForMaskedLM(CFG).save_pretrained(tmp_path)
    ours = ElectraForMaskedLM.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert {p.dtype for p in ours.parameters()} == {torch.float16} and ours.dtype == torch.float16
    theirs = transformers.ElectraForMaskedLM.from_pretrained(tmp_path, torch_dtype=torch.float16).eval()
    ids = batch["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, output_hidden_states=True)
        want = theirs(ids, attention_mask=mask, output_hidden_states=True)
    assert got.logits.dtype == torch.float16
    assert_close(got.hidden_states[-1].float(), want.hidden_states[-1].float(), TOLERANCES["bf16"], "last hidden")
    assert_close(got.logits.float(), want.logits.float(), TOLERANCES["bf16"], "logits")
    ours.save_pretrained(tmp_path / "fp16")
    again = ElectraForMaskedLM.from_pretrained(tmp_path / "fp16", dtype="fp16")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_swap_head_example_fine_tunes(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "swap_head.py"
    spec = importlib.util.spec_from_file_location("swap_head_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main("pt", steps=30)
    assert all(np.isfinite(history)) and history[-1] < 0.8 * history[0], history
