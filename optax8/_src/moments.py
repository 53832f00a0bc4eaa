"""The transformation engine shared by every 8-bit optimizer.

``moment_transform`` turns a :class:`~optax8._src.update_math.Family` into an optax
``GradientTransformationExtraArgs`` whose state holds one tree per moment. Each leaf of a
moment tree is a :class:`~optax8.QuantizedArray` (8-bit) or a plain array (32-bit), decided
per parameter at ``init`` from its label's options and its global size.

Per step and per parameter the update is: dequantize the moments, run the family's float32
math, re-quantize. A non-finite gradient element (or one whose new moments overflow) resets
that element's moments to zero and gets a zero update, so one bad element never poisons its
block's absmax (a departure from optax, which propagates NaN per element).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax8._src import labels as labels_lib
from optax8._src import native
from optax8._src import quantization as qz
from optax8._src import sharding as sharding_lib
from optax8._src.update_math import Family

__all__ = ["check_beta", "check_non_negative", "moment_transform", "schedule_or"]

Validator = Callable[[str, Any], None]

# Defaults of the quantization options (bitsandbytes' optimizer defaults since 0.44).
DEFAULT_OPTIM_BITS = 8
DEFAULT_BLOCK_SIZE = 256
DEFAULT_MIN_8BIT_SIZE = 4096


def _is_array(value: Any) -> bool:
  return isinstance(value, (jax.Array, np.ndarray)) or hasattr(value, "aval")


def _check_number(name: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
  if _is_array(value) and jnp.ndim(value) == 0:
    return  # traced or injected (optax.inject_hyperparams): checked by the user's schedule
  if not labels_lib.is_static_number(value):
    raise TypeError(f"{name} must be a float, got {value!r} of type {type(value).__name__}.")
  if not ok(float(value)):
    raise ValueError(f"{name} must be {allowed}, got {value}.")


def check_beta(name: str, value: Any) -> None:
  """Raises unless ``value`` is in [0, 1) (arrays pass: they may be traced)."""
  _check_number(name, value, lambda v: 0.0 <= v < 1.0, "in [0, 1)")


def check_non_negative(name: str, value: Any) -> None:
  """Raises unless ``value`` >= 0 (arrays pass: they may be traced)."""
  _check_number(name, value, lambda v: v >= 0.0, ">= 0")


def schedule_or(check: Validator) -> Validator:
  """A validator that accepts a schedule (a callable of the step) or what ``check`` accepts."""

  def validate(name: str, value: Any) -> None:
    if not callable(value):
      check(name, value)

  return validate


def _check_int(name: str, value: Any, ok: Callable[[int], bool], allowed: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    hint = (
        " (under optax.inject_hyperparams, list it in static_args)" if _is_array(value) else ""
    )
    raise TypeError(f"{name} must be a Python int{hint}, got {value!r} of type {type(value).__name__}.")
  if not ok(int(value)):
    raise ValueError(f"{name} must be {allowed}, got {value}.")


def check_optim_bits(name: str, value: Any) -> None:
  _check_int(name, value, lambda v: v in (8, 32), "8 or 32")


def check_block_size(name: str, value: Any) -> None:
  _check_int(name, value, lambda v: v > 0, "a positive int")


def check_min_8bit_size(name: str, value: Any) -> None:
  _check_int(name, value, lambda v: v >= 0, "a non-negative int")


QUANT_VALIDATORS: dict[str, Validator] = {
    "optim_bits": check_optim_bits,
    "block_size": check_block_size,
    "min_8bit_size": check_min_8bit_size,
}


def _check_param_dtype(label: str, dtype: Any) -> None:
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"optax8 optimizers need real floating parameters and updates; {label!r} has dtype "
        f"{jnp.dtype(dtype)} (allowed: float32, bfloat16, float16, float64)."
    )


def _block_size_if_quantized(shape: tuple[int, ...], options: Mapping[str, Any]) -> int | None:
  """The block size of a parameter's 8-bit moments, or ``None`` where they stay 32-bit."""
  quantize = options["optim_bits"] == 8 and len(shape) >= 1 and math.prod(shape) >= options["min_8bit_size"]
  return options["block_size"] if quantize else None


