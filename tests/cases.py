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
  make: Callable[..., optax.GradientTransformation]  # quantization keywords -> optax8 optimizer
  reference: Callable[[], optax.GradientTransformation]  # the optax counterpart
  moments: tuple[str, ...]  # state fields holding the moments, named as in optax


CASES = [
    Case("adam", lambda **q: optax8.adam8bit(1e-3, **q), lambda: optax.adam(1e-3), ("mu", "nu")),
    Case(
        "adamw",
        lambda **q: optax8.adamw8bit(1e-3, weight_decay=1e-2, **q),
        lambda: optax.adamw(1e-3, weight_decay=1e-2),
        ("mu", "nu"),
    ),
    Case(
        "sgd",
        lambda **q: optax8.sgd8bit(1e-2, momentum=0.9, **q),
        lambda: optax.sgd(1e-2, momentum=0.9),
        ("trace",),
    ),
    Case(
        "nesterov",
        lambda **q: optax8.sgd8bit(1e-2, momentum=0.9, nesterov=True, **q),
        lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True),
        ("trace",),
    ),
    Case("lion", lambda **q: optax8.lion8bit(1e-4, **q), lambda: optax.lion(1e-4), ("mu",)),
    Case(
        "rmsprop",
        lambda **q: optax8.rmsprop8bit(1e-2, eps_in_sqrt=False, momentum=0.9, **q),
        lambda: optax.rmsprop(1e-2, eps_in_sqrt=False, momentum=0.9),
        ("nu", "trace"),
    ),
    Case("adagrad", lambda **q: optax8.adagrad8bit(1e-2, **q), lambda: optax.adagrad(1e-2), ("sum_of_squares",)),
    Case(
        "ademamix",
        lambda **q: optax8.ademamix8bit(1e-3, weight_decay=1e-2, **q),
        lambda: optax.contrib.ademamix(1e-3, weight_decay=1e-2),
        ("m1", "m2", "nu"),
    ),
    Case("lamb", lambda **q: optax8.lamb8bit(1e-3, **q), lambda: optax.lamb(1e-3), ("mu", "nu")),
    Case("lars", lambda **q: optax8.lars8bit(1e-2, **q), lambda: optax.lars(1e-2), ("trace",)),
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
