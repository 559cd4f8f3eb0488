"""PyTorch greedy decoding with the key/value cache: ours (in-place cache growth, and ``torch.cat`` growth
as before) beside transformers' ``MptForCausalLM`` with its cache on, interleaved in one process.

``python -m benchmarks.kv_cache`` builds a seeded MPT checkpoint of the 125M (GPT-2-small) shape,
decodes a 16-token prompt to 64 new tokens (no eos, so every run decodes all of them) at batch 1 and
8, and prints the median seconds per ``generate`` and tokens/s of each variant:

* ``pt``: ``nezha_zoo.pt.MptForCausalLM.generate`` (the cache grows in place, ``append_to_cache``);
* ``pt-cat``: the same with the cache grown by ``torch.cat`` each step (the code before);
* ``hf-pt``: transformers' ``generate(use_cache=True)`` on the same checkpoint.

The three must produce the same tokens (checked).  Times are the process's CPU seconds
(``time.process_time``) with one thread by default: on a shared machine the wall clock measures the
neighbours, while one thread's CPU time measures the work.  ``--smoke`` runs a tiny config.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from unittest import mock

import numpy as np

from benchmarks.forward import BENCH_CONFIGS, SMOKE_CONFIGS, _set_threads
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.registry import get_family


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.threads > 0:  # 0: leave the frameworks' (or the caller's) thread settings alone
        _set_threads(args.threads)
    import torch
    import transformers

    import nezha_zoo.pt.mpt as ours

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    fam = get_family("mpt")
    fields = SMOKE_CONFIGS["mpt"] if args.smoke else BENCH_CONFIGS["mpt"][0]
    config = fam.config_class(**fields, eos_token_id=None)
    path = os.path.join(tempfile.mkdtemp(prefix="nezha_kv_"), "mpt")
    spec = fam.model_spec(config, "ForCausalLM")
    save_weights(path, config, spec, fam, random_weights(spec, config, seed=0))
    model = ours.MptForCausalLM.from_pretrained(path).eval()
    hf = transformers.MptForCausalLM.from_pretrained(path, use_cache=True).eval()

    def cat(past, new, dim=2):
        return torch.cat([past, new], dim)

    def run(variant: str, ids: torch.Tensor) -> torch.Tensor:
        if variant == "hf-pt":
            with torch.no_grad():
                return hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                    do_sample=False, use_cache=True, pad_token_id=0,
                )  # fmt: skip
        if variant == "pt-cat":
            with mock.patch.object(ours, "append_to_cache", cat):
                return model.generate(ids, max_new_tokens=args.new, do_sample=False)
        return model.generate(ids, max_new_tokens=args.new, do_sample=False)

    variants = ["pt", "pt-cat", "hf-pt"]
    rng = np.random.default_rng(0)
    lines = ["| batch | " + " | ".join(f"{v} CPU s (tok/s)" for v in variants) + " | pt / hf-pt | pt / pt-cat |"]
    lines.append("|---|" + "---:|" * (len(variants) + 2))
    for batch in (int(b) for b in args.batches.split(",")):
        ids = torch.from_numpy(rng.integers(3, config.vocab_size, size=(batch, args.prompt)))
        tokens = {v: run(v, ids) for v in variants}  # warm-up, and the same tokens everywhere
        for v in variants[1:]:
            if not torch.equal(tokens[v][:, -args.new :], tokens["pt"][:, -args.new :]):
                raise AssertionError(f"{v} decoded other tokens than pt at batch {batch}")
        times: dict[str, list[float]] = {v: [] for v in variants}
        for k in range(args.rounds):
            for v in variants[k % 3 :] + variants[: k % 3]:
                t = time.process_time()
                run(v, ids)
                times[v].append(time.process_time() - t)
        med = {v: float(np.median(ts)) for v, ts in times.items()}
        cells = " | ".join(f"{med[v]:.2f} ({batch * args.new / med[v]:.0f})" for v in variants)
        lines.append(f"| {batch} | {cells} | {med['hf-pt'] / med['pt']:.2f}x | {med['pt-cat'] / med['pt']:.2f}x |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
