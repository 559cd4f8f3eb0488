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
from nezha_zoo.tf.ibert import (  # noqa: E402
    TFIBertForMaskedLM,
    TFIBertForMultipleChoice,
    TFIBertForQuestionAnswering,
    TFIBertForSequenceClassification,
    TFIBertForTokenClassification,
    TFIBertModel,
    TFIBertPreTrainedModel,
)
from nezha_zoo.tf.modeling_utils import TFPreTrainedModel, checked  # noqa: E402
from nezha_zoo.tf.mpnet import (  # noqa: E402
    TFMPNetForMaskedLM,
    TFMPNetForMultipleChoice,
    TFMPNetForQuestionAnswering,
    TFMPNetForSequenceClassification,
    TFMPNetForTokenClassification,
    TFMPNetModel,
    TFMPNetPreTrainedModel,
)
from nezha_zoo.tf.mpt import (  # noqa: E402
    TFMptForCausalLM,
    TFMptForQuestionAnswering,
    TFMptForSequenceClassification,
    TFMptForTokenClassification,
    TFMptModel,
    TFMptPreTrainedModel,
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
from nezha_zoo.tf.xlm_roberta_xl import (  # noqa: E402
    TFXLMRobertaXLForCausalLM,
    TFXLMRobertaXLForMaskedLM,
    TFXLMRobertaXLForMultipleChoice,
    TFXLMRobertaXLForQuestionAnswering,
    TFXLMRobertaXLForSequenceClassification,
    TFXLMRobertaXLForTokenClassification,
    TFXLMRobertaXLModel,
    TFXLMRobertaXLPreTrainedModel,
)

__all__ = [
    "checked",
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
    "TFIBertPreTrainedModel",
    "TFIBertModel",
    "TFIBertForMaskedLM",
    "TFIBertForSequenceClassification",
    "TFIBertForMultipleChoice",
    "TFIBertForTokenClassification",
    "TFIBertForQuestionAnswering",
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
    "TFMptPreTrainedModel",
    "TFMptModel",
    "TFMptForCausalLM",
    "TFMptForSequenceClassification",
    "TFMptForTokenClassification",
    "TFMptForQuestionAnswering",
    "TFXLMRobertaXLPreTrainedModel",
    "TFXLMRobertaXLModel",
    "TFXLMRobertaXLForCausalLM",
    "TFXLMRobertaXLForMaskedLM",
    "TFXLMRobertaXLForSequenceClassification",
    "TFXLMRobertaXLForMultipleChoice",
    "TFXLMRobertaXLForTokenClassification",
    "TFXLMRobertaXLForQuestionAnswering",
    "mean_pool",
]
