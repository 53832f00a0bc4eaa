"""Optimizer state kept in host memory between steps (bitsandbytes' paged optimizers).

One rule decides which state leaves live in host memory, for :func:`offload` and for
:func:`optax8.state_sharding`'s ``memory_kind``: a leaf with at least ``min_size`` elements
(a :class:`~optax8.QuantizedArray` counts its codes', and its codes and absmax move together).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, SingleDeviceSharding

from optax8._src import quantization as qz

__all__ = ["DEFAULT_MIN_SIZE", "check_memory_kind", "check_min_size", "is_offloaded", "offload"]

# bitsandbytes pages only tensors of at least 1e5 elements: below that, the transfers' fixed
# cost outweighs the memory they free.
DEFAULT_MIN_SIZE = 100_000

# The memory kinds that ``jax.memory.Space`` names, hence the only ones an array can be moved to
# inside ``jit`` (JAX types any other kind, such as ``unpinned_host``, as device memory there).
_SPACES = {"device": jax.memory.Space.Device, "pinned_host": jax.memory.Space.Host}


def _device_kinds() -> list[str]:
  return [m.kind for m in jax.devices()[0].addressable_memories()]


def _allowed_kinds() -> list[str]:
  kinds = _device_kinds()
  return [kind for kind in _SPACES if kind in kinds]


def check_memory_kind(memory_kind: Any, *, devices: bool = True) -> None:
  """Raises unless ``memory_kind`` is a memory kind that offloaded state can live in.

  Args:
    memory_kind: the kind to check.
    devices: also check that ``jax.devices()[0]`` has a memory of that kind (which starts JAX's
      backend; without it, only the error message reads the devices).
  """
  if not isinstance(memory_kind, str):
    raise TypeError(f"memory_kind must be a str, got {memory_kind!r} of type {type(memory_kind).__name__}.")
  if memory_kind in _SPACES and (not devices or memory_kind in _device_kinds()):
    return
  why = ""
  if memory_kind in _device_kinds():
    why = " (the devices have it, but inside jit JAX can place arrays only in the kinds jax.memory.Space names)"
  raise ValueError(
      f"memory_kind must be one of {_allowed_kinds()} (memory kinds of {jax.devices()[0]} that JAX can place "
      f"an array in inside jit), got {memory_kind!r}{why}."
  )


def check_min_size(min_size: Any) -> None:
  """Raises unless ``min_size`` is a non-negative int."""
  if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)):
    raise TypeError(f"min_size must be a non-negative int, got {min_size!r} of type {type(min_size).__name__}.")
  if min_size < 0:
    raise ValueError(f"min_size must be a non-negative int, got {min_size}.")


def is_offloaded(leaf: Any, min_size: int) -> bool:
  """Whether a state leaf lives in host memory: it has at least ``min_size`` elements.

  ``leaf`` is an array, a ``jax.ShapeDtypeStruct`` or a :class:`~optax8.QuantizedArray` (its
  codes' elements: codes and absmax follow one decision, so a moment is never split between
  memories). Leaves without a shape (Python scalars) stay where they are.
  """
  shape = getattr(leaf, "shape", None)
  return shape is not None and math.prod(shape) >= min_size


def _concrete_sharding(x: Any) -> NamedSharding | SingleDeviceSharding | None:
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    sharding = x.sharding
    if isinstance(sharding, (NamedSharding, SingleDeviceSharding)):
      return sharding
  return None


def _in_host(x: Any) -> bool:
  """Whether an array (or tracer) lives outside device memory."""
  if isinstance(x, jax.core.Tracer):
    return jax.typeof(x).memory_space == jax.memory.Space.Host
  kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
  return kind not in (None, "device")


def _put(x: Any, memory_kind: str) -> Any:
  """``x`` in ``memory_kind``, with its sharding's spec."""
  sharding = _concrete_sharding(x)
  if sharding is not None:  # an array: its own sharding, in the other memory
    return jax.device_put(x, sharding.with_memory_kind(memory_kind))
  # A tracer (jit, eval_shape): its type's memory space; the partitioner keeps the sharding.
  return jax.device_put(x, _SPACES[memory_kind])


