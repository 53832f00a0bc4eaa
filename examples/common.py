"""Optimizers by name and table printing, shared by the examples and the benchmarks.

An optimizer name is an optax alias (``adamw``, ``sgd``, ``lion``, ...; ``ademamix`` comes
from ``optax.contrib``) or its optax8 counterpart with the ``8bit`` suffix. Both members of a
pair get the same hyperparameters, learning-rate schedule and gradient clipping; the 8-bit
one also keeps the embeddings' state in 32-bit, by label, as users are advised to.
"""

from __future__ import annotations

from collections.abc import Sequence

import optax

import optax8

__all__ = [
    "EMBEDDING_OVERRIDES",
    "PEAK_LEARNING_RATES",
    "available_pairs",
    "format_table",
    "make_optimizer",
]

SUFFIX = "8bit"

# Peak learning rates of the warmup-cosine schedule: the best of a coarse sweep (factors of
# about 3) with the 32-bit optimizer on the convergence benchmark's LM.
PEAK_LEARNING_RATES = {
    "adamw": 3e-3,
    "sgd": 0.3,
    "lion": 1e-3,
    "rmsprop": 3e-3,
    "adagrad": 0.1,
    "ademamix": 3e-3,
    "lamb": 1e-2,
    "lars": 3.0,
}

# Hyperparameters other than the learning rate, passed to both members of a pair.
_HYPERPARAMS = {
    "adamw": {"weight_decay": 0.01},
    "sgd": {"momentum": 0.9},
}

EMBEDDING_OVERRIDES = {"*embed*": {"optim_bits": 32}}


def _optax_alias(base: str):
  return getattr(optax, base, None) or getattr(optax.contrib, base, None)


def available_pairs() -> list[tuple[str, str]]:
  """``(32-bit name, 8-bit name)`` for every pair that both optax and optax8 provide."""
  return [
      (base, base + SUFFIX)
      for base in PEAK_LEARNING_RATES
      if hasattr(optax8, base + SUFFIX) and _optax_alias(base) is not None
  ]


def make_optimizer(
    name: str,
    total_steps: int,
    learning_rate: float | None = None,
    *,
    overrides: dict | None = None,
    clip_norm: float = 1.0,
) -> optax.GradientTransformation:
  """Builds ``name`` with global-norm clipping and a warmup-cosine learning-rate schedule.

  Args:
    name: an optax alias in :data:`PEAK_LEARNING_RATES`, optionally with the ``8bit`` suffix
      for its optax8 counterpart.
    total_steps: length of the schedule: 10% linear warmup, then cosine decay to a tenth.
    learning_rate: the peak learning rate; ``None`` for the name's default.
    overrides: the 8-bit optimizer's per-label options (default: embeddings in 32-bit).
    clip_norm: the global gradient-norm clipping threshold.

  Returns:
    The optax transformation.

  Raises:
    ValueError: if ``name`` is unknown or its optax8 optimizer does not exist.
  """
  is_8bit = name.endswith(SUFFIX)
  base = name.removesuffix(SUFFIX)
  if base not in PEAK_LEARNING_RATES:
    known = ", ".join(sorted(PEAK_LEARNING_RATES))
    raise ValueError(f"Unknown optimizer {name!r}; known: {known}, each also with the {SUFFIX!r} suffix.")
  peak = PEAK_LEARNING_RATES[base] if learning_rate is None else learning_rate
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup_steps=max(1, total_steps // 10), decay_steps=max(2, total_steps), end_value=peak / 10
  )
  kwargs = dict(_HYPERPARAMS.get(base, {}))
  if is_8bit:
    if not hasattr(optax8, name):
      raise ValueError(f"optax8 has no {name!r} in this version.")
    alias = getattr(optax8, name)
    kwargs["overrides"] = EMBEDDING_OVERRIDES if overrides is None else overrides
  else:
    alias = _optax_alias(base)
  return optax.chain(optax.clip_by_global_norm(clip_norm), alias(schedule, **kwargs))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A plain-text table: the first column left-aligned, the others right-aligned."""
  cells = [list(map(str, headers))] + [list(map(str, row)) for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
  fmt = lambda row: "  ".join(
      c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
  )
  rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
  return "\n".join([fmt(cells[0]), rule, *map(fmt, cells[1:])])
