"""The transformation engine shared by every 8-bit optimizer.

``moment_transform`` turns a :class:`~optax8._src.update_math.Family` into an optax
``GradientTransformationExtraArgs`` whose state holds one tree per moment. Each leaf of a
moment tree is a :class:`~optax8.QuantizedArray` (8-bit) or a plain array (32-bit), decided
per parameter at ``init`` from its label's options and its global size.

Per step and per parameter the update is: dequantize the moments, run the family's float32
math, re-quantize. A non-finite gradient element (or one whose new moments overflow) resets
that element's moments to zero and gets a zero update, so one bad element never poisons its
block's absmax (a departure from optax, which propagates NaN per element).

Two options change the update itself, per parameter by label like the quantization options:
``skip_zeros`` (bitsandbytes' lazy update for sparse gradients: an element whose gradient is
exactly zero keeps its moments and gets a zero update, and a block whose gradient is zero
throughout keeps its codes and absmax bit for bit) and ``max_unorm`` (bitsandbytes' update-norm
clipping relative to the parameter's norm, :func:`optax8._src.clipping.unorm_clipped`).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax8._src import clipping, integrations, native, update_math
from optax8._src import labels as labels_lib
from optax8._src import quantization as qz
from optax8._src import sharding as sharding_lib
from optax8._src.update_math import Family

__all__ = ["check_beta", "check_bool", "check_non_negative", "moment_transform", "schedule_or"]

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


def check_bool(name: str, value: Any) -> None:
  """Raises unless ``value`` is a bool (a static option)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}.")


def schedule_or(check: Validator) -> Validator:
  """A validator that accepts a schedule (a callable of the step) or what ``check`` accepts."""

  def validate(name: str, value: Any) -> None:
    if not callable(value):
      check(name, value)

  return validate


class _Sentinel:
  def __init__(self, name: str):
    self.name = name

  def __repr__(self) -> str:
    return f"<{self.name}>"


# An integer option that ``optax.inject_hyperparams`` passes traced, from its state, to ``update``.
# The options' values then are the ones ``init`` was given, which the state's structure records
# (each moment's bits and block size), so ``update`` reads them from the state.
TRACED = _Sentinel("traced")
# A parameter whose moments stay float32 (see _layout).
FLOAT32 = _Sentinel("float32")


def _check_int(name: str, value: Any, ok: Callable[[int], bool], allowed: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")
  if not ok(int(value)):
    raise ValueError(f"{name} must be {allowed}, got {value}.")


def _int_option(name: str, value: Any, default: int, check: Validator) -> int | _Sentinel:
  """An integer quantization option as a Python int (``None``: ``default``), or :data:`TRACED`.

  ``optax.inject_hyperparams`` hands integer options over as integer arrays: concrete ones
  (its ``init``) become ints; traced ones (its ``update`` under ``jit``) are :data:`TRACED`.
  """
  if value is None:
    return default
  if _is_array(value) and jnp.ndim(value) == 0 and jnp.issubdtype(jnp.result_type(value), jnp.integer):
    try:
      value = int(value)
    except jax.errors.ConcretizationTypeError:
      return TRACED
  check(name, value)
  return int(value)


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
    "block_wise": check_bool,
    "stochastic_rounding": check_bool,
}
# Options of the update itself (None for max_unorm: off, and static under inject_hyperparams).
UPDATE_VALIDATORS: dict[str, Validator] = {"skip_zeros": check_bool, "max_unorm": check_non_negative}


def _check_param_dtype(label: str, dtype: Any) -> None:
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"optax8 optimizers need real floating parameters and updates; {label!r} has dtype "
        f"{jnp.dtype(dtype)} (allowed: float32, bfloat16, float16, float64)."
    )


