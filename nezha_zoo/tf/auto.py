"""TensorFlow / Keras Auto classes: the family from ``config.json``'s ``model_type``, the class from the head.

    from nezha_zoo.tf import TFAutoModelForMaskedLM
    model = TFAutoModelForMaskedLM.from_pretrained("path/to/checkpoint_dir")  # e.g. TFElectraForMaskedLM

Every class here is :class:`nezha_zoo.auto.BaseAutoModel` (the one definition) with this backend's
framework key and a head; the model class is looked up in the class registry.
"""

from nezha_zoo.auto import BaseAutoModel

__all__ = [
    "TFAutoModel",
    "TFAutoModelForPreTraining",
    "TFAutoModelForMaskedLM",
    "TFAutoModelForCausalLM",
    "TFAutoModelForNextSentencePrediction",
    "TFAutoModelForSequenceClassification",
    "TFAutoModelForMultipleChoice",
    "TFAutoModelForTokenClassification",
    "TFAutoModelForQuestionAnswering",
]


class TFAutoModel(BaseAutoModel, framework="tf", head="Model"):
    """Builds the family's base model ``TF<Family>Model``."""


class TFAutoModelForPreTraining(BaseAutoModel, framework="tf", head="ForPreTraining"):
    """Builds the family's ``TF<Family>ForPreTraining``."""


class TFAutoModelForMaskedLM(BaseAutoModel, framework="tf", head="ForMaskedLM"):
    """Builds the family's ``TF<Family>ForMaskedLM``."""


class TFAutoModelForCausalLM(BaseAutoModel, framework="tf", head="ForCausalLM"):
    """Builds the family's ``TF<Family>ForCausalLM``."""


class TFAutoModelForNextSentencePrediction(BaseAutoModel, framework="tf", head="ForNextSentencePrediction"):
    """Builds the family's ``TF<Family>ForNextSentencePrediction``."""


class TFAutoModelForSequenceClassification(BaseAutoModel, framework="tf", head="ForSequenceClassification"):
    """Builds the family's ``TF<Family>ForSequenceClassification``."""


class TFAutoModelForMultipleChoice(BaseAutoModel, framework="tf", head="ForMultipleChoice"):
    """Builds the family's ``TF<Family>ForMultipleChoice``."""


class TFAutoModelForTokenClassification(BaseAutoModel, framework="tf", head="ForTokenClassification"):
    """Builds the family's ``TF<Family>ForTokenClassification``."""


class TFAutoModelForQuestionAnswering(BaseAutoModel, framework="tf", head="ForQuestionAnswering"):
    """Builds the family's ``TF<Family>ForQuestionAnswering``."""