def offload(
    tx: optax.GradientTransformation, *, memory_kind: str = "pinned_host", min_size: int = DEFAULT_MIN_SIZE
) -> optax.GradientTransformationExtraArgs:
  """Keeps ``tx``'s large state leaves in host memory between steps (bitsandbytes' paged optimizers).

  The rule: every state leaf with at least ``min_size`` elements lives in ``memory_kind``
  (a :class:`~optax8.QuantizedArray` counts its codes' elements and moves whole, codes and
  absmax); smaller leaves (step counts, biases' moments, hyperparameters) stay in device
  memory. ``init`` places the leaves; ``update`` moves each host leaf to the device, runs
  ``tx``'s update there, and moves each large new leaf back, one transfer per leaf, so that
  XLA can overlap one leaf's transfer with another's update. A leaf keeps its sharding's
  spec; only its memory kind changes. The state's structure is ``tx``'s own, so checkpoints
  move freely between ``tx`` and ``offload(tx)``.

  It is bitsandbytes' ``is_paged=True`` (``PagedAdamW8bit`` is
  ``offload(optax8.adamw8bit(...))``), with XLA's explicit transfers instead of CUDA unified
  memory, and bitsandbytes' threshold: it pages tensors of at least 1e5 elements. Any optax
  transformation can be offloaded, ``optax.adam`` or a whole ``optax.chain`` included.

  ``init`` works eagerly, under ``jit`` and under ``jax.eval_shape`` (whose
  ``ShapeDtypeStruct``\\ s carry no memory kind: take the shardings, memory kinds included,
  from ``optax8.state_sharding(abstract_state, params_sharding, memory_kind=memory_kind,
  min_size=min_size)``, which applies this same rule, for ``out_shardings`` or an Orbax
  restore target). ``update`` works eagerly and under ``jit``, with the state donated.

  Donating the state: JAX gives each donated buffer to an output of its shape and dtype, and
  tells host from device memory only when it knows the memory kind of every argument
  (committed arrays: placed with a sharding, or results of ``jit``) and of every output
  (``out_shardings``, or the types of an Explicit mesh under ``jax.set_mesh``). Otherwise a host
  buffer can go to a device output of the same shape, such as an update of
  ``jax.jit(tx.update, donate_argnums=1)``, and JAX 0.10 aborts the process. So jit a donating
  step with ``out_shardings`` (the state's from ``optax8.state_sharding``), or return the
  donated arguments first and in their order (``(params, state, ...)`` from
  ``step(params, state, ...)`` with both donated), which JAX pairs by position.

  Args:
    tx: the transformation whose state to offload.
    memory_kind: where large leaves live between steps: ``"pinned_host"`` (page-locked host
      memory, which the device reads and writes directly), or ``"device"`` (offloading
      nothing). The devices must have that memory (``jax.devices()[0].addressable_memories()``).
    min_size: leaves with fewer elements stay in device memory, a non-negative int.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` forwards ``params`` and any
    extra arguments to ``tx``'s.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax8
    >>> tx = optax8.offload(optax8.adamw8bit(1e-3), min_size=4096)
    >>> params = {"w": jnp.zeros((64, 256)), "b": jnp.zeros((256,))}
    >>> state = tx.init(params)
    >>> mu = state[0].mu
    >>> mu["w"].codes.sharding.memory_kind, mu["w"].absmax.sharding.memory_kind, mu["b"].sharding.memory_kind
    ('pinned_host', 'pinned_host', 'device')
    >>> def train_step(params, state, grads):
    ...   updates, state = tx.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> params, state = jax.jit(train_step, donate_argnums=(0, 1))(params, state, grads)
    >>> state[0].mu["w"].codes.sharding.memory_kind
    'pinned_host'
  """
  if not isinstance(tx, optax.GradientTransformation):
    hint = " (pass its .gradient_transformation())" if hasattr(tx, "gradient_transformation") else ""
    raise TypeError(
        f"tx must be an optax.GradientTransformation (such as optax8.adamw8bit(...) or optax.adam(...)), "
        f"got {tx!r} of type {type(tx).__name__}{hint}."
    )
  check_memory_kind(memory_kind, devices=False)  # the devices once init runs, after jax.distributed starts
  check_min_size(min_size)
  inner = optax.with_extra_args_support(tx)

  def to_host(state: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.tree.map(lambda a: _put(a, memory_kind), x) if is_offloaded(x, min_size) else x,
        state,
        is_leaf=qz.is_quantized,
    )

  def init_fn(params: Any) -> Any:
    check_memory_kind(memory_kind)
    return to_host(inner.init(params))

  def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
    moved = {}  # id(device copy) -> (device copy, host original)

    def to_device(x: Any) -> Any:
      if not _in_host(x):
        return x
      on_device = _put(x, "device")
      moved[id(on_device)] = (on_device, x)
      return on_device

    updates, new_state = inner.update(updates, jax.tree.map(to_device, state), params, **extra_args)

    def back(x: Any) -> Any:
      # A leaf the update passed through unchanged goes back as its host original: no transfer.
      on_device, original = moved.get(id(x), (None, None))
      return original if on_device is x else _put(x, memory_kind)

    return updates, jax.tree.map(
        lambda x: jax.tree.map(back, x) if is_offloaded(x, min_size) else x, new_state, is_leaf=qz.is_quantized
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
