"""The CUDA kernel's cost without a GPU: SASS instructions per element, registers, shared memory.

Compiles the CUDA kernel (``custom_calls/optax8_cuda_kernel.cuh``) for one architecture
(``sm_90``, the H200's, by default) with the library's flags, together with a probe kernel per
family: the library's kernel with every block the default 256 elements long (the path nearly every block takes, so
its code is straight through), and reads the machine code with ``cuobjdump``. Per family
(float32 gradients, no flags):

* ``instr/elem``: the instructions one iteration of the kernel's loop over the blocks executes
  on its common path, over the 8 elements each lane of a warp updates per block: the block's
  indexing, loads, decoding, the family's math, the finiteness checks, the update store, the
  block maximum and the encoding. Left out are the calls of rare paths, which the loop branches
  around: the slow paths of IEEE division and square root (subnormal or extreme operands) and
  the change of hyperparameter group (once per warp where there is one group);
* ``static``: every instruction of the walk per element, those rare paths and their
  out-of-line code included (a bound that counts code never run in the common case);
* the common path split by the units that issue its instructions: FP32 (``FADD``/``FMUL``/
  ``FSETP``...), integer and logic (the H200 issues these at half the FP32 rate), memory, MUFU
  (sqrt, reciprocal), the rest (moves, predicates, control);
* ``regs`` and ``local`` (spilled bytes) of the library's kernel itself, and the shared memory
  its code tables take.

Run from the repository root (needs ``nvcc``, and ``cuobjdump`` with ``nvdisasm``: next to
``nvcc``, on ``PATH``, or ``pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``)::

  python -m benchmarks.cuda_sass
  python -m benchmarks.cuda_sass --arch sm_80

Without them it prints what is missing and exits with status 0, so that CI runs it anywhere.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

from examples import common

__all__ = ["FAMILIES", "common_path_of_loop", "count_instructions", "find_tools", "main", "parse_sass"]

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "custom_calls" / "optax8_cuda_kernel.cuh"
# optax8_math.h's family types, in its VisitFamily order.
FAMILIES = ("Adam", "Momentum", "Lion", "Rmsprop", "Adagrad", "Ademamix")
# The library's device flags (custom_calls/CMakeLists.txt): exact float32 arithmetic.
NVCC_FLAGS = ("-O3", "--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false", "-std=c++17")
ELEMENTS_PER_LANE = 8  # optax8_cuda_kernel.cuh's kItems: a 256-element block over a warp's 32 lanes

PROBE = """
#include "optax8_cuda_kernel.cuh"
#include <cstdio>

namespace optax8 {
namespace {
// The kernel with every block 256 elements long (so the code of a block's path is straight
// through), and the kernel without its walk over the blocks.
template <class F, bool kWalk>
__global__ void __launch_bounds__(kThreads, F::kMoments > 2 ? 2 : 3) SassProbe(const Job job, const Walk walk) {
  LoadSharedTables<F>();
  if (kWalk) WalkBlocks<F, 0, float, float>(job, walk, [](int64_t, int64_t) { return BlockShape{256, true}; });
}
}  // namespace
}  // namespace optax8

// Each family's two probes and its float32 kernel without flags (referenced, so compiled), and
// its tables' shared-memory bytes.
#define OPTAX8_PROBE(F)                                                              \\
  std::printf("%s %zu %p %p %p\\n", #F, optax8::kSharedTableBytes<optax8::F>,        \\
              reinterpret_cast<void*>(&optax8::SassProbe<optax8::F, true>),          \\
              reinterpret_cast<void*>(&optax8::SassProbe<optax8::F, false>),         \\
              reinterpret_cast<void*>(&optax8::UpdateKernel<optax8::F, 0, float, float>));

