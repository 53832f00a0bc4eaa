"""Calling a native kernel: one parameter's update as one XLA FFI call.

The call's operands, results and attributes are ``custom_calls/optax8_ffi.h``'s: the gradient,
the family's per-step scalars (in ``Family.scalar_names``' order), then each moment's codes and
absmax; the update and the new codes and absmax alias them, so the update runs in place when
the caller donates the state. The fused apply step (the ``apply`` flag) also takes the parameter,
after the state, and returns the new parameter in its place (aliasing it) instead of the update.
Each device updates its own blocks (``sharding.partitioned_by_blocks``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax8._src import native_library, update_math
from optax8._src import quantization as qz
from optax8._src import sharding as sharding_lib

__all__ = ["KERNEL_DTYPES", "applies", "update"]

KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _scalar_names(family: update_math.Family, static: Mapping[str, Any]) -> tuple[str, ...]:
  return family.scalar_names + (update_math.APPLY_SCALARS if static.get("apply") else ())


def applies(family: update_math.Family, static: Mapping[str, Any], g: jax.Array, moments: Sequence[Any],
            scalars: Mapping[str, Any], param: jax.Array | None = None) -> bool:
  """Whether a kernel computes this update (where one is usable)."""
  flags = set(family.flags) | set(update_math.COMMON_FLAGS)
  return (
      set(scalars) == set(_scalar_names(family, static))
      and (param is None or (jnp.dtype(param.dtype) in KERNEL_DTYPES and param.shape == g.shape))
      and all(jnp.ndim(v) == 0 for v in scalars.values())
      and set(static) <= flags
      and all(qz.is_quantized(m) for m in moments)
      and tuple(m.signed for m in moments) == tuple(family.signed)
      and len({m.block_size for m in moments}) == 1
      and moments[0].block_size is not None  # one absmax per tensor: a two-pass update, the reference's
      and jnp.dtype(g.dtype) in KERNEL_DTYPES
  )


def update(family: update_math.Family, static: Mapping[str, Any], g: jax.Array,
           moments: Sequence[qz.QuantizedArray], scalars: Mapping[str, jax.Array], param: jax.Array | None = None
           ) -> tuple[jax.Array, list[qz.QuantizedArray]]:
  """One parameter's update (or, given ``param`` under ``apply``, its new value) as one FFI call
  (CPU or CUDA kernel), on each device's own blocks.

  The kernels take a parameter of the gradient's dtype or of float32 (with a 16-bit gradient, the
  kernel reads each as it is); for any other pair both are converted to float32, exactly, and the
  new parameter is rounded back once, as the reference computes it.
  """
  param_dtype = None if param is None else param.dtype
  if param is not None and jnp.dtype(param.dtype) not in (jnp.dtype(g.dtype), jnp.dtype(jnp.float32)):
    g, param = g.astype(jnp.float32), param.astype(jnp.float32)
  hp = jnp.stack([jnp.asarray(scalars[name], jnp.float32) for name in _scalar_names(family, static)])
  state = [x for m in moments for x in (m.codes, m.absmax)]
  tensors = [] if param is None else [param]
  attributes = dict(
      family=family.name,
      block_size=np.int64(moments[0].block_size),
      flags=np.int64(sum(bit for name, bit in update_math.FLAG_BITS.items() if static.get(name))),
      signed=np.int64(sum(1 << k for k, m in enumerate(moments) if m.signed)),
  )

  def call(g, hp, *state_and_param):
    state = state_and_param[: 2 * len(moments)]
    first = state_and_param[-1] if tensors else g
    return jax.ffi.ffi_call(
        native_library.TARGET,
        # Typed like the operands: shardings (sharding-in-types) and manual axes (shard_map).
        [jax.typeof(x) for x in (first, *state)],
        # In place: the update overwrites g (the new parameter the parameter), the new state the
        # old one (given donation).
        input_output_aliases={2 + len(state) if tensors else 0: 0, **{i + 2: i + 1 for i in range(len(state))}},
    )(g, hp, *state_and_param, **attributes)

  # Partitioned with the operands' sharding; under vmap, batched operands are more rows.
  new_update, *new_state = sharding_lib.partitioned_by_blocks(call, moments[0].block_size, len(tensors))(
      g, hp, *state, *tensors)
  if param_dtype is not None:
    new_update = new_update.astype(param_dtype)
  return new_update, [
      qz.QuantizedArray(new_state[2 * k], new_state[2 * k + 1], m.block_size, m.signed)
      for k, m in enumerate(moments)
  ]
