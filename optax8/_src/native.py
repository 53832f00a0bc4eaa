"""The native kernels: loading them, choosing them, and calling them.

optax8 computes each parameter's 8-bit update in one of three ways:

* the reference, :func:`optax8._src.moments.reference_leaf_update`, in pure ``jax.numpy``;
  it runs on every backend;
* the native CPU kernel, C++ called through the XLA FFI (``custom_calls/optax8_cpu.cc``): one
  fused, multi-threaded call per parameter that reads the gradient and the quantized state
  once and writes the update and the new state once, in place when the caller donates them
  (``jax.jit(step, donate_argnums=...)`` for the parameters and optimizer state);
* the CUDA kernel (``custom_calls/optax8_cuda.cu``): the same call, with the same operands,
  results and in-place aliasing, on XLA:GPU's stream.

All three round every operation to float32 and give the same codes and absmax bit for bit,
except that XLA:CPU on hosts with FMA contracts some ``a * b + c`` of the reference into one
rounding (which ones depends on the surrounding program), so there a moment can differ in its
last bit; and that XLA:CPU flushes subnormal floats to zero where XLA:GPU keeps them.

By default (``"auto"``) a parameter whose moments are all 8-bit uses the kernel of the
platform the computation runs on, CPU or CUDA, and the reference on any other platform
(``jax.lax.platform_dependent``). :func:`set_implementation` or the environment variable
``OPTAX8_IMPLEMENTATION`` choose otherwise, when an update is traced; the choice of
:func:`set_implementation` is part of JAX's cache keys, so a jitted function called under
another choice is traced anew (what was already lowered, compiled or exported keeps its
implementation), while the environment variable is meant to be set before the process starts.
Under differentiation (``jax.jvp``, ``jax.grad``) the reference math defines the derivative of
a kernel's update and the kernel still computes its values. Each shared library is loaded and
registered with ``jax.ffi`` (under one target name for both platforms) the first time an update
is traced, never at import, and the CUDA one only when JAX has a CUDA backend.
``OPTAX8_NATIVE_LIBRARY`` and ``OPTAX8_CUDA_LIBRARY`` name other files to load instead of the
CPU and the CUDA library installed with the package. If a library is missing, or was built
for an incompatible jaxlib, optax8 warns once and uses the reference on that platform.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.resources
import os
import pathlib
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jaxlib import xla_client

from optax8._src import quantization as qz
from optax8._src import sharding as sharding_lib

__all__ = ["get_implementation", "leaf_update", "set_implementation"]

IMPLEMENTATIONS = ("auto", "reference", "native")
IMPLEMENTATION_ENV = "OPTAX8_IMPLEMENTATION"
LIBRARY_ENV = "OPTAX8_NATIVE_LIBRARY"
LIBRARY_NAME = "liboptax8_cpu" + (".dll" if sys.platform == "win32" else ".so")
CUDA_LIBRARY_ENV = "OPTAX8_CUDA_LIBRARY"
CUDA_LIBRARY_NAME = "liboptax8_cuda.so"
# Versioned: a future change of operands or attributes gets a new name.
TARGET = "optax8.update.v1"

# Each family's per-step scalars in the order the kernel reads them (optax8_math.h).
SCALAR_ORDER = {
    "adam": ("b1", "b2", "eps", "eps_root", "bc1", "bc2", "bc1_next"),
    "momentum": ("decay",),
    "lion": ("b1", "b2"),
    "rmsprop": ("decay", "eps", "bc"),
    "adagrad": ("eps",),
    "ademamix": ("b1", "b2", "b3", "alpha", "eps", "eps_root", "bc1", "bc2"),
}
# Static options, as bits of the kernel's `flags` attribute.
FLAG_BITS = {"nesterov": 1, "eps_in_sqrt": 2, "bias_correction": 4, "skip_zeros": 8}
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class _Library(NamedTuple):
  """One platform's kernel library: how to find it and what it exports."""

  description: str  # for messages
  env: str  # the environment variable naming another file to load
  name: str  # the file installed in the package
  handler: str  # the FFI handler's symbol
  version: str  # the symbol returning the XLA FFI API version it was built for
  registry_platform: str  # its platform for jax.ffi.register_ffi_target
  supported: str | None = None  # a symbol saying whether this machine can run the library


LIBRARIES = {
    "cpu": _Library(
        "native CPU kernel", LIBRARY_ENV, LIBRARY_NAME, "Optax8CpuUpdate", "Optax8FfiApiVersion", "cpu",
        supported="Optax8CpuSupported",  # the kernel is compiled for the building machine's CPU
    ),
    "cuda": _Library(
        "CUDA kernel", CUDA_LIBRARY_ENV, CUDA_LIBRARY_NAME, "Optax8CudaUpdate", "Optax8CudaFfiApiVersion", "CUDA"
    ),
}

