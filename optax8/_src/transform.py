"""8-bit building blocks, the counterparts of optax's ``scale_by_*`` transformations.

Each takes the algorithm's own hyperparameters (same names and defaults as optax) and the
quantization options, all keyword-only after ``*``:

* ``optim_bits`` (8 or 32): 32 keeps every moment in float32.
* ``block_size``: elements per quantization block along each parameter's last axis.
* ``min_8bit_size``: parameters with fewer elements (their global size, whatever the
  sharding) keep float32 moments, as do scalars.
* ``overrides``: ``{label pattern: {option: value}}`` for per-parameter quantization options
  and hyperparameters (see :mod:`optax8._src.labels` for labels and matching).
* ``param_labels``: the labels, as a tree of strings or a callable of the params; by default
  each parameter's ``/``-joined tree path.

Under :func:`optax.inject_hyperparams`, the float hyperparameters may change every step
without recompiling; pass integer options through ``static_args``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from optax8._src import labels as labels_lib
from optax8._src import moments as moments_lib
from optax8._src import update_math

__all__ = ["ScaleByAdam8bitState", "Trace8bitState", "scale_by_adam8bit", "trace8bit"]


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`scale_by_adam8bit`: the step count and the two moments.

  ``mu`` and ``nu`` have the params' tree structure; each leaf is a
  :class:`~optax8.QuantizedArray` (8-bit) or a float32 array (32-bit).
  """

  count: jax.Array
  mu: Any
  nu: Any


class Trace8bitState(NamedTuple):
  """State of :func:`trace8bit`: the momentum ``trace`` (params-shaped)."""

  trace: Any


def scale_by_adam8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    optim_bits: int = 8,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    overrides: labels_lib.Overrides | None = None,
    param_labels: labels_lib.LabelSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Adam's moment estimates, with 8-bit moments.

  The math is :func:`optax.scale_by_adam`'s, in float32:

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t) + \epsilon_{root}} + \epsilon}

  :math:`m` is stored with the signed dynamic map and :math:`v` with the unsigned one,
  blockwise along the last axis (1 byte per element plus 4 bytes per block each).

  Args:
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: added to the denominator outside the square root, >= 0.
    eps_root: added inside the square root, >= 0.
    mu_dtype: dtype of the first moment where it stays 32-bit (default float32).
    nesterov: use Nesterov momentum, as optax does.
    optim_bits: 8, or 32 for float32 moments everywhere.
    block_size: quantization block size along the last axis.
    min_8bit_size: parameters with fewer elements keep float32 moments.
    overrides: per-label options: ``optim_bits``, ``block_size``, ``min_8bit_size``, ``b1``,
      ``b2``, ``eps``, ``eps_root``.
    param_labels: labels tree or callable (default: tree paths).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax8
    >>> params = {"w": jnp.ones((64, 128))}
    >>> tx = optax.chain(optax8.scale_by_adam8bit(), optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.full((64, 128), 0.5)}, state)
    >>> state[0].mu["w"].codes.dtype, round(float(updates["w"][0, 0]), 6)
    (dtype('uint8'), -0.001)
  """
  return moments_lib.moment_transform(
      update_math.ADAM,
      ScaleByAdam8bitState,
      dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
      dict(
          b1=moments_lib.check_beta,
          b2=moments_lib.check_beta,
          eps=moments_lib.check_non_negative,
          eps_root=moments_lib.check_non_negative,
      ),
      static=dict(nesterov=bool(nesterov)),
      moment_dtypes=(mu_dtype, None),
      optim_bits=optim_bits,
      block_size=block_size,
      min_8bit_size=min_8bit_size,
      overrides=overrides,
      param_labels=param_labels,
  )


def trace8bit(
    decay: float,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    *,
    optim_bits: int = 8,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    overrides: labels_lib.Overrides | None = None,
    param_labels: labels_lib.LabelSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum with an 8-bit trace, the counterpart of :func:`optax.trace`.

  .. math::
    s_t = g_t + \mu s_{t-1},\quad u_t = s_t\ \ (\text{Nesterov: } u_t = g_t + \mu s_t)

  The trace is stored with the signed dynamic map.

  Args:
    decay: the momentum :math:`\mu`, in [0, 1).
    nesterov: use Nesterov momentum.
    accumulator_dtype: dtype of the trace where it stays 32-bit (default float32).
    optim_bits: 8, or 32 for a float32 trace everywhere.
    block_size: quantization block size along the last axis.
    min_8bit_size: parameters with fewer elements keep a float32 trace.
    overrides: per-label options: ``optim_bits``, ``block_size``, ``min_8bit_size``, ``decay``.
    param_labels: labels tree or callable (default: tree paths).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.trace8bit(decay=0.9)
    >>> state = tx.init({"w": jnp.zeros((8, 512))})
    >>> updates, state = tx.update({"w": jnp.ones((8, 512))}, state)
    >>> float(updates["w"][0, 0]), state.trace["w"].absmax.shape
    (1.0, (8, 2))
  """
  return moments_lib.moment_transform(
      update_math.MOMENTUM,
      Trace8bitState,
      dict(decay=decay),
      dict(decay=moments_lib.check_beta),
      static=dict(nesterov=bool(nesterov)),
      moment_dtypes=(accumulator_dtype,),
      optim_bits=optim_bits,
      block_size=block_size,
      min_8bit_size=min_8bit_size,
      overrides=overrides,
      param_labels=param_labels,
  )
