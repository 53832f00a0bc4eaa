"""Per-tensor clipping: of gradients by a percentile of their recent norms (bitsandbytes'
``percentile_clipping``), and of updates relative to their parameters' norms (its ``max_unorm``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax8._src import integrations

__all__ = ["PercentileClippingState", "clip_by_unorm", "percentile_clipping", "unorm_clipped"]


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
    # One plain array per parameter: a Flax box's sharding names are for the parameter's shape.
    return PercentileClippingState(
        count=jnp.zeros([], jnp.int32),
        history=jax.tree.map(lambda _: jnp.zeros([history], jnp.float32), params, is_leaf=integrations.is_array_box),
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
    boxes, treedef = jax.tree.flatten(updates, is_leaf=integrations.is_array_box)
    pairs = [clip(integrations.unbox(g), ring, count) for g, ring in zip(boxes, treedef.flatten_up_to(state.history))]
    clipped = treedef.unflatten([integrations.rebox(box, g) for box, (g, _) in zip(boxes, pairs)])
    return clipped, PercentileClippingState(count, treedef.unflatten([ring for _, ring in pairs]))

  return optax.GradientTransformation(init_fn, update_fn)


def _norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def unorm_clipped(update: jax.Array, param: jax.Array, max_unorm: Any) -> jax.Array:
  r"""``update`` scaled by :math:`\min(1, \text{max\_unorm}\,\|p\|_2 / \|u\|_2)`, bitsandbytes' rule.

  The scale is 1 where ``max_unorm`` is 0 or the update is zero, and 0 where the parameter is
  zero and the update is not (so a zero-initialised parameter never moves; exempt it by label).
  Norms are float32 over the whole tensor: under sharding, one all-reduce of a scalar each.
  """
  unorm, limit = _norm(update), max_unorm * _norm(param)
  clip = (max_unorm > 0) & (unorm > limit)
  scale = jnp.where(clip, limit / jnp.where(clip, unorm, 1.0), 1.0)
  return (update.astype(jnp.float32) * scale).astype(update.dtype)


def clip_by_unorm(max_unorm: float) -> optax.GradientTransformation:
  r"""Clips each update tensor's norm to ``max_unorm`` times its parameter's norm.

  bitsandbytes' ``max_unorm`` as a transformation for chains: per tensor, with :math:`u` the
  incoming update and :math:`p` the parameter,

  .. math::
    u \leftarrow u \cdot \min\Big(1, \frac{\text{max\_unorm}\,\|p\|_2}{\|u\|_2}\Big)

  (1 where ``max_unorm`` is 0 or :math:`u = 0`). Chain it right after the optimizer's scaling
  and before weight decay and the learning rate, where bitsandbytes applies it; the aliases'
  ``max_unorm`` keyword does exactly that, per label. ``update`` needs the params.

  Args:
    max_unorm: a float >= 0 (0: no clipping), or an array (e.g. injected).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax, optax8
    >>> tx = optax.chain(optax.scale_by_adam(), optax8.clip_by_unorm(0.01))
    >>> params = {"w": jnp.ones((4, 4))}
    >>> updates, _ = tx.update({"w": jnp.ones((4, 4))}, tx.init(params), params)
    >>> round(float(jnp.linalg.norm(updates["w"])), 4)  # 0.01 * |p| = 0.04
    0.04
  """
  if isinstance(max_unorm, bool) or not (
      isinstance(max_unorm, (int, float, np.number)) or (hasattr(max_unorm, "dtype") and jnp.ndim(max_unorm) == 0)
  ):
    raise TypeError(f"max_unorm must be a float >= 0, got {max_unorm!r} of type {type(max_unorm).__name__}.")
  if isinstance(max_unorm, (int, float, np.number)) and not max_unorm >= 0:
    raise ValueError(f"max_unorm must be >= 0, got {max_unorm}.")

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "clip_by_unorm clips updates relative to the parameters' norms: call update(grads, state, params)."
      )
    return jax.tree.map(lambda u, p: unorm_clipped(u, p, max_unorm), updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
