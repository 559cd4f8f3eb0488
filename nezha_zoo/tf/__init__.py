"""TensorFlow / Keras 3 backend of nezha_zoo (``keras.Model`` subclasses, TensorFlow backend).

``KERAS_BACKEND`` defaults to ``"tensorflow"`` here, once: importing any ``nezha_zoo.tf`` submodule runs
this file first, before keras is imported.  The legacy ``tf-keras`` is not used.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# Importing the family modules runs their class statements, which register every model class
# (nezha_zoo.spec.model_class); the exports below are read from that registry.
from nezha_zoo.packing import packed_linear, set_packed_linear
from nezha_zoo.spec.registry import model_classes
from nezha_zoo.tf import auto, electra, ibert, mpnet, mpt, nezha, xlm_roberta_xl  # noqa: F401
from nezha_zoo.tf.auto import *  # noqa: F403  (the Auto classes, listed in auto.__all__)
from nezha_zoo.tf.heads import mean_pool
from nezha_zoo.tf.modeling_utils import TFPreTrainedModel, checked

_CLASSES = model_classes("tf")  # TFElectraPreTrainedModel, TFElectraModel, TFElectraForPreTraining, ...
globals().update(_CLASSES)

__all__ = ["TFPreTrainedModel", *_CLASSES, *auto.__all__, "mean_pool", "checked"]
__all__ += ["set_packed_linear", "packed_linear"]
