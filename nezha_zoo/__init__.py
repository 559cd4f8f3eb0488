"""nezha_zoo: six transformer families for PyTorch, TensorFlow/Keras and Flax from one spec.

Importing this package imports no deep-learning framework: configs, the parameter spec, output
classes and checkpoint I/O need only numpy and safetensors.  Models live in the backends::

    from nezha_zoo import ElectraConfig
    from nezha_zoo.pt import ElectraForMaskedLM          # torch.nn.Module
    from nezha_zoo.tf import TFElectraForMaskedLM        # keras.Model
    from nezha_zoo.flax import FlaxElectraForMaskedLM    # linen module + params

Text in, answers out (framework-free; the backend only runs the model)::

    from nezha_zoo import AutoTokenizer, pipeline
    pipeline("fill-mask", model="dir", framework="tf")("Paris is the [MASK] of France.")
"""

from nezha_zoo.auto import AutoConfig
from nezha_zoo.config import PretrainedConfig
from nezha_zoo.families.electra import ElectraConfig
from nezha_zoo.families.ibert import IBertConfig
from nezha_zoo.families.mpnet import MPNetConfig
from nezha_zoo.families.mpt import MptAttentionConfig, MptConfig
from nezha_zoo.families.nezha import NezhaConfig
from nezha_zoo.families.xlm_roberta_xl import XLMRobertaXLConfig
from nezha_zoo.pipelines import pipeline
from nezha_zoo.tokenization import AutoTokenizer

__version__ = "0.1.0"

__all__ = [
    "AutoConfig",
    "AutoTokenizer",
    "ElectraConfig",
    "IBertConfig",
    "MPNetConfig",
    "MptAttentionConfig",
    "MptConfig",
    "NezhaConfig",
    "PretrainedConfig",
    "XLMRobertaXLConfig",
    "__version__",
    "pipeline",
]
