"""optax8 in the idioms of Flax, Orbax and optax, written as their own documentation writes them.

Multi-device cases (NNX and linen partitioning on simulated meshes) run in a fresh process with
eight CPU devices (``integrations_worker.py``).
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
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization
from flax.training import train_state

import optax8

TESTS = pathlib.Path(__file__).resolve().parent


class MLP(nnx.Module):
  """Big enough that its kernels get 8-bit state (min_8bit_size 4096), and a 32-bit bias."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 128, rngs=rngs)
    self.out = nnx.Linear(128, 48, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def loss_fn(model, x):
  return jnp.mean((model(x) - 1.0) ** 2)


BATCH = jax.random.normal(jax.random.key(1), (16, 64))


def arrays(tree):
  """The leaves of a tree (state, optimizer, Variables) as NumPy arrays, by path."""
  leaves = jax.tree_util.tree_leaves_with_path(nnx.as_pure(tree))
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_trees_equal(a, b):
  a, b = arrays(a), arrays(b)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def plain_run(tx, steps):
  """The same training as the NNX programs below, on plain arrays with tx.init / tx.update."""
  model = MLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), BATCH))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


# The default, and the options that change the update or the scale layout.
NNX_OPTIONS = {"default": {}, "bnb_options": {"block_wise": False, "skip_zeros": True, "max_unorm": 0.5}}


@pytest.mark.parametrize("options", NNX_OPTIONS.values(), ids=NNX_OPTIONS)
@pytest.mark.parametrize("make_optimizer", ["Optimizer", "ModelAndOptimizer"])
def test_nnx_optimizer_trains_like_plain_optax8(make_optimizer, options):
  tx = optax8.adamw8bit(1e-2, **options)
  model = MLP(nnx.Rngs(0))
  if make_optimizer == "Optimizer":
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x):
      loss, grads = nnx.value_and_grad(loss_fn)(model, x)
      optimizer.update(model, grads)
      return loss
    step = lambda: train_step(model, optimizer, BATCH)
  else:
    optimizer = nnx.ModelAndOptimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(optimizer, x):
      loss, grads = nnx.value_and_grad(loss_fn)(optimizer.model, x)
      optimizer.update(grads)
      return loss
    step = lambda: train_step(optimizer, BATCH)
  losses = [float(step()) for _ in range(3)]
  assert losses[-1] < losses[0]
  params, state = plain_run(tx, 3)
  assert_trees_equal(nnx.state(model, nnx.Param), params)
  assert_trees_equal(optimizer.opt_state, state)
  mu = optimizer.opt_state[0].mu
  assert mu["hidden"]["kernel"].codes.get_value().dtype == jnp.uint8
  assert isinstance(mu["hidden"]["bias"], nnx.Variable)  # 32-bit: boxed as optax would box it


def matrices_and_vectors(params):
  return jax.tree.map(lambda p: "matrix" if p.ndim > 1 else "vector", params)


# optax's wrappers and optax8's callable labels, as their documentation writes them: the
# functions map over whatever tree the optimizer is given (NNX Variables here).
WRAPPED = {
    "partition": lambda: optax.partition(
        {"matrix": optax8.adamw8bit(1e-2), "vector": optax.adam(1e-3)}, matrices_and_vectors),
    "masked": lambda: optax.masked(optax8.adamw8bit(1e-2), lambda p: jax.tree.map(lambda a: a.ndim > 1, p)),
    "callable_labels": lambda: optax8.adamw8bit(
        1e-2, param_labels=matrices_and_vectors, overrides={"matrix": {"block_size": 64}}),
    "percentile_clipping": lambda: optax.chain(optax8.percentile_clipping(95), optax8.adamw8bit(1e-2)),
}


@pytest.mark.parametrize("make_tx", WRAPPED.values(), ids=WRAPPED)
def test_nnx_optimizer_with_optax_wrappers_and_callable_labels_trains_like_plain_optax8(make_tx):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x):
    optimizer.update(model, nnx.grad(loss_fn)(model, x))

  for _ in range(3):
    train_step(model, optimizer, BATCH)
  params, state = plain_run(make_tx(), 3)
  assert_trees_equal(nnx.state(model, nnx.Param), params)
  assert_trees_equal(optimizer.opt_state, state)
  is_quantized = lambda x: isinstance(x, optax8.QuantizedArray)
  assert any(map(is_quantized, jax.tree.leaves(nnx.as_pure(optimizer.opt_state), is_leaf=is_quantized)))


