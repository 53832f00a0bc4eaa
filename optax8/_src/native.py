"""Choosing between the native kernels and the reference, per update.

optax8 computes each parameter's 8-bit update in one of three ways:

* the reference, :func:`optax8._src.moments.reference_leaf_update`, in pure ``jax.numpy``;
  it runs on every backend;
* the native CPU kernel, C++ called through the XLA FFI (``custom_calls/optax8_cpu.cc``): one
  fused, multi-threaded call per parameter that reads the gradient and the quantized state
  once and writes the update and the new state once, in place when the caller donates them
  (``jax.jit(step, donate_argnums=...)`` for the parameters and optimizer state); its block
  walk is compiled for several instruction sets, and it runs the best one the CPU has;
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
a kernel's update and the kernel still computes its values. Loading the libraries is
``native_library``'s, calling them ``native_call``'s.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from optax8._src import native_call, native_library
from optax8._src import quantization as qz
from optax8._src import sharding as sharding_lib

__all__ = ["get_implementation", "kernel_platforms", "leaf_update", "set_implementation"]

IMPLEMENTATIONS = ("auto", "reference", "native")
IMPLEMENTATION_ENV = "OPTAX8_IMPLEMENTATION"

_implementation: str | None = None
# set_implementation's choice in JAX's cache keys (tracing, lowering, compilation), so that a
# function traced under another choice is traced anew, and found again under this one.
_implementation_key = jax.make_user_context(None)


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


def kernel_platforms() -> list[str]:
  """The platforms whose kernel is usable, loading each on first use; raises for an unusable one
  under the ``"native"`` implementation."""
  return native_library.usable_platforms(required=get_implementation() == "native")


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
                      moments: list[qz.QuantizedArray], scalars: dict[str, jax.Array], param: jax.Array | None = None):
  """``reference(g, moments, scalars, param)`` as one ``_reference_p``, traced only when lowered.

  The primitive's results are typed like its first operands: the first result's (``param``
  where given, else ``g``), then the moments' leaves.
  """
  first = g if param is None else param
  operands, tree = jax.tree.flatten((first, moments, g, scalars))

  def flat(*operands):
    first, moments, g, scalars = jax.tree.unflatten(tree, operands)
    return jax.tree.leaves(reference(g, moments, scalars, None if param is None else first))

  update, *new = _reference_p.bind(*operands, fn=flat, num_results=1 + len(jax.tree.leaves(moments)))
  return update, jax.tree.unflatten(jax.tree.structure(moments), new)


@functools.cache
def _dispatcher(reference: Callable[..., Any], family: Any, static: tuple[tuple[str, Any], ...],
                platforms: tuple[str, ...]) -> Callable[..., tuple[jax.Array, list[Any]]]:
  """``leaf_update`` where a kernel applies, made once per family, static options and platforms.

  Jitted, so that the parameters of one shape and dtype share one trace and one lowering.
  """
  static = dict(static)
  kernel = functools.partial(native_call.update, family, static)
  reference = functools.partial(reference, family, static)
  default = functools.partial(_staged_reference, reference)

  # The kernel call (custom_partitioning, ffi_call) cannot be differentiated. Its rule: values
  # from the dispatch itself, so that differentiating never changes them (and a second
  # derivative goes through this rule again), tangents from the reference's own JVP, which
  # jax.grad transposes. The rule is traced only under differentiation.
  @jax.custom_jvp
  def dispatch(g, moments, scalars, param):
    operands, tree = jax.tree.flatten((g, moments, scalars, param))
    operands = jax.tree.unflatten(tree, sharding_lib.varying_alike(*operands))
    return jax.lax.platform_dependent(*operands, **dict.fromkeys(platforms, kernel), default=default)

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
    param: jax.Array | None = None,
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
    reference: ``reference(family, static, g, moments, scalars, param) -> (update, moments)``.
    family: the optimizer family (``update_math.Family``).
    static: the family's static options.
    g: the parameter's gradient.
    moments: the parameter's moments (quantized or float32).
    scalars: ``family.scalars(...)``, the per-step float32 scalars (under the ``apply`` static
      option also ``update_math.APPLY_SCALARS``).
    param: under ``apply``, the parameter (the fused apply step), else ``None``.

  Returns:
    The update, in ``g``'s dtype (under ``apply``: the new parameter, in its dtype), and the
    new moments.
  """
  applies = get_implementation() != "reference" and native_call.applies(family, static, g, moments, scalars, param)
  platforms = kernel_platforms() if applies else []
  if not platforms:
    return reference(family, static, g, moments, scalars, param)
  dispatch = _dispatcher(reference, family, tuple(static.items()), tuple(platforms))
  return dispatch(g, list(moments), dict(scalars), param)
