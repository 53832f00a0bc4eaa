"""optax8's and bitsandbytes' 8-bit optimizers side by side: how far each drifts from float32.

bitsandbytes' procedure (its ``test_optimizer8bit``): parameters ``randn * 0.1`` of shape
``(1024, 1024)``, 50 steps of gradients ``randn * 0.01``, the same gradients for every run. Both
libraries' 8-bit optimizers run next to one float32 run of the same algorithm (optax's alias;
bitsandbytes' own ``*32bit`` class is printed beside it as a check that the two agree), and after
every step each 8-bit run's parameters are compared with the float32 run's: the mean absolute
and the mean relative deviation (``|p32 - p8| / (|p32| + 1e-9)``, which elements near zero
dominate). bitsandbytes' test re-synchronises the float32 run to the 8-bit one after every step,
so it sees one step's rounding only, which the update computes from the float32 state before
storing it; here the runs are not re-synchronised, so the state's quantization error builds up
as it does in training. The table gives the deviations after the last step.

Both run on the CPU. Needs ``torch`` and ``bitsandbytes`` (neither is an optax8 dependency)::

  python -m benchmarks.bnb_fidelity
  python -m benchmarks.bnb_fidelity --optimizers adam,rmsprop --steps 100
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import optax8
from examples import common

__all__ = ["OPTIMIZERS", "main", "deviations"]


class Pair(NamedTuple):
  bnb: tuple[str, str, dict[str, Any]]  # bitsandbytes' 8-bit and 32-bit class names, their keywords
  optax8: Callable[[], optax.GradientTransformation]  # the same optimizer in optax8
  optax: Callable[[], optax.GradientTransformation]  # its float32 counterpart in optax


# bitsandbytes' test's hyperparameters, and optax8's equivalents of its semantics
# (bitsandbytes' RMSprop adds eps outside the square root; its Adagrad starts from zero).
OPTIMIZERS = {
    "adam": Pair(("Adam8bit", "Adam32bit", {"lr": 1e-3}), lambda: optax8.adam8bit(1e-3), lambda: optax.adam(1e-3)),
    "momentum": Pair(("SGD8bit", "SGD32bit", {"lr": 1e-2, "momentum": 0.9}),
                     lambda: optax8.sgd8bit(1e-2, momentum=0.9), lambda: optax.sgd(1e-2, momentum=0.9)),
    "rmsprop": Pair(("RMSprop8bit", "RMSprop32bit", {"lr": 1e-2, "alpha": 0.9}),
                    lambda: optax8.rmsprop8bit(1e-2, decay=0.9, eps_in_sqrt=False),
                    lambda: optax.rmsprop(1e-2, decay=0.9, eps_in_sqrt=False)),
    "lion": Pair(("Lion8bit", "Lion32bit", {"lr": 1e-4, "betas": (0.9, 0.99)}),
                 lambda: optax8.lion8bit(1e-4, weight_decay=0.0), lambda: optax.lion(1e-4, weight_decay=0.0)),
    "adagrad": Pair(("Adagrad8bit", "Adagrad32bit", {"lr": 1e-2}),
                    lambda: optax8.adagrad8bit(1e-2, initial_accumulator_value=0.0, eps=1e-10),
                    lambda: optax.adagrad(1e-2, initial_accumulator_value=0.0, eps=1e-10)),
    "ademamix": Pair(("AdEMAMix8bit", "AdEMAMix32bit", {"lr": 1e-3, "weight_decay": 0.0}),
                     lambda: optax8.ademamix8bit(1e-3), lambda: optax.contrib.ademamix(1e-3)),
}


def gradients(shape: tuple[int, int], steps: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
  rng = np.random.default_rng(seed)
  params = (rng.standard_normal(shape) * 0.1).astype(np.float32)
  return params, [(rng.standard_normal(shape) * 0.01).astype(np.float32) for _ in range(steps)]


def _deviation(p32: np.ndarray, p8: np.ndarray) -> tuple[float, float]:
  err = np.abs(p32.astype(np.float64) - p8)
  return float(err.mean()), float((err / (np.abs(p32) + 1e-9)).mean())


def bnb_run(name: str, kwargs: dict[str, Any], params: np.ndarray, grads: list[np.ndarray]) -> list[np.ndarray]:
  """The parameters after each step of bitsandbytes' optimizer ``name``."""
  import bitsandbytes as bnb
  import torch

  p = torch.nn.Parameter(torch.from_numpy(params.copy()))
  optimizer = getattr(bnb.optim, name)([p], **kwargs)
  out = []
  for g in grads:
    p.grad = torch.from_numpy(g.copy())
    optimizer.step()
    out.append(p.detach().numpy().copy())
  return out


