"""The demo's agreement table with transformers 4.57.6 PyTorch as an extra reference column.

``make parity`` (or ``python -m benchmarks.parity [--out DIR]``).  The package never imports
transformers; this report does, so it needs the ``test`` extra.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from nezha_zoo.cli.demo import Runner, main
from nezha_zoo.spec.registry import Family


def transformers_runner(family: Family, head: str, path: str) -> Runner:
    """Load ``path`` with transformers' PyTorch class of the same name."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # its advice on standalone CausalLM use is noise here
    model = getattr(transformers, family.class_name(head, "pt")).from_pretrained(path).eval()

    def run(inputs: dict[str, np.ndarray]) -> Any:
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in inputs.items()})

    return run


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], references={"transformers": transformers_runner}))
