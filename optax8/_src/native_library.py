"""The native kernel libraries: finding, checking, loading and registering them with ``jax.ffi``.

Each platform's library (``liboptax8_cpu``, ``liboptax8_cuda``) is loaded the first time an
update that a kernel could compute is traced, never at import, and the CUDA one only when JAX
has a CUDA backend. ``OPTAX8_NATIVE_LIBRARY`` and ``OPTAX8_CUDA_LIBRARY`` name other files to
load instead of the ones installed with the package. A library that is missing, was built for
an incompatible jaxlib, or cannot run on this CPU (``OPTAX8_CPU_ISA`` names an instruction set
it lacks) makes optax8 warn once and use the reference on that platform; one built from other
kernel declarations than this package's (``update_math.kernel_contract``) is an error.

The CPU library holds its block walk once per instruction set (scalar, AVX2, AVX-512) and runs
the best one the CPU has; ``OPTAX8_CPU_ISA`` (``scalar``, ``avx2``, ``avx512``; ``auto`` by
default) forces one, read when the library is first used in a process. :func:`cpu_isa` says
which one runs.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import os
import pathlib
import sys
import threading
import warnings
from typing import Any, NamedTuple

import jax
import jaxlib
from jaxlib import xla_client

from optax8._src import update_math

__all__ = ["LIBRARIES", "TARGET", "cpu_isa", "library_path", "usable", "usable_platforms"]

LIBRARY_ENV = "OPTAX8_NATIVE_LIBRARY"
LIBRARY_NAME = "liboptax8_cpu" + (".dll" if sys.platform == "win32" else ".so")
CUDA_LIBRARY_ENV = "OPTAX8_CUDA_LIBRARY"
CUDA_LIBRARY_NAME = "liboptax8_cuda.so"
CPU_ISA_ENV = "OPTAX8_CPU_ISA"
# Versioned: a future change of operands or attributes gets a new name.
TARGET = "optax8.update.v1"


class _Library(NamedTuple):
  """One platform's kernel library: how to find it and what it exports."""

  description: str  # for messages
  env: str  # the environment variable naming another file to load
  name: str  # the file installed in the package
  handler: str  # the FFI handler's symbol
  version: str  # the symbol returning the XLA FFI API version it was built for
  contract: str  # the symbol returning the kernel declarations it was built with
  registry_platform: str  # its platform for jax.ffi.register_ffi_target
  isa: str | None = None  # the symbol naming the instruction set it runs with, or why it cannot run


LIBRARIES = {
    "cpu": _Library("native CPU kernel", LIBRARY_ENV, LIBRARY_NAME, "Optax8CpuUpdate", "Optax8FfiApiVersion",
                    "Optax8CpuContract", "cpu", isa="Optax8CpuIsa"),
    "cuda": _Library("CUDA kernel", CUDA_LIBRARY_ENV, CUDA_LIBRARY_NAME, "Optax8CudaUpdate",
                     "Optax8CudaFfiApiVersion", "Optax8CudaContract", "CUDA"),
}

_lock = threading.Lock()
# Per platform: why its kernel is unusable ("" when usable; absent until tried), and whether
# that was said.
_problems: dict[str, str] = {}
_warned: set[str] = set()
_libraries: dict[str, ctypes.CDLL] = {}  # the loaded libraries, kept referenced: XLA calls into them


def library_path(platform: str = "cpu") -> pathlib.Path:
  """The file optax8 loads as ``platform``'s kernel library."""
  library = LIBRARIES[platform]
  override = os.environ.get(library.env)
  if override:
    return pathlib.Path(override)
  return pathlib.Path(str(importlib.resources.files("optax8") / library.name))


def _no_backend(platform: str) -> str:
  return f"no {platform.upper()} backend"


def _register_options(platform: str) -> dict[str, Any]:
  if platform != "cuda":
    return {}
  # The CUDA kernel only launches work on XLA's stream: it allocates nothing, never
  # synchronises or copies to the host, and its launch depends on shapes, attributes and the
  # device alone, never on buffer contents. XLA may therefore capture it into its command
  # buffers (CUDA graphs) with the rest of the step, instead of splitting the graph at every
  # parameter. tests/test_gpu.py runs with command buffers on and off.
  traits = getattr(xla_client, "CustomCallTargetTraits", None)
  return {"traits": traits.COMMAND_BUFFER_COMPATIBLE} if traits is not None else {}


