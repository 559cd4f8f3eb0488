"""How every model takes a tokenizer's output: one framework-free rule for ``pt``, ``tf`` and ``flax``.

``model(**enc)`` and ``model(enc)`` both work, ``enc`` being any :class:`~collections.abc.Mapping` (a
``dict``, our :class:`~nezha_zoo.tokenization.BatchEncoding`, transformers' ``BatchEncoding``):

- keys a tokenizer returns that are never model inputs (:data:`NON_MODEL_INPUTS`: ``offset_mapping``,
  ``special_tokens_mask``, ``overflow_to_sample_mapping``, ``length``) are dropped, so an encoding made
  with ``return_offsets_mapping=True`` still runs;
- any other key the model does not take (``token_type_ids`` for MPNet and MPT, a misspelt name) raises
  ``TypeError`` naming it and the model's inputs, as Python does for an unknown keyword.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["NON_MODEL_INPUTS", "merge_encoding", "accepts_encodings"]

#: tokenizer outputs that describe the tokens and are never fed to a model.
NON_MODEL_INPUTS = frozenset({"offset_mapping", "special_tokens_mask", "overflow_to_sample_mapping", "length"})


def merge_encoding(owner: str, names: Iterable[str], main: str, bound: dict[str, Any]) -> dict[str, Any]:
    """Spread a packed encoding given as the first input into keyword arguments.

    Args:
        owner (str): the model class's name, for messages.
        names (Iterable[str]): the argument names the call takes.
        main (str): the first argument's name (``"input_ids"``); when ``bound[main]`` is a Mapping
            that is not a model output, its items become arguments.
        bound (dict[str, Any]): the arguments as bound by name (changed in place and returned).

    Returns:
        dict[str, Any]: ``bound`` with the encoding spread and :data:`NON_MODEL_INPUTS` dropped.

    Raises:
        TypeError: a key the model does not take, or one given both in the encoding and as an argument.
    """
    from nezha_zoo.outputs import ModelOutput

    names = list(names)
    first = bound.get(main)
    if isinstance(first, Mapping) and not isinstance(first, ModelOutput):
        bound.pop(main)
        for k, v in first.items():
            if k in NON_MODEL_INPUTS:
                continue
            if k not in names or k == "self":
                raise TypeError(f"{owner} takes no input {k!r}; its inputs are {names}")
            if bound.get(k) is not None:
                raise TypeError(f"{k!r} given both in the packed inputs and as an argument")
            bound[k] = v
    for k in NON_MODEL_INPUTS & bound.keys():
        if k not in names:
            bound.pop(k)
    return bound


def accepts_encodings(call: Callable) -> Callable:
    """Decorate a model's ``forward`` / ``__call__`` so it takes ``model(enc)`` and ``model(**enc)``.

    Calls without a Mapping first argument and without :data:`NON_MODEL_INPUTS` keywords go straight
    through; the others are rebound by :func:`merge_encoding`.
    """
    sig = inspect.signature(call)
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params) or getattr(call, "__accepts_encodings__", False):
        return call
    var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    names = [p.name for p in params[1:] if p.name != var_kw]  # without self
    if not names:
        return call

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        packed = isinstance(args[0] if args else kwargs.get(names[0]), Mapping)
        if not packed and not (NON_MODEL_INPUTS & kwargs.keys()):
            return call(self, *args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k in names or k not in NON_MODEL_INPUTS}
        bound = dict(sig.bind_partial(self, *args, **kwargs).arguments)
        bound.pop(params[0].name)
        bound.update(bound.pop(var_kw, None) or {})  # a call with **kwargs rejects unknown names itself
        return call(self, **merge_encoding(type(self).__name__, names, names[0], bound))

    wrapper.__accepts_encodings__ = True
    return wrapper
