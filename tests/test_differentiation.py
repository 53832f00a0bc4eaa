"""Differentiating through updates: on the kernel path the reference math defines the derivative.

The native kernels have no derivative rules of their own. Under ``jax.jvp`` and ``jax.grad`` the
reference math defines the derivative of a kernel's update, while the kernel still computes its
values. Each test differentiates on the kernel path (the default on CPU) and on the reference
path (``optax8.set_implementation("reference")``) and compares the two:

* bit for bit where the two programs are the same computation: a ``jax.grad`` of a loss linear
  in the update's results, or the tangents of a ``jax.jvp`` jitted alone, need none of the
  update's values, so the kernel path compiles the reference's own derivative, element by
  element;
* to float32 rounding where the derivative also needs the update's values (a loss nonlinear in
  them, LAMB's trust ratio): the kernel's values are the reference's up to the last bits of
  XLA:CPU's multiply-add contraction and of rsqrt (tests/test_native.py), and values and
  tangents computed in one program are fused differently on the two paths;
* to float32 rounding for a scalar hyperparameter: its derivative sums contributions over every
  element and every use of the hyperparameter, which the two programs, fused differently, add
  in other orders.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import CASES, CASES_BY_NAME, dequantize_tree

import optax8
from optax8._src import native_library

TARGET = native_library.TARGET
# "w" has 8-bit moments (8000 elements, 63 blocks with a short last one per row); "b" keeps
# 32-bit moments (fewer than min_8bit_size elements), computed by the reference on both paths.
SHAPES = {"w": (8, 1000), "b": (10,)}
BLOCK_SIZE = 128
LINEAR_CASES = [c.name for c in CASES if c.name != "lamb"]  # LAMB's trust ratio needs the update's values


def random_like(rng, tree):
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def float_leaves(tree):
  """The floating leaves of a tree (what can be differentiated), and how to put others back."""
  leaves, treedef = jax.tree.flatten(tree)
  is_float = [jnp.issubdtype(x.dtype, jnp.floating) for x in leaves]

  def merge(floats):
    floats = iter(floats)
    return treedef.unflatten([next(floats) if f else x for x, f in zip(leaves, is_float)])

  return [x for x, f in zip(leaves, is_float) if f], merge


def trained(tx, rng, shapes=SHAPES, steps=3):
  """Params, a state after ``steps`` updates with random gradients, and the next gradient."""
  params = random_like(rng, {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})
  state, update = tx.init(params), jax.jit(tx.update)
  for _ in range(steps):
    _, state = update(random_like(rng, params), state, params)
  g = random_like(rng, params)
  assert TARGET in update.lower(g, state, params).as_text()  # the kernel applies
  return params, state, g


def on_both_paths(fn, *args):
  """``jax.jit(fn)(*args)`` on the kernel path and on the reference path."""
  results = {}
  for implementation in ("auto", "reference"):
    optax8.set_implementation(implementation)
    results[implementation] = jax.jit(fn)(*args)
  optax8.set_implementation(None)
  return results["auto"], results["reference"]


def assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_close(a, b):
  """Equal to float32 rounding, relative to each leaf's largest magnitude."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * np.abs(y).max())


def quantized_leaves(tree):
  is_quantized = lambda x: isinstance(x, optax8.QuantizedArray)
  return [x for x in jax.tree.leaves(tree, is_leaf=is_quantized) if is_quantized(x)]


def linear_loss(tx, params, rng):
  """A random linear function of an update's float results: ``loss(g, state floats)``."""

  def results(g, floats):
    return float_leaves(tx.update(g, merge(floats), params))[0]

  g = random_like(rng, params)
  floats, merge = float_leaves(tx.init(params))
  weights = random_like(rng, jax.eval_shape(results, g, floats))
  return lambda g, floats: sum(jnp.vdot(w, x) for w, x in zip(weights, results(g, floats)))


@pytest.mark.parametrize("name", LINEAR_CASES)
def test_grad_of_a_loss_linear_in_the_update_is_the_reference_derivative_bit_for_bit(name):
  rng = np.random.default_rng(0)
  tx = CASES_BY_NAME[name].make(0.1, block_size=BLOCK_SIZE)
  params, state, g = trained(tx, rng)
  floats, _ = float_leaves(state)
  loss = linear_loss(tx, params, rng)
  # With respect to the gradient and the state's float leaves: absmax and 32-bit moments.
  kernel, reference = on_both_paths(jax.grad(loss, argnums=(0, 1)), g, floats)
  assert_identical(kernel, reference)
  assert all(np.any(x != 0) for x in jax.tree.leaves(kernel[0]))


