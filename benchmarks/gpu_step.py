"""Step time and bandwidth of 8-bit Adam against ``optax.adam`` on a GPU.

For each size (100M and 1B float32 parameters by default, in four ``rows x 4096`` matrices)
the benchmark times, on the first GPU:

* the step of ``benchmarks/step_time.py`` (``tx.update`` followed by ``optax.apply_updates``
  under ``jax.jit``, the optimizer state and the parameters or a fresh gradient donated), for
  ``optax.adam`` and ``optax8.adam8bit`` (the CUDA kernel): the median of the timed steps
  after a warm-up;
* ``scale_by_adam8bit``'s update alone (the CUDA kernel, one call per matrix, without
  ``adam8bit``'s learning-rate pass), back to back, each update fed to the next call as its
  gradient;
* a device-to-device copy of as many bytes as the kernel moves, in the same run.

The tables show the step times and their ratio to ``optax.adam``, and the kernel's achieved
bandwidth, the bytes it must move (the gradient read, the update written, each moment's codes
and absmax read and written) over its time, as a fraction of the copy's. The targets: an
``adam8bit`` step no slower than ``optax.adam``'s at 1B parameters, and a kernel bandwidth of at
least 70% of the copy's; the fused step at most 0.7x ``optax.adam``'s.

Run from the repository root on a machine with a CUDA GPU::

  python -m benchmarks.gpu_step
  python -m benchmarks.gpu_step --sizes 100M --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import optax8
from benchmarks import step_time
from examples import common
from optax8._src import native_library

__all__ = ["Result", "main", "matrix_shapes", "measure", "parse_size", "size_label"]

COLUMNS = 4096
MATRICES = 4
BANDWIDTH_TARGET = 0.7


@dataclasses.dataclass
class Result:
  """One size's measurements, in seconds.

  Attributes:
    num_params: parameters in all.
    adam_step: median ``optax.adam`` step.
    adam8bit_step: median ``optax8.adam8bit`` step.
    fused_step: median ``optax8.fused(optax8.adam8bit)`` step.
    kernel: ``scale_by_adam8bit``'s update alone, per call over all matrices.
    kernel_bytes: bytes the kernel must move per update.
    copy: a device-to-device copy of ``kernel_bytes`` (half read, half written).
    uses_kernel: whether the compiled step calls the CUDA kernel.
    in_command_buffer: whether XLA put part of the compiled step into a command buffer.
  """

  num_params: int
  adam_step: float
  adam8bit_step: float
  fused_step: float
  kernel: float
  kernel_bytes: int
  copy: float
  uses_kernel: bool
  in_command_buffer: bool


def parse_size(text: str) -> int:
  units = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
  text = text.strip().upper()
  try:
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)
  except (ValueError, IndexError) as e:
    raise ValueError(f"size must be a number with an optional K, M or B suffix, got {text!r}.") from e


def matrix_shapes(num_params: int) -> list[tuple[int, int]]:
  rows = max(1, math.ceil(num_params / (MATRICES * COLUMNS)))
  return [(rows, COLUMNS)] * MATRICES


def _median_step(variant: step_time.Variant, shapes: list[tuple[int, int]], device: Any, warmup: int,
                 steps: int) -> tuple[float, str]:
  """Median step time (``benchmarks/step_time.py``'s step and donation), with the step's HLO text."""
  keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
  with jax.default_device(device):
    params = {f"w{i}": jax.random.normal(keys[i], s) * 0.02 for i, s in enumerate(shapes)}
    grads = {f"w{i}": jax.random.normal(keys[len(shapes) + i], s) * 1e-3 for i, s in enumerate(shapes)}
  compiled = step_time.compile_step(variant, params)
  fresh = jax.jit(lambda g: jax.tree.map(jnp.copy, g))
  times = []
  for i in range(warmup + steps):
    g = jax.block_until_ready(fresh(grads))  # donatable, like a gradient computed in the step
    start = time.perf_counter()
    compiled.params, compiled.state = jax.block_until_ready(compiled.run(compiled.params, compiled.state, g))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times), compiled.run.as_text()


def _back_to_back(fn: Callable[[Any], Any], x: Any, warmup: int, calls: int) -> float:
  """Seconds per call of ``x = fn(x)``, dispatched without waiting in between."""
  for _ in range(warmup):
    x = fn(x)
  jax.block_until_ready(x)
  start = time.perf_counter()
  for _ in range(calls):
    x = fn(x)
  jax.block_until_ready(x)
  return (time.perf_counter() - start) / calls


def _kernel_time(shapes: list[tuple[int, int]], device: Any, warmup: int, calls: int) -> tuple[float, int]:
  """Seconds per ``scale_by_adam8bit`` update alone (the kernel, without ``adam8bit``'s learning
  rate scaling: another pass over the update), and the bytes it must move."""
  tx = optax8.scale_by_adam8bit()
  keys = jax.random.split(jax.random.key(1), len(shapes))
  with jax.default_device(device):
    grads = {f"w{i}": jax.random.normal(keys[i], s) * 1e-3 for i, s in enumerate(shapes)}
    state = tx.init(grads)
  update = jax.jit(tx.update, donate_argnums=(0, 1))
  seconds = _back_to_back(lambda carry: update(*carry), (grads, state), warmup, calls)
  is_moment = lambda x: isinstance(x, optax8.QuantizedArray)
  moments = [x for x in jax.tree.leaves(state, is_leaf=is_moment) if is_moment(x)]
  moment_bytes = sum(m.codes.nbytes + m.absmax.nbytes for m in moments)
  grad_bytes = sum(4 * math.prod(s) for s in shapes)
  return seconds, 2 * (grad_bytes + moment_bytes)  # each read once and written once


def _copy_time(num_bytes: int, device: Any, warmup: int, calls: int) -> float:
  """Seconds per device-to-device copy of ``num_bytes`` in all (half read, half written)."""
  with jax.default_device(device):
    x = jnp.zeros((num_bytes // 8,), jnp.uint32)
  return _back_to_back(jax.jit(jnp.copy), x, warmup, calls)


def measure(num_params: int, warmup: int = 3, steps: int = 10, device: Any = None) -> Result:
  """Times one size's steps, kernel and copy on one device.

  Args:
    num_params: parameters in all, split into four ``rows x 4096`` float32 matrices.
    warmup: untimed steps (and calls) first.
    steps: timed steps (and calls).
    device: where to run; by default the first CUDA GPU. (Any device with an optax8 kernel
      works, which lets a CPU check the benchmark itself.)

  Returns:
    The measurements.

  Raises:
    RuntimeError: if there is no CUDA GPU (and no device is given), or the device's optax8
      kernel is unusable.
  """
  if device is None:
    try:
      device = jax.devices("cuda")[0]
    except RuntimeError as e:
      raise RuntimeError("benchmarks.gpu_step needs a CUDA GPU") from e
  optax8.set_implementation("native")  # raises if the kernel is unusable
  try:
    shapes = matrix_shapes(num_params)
    adam, _ = _median_step(step_time.VARIANTS[0], shapes, device, warmup, steps)
    adam8bit, text = _median_step(step_time.Variant("adam8bit", lambda: optax8.adam8bit(1e-3), "native"), shapes,
                                  device, warmup, steps)
    fused, _ = _median_step(step_time.Variant("fused", lambda: optax8.adam8bit(1e-3), "native", fused=True), shapes,
                            device, warmup, steps)
    kernel, kernel_bytes = _kernel_time(shapes, device, warmup, steps)
    copy = _copy_time(kernel_bytes, device, warmup, steps)
  finally:
    optax8.set_implementation(None)
  return Result(sum(math.prod(s) for s in shapes), adam, adam8bit, fused, kernel, kernel_bytes, copy,
                native_library.TARGET in text, "command_buffer" in text)


def size_label(num_params: int) -> str:
  return f"{num_params / 1e9:.2f}B" if num_params >= 10**9 else f"{num_params / 1e6:.0f}M"


def tables(results: list[Result]) -> str:
  """The results as plain-text tables, with the targets."""
  step_rows = []
  kernel_rows = []
  for r in results:
    size = size_label(r.num_params)
    step_rows.append([f"{size} optax.adam", f"{1e3 * r.adam_step:.3f}", "1.00"])
    ratio = r.adam8bit_step / r.adam_step
    step_rows.append([f"{size} optax8.adam8bit", f"{1e3 * r.adam8bit_step:.3f}", f"{ratio:.2f}"])
    step_rows.append([f"{size} optax8.fused(adam8bit)", f"{1e3 * r.fused_step:.3f}",
                      f"{r.fused_step / r.adam_step:.2f}"])
    kernel_bw, copy_bw = r.kernel_bytes / r.kernel, r.kernel_bytes / r.copy
    kernel_rows.append([size, f"{r.kernel_bytes / 1e9:.2f}", f"{1e3 * r.kernel:.3f}", f"{kernel_bw / 1e9:.0f}",
                        f"{1e3 * r.copy:.3f}", f"{copy_bw / 1e9:.0f}", f"{kernel_bw / copy_bw:.2f}"])
  lines = [
      common.format_table(["step", "ms/step", "x optax.adam"], step_rows),
      "",
      common.format_table(["adam8bit kernel", "GB moved", "ms", "GB/s", "copy ms", "copy GB/s", "x copy"],
                          kernel_rows),
      "",
  ]
  largest = max(results, key=lambda r: r.num_params)
  met = lambda ok: "met" if ok else "NOT met"
  lines.append(f"target: adam8bit step <= optax.adam's at {size_label(largest.num_params)}: "
               f"{met(largest.adam8bit_step <= largest.adam_step)}")
  lines.append(f"target: fused step <= 0.7x optax.adam's at {size_label(largest.num_params)}: "
               f"{met(largest.fused_step <= 0.7 * largest.adam_step)}")
  for r in results:
    fraction = r.copy / r.kernel
    lines.append(f"target: kernel bandwidth >= {BANDWIDTH_TARGET:.0%} of copy at {size_label(r.num_params)}: "
                 f"{fraction:.0%}, {met(fraction >= BANDWIDTH_TARGET)}")
  lines.append(f"compiled step calls the CUDA kernel: {all(r.uses_kernel for r in results)}; "
               f"has a command buffer: {any(r.in_command_buffer for r in results)}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="100M,1B", help="comma-separated parameter counts (default 100M,1B)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (and kernel and copy calls)")
  args = parser.parse_args(argv)
  results = [measure(parse_size(s), args.warmup, args.steps) for s in args.sizes.split(",")]
  print(f"{jax.devices('cuda')[0].device_kind}, float32 parameters in {MATRICES} matrices of width {COLUMNS}, "
        f"median of {args.steps} steps after {args.warmup} untimed")
  print(tables(results))


if __name__ == "__main__":
  main()
