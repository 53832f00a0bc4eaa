"""optax8.fused: one pass for the update and apply_updates, equal to the unfused step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax8
from optax8._src import native_library


def _params(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  return {
      "w": jax.random.normal(keys[0], (64, 512), dtype),
      "v": jax.random.normal(keys[1], (300, 256), dtype),
      "b": jax.random.normal(keys[2], (8,), dtype),  # 32-bit state
  }


def _grads(params, i):
  return jax.tree.map(lambda p: jax.random.normal(jax.random.key(10 + i), p.shape, p.dtype) * (i + 1), params)


FUSABLE = {
    "adamw_clip_mask": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax8.adamw8bit(1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    ),
    "adam_schedule": lambda: optax8.adam8bit(optax.linear_schedule(1e-2, 1e-3, 5)),
    "sgd_momentum": lambda: optax8.sgd8bit(0.1, momentum=0.9, nesterov=True),
    "lion": lambda: optax8.lion8bit(1e-3, weight_decay=0.01),
    "inject": lambda: optax.inject_hyperparams(optax8.adamw8bit)(learning_rate=1e-2, weight_decay=0.01),
    "ademamix": lambda: optax8.ademamix8bit(1e-3),
    "adagrad": lambda: optax8.adagrad8bit(1e-2),
    "rmsprop": lambda: optax8.rmsprop8bit(1e-2),
    "chain_of_one": lambda: optax.chain(optax8.adam8bit(1e-2)),
}

IMPLEMENTATIONS = ["reference"] + (["native"] if native_library.usable("cpu") else [])


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
  optax8.set_implementation(request.param)
  yield request.param
  optax8.set_implementation(None)


def _unfused_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _assert_same(params_a, state_a, params_b, state_b, rtol=1e-6, atol=1e-6):
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
  assert jax.tree.structure(params_a) == jax.tree.structure(params_b)
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(FUSABLE))
def test_fused_step_equals_update_then_apply_updates(name, implementation):
  tx = FUSABLE[name]()
  fused = optax8.fused(tx)
  params = _params()
  unfused_params, unfused_state = params, tx.init(params)
  fused_params, fused_state = params, fused.init(params)
  unfused, step = jax.jit(_unfused_step(tx)), jax.jit(fused.step)
  for i in range(3):
    grads = _grads(params, i)
    unfused_params, unfused_state = unfused(unfused_params, unfused_state, grads)
    fused_params, fused_state = step(fused_params, fused_state, grads)
  _assert_same(unfused_params, unfused_state, fused_params, fused_state)
  assert not np.allclose(fused_params["w"], params["w"])  # it did step


@pytest.mark.parametrize("scale", [1e-4, 10.0], ids=["within_bound", "clipped"])
def test_fused_clip_by_global_norm_matches_optax_in_and_out_of_bound(scale, implementation):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(1e-2))
  params = _params()
  grads = jax.tree.map(lambda g: g * scale, _grads(params, 0))
  want = jax.jit(_unfused_step(tx))(params, tx.init(params), grads)
  got = jax.jit(optax8.fused(tx).step)(params, tx.init(params), grads)
  _assert_same(*want, *got)


def test_fused_step_runs_in_place_on_the_kernel_under_donation():
  if not native_library.usable("cpu"):
    pytest.skip("no CPU kernel")
  fused = optax8.fused(optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(1e-2)))
  params = {"w": jnp.ones((256, 1024))}
  text = jax.jit(fused.step, donate_argnums=(0, 1)).lower(params, fused.init(params), params).compile().as_text()
  calls = [line for line in text.splitlines() if "custom-call" in line and native_library.TARGET in line]
  assert len(calls) == 1  # the update and apply_updates in one call, which overwrites the donated parameter
  assert " copy(" not in text


def test_injected_learning_rate_changes_without_retracing(implementation):
  tx = optax.inject_hyperparams(optax8.adamw8bit)(learning_rate=1e-2, weight_decay=0.01)
  fused = optax8.fused(tx)
  traces = []

  def step(params, state, grads):
    traces.append(1)
    return fused.step(params, state, grads)

  step = jax.jit(step)
  params = _params()
  fused_params, fused_state = params, fused.init(params)
  unfused_params, unfused_state = params, tx.init(params)
  unfused = jax.jit(_unfused_step(tx))
  for i, lr in enumerate([1e-2, 3e-3, 0.0]):
    fused_state.hyperparams["learning_rate"] = jnp.asarray(lr)
    unfused_state.hyperparams["learning_rate"] = jnp.asarray(lr)
    fused_params, fused_state = step(fused_params, fused_state, _grads(params, i))
    unfused_params, unfused_state = unfused(unfused_params, unfused_state, _grads(params, i))
  assert len(traces) == 1
  _assert_same(unfused_params, unfused_state, fused_params, fused_state)


def test_unfused_and_fused_states_are_interchangeable(implementation):
  tx = optax8.adamw8bit(1e-2, weight_decay=0.1)
  fused, unfused = jax.jit(optax8.fused(tx).step), jax.jit(_unfused_step(tx))
  params = _params()
  state = tx.init(params)
  want = got = (params, state)
  for i in range(4):  # unfused throughout, against unfused, fused, unfused, fused
    want = unfused(*want, _grads(params, i))
    got = (fused if i % 2 else unfused)(*got, _grads(params, i))
  _assert_same(*want, *got)


def test_fused_bfloat16_step_stays_within_bfloat16_rounding(implementation):
  tx = optax8.adamw8bit(1e-2)
  params = _params(jnp.bfloat16)
  grads = _grads(params, 0)
  want_params, want_state = jax.jit(_unfused_step(tx))(params, tx.init(params), grads)
  got_params, got_state = jax.jit(optax8.fused(tx).step)(params, tx.init(params), grads)
  assert got_params["w"].dtype == jnp.bfloat16
  _assert_same(want_params, want_state, got_params, got_state, rtol=1e-2, atol=1e-2)


MIXED_DTYPES = [(jnp.float32, jnp.bfloat16), (jnp.float32, jnp.float16), (jnp.bfloat16, jnp.float32)]
MIXED_IDS = ["float32_params_bfloat16_grads", "float32_params_float16_grads", "bfloat16_params_float32_grads"]


def _mixed(param_dtype, grad_dtype):
  params = _params(param_dtype)
  return params, jax.tree.map(lambda g: g.astype(grad_dtype), _grads(params, 0))


@pytest.mark.parametrize("param_dtype,grad_dtype", MIXED_DTYPES, ids=MIXED_IDS)
def test_fused_step_of_parameters_and_gradients_of_different_dtypes_matches_the_unfused_step(
    param_dtype, grad_dtype, implementation):
  tx = optax8.adamw8bit(1e-2, weight_decay=0.1)
  params, grads = _mixed(param_dtype, grad_dtype)
  want_params, want_state = jax.jit(_unfused_step(tx))(params, tx.init(params), grads)
  got_params, got_state = jax.jit(optax8.fused(tx).step)(params, tx.init(params), grads)
  assert all(p.dtype == param_dtype for p in jax.tree.leaves(got_params))
  # The unfused update is rounded to the gradient's dtype before it is applied; the fused one is not.
  tolerance = 1e-2 if param_dtype == jnp.bfloat16 else 1e-4
  _assert_same(want_params, want_state, got_params, got_state, rtol=1e-2, atol=tolerance)


@pytest.mark.parametrize("param_dtype,grad_dtype", MIXED_DTYPES, ids=MIXED_IDS)
def test_fused_step_of_different_dtypes_runs_on_the_kernel_in_place_and_equals_the_reference(param_dtype, grad_dtype):
  if not native_library.usable("cpu"):
    pytest.skip("no CPU kernel")
  fused = optax8.fused(optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(1e-2, weight_decay=0.1)))
  params, grads = ({k: tree[k] for k in ("w", "v")} for tree in _mixed(param_dtype, grad_dtype))  # 8-bit state
  donated = jax.jit(fused.step, donate_argnums=(0, 1))
  text = donated.lower(params, fused.init(params), grads).compile().as_text()
  calls = [line for line in text.splitlines() if "custom-call" in line and native_library.TARGET in line]
  assert len(calls) == 2
  if param_dtype == jnp.float32:
    assert " copy(" not in text  # the kernel overwrites the donated parameter
  optax8.set_implementation("reference")
  try:
    want = jax.jit(fused.step)(params, fused.init(params), grads)
  finally:
    optax8.set_implementation(None)
  got = donated(params, fused.init(params), grads)
  # Float32 rounding apart (XLA may contract the reference's expression), then the parameter's own.
  tolerance = 1e-2 if param_dtype == jnp.bfloat16 else 1e-6
  _assert_same(*want, *got, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.adam(1e-3),
        lambda: optax8.lamb8bit(1e-3),
        lambda: optax8.rmsprop8bit(1e-3, momentum=0.9),
        lambda: optax8.sgd8bit(1e-3),
        lambda: optax.chain(optax8.adam8bit(1e-3), optax.clip_by_global_norm(1.0)),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0), optax8.adam8bit(1e-3)),
        lambda: optax.inject_hyperparams(lambda learning_rate: optax.chain(optax8.adam8bit(learning_rate),
                                                                            optax.scale(2.0)))(learning_rate=1e-2),
    ],
    ids=["optax_adam", "lamb8bit", "rmsprop_momentum", "sgd_no_momentum", "clip_after", "two_clips",
         "injected_custom_factory"],
)
def test_transformations_it_cannot_fuse_are_refused(make):
  with pytest.raises(TypeError, match="fuses optax8's adam8bit"):
    optax8.fused(make()).step(_params(), make().init(_params()), _params())


def test_fused_refuses_a_non_transformation_and_max_unorm():
  with pytest.raises(TypeError, match="GradientTransformation"):
    optax8.fused("adam")
  tx = optax8.adam8bit(1e-3, max_unorm=1.0)
  with pytest.raises(ValueError, match="max_unorm"):
    optax8.fused(tx).step(_params(), tx.init(_params()), _params())