def _init_moment(
    param: Any, label: str, options: Mapping[str, Any], signed: bool, dtype: Any, initial: Any
) -> Any:
  """A moment of ``param``, placed like it (and typed like it under sharding-in-types)."""
  shape = tuple(param.shape)
  block_size = _block_size_if_quantized(shape, options)
  sharding = sharding_lib.named_sharding_of(param)
  if block_size is None:
    return jax.lax.full(shape, initial, dtype or jnp.float32, sharding=sharding)
  absmax_sharding = sharding and sharding.update(
      spec=sharding_lib.absmax_spec(label, sharding.spec, shape, block_size, sharding.mesh)
  )
  return qz.QuantizedArray.full(
      shape, block_size, signed, initial, sharding=sharding, absmax_sharding=absmax_sharding
  )


def _describe(block_size: int | None) -> str:
  return "32-bit state" if block_size is None else f"8-bit state of block size {block_size}"


def reference_leaf_update(
    family: Family,
    static: Mapping[str, Any],
    g: jax.Array,
    moments: Sequence[Any],
    scalars: Mapping[str, jax.Array],
) -> tuple[jax.Array, list[Any]]:
  """One parameter's update in pure ``jax.numpy``: the oracle for the native kernels."""
  g32 = g.astype(jnp.float32)
  finite = jnp.isfinite(g32)
  g32 = jnp.where(finite, g32, 0.0)
  old = [qz.dequantize_blockwise(m) if qz.is_quantized(m) else m.astype(jnp.float32) for m in moments]
  update, new = family.elementwise(g32, tuple(old), **scalars, **static)
  # A moment that overflows (e.g. g**2 > float32 max) resets like a non-finite gradient.
  for after in new:
    finite &= jnp.isfinite(after)
  update = jnp.where(finite, update, 0.0).astype(g.dtype)
  stored = []
  for before, after in zip(moments, new):
    after = jnp.where(finite, after, 0.0)
    if qz.is_quantized(before):
      stored.append(qz.quantize_blockwise(after, before.block_size, signed=before.signed))
    else:
      stored.append(after.astype(before.dtype))
  return update, stored