int main() {
  OPTAX8_PROBE(Adam) OPTAX8_PROBE(Momentum) OPTAX8_PROBE(Lion) OPTAX8_PROBE(Rmsprop)
  OPTAX8_PROBE(Adagrad) OPTAX8_PROBE(Ademamix)
  return 0;
}
"""

_UNITS = (
    ("fp32", re.compile(r"^(FADD|FMUL|FFMA|FSETP|FSET|FMNMX|FSEL|FCHK|FRND|F2F|F2I|I2F)")),
    ("int", re.compile(r"^(IADD|IMAD|IMUL|ISETP|ISCADD|IMNMX|VIMNMX|LOP|SHF|SHL|SHR|LEA|SEL|PRMT|BFE|BFI|FLO|POPC|BREV|"
                       r"IABS|ICMP|BMSK|SGXT|REDUX|VOTE)")),
    ("memory", re.compile(r"^(LD|ST|LDG|STG|LDS|STS|LDC|LDL|STL|ATOM|RED|ULDC|LDGSTS|CCTL)")),
    ("mufu", re.compile(r"^MUFU")),
)


def find_tools() -> tuple[str | None, str | None]:
  """``nvcc`` and ``cuobjdump``: on PATH, beside each other, or from the nvidia-cuda-cuobjdump wheel."""
  nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
  cuobjdump = shutil.which("cuobjdump")
  if cuobjdump is None and nvcc is not None:
    beside = pathlib.Path(nvcc).resolve().parent / "cuobjdump"
    cuobjdump = str(beside) if beside.is_file() else None
  if cuobjdump is None and importlib.util.find_spec("nvidia") is not None:
    for root in importlib.util.find_spec("nvidia").submodule_search_locations or []:
      for candidate in sorted(pathlib.Path(root).glob("cu*/bin/cuobjdump")):
        cuobjdump = str(candidate)
  return nvcc, cuobjdump


def parse_sass(sass: str) -> dict[str, list[tuple[int, bool, str, str]]]:
  """Per function in cuobjdump's ``-sass`` listing, its instructions as (address, predicated,
  opcode with modifiers, operands), NOPs left out."""
  functions: dict[str, list[tuple[int, bool, str, str]]] = {}
  current = None
  for line in sass.splitlines():
    header = re.match(r"\s*Function : (\S+)", line)
    if header:
      current = functions.setdefault(header.group(1), [])
      continue
    instruction = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*)", line)
    if instruction and current is not None and instruction.group(3) != "NOP":
      current.append((int(instruction.group(1), 16), bool(instruction.group(2)), instruction.group(3),
                      instruction.group(4).strip()))
  return functions


def count_instructions(sass: str) -> dict[str, collections.Counter]:
  """Per function in cuobjdump's ``-sass`` listing, its instructions by opcode (NOPs left out)."""
  return {name: collections.Counter(op.split(".")[0] for _, _, op, _ in code)
          for name, code in parse_sass(sass).items()}


def _target(operands: str) -> int | None:
  target = re.match(r"0x([0-9a-f]+)", operands)
  return int(target.group(1), 16) if target else None


def common_path_of_loop(code: list[tuple[int, bool, str, str]]) -> collections.Counter:
  """The opcodes of the function's last loop before its final ``EXIT`` (the block walk), less
  the instructions that a predicated forward branch skips on the way to a ``CALL``: the setup
  and call of a rare path."""
  end_index = max(i for i, (_, _, op, _) in enumerate(code) if op == "EXIT")
  start = end = None
  for address, _, op, operands in reversed(code[:end_index]):
    target = _target(operands)
    if op.startswith("BRA") and target is not None and target < address:
      start, end = target, address
      break
  if start is None:
    raise RuntimeError("no loop found before the kernel's EXIT")
  body = [instruction for instruction in code if start <= instruction[0] <= end]
  rare = set()
  for address, predicated, op, operands in body:
    target = _target(operands)
    if predicated and op.startswith("BRA") and target is not None and target > address:
      skipped = [i for i in body if address < i[0] < target]
      if any(i[2].startswith("CALL") for i in skipped):
        rare.update(i[0] for i in skipped)
  return collections.Counter(op.split(".")[0] for address, _, op, _ in body if address not in rare)


