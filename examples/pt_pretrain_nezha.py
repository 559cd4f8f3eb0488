"""Pre-train a tiny Nezha (masked LM + next-sentence prediction) with a plain PyTorch loop (AdamW).

The synthetic corpus: a "sentence" repeats one topic token.  Sentence B continues sentence A (same
topic, NSP label 0) or is random (another topic, label 1); 15% of the tokens are masked for the MLM
loss, which the model can recover from the unmasked neighbours.  A freshly initialised tiny model
learns both in a few dozen steps on CPU.  Run with ``python examples/pt_pretrain_nezha.py``.
"""

from __future__ import annotations

import torch

from nezha_zoo import NezhaConfig
from nezha_zoo.pt import NezhaForPreTraining

VOCAB, HALF, BATCH = 16, 6, 32
FIRST = 5  # ids below are special: 0 pad, 1 [CLS], 2 [SEP], 3 [MASK]
CLS, SEP, MASK = 1, 2, 3
TOPICS = VOCAB - FIRST  # ids FIRST .. VOCAB - 1 are topics


def _sentence(topic: torch.Tensor, length: int) -> torch.Tensor:
    """(B,) topic indices -> (B, length) ids, the topic's token repeated."""
    return (FIRST + topic)[:, None].expand(-1, length)


def make_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``[CLS] A [SEP] B [SEP]`` with MLM labels (-100 where not masked) and NSP labels."""
    topic = torch.randint(0, TOPICS, (BATCH,), generator=generator)
    nsp = torch.randint(0, 2, (BATCH,), generator=generator)  # 0 = B continues A, 1 = B is random
    other = (topic + torch.randint(1, TOPICS, (BATCH,), generator=generator)) % TOPICS  # never the same
    b_topic = torch.where(nsp == 0, topic, other)
    col = lambda v: torch.full((BATCH, 1), v)  # noqa: E731
    parts = [col(CLS), _sentence(topic, HALF), col(SEP), _sentence(b_topic, HALF), col(SEP)]
    ids = torch.cat(parts, dim=1)  # (B, 2 * HALF + 3)
    types = torch.cat([torch.zeros(BATCH, HALF + 2), torch.ones(BATCH, HALF + 1)], dim=1).long()
    maskable = ids >= FIRST
    masked = maskable & (torch.rand(ids.shape, generator=generator) < 0.15)
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    inputs = torch.where(masked, torch.full_like(ids, MASK), ids)
    return {"input_ids": inputs, "token_type_ids": types, "labels": labels, "next_sentence_label": nsp}


def main(steps: int = 60, seed: int = 0, lr: float = 5e-3) -> list[float]:
    """Train for ``steps`` AdamW steps; returns the (MLM + NSP) loss of every step."""
    torch.manual_seed(seed)
    config = NezhaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=2 * HALF + 3,
        max_relative_position=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = NezhaForPreTraining(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    for _ in range(steps):
        loss = model(**make_batch(generator)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return history


if __name__ == "__main__":
    losses = main()
    print(f"first loss {losses[0]:.4f}  last loss {losses[-1]:.4f}  ({len(losses)} steps)")
