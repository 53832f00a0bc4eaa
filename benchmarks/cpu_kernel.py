"""The CPU kernel alone, on one thread: nanoseconds per element and the share of memory bandwidth.

Compiles the CPU kernel's block walk (``custom_calls/optax8_cpu_isa.cc``) once per instruction
set with the flags ``custom_calls/CMakeLists.txt`` gives it, links it with
``benchmarks/cpu_kernel_time.cc`` and runs, on one thread, each instruction set this CPU has
over float32 gradients in place (16M elements by default, blocks of 256): Adam (``adam8bit``)
and momentum (``sgd8bit``), the update alone and the fused apply step. Each is timed against a
loop that reads and writes the same bytes in place in the same round (the gradient, or the
gradient and the parameter, and each moment's codes), so the last column, loop time over kernel
time, is the share of the machine's one-thread bandwidth the kernel reaches. Medians over the
rounds, after a warm-up round.

Run from the repository root on an x86-64 machine with a C++17 compiler (``CXX``, else ``c++``)::

  python -m benchmarks.cpu_kernel
  python -m benchmarks.cpu_kernel --elements 4194304 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

__all__ = ["build", "cmake_flags", "main"]

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNEL_SOURCES = ROOT / "custom_calls"
ISAS = ("scalar", "avx2", "avx512")


def cmake_flags() -> tuple[list[str], dict[str, list[str]]]:
  """The kernel's compiler flags and each instruction set's, as ``CMakeLists.txt`` sets them."""
  text = (KERNEL_SOURCES / "CMakeLists.txt").read_text()
  common = re.search(r"^set\(_optax8_flags ([^)]*)\)", text, re.M)
  if common is None:
    raise RuntimeError("custom_calls/CMakeLists.txt no longer sets _optax8_flags")
  per_isa = {isa: [] for isa in ISAS}
  for isa, flags in re.findall(r"set\(_optax8_isa_flags_(\w+) ([^)]*)\)", text):
    per_isa[isa] = shlex.split(flags.strip('"'))
  return shlex.split(common.group(1)), per_isa


def build(directory: pathlib.Path, compiler: str) -> pathlib.Path:
  """Compiles the timing binary into ``directory``; returns its path."""
  common, per_isa = cmake_flags()
  flags = ["-std=c++17", *common, f"-I{KERNEL_SOURCES}"]
  objects = []
  for isa in ISAS:
    obj = directory / f"optax8_cpu_{isa}.o"
    subprocess.run([compiler, *flags, *per_isa[isa], f"-DOPTAX8_ISA={isa}", "-c",
                    str(KERNEL_SOURCES / "optax8_cpu_isa.cc"), "-o", str(obj)], check=True)
    objects.append(str(obj))
  binary = directory / "cpu_kernel_time"
  subprocess.run([compiler, *flags, str(ROOT / "benchmarks" / "cpu_kernel_time.cc"), *objects, "-o", str(binary)],
                 check=True)
  return binary


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--elements", type=int, default=1 << 24, help="a multiple of 4096 (default: 16M)")
  parser.add_argument("--rounds", type=int, default=9, help="timed rounds after the warm-up (default: 9)")
  args = parser.parse_args(argv)
  if args.elements <= 0 or args.elements % 4096:
    parser.error(f"--elements must be a positive multiple of 4096, got {args.elements}")
  if args.rounds < 1:
    parser.error(f"--rounds must be at least 1, got {args.rounds}")
  if platform.machine().lower() not in ("x86_64", "amd64"):
    print(f"cpu_kernel: the timing program is x86-64's; this machine is {platform.machine()}")
    return
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    print("cpu_kernel: no C++ compiler (set CXX)")
    return
  with tempfile.TemporaryDirectory() as directory:
    binary = build(pathlib.Path(directory), compiler)
    result = subprocess.run([str(binary), str(args.elements), str(args.rounds)], capture_output=True, text=True,
                            check=True)
  cpu = platform.processor()
  if os.path.exists("/proc/cpuinfo"):
    names = [line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    cpu = names[0] if names else cpu
  print(f"{cpu}; one thread, {args.elements} float32 elements in place, blocks of 256, median of {args.rounds}")
  header = (f"{'isa':>7} {'family':>9} {'step':>8} {'kernel ns/elem':>15} {'same-bytes loop':>16} "
            f"{'bandwidth share':>16}")
  print(header)
  print("-" * len(header))
  for line in result.stdout.split("\n"):
    if not line:
      continue
    isa, family, step, kernel, loop = line.split()
    print(f"{isa:>7} {family:>9} {step:>8} {float(kernel):>15.3f} {float(loop):>16.3f} "
          f"{float(loop) / float(kernel):>16.2f}")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
