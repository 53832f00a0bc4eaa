"""``optax8.offload``: large state leaves in host memory between steps, the same bits as without it.

On one device here; ``offload_worker.py`` runs the sharded cases on 8 simulated devices.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax8

TESTS = pathlib.Path(__file__).resolve().parent
MIN_SIZE = 1024  # small, so that tiny test tensors are offloaded
STEPS = 3
# w: 8-bit moments (>= min_8bit_size 4096) and offloaded; v: 32-bit moments (< 4096) but
# offloaded (>= MIN_SIZE); b: 32-bit moments in device memory.
SHAPES = {"w": (32, 256), "v": (40, 40), "b": (256,)}
EXPECTED_HOST = {"w", "v"}


def params_and_grads(steps=STEPS):
  keys = iter(jax.random.split(jax.random.key(0), len(SHAPES) * (steps + 1)))
  params = {name: jax.random.normal(next(keys), shape) for name, shape in SHAPES.items()}
  grads = [{name: jax.random.normal(next(keys), shape) for name, shape in SHAPES.items()} for _ in range(steps)]
  return params, grads


OPTIMIZERS = {
    "adamw8bit": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(1e-2, weight_decay=0.1)),
    "optax.adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
}


def memory_kinds(state):
  """Each state leaf's memory kind; a QuantizedArray's codes and absmax as a pair."""
  is_q = lambda x: isinstance(x, optax8.QuantizedArray)
  kind = lambda x: (x.codes.sharding.memory_kind, x.absmax.sharding.memory_kind) if is_q(x) else x.sharding.memory_kind
  return jax.tree.map(kind, state, is_leaf=is_q)


def assert_placed(state):
  """Every moment of the offloaded parameters in pinned_host, every other leaf in device memory."""
  is_q = lambda x: isinstance(x, optax8.QuantizedArray)
  for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_q):
    name = path[-1].key if isinstance(path[-1], jax.tree_util.DictKey) else None
    expected = "pinned_host" if name in EXPECTED_HOST else "device"
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(leaf)}  # codes and absmax together
    assert kinds == {expected}, (jax.tree_util.keystr(path), kinds)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def step_fn(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  return step


@pytest.mark.parametrize("init", ["eager", "jit", "eval_shape"])
def test_init_puts_large_leaves_in_pinned_host_and_small_ones_in_device_memory(init):
  params, _ = params_and_grads()
  tx = optax8.offload(OPTIMIZERS["adamw8bit"](), min_size=MIN_SIZE)
  if init == "eval_shape":  # traces; the abstract state describes the inner one's
    abstract, expected = jax.eval_shape(tx.init, params), jax.eval_shape(OPTIMIZERS["adamw8bit"]().init, params)
    assert jax.tree.structure(abstract) == jax.tree.structure(expected)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)] == [
        (a.shape, a.dtype) for a in jax.tree.leaves(expected)
    ]
    return
  state = tx.init(params) if init == "eager" else jax.jit(tx.init)(params)
  assert_placed(state)
  assert isinstance(state[1][0].mu["w"], optax8.QuantizedArray)
  assert not isinstance(state[1][0].mu["v"], optax8.QuantizedArray)  # below min_8bit_size, yet offloaded


@pytest.mark.parametrize("placement", ["outside", "inside"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_donated_steps_are_bit_identical_to_the_unoffloaded_optimizer(name, placement):
  params, grads = params_and_grads()
  plain = OPTIMIZERS[name]()
  if placement == "outside":  # offload(chain(clip, adam))
    tx = optax8.offload(OPTIMIZERS[name](), min_size=MIN_SIZE)
  else:  # chain(clip, offload(adam))
    inner = optax8.adamw8bit(1e-2, weight_decay=0.1) if name == "adamw8bit" else optax.adam(1e-2)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax8.offload(inner, min_size=MIN_SIZE))
  step, plain_step = jax.jit(step_fn(tx), donate_argnums=(0, 1)), jax.jit(step_fn(plain), donate_argnums=(0, 1))
  p, s = params, tx.init(params)
  q, t = jax.tree.map(jnp.copy, params), plain.init(params)
  assert_placed(s)
  for g in grads:
    p, s, updates = step(p, s, g)
    q, t, expected_updates = plain_step(q, t, g)
    assert_placed(s)
    assert_trees_equal(updates, expected_updates)
    assert_trees_equal(s, t)  # codes and absmax included
  assert_trees_equal(p, q)


def test_donated_state_buffers_are_reused():
  params, grads = params_and_grads(1)
  tx = optax8.offload(OPTIMIZERS["adamw8bit"](), min_size=MIN_SIZE)
  state = tx.init(params)
  step = jax.jit(step_fn(tx), donate_argnums=(0, 1))
  codes = state[1][0].mu["w"].codes
  _, new_state, _ = step(params, state, grads[0])
  assert codes.is_deleted()  # donated: its host buffer went to the new state
  assert_placed(new_state)


def test_eager_update_is_bit_identical_and_keeps_the_placement():
  params, grads = params_and_grads(2)
  tx, plain = optax8.offload(optax8.adamw8bit(1e-2), min_size=MIN_SIZE), optax8.adamw8bit(1e-2)
  s, t = tx.init(params), plain.init(params)
  for g in grads:
    u, s = tx.update(g, s, params)
    v, t = plain.update(g, t, params)
    assert_trees_equal(u, v)
    assert_trees_equal(s, t)
  assert memory_kinds(s)[0].mu["w"] == ("pinned_host", "pinned_host")
  assert memory_kinds(s)[0].mu["b"] == "device"


def test_update_forwards_params_and_extra_args():
  seen = {}

  def update(updates, state, params=None, **extra_args):
    seen.update(params=params, **extra_args)
    return updates, state

  tx = optax8.offload(optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update))
  params = {"w": jnp.ones(3)}
  tx.update(params, tx.init(params), params, value=2.0)
  assert seen == {"params": params, "value": 2.0}


def test_default_min_size_is_bitsandbytes_paging_threshold():
  tx = optax8.offload(optax.adam(1e-3))
  state = tx.init({"large": jnp.zeros((100_000,)), "small": jnp.zeros((99_999,))})
  assert memory_kinds(state)[0].mu == {"large": "pinned_host", "small": "device"}


def test_device_memory_kind_offloads_nothing():
  params, grads = params_and_grads(1)
  tx = optax8.offload(optax8.adamw8bit(1e-2), memory_kind="device", min_size=0)
  _, state = jax.jit(tx.update)(grads[0], tx.init(params), params)
  assert set(jax.tree.leaves(memory_kinds(state))) == {"device"}


def one_device_mesh_sharding(params):
  mesh = jax.make_mesh((1,), ("data",))
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), params)


def test_state_sharding_gives_the_memory_kinds_offload_places_the_state_in():
  params, grads = params_and_grads(1)
  tx = optax8.offload(OPTIMIZERS["adamw8bit"](), min_size=MIN_SIZE)
  params_sharding = one_device_mesh_sharding(params)
  shardings = optax8.state_sharding(
      jax.eval_shape(tx.init, params), params_sharding, memory_kind="pinned_host", min_size=MIN_SIZE
  )
  kinds = [s.memory_kind or "device" for s in jax.tree.leaves(shardings)]  # None: the default, device memory
  assert kinds == jax.tree.leaves(memory_kinds(tx.init(params)))
  params, grads = jax.device_put((params, grads), (params_sharding, [params_sharding] * len(grads)))
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  assert_placed(state)
  # The update's outputs (updates, state) are not in its inputs' order: out_shardings tell JAX
  # which memory each output is in, so that it gives each donated buffer to one in the same memory.
  update = jax.jit(tx.update, donate_argnums=1, out_shardings=(params_sharding, shardings))
  _, state = update(grads[0], state, params)
  assert_placed(state)
  # Without memory_kind, memory kinds are left alone.
  plain = optax8.state_sharding(jax.eval_shape(tx.init, params), params_sharding)
  assert {s.memory_kind or "device" for s in jax.tree.leaves(plain)} == {"device"}


def test_orbax_restores_an_offloaded_state_straight_into_host_memory(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params, grads = params_and_grads(2)
  tx = optax8.offload(OPTIMIZERS["adamw8bit"](), min_size=MIN_SIZE)
  params_sharding = one_device_mesh_sharding(params)
  params = jax.device_put(params, params_sharding)
  step = jax.jit(step_fn(tx))
  _, state, _ = step(params, tx.init(params), grads[0])
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  abstract = jax.eval_shape(tx.init, params)
  shardings = optax8.state_sharding(abstract, params_sharding, memory_kind="pinned_host", min_size=MIN_SIZE)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  restored = checkpointer.restore(tmp_path / "ckpt", target)
  assert_placed(restored)
  assert_trees_equal(restored, state)
  assert_trees_equal(step(params, restored, grads[1]), step(params, state, grads[1]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"memory_kind": "host"}, ValueError, r"memory_kind must be one of \['device', 'pinned_host'\].*'host'"),
        ({"memory_kind": "unpinned_host"}, ValueError, "unpinned_host.*inside jit"),
        ({"memory_kind": 1}, TypeError, "memory_kind must be a str, got 1"),
        ({"min_size": -1}, ValueError, "min_size must be a non-negative int, got -1"),
        ({"min_size": 1e5}, TypeError, "min_size must be a non-negative int, got 100000.0 of type float"),
        ({"min_size": True}, TypeError, "min_size must be a non-negative int, got True"),
    ],
)
def test_bad_options_are_refused(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax8.offload(optax.adam(1e-3), **kwargs)


def test_a_transformation_is_required():
  with pytest.raises(TypeError, match="tx must be an optax.GradientTransformation.*got <function adam"):
    optax8.offload(optax.adam)  # the factory, not a transformation


def test_state_sharding_refuses_a_memory_kind_it_cannot_express():
  abstract = jax.eval_shape(optax.adam(1e-3).init, {"w": jnp.zeros((8, 8))})
  with pytest.raises(ValueError, match="memory_kind must be one of"):
    optax8.state_sharding(abstract, {"w": NamedSharding(jax.make_mesh((1,), ("d",)), P())}, memory_kind="disk")
  with pytest.raises(ValueError, match="needs params_sharding of NamedShardings"):
    optax8.state_sharding(abstract, {"w": P()}, memory_kind="pinned_host")


def test_on_eight_devices_host_leaves_keep_their_specs_and_training_is_bit_identical(tmp_path):
  out = tmp_path / "facts.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  command = [sys.executable, str(TESTS / "offload_worker.py"), str(out), str(tmp_path / "ckpt")]
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-6000:]
  facts = json.loads(out.read_text())
  for mode, mode_facts in facts.items():
    assert not mode_facts["misplaced"], (mode, mode_facts["misplaced"])
    assert not mode_facts["differences"], (mode, mode_facts["differences"])
    assert mode_facts["host_leaves"] > 0, mode
