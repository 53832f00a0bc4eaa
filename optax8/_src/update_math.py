"""The update math of every optimizer family, in float32.

A family is two functions:

* ``scalars(count, **hyperparams)``: the per-step float32 scalars (betas, eps, bias
  corrections) computed once from the step ``count`` (1 for the first update). They are what
  a native kernel receives as runtime operands, so schedules never recompile.
* ``elementwise(g, moments, **scalars)``: maps a finite float32 gradient and the dequantized
  float32 moments to the update and the new moments.

Quantization and the handling of non-finite gradient elements wrap these functions
(``optax8._src.moments``); the native kernels implement the same elementwise formulas.

A division by a per-step scalar is written as a multiplication by its reciprocal. XLA rewrites
``x / s`` that way in most programs but not in every partitioned one, so writing it out keeps
the results the same in every program, sharded or not, and equal to the native kernels'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "ADAM", "ADAGRAD", "ADEMAMIX", "APPLY_SCALARS", "COMMON_FLAGS", "FAMILIES", "FLAG_BITS", "LION", "MOMENTUM",
    "RMSPROP", "Family", "applied_parameter", "clipped_gradient", "kernel_contract",
]

f32 = jnp.float32

# The static options a kernel takes, as bits of its `flags` attribute (optax8_math.h's Flag).
FLAG_BITS = {"nesterov": 1, "eps_in_sqrt": 2, "bias_correction": 4, "skip_zeros": 8, "apply": 16}
# The ones every family takes (the moments' wrapper applies them, not ``elementwise``).
COMMON_FLAGS = ("skip_zeros", "apply")
# The fused apply step's (``apply``) per-step scalars, after the family's own.
APPLY_SCALARS = ("clip_norm", "clip_max", "step_size", "weight_decay")


def clipped_gradient(g, *, clip_norm, clip_max):
  """The fused apply step's gradient: :func:`optax.clip_by_global_norm`'s ``g / norm * max_norm``.

  ``clip_norm = clip_max = 1`` where the norm is within bounds, which leaves ``g`` as it is.
  """
  return g / clip_norm * clip_max


def applied_parameter(p, u, *, step_size, weight_decay):
  r"""The fused apply step's new parameter, in float32, from the float32 update ``u``.

  :math:`p + \eta_t (u + \lambda p)`: :func:`optax.add_decayed_weights`, the step size
  (:func:`optax.scale_by_learning_rate`'s :math:`-\mathrm{lr}`) and :func:`optax.apply_updates`,
  in optax's order.
  """
  return p + step_size * (u + weight_decay * p)


class Family(NamedTuple):
  """One optimizer family's math, and its kernels' interface.

  Attributes:
    name: the family's name (it also names the native kernel).
    scalars: ``(count, **hyperparams) -> dict`` of float32 scalars.
    elementwise: ``(g, moments, **scalars, **flags) -> (update, moments)``.
    signed: for each moment, whether it uses the signed dynamic map.
    scalar_names: the keys of ``scalars``' result, in the order a kernel reads them.
    flags: the static (bool) options ``elementwise`` takes (keys of :data:`FLAG_BITS`).
    initial: for each moment, the hyperparameter holding its initial value (``None``: 0).
  """

  name: str
  scalars: Callable[..., dict]
  elementwise: Callable[..., tuple]
  signed: tuple[bool, ...]
  scalar_names: tuple[str, ...]
  flags: tuple[str, ...] = ()
  initial: tuple[str | None, ...] | None = None


def _as_f32(**values):
  return {k: jnp.asarray(v, f32) for k, v in values.items()}


@functools.partial(jax.jit, inline=True)
def _bias_correction(decay, count):
  """``1 - decay**count``, as ``optax.tree.bias_correction`` computes it.

  Jitted, as optax's is: outside ``jit`` a concrete ``count`` would make ``decay**count`` a
  power by that constant, one new compilation per step.
  """
  return 1 - decay**count


def _adam_scalars(count, *, b1, b2, eps, eps_root):
  b1, b2 = jnp.asarray(b1, f32), jnp.asarray(b2, f32)
  return _as_f32(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root,
      bc1=_bias_correction(b1, count), bc2=_bias_correction(b2, count), bc1_next=_bias_correction(b1, count + 1),
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
    m_hat = b1 * (m * (1 / bc1_next)) + (1 - b1) * (g * (1 / bc1))
  else:
    m_hat = m * (1 / bc1)
  v_hat = v * (1 / bc2)
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


def _lion_scalars(count, *, b1, b2):
  del count
  return _as_f32(b1=b1, b2=b2)


def _lion(g, moments, *, b1, b2):
  r"""Lion, as :func:`optax.scale_by_lion`.

  .. math::
    u = \operatorname{sign}((1-\beta_1) g + \beta_1 m),\quad m \leftarrow (1-\beta_2) g + \beta_2 m
  """
  (m,) = moments
  u = jnp.sign((1 - b1) * g + b1 * m)
  return u, ((1 - b2) * g + b2 * m,)


def _rms_scalars(count, *, decay, eps, initial_scale):
  del initial_scale  # only sets the initial state
  decay = jnp.asarray(decay, f32)
  return _as_f32(decay=decay, eps=eps, bc=_bias_correction(decay, count))


def _rms(g, moments, *, decay, eps, bc, eps_in_sqrt, bias_correction):
  r"""RMSprop's scaling, as :func:`optax.scale_by_rms`.

  .. math::
    \nu \leftarrow (1-\rho) g^2 + \rho \nu,\quad
    u = g / \sqrt{\hat\nu + \epsilon}\ \ (\text{or } g / (\sqrt{\hat\nu} + \epsilon))

  with :math:`\hat\nu = \nu / (1-\rho^t)` under ``bias_correction``, else :math:`\nu`.
  """
  (nu,) = moments
  nu = (1 - decay) * (g * g) + decay * nu
  nu_hat = nu * (1 / bc) if bias_correction else nu
  u = g * jax.lax.rsqrt(nu_hat + eps) if eps_in_sqrt else g / (jnp.sqrt(nu_hat) + eps)
  return u, (nu,)


def _rss_scalars(count, *, eps, initial_accumulator_value):
  del count, initial_accumulator_value  # the latter only sets the initial state
  return _as_f32(eps=eps)


def _rss(g, moments, *, eps):
  r"""Adagrad's scaling, as :func:`optax.scale_by_rss`.

  .. math::
    s \leftarrow s + g^2,\quad u = g / \sqrt{s + \epsilon}\ \text{ where } s > 0,\ \text{else } 0
  """
  (s,) = moments
  s = g * g + s
  return jnp.where(s > 0, jax.lax.rsqrt(s + eps), 0.0) * g, (s,)


def _ademamix_scalars(count, *, b1, b2, b3, alpha, eps, eps_root):
  # b3 and alpha may be schedules of the 0-based step, as in optax.contrib.scale_by_ademamix.
  b3 = b3(count - 1) if callable(b3) else b3
  alpha = alpha(count - 1) if callable(alpha) else alpha
  b1, b2 = jnp.asarray(b1, f32), jnp.asarray(b2, f32)
  return _as_f32(b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps, eps_root=eps_root, bc1=_bias_correction(b1, count),
                 bc2=_bias_correction(b2, count))


def _ademamix(g, moments, *, b1, b2, b3, alpha, eps, eps_root, bc1, bc2):
  r"""AdEMAMix, as :func:`optax.contrib.scale_by_ademamix`.

  .. math::
    m_1 \leftarrow (1-\beta_1) g + \beta_1 m_1,\quad m_2 \leftarrow (1-\beta_3) g + \beta_3 m_2,\quad
    \nu \leftarrow (1-\beta_2) g^2 + \beta_2 \nu,\quad
    u = \frac{m_1/(1-\beta_1^t) + \alpha m_2}{\sqrt{\nu/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

  The slow moment :math:`m_2` is not bias-corrected.
  """
  m1, m2, nu = moments
  m1 = (1 - b1) * g + b1 * m1
  m2 = (1 - b3) * g + b3 * m2
  nu = (1 - b2) * (g * g) + b2 * nu
  u = (m1 * (1 / bc1) + alpha * m2) / (jnp.sqrt(nu * (1 / bc2) + eps_root) + eps)
  return u, (m1, m2, nu)


ADAM = Family(
    "adam", _adam_scalars, _adam, signed=(True, False),
    scalar_names=("b1", "b2", "eps", "eps_root", "bc1", "bc2", "bc1_next"), flags=("nesterov",),
)
MOMENTUM = Family("momentum", _momentum_scalars, _momentum, signed=(True,), scalar_names=("decay",),
                  flags=("nesterov",))
LION = Family("lion", _lion_scalars, _lion, signed=(True,), scalar_names=("b1", "b2"))
# RMSprop's and Adagrad's states are non-negative: the unsigned map gives them all 256 codes
# (bitsandbytes stores them with the signed map, whose negative half they never use).
RMSPROP = Family(
    "rmsprop", _rms_scalars, _rms, signed=(False,), scalar_names=("decay", "eps", "bc"),
    flags=("eps_in_sqrt", "bias_correction"), initial=("initial_scale",),
)
ADAGRAD = Family("adagrad", _rss_scalars, _rss, signed=(False,), scalar_names=("eps",),
                 initial=("initial_accumulator_value",))
ADEMAMIX = Family(
    "ademamix", _ademamix_scalars, _ademamix, signed=(True, True, False),
    scalar_names=("b1", "b2", "b3", "alpha", "eps", "eps_root", "bc1", "bc2"),
)

# Every family, in the order of the kernels' family table (optax8_math.h's VisitFamily).
FAMILIES = (ADAM, MOMENTUM, LION, RMSPROP, ADAGRAD, ADEMAMIX)


def kernel_contract() -> str:
  """The families' kernel interface as text, in the form each kernel library exports it
  (``optax8_ffi.h``'s ``Contract``): optax8 refuses a library that was built with another."""
  parts = ["flags " + " ".join(f"{name}={bit}" for name, bit in FLAG_BITS.items())]
  for family in FAMILIES:
    flags = sum(FLAG_BITS[name] for name in family.flags)
    signed = "".join("1" if s else "0" for s in family.signed)
    parts.append(f"{family.name}({' '.join(family.scalar_names)}) flags={flags} signed={signed}")
  parts.append(f"apply({' '.join(APPLY_SCALARS)})")
  return "; ".join(parts)
