"""The CUDA kernel's cost without a GPU: SASS instructions per element, registers, shared memory.

Compiles ``custom_calls/optax8_cuda.cu`` for one architecture (``sm_90``, the H200's, by
default) with the library's flags, together with a probe kernel per family: the library's
kernel with every block the default 256 elements long (the path nearly every block takes, so
its code is straight through), and reads the machine code with ``cuobjdump``. Per family
(float32 gradients, no flags):

* ``instr/elem``: the probe's instructions less those of the same kernel without its walk over
  the blocks, over the 8 elements each lane of a warp updates per block: the block's indexing,
  loads, decoding, the family's math, the finiteness checks, the update store, the block
  maximum and the encoding. The walk's body is straight-line code run once per block, so this
  is what each element executes, except that the rarely taken slow paths of IEEE division and
  square root (subnormal or extreme operands) count as if taken;
* the same split by the units that issue them: FP32 (``FADD``/``FMUL``/``FSETP``...),
  integer and logic (the H200 issues these at half the FP32 rate), memory, MUFU (sqrt,
  reciprocal), the rest (moves, predicates, control);
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

__all__ = ["FAMILIES", "count_instructions", "find_tools", "main"]

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "custom_calls" / "optax8_cuda.cu"
# optax8_math.h's family types, in its VisitFamily order.
FAMILIES = ("Adam", "Momentum", "Lion", "Rmsprop", "Adagrad", "Ademamix")
# The library's device flags (custom_calls/CMakeLists.txt): exact float32 arithmetic.
NVCC_FLAGS = ("-O3", "--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false", "-std=c++17")
ELEMENTS_PER_LANE = 8  # optax8_cuda.cu's kItems: a 256-element block over a warp's 32 lanes

PROBE = """
#include "optax8_cuda.cu"
#include <cstdio>

namespace optax8 {
namespace {
// The kernel with every block 256 elements long (so the code of a block's path is straight
// through), and the kernel without its walk over the blocks.
template <class F, bool kWalk>
__global__ void __launch_bounds__(kThreads, F::kMoments > 2 ? 2 : 3) SassProbe(const Job job) {
  LoadSharedTables<F>();
  if (kWalk) WalkBlocks<F, 0, float>(job, [](int64_t) { return int64_t{256}; });
}
}  // namespace
}  // namespace optax8

// Each family's two probes (referenced, so compiled) and its tables' shared-memory bytes.
#define OPTAX8_PROBE(F)                                                              \\
  std::printf("%s %zu %p %p\\n", #F, optax8::kSharedTableBytes<optax8::F>,           \\
              reinterpret_cast<void*>(&optax8::SassProbe<optax8::F, true>),          \\
              reinterpret_cast<void*>(&optax8::SassProbe<optax8::F, false>));

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


def count_instructions(sass: str) -> dict[str, collections.Counter]:
  """Per function in cuobjdump's ``-sass`` listing, its instructions by opcode (NOPs left out)."""
  functions: dict[str, collections.Counter] = {}
  current = None
  for line in sass.splitlines():
    header = re.match(r"\s*Function : (\S+)", line)
    if header:
      current = functions.setdefault(header.group(1), collections.Counter())
      continue
    instruction = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", line)
    if instruction and current is not None and instruction.group(1) != "NOP":
      current[instruction.group(1)] += 1
  return functions


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
  import jax.ffi  # the XLA FFI headers the kernel compiles against

  with tempfile.TemporaryDirectory() as tmp:
    probe, binary = pathlib.Path(tmp) / "probe.cu", pathlib.Path(tmp) / "probe"
    probe.write_text(PROBE)
    subprocess.run([nvcc, f"-arch={arch}", *NVCC_FLAGS, f"-I{SOURCE.parent}", f"-I{jax.ffi.include_dir()}",
                    "-diag-suppress=20013,20015", str(probe), "-o", str(binary)], check=True, capture_output=True)
    # cuobjdump disassembles with nvdisasm, which it looks for on PATH: the one beside it first.
    env = dict(os.environ, PATH=os.pathsep.join([str(pathlib.Path(cuobjdump).parent), os.environ.get("PATH", "")]))
    sass = subprocess.run([cuobjdump, "-sass", str(binary)], check=True, capture_output=True, text=True,
                          env=env).stdout
    usage = subprocess.run([cuobjdump, "-res-usage", str(binary)], check=True, capture_output=True, text=True).stdout
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    shared = {line.split()[0]: int(line.split()[1]) for line in printed.splitlines()}
  functions, resources = count_instructions(sass), _resources(usage)
  rows = []
  for family in FAMILIES:
    tag = f"{len(family)}{family}"  # as the Itanium ABI mangles the type's name
    block = functions[_function(functions, "SassProbe", tag + "ELb1")]
    empty = functions[_function(functions, "SassProbe", tag + "ELb0")]  # the table copy, the exit
    units = _unit_counts(block - empty)
    kernel = _function(resources, "UpdateKernel", tag + "ELi0Ef")
    total = sum(units.values())
    rows.append([family.lower(), f"{total / ELEMENTS_PER_LANE:.1f}",
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
  print(common.format_table(["family", "instr/elem", "fp32", "int", "memory", "mufu", "other", "regs", "local",
                             "shared"], rows))


if __name__ == "__main__":
  main(sys.argv[1:])
