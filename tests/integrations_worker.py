"""Flax partitioning recipes with optax8 on simulated CPU meshes, run by test_integrations.py.

Usage: ``integrations_worker.py SECTION OUT.json`` with eight CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``); SECTION is ``linen-1x2``,
``linen-4x2``, ``linen-logical``, ``nnx`` or ``nnx-recipes``. Writes what it measured as JSON.
"""

import json
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax8


def spec_names(spec):
  return list(spec) if spec is not None else None


def moment_difference(a, b):
  """How far two quantized moments are apart: the largest code difference and absmax relative difference.

  The sharded model's matmuls reduce in another order, so the gradients differ by rounding.
  """
  codes = np.abs(np.asarray(a.codes, np.int32) - np.asarray(b.codes, np.int32)).max()
  a_absmax, b_absmax = np.asarray(a.absmax), np.asarray(b.absmax)
  absmax = (np.abs(a_absmax - b_absmax) / np.maximum(np.abs(b_absmax), np.finfo(np.float32).tiny)).max()
  return dict(codes=int(codes), absmax=float(absmax))


def shards_match(tree, shardings):
  """Whether every array is laid out as its sharding says (one device holds its own shard)."""
  return all(
      x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
  )


class MLP(nn.Module):
  """Kernels annotated as the Flax sharding guide does."""

  @nn.compact
  def __call__(self, x):
    # 128 columns on "model": shards of 64, not whole blocks of 256.
    x = nn.Dense(128, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")))(x)
    # 1024 columns on "model": shards of 512, whole blocks.
    x = nn.Dense(1024, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("data", "model")))(
        nn.relu(x))
    return nn.Dense(8, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("model", None)))(x)


def linen(mesh_shape):
  mesh = Mesh(np.array(jax.devices()[: mesh_shape[0] * mesh_shape[1]]).reshape(mesh_shape), ("data", "model"))
  model, tx = MLP(), optax8.adamw8bit(1e-2)
  x = jax.random.normal(jax.random.key(1), (8, 64))

  def init_fn(key, x):
    variables = model.init(key, x)
    return train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

  def train_step(state, x):
    def loss_fn(params):
      return jnp.mean((state.apply_fn({"params": params}, x) - 1.0) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  abstract = jax.eval_shape(init_fn, jax.random.key(0), x)
  state_sharding = nn.get_sharding(abstract, mesh)
  x_sharding = NamedSharding(mesh, P("data"))
  state = jax.jit(init_fn, in_shardings=(NamedSharding(mesh, P()), x_sharding), out_shardings=state_sharding)(
      jax.random.key(0), x)
  step = jax.jit(train_step, in_shardings=(state_sharding, x_sharding), out_shardings=(state_sharding, None))
  one_device = jax.jit(train_step)
  reference = jax.jit(init_fn)(jax.random.key(0), x)
  losses = []
  for _ in range(3):
    state, loss = step(state, x)
    reference, _ = one_device(reference, x)
    losses.append(float(loss))
  mu = state_sharding.opt_state[0].mu
  specs = {
      name: {"codes": spec_names(mu[name]["kernel"].codes.spec), "absmax": spec_names(mu[name]["kernel"].absmax.spec)}
      for name in ("Dense_0", "Dense_1")
  }
  with jax.set_mesh(mesh):  # the other recipe: PartitionSpecs under a context mesh
    partition_specs = nn.get_partition_spec(abstract)
    spec_state = jax.jit(init_fn, out_shardings=partition_specs)(jax.random.key(0), x)
  spec_mu = spec_state.opt_state[0].mu
  specs_from_partition_spec = {
      name: {"codes": spec_names(spec_mu[name]["kernel"].codes.value.sharding.spec),
             "absmax": spec_names(spec_mu[name]["kernel"].absmax.value.sharding.spec)}
      for name in ("Dense_0", "Dense_1")
  }
  return dict(
      specs=specs,
      specs_from_partition_spec=specs_from_partition_spec,
      shards_match_specs=shards_match(state, state_sharding),
      difference_to_one_device=moment_difference(
          nn.unbox(state.opt_state[0].mu["Dense_1"]["kernel"]), nn.unbox(reference.opt_state[0].mu["Dense_1"]["kernel"])
      ),
      loss_decreased=losses[-1] < losses[0],
  )


def linen_logical():
  """Logical axis names (``nn.with_logical_partitioning``) mapped to a 2x4 mesh by rules."""
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  rules = (("batch", "data"), ("hidden", "model"), ("embed", None))
  init = nn.initializers.lecun_normal()
  # 512 columns on "model" (4 devices): two blocks of 256, not whole blocks per device.
  model = nn.Dense(512, kernel_init=nn.with_logical_partitioning(init, ("embed", "hidden")))
  x = jax.random.normal(jax.random.key(1), (8, 64))

  def init_fn(key, x):
    return train_state.TrainState.create(apply_fn=model.apply, params=model.init(key, x)["params"],
                                         tx=optax8.adamw8bit(1e-2))

  def train_step(state, x):
    grads = jax.grad(lambda p: jnp.mean((state.apply_fn({"params": p}, x) - 1.0) ** 2))(state.params)
    return state.apply_gradients(grads=grads)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init_fn, jax.random.key(0), x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0), x)
    state = jax.jit(train_step, out_shardings=shardings)(state, x)
  kernel = state.opt_state[0].mu["kernel"]
  return dict(codes=spec_names(kernel.codes.value.sharding.spec), absmax=spec_names(kernel.absmax.value.sharding.spec))


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.narrow = nnx.Linear(64, 128, kernel_init=nnx.with_partitioning(init, (None, "model")), rngs=rngs)
    self.wide = nnx.Linear(128, 1024, kernel_init=nnx.with_partitioning(init, (None, "model")), rngs=rngs)

  def __call__(self, x):
    return self.wide(jax.nn.relu(self.narrow(x)))


