"""Step time of optax8's 8-bit optimizers against optax's 32-bit ones on this machine's CPU.

One step is ``tx.update`` followed by ``optax.apply_updates`` (or, for the fused variants,
``optax8.fused(tx).step``), compiled with ``jax.jit`` for four float32 ``d x d`` matrices: 1M,
16M and 64M parameters by default. The optimizer state is donated, and so are either the
parameters or the gradient, whichever lets XLA run the step with fewer bytes (the new
parameters then overwrite them): in a training step that computes the gradient itself,
parameters and gradient buffers are both free for reuse. The "donate (0, 1)" variants donate
the parameters and the state whatever that costs, as ``jax.jit(step, donate_argnums=(0, 1))``
in a loop that passes the gradient in. The variants:

* ``optax.adam`` (float32 moments), the baseline of every ratio, also under donate (0, 1);
* ``optax.adam(mu_dtype=bfloat16)``;
* ``optax8.adam8bit`` on the native kernel (also under donate (0, 1)), on the pure-JAX
  reference path, and fused (``optax8.fused``) on the kernel;
* ``optax.sgd(momentum=0.9)`` and ``optax8.sgd8bit(momentum=0.9)`` on the kernel, unfused and
  fused;
* ``optax8.adam8bit`` with bfloat16 gradients for the float32 parameters, unfused and fused, on
  the kernel (which reads the 16-bit gradient as it is).

The variants are timed in interleaved rounds after a warm-up round (the machine may be shared
and noisy); the table gives each one's median step time, nanoseconds per parameter, its ratio
to ``optax.adam`` and to its own 32-bit counterpart.

Run from the repository root::

  python -m benchmarks.step_time
  python -m benchmarks.step_time --sizes 16 --rounds 3
  OPTAX8_CPU_ISA=avx2 python -m benchmarks.step_time --sizes 16   # the AVX2 path on an AVX-512 CPU

XLA:CPU allocates a step's temporaries afresh on every call, and glibc's malloc returns such
large blocks to the kernel when they are freed, so each step page-faults them in again: this
weighs on the reference path (about 21 bytes of temporaries per parameter) and on the kernel
step under donate (0, 1) (XLA's copy of the gradient, 4 bytes), not on the other kernel or optax
steps (none). To time them with freed memory kept in the process::

  MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python -m benchmarks.step_time
"""

from __future__ import annotations

import argparse
import dataclasses
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
from optax8._src import native_library

__all__ = ["VARIANTS", "CompiledStep", "Variant", "compile_step", "footprint", "gradients_like", "main", "measure",
           "parameters"]


@dataclasses.dataclass(frozen=True)
class Variant:
  """One optimizer to time.

  Attributes:
    name: the table's label.
    make: builds the transformation.
    implementation: ``optax8.set_implementation``'s choice while the step is traced.
    baseline: the name of the 32-bit variant this one is compared with.
    fused: time ``optax8.fused(tx).step`` instead of ``update`` + ``apply_updates``.
    donate: the ``donate_argnums``, or ``None`` for the better of (0, 1) and (1, 2).
    grad_dtype: the gradient's dtype (the parameters are float32).
  """

  name: str
  make: Callable[[], optax.GradientTransformation]
  implementation: str = "auto"
  baseline: str = "optax.adam"
  fused: bool = False
  donate: tuple[int, ...] | None = None
  grad_dtype: Any = jnp.float32


VARIANTS = (
    Variant("optax.adam", lambda: optax.adam(1e-3)),
    Variant("optax.adam, donate (0, 1)", lambda: optax.adam(1e-3), donate=(0, 1)),
    Variant("optax.adam bf16 mu", lambda: optax.adam(1e-3, mu_dtype=jnp.bfloat16)),
    Variant("adam8bit kernel", lambda: optax8.adam8bit(1e-3), "native"),
    Variant("adam8bit kernel, donate (0, 1)", lambda: optax8.adam8bit(1e-3), "native",
            "optax.adam, donate (0, 1)", donate=(0, 1)),
    Variant("adam8bit fused", lambda: optax8.adam8bit(1e-3), "native", fused=True),
    Variant("adam8bit reference", lambda: optax8.adam8bit(1e-3), "reference"),
    Variant("optax.sgd momentum", lambda: optax.sgd(1e-3, momentum=0.9), baseline="optax.sgd momentum"),
    Variant("sgd8bit kernel", lambda: optax8.sgd8bit(1e-3, momentum=0.9), "native", "optax.sgd momentum"),
    Variant("sgd8bit fused", lambda: optax8.sgd8bit(1e-3, momentum=0.9), "native", "optax.sgd momentum", fused=True),
    Variant("adam8bit kernel, bf16 grads", lambda: optax8.adam8bit(1e-3), "native", grad_dtype=jnp.bfloat16),
    Variant("adam8bit fused, bf16 grads", lambda: optax8.adam8bit(1e-3), "native", fused=True,
            grad_dtype=jnp.bfloat16),
)