def _unit_counts(opcodes: collections.Counter) -> dict[str, int]:
  counts = dict.fromkeys([name for name, _ in _UNITS] + ["other"], 0)
  for opcode, n in opcodes.items():
    unit = next((name for name, pattern in _UNITS if pattern.match(opcode)), "other")
    counts[unit] += n
  return counts


def _function(functions: dict[str, collections.Counter], *parts: str) -> str:
  matches = [name for name in functions if all(part in name for part in parts)]
  if len(matches) != 1:
    raise RuntimeError(f"expected one SASS function named with {parts}, found {matches}")
  return matches[0]


def _resources(listing: str) -> dict[str, dict[str, int]]:
  """Per function in cuobjdump's ``-res-usage`` listing: REG, LOCAL, SHARED."""
  resources, current = {}, None
  for line in listing.splitlines():
    header = re.match(r"\s*Function (\S+):", line)
    if header:
      current = header.group(1)
    elif current and "REG:" in line:
      resources[current] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
  return resources


def measure(arch: str, nvcc: str, cuobjdump: str) -> list[list[str]]:
  with tempfile.TemporaryDirectory() as tmp:
    probe, binary = pathlib.Path(tmp) / "probe.cu", pathlib.Path(tmp) / "probe"
    probe.write_text(PROBE)
    subprocess.run([nvcc, f"-arch={arch}", *NVCC_FLAGS, f"-I{SOURCE.parent}",
                    "-diag-suppress=20013,20015", str(probe), "-o", str(binary)], check=True, capture_output=True)
    # cuobjdump disassembles with nvdisasm, which it looks for on PATH: the one beside it first.
    env = dict(os.environ, PATH=os.pathsep.join([str(pathlib.Path(cuobjdump).parent), os.environ.get("PATH", "")]))
    sass = subprocess.run([cuobjdump, "-sass", str(binary)], check=True, capture_output=True, text=True,
                          env=env).stdout
    usage = subprocess.run([cuobjdump, "-res-usage", str(binary)], check=True, capture_output=True, text=True).stdout
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    shared = {line.split()[0]: int(line.split()[1]) for line in printed.splitlines()}
  code, resources = parse_sass(sass), _resources(usage)
  functions = count_instructions(sass)
  rows = []
  for family in FAMILIES:
    tag = f"{len(family)}{family}"  # as the Itanium ABI mangles the type's name
    walk = _function(functions, "SassProbe", tag + "ELb1")
    empty = functions[_function(functions, "SassProbe", tag + "ELb0")]  # the table copy, the exit
    static = sum((functions[walk] - empty).values())
    units = _unit_counts(common_path_of_loop(code[walk]))
    kernel = _function(resources, "UpdateKernel", tag + "ELi0Ef")
    total = sum(units.values())
    rows.append([family.lower(), f"{total / ELEMENTS_PER_LANE:.1f}", f"{static / ELEMENTS_PER_LANE:.1f}",
                 *(f"{units[name] / ELEMENTS_PER_LANE:.1f}" for name in ("fp32", "int", "memory", "mufu", "other")),
                 str(resources[kernel]["REG"]), str(resources[kernel]["LOCAL"]),
                 f"{shared[family] / 1024:.1f} KiB"])
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="sm_90", help="the GPU architecture (default: %(default)s)")
  args = parser.parse_args(argv)
  nvcc, cuobjdump = find_tools()
  if nvcc is None or cuobjdump is None:
    print(f"cuda_sass: skipped, no {'nvcc' if nvcc is None else 'cuobjdump'} "
          "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    return
  rows = measure(args.arch, nvcc, cuobjdump)
  print(f"optax8 CUDA kernel, {args.arch}, float32 gradients, no flags: SASS instructions per element of a "
        "256-element block")
  print(common.format_table(["family", "instr/elem", "static", "fp32", "int", "memory", "mufu", "other", "regs",
                             "local", "shared"], rows))


if __name__ == "__main__":
  main(sys.argv[1:])
