"""``make demo`` keeps working: every demo class loads in every backend and the backends agree."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("flax")

from nezha_zoo.cli import demo

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax]


@pytest.fixture
def one_layer_demo(monkeypatch):
    """The demo's configs at one layer, and one timed call per backend: the run is compile-bound (a Flax
    compile per class, which grows with depth), and what it checks -- every class saved, loaded in every
    backend and agreeing -- is the same at any depth (``make demo`` itself runs the embedded sizes)."""

    def one_layer(make):
        def make_one_layer():
            config = make()
            return config.copy(**{"n_layers" if "n_layers" in config.to_dict() else "num_hidden_layers": 1})

        return make_one_layer

    monkeypatch.setattr(demo, "DEMO_CONFIGS", {key: one_layer(make) for key, make in demo.DEMO_CONFIGS.items()})
    monkeypatch.setattr(demo, "REPEATS", 1)


def test_demo_exits_zero_and_prints_every_class(tmp_path, capsys, one_layer_demo):
    assert demo.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "all backends agree" in printed
    for name in ("ElectraForCausalLM", "NezhaForPreTraining", "MPNetForQuestionAnswering"):
        assert name in printed
    assert (tmp_path / "electra-ForMaskedLM" / "model.safetensors").is_file()
