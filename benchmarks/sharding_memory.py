"""Per-device parameter memory of XLM-R-XL (3.5B) and XXL (10.7B) under each JAX rule set, from the spec.

``python -m benchmarks.sharding_memory [--out DIR]``: shapes only (the spec with abstract shapes),
nothing is allocated, so it runs in a second on any machine.  Writes ``sharding_memory.md`` and
``.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nezha_zoo.spec import LAYOUTS, get_family
from nezha_zoo.spec.partitioning import memory_table

#: (label, config fields): the published XL and XXL sizes (facebook/xlm-roberta-xl, -xxl).
MODELS = {
    "xlm-roberta-xl": {},
    "xlm-roberta-xxl": dict(hidden_size=4096, num_hidden_layers=48, num_attention_heads=32, intermediate_size=16384),
}

#: rule set -> mesh shapes to tabulate (8 devices: one TPU v4-8 host or an 8-GPU node; 64 devices).
MESHES = [
    ("dp", {"data": 8}),
    ("fsdp", {"data": 8}),
    ("tp", {"model": 8}),
    ("fsdp+tp", {"data": 2, "model": 4}),
    ("fsdp", {"data": 64}),
    ("fsdp+tp", {"data": 8, "model": 8}),
]


def rows(dtype_bytes: int = 4) -> list[dict]:
    fam = get_family("xlm_roberta_xl")
    out = []
    for label, fields in MODELS.items():
        config = fam.config_class(**fields)
        spec = fam.model_spec(config, "ForMaskedLM")
        for name, mesh in MESHES:
            (row,) = memory_table(spec, LAYOUTS["flax"], {name: mesh}, dtype_bytes)
            out.append({"model": label, "parameters": spec.num_parameters(), **row})
    return out


def markdown(table: list[dict], dtype_bytes: int) -> str:
    lines = [
        f"# Per-device parameter memory ({8 * dtype_bytes}-bit parameters, XLMRobertaXLForMaskedLM)",
        "",
        "| model | parameters | rules | mesh | devices | GiB per device | fraction of model |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for r in table:
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e9:.2f} B | {r['rules']} | {mesh} | {r['devices']} | "
            f"{r['bytes_per_device'] / 2**30:.2f} | {r['fraction_of_model']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sharding_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--bytes", type=int, default=4, help="bytes per parameter (4 float32, 2 bfloat16)")
    args = parser.parse_args(argv)
    table = rows(args.bytes)
    os.makedirs(args.out, exist_ok=True)
    text = markdown(table, args.bytes)
    with open(os.path.join(args.out, "sharding_memory.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "sharding_memory.json"), "w") as f:
        json.dump(table, f, indent=1)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