def optax_run(tx: optax.GradientTransformation, params: np.ndarray, grads: list[np.ndarray]) -> list[np.ndarray]:
  """The parameters after each step of ``tx``."""

  @jax.jit
  def step(p, state, g):
    updates, state = tx.update({"w": g}, state, p)
    return optax.apply_updates(p, updates), state

  p = {"w": jnp.asarray(params)}
  state, out = tx.init(p), []
  for g in grads:
    p, state = step(p, state, jnp.asarray(g))
    out.append(np.asarray(p["w"]))
  return out


def deviations(name: str, shape: tuple[int, int], steps: int) -> dict[str, list[tuple[float, float]]]:
  """Per run, its (mean abs, mean rel) deviation from optax's float32 run after each step."""
  pair = OPTIMIZERS[name]
  params, grads = gradients(shape, steps)
  name8, name32, kwargs = pair.bnb
  reference = optax_run(pair.optax(), params, grads)
  runs = {"bitsandbytes": bnb_run(name8, kwargs, params, grads), "optax8": optax_run(pair.optax8(), params, grads)}
  try:
    runs["bitsandbytes 32-bit"] = bnb_run(name32, kwargs, params, grads)
  except RuntimeError:  # bitsandbytes 0.50's CPU AdEMAMix32bit fails on a broadcast
    pass
  return {k: [_deviation(r, p) for r, p in zip(reference, run)] for k, run in runs.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated (default: all)")
  parser.add_argument("--steps", type=int, default=50, help="steps (default: %(default)s)")
  parser.add_argument("--rows", type=int, default=1024, help="the parameter is rows x 1024 (default: %(default)s)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, list[tuple[float, float]]]]:
  """Runs every optimizer in both libraries and prints the table."""
  import bitsandbytes as bnb

  args = parse_args(argv)
  names = args.optimizers.split(",")
  unknown = [n for n in names if n not in OPTIMIZERS]
  if unknown:
    raise SystemExit(f"Unknown optimizers {unknown}; known: {', '.join(OPTIMIZERS)}.")
  shape = (args.rows, 1024)
  results = {name: deviations(name, shape, args.steps) for name in names}
  print(f"deviation from optax's float32 run after {args.steps} steps, shape {shape}, "
        f"bitsandbytes {bnb.__version__}")
  rows = []
  for name, runs in results.items():
    b, o = runs["bitsandbytes"][-1], runs["optax8"][-1]
    check = runs.get("bitsandbytes 32-bit", [(float("nan"), float("nan"))])[-1]
    rows.append([name, f"{b[0]:.3e}", f"{o[0]:.3e}", f"{o[0] / b[0]:.3f}", f"{b[1]:.3e}", f"{o[1]:.3e}",
                 f"{o[1] / b[1]:.3f}", f"{check[0]:.1e}"])
  print(common.format_table(
      ["optimizer", "|dp| bnb 8-bit", "|dp| optax8", "ratio", "rel bnb 8-bit", "rel optax8", "ratio",
       "|dp| bnb 32-bit"], rows))
  return results


if __name__ == "__main__":
  main()
