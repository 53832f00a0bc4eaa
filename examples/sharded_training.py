"""optax8 on a device mesh: FSDP plus tensor parallelism, the state sharded like the params.

A byte-level MLP language model (the standard library's source, as in ``train_linen``) is
trained on a 4 x 2 mesh with axes ``fsdp`` and ``tp``: the weights are sharded over both (FSDP
on one axis, tensor parallel on the other) and the batch over ``fsdp``. The optimizer state is
created already sharded, with :func:`optax8.state_sharding`, and each device updates its own
blocks of it with no communication. The script trains with optax's AdamW and optax8's 8-bit
AdamW and prints their losses and the optimizer-state bytes one device holds.

On a CPU the 8 devices are simulated: the script adds
``--xla_force_host_platform_device_count=8`` to ``XLA_FLAGS`` unless they already set a count.

Run from the repository root::

  python -m examples.sharded_training
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax8
from examples import common, data

__all__ = ["ShardedResult", "main"]

MESH_SHAPE = (4, 2)
MESH_AXES = ("fsdp", "tp")
EMBED_DIM = 32
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def param_specs() -> dict[str, P]:
  """Each parameter's ``PartitionSpec`` on the ``(fsdp, tp)`` mesh."""
  return {
      "embed": P(None, "tp"),  # kept in 32-bit by the 8-bit optimizer's "*embed*" override
      "hidden": P("fsdp", "tp"),
      "hidden_bias": P("tp"),
      "out": P(("tp", "fsdp"), None),  # its 256 outputs are one block: shard the other axis
      "out_bias": P(),
  }


def init_params(key: jax.Array, context: int, hidden: int) -> dict[str, jax.Array]:
  k_embed, k_hidden, k_out = jax.random.split(key, 3)
  fan_in = context * EMBED_DIM
  return {
      "embed": jax.random.normal(k_embed, (data.VOCAB_SIZE, EMBED_DIM)),
      "hidden": jax.random.normal(k_hidden, (fan_in, hidden)) / np.sqrt(fan_in),
      "hidden_bias": jnp.zeros((hidden,)),
      "out": jax.random.normal(k_out, (hidden, data.VOCAB_SIZE)) / np.sqrt(hidden),
      "out_bias": jnp.zeros((data.VOCAB_SIZE,)),
  }


def loss_fn(params: dict[str, jax.Array], windows: jax.Array) -> jax.Array:
  """Mean cross-entropy of each window's last byte given the bytes before it."""
  x = params["embed"][windows[:, :-1]].reshape(windows.shape[0], -1)
  h = jax.nn.gelu(x @ params["hidden"] + params["hidden_bias"])
  logits = h @ params["out"] + params["out_bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, -1]).mean()


@dataclasses.dataclass
class ShardedResult:
  """One run: its final training loss and its optimizer state's size."""

  optimizer: str
  train_loss: float
  state_bytes_per_device: int
  state_bytes: int


def per_device_bytes(tree) -> int:
  """Bytes of ``tree``'s arrays that the first device holds."""
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def train(name: str, args: argparse.Namespace, mesh: jax.sharding.Mesh, tokens: np.ndarray) -> ShardedResult:
  """Trains with optimizer ``name`` on ``mesh``; every array is sharded from the start."""
  tx = common.make_optimizer(name, args.steps)
  params_sharding = {k: NamedSharding(mesh, spec) for k, spec in param_specs().items()}
  params = jax.jit(init_params, static_argnums=(1, 2), out_shardings=params_sharding)(
      jax.random.key(args.seed), args.context, args.hidden
  )
  state_sharding = optax8.state_sharding(jax.eval_shape(tx.init, params), params_sharding)
  state = jax.jit(tx.init, out_shardings=state_sharding)(params)
  batch_sharding = NamedSharding(mesh, P("fsdp", None))

  def step(params, state, windows):
    loss, grads = jax.value_and_grad(loss_fn)(params, windows)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  losses = []
  for i in range(args.steps):
    windows = jax.device_put(data.train_batch(tokens, args.seed, i, args.batch_size, args.context), batch_sharding)
    params, state, loss = step(params, state, windows)
    # One step in flight at a time: with several, the simulated devices' collectives can
    # stall on a host with few cores.
    losses.append(float(loss))
  return ShardedResult(
      optimizer=name,
      train_loss=float(np.mean(losses[-10:])),
      state_bytes_per_device=per_device_bytes(state),
      state_bytes=optax8.state_bytes(state),
  )


def simulate_cpu_devices(count: int) -> None:
  """Asks XLA for ``count`` CPU devices, unless ``XLA_FLAGS`` already sets a count.

  Takes effect only before JAX first uses a device.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if DEVICE_COUNT_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The example's flags."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200, help="(default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=64, help="a multiple of 4 (default: %(default)s)")
  parser.add_argument("--context", type=int, default=16, help="bytes of context (default: %(default)s)")
  parser.add_argument("--hidden", type=int, default=512, help="hidden units (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
  parser.add_argument(
      "--optimizers", default="adamw,adamw8bit", help="comma-separated (default: %(default)s)"
  )
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[ShardedResult]:
  """Trains with each optimizer on an 8-device mesh and prints losses and state bytes.

  Args:
    argv: command-line flags (default: ``sys.argv[1:]``).

  Returns:
    One :class:`ShardedResult` per optimizer.
  """
  args = parse_args(argv)
  simulate_cpu_devices(np.prod(MESH_SHAPE))
  mesh = jax.make_mesh(MESH_SHAPE, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  corpus = data.load_stdlib_corpus()
  print(corpus.describe())
  print(f"mesh: {dict(mesh.shape)}; params: {param_specs()}")
  results = [train(name, args, mesh, corpus.train) for name in args.optimizers.split(",")]
  headers = ["optimizer", "train loss (last 10)", "state bytes per device", "state bytes", "per device vs first"]
  rows = [
      [r.optimizer, f"{r.train_loss:.4f}", r.state_bytes_per_device, r.state_bytes,
       f"{r.state_bytes_per_device / results[0].state_bytes_per_device:.1%}"]
      for r in results
  ]
  print(common.format_table(headers, rows))
  return results


if __name__ == "__main__":
  main()
