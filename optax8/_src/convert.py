"""Conversion between optax8's 8-bit states and the optax float32 states they replace.

A run can switch optimizer precision mid-training: convert the state with one of these
functions and continue with the other optimizer. The conversion walks the two optimizer states
side by side, so chains, ``inject_hyperparams``, ``MultiSteps`` and other wrappers convert as
long as both optimizers are built the same way. Moments are matched by field name (optax8's
states name their fields as optax does: ``mu``, ``nu``, ``trace``, ``sum_of_squares``, ``m1``,
``m2``); step counts carry over.

Going to 8 bits costs one quantization of each moment: per element at most half a code step of
its block, about 0.7% of the block's absmax in the top decade of the signed map, much less for
small values. Going to 32 bits is exact (the dequantized values).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax8._src import integrations, transform
from optax8._src import quantization as qz

__all__ = ["convert_state"]

_STATE_TYPES = (
    transform.ScaleByAdam8bitState,
    transform.Trace8bitState,
    transform.ScaleByLion8bitState,
    transform.ScaleByRms8bitState,
    transform.ScaleByRss8bitState,
    transform.ScaleByAdemamix8bitState,
)
_COUNTS = ("count", "count_m2")  # optax's AdEMAMix counts its slow EMA's steps separately


def _is_8bit_state(node: Any) -> bool:
  return isinstance(node, _STATE_TYPES)


def _moment_like(src: Any, like: Any) -> Any:
  """``src`` (float32 values or quantized) in the layout of ``like`` (quantized or plain), boxed as
  ``like`` is (Flax boxes: linen ``nn.Partitioned``, NNX Variables)."""
  value, target = integrations.unbox(src), integrations.unbox(like)
  if tuple(jnp.shape(value)) != tuple(jnp.shape(target)):
    raise ValueError(
        f"cannot convert a moment of shape {tuple(jnp.shape(value))} into one of shape {tuple(jnp.shape(target))}; "
        "were the two states made for the same params?"
    )
  if qz.is_quantized(value):
    value = qz.dequantize_blockwise(value)
  if qz.is_quantized(target):
    value = qz.quantize_blockwise(value, target.block_size, signed=target.signed)
  else:
    value = jnp.asarray(value).astype(target.dtype)  # like may be abstract
  return integrations.rebox(like, value)


def _is_moment(x: Any) -> bool:
  return qz.is_quantized(x) or integrations.is_array_box(x)


def _convert_node(src: Any, like: Any) -> Any:
  fields = {}
  for name in like._fields:
    if name in _COUNTS:
      count = src.count if "count" in src._fields else getattr(like, name)  # (tuple.count is a method)
      fields[name] = _moment_like(count, getattr(like, name))
    elif name in src._fields:
      src_leaves, src_def = jax.tree.flatten(getattr(src, name), is_leaf=_is_moment)
      like_leaves, like_def = jax.tree.flatten(getattr(like, name), is_leaf=_is_moment)
      if src_def != like_def:
        raise ValueError(
            f"cannot fill {type(like).__name__}.{name} from {type(src).__name__}.{name}: their trees differ, "
            f"{src_def} and {like_def}; were the states made for the same params?"
        )
      fields[name] = like_def.unflatten(map(_moment_like, src_leaves, like_leaves))
    else:
      raise ValueError(f"cannot fill {type(like).__name__}.{name} from a {type(src).__name__}.")
  return type(like)(**fields)


def _is_empty(state: Any) -> bool:
  return isinstance(state, optax.EmptyState)


def _walk(src: Any, like: Any, path: str) -> Any:
  if _is_8bit_state(src) or _is_8bit_state(like):
    return _convert_node(src, like)
  if isinstance(like, tuple) and isinstance(src, tuple):
    # Entries pair up in order, but for stateless steps one chain has and the other lacks
    # (optax.rmsprop ends in an identity where optax8's rmsprop8bit does not).
    entries, slots = list(src), range(len(like))
    if len(src) != len(like):
      entries = [s for s in src if not _is_empty(s)]
      slots = [i for i, t in enumerate(like) if not _is_empty(t)]
      if len(entries) != len(slots):
        raise ValueError(
            f"states differ at {path or 'the top'}: a {type(src).__name__} of {len(entries)} stateful entries "
            f"against a {type(like).__name__} of {len(slots)}; were both optimizers built the same way?"
        )
    items = list(like)
    for i, s in zip(slots, entries):
      items[i] = _walk(s, like[i], f"{path}[{i}]")
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)
  if isinstance(like, dict) and isinstance(src, dict):
    # Keys only one side has (hyperparameters one of two injected optimizers lacks) keep like's.
    return {k: _walk(src[k], v, f"{path}[{k!r}]") if k in src else v for k, v in like.items()}
  return src


def convert_state(state: Any, like: Any) -> Any:
  """Converts an optimizer state between optax8's 8-bit states and optax's float32 ones.

  Either direction: an optax8 state becomes the optax counterpart's state (moments
  dequantized, exact), or an optax state becomes the optax8 optimizer's state (moments
  quantized once). ``like`` gives the target's structure, layout and dtypes.

  Args:
    state: the state to convert.
    like: a state of the optimizer to continue with, e.g. ``optax.adamw(lr).init(params)`` or
      ``optax8.adamw8bit(lr).init(params)`` (or their ``jax.eval_shape``).

  Returns:
    A state shaped like ``like`` holding ``state``'s moments and step counts.

  Example:
    >>> import jax.numpy as jnp, optax, optax8
    >>> params = {"w": jnp.ones((64, 256))}
    >>> tx8, tx32 = optax8.adamw8bit(1e-3), optax.adamw(1e-3)
    >>> state32 = optax8.convert_state(tx8.init(params), like=tx32.init(params))
    >>> type(state32[0]).__name__
    'ScaleByAdamState'
    >>> state8 = optax8.convert_state(state32, like=tx8.init(params))
    >>> state8[0].mu["w"].codes.dtype
    dtype('uint8')
  """
  return _walk(state, like, "")
