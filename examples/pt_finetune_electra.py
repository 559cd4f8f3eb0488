"""Fine-tune a tiny Electra sequence classifier with a plain PyTorch loop (AdamW).

The synthetic task: does the sequence contain token 7?  A freshly initialised tiny model learns it in
a few dozen steps on CPU.  Run with ``python examples/pt_finetune_electra.py``.
"""

from __future__ import annotations

import torch

from nezha_zoo import ElectraConfig
from nezha_zoo.pt import ElectraForSequenceClassification

VOCAB, SEQ_LEN, BATCH = 50, 12, 32
MARKER = 7  # label 1 iff this token occurs in the (unpadded part of the) sequence


def make_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random right-padded sequences and their labels (half contain the marker token)."""
    ids = torch.randint(8, VOCAB, (BATCH, SEQ_LEN), generator=generator)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (BATCH,), generator=generator)
    labels = torch.randint(0, 2, (BATCH,), generator=generator)
    for i in range(BATCH):
        if labels[i]:
            ids[i, torch.randint(1, int(lengths[i]), (1,), generator=generator)] = MARKER
    mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()  # (B, L)
    ids = ids.masked_fill(mask == 0, 0)  # padding id 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main(steps: int = 60, seed: int = 0, lr: float = 2e-3) -> list[float]:
    """Train for ``steps`` AdamW steps; returns the loss of every step."""
    torch.manual_seed(seed)
    config = ElectraConfig(
        vocab_size=VOCAB,
        embedding_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ_LEN,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    model = ElectraForSequenceClassification(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    for _ in range(steps):
        batch = make_batch(generator)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return history


if __name__ == "__main__":
    losses = main()
    print(f"first loss {losses[0]:.4f}  last loss {losses[-1]:.4f}  ({len(losses)} steps)")
