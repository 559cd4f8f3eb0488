"""Flax linen backend of nezha_zoo (imports jax and flax).

Each class pairs a plain linen module (``Flax<Family><Head>Module``, usable with ``module.init`` and
``module.apply`` under ``jax.jit``/``jax.grad``/optax) with a wrapper holding ``.module``, ``.params``
and ``.config`` that loads and saves transformers-layout checkpoints.  Losses are pure functions in
:mod:`nezha_zoo.flax.losses`.
"""

from nezha_zoo.flax import losses
from nezha_zoo.flax.electra import (
    FlaxElectraForCausalLM,
    FlaxElectraForCausalLMModule,
    FlaxElectraForMaskedLM,
    FlaxElectraForMaskedLMModule,
    FlaxElectraForMultipleChoice,
    FlaxElectraForMultipleChoiceModule,
    FlaxElectraForPreTraining,
    FlaxElectraForPreTrainingModule,
    FlaxElectraForQuestionAnswering,
    FlaxElectraForQuestionAnsweringModule,
    FlaxElectraForSequenceClassification,
    FlaxElectraForSequenceClassificationModule,
    FlaxElectraForTokenClassification,
    FlaxElectraForTokenClassificationModule,
    FlaxElectraModel,
    FlaxElectraModule,
    FlaxElectraPreTrainedModel,
)
from nezha_zoo.flax.modeling_utils import FlaxPreTrainedModel

__all__ = [
    "FlaxPreTrainedModel",
    "FlaxElectraPreTrainedModel",
    "FlaxElectraModel",
    "FlaxElectraModule",
    "FlaxElectraForPreTraining",
    "FlaxElectraForPreTrainingModule",
    "FlaxElectraForMaskedLM",
    "FlaxElectraForMaskedLMModule",
    "FlaxElectraForCausalLM",
    "FlaxElectraForCausalLMModule",
    "FlaxElectraForSequenceClassification",
    "FlaxElectraForSequenceClassificationModule",
    "FlaxElectraForMultipleChoice",
    "FlaxElectraForMultipleChoiceModule",
    "FlaxElectraForTokenClassification",
    "FlaxElectraForTokenClassificationModule",
    "FlaxElectraForQuestionAnswering",
    "FlaxElectraForQuestionAnsweringModule",
    "losses",
]