_lock = threading.Lock()
_implementation: str | None = None
# set_implementation's choice in JAX's cache keys (tracing, lowering, compilation), so that a
# function traced under another choice is traced anew, and found again under this one.
_implementation_key = jax.make_user_context(None)
# Per platform: why its kernel is unusable ("" when usable; absent until tried), and whether
# that was said.
_problems: dict[str, str] = {}
_warned: set[str] = set()
_libraries: dict[str, ctypes.CDLL] = {}  # the loaded libraries, kept referenced: XLA calls into them


def set_implementation(name: str | None) -> None:
  """Chooses how optax8 computes 8-bit updates from now on.

  * ``"auto"`` (default): the native kernel on CPU and on CUDA GPUs, the reference elsewhere;
  * ``"reference"``: always the pure ``jax.numpy`` reference;
  * ``"native"``: like ``"auto"``, but raise instead of falling back when the kernel of a
    platform that JAX has a backend for (CPU, and CUDA where present) cannot be loaded.

  The choice is made when an update is traced, and this function's argument is part of JAX's
  cache keys (tracing, lowering, compilation), like JAX's own configuration: a function
  traced by ``jax.jit`` under another argument (``None`` and the name it stands for count as
  two), through the same ``jax.jit`` object or a new ``jax.jit`` of the same function, is
  traced anew at its next call, and one traced under this argument before is taken from JAX's
  caches again. Nothing is evicted. Only what was lowered, compiled or exported before
  (``jax.jit(f).lower(...)``, its ``.compile()``, ``jax.export``) keeps the implementation it
  was traced with. The environment variable is read when an update is traced and is not part
  of the keys: set it before the process traces any update, and switch within a process with
  this function.

  Args:
    name: one of the above, or ``None`` to follow the ``OPTAX8_IMPLEMENTATION``
      environment variable again (``"auto"`` when unset).

  Raises:
    ValueError: ``name`` is not one of the above.

  Example:
    >>> import optax8
    >>> optax8.set_implementation("reference")
    >>> optax8.get_implementation()
    'reference'
    >>> optax8.set_implementation(None)
  """
  global _implementation
  if name is not None and name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {name!r}.")
  _implementation = name
  _implementation_key.set_global(name)


def get_implementation() -> str:
  """The implementation in effect: :func:`set_implementation`'s, else the environment's."""
  if _implementation is not None:
    return _implementation
  name = os.environ.get(IMPLEMENTATION_ENV, "").strip().lower() or "auto"
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"{IMPLEMENTATION_ENV}={name!r}: expected one of {IMPLEMENTATIONS}.")
  return name


def _library_path(platform: str = "cpu") -> pathlib.Path:
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


def _load(platform: str = "cpu") -> str:
  """Loads and registers a kernel; returns why it is unusable, or "" when it is usable."""
  library_spec = LIBRARIES[platform]
  try:
    # Register only after the platform's backend exists: registering an incompatible handler
    # before backend initialisation would make the backend itself fail to start.
    jax.devices(platform)
  except RuntimeError:
    return _no_backend(platform)
  path = _library_path(platform)
  if not path.is_file():
    return f"{path} does not exist (optax8 was installed without its {library_spec.description})"
  try:
    library = ctypes.CDLL(str(path))
    if library_spec.supported and not getattr(library, library_spec.supported)():
      return (f"{path} was built for a CPU with AVX2, which this one lacks (reinstall optax8 on this "
              "machine: pip builds the kernel for the CPU it builds on)")
    built_for = getattr(library, library_spec.version)()
    handler = jax.ffi.pycapsule(getattr(library, library_spec.handler))
  except (OSError, AttributeError) as e:
    return f"cannot load {path}: {e}"
  try:
    jax.ffi.register_ffi_target(
        TARGET, handler, platform=library_spec.registry_platform, **_register_options(platform)
    )
  except Exception as e:  # noqa: BLE001 - XLA reports version skew with its own error types
    return (
        f"jaxlib {jaxlib.__version__} rejected {path}, built for XLA FFI API "
        f"{built_for // 1000}.{built_for % 1000}: {e}"
    )
  _libraries[platform] = library
  return ""


