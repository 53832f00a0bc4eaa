"""optax8 optimizers behave as optax optimizers do in the usual training patterns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import CASE_NAMES, CASES_BY_NAME

import optax8


def make_params(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 2)
  return {
      "dense": {"kernel": (jax.random.normal(keys[0], (64, 300)) * 0.1).astype(dtype),
                "bias": jnp.zeros((300,), dtype)},
      "scale": jnp.ones((), dtype),
  }


def make_grads(params, seed=1):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, p.shape).astype(p.dtype) for k, p in zip(keys, leaves)])


def small_threshold(name):
  case = CASES_BY_NAME[name]
  return case.make(case.lr, min_8bit_size=1000)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_state_structure_shapes_and_dtypes_are_stable_across_updates(name):
  tx = small_threshold(name)
  params = make_params()
  state = tx.init(params)
  _, new_state = jax.jit(tx.update)(make_grads(params), state, params)
  assert jax.tree.structure(state) == jax.tree.structure(new_state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert a.shape == b.shape and a.dtype == b.dtype
  # lax.cond must unify the two states (optax's test_state_shape_dtype_shard_stability).
  jax.lax.cond(True, lambda: state, lambda: new_state)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_init_accepts_shape_dtype_structs_and_eval_shape_describes_the_state(name):
  tx = small_threshold(name)
  params = make_params()
  abstract_params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  from_structs = tx.init(abstract_params)
  abstract = jax.eval_shape(tx.init, params)
  concrete = tx.init(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(concrete) == jax.tree.structure(from_structs)
  for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete)):
    assert (a.shape, a.dtype) == (c.shape, c.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_updates_come_back_in_the_gradients_dtype(name, dtype):
  tx = small_threshold(name)
  params = make_params(dtype)
  updates, _ = tx.update(make_grads(params), tx.init(params), params)
  for u in jax.tree.leaves(updates):
    assert u.dtype == dtype
    assert np.all(np.isfinite(np.asarray(u, np.float32)))


def test_8bit_state_is_quantized_above_min_size_and_float32_below():
  params = make_params()
  state = optax8.adam8bit(1e-3, min_8bit_size=1000).init(params)[0]
  assert isinstance(state.mu["dense"]["kernel"], optax8.QuantizedArray)
  assert state.mu["dense"]["kernel"].absmax.shape == (64, 2)
  assert state.mu["dense"]["bias"].dtype == jnp.float32  # 300 < 1000
  assert state.mu["scale"].dtype == jnp.float32  # scalars always 32-bit
  assert not state.nu["dense"]["kernel"].signed


def test_state_takes_about_a_quarter_of_optax_adam_state():
  params = {"w": jnp.zeros((1024, 1024)), "v": jnp.zeros((4096, 256))}
  ratio = optax8.state_bytes(optax8.adam8bit(1e-3).init(params)) / optax8.state_bytes(
      optax.adam(1e-3).init(params))
  assert 0.25 < ratio < 0.26


@pytest.mark.parametrize("name", CASE_NAMES)
def test_eager_updates_compile_nothing_after_the_first_step(name, caplog):
  tx = small_threshold(name)
  params = {"w": jnp.ones((16, 256)), "b": jnp.ones((256,))}
  grads, state = make_grads(params), tx.init(params)
  updates, state = tx.update(grads, state, params)  # compiles what an eager step needs
  with jax.log_compiles(), caplog.at_level("WARNING"):
    for _ in range(3):
      updates, state = tx.update(grads, state, params)
  compiled = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
  assert not compiled, compiled[:3]


def test_jit_with_donated_state_runs_and_matches_without_donation():
  tx = optax8.adamw8bit(1e-3, min_8bit_size=1000)
  params = make_params()

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  grads = make_grads(params)
  expected = jax.jit(step)(params, tx.init(params), grads)
  donated = jax.jit(step, donate_argnums=(0, 1))(jax.tree.map(jnp.copy, params), tx.init(params), grads)
  jax.tree.map(np.testing.assert_array_equal, expected, donated)


def test_chain_with_clipping_just_works():
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(3e-4, weight_decay=0.1))
  params = make_params()
  updates, _ = jax.jit(tx.update)(make_grads(params), tx.init(params), params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_inject_hyperparams_changes_lr_betas_eps_without_recompiling():
  tx = optax.inject_hyperparams(optax8.adam8bit)(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8)
  params = make_params()
  grads = make_grads(params)

  @jax.jit
  def step(state):
    return tx.update(grads, state, params)

  state = tx.init(params)
  results = []
  for lr, b1, b2, eps in [(1e-3, 0.9, 0.999, 1e-8), (2e-3, 0.8, 0.99, 1e-6), (5e-4, 0.95, 0.9, 1e-4)]:
    state.hyperparams.update(learning_rate=lr, b1=b1, b2=b2, eps=eps)
    updates, _ = step(state)
    direct, _ = optax8.adam8bit(lr, b1, b2, eps).update(grads, optax8.adam8bit(lr).init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updates, direct)
    results.append(updates)
  assert step._cache_size() == 1
  assert not np.allclose(results[0]["dense"]["kernel"], results[1]["dense"]["kernel"])


def test_multisteps_accumulates_then_applies_once():
  tx = optax.MultiSteps(optax8.adam8bit(1e-2, min_8bit_size=1000), every_k_schedule=3)
  params = make_params()
  state = tx.init(params)
  grads = make_grads(params)
  update = jax.jit(tx.update)
  for _ in range(2):
    updates, state = update(grads, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  updates, state = update(grads, state, params)
  assert np.any(np.asarray(updates["dense"]["kernel"]) != 0)


def test_apply_if_finite_skips_a_bad_step_and_keeps_the_state_bit_identical():
  tx = optax.apply_if_finite(optax8.adam8bit(1e-2, min_8bit_size=1000), max_consecutive_errors=5)
  params = make_params()
  state = tx.init(params)
  state = jax.jit(tx.update)(make_grads(params), state, params)[1]
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), make_grads(params, 2))
  updates, new_state = jax.jit(tx.update)(bad, state, params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  jax.tree.map(np.testing.assert_array_equal, state.inner_state, new_state.inner_state)


def test_partition_gives_groups_their_own_8bit_optimizers():
  params = make_params()
  labels = {"dense": {"kernel": "adam", "bias": "sgd"}, "scale": "sgd"}
  tx = optax.partition({"adam": optax8.adam8bit(1e-3, min_8bit_size=1000), "sgd": optax8.sgd8bit(0.1, 0.9)},
                       labels)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(make_grads(params), state, params)
  assert updates["dense"]["kernel"].shape == (64, 300)
  adam_state = state.inner_states["adam"].inner_state[0]
  assert isinstance(adam_state.mu["dense"]["kernel"], optax8.QuantizedArray)


def test_non_finite_gradient_elements_reset_only_their_own_moments():
  tx = optax8.adam8bit(1e-2, min_8bit_size=0)
  params = {"w": jnp.zeros((4, 512))}
  g = jax.random.normal(jax.random.key(3), (4, 512))
  bad = g.at[1, 7].set(jnp.nan).at[2, 300].set(jnp.inf).at[3, 0].set(-jnp.inf)
  clean = g.at[1, 7].set(0.0).at[2, 300].set(0.0).at[3, 0].set(0.0)
  u_bad, s_bad = tx.update({"w": bad}, tx.init(params), params)
  u_clean, s_clean = tx.update({"w": clean}, tx.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, (u_bad, s_bad), (u_clean, s_clean))
  assert float(u_bad["w"][1, 7]) == 0.0
  assert np.all(np.isfinite(np.asarray(s_bad[0].mu["w"].absmax)))