@pytest.mark.parametrize("name", ["adam", "nesterov", "rmsprop", "ademamix", "lamb"])
def test_grad_of_a_loss_of_the_updated_params_matches_the_reference_derivative(name):
  rng = np.random.default_rng(1)
  tx = CASES_BY_NAME[name].make(0.1, block_size=BLOCK_SIZE)
  params, state, g = trained(tx, rng)
  floats, merge = float_leaves(state)
  target = random_like(rng, params)

  def loss(g, floats):
    updates, _ = tx.update(g, merge(floats), params)
    new_params = optax.apply_updates(params, updates)
    return sum(jnp.sum((p - t) ** 2) for p, t in zip(jax.tree.leaves(new_params), jax.tree.leaves(target)))

  grad = jax.grad(loss, argnums=(0, 1))
  assert TARGET in jax.jit(grad).lower(g, floats).as_text()  # the values come from the kernel
  kernel, reference = on_both_paths(grad, g, floats)
  assert_close(kernel, reference)


@pytest.mark.parametrize("name", ["adam", "sgd", "lion", "rmsprop", "adagrad", "ademamix"])
def test_jvp_has_the_kernels_values_and_the_reference_derivatives_tangents(name):
  rng = np.random.default_rng(2)
  tx = CASES_BY_NAME[name].make(0.1, block_size=BLOCK_SIZE)
  params, state, g = trained(tx, rng)
  floats, merge = float_leaves(state)
  tangents = (random_like(rng, g), random_like(rng, floats))
  update = lambda g, floats: tx.update(g, merge(floats), params)
  jvp = lambda primals, tangents: jax.jvp(update, primals, tangents)

  kernel, reference = on_both_paths(lambda *a: jvp(*a)[1], (g, floats), tangents)
  assert_identical(kernel, reference)
  codes = [q.codes for q in quantized_leaves(kernel[1])]
  assert codes and all(c.dtype == jax.dtypes.float0 for c in codes)

  # Values and tangents in one program: the values are the kernel's, exactly as undifferentiated.
  assert TARGET in jax.jit(jvp).lower((g, floats), tangents).as_text()
  (values, kernel), (_, reference) = on_both_paths(jvp, (g, floats), tangents)
  undifferentiated = jax.jit(update)(g, floats)
  assert_identical(quantized_leaves(values), quantized_leaves(undifferentiated))
  assert_close(values, undifferentiated)
  assert_close(float_leaves(kernel)[0], float_leaves(reference)[0])


def hyperparameter_loss(tx, state, params, weights):
  """``loss(hyperparams, g)``: a linear function of the update of an injected optimizer."""

  def loss(hyperparams, g):
    updates, _ = tx.update(g, state._replace(hyperparams=hyperparams), params)
    return sum(jnp.vdot(w, u) for w, u in zip(jax.tree.leaves(weights), jax.tree.leaves(updates)))

  return loss


def injected_adam(rng, steps=3):
  """``optax.inject_hyperparams(optax8.adam8bit)``, trained ``steps`` steps, and a loss of its next update."""
  tx = optax.inject_hyperparams(optax8.adam8bit)(learning_rate=0.1, b1=0.9)
  params, state, g = trained(tx, rng, {"w": SHAPES["w"]}, steps)
  weights = random_like(rng, params)
  return params, state, g, weights, hyperparameter_loss(tx, state, params, weights)


def test_grad_wrt_injected_hyperparameters_is_the_reference_and_optax_adams_derivative():
  rng = np.random.default_rng(3)
  params, state, g, weights, loss = injected_adam(rng)
  grad = jax.grad(loss, argnums=(0, 1))  # the hyperparameters (b1, b2, eps, ...) and the gradient
  kernel, reference = on_both_paths(grad, state.hyperparams, g)
  assert_identical(kernel[1], reference[1])
  assert_close(kernel[0], reference[0])  # sums over the elements, in other orders
  assert kernel[0]["b1"] != 0 and kernel[0]["learning_rate"] != 0

  # optax's float32 Adam from the dequantized moments makes the same update, so has the same
  # derivative, up to its divisions where the reference multiplies by reciprocals.
  tx32 = optax.inject_hyperparams(optax.adam)(learning_rate=0.1, b1=0.9)
  moments = state.inner_state[0]
  state32 = tx32.init(params)
  adam32 = state32.inner_state[0]._replace(count=moments.count, mu=dequantize_tree(moments.mu),
                                           nu=dequantize_tree(moments.nu))
  state32 = state32._replace(inner_state=(adam32, *state32.inner_state[1:]))
  expected = jax.jit(jax.grad(hyperparameter_loss(tx32, state32, params, weights), argnums=(0, 1)))(
      state.hyperparams, g)
  assert_close(kernel, expected)


