"""Device memory and step time of ``optax8.offload(adamw8bit)`` against ``adamw8bit``.

For each size (``--params``, float32 parameters in four ``rows x 4096`` matrices, as in
``benchmarks/gpu_step.py``) the benchmark compiles the step ``tx.update`` +
``optax.apply_updates`` under ``jax.jit`` (parameters and state donated, the outputs' shardings
given so that each donated buffer goes to an output in its own memory) for ``adamw8bit`` with
its state in device memory and with its large leaves offloaded to ``pinned_host``, and prints:

* XLA's ``compiled.memory_analysis()``: the device footprint (argument + output - aliased +
  temporary bytes), its temporaries, and the host footprint (the same for host memory);
* the median step time of each, and the offloaded step's ratio to the un-offloaded one.

The offloaded step should hold about the state's bytes (2.03 bytes per parameter) less device
memory and pay for moving the state to the device and back every step. On the CPU both memory
kinds are the same RAM and the transfers compile to nothing, so only a GPU (or TPU) gives
meaningful figures; the CPU run checks the benchmark itself.

Run from the repository root::

  python -m benchmarks.offload                     # 1e8 and 1e9 parameters
  python -m benchmarks.offload --params 1e6 --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import optax8
from benchmarks import gpu_step
from examples import common
from optax8._src import offload as offload_lib

__all__ = ["Result", "main", "measure", "table"]


@dataclasses.dataclass
class Result:
  """One variant's compiled step at one size.

  Attributes:
    name: ``adamw8bit`` or ``offload(adamw8bit)``.
    num_params: parameters in all.
    device_bytes: device footprint, arguments + outputs - aliased + temporaries.
    temp_bytes: device temporaries.
    host_bytes: host footprint, the same sum for host memory.
    host_leaves: state arrays in host memory.
    step: median seconds per step.
  """

  name: str
  num_params: int
  device_bytes: int
  temp_bytes: int
  host_bytes: int
  host_leaves: int
  step: float


def _footprints(stats: Any) -> tuple[int, int, int]:
  device = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)
  host = (stats.host_argument_size_in_bytes + stats.host_output_size_in_bytes - stats.host_alias_size_in_bytes
          + stats.host_temp_size_in_bytes)
  return device, stats.temp_size_in_bytes, host


def _measure_one(name: str, tx: optax.GradientTransformation, memory_kind: str | None, min_size: int,
                 shapes: list[tuple[int, int]], device: Any, warmup: int, steps: int) -> Result:
  mesh = jax.sharding.Mesh(np.array([device]), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
  params_sharding = {f"w{i}": replicated for i in range(len(shapes))}
  make = jax.jit(lambda k: {f"w{i}": jax.random.normal(k[i], s) * 0.02 for i, s in enumerate(shapes)},
                 out_shardings=params_sharding)
  params, grads = make(keys[: len(shapes)]), make(keys[len(shapes):])
  abstract = jax.eval_shape(tx.init, params)
  state_sharding = optax8.state_sharding(abstract, params_sharding, memory_kind=memory_kind, min_size=min_size)
  state = jax.jit(tx.init, out_shardings=state_sharding)(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    compiled = jax.jit(step, donate_argnums=(0, 1), out_shardings=(params_sharding, state_sharding)).lower(
        params, state, grads).compile()
  fresh = jax.jit(lambda g: jax.tree.map(jnp.copy, g), out_shardings=params_sharding)
  times = []
  for i in range(warmup + steps):
    g = jax.block_until_ready(fresh(grads))
    start = time.perf_counter()
    params, state = jax.block_until_ready(compiled(params, state, g))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  host_leaves = sum(x.sharding.memory_kind == "pinned_host" for x in jax.tree.leaves(state))
  device_bytes, temp_bytes, host_bytes = _footprints(compiled.memory_analysis())
  return Result(name, sum(r * c for r, c in shapes), device_bytes, temp_bytes, host_bytes, host_leaves,
                statistics.median(times))


def measure(num_params: int, warmup: int = 3, steps: int = 10, device: Any = None,
            min_size: int = offload_lib.DEFAULT_MIN_SIZE) -> list[Result]:
  """Compiles and times the un-offloaded and the offloaded ``adamw8bit`` step at one size.

  Args:
    num_params: parameters in all, in four ``rows x 4096`` float32 matrices.
    warmup: untimed steps first.
    steps: timed steps.
    device: where to run, by default ``jax.devices()[0]``.
    min_size: ``optax8.offload``'s ``min_size``.

  Returns:
    The un-offloaded step's result, then the offloaded one's.
  """
  device = device if device is not None else jax.devices()[0]
  shapes = gpu_step.matrix_shapes(num_params)
  make = lambda: optax8.adamw8bit(1e-3, weight_decay=0.1)
  return [
      _measure_one("adamw8bit", make(), None, min_size, shapes, device, warmup, steps),
      _measure_one("offload(adamw8bit)", optax8.offload(make(), min_size=min_size), "pinned_host", min_size,
                   shapes, device, warmup, steps),
  ]


def table(results: list[list[Result]]) -> str:
  """The results as a plain-text table: one pair of rows per size."""
  mib = lambda n: f"{n / 2**20:.1f}"
  rows = []
  for plain, offloaded in results:
    for r in (plain, offloaded):
      rows.append([
          f"{gpu_step.size_label(r.num_params)} {r.name}", mib(r.device_bytes), mib(r.temp_bytes), mib(r.host_bytes),
          r.host_leaves, f"{r.device_bytes / plain.device_bytes:.3f}", f"{1e3 * r.step:.3f}",
          f"{r.step / plain.step:.2f}",
      ])
  headers = ["step", "device MiB", "device temp MiB", "host MiB", "host arrays", "x device", "ms/step", "x time"]
  return common.format_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=float, nargs="+", default=[1e8, 1e9], help="parameter counts (default 1e8 1e9)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--min-size", type=int, default=offload_lib.DEFAULT_MIN_SIZE, help="optax8.offload's min_size")
  args = parser.parse_args(argv)
  if min(args.params) < 1 or args.warmup < 0 or args.steps < 1 or args.min_size < 0:
    parser.error("--params and --steps must be positive, --warmup and --min-size non-negative")
  device = jax.devices()[0]
  results = [measure(int(n), args.warmup, args.steps, device, args.min_size) for n in args.params]
  print(f"{device.device_kind} ({device.platform}); compiled.memory_analysis() and median of {args.steps} steps "
        f"after {args.warmup} untimed; min_size={args.min_size}")
  if device.platform == "cpu":
    print("on the CPU both memory kinds are the same RAM and transfers compile to nothing: figures check the code only")
  print(table(results))
  for plain, offloaded in results:
    saved = plain.device_bytes - offloaded.device_bytes
    print(f"{gpu_step.size_label(plain.num_params)}: offloading saves {saved / 2**20:.1f} MiB of device memory "
          f"({saved / plain.device_bytes:.1%}); step time x{offloaded.step / plain.step:.2f}")


if __name__ == "__main__":
  main()
