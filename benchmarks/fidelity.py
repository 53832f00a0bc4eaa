"""Fidelity benchmark: each 8-bit optimizer against its 32-bit counterpart, with the cause shown.

The task is a real classification problem shipped with scikit-learn: its 8x8 digits (1797
images, 1400 for training), an MLP 64-512-512-10, minibatches of 64, a constant learning rate
from optax's documented ranges. Two measurements per optimizer:

1. **On one gradient sequence** (seed 0). The 8-bit optimizer trains; its 32-bit counterpart
   takes the same gradient every step and keeps its own state. Per step: the fraction of the
   non-negative state's elements (second moments, squared-gradient sums) that are zero in 8-bit
   but positive in 32-bit, and the ratio ``|u8| / |u32|`` of the two updates per element, over
   the elements whose 32-bit update is at least 1e-3 of its tensor's largest (a step that a
   zero second moment makes too large shows here). Reported: the largest zero fraction, the
   ratio's 99.9th percentile and maximum over all steps.
2. **Over seeds**: each seed its own data split, initialisation and batches, shared by every
   run of that seed. Final test loss and accuracy of the 8-bit optimizer, of optax's 32-bit
   one, and of optax8's own 32-bit state (``optim_bits=32``: the same math, rounded in another
   order, so its distance from optax is the noise floor of this chaotic training), with the
   mean paired distance of each from optax's.

Run from the repository root (``pip install -e ".[examples]"`` brings scikit-learn)::

  python -m benchmarks.fidelity                      # every optimizer, 8 seeds
  python -m benchmarks.fidelity --optimizers rmsprop,adagrad --seeds 16
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import optax8
from examples import common
from optax8._src import quantization as qz

__all__ = ["OPTIMIZERS", "diagnose", "main", "over_seeds"]

BATCH = 64
TRAIN_SIZE = 1400
LAYERS = (64, 512, 512, 10)


class Pair(NamedTuple):
  reference: Callable[[], optax.GradientTransformation]  # optax's 32-bit optimizer
  make: Callable[..., optax.GradientTransformation]  # optax8's, with its quantization options
  non_negative: str | None  # the state field holding a non-negative moment, if any


OPTIMIZERS = {
    "adam": Pair(lambda: optax.adam(1e-3), lambda **o: optax8.adam8bit(1e-3, **o), "nu"),
    "adamw": Pair(lambda: optax.adamw(1e-3), lambda **o: optax8.adamw8bit(1e-3, **o), "nu"),
    "sgd": Pair(lambda: optax.sgd(1e-2, momentum=0.9), lambda **o: optax8.sgd8bit(1e-2, momentum=0.9, **o), None),
    "lion": Pair(lambda: optax.lion(1e-4), lambda **o: optax8.lion8bit(1e-4, **o), None),
    "rmsprop": Pair(lambda: optax.rmsprop(1e-3), lambda **o: optax8.rmsprop8bit(1e-3, **o), "nu"),
    "adagrad": Pair(lambda: optax.adagrad(1e-2), lambda **o: optax8.adagrad8bit(1e-2, **o), "sum_of_squares"),
    "ademamix": Pair(lambda: optax.contrib.ademamix(1e-3), lambda **o: optax8.ademamix8bit(1e-3, **o), "nu"),
    "lamb": Pair(lambda: optax.lamb(1e-3), lambda **o: optax8.lamb8bit(1e-3, **o), "nu"),
    "lars": Pair(lambda: optax.lars(0.3), lambda **o: optax8.lars8bit(0.3, **o), None),
}


def load_digits(seed: int) -> tuple[np.ndarray, ...]:
  """The digits, scaled to [0, 1], split into training and test sets by ``seed``."""
  from sklearn.datasets import load_digits as load  # the benchmark's only use of scikit-learn

  digits = load()
  x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  train, test = order[:TRAIN_SIZE], order[TRAIN_SIZE:]
  return tuple(jnp.asarray(a) for a in (x[train], y[train], x[test], y[test]))


def init_params(seed: int) -> dict[str, dict[str, jax.Array]]:
  keys = jax.random.split(jax.random.key(seed), len(LAYERS) - 1)
  return {
      f"dense{i}": {"kernel": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "bias": jnp.zeros((n,))}
      for i, (k, m, n) in enumerate(zip(keys, LAYERS[:-1], LAYERS[1:]))
  }


def forward(params: Any, x: jax.Array) -> jax.Array:
  for i in range(len(LAYERS) - 1):
    x = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
    x = jax.nn.relu(x) if i < len(LAYERS) - 2 else x
  return x


def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()


def batches(seed: int, steps: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, TRAIN_SIZE, (steps, BATCH))


def train(tx: optax.GradientTransformation, seed: int, steps: int) -> tuple[float, float]:
  """Final test loss and accuracy."""
  x, y, x_test, y_test = load_digits(seed)

  @jax.jit
  def step(params, state, i):
    grads = jax.grad(loss_fn)(params, x[i], y[i])
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = init_params(seed)
  state = tx.init(params)
  for i in batches(seed, steps):
    params, state = step(params, state, i)
  accuracy = jnp.mean(forward(params, x_test).argmax(-1) == y_test)
  return float(loss_fn(params, x_test, y_test)), float(accuracy)


def _dequantized(tree: Any) -> list[jax.Array]:
  return [qz.dequantize_blockwise(q) for q in jax.tree.leaves(tree, is_leaf=qz.is_quantized) if qz.is_quantized(q)]


def diagnose(pair: Pair, steps: int, seed: int = 0) -> dict[str, float]:
  """Measurement 1: the 8-bit run and its 32-bit counterpart on the 8-bit run's gradients."""
  tx8, tx32 = pair.make(), pair.reference()
  x, y, _, _ = load_digits(seed)

  @jax.jit
  def step(params, state8, state32, i):
    loss, grads = jax.value_and_grad(loss_fn)(params, x[i], y[i])
    u8, state8 = tx8.update(grads, state8, params)
    u32, state32 = tx32.update(grads, state32, params)
    zero = jnp.zeros([])
    if pair.non_negative is not None:
      quantized = jax.tree.map(qz.is_quantized, optax.tree.get(state8, pair.non_negative), is_leaf=qz.is_quantized)
      ours = _dequantized(optax.tree.get(state8, pair.non_negative))
      theirs = [v for v, q in zip(jax.tree.leaves(optax.tree.get(state32, pair.non_negative)),
                                  jax.tree.leaves(quantized)) if q]
      zero = jnp.max(jnp.stack([jnp.mean((a == 0) & (b > 0)) for a, b in zip(ours, theirs)]))
    ratios = []
    for a, b in zip(jax.tree.leaves(u8), jax.tree.leaves(u32)):
      big = jnp.abs(b) >= 1e-3 * jnp.max(jnp.abs(b))
      ratios.append(jnp.where(big, jnp.abs(a) / jnp.where(big, jnp.abs(b), 1.0), 1.0).ravel())
    return optax.apply_updates(params, u8), state8, state32, loss, zero, jnp.concatenate(ratios)

  params = init_params(seed)
  state8, state32 = tx8.init(params), tx32.init(params)
  zeros, ratios = [], []
  for i in batches(seed, steps):
    params, state8, state32, loss, zero, ratio = step(params, state8, state32, i)
    zeros.append(float(zero))
    ratios.append(np.asarray(ratio))
  ratios = np.concatenate(ratios)
  return {"zero_fraction": max(zeros), "ratio_p999": float(np.quantile(ratios, 0.999)),
          "ratio_max": float(ratios.max())}


