"""8-bit building blocks, the counterparts of optax's ``scale_by_*`` transformations.

Each takes the algorithm's own hyperparameters (same names and defaults as optax) and the
quantization options, all keyword-only after ``*``:

* ``optim_bits`` (8 or 32, default 8): 32 keeps every moment in float32.
* ``block_size`` (default 256): elements per quantization block along each parameter's last
  axis.
* ``min_8bit_size`` (default 4096): parameters with fewer elements (their global size,
  whatever the sharding) keep float32 moments, as do scalars.
* ``block_wise`` (default ``True``): ``False`` keeps one absmax per tensor instead of one per
  block (bitsandbytes' original layout; the state's ``block_size`` is then ``None``). Its update
  needs the tensor's maximum before encoding, so it runs the reference math on every platform.
* ``stochastic_rounding`` (default ``False``): ``True`` rounds each new moment up or down to
  the two codes around it at random, unbiased, instead of to the nearest code, so that an EMA
  whose per-step change is below half a code step still moves on average. The random bits are a
  hash of the step count (where the state keeps one), the parameter's label and each element's
  global index and new value: the same on every platform and mesh, reproducible, with no key to
  pass. It runs the reference math.
* ``skip_zeros`` (default ``False``): an element whose gradient is zero (±0, or subnormal, which
  XLA:CPU computes as zero) keeps its moments (undecayed) and gets a zero update,
  bitsandbytes' lazy update for sparse gradients.
  An 8-bit block whose gradient is zero throughout keeps its codes and absmax bit for bit; an
  untouched element of a block whose absmax changes is re-encoded once against the new absmax,
  an error of at most half a code step of the new scale each time the absmax changes.
* ``max_unorm`` (default ``None``: off): scales each parameter's update by
  ``min(1, max_unorm * ‖p‖₂ / ‖u‖₂)``, bitsandbytes' rule, with
  ``u`` this transformation's output (before learning rate and weight decay); ``update``
  then needs ``params``. Under sharding each clipped tensor costs one all-reduce of two scalars.
* ``overrides``: ``{label pattern: {option: value}}`` for per-parameter quantization options
  and hyperparameters (see :mod:`optax8._src.labels` for labels and matching).
* ``param_labels``: the labels, as a tree of strings or a callable of the params; by default
  each parameter's ``/``-joined tree path.

``None`` stands for the default, so that :func:`optax.inject_hyperparams` leaves unset options
out of its state. The integer options it does inject are read when the state is initialised
(the state's structure records each parameter's bits and block size), so the float
hyperparameters may change every step without recompiling and no ``static_args`` are needed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from optax8._src import labels as labels_lib
from optax8._src import moments as moments_lib
from optax8._src import update_math

__all__ = [
    "ScaleByAdam8bitState",
    "ScaleByAdemamix8bitState",
    "ScaleByLion8bitState",
    "ScaleByRms8bitState",
    "ScaleByRss8bitState",
    "Trace8bitState",
    "scale_by_adam8bit",
    "scale_by_ademamix8bit",
    "scale_by_lion8bit",
    "scale_by_rms8bit",
    "scale_by_rss8bit",
    "trace8bit",
]


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


class ScaleByLion8bitState(NamedTuple):
  """State of :func:`scale_by_lion8bit`: the step count and the momentum ``mu``."""

  count: jax.Array
  mu: Any


class ScaleByRms8bitState(NamedTuple):
  """State of :func:`scale_by_rms8bit`: the step count and the squared-gradient EMA ``nu``."""

  count: jax.Array
  nu: Any


class ScaleByRss8bitState(NamedTuple):
  """State of :func:`scale_by_rss8bit`: the running ``sum_of_squares`` of the gradients."""

  sum_of_squares: Any


class ScaleByAdemamix8bitState(NamedTuple):
  """State of :func:`scale_by_ademamix8bit`: the step count, the fast and slow EMAs, ``nu``."""

  count: jax.Array
  m1: Any
  m2: Any
  nu: Any


def scale_by_adam8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    optim_bits: int | None = None,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    block_wise: bool = True,
    stochastic_rounding: bool = False,
    skip_zeros: bool = False,
    max_unorm: float | None = None,
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
    optim_bits: 8 (default), or 32 for float32 moments everywhere.
    block_size: quantization block size along the last axis (default 256).
    min_8bit_size: parameters with fewer elements keep float32 moments (default 4096).
    block_wise: ``False`` for one absmax per tensor instead of one per block (default ``True``).
    stochastic_rounding: round the moments stochastically, unbiased, instead of to the nearest
      code (default ``False``).
    skip_zeros: an element whose gradient is zero (±0, or subnormal) keeps its moments and gets
      a zero update (bitsandbytes' ``skip_zeros``, for sparse gradients such as embeddings).
    max_unorm: clip each update tensor's norm to ``max_unorm`` times its parameter's norm
      (bitsandbytes' ``max_unorm``; ``None`` or 0: off); ``update`` then needs ``params``.
    overrides: per-label options: ``optim_bits``, ``block_size``, ``min_8bit_size``,
      ``block_wise``, ``stochastic_rounding``, ``skip_zeros``, ``max_unorm``, ``b1``, ``b2``,
      ``eps``, ``eps_root``.
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
      block_wise=block_wise,
      stochastic_rounding=stochastic_rounding,
      skip_zeros=skip_zeros,
      max_unorm=max_unorm,
      overrides=overrides,
      param_labels=param_labels,
  )


def trace8bit(
    decay: float,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    *,
    optim_bits: int | None = None,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    block_wise: bool = True,
    stochastic_rounding: bool = False,
    skip_zeros: bool = False,
    max_unorm: float | None = None,
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
    optim_bits: 8 (default), or 32 for a float32 trace everywhere.
    block_size: quantization block size along the last axis (default 256).
    min_8bit_size: parameters with fewer elements keep a float32 trace (default 4096).
    block_wise, stochastic_rounding, skip_zeros, max_unorm: see :func:`optax8.scale_by_adam8bit`.
    overrides: per-label options: ``optim_bits``, ``block_size``, ``min_8bit_size``, ``block_wise``,
      ``stochastic_rounding``, ``skip_zeros``, ``max_unorm``, ``decay``.
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
      block_wise=block_wise,
      stochastic_rounding=stochastic_rounding,
      skip_zeros=skip_zeros,
      max_unorm=max_unorm,
      overrides=overrides,
      param_labels=param_labels,
  )


def scale_by_lion8bit(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    *,
    optim_bits: int | None = None,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    block_wise: bool = True,
    stochastic_rounding: bool = False,
    skip_zeros: bool = False,
    max_unorm: float | None = None,
    overrides: labels_lib.Overrides | None = None,
    param_labels: labels_lib.LabelSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Lion's sign update with an 8-bit momentum, the counterpart of :func:`optax.scale_by_lion`.

  .. math::
    u_t = \operatorname{sign}((1-\beta_1) g_t + \beta_1 m_{t-1}),\quad
    m_t = (1-\beta_2) g_t + \beta_2 m_{t-1}

  The momentum is stored with the signed dynamic map.

  Args:
    b1: interpolation between gradient and momentum for the update, in [0, 1).
    b2: decay of the momentum, in [0, 1).
    mu_dtype: dtype of the momentum where it stays 32-bit (default float32).
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: options (see
      :func:`scale_by_adam8bit`); per-label keys ``b1``, ``b2``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.scale_by_lion8bit()
    >>> state = tx.init({"w": jnp.zeros((16, 256))})
    >>> updates, state = tx.update({"w": -jnp.ones((16, 256))}, state)
    >>> float(updates["w"][0, 0])
    -1.0
  """
  return moments_lib.moment_transform(
      update_math.LION,
      ScaleByLion8bitState,
      dict(b1=b1, b2=b2),
      dict(b1=moments_lib.check_beta, b2=moments_lib.check_beta),
      moment_dtypes=(mu_dtype,),
      optim_bits=optim_bits,
      block_size=block_size,
      min_8bit_size=min_8bit_size,
      block_wise=block_wise,
      stochastic_rounding=stochastic_rounding,
      skip_zeros=skip_zeros,
      max_unorm=max_unorm,
      overrides=overrides,
      param_labels=param_labels,
  )