def test_jvp_wrt_one_hyperparameter_is_the_reference_derivative_where_a_moment_is_zero():
  """The other operands' zero tangents never meet the math: at sqrt(0) they would turn into NaN."""
  rng = np.random.default_rng(4)
  params, state, g, _, loss = injected_adam(rng, steps=0)
  g = jax.tree.map(lambda x: x.at[:, :BLOCK_SIZE].set(0.0), g)  # there the new v is 0, like the old one
  b1_only = lambda b1: loss({**state.hyperparams, "b1": b1}, g)
  tangent = lambda b1: jax.jvp(b1_only, (b1,), (jnp.ones_like(b1),))[1]
  kernel, reference = on_both_paths(tangent, state.hyperparams["b1"])
  assert np.isfinite(kernel) and kernel != 0
  assert_close(kernel, reference)


def test_second_derivative_wrt_a_hyperparameter_matches_the_reference():
  rng = np.random.default_rng(5)
  params, state, g, _, _ = injected_adam(rng)
  tx = optax.inject_hyperparams(optax8.adam8bit)(learning_rate=0.1, b1=0.9)

  def loss(b1):  # nonlinear in the update: its second derivative needs the kernel's values
    updates, _ = tx.update(g, state._replace(hyperparams={**state.hyperparams, "b1": b1}), params)
    return jnp.sum(optax.apply_updates(params, updates)["w"] ** 2)

  hessian = jax.hessian(loss)
  assert TARGET in jax.jit(hessian).lower(state.hyperparams["b1"]).as_text()
  kernel, reference = on_both_paths(hessian, state.hyperparams["b1"])
  assert kernel != 0
  assert_close(kernel, reference)


def test_vmap_of_grad_and_grad_of_vmap_match_the_reference_derivative():
  rng = np.random.default_rng(6)
  params, state, g, _, loss = injected_adam(rng)
  gs = random_like(rng, jax.tree.map(lambda p: jax.ShapeDtypeStruct((3, *p.shape), p.dtype), params))
  per_example = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0))  # one update per gradient
  of_batch = jax.grad(lambda hyperparams, gs: jnp.sum(jax.vmap(loss, in_axes=(None, 0))(hyperparams, gs)),
                      argnums=(0, 1))
  for fn in (per_example, of_batch):
    (kernel_hyper, kernel_g), (reference_hyper, reference_g) = on_both_paths(fn, state.hyperparams, gs)
    assert_identical(kernel_g, reference_g)
    assert_close(kernel_hyper, reference_hyper)  # sums over the elements, in other orders
  # One update per b1: the kernel's scalars batched.
  per_b1 = jax.vmap(lambda b1: jax.grad(loss)({**state.hyperparams, "b1": b1}, g)["b1"])
  assert_close(*on_both_paths(per_b1, jnp.array([0.9, 0.8, 0.5], jnp.float32)))


def test_grad_without_jit_matches_the_reference():
  rng = np.random.default_rng(7)
  tx = CASES_BY_NAME["nesterov"].make(0.1, block_size=BLOCK_SIZE)
  params, state, g = trained(tx, rng)
  floats, _ = float_leaves(state)
  grad = jax.grad(linear_loss(tx, params, rng), argnums=(0, 1))
  optax8.set_implementation("reference")
  reference = grad(g, floats)
  optax8.set_implementation(None)
  # Eagerly the kernel path runs its derivative as one compiled program, the reference path op
  # by op: XLA contracts multiply-adds in the former only.
  assert_close(grad(g, floats), reference)


def test_an_update_not_differentiated_is_one_custom_call_per_8bit_parameter():
  tx = optax8.adam8bit(1e-3, block_size=BLOCK_SIZE)
  params = {"w": jnp.ones(SHAPES["w"]), "v": jnp.ones((5000,))}
  hlo = jax.jit(tx.update).lower(params, tx.init(params)).compile().as_text()
  assert hlo.count(f'custom_call_target="{TARGET}"') == 2
  assert "sqrt" not in hlo  # none of the reference's math
