"""Compiled memory footprint of the optimizer step, 8-bit against optax's 32-bit optimizers.

For the step of ``benchmarks/step_time.py`` (``update`` + ``apply_updates`` under ``jit``,
four float32 matrices, the state and the parameters or gradient donated), the table gives XLA's
``memory_analysis()`` of the compiled step: its footprint (argument + output - aliased +
temporary bytes), the temporaries alone, whether a temporary could hold a full-size float32
copy of the largest parameter, the footprint's ratio to ``optax.adam``'s, and the optimizer
state's bytes per parameter. Nothing is run: only compiled.

Run from the repository root::

  python -m benchmarks.memory
  python -m benchmarks.memory --sizes 16
"""

from __future__ import annotations

import argparse
import math

import jax

import optax8
from benchmarks import step_time
from examples import common

__all__ = ["main", "rows"]


def rows(millions: int, variants=step_time.VARIANTS) -> list[list[str]]:
  """One table row per variant for ``millions`` * 2**20 parameters."""
  params = step_time.parameters(millions)
  largest = max(math.prod(p.shape) for p in params.values()) * 4
  num_params = millions * 2**20
  stats = {}
  for v in variants:
    compiled = step_time.compile_step(v, params)
    s = compiled.stats
    stats[v.name] = (step_time.footprint(s), s.temp_size_in_bytes, optax8.state_bytes(compiled.state))
  out = []
  for v in variants:
    footprint, temp, state = stats[v.name]
    out.append([
        f"{millions}M", v.name, f"{footprint / 2**20:.1f}", f"{temp / 2**20:.1f}", "yes" if temp >= largest else "no",
        f"{footprint / stats['optax.adam'][0]:.3f}", f"{footprint / num_params:.2f}", f"{state / num_params:.3f}",
    ])
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64], help="parameter counts, in millions")
  args = parser.parse_args(argv)
  if min(args.sizes) < 1:
    parser.error("--sizes must be positive")
  headers = ["params", "step", "footprint MiB", "temp MiB", "full-size f32 temp", "x optax.adam",
             "footprint B/param", "state B/param"]
  print(f"{jax.devices()[0].device_kind}; the compiled step of benchmarks/step_time.py")
  print(common.format_table(headers, [r for m in args.sizes for r in rows(m)]))


if __name__ == "__main__":
  main()
