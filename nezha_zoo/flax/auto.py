"""Flax Auto classes: the family from ``config.json``'s ``model_type``, the class from the head.

    from nezha_zoo.flax import FlaxAutoModelForMaskedLM
    model = FlaxAutoModelForMaskedLM.from_pretrained("path/to/checkpoint_dir")  # e.g. FlaxElectraForMaskedLM

Every class here is :class:`nezha_zoo.auto.BaseAutoModel` (the one definition) with this backend's
framework key and a head; the model class is looked up in the class registry.
"""

from nezha_zoo.auto import BaseAutoModel

__all__ = [
    "FlaxAutoModel",
    "FlaxAutoModelForPreTraining",
    "FlaxAutoModelForMaskedLM",
    "FlaxAutoModelForCausalLM",
    "FlaxAutoModelForNextSentencePrediction",
    "FlaxAutoModelForSequenceClassification",
    "FlaxAutoModelForMultipleChoice",
    "FlaxAutoModelForTokenClassification",
    "FlaxAutoModelForQuestionAnswering",
]


class FlaxAutoModel(BaseAutoModel, framework="flax", head="Model"):
    """Builds the family's base model ``Flax<Family>Model``."""


class FlaxAutoModelForPreTraining(BaseAutoModel, framework="flax", head="ForPreTraining"):
    """Builds the family's ``Flax<Family>ForPreTraining``."""


class FlaxAutoModelForMaskedLM(BaseAutoModel, framework="flax", head="ForMaskedLM"):
    """Builds the family's ``Flax<Family>ForMaskedLM``."""


class FlaxAutoModelForCausalLM(BaseAutoModel, framework="flax", head="ForCausalLM"):
    """Builds the family's ``Flax<Family>ForCausalLM``."""


class FlaxAutoModelForNextSentencePrediction(BaseAutoModel, framework="flax", head="ForNextSentencePrediction"):
    """Builds the family's ``Flax<Family>ForNextSentencePrediction``."""


class FlaxAutoModelForSequenceClassification(BaseAutoModel, framework="flax", head="ForSequenceClassification"):
    """Builds the family's ``Flax<Family>ForSequenceClassification``."""


class FlaxAutoModelForMultipleChoice(BaseAutoModel, framework="flax", head="ForMultipleChoice"):
    """Builds the family's ``Flax<Family>ForMultipleChoice``."""


class FlaxAutoModelForTokenClassification(BaseAutoModel, framework="flax", head="ForTokenClassification"):
    """Builds the family's ``Flax<Family>ForTokenClassification``."""


class FlaxAutoModelForQuestionAnswering(BaseAutoModel, framework="flax", head="ForQuestionAnswering"):
    """Builds the family's ``Flax<Family>ForQuestionAnswering``."""
