"""Step time and memory of 8-bit Adam against ``optax.adam`` on CPU.

One step is ``tx.update`` followed by ``optax.apply_updates``, compiled with ``jax.jit``, for
four float32 ``dim x dim`` matrices (16M parameters by default), and four ways to run it:

* ``optax.adam``;
* ``optax8.adam8bit`` with the native kernel, parameters and state donated: XLA first copies
  the gradient, which the kernel overwrites with the update;
* the same with the state and the gradient donated and the new parameters written over the
  gradient, as happens to a gradient computed inside a training step: fully in place;
* ``optax8.adam8bit`` on its pure-JAX reference path.

The ways are timed in interleaved rounds after a warm-up (this machine is shared and noisy);
the table shows each one's median step time, its ratio to ``optax.adam``, the compiled
memory footprint (``memory_analysis()``: argument + output - aliased + temporary bytes, with
the temporaries alone) and the optimizer state's bytes per parameter.

Run from the repository root::

  python -m benchmarks.step_speed
  python -m benchmarks.step_speed --dim 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax8
from examples import common

__all__ = ["Variant", "main", "measure"]


@dataclasses.dataclass
class Variant:
  """One way to run the step, compiled.

  Attributes:
    name: the table's label.
    run: ``(params, state, grads) -> (params, state)``, compiled.
    params: the current parameters.
    state: the current optimizer state.
    stats: ``memory_analysis()`` of the compiled step.
    state_bytes: bytes of optimizer state.
    times: seconds per timed step.
  """

  name: str
  run: Callable[..., Any]
  params: Any
  state: Any
  stats: Any
  state_bytes: int
  times: list[float] = dataclasses.field(default_factory=list)


def _compile(name: str, tx: optax.GradientTransformation, implementation: str, donate: tuple[int, ...],
             params: Any, grads: Any) -> Variant:
  optax8.set_implementation(implementation)  # chosen when the step is traced, just below

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  compiled = jax.jit(step, donate_argnums=donate).lower(params, state, grads).compile()
  optax8.set_implementation(None)
  return Variant(name, compiled, params, state, compiled.memory_analysis(), optax8.state_bytes(state))


def measure(dim: int, rounds: int, steps: int) -> list[Variant]:
  """Compiles and times every variant.

  Args:
    dim: each of the four parameter matrices is ``dim x dim``.
    rounds: interleaved timing rounds.
    steps: timed steps per variant and round.

  Returns:
    The variants, with their step times.
  """
  shapes = [(dim, dim)] * 4
  keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
  new_params = lambda: {f"w{i}": jax.random.normal(keys[i], s) * 0.02 for i, s in enumerate(shapes)}
  grads = {f"w{i}": jax.random.normal(keys[4 + i], s) * 1e-3 for i, s in enumerate(shapes)}
  variants = [
      _compile("optax.adam", optax.adam(1e-3), "auto", (0, 1), new_params(), grads),
      _compile("adam8bit kernel", optax8.adam8bit(1e-3), "native", (0, 1), new_params(), grads),
      _compile("adam8bit kernel, grads donated", optax8.adam8bit(1e-3), "native", (1, 2), new_params(), grads),
      _compile("adam8bit reference", optax8.adam8bit(1e-3), "reference", (0, 1), new_params(), grads),
  ]
  for round_ in range(rounds + 1):  # round 0 warms up
    for v in variants:
      for _ in range(steps):
        g = jax.block_until_ready(jax.tree.map(jnp.copy, grads))  # a fresh gradient, donatable
        start = time.perf_counter()
        v.params, v.state = jax.block_until_ready(v.run(v.params, v.state, g))
        if round_:
          v.times.append(time.perf_counter() - start)
  return variants


def table(variants: list[Variant], num_params: int) -> str:
  """The results as a plain-text table."""
  base = statistics.median(variants[0].times)
  headers = ["step", "ms/step", "x optax.adam", "footprint MiB", "temp MiB", "state B/param"]
  rows = []
  for v in variants:
    s = v.stats
    footprint = s.argument_size_in_bytes + s.output_size_in_bytes - s.alias_size_in_bytes + s.temp_size_in_bytes
    median = statistics.median(v.times)
    rows.append([
        v.name, f"{1e3 * median:.2f}", f"{median / base:.2f}", f"{footprint / 2**20:.1f}",
        f"{s.temp_size_in_bytes / 2**20:.1f}", f"{v.state_bytes / num_params:.3f}",
    ])
  return common.format_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dim", type=int, default=2048, help="side of each of the 4 matrices (default 2048: 16M)")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
  args = parser.parse_args(argv)
  variants = measure(args.dim, args.rounds, args.steps)
  num_params = 4 * args.dim * args.dim
  print(f"{num_params / 2**20:.0f}M float32 parameters, {jax.devices()[0].device_kind}, "
        f"median of {args.rounds} x {args.steps} steps after a warm-up round")
  print(table(variants, num_params))


if __name__ == "__main__":
  main()
