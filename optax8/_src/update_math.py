"""The update math of every optimizer family, in float32.

A family is two functions:

* ``scalars(count, **hyperparams)``: the per-step float32 scalars (betas, eps, bias
  corrections) computed once from the step ``count`` (1 for the first update). They are what
  a native kernel receives as runtime operands, so schedules never recompile.
* ``elementwise(g, moments, **scalars)``: maps a finite float32 gradient and the dequantized
  float32 moments to the update and the new moments.

Quantization and the handling of non-finite gradient elements wrap these functions
(``optax8._src.moments``); the native kernels implement the same elementwise formulas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

__all__ = ["ADAM", "MOMENTUM", "Family"]

f32 = jnp.float32


class Family(NamedTuple):
  """One optimizer family's math.

  Attributes:
    name: the family's name (it also names the native kernel).
    scalars: ``(count, **hyperparams) -> dict`` of float32 scalars.
    elementwise: ``(g, moments, **scalars, **static) -> (update, moments)``.
    signed: for each moment, whether it uses the signed dynamic map.
    static: names of the static (bool) options ``elementwise`` takes.
  """

  name: str
  scalars: Callable[..., dict]
  elementwise: Callable[..., tuple]
  signed: tuple[bool, ...]
  static: tuple[str, ...] = ()


def _as_f32(**values):
  return {k: jnp.asarray(v, f32) for k, v in values.items()}


def _adam_scalars(count, *, b1, b2, eps, eps_root):
  b1, b2 = jnp.asarray(b1, f32), jnp.asarray(b2, f32)
  # Bias corrections exactly as optax.tree.bias_correction computes them.
  return _as_f32(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root,
      bc1=1 - b1**count, bc2=1 - b2**count, bc1_next=1 - b1 ** (count + 1),
  )


def _adam(g, moments, *, b1, b2, eps, eps_root, bc1, bc2, bc1_next, nesterov):
  r"""Adam, as :func:`optax.scale_by_adam`.

  .. math::
    m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
    u = \frac{\hat m}{\sqrt{\hat v + \epsilon_{root}} + \epsilon}

  with :math:`\hat m = m / (1-\beta_1^t)` (Nesterov:
  :math:`\hat m = \beta_1 m / (1-\beta_1^{t+1}) + (1-\beta_1) g / (1-\beta_1^t)`) and
  :math:`\hat v = v / (1-\beta_2^t)`.
  """
  m, v = moments
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * (g * g)
  if nesterov:
    m_hat = b1 * m / bc1_next + (1 - b1) * g / bc1
  else:
    m_hat = m / bc1
  v_hat = v / bc2
  return m_hat / (jnp.sqrt(v_hat + eps_root) + eps), (m, v)


def _momentum_scalars(count, *, decay):
  del count
  return _as_f32(decay=decay)


def _momentum(g, moments, *, decay, nesterov):
  r"""Momentum, as :func:`optax.trace`.

  .. math::
    s \leftarrow g + \mu s,\quad u = s\ \ (\text{Nesterov: } u = g + \mu s)
  """
  (s,) = moments
  s = g + decay * s
  u = g + decay * s if nesterov else s
  return u, (s,)


ADAM = Family("adam", _adam_scalars, _adam, signed=(True, False), static=("nesterov",))
MOMENTUM = Family("momentum", _momentum_scalars, _momentum, signed=(True,), static=("nesterov",))
