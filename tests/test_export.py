"""jax.export of optax8 steps: state types in signatures, the native kernel, fresh processes."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax8
from optax8._src import native_library

CPU = jax.devices("cpu")[0]
WORKER = pathlib.Path(__file__).parent / "export_worker.py"


def train_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def step_inputs(tx):
  params = {"w": jax.random.normal(jax.random.key(0), (64, 300)) * 0.1, "b": jnp.zeros((300,))}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 0.01, params)
  return jax.device_put((params, tx.init(params), grads), CPU)


def export_step(tx, **kwargs):
  args = step_inputs(tx)
  return jax.export.export(jax.jit(train_step(tx)), platforms=("cpu",), **kwargs)(*args), args


def assert_bit_identical(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_exported_adamw8bit_step_round_trips_bit_identically():
  tx = optax8.adamw8bit(1e-3, weight_decay=0.1)
  exported, args = export_step(tx, disabled_checks=optax8.export_safety_checks())
  assert native_library.TARGET in exported.mlir_module()
  restored = jax.export.deserialize(exported.serialize())
  assert restored.in_tree == exported.in_tree and restored.out_tree == exported.out_tree
  assert_bit_identical(restored.call(*args), jax.jit(train_step(tx))(*args))


def call_in_fresh_process(folder, exported, args, *worker_args):
  """Runs ``exported`` on ``args`` in export_worker.py; returns its results."""
  (folder / "exported.bin").write_bytes(exported.serialize())
  np.savez(folder / "inputs.npz", **{f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(args))})
  result = subprocess.run([sys.executable, str(WORKER), str(folder), *worker_args],
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-6000:]
  with np.load(folder / "outputs.npz") as outputs:
    leaves = [outputs[f"leaf{i}"] for i in range(len(outputs.files))]
  return jax.tree.unflatten(exported.out_tree, leaves), (folder / "out_tree.txt").read_text()


def test_fresh_process_registers_the_kernel_when_deserializing(tmp_path):
  tx = optax8.adamw8bit(1e-3, weight_decay=0.1)
  exported, args = export_step(tx, disabled_checks=optax8.export_safety_checks())
  assert native_library.TARGET in exported.mlir_module()
  actual, out_tree = call_in_fresh_process(tmp_path, exported, args)
  expected = jax.jit(train_step(tx))(*args)
  assert out_tree == str(jax.tree.structure(expected))
  assert_bit_identical(actual, expected)


def test_fresh_process_runs_a_kernel_without_state_in_its_signature_after_register_kernels(tmp_path):
  tx = optax8.adamw8bit(1e-3, weight_decay=0.1)
  first_step = lambda params, grads: train_step(tx)(params, tx.init(params), grads)[0]
  params, _, grads = step_inputs(tx)
  exported = jax.export.export(jax.jit(first_step), platforms=("cpu",),
                               disabled_checks=optax8.export_safety_checks())(params, grads)
  assert native_library.TARGET in exported.mlir_module() and "QuantizedArray" not in str(exported.in_tree)
  actual, _ = call_in_fresh_process(tmp_path, exported, ((params, grads), {}), "--register-kernels")
  assert_bit_identical(actual, jax.jit(first_step)(params, grads))


def test_reference_implementation_exports_without_disabled_checks():
  optax8.set_implementation("reference")
  tx = optax8.adamw8bit(1e-3, weight_decay=0.1)
  exported, args = export_step(tx)
  assert native_library.TARGET not in exported.mlir_module()
  restored = jax.export.deserialize(exported.serialize())
  assert_bit_identical(restored.call(*args), jax.jit(train_step(tx))(*args))


def test_export_of_the_kernel_without_safety_checks_names_its_target():
  with pytest.raises(ValueError, match="custom calls whose targets have no compatibility guarantees") as error:
    export_step(optax8.adamw8bit(1e-3))
  assert native_library.TARGET in str(error.value)


def test_call_with_another_block_size_is_refused():
  exported, (params, _, grads) = export_step(optax8.adamw8bit(1e-3), disabled_checks=optax8.export_safety_checks())
  other = jax.device_put(optax8.adamw8bit(1e-3, block_size=128).init(params), CPU)
  restored = jax.export.deserialize(exported.serialize())
  with pytest.raises(ValueError, match="pytree node metadata does not match"):
    restored.call(params, other, grads)


@pytest.mark.parametrize(
    "tx, names",
    [
        (optax8.adam8bit(1e-3, block_size=128),
         ["optax8.QuantizedArray", "optax8.ScaleByAdam8bitState", "optax.EmptyState"]),
        (optax8.ademamix8bit(1e-3), ["optax8.ScaleByAdemamix8bitState"]),
        (optax8.lion8bit(1e-3), ["optax8.ScaleByLion8bitState"]),
        (optax8.rmsprop8bit(1e-3), ["optax8.ScaleByRms8bitState"]),
        (optax8.adagrad8bit(1e-3), ["optax8.ScaleByRss8bitState"]),
        (optax8.lars8bit(1e-3), ["optax8.Trace8bitState", "optax.MaskedState"]),
        (optax.chain(optax8.percentile_clipping(), optax8.adamw8bit(optax.linear_schedule(1e-3, 0.0, 10))),
         ["optax8.PercentileClippingState", "optax.ScaleByScheduleState"]),
        (optax.inject_hyperparams(optax8.adamw8bit)(learning_rate=optax.linear_schedule(1e-3, 0.0, 10)),
         ["optax.InjectStatefulHyperparamsState", "optax.WrappedScheduleState"]),
        (optax.MultiSteps(optax8.adamw8bit(1e-3), 4).gradient_transformation(), ["optax.MultiStepsState"]),
        (optax.apply_if_finite(optax8.adamw8bit(1e-3), 3), ["optax.ApplyIfFiniteState"]),
    ],
    ids=["adam", "ademamix", "lion", "rmsprop", "adagrad", "lars", "clipping", "inject", "multisteps", "if_finite"],
)
def test_every_state_type_serializes_under_its_stable_name(tx, names):
  state = tx.init({"w": jnp.zeros((64, 300)), "b": jnp.zeros((300,))})
  exported = jax.export.export(jax.jit(lambda s: s), platforms=("cpu",))(state)
  blob = exported.serialize()
  for name in names:
    assert name.encode() in blob
  restored = jax.export.deserialize(blob)
  assert restored.in_tree == exported.in_tree == jax.tree.structure(((state,), {}))
  assert restored.out_tree == jax.tree.structure(state)


def test_malformed_quantized_array_metadata_is_a_clear_error():
  exported, _ = export_step(optax8.adamw8bit(1e-3), disabled_checks=optax8.export_safety_checks())
  blob = exported.serialize()
  good = b'{"block_size": 256, "signed": true}'
  assert good in blob
  corrupted = blob.replace(good, b'{"block_size": -56, "signed": true}')  # the same length
  with pytest.raises(ValueError, match="cannot deserialize an optax8.QuantizedArray"):
    jax.export.deserialize(bytearray(corrupted))

