"""Compile time of a jitted train step, optax8's ``adamw8bit`` against ``optax.adamw``.

The step is ``tx.update`` followed by ``optax.apply_updates``, ``(params, state, grads) ->
(params, state)``, for ``N`` float32 parameter tensors of one shape, every one large enough for
8-bit state. For each tensor count the table gives the median, over ``--rounds`` interleaved
rounds after a warm-up round, of the seconds spent on each stage of ``jax.jit``, with
``jax.clear_caches()`` before each:

* ``trace``: ``jax.jit(step).trace(...)`` on ``jax.ShapeDtypeStruct``\\ s (Python: tx.update
  and apply_updates traced to a jaxpr);
* ``lower``: ``.lower()`` (jaxpr to StableHLO);
* ``compile``: ``.compile()`` (XLA);
* ``first call``: ``jax.jit(step)(params, state, grads)`` on arrays, all of the above plus one
  run of the step,

and each stage's ratio of optax8 to optax. optax8 uses its default implementation (the native
kernel where it is usable). Tensors are ``--shape`` unless ``N`` of them would exceed
``--max-params`` parameters; then their leading axis shrinks to fit (the table gives the shape).

Run from the repository root::

  python -m benchmarks.compile_time
  python -m benchmarks.compile_time --tensors 64 256 --shape 256 1024 --rounds 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax8
from examples import common

__all__ = ["STAGES", "VARIANTS", "main", "measure", "shape_for", "table"]

VARIANTS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optax.adamw": lambda: optax.adamw(1e-3),
    "optax8.adamw8bit": lambda: optax8.adamw8bit(1e-3),
}
BASELINE = "optax.adamw"
STAGES = ("trace", "lower", "compile", "first call")
MIN_8BIT_SIZE = 4096  # optax8's default: smaller tensors keep 32-bit state


def shape_for(tensors: int, shape: tuple[int, ...], max_params: int) -> tuple[int, ...]:
  """``shape``, its leading axis shrunk so that ``tensors`` of it hold at most ``max_params``."""
  rest = math.prod(shape[1:])
  lead = min(shape[0], max(1, max_params // (tensors * rest)))
  return (lead, *shape[1:])


def _step(tx: optax.GradientTransformation) -> Callable[..., tuple[Any, Any]]:
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _time_stages(make: Callable[[], optax.GradientTransformation], params: Any, state: Any) -> dict[str, float]:
  """Seconds per stage of one cold ``jax.jit`` of the step, caches cleared before each."""
  step = _step(make())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, state, params))
  jax.clear_caches()
  marks = [time.perf_counter()]
  traced = jax.jit(step).trace(*abstract)
  marks.append(time.perf_counter())
  lowered = traced.lower()
  marks.append(time.perf_counter())
  lowered.compile()
  marks.append(time.perf_counter())
  jax.clear_caches()
  start = time.perf_counter()
  jax.block_until_ready(jax.jit(step)(params, state, params))
  seconds = [b - a for a, b in zip(marks, marks[1:])] + [time.perf_counter() - start]
  return dict(zip(STAGES, seconds))


def shapes(tensors: int, shape: tuple[int, ...], distinct: bool) -> list[tuple[int, ...]]:
  """``tensors`` times ``shape``, or (``distinct``) as many shapes, each a little smaller on its first and last axes."""
  if not distinct:
    return [shape] * tensors
  side = math.isqrt(tensors - 1) + 1
  return [(shape[0] - i // side, *shape[1:-1], shape[-1] - i % side) for i in range(tensors)]


def measure(tensors: int, shape: tuple[int, ...], rounds: int, distinct: bool = False) -> dict[str, dict[str, float]]:
  """Median seconds per stage and variant for ``tensors`` parameters of ``shape``.

  Args:
    tensors: how many parameter tensors.
    shape: each one's shape.
    rounds: interleaved timing rounds, after one warm-up round.
    distinct: give every tensor its own shape (see :func:`shapes`), so that none shares a trace.

  Returns:
    ``{variant: {stage: median seconds}}``.
  """
  params = {f"w{i}": jnp.full(s, 0.01, jnp.float32) for i, s in enumerate(shapes(tensors, shape, distinct))}
  states = {name: jax.jit(make().init)(params) for name, make in VARIANTS.items()}
  times = {name: {stage: [] for stage in STAGES} for name in VARIANTS}
  for round_ in range(rounds + 1):
    for name, make in VARIANTS.items():
      seconds = _time_stages(make, params, states[name])
      if round_:
        for stage, s in seconds.items():
          times[name][stage].append(s)
  return {name: {stage: statistics.median(ts) for stage, ts in stages.items()} for name, stages in times.items()}


def table(results: dict[tuple[int, tuple[int, ...]], dict[str, dict[str, float]]]) -> str:
  """The results as a plain-text table: per tensor count, each variant's seconds, then the ratios."""
  headers = ["tensors", "shape", "optimizer", *(f"{stage} s" for stage in STAGES)]
  rows = []
  for (tensors, shape), medians in results.items():
    dims = "x".join(map(str, shape))
    for name, stages in medians.items():
      rows.append([tensors, dims, name, *(f"{stages[stage]:.3f}" for stage in STAGES)])
    for name in medians:
      if name != BASELINE:
        rows.append([tensors, dims, f"{name}/{BASELINE}",
                     *(f"{medians[name][stage] / medians[BASELINE][stage]:.2f}x" for stage in STAGES)])
  return common.format_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tensors", type=int, nargs="+", default=[64, 256, 1024], help="parameter tensor counts")
  parser.add_argument("--shape", type=int, nargs="+", default=[256, 1024], help="each parameter tensor's shape")
  parser.add_argument("--max-params", type=int, default=2**26,
                      help="most parameters in all (--shape's first axis shrinks to fit)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
  args = parser.parse_args(argv)
  if min(args.tensors) < 1 or min(args.shape) < 1 or args.rounds < 1:
    parser.error("--tensors, --shape and --rounds must be positive")
  shapes = {n: shape_for(n, tuple(args.shape), args.max_params) for n in args.tensors}
  too_small = [n for n, shape in shapes.items() if math.prod(shape) < MIN_8BIT_SIZE]
  if too_small:
    parser.error(f"--tensors {too_small} would need tensors too small for 8-bit state (< {MIN_8BIT_SIZE} elements)")
  results = {(n, shape): measure(n, shape, args.rounds) for n, shape in shapes.items()}
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; median of {args.rounds} cold jax.jit rounds "
        "(caches cleared) after a warm-up round")
  print(table(results))


if __name__ == "__main__":
  main()