def scale_by_rms8bit(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    optim_bits: int | None = None,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    block_wise: bool = True,
    stochastic_rounding: bool = False,
    skip_zeros: bool = False,
    max_unorm: float | None = None,
    overrides: labels_lib.Overrides | None = None,
    param_labels: labels_lib.LabelSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""RMSprop's scaling with an 8-bit second moment, the counterpart of :func:`optax.scale_by_rms`.

  .. math::
    \nu_t = (1-\rho)\, g_t^2 + \rho\, \nu_{t-1},\quad
    u_t = \frac{g_t}{\sqrt{\hat\nu_t + \epsilon}}
    \ \ \Big(\text{or } \frac{g_t}{\sqrt{\hat\nu_t} + \epsilon}
    \text{ with } \texttt{eps\_in\_sqrt=False}\Big)

  :math:`\hat\nu_t = \nu_t / (1-\rho^t)` with ``bias_correction``, else :math:`\nu_t`.
  The state is non-negative and stored with the unsigned map (bitsandbytes uses the signed map,
  wasting its negative half).

  Args:
    decay: :math:`\rho`, in [0, 1).
    eps: >= 0.
    initial_scale: initial value of :math:`\nu`, >= 0.
    eps_in_sqrt: where ``eps`` goes, as in optax.
    bias_correction: divide by :math:`1-\rho^t`, as in optax.
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: options (see
      :func:`scale_by_adam8bit`); per-label keys ``decay``, ``eps``, ``initial_scale``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.scale_by_rms8bit(decay=0.0, eps=0.0)
    >>> state = tx.init({"w": jnp.zeros((16, 256))})
    >>> updates, state = tx.update({"w": jnp.full((16, 256), -3.0)}, state)
    >>> float(updates["w"][0, 0])
    -1.0
  """
  return moments_lib.moment_transform(
      update_math.RMSPROP,
      ScaleByRms8bitState,
      dict(decay=decay, eps=eps, initial_scale=initial_scale),
      dict(
          decay=moments_lib.check_beta,
          eps=moments_lib.check_non_negative,
          initial_scale=moments_lib.check_non_negative,
      ),
      static=dict(eps_in_sqrt=bool(eps_in_sqrt), bias_correction=bool(bias_correction)),
      optim_bits=optim_bits,
      block_size=block_size,
      min_8bit_size=min_8bit_size,
      block_wise=block_wise,
      stochastic_rounding=stochastic_rounding,
      skip_zeros=skip_zeros,
      max_unorm=max_unorm,
      overrides=overrides,
      param_labels=param_labels,
  )


def scale_by_rss8bit(
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    optim_bits: int | None = None,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    block_wise: bool = True,
    stochastic_rounding: bool = False,
    skip_zeros: bool = False,
    max_unorm: float | None = None,
    overrides: labels_lib.Overrides | None = None,
    param_labels: labels_lib.LabelSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adagrad's scaling with an 8-bit accumulator, the counterpart of :func:`optax.scale_by_rss`.

  .. math::
    s_t = s_{t-1} + g_t^2,\quad u_t = \frac{g_t}{\sqrt{s_t + \epsilon}}\ \text{ where } s_t > 0,
    \text{ else } 0

  The accumulator is non-negative and stored with the unsigned map (bitsandbytes uses the
  signed map, wasting its negative half).

  Args:
    initial_accumulator_value: initial value of :math:`s`, >= 0.
    eps: >= 0.
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: options (see
      :func:`scale_by_adam8bit`); per-label keys ``initial_accumulator_value``, ``eps``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.scale_by_rss8bit(initial_accumulator_value=0.0, eps=0.0)
    >>> state = tx.init({"w": jnp.zeros((16, 256))})
    >>> updates, state = tx.update({"w": jnp.full((16, 256), 2.0)}, state)
    >>> float(updates["w"][0, 0])
    1.0
  """
  return moments_lib.moment_transform(
      update_math.ADAGRAD,
      ScaleByRss8bitState,
      dict(initial_accumulator_value=initial_accumulator_value, eps=eps),
      dict(initial_accumulator_value=moments_lib.check_non_negative, eps=moments_lib.check_non_negative),
      optim_bits=optim_bits,
      block_size=block_size,
      min_8bit_size=min_8bit_size,
      block_wise=block_wise,
      stochastic_rounding=stochastic_rounding,
      skip_zeros=skip_zeros,
      max_unorm=max_unorm,
      overrides=overrides,
      param_labels=param_labels,
  )


def scale_by_ademamix8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 6.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    optim_bits: int | None = None,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    block_wise: bool = True,
    stochastic_rounding: bool = False,
    skip_zeros: bool = False,
    max_unorm: float | None = None,
    overrides: labels_lib.Overrides | None = None,
    param_labels: labels_lib.LabelSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdEMAMix with 8-bit moments, the counterpart of :func:`optax.contrib.scale_by_ademamix`.

  .. math::
    m_1 \leftarrow (1-\beta_1) g + \beta_1 m_1,\quad m_2 \leftarrow (1-\beta_3) g + \beta_3 m_2,\quad
    \nu \leftarrow (1-\beta_2) g^2 + \beta_2 \nu,\quad
    u = \frac{m_1/(1-\beta_1^t) + \alpha\, m_2}{\sqrt{\nu/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

  :math:`m_1` and :math:`m_2` use the signed map, :math:`\nu` the unsigned one. ``b3`` and
  ``alpha`` may be schedules of the 0-based step, as in optax.

  Args:
    b1: decay of the fast EMA, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    b3: decay of the slow EMA, in [0, 1), or a schedule.
    alpha: weight of the slow EMA, >= 0, or a schedule.
    eps: >= 0.
    eps_root: >= 0.
    mu_dtype: dtype of the two EMAs where they stay 32-bit (default float32).
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: options (see
      :func:`scale_by_adam8bit`); per-label keys ``b1``, ``b2``, ``b3``, ``alpha``, ``eps``,
      ``eps_root``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.scale_by_ademamix8bit()
    >>> state = tx.init({"w": jnp.zeros((16, 256))})
    >>> state.m2["w"].codes.dtype, state.nu["w"].signed
    (dtype('uint8'), False)
  """
  return moments_lib.moment_transform(
      update_math.ADEMAMIX,
      ScaleByAdemamix8bitState,
      dict(b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps, eps_root=eps_root),
      dict(
          b1=moments_lib.check_beta,
          b2=moments_lib.check_beta,
          b3=moments_lib.schedule_or(moments_lib.check_beta),
          alpha=moments_lib.schedule_or(moments_lib.check_non_negative),
          eps=moments_lib.check_non_negative,
          eps_root=moments_lib.check_non_negative,
      ),
      moment_dtypes=(mu_dtype, mu_dtype, None),
      optim_bits=optim_bits,
      block_size=block_size,
      min_8bit_size=min_8bit_size,
      block_wise=block_wise,
      stochastic_rounding=stochastic_rounding,
      skip_zeros=skip_zeros,
      max_unorm=max_unorm,
      overrides=overrides,
      param_labels=param_labels,
  )
