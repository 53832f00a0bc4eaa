"""Compile time of a jitted train step, optax8's ``adamw8bit`` against ``optax.adamw``.

The step is ``tx.update`` followed by ``optax.apply_updates``, ``(params, state, grads) ->
(params, state)``, for ``N`` float32 parameter tensors, each large enough for 8-bit state. For
each tensor count the table gives the median, over ``--rounds`` interleaved rounds after a
warm-up round, of the seconds each stage of ``jax.jit`` takes from cold (``jax.clear_caches()``
before each), and each stage's ratio of optax8 to optax:

* ``trace``: ``jax.jit(step).trace(...)`` on ``jax.ShapeDtypeStruct``\\ s (the Python of
  ``tx.update`` and ``apply_updates``, traced to a jaxpr);
* ``lower``: ``.lower()`` (the jaxpr to StableHLO);
* ``compile``: ``.compile()`` (XLA);
* ``first call``: ``jax.jit(step)(params, state, grads)`` on arrays: the three stages above, then
  one run of the step.

optax8 uses its default implementation (the native kernel where it is usable). The tensors are
``--shape``, their first axis shrunk where ``N`` of them would hold more than ``--max-params``
parameters (the table gives the shape). Tensors of one shape share their trace in optax8;
``--distinct`` gives every tensor its own shape (its first and last axes a little shorter, the
table's shape is the largest) to time the worst case. Nothing is donated unless ``--donate``
(parameters, state and gradient, as in a train step that computes the gradient itself): without
it XLA copies the operands that optax8's kernel would update in place, which it takes longer to
compile.

Run from the repository root::

  python -m benchmarks.compile_time
  python -m benchmarks.compile_time --tensors 64 256 --shape 256 1024 --rounds 5 --distinct
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax8
from examples import common

__all__ = ["STAGES", "VARIANTS", "main", "measure", "shapes", "table"]

VARIANTS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optax.adamw": lambda: optax.adamw(1e-3),
    "optax8.adamw8bit": lambda: optax8.adamw8bit(1e-3),
}
BASELINE = "optax.adamw"
STAGES = ("trace", "lower", "compile", "first call")
MIN_8BIT_SIZE = 4096  # optax8's default: smaller tensors keep 32-bit state


def shapes(tensors: int, shape: tuple[int, ...], max_params: int, distinct: bool = False) -> list[tuple[int, ...]]:
  """The shapes of ``tensors`` parameters: ``shape``, its first axis shrunk to hold ``max_params`` in all.

  ``distinct``: each one different, its first and last axes shortened by up to ``sqrt(tensors)``.
  """
  rest = math.prod(shape[1:])
  shape = (min(shape[0], max(1, max_params // (tensors * rest))), *shape[1:])
  if not distinct:
    return [shape] * tensors
  side = math.isqrt(tensors - 1) + 1
  return [(shape[0] - i // side, *shape[1:-1], shape[-1] - i % side) for i in range(tensors)]


def _step(tx: optax.GradientTransformation) -> Callable[..., tuple[Any, Any]]:
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _time_stages(make: Callable[[], optax.GradientTransformation], params: Any, state: Any,
                 donate: bool) -> dict[str, float]:
  """Seconds per stage of one cold ``jax.jit`` of the step, caches cleared before each."""
  step = jax.jit(_step(make()), donate_argnums=(0, 1, 2) if donate else ())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, state, params))
  jax.clear_caches()
  marks = [time.perf_counter()]
  traced = step.trace(*abstract)
  marks.append(time.perf_counter())
  lowered = traced.lower()
  marks.append(time.perf_counter())
  lowered.compile()
  marks.append(time.perf_counter())
  args = jax.block_until_ready(jax.tree.map(jnp.copy, (params, state, params)))  # fresh buffers to donate
  jax.clear_caches()
  start = time.perf_counter()
  jax.block_until_ready(step(*args))
  seconds = [b - a for a, b in zip(marks, marks[1:])] + [time.perf_counter() - start]
  return dict(zip(STAGES, seconds))


def measure(tensor_shapes: list[tuple[int, ...]], rounds: int, donate: bool = False) -> dict[str, dict[str, float]]:
  """Median seconds per stage and variant for float32 parameters of ``tensor_shapes``.

  Args:
    tensor_shapes: one per parameter tensor.
    rounds: interleaved timing rounds, after one warm-up round.
    donate: donate the parameters, the state and the gradient to the step.

  Returns:
    ``{variant: {stage: median seconds}}``.
  """
  params = {f"w{i}": jnp.full(shape, 0.01, jnp.float32) for i, shape in enumerate(tensor_shapes)}
  states = {name: jax.jit(make().init)(params) for name, make in VARIANTS.items()}
  times = {name: {stage: [] for stage in STAGES} for name in VARIANTS}
  for round_ in range(rounds + 1):
    for name, make in VARIANTS.items():
      seconds = _time_stages(make, params, states[name], donate)
      if round_:
        for stage, s in seconds.items():
          times[name][stage].append(s)
  return {name: {stage: statistics.median(ts) for stage, ts in stages.items()} for name, stages in times.items()}


def table(results: dict[tuple[int, str], dict[str, dict[str, float]]]) -> str:
  """The results as a plain-text table: per (tensor count, shape), each variant's seconds, then the ratios."""
  headers = ["tensors", "shape", "optimizer", *(f"{stage} s" for stage in STAGES)]
  rows = []
  for (tensors, dims), medians in results.items():
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
  parser.add_argument("--distinct", action="store_true", help="give every tensor its own shape")
  parser.add_argument("--donate", action="store_true", help="donate the parameters, state and gradient to the step")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
  args = parser.parse_args(argv)
  if min(args.tensors) < 1 or min(args.shape) < 1 or args.rounds < 1:
    parser.error("--tensors, --shape and --rounds must be positive")
  runs = {n: shapes(n, tuple(args.shape), args.max_params, args.distinct) for n in args.tensors}
  too_small = [n for n, run in runs.items() if min(map(math.prod, run)) < MIN_8BIT_SIZE]
  if too_small:
    parser.error(f"--tensors {too_small} would need tensors too small for 8-bit state (< {MIN_8BIT_SIZE} elements)")
  describe = lambda run: ("<=" if args.distinct else "") + "x".join(map(str, run[0]))
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    results = {(n, describe(run)): measure(run, args.rounds, args.donate) for n, run in runs.items()}
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; median of {args.rounds} cold jax.jit rounds "
        f"(caches cleared) after a warm-up round; {'' if args.donate else 'nothing '}donated")
  print(table(results))


if __name__ == "__main__":
  main()
