"""Step time of bitsandbytes' ``Adam8bit`` and PyTorch's fused Adam on a CUDA GPU.

The same parameters as ``benchmarks/gpu_step.py`` (float32, four ``rows x 4096`` matrices,
100M and 1B parameters by default), each with a fixed random gradient; one step is
``optimizer.step()``. Run it next to ``benchmarks/gpu_step.py`` on the same GPU to give optax8's
step time as a ratio to bitsandbytes'. Needs ``torch`` with CUDA and ``bitsandbytes``, neither of
which optax8 depends on::

  python -m benchmarks.bnb_step
  python -m benchmarks.bnb_step --sizes 100M --steps 5
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

from benchmarks.gpu_step import COLUMNS, MATRICES, matrix_shapes, parse_size, size_label
from examples import common

__all__ = ["main", "median_step_seconds"]


def median_step_seconds(make_optimizer: Callable[[list], object], num_params: int, warmup: int,
                        steps: int) -> float:
  """Median seconds per ``optimizer.step()`` over ``steps`` timed steps, timed with CUDA events."""
  import torch

  generator = torch.Generator(device="cuda").manual_seed(0)
  params = []
  for shape in matrix_shapes(num_params):
    p = torch.nn.Parameter(0.02 * torch.randn(shape, device="cuda", generator=generator))
    p.grad = 1e-3 * torch.randn(shape, device="cuda", generator=generator)
    params.append(p)
  optimizer = make_optimizer(params)
  times = []
  for i in range(warmup + steps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    optimizer.step()
    end.record()
    end.synchronize()
    if i >= warmup:
      times.append(start.elapsed_time(end) / 1e3)
  del optimizer, params
  torch.cuda.empty_cache()
  return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="100M,1B", help="comma-separated parameter counts (default 100M,1B)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  args = parser.parse_args(argv)
  import bitsandbytes as bnb
  import torch

  optimizers = {
      "torch.optim.Adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
      f"bitsandbytes {bnb.__version__} Adam8bit": lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3),
  }
  rows = []
  for size in args.sizes.split(","):
    num_params = parse_size(size)
    seconds = {name: median_step_seconds(make, num_params, args.warmup, args.steps)
               for name, make in optimizers.items()}
    baseline = seconds["torch.optim.Adam fused"]
    rows += [[f"{size_label(num_params)} {name}", f"{1e3 * s:.3f}", f"{s / baseline:.2f}"]
             for name, s in seconds.items()]
  print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, float32 parameters in {MATRICES} "
        f"matrices of width {COLUMNS}, median of {args.steps} steps after {args.warmup} untimed")
  print(common.format_table(["step", "ms/step", "x torch Adam"], rows))


if __name__ == "__main__":
  main()
