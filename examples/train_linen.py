"""optax8 with Flax linen and ``flax.training.train_state.TrainState``: a tiny byte-level MLP LM.

The model predicts each byte of the standard library's source from the ``--context`` bytes
before it (embeddings concatenated, two hidden layers). It is trained from the same seed
with optax's AdamW and optax8's 8-bit AdamW (the embedding's state in 32-bit, by label),
and the script prints both runs' losses and optimizer-state bytes.

Run from the repository root::

  python -m examples.train_linen
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import optax8
from examples import common, data

__all__ = ["ByteMLP", "LinenResult", "main"]


class ByteMLP(nn.Module):
  """Next-byte logits from the previous ``context`` bytes."""

  embed_dim: int = 32
  hidden: int = 512

  @nn.compact
  def __call__(self, context: jax.Array) -> jax.Array:
    x = nn.Embed(data.VOCAB_SIZE, self.embed_dim)(context).reshape(context.shape[0], -1)
    x = nn.gelu(nn.Dense(self.hidden)(x))
    x = nn.gelu(nn.Dense(self.hidden)(x))
    return nn.Dense(data.VOCAB_SIZE)(x)


@dataclasses.dataclass
class LinenResult:
  """Final losses (nats per byte) and optimizer-state size of one run."""

  optimizer: str
  train_loss: float
  val_loss: float
  state_bytes: int


def _loss(params, apply_fn, windows: jax.Array) -> jax.Array:
  logits = apply_fn(params, windows[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, -1]).mean()


def train(name: str, args: argparse.Namespace, corpus: data.Corpus) -> LinenResult:
  """Trains :class:`ByteMLP` with optimizer ``name`` and reports its final losses."""
  model = ByteMLP()
  dummy = jnp.zeros((1, args.context), jnp.int32)
  state = train_state.TrainState.create(
      apply_fn=model.apply,
      params=model.init(jax.random.key(args.seed), dummy),
      tx=common.make_optimizer(name, args.steps),
  )

  @jax.jit
  def loss_of(state, windows):
    return _loss(state.params, state.apply_fn, windows)

  def step(state, windows):
    loss, grads = jax.value_and_grad(_loss)(state.params, state.apply_fn, windows)
    return state.apply_gradients(grads=grads), loss

  step = jax.jit(step, donate_argnums=0)
  losses = []
  for i in range(args.steps):
    state, loss = step(state, data.train_batch(corpus.train, args.seed, i, args.batch_size, args.context))
    losses.append(loss)
  val = data.eval_batches(corpus.val, 4, args.batch_size, args.context)
  return LinenResult(
      optimizer=name,
      train_loss=float(np.mean(jax.device_get(losses[-20:]))),
      val_loss=float(np.mean([loss_of(state, windows) for windows in val])),
      state_bytes=optax8.state_bytes(state.opt_state),
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The example's flags."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300, help="(default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
  parser.add_argument("--context", type=int, default=16, help="bytes of context (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
  parser.add_argument(
      "--optimizers", default="adamw,adamw8bit", help="comma-separated (default: %(default)s)"
  )
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[LinenResult]:
  """Trains with each optimizer and prints their losses and state bytes.

  Args:
    argv: command-line flags (default: ``sys.argv[1:]``).

  Returns:
    One :class:`LinenResult` per optimizer.
  """
  args = parse_args(argv)
  corpus = data.load_stdlib_corpus()
  print(corpus.describe())
  results = [train(name, args, corpus) for name in args.optimizers.split(",")]
  headers = ["optimizer", "train loss (last 20)", "val loss", "opt state bytes", "state ratio"]
  rows = [
      [r.optimizer, f"{r.train_loss:.4f}", f"{r.val_loss:.4f}", r.state_bytes,
       f"{r.state_bytes / results[0].state_bytes:.1%}"]
      for r in results
  ]
  print(common.format_table(headers, rows))
  return results


if __name__ == "__main__":
  main()
