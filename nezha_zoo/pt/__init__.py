"""PyTorch backend of nezha_zoo: ``torch.nn.Module`` classes built from the families' specs.

    from nezha_zoo.pt import ElectraForMaskedLM  # or NezhaForMaskedLM, MPNetModel, ...
    model = ElectraForMaskedLM.from_pretrained("path/to/transformers_dir")
    model.save_pretrained("out_dir")

Imports torch (and nothing from TensorFlow or JAX).
"""

from nezha_zoo.pt.electra import (
    ElectraForCausalLM,
    ElectraForMaskedLM,
    ElectraForMultipleChoice,
    ElectraForPreTraining,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    ElectraForTokenClassification,
    ElectraModel,
    ElectraPreTrainedModel,
)
from nezha_zoo.pt.heads import mean_pool
from nezha_zoo.pt.ibert import (
    IBertForMaskedLM,
    IBertForMultipleChoice,
    IBertForQuestionAnswering,
    IBertForSequenceClassification,
    IBertForTokenClassification,
    IBertModel,
    IBertPreTrainedModel,
)
from nezha_zoo.pt.modeling_utils import PreTrainedModel
from nezha_zoo.pt.mpnet import (
    MPNetForMaskedLM,
    MPNetForMultipleChoice,
    MPNetForQuestionAnswering,
    MPNetForSequenceClassification,
    MPNetForTokenClassification,
    MPNetModel,
    MPNetPreTrainedModel,
)
from nezha_zoo.pt.mpt import (
    MptForCausalLM,
    MptForQuestionAnswering,
    MptForSequenceClassification,
    MptForTokenClassification,
    MptModel,
    MptPreTrainedModel,
)
from nezha_zoo.pt.nezha import (
    NezhaForMaskedLM,
    NezhaForMultipleChoice,
    NezhaForNextSentencePrediction,
    NezhaForPreTraining,
    NezhaForQuestionAnswering,
    NezhaForSequenceClassification,
    NezhaForTokenClassification,
    NezhaModel,
    NezhaPreTrainedModel,
)
from nezha_zoo.pt.xlm_roberta_xl import (
    XLMRobertaXLForCausalLM,
    XLMRobertaXLForMaskedLM,
    XLMRobertaXLForMultipleChoice,
    XLMRobertaXLForQuestionAnswering,
    XLMRobertaXLForSequenceClassification,
    XLMRobertaXLForTokenClassification,
    XLMRobertaXLModel,
    XLMRobertaXLPreTrainedModel,
)

__all__ = [
    "PreTrainedModel",
    "ElectraPreTrainedModel",
    "ElectraModel",
    "ElectraForPreTraining",
    "ElectraForMaskedLM",
    "ElectraForCausalLM",
    "ElectraForSequenceClassification",
    "ElectraForMultipleChoice",
    "ElectraForTokenClassification",
    "ElectraForQuestionAnswering",
    "NezhaPreTrainedModel",
    "NezhaModel",
    "NezhaForPreTraining",
    "NezhaForMaskedLM",
    "NezhaForNextSentencePrediction",
    "NezhaForSequenceClassification",
    "NezhaForMultipleChoice",
    "NezhaForTokenClassification",
    "NezhaForQuestionAnswering",
    "MPNetPreTrainedModel",
    "MPNetModel",
    "MPNetForMaskedLM",
    "MPNetForSequenceClassification",
    "MPNetForMultipleChoice",
    "MPNetForTokenClassification",
    "MPNetForQuestionAnswering",
    "MptPreTrainedModel",
    "MptModel",
    "MptForCausalLM",
    "MptForSequenceClassification",
    "MptForTokenClassification",
    "MptForQuestionAnswering",
    "XLMRobertaXLPreTrainedModel",
    "XLMRobertaXLModel",
    "XLMRobertaXLForCausalLM",
    "XLMRobertaXLForMaskedLM",
    "XLMRobertaXLForSequenceClassification",
    "XLMRobertaXLForMultipleChoice",
    "XLMRobertaXLForTokenClassification",
    "XLMRobertaXLForQuestionAnswering",
    "IBertPreTrainedModel",
    "IBertModel",
    "IBertForMaskedLM",
    "IBertForSequenceClassification",
    "IBertForMultipleChoice",
    "IBertForTokenClassification",
    "IBertForQuestionAnswering",
    "mean_pool",
]