def _exported_text(library: ctypes.CDLL, symbol: str) -> str:
  function = getattr(library, symbol)
  function.restype = ctypes.c_char_p
  return function().decode()


def _load(platform: str) -> str:
  """Loads, checks and registers a kernel; returns why it is unusable, or "" when it is usable.

  Raises:
    RuntimeError: the library was built from other kernel declarations than this package's.
  """
  spec = LIBRARIES[platform]
  try:
    # Register only after the platform's backend exists: registering an incompatible handler
    # before backend initialisation would make the backend itself fail to start.
    jax.devices(platform)
  except RuntimeError:
    return _no_backend(platform)
  path = library_path(platform)
  if not path.is_file():
    return f"{path} does not exist (optax8 was installed without its {spec.description})"
  try:
    library = ctypes.CDLL(str(path))
    built_for = getattr(library, spec.version)()
    contract = _exported_text(library, spec.contract)
    isa = _exported_text(library, spec.isa) if spec.isa else ""
    handler = jax.ffi.pycapsule(getattr(library, spec.handler))
  except (OSError, AttributeError) as e:
    return f"cannot load {path}: {e}"
  if contract != update_math.kernel_contract():
    raise RuntimeError(
        f"optax8: {path} was built from other kernel declarations than this optax8's (reinstall optax8, or point "
        f"{spec.env} at a library built from this version).\n  library: {contract}\n  "
        f"optax8:  {update_math.kernel_contract()}"
    )
  if isa.startswith("error: "):
    return f"{path} cannot run here: {isa[len('error: '):]}"
  try:
    jax.ffi.register_ffi_target(TARGET, handler, platform=spec.registry_platform, **_register_options(platform))
  except Exception as e:  # noqa: BLE001 - XLA reports version skew with its own error types
    return (
        f"jaxlib {jaxlib.__version__} rejected {path}, built for XLA FFI API "
        f"{built_for // 1000}.{built_for % 1000}: {e}"
    )
  _libraries[platform] = library
  return ""


def usable(platform: str = "cpu", *, required: bool = False) -> bool:
  """Whether ``platform``'s kernel is registered; loads it on first use, warns once if it cannot.

  Args:
    platform: ``"cpu"`` or ``"cuda"``.
    required: raise instead of warning when the kernel of a platform that JAX has a backend
      for cannot be used.
  """
  with _lock:
    if platform not in _problems:
      _problems[platform] = _load(platform)
    problem = _problems[platform]
    warn = bool(problem) and platform not in _warned and problem != _no_backend(platform)
    if warn:
      _warned.add(platform)
  # Without a CUDA backend there is no CUDA kernel to ask for.
  if problem and required and (platform == "cpu" or problem != _no_backend(platform)):
    raise RuntimeError(
        f"optax8: the native kernel was requested but the {LIBRARIES[platform].description} is unusable: {problem}"
    )
  if warn:
    warnings.warn(
        f"optax8: the {LIBRARIES[platform].description} is unusable ({problem}); using the pure-JAX "
        f"reference implementation on {platform.upper()} instead (same results, slower). Set "
        "OPTAX8_IMPLEMENTATION=reference to choose it explicitly.",
        RuntimeWarning,
        stacklevel=4,
    )
  return not problem


def usable_platforms(*, required: bool = False) -> list[str]:
  """The platforms whose kernel is usable (loading each on first use)."""
  return [platform for platform in LIBRARIES if usable(platform, required=required)]


def cpu_isa() -> str | None:
  """The instruction set the CPU kernel runs with (``"avx512"``, ``"avx2"`` or ``"scalar"``), or
  ``None`` when it is unusable. Loads it if it was not loaded yet."""
  if not usable("cpu"):
    return None
  return _exported_text(_libraries["cpu"], LIBRARIES["cpu"].isa)