def _layout(shape: tuple[int, ...], options: Mapping[str, Any]) -> int | None | _Sentinel:
  """How a parameter's moments are stored: the block size of its 8-bit moments (``None``: one
  absmax for the tensor, ``block_wise=False``), or :data:`FLOAT32`.

  Scalars and empty parameters stay 32-bit. :data:`TRACED` where an option that decides it is.
  """
  if any(options[name] is TRACED for name in QUANT_VALIDATORS):
    return TRACED
  size = math.prod(shape)
  quantize = options["optim_bits"] == 8 and len(shape) >= 1 and size > 0 and size >= options["min_8bit_size"]
  if not quantize:
    return FLOAT32
  return options["block_size"] if options["block_wise"] else None


def _init_moment(
    param: Any, label: str, options: Mapping[str, Any], signed: bool, dtype: Any, initial: Any
) -> Any:
  """A moment of ``param``, placed like it (and typed like it under sharding-in-types)."""
  shape = tuple(jnp.shape(param))
  block_size = layout = _layout(shape, options)
  if layout is TRACED:
    raise TypeError(
        f"optax8: the quantization options of {label!r} are traced while the state is initialised "
        f"({ {k: options[k] for k in QUANT_VALIDATORS} }); they decide the state's structure, so pass Python ints."
    )
  sharding = sharding_lib.named_sharding_of(param)
  if layout is FLOAT32:
    return jax.lax.full(shape, initial, dtype or jnp.float32, sharding=sharding)
  absmax_sharding = sharding and sharding.update(
      spec=sharding_lib.absmax_spec(label, sharding.spec, shape, block_size, sharding.mesh)
  )
  return qz.QuantizedArray.full(
      shape, block_size, signed, initial, sharding=sharding, absmax_sharding=absmax_sharding
  )


def _describe(layout: int | None | _Sentinel) -> str:
  if layout is FLOAT32:
    return "32-bit state"
  return "8-bit state with one absmax per tensor" if layout is None else f"8-bit state of block size {layout}"


def reference_leaf_update(
    family: Family,
    static: Mapping[str, Any],
    g: jax.Array,
    moments: Sequence[Any],
    scalars: Mapping[str, jax.Array],
    param: jax.Array | None = None,
) -> tuple[jax.Array, list[Any]]:
  """One parameter's update in pure ``jax.numpy``: the oracle for the native kernels.

  ``static`` may also hold ``skip_zeros``, ``stochastic_rounding`` (then ``scalars`` holds the
  step's ``rounding_seed``, a uint32) and ``apply``: the fused apply step, which clips the
  gradient, applies the update to ``param`` with ``scalars``' ``update_math.APPLY_SCALARS`` and
  returns the new parameter in the update's place.
  """
  static, scalars = dict(static), dict(scalars)
  skip_zeros = static.pop("skip_zeros", False)
  seed = scalars.pop("rounding_seed") if static.pop("stochastic_rounding", False) else None
  apply = {name: scalars.pop(name) for name in update_math.APPLY_SCALARS} if static.pop("apply", False) else None
  g32 = g.astype(jnp.float32)
  if apply is not None:
    g32 = update_math.clipped_gradient(g32, clip_norm=apply["clip_norm"], clip_max=apply["clip_max"])
  finite = jnp.isfinite(g32)
  # Neither ±0 nor subnormal, from the bits, as the kernels decide (optax8_math.h's NonZero):
  # XLA:CPU computes with subnormals as zeros, XLA:GPU does not. NaN is touched: it resets below.
  magnitude = jax.lax.bitcast_convert_type(g32, jnp.uint32) & np.uint32(0x7FFFFFFF)
  touched = magnitude >= np.uint32(0x00800000)
  g32 = jnp.where(finite, g32, 0.0)
  old = [qz.dequantize_blockwise(m) if qz.is_quantized(m) else m.astype(jnp.float32) for m in moments]
  update, new = family.elementwise(g32, tuple(old), **scalars, **static)
  if skip_zeros:
    update = jnp.where(touched, update, 0.0)
    new = [jnp.where(touched, after, before) for before, after in zip(old, new)]
  # A moment that overflows (e.g. g**2 > float32 max) resets like a non-finite gradient.
  for after in new:
    finite &= jnp.isfinite(after)
  update = jnp.where(finite, update, 0.0)
  if apply is None:
    update = update.astype(g.dtype)
  else:
    update = update_math.applied_parameter(param.astype(jnp.float32), update, step_size=apply["step_size"],
                                           weight_decay=apply["weight_decay"]).astype(param.dtype)
  stored = []
  for k, (before, after) in enumerate(zip(moments, new)):
    after = jnp.where(finite, after, 0.0)
    if qz.is_quantized(before):
      bits = None if seed is None else qz.rounding_bits(seed + np.uint32(0x632BE5AB * k % 2**32), after)
      q = qz.quantize_blockwise(after, before.block_size, signed=before.signed, rounding_bits=bits)
      stored.append(qz.keep_untouched_blocks(q, before, touched) if skip_zeros else q)
    else:
      stored.append(after.astype(before.dtype))
  return update, stored