def parameters(millions: int, seed: int = 0) -> dict[str, jax.Array]:
  """Four float32 square matrices holding ``millions`` * 2**20 parameters in all."""
  side = int(round((millions * 2**20 / 4) ** 0.5))
  keys = jax.random.split(jax.random.key(seed), 4)
  return {f"w{i}": jax.random.normal(k, (side, side)) * 0.02 for i, k in enumerate(keys)}


@dataclasses.dataclass
class CompiledStep:
  """A variant's step, compiled for one set of shapes, with its current arguments.

  Attributes:
    variant: the optimizer.
    run: ``(params, state, grads) -> (params, state)``, compiled, the state and the parameters or
      the gradient donated.
    stats: ``run``'s ``memory_analysis()``.
    params: the current parameters.
    state: the current optimizer state.
    times: seconds per timed step.
  """

  variant: Variant
  run: Any
  stats: Any
  params: Any
  state: Any
  times: list[float] = dataclasses.field(default_factory=list)


def compile_step(variant: Variant, params: Any) -> CompiledStep:
  """Compiles the variant's step for ``params``' shapes, donating what fits best (or what it says)."""
  tx = variant.make()

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  if variant.fused:
    step = optax8.fused(tx).step
  donations = ((0, 1), (1, 2)) if variant.donate is None else (variant.donate,)

  optax8.set_implementation(variant.implementation)  # chosen while the step is traced
  try:
    state = tx.init(params)
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")
      grads = gradients_like(params, variant)
      candidates = [jax.jit(step, donate_argnums=d).lower(params, state, grads).compile() for d in donations]
  finally:
    optax8.set_implementation(None)
  compiled = min(candidates, key=lambda c: footprint(c.memory_analysis()))
  return CompiledStep(variant, compiled, compiled.memory_analysis(), params, state)


def gradients_like(grads: Any, variant: Variant) -> Any:
  """``grads`` in the variant's gradient dtype (a fresh copy, free to donate)."""
  return jax.tree.map(lambda g: jnp.array(g, variant.grad_dtype), grads)


def footprint(stats: Any) -> int:
  """Bytes a compiled computation holds: arguments + outputs - aliased + temporaries."""
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes)


def measure(millions: int, rounds: int, steps: int, variants=VARIANTS) -> list[CompiledStep]:
  """Compiles and times every variant for one parameter count.

  Args:
    millions: parameters, in units of 2**20.
    rounds: interleaved timing rounds, after one warm-up round.
    steps: timed steps per variant and round.
    variants: what to time.

  Returns:
    The compiled steps, with their step times.
  """
  grads = jax.tree.map(lambda p: p * 0.05, parameters(millions, seed=1))
  compiled = [compile_step(v, parameters(millions)) for v in variants]
  for round_ in range(rounds + 1):
    for c in compiled:
      for _ in range(steps):
        g = jax.block_until_ready(gradients_like(grads, c.variant))  # a fresh gradient to donate
        start = time.perf_counter()
        c.params, c.state = jax.block_until_ready(c.run(c.params, c.state, g))
        if round_:
          c.times.append(time.perf_counter() - start)
  return compiled


def table(results: dict[int, list[CompiledStep]]) -> str:
  """The results as a plain-text table, one block of rows per parameter count."""
  headers = ["params", "step", "ms/step", "ns/param", "x optax.adam", "x 32-bit counterpart"]
  rows = []
  for millions, compiled in results.items():
    median = {c.variant.name: statistics.median(c.times) for c in compiled}
    for c in compiled:
      t = median[c.variant.name]
      rows.append([
          f"{millions}M", c.variant.name, f"{1e3 * t:.2f}", f"{1e9 * t / (millions * 2**20):.2f}",
          f"{t / median['optax.adam']:.2f}", f"{t / median[c.variant.baseline]:.2f}",
      ])
  return common.format_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64], help="parameter counts, in millions")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
  args = parser.parse_args(argv)
  if min(args.sizes) < 1 or args.rounds < 1 or args.steps < 1:
    parser.error("--sizes, --rounds and --steps must be positive")
  results = {m: measure(m, args.rounds, args.steps) for m in args.sizes}
  print(f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s), CPU kernel path "
        f"{native_library.cpu_isa()} (OPTAX8_CPU_ISA forces one); median of {args.rounds} x {args.steps} steps "
        "after a warm-up round")
  print(table(results))


if __name__ == "__main__":
  main()