def nnx_section():
  mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
  x = jax.random.normal(jax.random.key(1), (8, 64))

  @nnx.jit
  def create_sharded():
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax8.adamw8bit(1e-2), wrt=nnx.Param)
    state = nnx.state(optimizer)
    nnx.update(optimizer, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
    return model, optimizer

  @nnx.jit
  def train_step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
    optimizer.update(model, grads)

  with jax.set_mesh(mesh):
    model, optimizer = create_sharded()
    specs = nnx.get_partition_spec(optimizer.opt_state)
    for _ in range(3):
      train_step(model, optimizer, x)
  with jax.set_mesh(jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])):
    model_1, optimizer_1 = create_sharded()
    for _ in range(3):
      train_step(model_1, optimizer_1, x)
  mu = specs[0].mu
  opt_state = nnx.as_pure(optimizer.opt_state)
  return dict(
      codes_spec=spec_names(mu["narrow"]["kernel"].codes.get_value()),
      absmax_spec=spec_names(mu["narrow"]["kernel"].absmax.get_value()),
      wide_absmax_spec=spec_names(mu["wide"]["kernel"].absmax.get_value()),
      shards_match_specs=shards_match(
          opt_state, jax.tree.map(lambda s: NamedSharding(mesh, s), nnx.as_pure(specs))),
      difference_to_one_device=moment_difference(
          opt_state[0].mu["wide"]["kernel"], nnx.as_pure(optimizer_1.opt_state)[0].mu["wide"]["kernel"],
      ),
  )


class OptimizerShardedModel(nnx.Module):
  """Parameters replicated, their optimizer state sharded (NNX's ``optimizer_sharding``)."""

  def __init__(self):
    self.narrow = nnx.Param(jnp.ones((64, 128)), out_sharding=(None, None), optimizer_sharding=(None, "model"))
    self.wide = nnx.Param(jnp.ones((64, 1024)), out_sharding=(None, None), optimizer_sharding=(None, "model"))


def nnx_recipes():
  """NNX's optimizer_sharding metadata, and optax8.state_sharding's NNX recipe (its docstring's)."""
  mesh = jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
  facts = {}
  with jax.set_mesh(mesh):
    optimizer = nnx.Optimizer(OptimizerShardedModel(), optax8.adamw8bit(1e-2), wrt=nnx.Param)
    mu = optimizer.opt_state[0].mu
    facts["optimizer_sharding"] = {
        name: {"codes": spec_names(mu[name].codes.get_value().sharding.spec),
               "absmax": spec_names(mu[name].absmax.get_value().sharding.spec)}
        for name in ("narrow", "wide")
    }
    model = NnxMLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    param_specs = nnx.get_partition_spec(params)
    recipe = {}
    for name, tx in (("adamw", optax.adamw(1e-2)), ("adamw8bit", optax8.adamw8bit(1e-2))):
      abstract_state = jax.eval_shape(tx.init, params)
      shardings = optax8.state_sharding(abstract_state, param_specs)
      state = jax.jit(tx.init, out_shardings=shardings)(params)
      recipe[name] = [spec_names(x.sharding.spec) for x in jax.tree.leaves(state[0].mu["wide"]["kernel"])]
    facts["state_sharding_recipe"] = recipe
  return facts


def main(section, out):
  warnings.simplefilter("ignore")
  if section == "linen-logical":
    facts = linen_logical()
  elif section.startswith("linen-"):
    facts = linen(tuple(int(n) for n in section.removeprefix("linen-").split("x")))
  elif section == "nnx":
    facts = nnx_section()
  elif section == "nnx-recipes":
    facts = nnx_recipes()
  else:
    raise SystemExit(f"unknown section {section!r}")
  with open(out, "w") as f:
    json.dump(facts, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
