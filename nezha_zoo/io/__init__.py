"""Checkpoint I/O, framework-free (numpy + safetensors): what every backend and the converter share.

Import from the modules (this package imports nothing, so ``nezha_zoo.config`` can use ``atomic``
without pulling in the spec):

====================  ===========================================================================
module                holds
====================  ===========================================================================
``reader``            :class:`CheckpointReader`: safetensors (single, sharded) and ``pytorch_model.bin``
``writer``            :func:`save_state_dict`: ``model.safetensors``, sharded, staged
``plan``              :func:`plan_load`: match checkpoint keys to a spec; stream tensors into a model
``shards``            transformers' file names, shard sizes, the shard index
``safetensors_file``  the safetensors container: header checks, raw reads, writes from memory
``torch_pickle``      the restricted unpickler for ``pytorch_model.bin`` (tensors only, no torch)
``dtype_names``       the one table of dtype names (safetensors, torch storages, numpy)
``atomic``            atomic file writes and staged directories
``lock``              one writer per destination (``flock``), stale staging directories removed
``child``             subprocesses that die with their parent
``errors``            :class:`CheckpointError`, :class:`DestinationError`
====================  ===========================================================================
"""
