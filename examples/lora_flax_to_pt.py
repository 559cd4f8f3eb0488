"""Train a LoRA adapter in Flax, serve it from PyTorch and from PEFT over transformers.

Task: ``flax_train_electra.py``'s (label a sequence 1 when token 7 occurs in it, else 0).  A tiny Electra
classifier is saved once; Flax trains only the adapter (``jax.grad`` over ``model.lora_params``, optax
state for the adapter alone), saves it in PEFT's format, and PyTorch (``load_adapter``) and
``peft.PeftModel.from_pretrained`` over transformers' Electra make the same predictions::

    python examples/lora_flax_to_pt.py --steps 40
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nezha_zoo.flax import FlaxElectraForSequenceClassification
from nezha_zoo.flax.losses import sequence_classification_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flax_train_electra import make_batch, toy_config  # noqa: E402  (the same toy task)

logger = logging.getLogger("lora_flax_to_pt")


def main(steps: int = 40, batch: int = 32, seed: int = 0, workdir: str | None = None) -> dict:
    """Train, save, serve; return the losses, the logits of each server and their max-abs differences."""
    import peft
    import torch
    import transformers

    from nezha_zoo.pt import ElectraForSequenceClassification

    jax.config.update("jax_default_matmul_precision", "highest")
    workdir = workdir or tempfile.mkdtemp(prefix="lora_flax_to_pt.")
    base_dir, adapter_dir = os.path.join(workdir, "base"), os.path.join(workdir, "adapter")
    config = toy_config(dropout=0.0)
    model = FlaxElectraForSequenceClassification(config, seed=seed)
    model.save_pretrained(base_dir)
    trainable = model.enable_lora(4, alpha=8, target_modules=["qkv", "attention_output", "ffn"])
    logger.info("trainable parameters: %d of %d", trainable, sum(np.size(x) for x in jax.tree.leaves(model.params)))
    params, lora = model.params, model.lora_params
    tx = optax.adam(1e-2)
    opt_state = tx.init(lora)  # the adapter alone

    def loss_fn(lora, batch):
        out = model.module.apply({"params": model.apply_lora(params, lora)}, batch["input_ids"], deterministic=True)
        return sequence_classification_loss(out.logits, batch["labels"], config.num_labels)

    @jax.jit
    def train_step(lora, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(lora, batch)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    data_rng = np.random.default_rng(seed)
    history: list[float] = []
    for step in range(steps):
        b = {k: jnp.asarray(v) for k, v in make_batch(data_rng, batch).items()}
        lora, opt_state, loss = train_step(lora, opt_state, b)
        history.append(float(loss))
        if step % 10 == 0:
            logger.info("step %d loss %.4f", step, history[-1])
    model.lora_params = lora
    model.save_adapter(adapter_dir)

    test = make_batch(np.random.default_rng(seed + 1), 16)
    flax_logits = np.asarray(model(input_ids=test["input_ids"]).logits)
    ids = torch.from_numpy(test["input_ids"].astype(np.int64))
    pt = ElectraForSequenceClassification.from_pretrained(base_dir)
    pt.load_adapter(adapter_dir)
    hf = transformers.ElectraForSequenceClassification.from_pretrained(base_dir)
    served = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        pt_logits = pt(input_ids=ids).logits.numpy()
        peft_logits = served(input_ids=ids).logits.numpy()
    result = {
        "losses": history,
        "flax": flax_logits,
        "pt": pt_logits,
        "peft": peft_logits,
        "labels": test["labels"],
        "max_abs_pt": float(np.abs(flax_logits - pt_logits).max()),
        "max_abs_peft": float(np.abs(flax_logits - peft_logits).max()),
    }
    logger.info(
        "accuracy %.2f; predictions equal in Flax, PyTorch, PEFT: %s; max-abs logits: PyTorch %.2e, PEFT %.2e",
        float((flax_logits.argmax(-1) == test["labels"]).mean()),
        bool(
            (flax_logits.argmax(-1) == pt_logits.argmax(-1)).all()
            and (pt_logits.argmax(-1) == peft_logits.argmax(-1)).all()
        ),
        result["max_abs_pt"],
        result["max_abs_peft"],
    )
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    main(steps=args.steps)