def partitioned_dense_params():
  import flax.linen as nn

  dense = nn.Dense(512, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")),
                   bias_init=nn.with_partitioning(nn.initializers.zeros, ("model",)))
  return dense, dense.init(jax.random.key(0), jnp.ones((8, 64)))["params"]


@pytest.mark.parametrize("make_tx", WRAPPED.values(), ids=WRAPPED)
def test_linen_train_state_of_partitioned_params_with_optax_wrappers_trains_like_unboxed_params(make_tx):
  import flax.linen as nn

  dense, params = partitioned_dense_params()
  x = jax.random.normal(jax.random.key(1), (8, 64))

  @jax.jit
  def train_step(state):
    grads = jax.grad(lambda p: jnp.mean((state.apply_fn({"params": p}, x) - 1.0) ** 2))(state.params)
    return state.apply_gradients(grads=grads)

  boxed = train_state.TrainState.create(apply_fn=dense.apply, params=params, tx=make_tx())
  plain = train_state.TrainState.create(apply_fn=dense.apply, params=nn.unbox(params), tx=make_tx())
  for _ in range(3):
    boxed, plain = train_step(boxed), train_step(plain)
  assert_trees_equal(nn.unbox(boxed.params), plain.params)
  assert_trees_equal(jax.tree.leaves(nn.unbox(boxed.opt_state)), jax.tree.leaves(plain.opt_state))


def test_convert_state_and_pickle_keep_flax_boxes():
  import pickle

  import flax.linen as nn

  _, params = partitioned_dense_params()
  tx8, tx32 = optax8.adamw8bit(1e-3), optax.adamw(1e-3)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)  # boxed, as jax.grad gives them
  state8 = tx8.update(grads, tx8.init(params), params)[1]
  state32 = optax8.convert_state(state8, like=tx32.init(params))
  assert isinstance(state32[0].mu["kernel"], nn.Partitioned)
  assert_trees_equal(nn.unbox(state32), optax8.convert_state(nn.unbox(state8), like=tx32.init(nn.unbox(params))))
  back = optax8.convert_state(state32, like=tx8.init(params))
  assert_trees_equal(back, state8)  # 8 -> 32 is exact, so 32 -> 8 gives the codes back
  assert_trees_equal(pickle.loads(pickle.dumps(state8)), state8)
  assert type(pickle.loads(pickle.dumps(state8))[0].mu["kernel"].absmax) is type(state8[0].mu["kernel"].absmax)
  # An NNX optimizer's state, 32 to 8 bits.
  model = MLP(nnx.Rngs(0))
  opt32, opt8 = nnx.Optimizer(model, tx32, wrt=nnx.Param), nnx.Optimizer(model, tx8, wrt=nnx.Param)
  converted = optax8.convert_state(opt32.opt_state, like=opt8.opt_state)
  assert_trees_equal(converted, optax8.convert_state(nnx.as_pure(opt32.opt_state), like=nnx.as_pure(opt8.opt_state)))


def test_an_optimizer_pickles_with_cloudpickle_and_updates_alike():
  cloudpickle = pytest.importorskip("cloudpickle")
  params = {"w": jnp.ones((64, 256))}
  for tx in (optax8.adamw8bit(1e-3), optax8.sgd8bit(0.1, momentum=0.9)):
    copy = cloudpickle.loads(cloudpickle.dumps(tx))
    assert_trees_equal(copy.update(params, copy.init(params), params), tx.update(params, tx.init(params), params))


def test_nnx_split_merge_donated_step_and_orbax_round_trip(tmp_path):
  tx = optax8.adamw8bit(1e-2)

  def create():
    model = MLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, state = nnx.split(create())

  @jax.jit
  def train_step(state, x):
    model, optimizer = nnx.merge(graphdef, state)
    grads = nnx.grad(loss_fn)(model, x)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  train_step = jax.jit(train_step, donate_argnums=0)
  for _ in range(2):
    state = train_step(state, BATCH)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  _, abstract_state = nnx.split(nnx.eval_shape(create))
  restored = checkpointer.restore(tmp_path / "ckpt", abstract_state)
  assert_trees_equal(restored, state)
  # Training continues from the restored state exactly as from the original.
  assert_trees_equal(train_step(restored, BATCH), train_step(state, BATCH))


def linen_state(tx, params):
  return train_state.TrainState.create(apply_fn=None, params=params, tx=tx)