def over_seeds(pair: Pair, steps: int, seeds: int) -> dict[str, list[tuple[float, float]]]:
  """Measurement 2: (test loss, accuracy) per seed of each of the three optimizers."""
  makers = {"optax": pair.reference, "8-bit": pair.make, "32-bit state": lambda: pair.make(optim_bits=32)}
  return {name: [train(make(), seed, steps) for seed in range(seeds)] for name, make in makers.items()}


def _mean_std(values: Sequence[float]) -> str:
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def _paired(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]], k: int) -> float:
  return statistics.mean(abs(x[k] - y[k]) for x, y in zip(a, b))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated (default: all)")
  parser.add_argument("--steps", type=int, default=400, help="training steps (default: %(default)s)")
  parser.add_argument("--seeds", type=int, default=8, help="seeds for measurement 2 (default: %(default)s)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  """Runs both measurements and prints their tables; returns every figure by optimizer."""
  args = parse_args(argv)
  names = args.optimizers.split(",")
  unknown = [n for n in names if n not in OPTIMIZERS]
  if unknown:
    raise SystemExit(f"Unknown optimizers {unknown}; known: {', '.join(OPTIMIZERS)}.")
  print(f"digits MLP {'-'.join(map(str, LAYERS))}, batch {BATCH}, {args.steps} steps, {args.seeds} seeds; "
        f"implementation {optax8.get_implementation()}; {jax.devices()[0].device_kind}")
  results = {}
  for name in names:
    results[name] = {"diagnosis": diagnose(OPTIMIZERS[name], args.steps),
                     "runs": over_seeds(OPTIMIZERS[name], args.steps, args.seeds)}
    print(f"{name} done", flush=True)
  print("\n1. one gradient sequence: 8-bit against 32-bit")
  print(common.format_table(
      ["optimizer", "zero 2nd moments (max)", "|u8|/|u32| p99.9", "max"],
      [[n, f"{r['diagnosis']['zero_fraction']:.2e}", f"{r['diagnosis']['ratio_p999']:.3f}",
        f"{r['diagnosis']['ratio_max']:.2f}"] for n, r in results.items()],
  ))
  print(f"\n2. final test loss and accuracy over {args.seeds} seeds (mean ± std; paired: mean |x - optax|)")
  rows = []
  for n, r in results.items():
    runs = r["runs"]
    loss = {k: _mean_std([x[0] for x in v]) for k, v in runs.items()}
    acc = {k: statistics.mean(x[1] for x in v) for k, v in runs.items()}
    rows.append([n, loss["optax"], loss["8-bit"], loss["32-bit state"],
                 f"{_paired(runs['8-bit'], runs['optax'], 0):.4f}",
                 f"{_paired(runs['32-bit state'], runs['optax'], 0):.4f}",
                 f"{100 * acc['optax']:.2f}", f"{100 * acc['8-bit']:.2f}", f"{100 * acc['32-bit state']:.2f}"])
  print(common.format_table(
      ["optimizer", "loss optax", "loss 8-bit", "loss 32-bit state", "paired 8-bit", "paired 32-bit",
       "acc optax", "acc 8-bit", "acc 32-bit"], rows))
  return results


if __name__ == "__main__":
  main()
