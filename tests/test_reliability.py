"""Reliability: exact resume, state conversion, non-finite and extreme inputs."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import CASE_NAMES, CASES_BY_NAME, dequantize_tree

import optax8

ocp = pytest.importorskip("orbax.checkpoint")
import resume_worker  # noqa: E402  (needs orbax)

STEPS = 3


@pytest.fixture(params=["reference", "auto"])
def implementation(request):
  """Each test runs on the pure-JAX reference and on the default (native kernel on CPU)."""
  optax8.set_implementation(request.param)
  yield request.param
  optax8.set_implementation(None)


def test_resume_in_a_fresh_process_is_bit_identical_for_every_optimizer(tmp_path, implementation):
  checkpointer = ocp.StandardCheckpointer()
  expected = {}
  for name in CASE_NAMES:
    for dtype_name, dtype in resume_worker.DTYPES.items():
      tx, params = resume_worker.optimizer(name), resume_worker.initial_params(dtype)
      params, state = resume_worker.train(tx, params, tx.init(params), 0, STEPS)
      checkpointer.save(tmp_path / "ckpt" / f"{name}-{dtype_name}", {"params": params, "state": state})
      params, state = resume_worker.train(tx, params, state, STEPS, STEPS)
      tree = resume_worker.flat({"params": params, "state": state})
      expected.update({f"{name}-{dtype_name}{k}": v for k, v in tree.items()})
  checkpointer.wait_until_finished()
  out = tmp_path / "resumed.npz"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parent), *sys.path]),
             OPTAX8_IMPLEMENTATION=implementation)
  subprocess.run([sys.executable, "-m", "resume_worker", str(tmp_path / "ckpt"), str(out), str(STEPS), str(STEPS)],
                 check=True, env=env, cwd=pathlib.Path(__file__).parent)
  resumed = dict(np.load(out))
  assert sorted(resumed) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_two_runs_give_bit_identical_states(name, implementation):
  tx = resume_worker.optimizer(name)

  def run():
    params = resume_worker.initial_params(jnp.bfloat16)
    return resume_worker.train(tx, params, tx.init(params), 0, 4)

  jax.tree.map(np.testing.assert_array_equal, run(), run())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_switching_precision_mid_training_costs_one_quantization(name):
  case = CASES_BY_NAME[name]
  tx8, tx32 = case.make(case.lr, min_8bit_size=256), case.reference(case.lr)
  params = resume_worker.initial_params(jnp.float32)
  params, state32 = resume_worker.train(tx32, params, tx32.init(params), 0, 5)
  state8 = optax8.convert_state(state32, like=tx8.init(params))
  back = optax8.convert_state(state8, like=state32)
  for field in case.moments:
    want, got = optax.tree.get(state32, field)["w"], optax.tree.get(back, field)["w"]
    # One quantization: at most half a code step, < 1% of each block's absmax.
    bound = 0.01 * jnp.abs(want).max(axis=-1, keepdims=True)
    assert np.all(np.abs(np.asarray(got - want)) <= bound)
  assert jax.tree.structure(back) == jax.tree.structure(state32)
  for a, b in zip(jax.tree.leaves(state32), jax.tree.leaves(back)):
    if a.dtype == jnp.int32:  # step counts carry over
      np.testing.assert_array_equal(a, b)
  # Training continues with the converted state.
  params, state8 = resume_worker.train(tx8, params, state8, 5, 2)
  assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(dequantize_tree(state8)))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_non_finite_gradient_elements_leave_every_other_element_untouched(name):
  case = CASES_BY_NAME[name]
  tx = case.make(case.lr, min_8bit_size=0)
  params = {"w": jnp.zeros((4, 512))}  # no weight decay term in the update
  state = tx.init(params)
  g = jax.random.normal(jax.random.key(3), (4, 512)) * 0.01
  bad_at = (jnp.array([1, 2, 3]), jnp.array([7, 300, 0]))
  bad = g.at[bad_at].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf]))
  u_bad, s_bad = tx.update({"w": bad}, state, params)
  u_clean, s_clean = tx.update({"w": g}, state, params)
  keep = np.ones((4, 512), bool)
  keep[bad_at] = False
  assert np.all(np.asarray(u_bad["w"])[~keep] == 0)
  if name not in ("lamb", "lars"):  # a trust ratio couples every element through the norms
    np.testing.assert_array_equal(np.asarray(u_bad["w"])[keep], np.asarray(u_clean["w"])[keep])
  for field in case.moments:
    bad_m = np.asarray(optax.tree.get(dequantize_tree(s_bad), field)["w"])
    assert np.all(np.isfinite(bad_m)) and np.all(bad_m[~keep] == 0)


EXTREMES = {
    "tiny": lambda k, s: jax.random.normal(k, s) * 1e-30,
    "subnormal": lambda k, s: jax.random.normal(k, s) * 1e-40,
    "huge": lambda k, s: jax.random.normal(k, s) * 1e18,
    "overflowing": lambda k, s: jax.random.normal(k, s) * 1e30,  # its square overflows float32
    "zero": lambda k, s: jnp.zeros(s),
    "one_spike": lambda k, s: (jax.random.normal(k, s) * 1e-3).at[(0,) * len(s)].set(1e6) if np.prod(s) else
    jnp.zeros(s),
}
SHAPES = [(), (1,), (4095,), (4096,), (4097,), (0,), (3, 0), (2, 3, 700), (2, 2, 2, 2, 300), (1, 2, 1, 2, 1, 600)]


@pytest.mark.parametrize("kind", sorted(EXTREMES))
@pytest.mark.parametrize("name", CASE_NAMES)
def test_extreme_gradients_and_shapes_give_no_nan_the_32bit_optimizer_avoids(name, kind, implementation):
  case = CASES_BY_NAME[name]
  tx8, tx32 = case.make(case.lr, min_8bit_size=0), case.reference(case.lr)
  params = {str(i): jnp.full(s, 0.5) for i, s in enumerate(SHAPES)}
  s8, s32 = tx8.init(params), tx32.init(params)
  update8, update32 = jax.jit(tx8.update), jax.jit(tx32.update)
  for step in range(3):
    keys = jax.random.split(jax.random.key(step), len(SHAPES))
    grads = {str(i): EXTREMES[kind](k, s) for i, (k, s) in enumerate(zip(keys, SHAPES))}
    u8, s8 = update8(grads, s8, params)
    u32, s32 = update32(grads, s32, params)
    for key in params:
      finite32 = np.isfinite(np.asarray(u32[key]))
      assert np.all(np.isfinite(np.asarray(u8[key]))[finite32]), (key, step)
    for field in case.moments:
      for key, m in optax.tree.get(dequantize_tree(s8), field).items():
        m32 = np.asarray(optax.tree.get(s32, field)[key])
        finite32 = np.isfinite(m32)
        assert np.all(np.isfinite(np.asarray(m))[finite32]), (field, key, step)
        if step == 0 and m32.size and kind != "overflowing":  # (overflowing elements reset by design)
          # Same inputs so far: the only error is one quantization, under 1% of the row's peak.
          bound = 0.01 * np.abs(m32).max(axis=-1, keepdims=True) if m32.ndim else 0.01 * np.abs(m32)
          assert np.all(np.abs(np.asarray(m) - m32) <= bound), (field, key)


def test_convert_state_pairs_chains_that_differ_in_stateless_steps_and_refuses_other_shapes():
  params = {"w": jnp.ones((64, 256))}
  grads = {"w": jnp.linspace(-1.0, 1.0, 64 * 256).reshape(64, 256)}
  # optax.rmsprop and optax.sgd end in an identity (no momentum) that optax8's aliases lack.
  for tx32, tx8 in [(optax.rmsprop(1e-3), optax8.rmsprop8bit(1e-3)), (optax.sgd(1e-2), optax8.sgd8bit(1e-2))]:
    state32 = tx32.update(grads, tx32.init(params), params)[1]
    state8 = optax8.convert_state(state32, like=tx8.init(params))
    assert jax.tree.structure(state8) == jax.tree.structure(tx8.init(params))
    back = optax8.convert_state(state8, like=state32)
    assert jax.tree.structure(back) == jax.tree.structure(state32)
    for a, b in zip(jax.tree.leaves(state32), jax.tree.leaves(back)):
      np.testing.assert_allclose(b, a, atol=0.01 * float(jnp.abs(a).max()))
  with pytest.raises(ValueError, match=r"shape \(32, 256\) into one of shape \(64, 256\)"):
    optax8.convert_state(optax.adamw(1e-3).init({"w": jnp.ones((32, 256))}), like=optax8.adamw8bit(1e-3).init(params))