def _unorm_off(max_unorm: Any) -> bool:
  return max_unorm is None or (labels_lib.is_static_number(max_unorm) and float(max_unorm) == 0.0)


def _params_for_unorm(params: Any, treedef: Any, labels: Sequence[str], options: Sequence[Mapping[str, Any]]) -> list:
  """Each parameter where its update is clipped by ``max_unorm``, else ``None``."""
  clipped = [not _unorm_off(o["max_unorm"]) for o in options]
  if not any(clipped):
    return [None] * len(options)
  if params is None:
    first = labels[clipped.index(True)]
    raise ValueError(
        f"max_unorm clips {first!r}'s update relative to the parameter's norm, so update() needs the params: "
        "call tx.update(grads, state, params)."
    )
  _, leaves = _param_leaves(params, treedef)
  return [p if c else None for p, c in zip(leaves, clipped)]


def _param_leaves(params: Any, treedef: Any) -> tuple[list, list]:
  """The params' leaves (Flax boxes as leaves) and their unboxed arrays, checked against ``treedef``."""
  boxes, params_def = jax.tree.flatten(params, is_leaf=integrations.is_array_box)
  if params_def != treedef:
    raise ValueError(f"params do not match the updates' tree structure: {params_def} and {treedef}.")
  return boxes, [jnp.asarray(integrations.unbox(p)) for p in boxes]


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
    block_wise: bool = True,
    stochastic_rounding: bool = False,
    skip_zeros: bool = False,
    max_unorm: float | None = None,
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
    block_wise: ``False`` for one absmax per tensor instead of one per block.
    stochastic_rounding: round the new moments up or down at random, unbiased, instead of to
      the nearest code.
    skip_zeros: leave elements with an exactly zero gradient alone (moments and update).
    max_unorm: clip each update's norm to ``max_unorm`` times its parameter's norm
      (``None`` or 0: off); the update then needs ``params``.
    overrides: label pattern -> option dict.
    param_labels: labels tree or callable; ``None`` for the tree paths.
  """
  static = dict(static or {})
  optim_bits = _int_option("optim_bits", optim_bits, DEFAULT_OPTIM_BITS, check_optim_bits)
  block_size = _int_option("block_size", block_size, DEFAULT_BLOCK_SIZE, check_block_size)
  min_8bit_size = _int_option("min_8bit_size", min_8bit_size, DEFAULT_MIN_8BIT_SIZE, check_min_8bit_size)
  for name, value in hyperparams.items():
    validators[name](name, value)
  check_bool("block_wise", block_wise)
  check_bool("stochastic_rounding", stochastic_rounding)
  check_bool("skip_zeros", skip_zeros)
  if max_unorm is not None:
    check_non_negative("max_unorm", max_unorm)
  overrides = labels_lib.validate_overrides(overrides, {**QUANT_VALIDATORS, **UPDATE_VALIDATORS, **validators})
  defaults = {
      **hyperparams, "optim_bits": optim_bits, "block_size": block_size, "min_8bit_size": min_8bit_size,
      "block_wise": bool(block_wise), "stochastic_rounding": bool(stochastic_rounding),
      "skip_zeros": bool(skip_zeros), "max_unorm": max_unorm,
  }
  fields = tuple(state_cls._fields)
  has_count = fields[0] == "count"
  moment_fields = fields[1:] if has_count else fields
  moment_dtypes = tuple(moment_dtypes or (None,) * len(family.signed))

  def options_for(params):
    labels = labels_lib.resolve_labels(params, param_labels)
    return labels, labels_lib.leaf_options(labels, defaults, overrides)

  def init_fn(params):
    # Flax boxes (NNX Variables, linen Partitioned) are leaves: each moment is boxed like its parameter.
    boxes, treedef = jax.tree.flatten(params, is_leaf=integrations.is_array_box)
    leaves = [integrations.unbox(x) for x in boxes]
    labels, options = options_for(params)
    for label, leaf in zip(labels, leaves):
      _check_param_dtype(label, jnp.result_type(leaf))
    initial = family.initial or (None,) * len(family.signed)
    trees = [
        treedef.unflatten(
            [
                integrations.box_like(box, _init_moment(p, label, o, signed, dtype, o[init] if init else 0.0), label)
                for box, p, label, o in zip(boxes, leaves, labels, options)
            ]
        )
        for signed, dtype, init in zip(family.signed, moment_dtypes, initial)
    ]
    count = (jnp.zeros([], jnp.int32),) if has_count else ()
    return state_cls(*count, *trees)

  def step(updates, state, params, apply):
    """The update (``apply`` None), or the fused apply step: ``apply`` holds, per leaf, the
    scalars ``update_math.APPLY_SCALARS`` and the first result is the new params."""
    if not isinstance(state, state_cls):
      raise TypeError(
          f"{family.name}: expected a {state_cls.__name__} state, got {type(state).__name__}; "
          "was the state made by another optimizer, or are the arguments in another order (tx.update(updates, "
          "state, params), optax8.fused(tx).step(params, state, grads))?"
      )
    # Boxed updates or state (Flax linen's TrainState) are unboxed here and reboxed on the way out.
    g_boxes, treedef = jax.tree.flatten(updates, is_leaf=integrations.is_array_box)
    g_leaves = [jnp.asarray(integrations.unbox(g)) for g in g_boxes]
    labels, options = options_for(updates)
    moments, moment_boxes = [], []
    for field in moment_fields:
      boxes, moment_def = jax.tree.flatten(
          getattr(state, field), is_leaf=lambda x: qz.is_quantized(x) or integrations.is_array_box(x)
      )
      leaves = [integrations.unbox(x) for x in boxes]
      if moment_def != treedef:
        raise ValueError(
            f"{state_cls.__name__}.{field} does not match the updates' tree structure: the "
            f"state has {moment_def}, the updates {treedef}."
        )
      moments.append(leaves)
      moment_boxes.append(boxes)
    for i, (label, g) in enumerate(zip(labels, g_leaves)):
      _check_param_dtype(label, g.dtype)
      for field, leaves in zip(moment_fields, moments):
        if qz.is_quantized(leaves[i]) and (leaves[i].codes.dtype, leaves[i].absmax.dtype) != (jnp.uint8, jnp.float32):
          raise TypeError(
              f"{state_cls.__name__}.{field} for {label!r} has codes of dtype {leaves[i].codes.dtype} and absmax "
              f"of dtype {leaves[i].absmax.dtype}; optax8 needs uint8 codes and float32 absmax (a function mapped "
              "over the state, for example by optax.tree_map_params, must leave quantized moments as they are)."
          )
        if tuple(leaves[i].shape) != tuple(g.shape):
          raise ValueError(
              f"{state_cls.__name__}.{field} for {label!r} has shape {tuple(leaves[i].shape)}, "
              f"but its update has shape {tuple(g.shape)}."
          )
        held = leaves[i].block_size if qz.is_quantized(leaves[i]) else FLOAT32
        expected = _layout(tuple(g.shape), options[i])
        if held != expected and expected is FLOAT32 and sharding_lib.in_shard_map():
          # Inside shard_map g is a shard, which may be below min_8bit_size where its parameter is not.
          expected = _layout(tuple(g.shape), {**options[i], "min_8bit_size": 0})
        if expected is not TRACED and held != expected:
          raise ValueError(
              f"{state_cls.__name__}.{field} for {label!r} holds {_describe(held)}, but this "
              f"optimizer expects {_describe(expected)}; was the state made with other options?"
          )
    if apply is None:
      p_leaves, p_boxes = _params_for_unorm(params, treedef, labels, options), g_boxes
    else:
      unorm = [label for label, o in zip(labels, options) if not _unorm_off(o["max_unorm"])]
      if unorm:
        raise ValueError(
            f"optax8.fused: max_unorm clips {unorm[0]!r}'s whole update by its norm before it is applied, "
            "which one pass over the parameter cannot do; use tx.update and optax.apply_updates."
        )
      p_boxes, p_leaves = _param_leaves(params, treedef)
    count = optax.safe_increment(state.count) if has_count else jnp.ones([], jnp.int32)
    hyper_names = tuple(hyperparams)
    new_updates, new_moments = [], [[] for _ in moment_fields]
    flags = {"apply": apply is not None}
    leaf_updates = {
        skip: functools.partial(native.leaf_update, reference_leaf_update, family,
                                {**static, "skip_zeros": True, **flags} if skip else {**static, **flags})
        for skip in (False, True)
    }
    # Stochastic rounding runs the reference: its bits are a hash of the step count, the label and
    # each element's global index and value, the same on every platform and mesh.
    rounded_updates = {
        skip: functools.partial(reference_leaf_update, family,
                                {**static, "skip_zeros": skip, "stochastic_rounding": True, **flags})
        for skip in (False, True)
    }
    scalars_of = {}  # leaves with the same hyperparameters share their scalars, traced once
    for i, g in enumerate(g_leaves):
      hyper = {k: options[i][k] for k in hyper_names}
      key = tuple(map(id, hyper.values()))  # the values live on in `options`
      if key not in scalars_of:
        scalars_of[key] = family.scalars(count, **hyper)
      scalars = scalars_of[key]
      leaf_update = leaf_updates[options[i]["skip_zeros"]]
      if options[i]["stochastic_rounding"]:
        leaf_update = rounded_updates[options[i]["skip_zeros"]]
        label_hash = np.uint32(zlib.crc32(labels[i].encode()))
        scalars = {**scalars, "rounding_seed": count.astype(jnp.uint32) * np.uint32(0x9E3779B1) ^ label_hash}
      if apply is not None:
        scalars = {**scalars, **apply[i]}
      u, stored = sharding_lib.in_whole_blocks(leaf_update, g, [leaves[i] for leaves in moments], scalars,
                                               None if apply is None else p_leaves[i])
      if apply is None and p_leaves[i] is not None:
        u = clipping.unorm_clipped(u, p_leaves[i], options[i]["max_unorm"])
      new_updates.append(integrations.rebox(p_boxes[i], u))
      for acc, boxes, s in zip(new_moments, moment_boxes, stored):
        acc.append(integrations.rebox(boxes[i], s))
    trees = [treedef.unflatten(leaves) for leaves in new_moments]
    new_state = state_cls(*((count,) if has_count else ()), *trees)
    return treedef.unflatten(new_updates), new_state

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return step(updates, state, params, None)

  # The fused apply step's entry (optax8._src.fused): (grads, state, params, apply) -> (params, state).
  update_fn.apply_step = step
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