def moment_transform(
    family: Family,
    state_cls: type,
    hyperparams: Mapping[str, Any],
    validators: Mapping[str, Validator],
    *,
    static: Mapping[str, Any] | None = None,
    moment_dtypes: Sequence[Any] | None = None,
    optim_bits: int | None,
    block_size: int | None,
    min_8bit_size: int | None,
    overrides: labels_lib.Overrides | None,
    param_labels: labels_lib.LabelSpec,
) -> optax.GradientTransformationExtraArgs:
  """Builds an 8-bit transformation for ``family``.

  Args:
    family: the update math.
    state_cls: a NamedTuple whose fields are ``count`` (if present) and one field per moment,
      in the family's moment order.
    hyperparams: the family's hyperparameters (floats or arrays, e.g. injected).
    validators: a validator per hyperparameter name; also the per-label overridable names.
    static: static options passed to the family's elementwise math (e.g. ``nesterov``).
    moment_dtypes: dtype of each moment's 32-bit state (``None`` entries: float32).
    optim_bits: 8 or 32, the default for every parameter (``None``: 8).
    block_size: default quantization block size (``None``: 256).
    min_8bit_size: parameters with fewer elements (global size) keep 32-bit state
      (``None``: 4096).
    overrides: label pattern -> option dict.
    param_labels: labels tree or callable; ``None`` for the tree paths.
  """
  static = dict(static or {})
  optim_bits = DEFAULT_OPTIM_BITS if optim_bits is None else optim_bits
  block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
  min_8bit_size = DEFAULT_MIN_8BIT_SIZE if min_8bit_size is None else min_8bit_size
  for name, value in hyperparams.items():
    validators[name](name, value)
  check_optim_bits("optim_bits", optim_bits)
  check_block_size("block_size", block_size)
  check_min_8bit_size("min_8bit_size", min_8bit_size)
  overrides = labels_lib.validate_overrides(overrides, {**QUANT_VALIDATORS, **validators})
  defaults = {
      **hyperparams, "optim_bits": optim_bits, "block_size": block_size, "min_8bit_size": min_8bit_size,
  }
  fields = tuple(state_cls._fields)
  has_count = fields[0] == "count"
  moment_fields = fields[1:] if has_count else fields
  moment_dtypes = tuple(moment_dtypes or (None,) * len(family.signed))

  def options_for(params):
    labels = labels_lib.resolve_labels(params, param_labels)
    return labels, labels_lib.leaf_options(labels, defaults, overrides)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    labels, options = options_for(params)
    for label, leaf in zip(labels, leaves):
      _check_param_dtype(label, leaf.dtype)
    initial = family.initial or (None,) * len(family.signed)
    trees = [
        treedef.unflatten(
            [
                _init_moment(p, label, o, signed, dtype, o[init] if init else 0.0)
                for p, label, o in zip(leaves, labels, options)
            ]
        )
        for signed, dtype, init in zip(family.signed, moment_dtypes, initial)
    ]
    count = (jnp.zeros([], jnp.int32),) if has_count else ()
    return state_cls(*count, *trees)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if not isinstance(state, state_cls):
      raise TypeError(
          f"{family.name}: expected a {state_cls.__name__} state, got {type(state).__name__}; "
          "was the state made by another optimizer?"
      )
    g_leaves, treedef = jax.tree.flatten(updates)
    labels, options = options_for(updates)
    moments = []
    for field in moment_fields:
      leaves, moment_def = jax.tree.flatten(getattr(state, field), is_leaf=qz.is_quantized)
      if moment_def != treedef:
        raise ValueError(
            f"{state_cls.__name__}.{field} does not match the updates' tree structure: the "
            f"state has {moment_def}, the updates {treedef}."
        )
      moments.append(leaves)
    for i, (label, g) in enumerate(zip(labels, g_leaves)):
      _check_param_dtype(label, g.dtype)
      for field, leaves in zip(moment_fields, moments):
        if tuple(leaves[i].shape) != tuple(g.shape):
          raise ValueError(
              f"{state_cls.__name__}.{field} for {label!r} has shape {tuple(leaves[i].shape)}, "
              f"but its update has shape {tuple(g.shape)}."
          )
        held = leaves[i].block_size if qz.is_quantized(leaves[i]) else None
        expected = _block_size_if_quantized(tuple(g.shape), options[i])
        if held != expected:
          raise ValueError(
              f"{state_cls.__name__}.{field} for {label!r} holds {_describe(held)}, but this "
              f"optimizer expects {_describe(expected)}; was the state made with other options?"
          )
    count = optax.safe_increment(state.count) if has_count else jnp.ones([], jnp.int32)
    hyper_names = tuple(hyperparams)
    new_updates, new_moments = [], [[] for _ in moment_fields]
    leaf_update = functools.partial(native.leaf_update, reference_leaf_update, family, static)
    for i, g in enumerate(g_leaves):
      scalars = family.scalars(count, **{k: options[i][k] for k in hyper_names})
      u, stored = sharding_lib.in_whole_blocks(leaf_update, g, [leaves[i] for leaves in moments], scalars)
      new_updates.append(u)
      for acc, s in zip(new_moments, stored):
        acc.append(s)
    trees = [treedef.unflatten(leaves) for leaves in new_moments]
    new_state = state_cls(*((count,) if has_count else ()), *trees)
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
