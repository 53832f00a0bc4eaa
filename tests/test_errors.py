"""Bad input raises a clear error that names the argument, the value and what is allowed."""

import jax.numpy as jnp
import optax
import pytest

import optax8

BAD_CONSTRUCTOR_ARGS = [
    (optax8.adam8bit, dict(b1=1.0), ValueError, "b1 must be in \\[0, 1\\), got 1.0"),
    (optax8.adam8bit, dict(b2=-0.1), ValueError, "b2 must be in \\[0, 1\\), got -0.1"),
    (optax8.adam8bit, dict(eps=-1e-8), ValueError, "eps must be >= 0, got -1e-08"),
    (optax8.adam8bit, dict(eps_root=-1.0), ValueError, "eps_root must be >= 0"),
    (optax8.adam8bit, dict(b1="0.9"), TypeError, "b1 must be a float, got '0.9'"),
    (optax8.adam8bit, dict(block_size=0), ValueError, "block_size must be a positive int, got 0"),
    (optax8.adam8bit, dict(block_size=64.0), TypeError, "block_size must be an int, got 64.0 of type float"),
    (optax8.adam8bit, dict(optim_bits=16), ValueError, "optim_bits must be 8 or 32, got 16"),
    (optax8.adam8bit, dict(min_8bit_size=-1), ValueError, "min_8bit_size must be a non-negative int"),
    (optax8.adamw8bit, dict(weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
    (optax8.sgd8bit, dict(momentum=1.0), ValueError, "momentum must be in \\[0, 1\\)"),
    (optax8.lion8bit, dict(b2=2.0), ValueError, "b2 must be in \\[0, 1\\)"),
    (optax8.rmsprop8bit, dict(decay=1.0), ValueError, "decay must be in \\[0, 1\\)"),
    (optax8.rmsprop8bit, dict(momentum=1.5, decay=0.9), ValueError, "momentum must be in \\[0, 1\\)"),
    (optax8.rmsprop8bit, dict(initial_scale=-1.0), ValueError, "initial_scale must be >= 0"),
    (optax8.rmsprop8bit, dict(centered=True), ValueError, "centered=True is not supported"),
    (optax8.adagrad8bit, dict(initial_accumulator_value=-0.1), ValueError, "initial_accumulator_value must be >= 0"),
    (optax8.ademamix8bit, dict(b3=1.0), ValueError, "b3 must be in \\[0, 1\\)"),
    (optax8.ademamix8bit, dict(alpha=-5.0), ValueError, "alpha must be >= 0"),
    (optax8.lamb8bit, dict(eps=-1.0), ValueError, "eps must be >= 0"),
    (optax8.lars8bit, dict(trust_coefficient=-1.0), ValueError, "trust_coefficient must be >= 0"),
    (optax8.lars8bit, dict(momentum=1.5), ValueError, "momentum must be in \\[0, 1\\)"),
]


@pytest.mark.parametrize("factory, kwargs, error, match", BAD_CONSTRUCTOR_ARGS,
                         ids=[f"{f.__name__}-{next(iter(k))}" for f, k, _, _ in BAD_CONSTRUCTOR_ARGS])
def test_invalid_constructor_arguments_raise(factory, kwargs, error, match):
  with pytest.raises(error, match=match):
    factory(0.1, **kwargs)


def test_percentile_clipping_arguments_are_checked():
  with pytest.raises(ValueError, match="percentile must be an int in \\[0, 100\\], got 101"):
    optax8.percentile_clipping(101)
  with pytest.raises(ValueError, match="history must be a positive int, got 0"):
    optax8.percentile_clipping(5, history=0)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_integer_and_complex_parameters_raise_type_error(dtype):
  with pytest.raises(TypeError, match=f"'w' has dtype {jnp.dtype(dtype).name}"):
    optax8.adam8bit(1e-3).init({"w": jnp.zeros((8,), dtype)})


def test_state_tree_not_matching_the_updates_raises():
  tx = optax8.adam8bit(1e-3)
  state = tx.init({"w": jnp.zeros((8,))})
  with pytest.raises(ValueError, match="does not match the updates' tree structure"):
    tx.update({"w": jnp.zeros((8,)), "b": jnp.zeros((2,))}, state)
  with pytest.raises(ValueError, match="for 'w' has shape \\(8,\\), but its update has shape \\(9,\\)"):
    tx.update({"w": jnp.zeros((9,))}, state)


def test_state_of_another_optimizer_raises():
  params = {"w": jnp.zeros((8,))}
  with pytest.raises(TypeError, match="expected a ScaleByAdam8bitState state, got TraceState"):
    optax8.scale_by_adam8bit().update(params, optax.trace(0.9).init(params))


def test_arguments_in_another_order_and_unfusable_accumulation_say_so():
  params = {"w": jnp.zeros((64, 256))}
  fused = optax8.fused(optax8.adam8bit(1e-3))
  with pytest.raises(TypeError, match=r"arguments in another order .*fused\(tx\).step\(params, state, grads\)"):
    fused.step(fused.init(params), params, params)
  with pytest.raises(TypeError, match="gradient accumulation cannot be fused"):
    optax8.fused(optax.MultiSteps(optax8.adam8bit(1e-3), 4))


def test_state_with_another_block_size_raises():
  params = {"w": jnp.zeros((4, 512))}
  state = optax8.scale_by_adam8bit(min_8bit_size=0, block_size=128).init(params)
  with pytest.raises(ValueError, match="block size 128, but this optimizer expects 8-bit state of block size 256"):
    optax8.scale_by_adam8bit(min_8bit_size=0).update(params, state)
  with pytest.raises(ValueError, match="holds 8-bit state of block size 128, but this optimizer expects 32-bit"):
    optax8.scale_by_adam8bit(optim_bits=32).update(params, state)