def _kernel_usable(platform: str = "cpu") -> bool:
  """Whether the platform's kernel is registered; loads it on first use, warns once if it cannot."""
  with _lock:
    if platform not in _problems:
      _problems[platform] = _load(platform)
    problem = _problems[platform]
    warn = bool(problem) and platform not in _warned and problem != _no_backend(platform)
    if warn:
      _warned.add(platform)
  # Without a CUDA backend there is no CUDA kernel to ask for.
  if problem and get_implementation() == "native" and (platform == "cpu" or problem != _no_backend(platform)):
    raise RuntimeError(
        f"optax8: the native kernel was requested but the {LIBRARIES[platform].description} is unusable: {problem}"
    )
  if warn:
    warnings.warn(
        f"optax8: the {LIBRARIES[platform].description} is unusable ({problem}); using the pure-JAX "
        f"reference implementation on {platform.upper()} instead (same results, slower). Set "
        f"{IMPLEMENTATION_ENV}=reference to choose it explicitly.",
        RuntimeWarning,
        stacklevel=4,
    )
  return not problem


def _kernel_platforms() -> list[str]:
  """The platforms whose kernel is usable (loading each on first use)."""
  return [platform for platform in LIBRARIES if _kernel_usable(platform)]


def _kernel_applies(family: Any, static: Mapping[str, Any], g: jax.Array, moments: Sequence[Any],
                    scalars: Mapping[str, Any]) -> bool:
  """Whether the kernels compute this update (where one is usable)."""
  if get_implementation() == "reference":
    return False
  order = SCALAR_ORDER.get(family.name)
  return (
      order is not None
      and set(scalars) == set(order)
      and all(jnp.ndim(v) == 0 for v in scalars.values())
      and set(static) <= set(FLAG_BITS)
      and all(qz.is_quantized(m) for m in moments)
      and tuple(m.signed for m in moments) == tuple(family.signed)
      and len({m.block_size for m in moments}) == 1
      and moments[0].block_size is not None  # one absmax per tensor: a two-pass update, the reference's
      and jnp.dtype(g.dtype) in KERNEL_DTYPES
  )


def _kernel_update(family: Any, static: Mapping[str, Any], g: jax.Array, moments: Sequence[qz.QuantizedArray],
                   scalars: Mapping[str, jax.Array]) -> tuple[jax.Array, list[qz.QuantizedArray]]:
  """One parameter's update as one FFI call (CPU or CUDA kernel), on each device's own blocks."""
  hp = jnp.stack([jnp.asarray(scalars[name], jnp.float32) for name in SCALAR_ORDER[family.name]])
  state = [x for m in moments for x in (m.codes, m.absmax)]
  attributes = dict(
      family=family.name,
      block_size=np.int64(moments[0].block_size),
      flags=np.int64(sum(bit for name, bit in FLAG_BITS.items() if static.get(name))),
      signed=np.int64(sum(1 << k for k, m in enumerate(moments) if m.signed)),
  )

  def call(g, hp, *state):
    return jax.ffi.ffi_call(
        TARGET,
        # Typed like the operands: shardings (sharding-in-types) and manual axes (shard_map).
        [jax.typeof(x) for x in (g, *state)],
        # In place: the update overwrites g, the new state the old one (given donation).
        input_output_aliases={0: 0, **{i + 2: i + 1 for i in range(len(state))}},
    )(g, hp, *state, **attributes)

  # Partitioned with the operands' sharding; under vmap, batched operands are more rows.
  update, *new_state = sharding_lib.partitioned_by_blocks(call, moments[0].block_size)(g, hp, *state)
  return update, [
      qz.QuantizedArray(new_state[2 * k], new_state[2 * k + 1], m.block_size, m.signed)
      for k, m in enumerate(moments)
  ]


def _call(*operands: jax.Array, fn: Callable[..., list[jax.Array]], num_results: int) -> list[jax.Array]:
  """``_reference_p``'s implementation, and its lowering once traced."""
  del num_results
  return fn(*operands)


def _batched_reference(operands, dims, *, fn, num_results):
  """Under ``vmap``: the reference vmapped, every operand batched along its first axis."""
  size = next(x.shape[d] for x, d in zip(operands, dims) if d is not None)
  operands = [batching.bdim_at_front(x, d, size) for x, d in zip(operands, dims)]
  return _reference_p.bind(*operands, fn=jax.vmap(fn), num_results=num_results), [0] * num_results


# The reference as one primitive whose lowering traces it: `platform_dependent` lowers only the
# branches of the platforms a computation is lowered for, so where a kernel applies the reference
# (most of an update's tracing and lowering time) is never traced, and elsewhere it still runs.
_reference_p = Primitive("optax8_reference_update")
_reference_p.multiple_results = True
_reference_p.def_impl(_call)
_reference_p.def_abstract_eval(lambda *avals, fn, num_results: avals[:num_results])  # typed like g and the moments
mlir.register_lowering(_reference_p, mlir.lower_fun(_call, multiple_results=True))
batching.primitive_batchers[_reference_p] = _batched_reference


