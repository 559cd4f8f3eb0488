"""PyTorch backend of nezha_zoo: ``torch.nn.Module`` classes built from the families' specs.

    from nezha_zoo.pt import ElectraForMaskedLM
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
from nezha_zoo.pt.modeling_utils import PreTrainedModel

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
]