def test_flax_serialization_round_trips_and_refuses_other_quantization_options():
  params = {"w": jnp.ones((16, 300)), "b": jnp.zeros((300,))}
  state = linen_state(optax8.adam8bit(1e-3), params)
  state = state.apply_gradients(grads=jax.tree.map(lambda p: jnp.full_like(p, 0.5), params))
  restored = serialization.from_bytes(linen_state(optax8.adam8bit(1e-3), params), serialization.to_bytes(state))
  assert_trees_equal(restored.opt_state, state.opt_state)
  state_dict = serialization.to_state_dict(state)
  assert state_dict["opt_state"]["0"]["mu"]["w"]["block_size"] == 256
  assert_trees_equal(serialization.from_state_dict(state, state_dict).opt_state, state.opt_state)
  other = linen_state(optax8.adam8bit(1e-3, block_size=200), params)  # the same absmax shape (16, 2)
  with pytest.raises(ValueError, match="saved with block_size=256.*target has block_size=200"):
    serialization.from_bytes(other, serialization.to_bytes(state))
  tensor_wise = linen_state(optax8.adam8bit(1e-3, block_wise=False), params)
  with pytest.raises(ValueError, match="saved with block_size=256.*target has block_size=None"):
    serialization.from_bytes(tensor_wise, serialization.to_bytes(state))
  tensor_wise = tensor_wise.apply_gradients(grads=jax.tree.map(lambda p: jnp.full_like(p, 0.5), params))
  restored = serialization.from_bytes(linen_state(optax8.adam8bit(1e-3, block_wise=False), params),
                                      serialization.to_bytes(tensor_wise))
  assert_trees_equal(restored.opt_state, tensor_wise.opt_state)


def test_flax_serialization_names_a_32_bit_checkpoint_and_reads_an_orbax_restore_without_target(tmp_path):
  params = {"w": jnp.ones((64, 128))}
  target = optax8.adamw8bit(1e-3).init(params)
  with pytest.raises(ValueError, match=r"'./0/mu/w' holds an array of shape \(64, 128\).*optax8.convert_state"):
    serialization.from_bytes(target, serialization.to_bytes(optax.adamw(1e-3).init(params)))
  tx = optax8.scale_by_adam8bit()  # one NamedTuple (a chain's tuple comes back from Orbax as a list)
  state = tx.update(params, tx.init(params))[1]
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  raw = checkpointer.restore(tmp_path / "ckpt")  # nested dicts named by the key paths
  assert_trees_equal(serialization.from_state_dict(tx.init(params), raw), state)


def test_orbax_refuses_a_state_saved_with_another_block_size(tmp_path):
  params = {"w": jnp.ones((16, 300))}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", optax8.adam8bit(1e-3).init(params))
  checkpointer.wait_until_finished()
  target = jax.eval_shape(optax8.adam8bit(1e-3, block_size=200).init, params)
  with pytest.raises(ValueError, match="absmax_block200"):
    checkpointer.restore(tmp_path / "ckpt", target)
  same = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(optax8.adam8bit(1e-3).init, params))
  assert same[0].mu["w"].block_size == 256


def test_update_refuses_a_state_with_other_static_facts():
  params = {"w": jnp.ones((16, 300))}
  state = optax8.adam8bit(1e-3).init(params)
  with pytest.raises(ValueError, match="block size 256.*expects 8-bit state of block size 200"):
    optax8.adam8bit(1e-3, block_size=200).update(params, state, params)


