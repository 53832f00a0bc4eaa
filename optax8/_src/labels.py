"""Parameter labels and per-label quantization options.

Every parameter has a string label. By default it is the parameter's path in the params tree,
its dict keys, attribute names and sequence indices joined with ``/``, down to each array or
Flax metadata box (for Flax linen: ``params/Dense_0/kernel``; for NNX: ``layers/0/kernel``).
Users may pass their own labels, as :func:`optax.partition` accepts them: a pytree of strings
with the params' structure, or a callable from the params to such a tree.

``overrides`` maps glob patterns (:func:`fnmatch.fnmatchcase`: ``*`` matches any characters,
``/`` included) to dicts of options. Every pattern that matches a label applies, in the
order the mapping lists them, so a later pattern overrides an earlier one for the keys both
set. Options are validated when the optimizer is built; a pattern that matches no parameter
is an error when the state is initialised.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["LabelSpec", "Overrides", "default_labels", "resolve_labels"]

LabelSpec = Any  # None, a pytree of str, or a callable from params to one
Overrides = Mapping[str, Mapping[str, Any]]

# Options that look per-parameter but belong to optax's own tools.
_NOT_PER_LABEL = {
    "learning_rate": "use optax.partition to give parameter groups their own learning rate",
    "lr": "use optax.partition to give parameter groups their own learning rate",
    "weight_decay": "use the alias's `mask` argument or optax.partition for weight decay",
    "mask": "use the alias's `mask` argument or optax.partition",
}

QUANT_OPTIONS = ("optim_bits", "block_size", "min_8bit_size", "block_wise", "stochastic_rounding")


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def _path_label(path: tuple[Any, ...]) -> str:
  return "/".join(_key_name(k) for k in path)


def _is_array_box(x: Any) -> bool:
  from optax8._src import integrations  # it imports sharding, which imports this module

  return integrations.is_array_box(x)


def _unbox(x: Any) -> Any:
  from optax8._src import integrations

  return integrations.unbox(x)


def default_labels(params: Any) -> Any:
  """The default labels: each leaf's path in ``params`` joined with ``/``.

  Example:
    >>> import optax8
    >>> optax8.default_labels({"embed": {"table": 0.0}, "layers": [{"w": 0.0}]})
    {'embed': {'table': 'embed/table'}, 'layers': [{'w': 'layers/0/w'}]}
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: _path_label(path), params, is_leaf=_is_array_box)


def resolve_labels(params: Any, param_labels: LabelSpec) -> list[str]:
  """The flat list of labels, one per leaf of ``params`` in ``jax.tree.leaves`` order."""
  if param_labels is None:
    tree = default_labels(params)
  elif callable(param_labels):
    tree = param_labels(params)
  else:
    tree = param_labels
  params_def = jax.tree.structure(params, is_leaf=_is_array_box)
  # A callable that maps over Flax boxes (jax.tree.map over an NNX State) returns boxed labels.
  labels, labels_def = jax.tree.flatten(tree, is_leaf=_is_array_box)
  labels = [_unbox(label) for label in labels]
  if labels_def != params_def:
    raise ValueError(
        "param_labels must have the same tree structure as the params; got labels "
        f"{labels_def} for params {params_def}."
    )
  for label in labels:
    if not isinstance(label, str):
      raise TypeError(f"param_labels must hold strings, got {label!r} of type {type(label).__name__}.")
  return labels


def validate_overrides(
    overrides: Overrides | None,
    allowed: Mapping[str, Callable[[str, Any], None]],
) -> dict[str, dict[str, Any]]:
  """Checks every pattern's option dict against ``allowed`` (option name -> validator)."""
  if overrides is None:
    return {}
  if not isinstance(overrides, Mapping):
    raise TypeError(
        f"overrides must be a mapping from label pattern to option dict, got {type(overrides).__name__}."
    )
  checked = {}
  for pattern, options in overrides.items():
    if not isinstance(pattern, str):
      raise TypeError(f"overrides keys must be label patterns (str), got {pattern!r}.")
    if not isinstance(options, Mapping):
      raise TypeError(f"overrides[{pattern!r}] must be a dict of options, got {type(options).__name__}.")
    for key, value in options.items():
      if key in _NOT_PER_LABEL:
        raise ValueError(f"overrides[{pattern!r}]: {key!r} is not a per-label option; {_NOT_PER_LABEL[key]}.")
      if key not in allowed:
        raise ValueError(
            f"overrides[{pattern!r}]: unknown option {key!r}; allowed options are {sorted(allowed)}."
        )
      allowed[key](f"overrides[{pattern!r}][{key!r}]", value)
    checked[pattern] = dict(options)
  return checked


def leaf_options(
    labels: list[str], defaults: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
  """Per-leaf option dicts: ``defaults`` updated by each matching pattern in order.

  Raises:
    ValueError: if a pattern matches no label.
  """
  per_leaf = [dict(defaults) for _ in labels]
  for pattern, options in overrides.items():
    hits = [i for i, label in enumerate(labels) if fnmatch.fnmatchcase(label, pattern)]
    if not hits:
      shown = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
      raise ValueError(f"overrides pattern {pattern!r} matches no parameter label (labels: {shown}).")
    for i in hits:
      per_leaf[i].update(options)
  return per_leaf


def is_static_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
