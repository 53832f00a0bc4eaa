"""One absmax per tensor (``block_wise=False``, bitsandbytes' original scale layout).

Its fidelity against the blockwise default on bitsandbytes' 50-step procedure is in
test_against_optax.py; its sharded step (one all-reduce of a scalar per tensor) in
test_sharding.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from test_update_options import orbax_round_trip

import optax8
from optax8._src import quantization as qz


@pytest.fixture(params=("reference", "native"))
def implementation(request):
  optax8.set_implementation(request.param)
  yield request.param
  optax8.set_implementation(None)


def nearest_codes(x, signed):
  """Each normalised value's nearest map entry by brute force (ties to the lower code)."""
  qmap = qz.dynamic_map(signed).astype(np.float64)
  return np.argmin(np.abs(x.astype(np.float64)[..., None] - qmap), axis=-1)


def test_quantize_with_one_absmax_per_tensor():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((7, 300)) * np.logspace(-3, 0, 300)).astype(np.float32)
  q = optax8.quantize_blockwise(jnp.asarray(x), block_size=None, signed=True)
  assert q.absmax.shape == () and q.block_size is None
  # The largest magnitude, times NEGATIVE_STRETCH where a negative value has it (the signed map's
  # lowest entry is -0.99297).
  claim = np.abs(x) * np.where(x < 0, optax8.NEGATIVE_STRETCH, np.float32(1))
  assert float(q.absmax) == claim.max()
  scaled = x * np.float32(1 / claim.max())
  signs_agree = np.sign(qz.dynamic_map(True)[nearest_codes(scaled, True)]) * np.sign(scaled) >= 0
  np.testing.assert_array_equal(np.asarray(q.codes)[signs_agree], nearest_codes(scaled, True)[signs_agree])
  np.testing.assert_allclose(optax8.dequantize_blockwise(q), qz.dynamic_map(True)[np.asarray(q.codes)] * q.absmax)
  assert [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(q)] == [".codes_signed",
                                                                                           ".absmax_tensor"]
  zeros = optax8.quantize_blockwise(jnp.zeros((3, 5)), block_size=None, signed=False)
  assert float(zeros.absmax) == 0 and not np.any(np.asarray(optax8.dequantize_blockwise(zeros)))


def test_tensor_wise_first_step_is_the_new_state_over_its_tensor_maximum(implementation):
  rng = np.random.default_rng(1)
  g = rng.standard_normal((64, 300)).astype(np.float32)
  g[:, :50] *= 100  # a few large columns set the tensor's absmax for every element
  tx = optax8.scale_by_adam8bit(block_wise=False)
  params = {"w": jnp.zeros((64, 300))}
  _, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, tx.init(params))
  one = np.float32(1)
  m, v = (one - np.float32(0.9)) * g, (one - np.float32(0.999)) * (g * g)  # as float32 computes 1 - b
  for q, exact, signed in ((state.mu["w"], m, True), (state.nu["w"], v, False)):
    assert q.absmax.shape == () and float(q.absmax) == np.abs(exact).max()
    expected = optax8.quantize_blockwise(jnp.asarray(exact), block_size=None, signed=signed)
    np.testing.assert_array_equal(q.codes, expected.codes)


def test_tensor_wise_by_label_and_every_optimizer_trains(implementation):
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32),
            "v": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)}
  tx = optax8.adamw8bit(1e-2, overrides={"w": {"block_wise": False}})
  state = tx.init(params)
  assert state[0].mu["w"].block_size is None and state[0].mu["v"].block_size == 256
  for make in (optax8.adam8bit, optax8.lion8bit, optax8.adagrad8bit, optax8.ademamix8bit, optax8.lamb8bit,
               lambda lr, **o: optax8.sgd8bit(lr, momentum=0.9, **o),
               lambda lr, **o: optax8.rmsprop8bit(lr, momentum=0.9, **o)):
    p, s = train(make(1e-2, block_wise=False), params, steps=5)
    assert float(quadratic(p)) < float(quadratic(params))
    assert all(q.block_size is None for q in jax.tree.leaves(s, is_leaf=qz.is_quantized) if qz.is_quantized(q))


def quadratic(params):
  return sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(params))


def train(tx, params, steps):
  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(quadratic)(p), s, p)
    return optax.apply_updates(p, updates), s

  p, s = params, tx.init(params)
  for _ in range(steps):
    p, s = step(p, s)
  return p, s


def test_tensor_wise_state_round_trips_through_orbax_and_refuses_a_blockwise_target(tmp_path):
  params = {"w": jnp.ones((16, 300))}
  tx = optax8.adam8bit(1e-3, block_wise=False)
  state = tx.update({"w": jnp.full((16, 300), 0.5)}, tx.init(params), params)[1]
  orbax_round_trip(tmp_path / "ckpt", state, jax.eval_shape(tx.init, params))
  with pytest.raises(ValueError, match="absmax_block256"):
    ocp.StandardCheckpointer().restore(tmp_path / "ckpt", jax.eval_shape(optax8.adam8bit(1e-3).init, params))


def test_update_refuses_a_blockwise_state_for_a_tensor_wise_optimizer():
  params = {"w": jnp.ones((16, 300))}
  state = optax8.adam8bit(1e-3).init(params)
  with pytest.raises(ValueError, match="block size 256.*expects 8-bit state with one absmax per tensor"):
    optax8.adam8bit(1e-3, block_wise=False).update(params, state, params)


def test_tensor_wise_state_converts_to_and_from_optax():
  params = {"w": jnp.ones((16, 300))}
  tx, ref = optax8.adam8bit(1e-3, block_wise=False), optax.adam(1e-3)
  ref_state = ref.update({"w": jnp.full((16, 300), 0.5)}, ref.init(params))[1]
  state = optax8.convert_state(ref_state, jax.eval_shape(tx.init, params))
  assert state[0].mu["w"].block_size is None
  back = optax8.convert_state(state, ref_state)
  np.testing.assert_allclose(back[0].mu["w"], ref_state[0].mu["w"], rtol=1e-2)


@pytest.mark.parametrize("bad, error", [(1, TypeError), ("no", TypeError), (None, TypeError)])
def test_block_wise_must_be_a_bool(bad, error):
  with pytest.raises(error, match=f"block_wise must be a bool, got {bad!r}"):
    optax8.adamw8bit(1e-3, block_wise=bad)
  with pytest.raises(error, match=r"overrides\['w'\]\['block_wise'\] must be a bool"):
    optax8.adamw8bit(1e-3, overrides={"w": {"block_wise": bad}})
