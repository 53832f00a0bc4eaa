"""8-bit optimizers with the names, arguments and defaults of optax's aliases.

Each alias chains an optax8 building block with optax's own ``add_decayed_weights`` and
``scale_by_learning_rate``, exactly as optax composes its alias, so learning-rate schedules,
weight-decay masks and :func:`optax.inject_hyperparams` behave as they do in optax.
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from optax8._src import labels as labels_lib
from optax8._src import moments
from optax8._src import transform

__all__ = ["adam8bit", "adamw8bit", "sgd8bit"]


def adam8bit(
    learning_rate: optax.ScalarOrSchedule,
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
  r"""Adam with 8-bit moments: ``chain(scale_by_adam8bit(...), scale_by_learning_rate(lr))``.

  The counterpart of :func:`optax.adam`; see :func:`optax8.scale_by_adam8bit` for the math
  and the quantization options.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, eps_root, mu_dtype, nesterov: as in :func:`optax.adam`.
    optim_bits, block_size, min_8bit_size, overrides, param_labels: quantization options.

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
  return optax.chain(
      transform.scale_by_adam8bit(
          b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, optim_bits=optim_bits,
          block_size=block_size, min_8bit_size=min_8bit_size, overrides=overrides,
          param_labels=param_labels,
      ),
      optax.scale_by_learning_rate(learning_rate),
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
    optim_bits: int = 8,
    block_size: int = 256,
    min_8bit_size: int = 4096,
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
    optim_bits, block_size, min_8bit_size, overrides, param_labels: quantization options.

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
  return optax.chain(
      transform.scale_by_adam8bit(
          b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, optim_bits=optim_bits,
          block_size=block_size, min_8bit_size=min_8bit_size, overrides=overrides,
          param_labels=param_labels,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def sgd8bit(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    *,
    optim_bits: int = 8,
    block_size: int = 256,
    min_8bit_size: int = 4096,
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
    optim_bits, block_size, min_8bit_size, overrides, param_labels: quantization options.

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
    return optax.with_extra_args_support(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(
      transform.trace8bit(
          momentum, nesterov, accumulator_dtype, optim_bits=optim_bits, block_size=block_size,
          min_8bit_size=min_8bit_size, overrides=overrides, param_labels=param_labels,
      ),
      optax.scale_by_learning_rate(learning_rate),
  )
