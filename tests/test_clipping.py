"""Percentile clipping against a direct NumPy statement of the same rule."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax8


def numpy_percentile_clipping(grads, percentile, history=100):
  ring = np.zeros(history, np.float32)
  out = []
  for t, g in enumerate(grads, start=1):
    n2 = np.float32(np.sum(np.square(g, dtype=np.float32)))
    if t == 1:
      ring[:] = n2
    else:
      ring[t % history] = n2
    current, clip = np.sqrt(n2), np.sqrt(np.sort(ring)[percentile * history // 100])
    out.append(g * (clip / current if current > clip else 1.0))
  return out


def test_percentile_clipping_matches_numpy_over_250_steps():
  rng = np.random.default_rng(0)
  # Norms that vary over orders of magnitude, so clipping engages often.
  grads = [rng.standard_normal((32, 64)).astype(np.float32) * np.float32(10 ** rng.uniform(-2, 2))
           for _ in range(250)]
  expected = numpy_percentile_clipping(grads, 5)
  tx = optax8.percentile_clipping(5)
  state = tx.init({"w": jnp.zeros((32, 64))})
  update = jax.jit(tx.update)
  clipped = 0
  for g, want in zip(grads, expected):
    got, state = update({"w": jnp.asarray(g)}, state)
    np.testing.assert_allclose(got["w"], want, rtol=2e-6)
    clipped += not np.allclose(want, g)
  assert clipped > 100


def test_percentile_100_never_clips_and_clipping_is_per_tensor():
  tx = optax8.percentile_clipping(100)
  grads = {"a": jnp.ones((4,)), "b": jnp.full((4,), 100.0)}
  state = tx.init(grads)
  for scale in [1.0, 1e3, 1e-3]:
    scaled = {k: g * scale for k, g in grads.items()}
    out, state = tx.update(scaled, state)
    for k in grads:
      np.testing.assert_allclose(out[k], scaled[k])


def test_percentile_clipping_chains_before_an_8bit_optimizer():
  tx = optax.chain(optax8.percentile_clipping(5), optax8.adam8bit(1e-3))
  params = {"w": jnp.zeros((64, 64))}
  updates, _ = jax.jit(tx.update)({"w": jnp.ones((64, 64))}, tx.init(params), params)
  assert np.all(np.isfinite(updates["w"]))


class Pair(NamedTuple):
  w: jax.Array
  b: jax.Array


def test_percentile_clipping_of_tuple_params_clips_each_leaf_as_for_a_dict_of_them():
  tx = optax8.percentile_clipping(50, history=4)
  w, b = jnp.full((128, 64), 0.5), jnp.full((100,), 0.1)  # b as long as the history ring
  expected, _ = tx.update({"w": w, "b": b}, tx.init({"w": w, "b": b}))
  for make in (lambda w, b: (w, b), Pair):
    params = make(w, b)
    clipped, state = tx.update(params, tx.init(params))
    assert jax.tree.structure(clipped) == jax.tree.structure(params)
    np.testing.assert_array_equal(clipped[0], expected["w"])
    np.testing.assert_array_equal(clipped[1], expected["b"])
