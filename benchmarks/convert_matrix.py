"""The conversion matrix: every family, every readable format -> every writable format.

``python -m benchmarks.convert_matrix [--out DIR] [--no-verify]``.  For each family a tiny
transformers PyTorch model is saved with ``save_pretrained`` (safetensors and ``pytorch_model.bin``);
``nezha-zoo convert`` makes each other source format from it.  A cell converts source -> target and
passes when converting the target back to safetensors gives bytes identical to the canonical
conversion of transformers' file (nothing lost, nothing changed).  Then ``nezha-zoo verify`` runs on
each target format of each family that has backend classes (max-abs difference across PyTorch,
TensorFlow and Flax).  Writes ``convert_matrix.{json,md}``.  Needs the ``test`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from nezha_zoo.conversion.convert import convert
from nezha_zoo.conversion.formats import READ_FORMATS, WRITE_FORMATS
from nezha_zoo.conversion.verify import verify
from nezha_zoo.spec import get_family, model_class

_BERT = dict(
    vocab_size=37,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    max_position_embeddings=24,
    num_labels=2,
)
CASES = {
    "nezha": ("ForPreTraining", dict(_BERT, max_relative_position=4)),
    "xlm-roberta-xl": ("ForMaskedLM", _BERT),
    "electra": ("ForMaskedLM", dict(_BERT, embedding_size=8)),
    "ibert": ("ForMaskedLM", _BERT),
    "mpnet": ("ForMaskedLM", _BERT),
    "mpt": ("ForCausalLM", dict(d_model=16, n_heads=4, n_layers=2, vocab_size=37, max_seq_len=24, pad_token_id=0)),
}


def _has_backend(fam: str, head: str, backend: str) -> bool:
    try:
        model_class(fam, head, backend)
    except ValueError:
        return False
    return True


def _bytes(directory: str) -> bytes:
    return open(os.path.join(directory, "model.safetensors"), "rb").read()


def run(root: str, do_verify: bool = True) -> dict[str, Any]:
    """Build every source, convert to every target, check the round trip, verify."""
    import torch
    import transformers

    results: dict[str, Any] = {}
    for fam, (head, kwargs) in CASES.items():
        family = get_family(fam)
        torch.manual_seed(0)
        config = getattr(transformers, f"{family.class_prefix}Config")(**kwargs)
        model = getattr(transformers, family.class_name(head))(config)
        base = os.path.join(root, fam)
        model.save_pretrained(os.path.join(base, "src-safetensors"))
        model.save_pretrained(os.path.join(base, "src-pytorch-bin"), safe_serialization=False)
        canonical = os.path.join(base, "canonical")
        convert(os.path.join(base, "src-safetensors"), canonical, "safetensors")
        keras_ok = _has_backend(fam, head, "tf")
        for fmt in ("hf-tf", "hf-flax", "flax", *(["keras"] if keras_ok else [])):
            convert(canonical, os.path.join(base, f"src-{fmt}"), fmt)
        cells: dict[str, dict[str, str]] = {}
        for src in READ_FORMATS:
            row = cells.setdefault(src, {})
            if not os.path.isdir(os.path.join(base, f"src-{src}")):
                row.update(dict.fromkeys(WRITE_FORMATS, "n/a (no TF class yet)"))
                continue
            for dst in WRITE_FORMATS:
                if dst == "keras" and not keras_ok:
                    row[dst] = "n/a (no TF class yet)"
                    continue
                out = os.path.join(base, f"{src}-to-{dst}")
                try:
                    convert(os.path.join(base, f"src-{src}"), out, dst)
                    back = os.path.join(base, f"{src}-to-{dst}-back")
                    convert(out, back, "safetensors")
                    row[dst] = "ok" if _bytes(back) == _bytes(canonical) else "DIFFERS"
                except Exception as e:  # a failed cell is reported, not fatal
                    row[dst] = f"ERROR {type(e).__name__}: {e}"
        checks: dict[str, Any] = {}
        if do_verify and _has_backend(fam, head, "pt"):
            for dst in WRITE_FORMATS:
                target = os.path.join(base, f"safetensors-to-{dst}")
                if os.path.isdir(target):
                    info = verify(target)
                    worst = max((r["max_abs_diff"] for r in info["rows"]), default=None)
                    checks[dst] = {"ok": info["ok"], "max_abs_diff": worst}
        results[fam] = {"head": head, "cells": cells, "verify": checks, "verified": do_verify}
    return results


def markdown(results: dict[str, Any]) -> str:
    """The matrix and verify results as markdown."""
    lines = ["# Conversion matrix", ""]
    lines.append(
        "Cell: `convert SRC -> DST`, then DST -> safetensors is byte-identical to the canonical conversion of "
        "transformers' own `save_pretrained` file. Sources other than safetensors/pytorch-bin were made by "
        "`convert` from it."
    )
    for fam, r in results.items():
        lines += ["", f"## {fam} ({get_family(fam).class_name(r['head'])})", ""]
        lines.append("| source \\ target | " + " | ".join(WRITE_FORMATS) + " |")
        lines.append("|---" * (len(WRITE_FORMATS) + 1) + "|")
        for src, row in r["cells"].items():
            lines.append(f"| {src} | " + " | ".join(row[d] for d in WRITE_FORMATS) + " |")
        if r["verify"]:
            lines += ["", "`nezha-zoo verify` on each target (pt reference; tf and flax compared):", ""]
            lines.append("| target | verify | worst max-abs diff |")
            lines.append("|---|---|---:|")
            for dst, v in r["verify"].items():
                d = "-" if v["max_abs_diff"] is None else f"{v['max_abs_diff']:.2e}"
                lines.append(f"| {dst} | {'ok' if v['ok'] else 'FAILED'} | {d} |")
        elif r.get("verified") is False:
            lines += ["", "verify: not run (`--no-verify`)."]
        else:
            lines += ["", "verify: no backend classes for this family yet (tests compare with transformers PyTorch)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convert_matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="results directory")
    parser.add_argument("--no-verify", action="store_true", help="skip nezha-zoo verify (backends)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nezha-zoo-matrix-") as root:
        results = run(root, do_verify=not args.no_verify)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "convert_matrix.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    text = markdown(results)
    with open(os.path.join(args.out, "convert_matrix.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    sys.stdout.write(text)
    ok = all(
        c == "ok" or c.startswith("n/a") for r in results.values() for row in r["cells"].values() for c in row.values()
    )
    return 0 if ok and all(v["ok"] for r in results.values() for v in r["verify"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
