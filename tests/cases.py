"""Every optax8 optimizer next to its optax float32 counterpart, shared by the test suites."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
import optax.contrib

import optax8


class Case(NamedTuple):
  name: str
  make: Callable[..., optax.GradientTransformation]  # (lr, **quantization options) -> optax8 optimizer
  reference: Callable[[float], optax.GradientTransformation]  # lr -> the optax counterpart
  moments: tuple[str, ...]  # state fields holding the moments, named as in optax
  lr: float  # the learning rate of bitsandbytes' test procedure


CASES = [
  Case("adam", lambda lr, **q: optax8.adam8bit(lr, **q), lambda lr: optax.adam(lr), ("mu", "nu"), 1e-3),
  Case(
    "adamw",
    lambda lr, **q: optax8.adamw8bit(lr, weight_decay=1e-2, **q),
    lambda lr: optax.adamw(lr, weight_decay=1e-2),
    ("mu", "nu"),
    1e-3,
  ),
  Case(
    "sgd",
    lambda lr, **q: optax8.sgd8bit(lr, momentum=0.9, **q),
    lambda lr: optax.sgd(lr, momentum=0.9),
    ("trace",),
    1e-2,
  ),
  Case(
    "nesterov",
    lambda lr, **q: optax8.sgd8bit(lr, momentum=0.9, nesterov=True, **q),
    lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    ("trace",),
    1e-2,
  ),
  Case("lion", lambda lr, **q: optax8.lion8bit(lr, **q), lambda lr: optax.lion(lr), ("mu",), 1e-4),
  Case(
    "rmsprop",
    lambda lr, **q: optax8.rmsprop8bit(lr, eps_in_sqrt=False, momentum=0.9, **q),
    lambda lr: optax.rmsprop(lr, eps_in_sqrt=False, momentum=0.9),
    ("nu", "trace"),
    1e-2,
  ),
  Case("adagrad", lambda lr, **q: optax8.adagrad8bit(lr, **q), lambda lr: optax.adagrad(lr), ("sum_of_squares",), 1e-2),
  Case(
    "ademamix",
    lambda lr, **q: optax8.ademamix8bit(lr, weight_decay=1e-2, **q),
    lambda lr: optax.contrib.ademamix(lr, weight_decay=1e-2),
    ("m1", "m2", "nu"),
    1e-3,
  ),
  Case("lamb", lambda lr, **q: optax8.lamb8bit(lr, **q), lambda lr: optax.lamb(lr), ("mu", "nu"), 1e-3),
  Case("lars", lambda lr, **q: optax8.lars8bit(lr, **q), lambda lr: optax.lars(lr), ("trace",), 1e-2),
]
CASE_NAMES = [c.name for c in CASES]
CASES_BY_NAME = {c.name: c for c in CASES}


def dequantize_tree(tree: Any) -> Any:
  """Float32 values of a moment tree (quantized leaves decoded)."""
  return jax.tree.map(
    lambda x: optax8.dequantize_blockwise(x) if isinstance(x, optax8.QuantizedArray) else x,
    tree,
    is_leaf=lambda x: isinstance(x, optax8.QuantizedArray),
  )


def moments_of(state: Any, fields: tuple[str, ...]) -> dict[str, Any]:
  """The dequantized moment trees of an optax8 state, by field name."""
  return {field: dequantize_tree(optax.tree.get(state, field)) for field in fields}
