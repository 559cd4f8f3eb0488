"""PyTorch backend of nezha_zoo: ``torch.nn.Module`` classes built from the families' specs.

    from nezha_zoo.pt import ElectraForMaskedLM  # or NezhaForMaskedLM, MPNetModel, ...
    model = ElectraForMaskedLM.from_pretrained("path/to/transformers_dir")
    model.save_pretrained("out_dir")

Imports torch (and nothing from TensorFlow or JAX).
"""

# Importing the family modules runs their class statements, which register every model class
# (nezha_zoo.spec.model_class); the exports below are read from that registry.
from nezha_zoo.pt import auto, electra, ibert, mpnet, mpt, nezha, xlm_roberta_xl  # noqa: F401
from nezha_zoo.pt.auto import *  # noqa: F403  (the Auto classes, listed in auto.__all__)
from nezha_zoo.pt.export import export_onnx
from nezha_zoo.pt.heads import mean_pool
from nezha_zoo.pt.layers import packed_linear, set_packed_linear
from nezha_zoo.pt.modeling_utils import PreTrainedModel
from nezha_zoo.spec.registry import model_classes

_CLASSES = model_classes("pt")  # ElectraPreTrainedModel, ElectraModel, ElectraForPreTraining, ...
globals().update(_CLASSES)

__all__ = [
    "PreTrainedModel",
    *_CLASSES,
    *auto.__all__,
    "mean_pool",
    "export_onnx",
    "set_packed_linear",
    "packed_linear",
]
