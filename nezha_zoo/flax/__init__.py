"""Flax linen backend of nezha_zoo (imports jax and flax).

Each class pairs a plain linen module (``Flax<Family><Head>Module``, usable with ``module.init`` and
``module.apply`` under ``jax.jit``/``jax.grad``/optax) with a wrapper holding ``.module``, ``.params``
and ``.config`` that loads and saves transformers-layout checkpoints.  Losses are pure functions in
:mod:`nezha_zoo.flax.losses`.
"""

# Importing the family modules runs their class statements, which register every wrapper class
# (nezha_zoo.spec.model_class); the exports below (wrappers and their linen modules) are read from
# that registry.
from nezha_zoo.flax import auto, electra, ibert, losses, mpnet, mpt, nezha, xlm_roberta_xl  # noqa: F401
from nezha_zoo.flax.auto import *  # noqa: F403  (the Auto classes, listed in auto.__all__)
from nezha_zoo.flax.heads import mean_pool
from nezha_zoo.flax.layers import inference_jit
from nezha_zoo.flax.modeling_utils import FlaxPreTrainedModel, checked
from nezha_zoo.packing import packed_linear, set_packed_linear
from nezha_zoo.spec.registry import model_classes

_CLASSES = model_classes("flax")  # FlaxElectraPreTrainedModel, FlaxElectraModel, FlaxElectraForPreTraining, ...
#: each wrapper's linen module (FlaxElectraModule, FlaxElectraForPreTrainingModule, ...)
_MODULES = {c.module_class.__name__: c.module_class for c in _CLASSES.values() if "module_class" in vars(c)}
globals().update(_CLASSES)
globals().update(_MODULES)

__all__ = ["FlaxPreTrainedModel", *_CLASSES, *auto.__all__, *_MODULES, "mean_pool", "losses", "checked"]
__all__ += ["set_packed_linear", "packed_linear", "inference_jit"]
