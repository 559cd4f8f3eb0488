"""``make demo`` keeps working: every demo class loads in every backend and the backends agree."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("flax")

from nezha_zoo.cli import demo

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax]


def test_demo_exits_zero_and_prints_every_class(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "all backends agree" in printed
    for name in ("ElectraForCausalLM", "NezhaForPreTraining", "MPNetForQuestionAnswering"):
        assert name in printed
    assert (tmp_path / "electra-ForMaskedLM" / "model.safetensors").is_file()
