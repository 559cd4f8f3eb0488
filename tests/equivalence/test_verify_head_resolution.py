"""``nezha-zoo verify`` on a base checkpoint saved without its pooler (issue 24), workers and all.

The decision itself is covered framework-free in tests/core/test_core_head_resolution.py; here the
PyTorch and Flax workers load the checkpoint with the pooler as the only fresh weight and compare.
"""

from __future__ import annotations

import pytest

from nezha_zoo.config import CONFIG_NAME
from nezha_zoo.conversion.verify import verify
from nezha_zoo.io.head_resolution import without_pooler
from nezha_zoo.io.writer import save_state_dict
from nezha_zoo.pretrained import random_weights
from nezha_zoo.spec import get_family
from tests.core.test_core_convert_formats import CONFIGS  # tiny configs of every family

pytestmark = [pytest.mark.pt, pytest.mark.flax]


def test_verify_runs_a_base_saved_without_its_pooler(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("flax")
    config = CONFIGS["mpnet"]()
    family = get_family("mpnet")
    bare = without_pooler(family.model_spec(config, "Model"))
    cfg = config.copy()
    cfg.architectures = ["MPNetForMaskedLM"]
    save_state_dict(tmp_path, random_weights(bare, config, seed=0), extra_files={CONFIG_NAME: cfg.to_json_string()})
    info = verify(tmp_path, backends=["pt", "flax"])
    assert info["head_note"] == (
        "config.json names MPNetForMaskedLM; the tensors are MPNetModel (without pooler): "
        "using MPNetModel without pooler"
    )
    assert {b: s["status"] for b, s in info["backends"].items()} == {"pt": "ok", "flax": "ok"}
    # the pooler is not in the checkpoint, so its (freshly initialised) output is not compared
    assert [(r["field"], r["backend"]) for r in info["rows"]] == [("last_hidden_state", "flax")]
    assert info["ok"]
