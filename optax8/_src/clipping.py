"""Per-tensor percentile clipping of gradients (bitsandbytes' ``percentile_clipping``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["PercentileClippingState", "percentile_clipping"]


class PercentileClippingState(NamedTuple):
  """State of :func:`percentile_clipping`.

  Attributes:
    count: steps taken.
    history: params-shaped tree of float32 ``[history]`` arrays, the last squared norms.
  """

  count: jax.Array
  history: Any


def percentile_clipping(percentile: int = 95, history: int = 100) -> optax.GradientTransformation:
  r"""Clips each tensor's gradient to a percentile of its own recent gradient norms.

  Per parameter, at step :math:`t` (1-based): the squared norm :math:`n_t = \|g_t\|^2` is
  written to slot :math:`t \bmod H` of a ring of :math:`H` = ``history`` squared norms (at
  :math:`t = 1` to every slot). With the ring sorted ascending, the clip value is
  :math:`c = \sqrt{\mathrm{sorted}[k]}`, :math:`k = \lfloor \mathrm{percentile} \cdot H / 100
  \rfloor` (the largest for ``percentile=100``), and the gradient is scaled by
  :math:`c / \sqrt{n_t}` when :math:`\sqrt{n_t} > c`. With the default ``history=100``, ``k``
  is the percentile itself, as in bitsandbytes (before 0.50), where ``percentile=100``
  disables clipping. Chain it before the optimizer.

  Args:
    percentile: an int in [0, 100].
    history: the number of past steps kept, a positive int.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax, optax8
    >>> tx = optax.chain(optax8.percentile_clipping(5), optax8.adam8bit(1e-3))
    >>> state = tx.init({"w": jnp.zeros((64, 64))})
    >>> state[0].history["w"].shape
    (100,)
  """
  if isinstance(percentile, bool) or not isinstance(percentile, int) or not 0 <= percentile <= 100:
    raise ValueError(f"percentile must be an int in [0, 100], got {percentile!r}.")
  if isinstance(history, bool) or not isinstance(history, int) or history <= 0:
    raise ValueError(f"history must be a positive int, got {history!r}.")
  index = min(percentile * history // 100, history - 1)

  def init_fn(params):
    return PercentileClippingState(
        count=jnp.zeros([], jnp.int32),
        history=jax.tree.map(lambda _: jnp.zeros([history], jnp.float32), params),
    )

  def clip(g, ring, count):
    norm2 = jnp.sum(jnp.square(g.astype(jnp.float32)))
    ring = jnp.where(count == 1, jnp.full_like(ring, norm2), ring.at[count % history].set(norm2))
    current = jnp.sqrt(norm2)
    limit = jnp.sqrt(jnp.sort(ring)[index])
    scale = jnp.where(current > limit, limit / current, 1.0)
    return (g * scale).astype(g.dtype), ring

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    pairs = jax.tree.map(lambda g, ring: clip(g, ring, count), updates, state.history)
    is_pair = lambda x: isinstance(x, tuple)
    clipped = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
    rings = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
    return clipped, PercentileClippingState(count, rings)

  return optax.GradientTransformation(init_fn, update_fn)
