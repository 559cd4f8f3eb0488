"""PyTorch Auto classes: the family from ``config.json``'s ``model_type``, the class from the head.

    from nezha_zoo.pt import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained("path/to/checkpoint_dir")  # e.g. ElectraForMaskedLM

Every class here is :class:`nezha_zoo.auto.BaseAutoModel` (the one definition) with this backend's
framework key and a head; the model class is looked up in the class registry.
"""

from nezha_zoo.auto import BaseAutoModel

__all__ = [
    "AutoModel",
    "AutoModelForPreTraining",
    "AutoModelForMaskedLM",
    "AutoModelForCausalLM",
    "AutoModelForNextSentencePrediction",
    "AutoModelForSequenceClassification",
    "AutoModelForMultipleChoice",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
]


class AutoModel(BaseAutoModel, framework="pt", head="Model"):
    """Builds the family's base model ``<Family>Model``."""


class AutoModelForPreTraining(BaseAutoModel, framework="pt", head="ForPreTraining"):
    """Builds the family's ``<Family>ForPreTraining``."""


class AutoModelForMaskedLM(BaseAutoModel, framework="pt", head="ForMaskedLM"):
    """Builds the family's ``<Family>ForMaskedLM``."""


class AutoModelForCausalLM(BaseAutoModel, framework="pt", head="ForCausalLM"):
    """Builds the family's ``<Family>ForCausalLM``."""


class AutoModelForNextSentencePrediction(BaseAutoModel, framework="pt", head="ForNextSentencePrediction"):
    """Builds the family's ``<Family>ForNextSentencePrediction``."""


class AutoModelForSequenceClassification(BaseAutoModel, framework="pt", head="ForSequenceClassification"):
    """Builds the family's ``<Family>ForSequenceClassification``."""


class AutoModelForMultipleChoice(BaseAutoModel, framework="pt", head="ForMultipleChoice"):
    """Builds the family's ``<Family>ForMultipleChoice``."""


class AutoModelForTokenClassification(BaseAutoModel, framework="pt", head="ForTokenClassification"):
    """Builds the family's ``<Family>ForTokenClassification``."""


class AutoModelForQuestionAnswering(BaseAutoModel, framework="pt", head="ForQuestionAnswering"):
    """Builds the family's ``<Family>ForQuestionAnswering``."""
