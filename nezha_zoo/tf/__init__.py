"""TensorFlow / Keras 3 backend of nezha_zoo (``keras.Model`` subclasses, TensorFlow backend).

``KERAS_BACKEND`` defaults to ``"tensorflow"`` here; the legacy ``tf-keras`` is not used.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from nezha_zoo.tf.electra import (  # noqa: E402
    TFElectraForCausalLM,
    TFElectraForMaskedLM,
    TFElectraForMultipleChoice,
    TFElectraForPreTraining,
    TFElectraForQuestionAnswering,
    TFElectraForSequenceClassification,
    TFElectraForTokenClassification,
    TFElectraModel,
    TFElectraPreTrainedModel,
)
from nezha_zoo.tf.heads import mean_pool  # noqa: E402
from nezha_zoo.tf.modeling_utils import TFPreTrainedModel  # noqa: E402
from nezha_zoo.tf.mpnet import (  # noqa: E402
    TFMPNetForMaskedLM,
    TFMPNetForMultipleChoice,
    TFMPNetForQuestionAnswering,
    TFMPNetForSequenceClassification,
    TFMPNetForTokenClassification,
    TFMPNetModel,
    TFMPNetPreTrainedModel,
)
from nezha_zoo.tf.nezha import (  # noqa: E402
    TFNezhaForMaskedLM,
    TFNezhaForMultipleChoice,
    TFNezhaForNextSentencePrediction,
    TFNezhaForPreTraining,
    TFNezhaForQuestionAnswering,
    TFNezhaForSequenceClassification,
    TFNezhaForTokenClassification,
    TFNezhaModel,
    TFNezhaPreTrainedModel,
)

__all__ = [
    "TFPreTrainedModel",
    "TFElectraPreTrainedModel",
    "TFElectraModel",
    "TFElectraForPreTraining",
    "TFElectraForMaskedLM",
    "TFElectraForCausalLM",
    "TFElectraForSequenceClassification",
    "TFElectraForMultipleChoice",
    "TFElectraForTokenClassification",
    "TFElectraForQuestionAnswering",
    "TFNezhaPreTrainedModel",
    "TFNezhaModel",
    "TFNezhaForPreTraining",
    "TFNezhaForMaskedLM",
    "TFNezhaForNextSentencePrediction",
    "TFNezhaForSequenceClassification",
    "TFNezhaForMultipleChoice",
    "TFNezhaForTokenClassification",
    "TFNezhaForQuestionAnswering",
    "TFMPNetPreTrainedModel",
    "TFMPNetModel",
    "TFMPNetForMaskedLM",
    "TFMPNetForSequenceClassification",
    "TFMPNetForMultipleChoice",
    "TFMPNetForTokenClassification",
    "TFMPNetForQuestionAnswering",
    "mean_pool",
]