def _staged_reference(reference: Callable[..., tuple[jax.Array, list[Any]]], g: jax.Array,
                      moments: list[qz.QuantizedArray], scalars: dict[str, jax.Array]):
  """``reference(g, moments, scalars)`` as one ``_reference_p``, traced only when lowered."""
  operands, tree = jax.tree.flatten((g, moments, scalars))
  flat = lambda *operands: jax.tree.leaves(reference(*jax.tree.unflatten(tree, operands)))
  update, *new = _reference_p.bind(*operands, fn=flat, num_results=1 + len(jax.tree.leaves(moments)))
  return update, jax.tree.unflatten(jax.tree.structure(moments), new)


@functools.cache
def _dispatcher(reference: Callable[..., Any], family: Any, static: tuple[tuple[str, Any], ...],
                platforms: tuple[str, ...]) -> Callable[..., tuple[jax.Array, list[Any]]]:
  """``leaf_update`` where a kernel applies, made once per family, static options and platforms.

  Jitted, so that the parameters of one shape and dtype share one trace and one lowering.
  """
  static = dict(static)
  kernel = functools.partial(_kernel_update, family, static)
  reference = functools.partial(reference, family, static)
  default = functools.partial(_staged_reference, reference)

  # The kernel call (custom_partitioning, ffi_call) cannot be differentiated. Its rule: values
  # from the dispatch itself, so that differentiating never changes them (and a second
  # derivative goes through this rule again), tangents from the reference's own JVP, which
  # jax.grad transposes. The rule is traced only under differentiation.
  @jax.custom_jvp
  def dispatch(g, moments, scalars):
    return jax.lax.platform_dependent(g, moments, scalars, **dict.fromkeys(platforms, kernel), default=default)

  def dispatch_jvp(primals, tangents):
    return dispatch(*primals), _perturbed_jvp(reference, primals, tangents)

  dispatch.defjvp(dispatch_jvp, symbolic_zeros=True)
  return jax.jit(dispatch)


def _perturbed_jvp(fn: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> Any:
  """The output tangents of ``jax.jvp(fn, primals, tangents)``, tangents holding symbolic zeros.

  The operands whose tangent is a symbolic zero enter as constants, as where ``fn`` is
  differentiated itself: zero tangents run through no math (where 0 * inf, as at sqrt(0),
  would make them NaN) and the derivative is the same program as ``fn``'s own.
  """
  operands, tree = jax.tree.flatten(primals)
  perturbed = [not isinstance(t, jax.custom_derivatives.SymbolicZero) for t in jax.tree.leaves(tangents)]

  def of_perturbed(*values):
    values = iter(values)
    return fn(*tree.unflatten([next(values) if p else x for x, p in zip(operands, perturbed)]))

  return jax.jvp(of_perturbed, [x for x, p in zip(operands, perturbed) if p],
                 [t for t, p in zip(jax.tree.leaves(tangents), perturbed) if p])[1]


def leaf_update(
    reference: Callable[..., tuple[jax.Array, list[Any]]],
    family: Any,
    static: Mapping[str, Any],
    g: jax.Array,
    moments: Sequence[Any],
    scalars: Mapping[str, jax.Array],
) -> tuple[jax.Array, list[Any]]:
  """One parameter's update: the platform's native kernel where it applies, else ``reference``.

  A kernel applies when every moment of the parameter is a :class:`~optax8.QuantizedArray`,
  the gradient is float32, bfloat16 or float16, the implementation is not ``"reference"``
  and the platform's library is usable: the CPU kernel on CPU, the CUDA kernel on CUDA GPUs
  (chosen when the computation is lowered, by ``jax.lax.platform_dependent``).

  Under ``jax.jvp``, ``jax.grad`` and the like, the reference math defines the derivative
  (the kernels have none), with respect to ``g``, the moments' float leaves and ``scalars``;
  the values stay the kernel's, the same as without differentiation.

  Args:
    reference: ``reference(family, static, g, moments, scalars) -> (update, moments)``.
    family: the optimizer family (``update_math.Family``).
    static: the family's static options.
    g: the parameter's gradient.
    moments: the parameter's moments (quantized or float32).
    scalars: ``family.scalars(...)``, the per-step float32 scalars.

  Returns:
    The update, in ``g``'s dtype, and the new moments.
  """
  platforms = _kernel_platforms() if _kernel_applies(family, static, g, moments, scalars) else []
  if not platforms:
    return reference(family, static, g, moments, scalars)
  dispatch = _dispatcher(reference, family, tuple(static.items()), tuple(platforms))
  return dispatch(g, list(moments), dict(scalars))
