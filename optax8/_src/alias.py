"""8-bit optimizers with the names, arguments and defaults of optax's aliases.

Each alias chains an optax8 building block with optax's own ``add_decayed_weights`` and
``scale_by_learning_rate``, exactly as optax composes its alias, so learning-rate schedules,
weight-decay masks and :func:`optax.inject_hyperparams` behave as they do in optax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from optax8._src import clipping, fused, moments, transform
from optax8._src import labels as labels_lib

__all__ = [
    "adagrad8bit",
    "adam8bit",
    "adamw8bit",
    "ademamix8bit",
    "lamb8bit",
    "lars8bit",
    "lion8bit",
    "rmsprop8bit",
    "sgd8bit",
]


# The keyword-only options an alias hands to its building block unchanged.
_ENGINE_OPTIONS = (
    "optim_bits", "block_size", "min_8bit_size", "block_wise", "stochastic_rounding", "skip_zeros", "max_unorm",
    "overrides", "param_labels",
)


def _engine_options(arguments: dict[str, Any]) -> dict[str, Any]:
  """The engine options among an alias's arguments (its ``locals()``)."""
  return {name: arguments[name] for name in _ENGINE_OPTIONS}


def adam8bit(
    learning_rate: optax.ScalarOrSchedule,
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
  r"""Adam with 8-bit moments: ``chain(scale_by_adam8bit(...), scale_by_learning_rate(lr))``.

  The counterpart of :func:`optax.adam`; see :func:`optax8.scale_by_adam8bit` for the math
  and the quantization options.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, eps_root, mu_dtype, nesterov: as in :func:`optax.adam`.
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: see
      :func:`optax8.scale_by_adam8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax8
    >>> params = {"w": jnp.ones((64, 64))}
    >>> tx = optax8.adam8bit(1e-2)
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> round(float(params["w"][0, 0]), 4)
    0.99
  """
  return fused.fusable_chain(
      transform.scale_by_adam8bit(
          b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, **_engine_options(locals()),
      ),
      learning_rate,
  )


def adamw8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
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
  r"""AdamW with 8-bit moments, the counterpart of :func:`optax.adamw`.

  ``chain(scale_by_adam8bit(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(lr))``: the decay is decoupled and uses the pre-update parameter,
  :math:`p \leftarrow p - \eta\,(u + \lambda p)`, exactly as in optax.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, eps_root, mu_dtype, nesterov: as in :func:`optax.adamw`.
    weight_decay: :math:`\lambda`, >= 0 (default 1e-4, optax's).
    mask: which parameters decay, as in :func:`optax.adamw`.
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: see
      :func:`optax8.scale_by_adam8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax8
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(3e-4, weight_decay=0.1))
    >>> state = tx.init({"w": jnp.ones((128, 256))})
    >>> state[1][0].mu["w"].absmax.shape
    (128, 1)
  """
  moments.check_non_negative("weight_decay", weight_decay)
  return fused.fusable_chain(
      transform.scale_by_adam8bit(
          b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, **_engine_options(locals()),
      ),
      learning_rate, weight_decay, mask,
  )


def sgd8bit(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
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
  r"""SGD with an 8-bit momentum trace, the counterpart of :func:`optax.sgd`.

  ``chain(trace8bit(momentum, nesterov), scale_by_learning_rate(lr))``; with
  ``momentum=None`` there is no state to quantize and this is plain SGD, as in optax.
  Weight decay, as bitsandbytes' coupled L2, is ``optax.add_decayed_weights`` chained before.

  Args:
    learning_rate: a float or an optax schedule.
    momentum: the momentum decay in [0, 1), or ``None`` for none.
    nesterov: use Nesterov momentum.
    accumulator_dtype: dtype of the trace where it stays 32-bit (default float32).
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: see
      :func:`optax8.scale_by_adam8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.sgd8bit(0.1, momentum=0.9)
    >>> state = tx.init({"w": jnp.zeros((64, 64))})
    >>> state[0].trace["w"].codes.shape
    (64, 64)
  """
  if momentum is None:
    if max_unorm is not None:  # an array under inject_hyperparams: 0 clips nothing
      return optax.with_extra_args_support(
          optax.chain(clipping.clip_by_unorm(max_unorm), optax.scale_by_learning_rate(learning_rate))
      )
    return optax.with_extra_args_support(optax.scale_by_learning_rate(learning_rate))
  moments.check_beta("momentum", momentum)  # before trace8bit would name it `decay`
  return fused.fusable_chain(
      transform.trace8bit(
          momentum, nesterov, accumulator_dtype, **_engine_options(locals()),
      ),
      learning_rate,
  )


def lion8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    weight_decay: float = 1e-3,
    mask: Any | Callable[[optax.Params], Any] | None = None,
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
  r"""Lion with an 8-bit momentum, the counterpart of :func:`optax.lion`.

  ``chain(scale_by_lion8bit(b1, b2), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(lr))``: decoupled decay from the pre-update parameter.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, mu_dtype: as in :func:`optax.lion`.
    weight_decay: >= 0 (default 1e-3, optax's).
    mask: which parameters decay.
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: see
      :func:`optax8.scale_by_adam8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.lion8bit(1e-4)
    >>> state = tx.init({"w": jnp.zeros((64, 64))})
    >>> state[0].mu["w"].signed
    True
  """
  moments.check_non_negative("weight_decay", weight_decay)
  return fused.fusable_chain(
      transform.scale_by_lion8bit(
          b1, b2, mu_dtype, **_engine_options(locals()),
      ),
      learning_rate, weight_decay, mask,
  )


def rmsprop8bit(
    learning_rate: optax.ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
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
  r"""RMSprop with 8-bit state, the counterpart of :func:`optax.rmsprop`.

  ``chain(scale_by_rms8bit(...), scale_by_learning_rate(lr), trace8bit(momentum, nesterov))``,
  the trace only when ``momentum`` is given; both states are 8-bit. The quantization options
  of ``overrides`` apply to both states, its hyperparameters to the RMS scaling. For
  bitsandbytes' RMSprop pass ``eps_in_sqrt=False``.

  Args:
    learning_rate: a float or an optax schedule.
    decay, eps, initial_scale, eps_in_sqrt, bias_correction: as in :func:`optax.rmsprop`.
    centered: must be ``False``: the centred variant is not offered in 8-bit (use
      :func:`optax.rmsprop`).
    momentum: momentum decay in [0, 1), or ``None``.
    nesterov: Nesterov momentum.
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: see
      :func:`optax8.scale_by_adam8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.rmsprop8bit(1e-2, momentum=0.9)
    >>> state = tx.init({"w": jnp.zeros((64, 64))})
    >>> state[0].nu["w"].codes.dtype, state[2].trace["w"].codes.dtype
    (dtype('uint8'), dtype('uint8'))
  """
  if centered:
    raise ValueError(
        "rmsprop8bit: centered=True is not supported (it needs a third state); use optax.rmsprop "
        "for the centred variant."
    )
  options = _engine_options(locals())
  rms = transform.scale_by_rms8bit(decay, eps, initial_scale, eps_in_sqrt, bias_correction, **options)
  if momentum is None:
    return fused.fusable_chain(rms, learning_rate)
  moments.check_beta("momentum", momentum)
  # The trace shares the options and, of the overrides, the quantization options and skip_zeros;
  # its own `decay` is `momentum`, not RMS's decay, and max_unorm clips the RMS scaling's output.
  trace_overrides = overrides and {
      pattern: {k: v for k, v in per_label.items() if k in (*labels_lib.QUANT_OPTIONS, "skip_zeros")}
      for pattern, per_label in overrides.items()
  }
  return optax.chain(
      rms,
      optax.scale_by_learning_rate(learning_rate),
      transform.trace8bit(momentum, nesterov, **{**options, "max_unorm": None, "overrides": trace_overrides}),
  )


def adagrad8bit(
    learning_rate: optax.ScalarOrSchedule,
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
  r"""Adagrad with an 8-bit accumulator, the counterpart of :func:`optax.adagrad`.

  ``chain(scale_by_rss8bit(initial_accumulator_value, eps), scale_by_learning_rate(lr))``.

  Args:
    learning_rate: a float or an optax schedule.
    initial_accumulator_value, eps: as in :func:`optax.adagrad`.
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: see
      :func:`optax8.scale_by_adam8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.adagrad8bit(1e-2)
    >>> state = tx.init({"w": jnp.zeros((64, 64))})
    >>> round(float(optax8.dequantize_blockwise(state[0].sum_of_squares["w"])[0, 0]), 6)
    0.1
  """
  return fused.fusable_chain(
      transform.scale_by_rss8bit(
          initial_accumulator_value, eps, **_engine_options(locals()),
      ),
      learning_rate,
  )


def ademamix8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
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
  r"""AdEMAMix with 8-bit moments, the counterpart of :func:`optax.contrib.ademamix`.

  ``chain(scale_by_ademamix8bit(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(lr))``. For bitsandbytes' ``t_alpha``/``t_beta3`` warm-ups pass
  schedules as ``alpha`` and ``b3``.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, b3, alpha, eps, eps_root, mu_dtype, weight_decay, mask: as in
      :func:`optax.contrib.ademamix`.
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: see
      :func:`optax8.scale_by_adam8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.ademamix8bit(1e-3)
    >>> state = tx.init({"w": jnp.zeros((64, 64))})
    >>> sorted(state[0]._fields)
    ['count', 'm1', 'm2', 'nu']
  """
  moments.check_non_negative("weight_decay", weight_decay)
  return fused.fusable_chain(
      transform.scale_by_ademamix8bit(
          b1, b2, b3, alpha, eps, eps_root, mu_dtype, **_engine_options(locals()),
      ),
      learning_rate, weight_decay, mask,
  )


def lamb8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
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
  r"""LAMB with 8-bit Adam moments, the counterpart of :func:`optax.lamb`.

  ``chain(scale_by_adam8bit(...), add_decayed_weights(weight_decay, mask),
  scale_by_trust_ratio(), scale_by_learning_rate(lr))``: optax's layer-wise trust ratio
  :math:`\|p\| / \|u\|` (not bitsandbytes' clipped ``max_unorm`` rule).

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, eps_root, weight_decay, mask: as in :func:`optax.lamb`.
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: see
      :func:`optax8.scale_by_adam8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.lamb8bit(1e-3)
    >>> state = tx.init({"w": jnp.zeros((64, 64))})
    >>> state[0].nu["w"].signed
    False
  """
  moments.check_non_negative("weight_decay", weight_decay)
  return optax.chain(
      transform.scale_by_adam8bit(
          b1, b2, eps, eps_root, **_engine_options(locals()),
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_trust_ratio(),
      optax.scale_by_learning_rate(learning_rate),
  )


def lars8bit(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = True,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    trust_ratio_mask: Any = True,
    momentum: float = 0.9,
    nesterov: bool = False,
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
  r"""LARS with an 8-bit momentum trace, the counterpart of :func:`optax.lars`.

  ``chain(add_decayed_weights(weight_decay, weight_decay_mask),
  masked(scale_by_trust_ratio(trust_coefficient, eps), trust_ratio_mask),
  scale_by_learning_rate(lr), trace8bit(momentum, nesterov))``, optax's composition.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay, weight_decay_mask, trust_coefficient, eps, trust_ratio_mask, momentum,
      nesterov: as in :func:`optax.lars`.
    optim_bits, block_size, min_8bit_size, block_wise, stochastic_rounding, skip_zeros, max_unorm, overrides,
      param_labels: see
      :func:`optax8.scale_by_adam8bit`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> tx = optax8.lars8bit(0.1)
    >>> state = tx.init({"w": jnp.zeros((64, 64))})
    >>> state[3].trace["w"].codes.shape
    (64, 64)
  """
  moments.check_non_negative("weight_decay", weight_decay)
  moments.check_non_negative("trust_coefficient", trust_coefficient)
  moments.check_non_negative("eps", eps)
  moments.check_beta("momentum", momentum)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps),
                   mask=trust_ratio_mask),
      optax.scale_by_learning_rate(learning_rate),
      transform.trace8bit(
          momentum, nesterov, **_engine_options(locals()),
      ),
  )