def test_inject_hyperparams_takes_integer_options_without_static_args():
  tx = optax.inject_hyperparams(optax8.adamw8bit)(learning_rate=1e-3, min_8bit_size=0, block_size=128)
  direct = optax8.adamw8bit(1e-3, min_8bit_size=0, block_size=128)
  params = {"w": jnp.ones((4, 300)), "b": jnp.ones((300,))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  state = tx.init(params)
  assert state.inner_state[0].mu["b"].block_size == 128
  step = jax.jit(tx.update)
  updates, state = step(grads, state, params)
  expected_updates, expected_state = jax.jit(direct.update)(grads, direct.init(params), params)
  assert_trees_equal(updates, expected_updates)
  assert_trees_equal(state.inner_state, expected_state)
  dtype = state.hyperparams["learning_rate"].dtype
  state.hyperparams["learning_rate"] = jnp.asarray(0.5, dtype)
  state.hyperparams["b1"] = jnp.asarray(0.5, dtype)
  updates, state = step(grads, state, params)
  assert step._cache_size() == 1  # float hyperparameters changed without recompiling


def test_python_scalar_and_empty_parameters_work_as_in_optax():
  params = {"scale": 2.0, "empty": jnp.zeros((0, 8)), "w": jnp.ones((16, 300))}
  grads = {"scale": 1.0, "empty": jnp.zeros((0, 8)), "w": jnp.ones((16, 300))}
  for tx, ref, field in [(optax8.adam8bit(0.1, min_8bit_size=0), optax.adam(0.1), "mu"),
                         (optax8.sgd8bit(0.1, momentum=0.9, min_8bit_size=0), optax.sgd(0.1, momentum=0.9), "trace")]:
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    expected, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(updates["scale"], expected["scale"], rtol=1e-5)
    assert updates["empty"].shape == (0, 8)
    moments = optax.tree.get(state, field)
    assert isinstance(moments["w"], optax8.QuantizedArray)
    assert moments["empty"].shape == (0, 8) and moments["scale"].dtype == jnp.float32


def test_tree_map_params_with_a_dtype_changing_function_is_refused_at_the_next_update():
  tx = optax8.adam8bit(1e-3)
  params = {"w": jnp.ones((16, 300))}
  state = optax.tree_map_params(tx, lambda p: p.astype(jnp.bfloat16), tx.init(params))
  with pytest.raises(TypeError, match="uint8 codes and float32 absmax"):
    tx.update(params, state, params)


def run_worker(tmp_path, section):
  out = tmp_path / "facts.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  command = [sys.executable, str(TESTS / "integrations_worker.py"), section, str(out)]
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-6000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize("mesh_shape", [(1, 2), (4, 2)])
def test_linen_partitioning_recipe_trains_sharded(tmp_path, mesh_shape):
  facts = run_worker(tmp_path, f"linen-{mesh_shape[0]}x{mesh_shape[1]}")
  assert facts["specs"]["Dense_0"] == {"codes": [None, "model"], "absmax": [None, None]}
  assert facts["specs"]["Dense_1"] == {"codes": ["data", "model"], "absmax": ["data", "model"]}
  assert facts["specs_from_partition_spec"] == facts["specs"]
  assert facts["shards_match_specs"]
  # The sharded model's matmuls round differently: a code step at most, no other difference.
  assert facts["difference_to_one_device"]["codes"] <= 1 and facts["difference_to_one_device"]["absmax"] < 1e-5
  assert facts["loss_decreased"]


def test_linen_logical_axis_names_leave_the_absmax_unsharded_where_blocks_are_not_whole(tmp_path):
  facts = run_worker(tmp_path, "linen-logical")
  assert facts == {"codes": [None, "model"], "absmax": [None, None]}


def test_nnx_sharded_training_on_two_devices(tmp_path):
  facts = run_worker(tmp_path, "nnx")
  assert facts["absmax_spec"] == [None, None] and facts["codes_spec"] == [None, "model"]
  assert facts["wide_absmax_spec"] == [None, "model"]
  assert facts["shards_match_specs"]
  assert facts["difference_to_one_device"]["codes"] <= 1 and facts["difference_to_one_device"]["absmax"] < 1e-5


def test_fused_step_state_round_trips_through_orbax_and_flax_serialization(tmp_path):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(1e-2, weight_decay=0.1))
  fused = optax8.fused(tx)
  params = {"w": jax.random.normal(jax.random.key(0), (16, 512)), "b": jnp.zeros((512,))}
  step = jax.jit(fused.step, donate_argnums=(0, 1))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
  params, state = step(params, fused.init(params), grads)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": fused.init(params)})
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  assert_trees_equal(restored["opt_state"], state)
  from_bytes = serialization.from_bytes(fused.init(params), serialization.to_bytes(state))
  assert_trees_equal(from_bytes, state)
  # The restored state continues the fused step and the unfused one alike.
  want = step(*jax.tree.map(jnp.copy, (params, state)), grads)
  assert_trees_equal(step(restored["params"], restored["opt_state"], grads), want)
  updates, unfused_state = jax.jit(tx.update)(grads, from_bytes, params)
  assert_trees_equal(unfused_state, want[1])
  np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], want[0]["w"], rtol=1e-6, atol=1e-6)


def test_nnx_optimizer_sharding_metadata_and_the_state_sharding_recipe_shard_the_8bit_state(tmp_path):
  facts = run_worker(tmp_path, "nnx-recipes")
  # 128 columns over two devices are not whole blocks: that absmax stays unsharded.
  assert facts["optimizer_sharding"]["narrow"] == {"codes": [None, "model"], "absmax": [None, None]}
  assert facts["optimizer_sharding"]["wide"] == {"codes": [None, "model"], "absmax": [None, "model"]}
  assert facts["state_sharding_recipe"]["adamw"] == [[None, "model"]]
  assert facts["state_sharding_recipe"]["adamw8bit"] == [[None, "model"], [None, "model"]]
