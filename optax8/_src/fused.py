"""The fused apply step: the update and ``optax.apply_updates`` in one pass over each parameter.

Under optax's contract an optimizer's ``update`` writes an update tree, and
``optax.apply_updates`` reads it back with the parameters: for 8-bit Adam on float32
parameters that is 24 bytes moved per parameter (the kernel reads the gradient and the codes
and writes the update and the codes; ``apply_updates`` reads the parameter and the update and
writes the parameter). :func:`fused` recognises the chains whose remaining transformations are
elementwise and affine in the update, and runs each parameter's whole step as one kernel call
that reads the gradient, the parameter and the state once and writes the parameter and the
state once (16 bytes). The state is the unfused optimizer's own pytree, so checkpoints move
freely between the two; the learning rate, the weight decay and the clip scale are runtime
scalars, so schedules and :func:`optax.inject_hyperparams` do not recompile.

The chains it recognises are the optax8 aliases built as ``chain(block, [add_decayed_weights],
scale_by_learning_rate)`` (marked by :func:`fusable_chain`), alone or under
:func:`optax.inject_hyperparams`, optionally after :func:`optax.clip_by_global_norm` in an
:func:`optax.chain`. optax's own transformations are recognised by their code objects, which
the installed optax defines.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax8._src import integrations

__all__ = ["FusedStep", "fusable_chain", "fused"]

f32 = jnp.float32


class FusedStep(NamedTuple):
  """An optimizer's fused apply step (see :func:`optax8.fused`).

  Attributes:
    init: the optimizer's own ``init``: ``params -> state``.
    step: ``(params, state, grads) -> (params, state)``, the same as
      ``updates, state = tx.update(grads, state, params)`` followed by
      ``params = optax.apply_updates(params, updates)``.
  """

  init: Callable[[optax.Params], optax.OptState]
  step: Callable[[optax.Params, optax.OptState, optax.Updates], tuple[optax.Params, optax.OptState]]


@dataclasses.dataclass
class _Request:
  """What a fused step asks of the fusable chain it calls: the parameters and the clip scalars."""

  params: Any
  clip: tuple[jax.Array, jax.Array]
  taken: bool = False


# Set while a fused step calls into a transformation that wraps a fusable chain
# (optax.inject_hyperparams): the chain then returns the new parameters in place of the updates.
_request: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("optax8_fused_request", default=None)


def _pending_request() -> _Request | None:
  """The fused step's request, unless there is none or a chain has taken it.

  (A function of this module, so that closures calling it pickle by value: a ContextVar cannot.)
  """
  request = _request.get()
  return None if request is None or request.taken else request


def _leaves(tree: Any) -> tuple[list[Any], Any]:
  boxes, treedef = jax.tree.flatten(tree, is_leaf=integrations.is_array_box)
  return [jnp.asarray(integrations.unbox(x)) for x in boxes], treedef


def _decay_per_leaf(weight_decay: Any, mask: Any, params: Any, count: int) -> list[Any]:
  """Each parameter's weight decay, as ``optax.masked(add_decayed_weights(weight_decay), mask)``
  decays it (0 where the mask leaves a parameter out)."""
  if weight_decay is None:
    return [jnp.zeros([], f32)] * count
  mask_tree = mask(params) if callable(mask) else mask
  if mask_tree is None:
    return [jnp.asarray(weight_decay, f32)] * count
  # A mask may be a prefix of the params tree, as in optax.masked.
  decayed = jax.tree.leaves(jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), mask_tree, params))
  if len(decayed) != count:
    raise ValueError(f"optax8.fused: the weight decay mask has {len(decayed)} leaves for {count} parameters.")
  return [jnp.where(jnp.asarray(m), jnp.asarray(weight_decay, f32), 0.0) for m in decayed]


def _fused_chain(block: optax.GradientTransformationExtraArgs, learning: optax.GradientTransformation,
                 weight_decay: Any, mask: Any, grads: Any, state: tuple, request: _Request) -> tuple[Any, tuple]:
  """``chain(block, [add_decayed_weights], learning)``'s update and ``apply_updates`` in one step."""
  entries = 2 + (weight_decay is not None)
  if not isinstance(state, tuple) or len(state) != entries:
    raise TypeError(
        f"optax8.fused: expected the fused chain's state (a tuple of {entries}), got a {type(state).__name__}; "
        "are the arguments in another order (optax8.fused(tx).step(params, state, grads))?"
    )
  block_state, *decay_state, learning_state = state
  g_leaves, treedef = _leaves(grads)
  # The learning-rate transformation scales each update by one scalar, in the update's dtype
  # (a schedule reads its count from its state): applied to ones, it gives the scalars.
  ones = treedef.unflatten([jnp.ones([], g.dtype) for g in g_leaves])
  step_sizes, learning_state = learning.update(ones, learning_state)
  step_sizes = [x.astype(f32) for x in _leaves(step_sizes)[0]]
  decays = _decay_per_leaf(weight_decay, mask, request.params, len(g_leaves))
  clip_norm, clip_max = request.clip
  apply = [
      {"clip_norm": clip_norm, "clip_max": clip_max, "step_size": step, "weight_decay": decay}
      for step, decay in zip(step_sizes, decays)
  ]
  params, block_state = block.update.apply_step(grads, block_state, request.params, apply)
  return params, (block_state, *decay_state, learning_state)


def fusable_chain(
    block: optax.GradientTransformationExtraArgs,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(block, add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))``
  (no decay where ``weight_decay`` is ``None``), which :func:`fused` can fuse.

  Args:
    block: an optax8 building block (``moments.moment_transform``'s).
    learning_rate: a float or an optax schedule.
    weight_decay: the decoupled weight decay, or ``None`` for none.
    mask: which parameters decay, as in :func:`optax.add_decayed_weights`.
  """
  learning = optax.scale_by_learning_rate(learning_rate)
  parts = [block, *([optax.add_decayed_weights(weight_decay, mask)] if weight_decay is not None else []), learning]
  chain = optax.chain(*parts)

  def update_fn(updates, state, params=None, **extra_args):
    request = _pending_request()
    if request is None:
      return chain.update(updates, state, params, **extra_args)
    request.taken = True
    return _fused_chain(block, learning, weight_decay, mask, updates, state, request)

  update_fn.fusable = True
  return optax.GradientTransformationExtraArgs(chain.init, update_fn)


def _closure(fn: Callable[..., Any]) -> dict[str, Any]:
  return dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in fn.__closure__ or ())))


def _code(fn: Callable[..., Any]) -> Any:
  return getattr(fn, "__code__", None)


# optax's own update functions, by their code objects in the installed optax.
_CHAIN = _code(optax.chain(optax.identity()).update)
_EXTRA_ARGS = _code(
    optax.with_extra_args_support(optax.GradientTransformation(lambda p: (), lambda u, s, p: (u, s))).update
)
_CLIP = _code(optax.clip_by_global_norm(1.0).update)
_INJECT = _code(optax.inject_hyperparams(optax.sgd)(0.1).update)

_FUSABLE = (
    "optax8's adam8bit, adamw8bit, sgd8bit (with momentum), lion8bit, adagrad8bit, ademamix8bit and rmsprop8bit "
    "(without momentum), alone or under optax.inject_hyperparams, optionally after optax.clip_by_global_norm in an "
    "optax.chain"
)

_Plan = Callable[[Any, Any, Any, tuple[jax.Array, jax.Array]], tuple[Any, Any]]


def _unwrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` without ``optax.with_extra_args_support``'s wrapper."""
  return _closure(fn)["tx"].update if _code(fn) is _EXTRA_ARGS else fn


def _fused_call(update: Callable[..., Any]) -> _Plan:
  """A plan that calls ``update`` (a fusable chain, or a wrapper of one) with a request."""

  def plan(params, state, grads, clip):
    request = _Request(params, clip)
    token = _request.set(request)
    try:
      new_params, new_state = update(grads, state, params)
    finally:
      _request.reset(token)
    if not request.taken:
      raise TypeError(f"optax8.fused: the transformation did not build a chain it can fuse; it fuses {_FUSABLE}.")
    return new_params, new_state

  return plan


def _plan(update: Callable[..., Any], *, clipped: bool = False) -> _Plan:
  """How to run ``update``'s transformation fused, or a TypeError naming what is fusable."""
  from optax8._src import alias  # noqa: PLC0415 (alias builds its chains with this module)

  update = _unwrapped(update)
  # Under inject_hyperparams only optax8's own aliases: their chain's result is the step's.
  fusable_factories = (alias.adam8bit, alias.adamw8bit, alias.sgd8bit, alias.lion8bit, alias.adagrad8bit,
                       alias.ademamix8bit, alias.rmsprop8bit)
  if getattr(update, "fusable", False) or (
      _code(update) is _INJECT and _closure(update)["inner_factory"] in fusable_factories
  ):
    return _fused_call(update)
  if _code(update) is _CHAIN:
    fns = [_unwrapped(fn) for fn in _closure(update)["update_fns"]]
    if len(fns) == 1:
      only = _plan(fns[0], clipped=clipped)

      def plan_of_one(params, state, grads, clip):
        new_params, inner_state = only(params, state[0], grads, clip)
        return new_params, (inner_state,)

      return plan_of_one
    if len(fns) == 2 and _code(fns[0]) is _CLIP and not clipped:
      max_norm = _closure(fns[0])["max_norm"]
      inner = _plan(fns[1], clipped=True)

      def plan(params, state, grads, clip):
        del clip
        # As optax.clip_by_global_norm: unchanged within the bound, else g / norm * max_norm.
        norm = optax.tree.norm(grads)
        within = norm < max_norm
        clip = jnp.where(within, 1.0, norm).astype(f32), jnp.where(within, 1.0, max_norm).astype(f32)
        new_params, inner_state = inner(params, state[1], grads, clip)
        return new_params, (state[0], inner_state)

      return plan
  raise TypeError(f"optax8.fused cannot fuse this transformation: it fuses {_FUSABLE}.")


def fused(tx: optax.GradientTransformation) -> FusedStep:
  r"""The fused apply step of ``tx``: its update and ``optax.apply_updates`` as one pass.

  ``fused(tx).step(params, state, grads)`` returns what
  ``updates, state = tx.update(grads, state, params)`` and
  ``optax.apply_updates(params, updates)`` return, with the state bit for bit and the
  parameters to float32 rounding (for bfloat16 or float16 gradients to their rounding: the clip
  and the update stay in float32, where optax rounds them to the gradient's dtype), computing
  per parameter

  .. math::
    g \leftarrow g \cdot \min(1, c / \lVert g \rVert),\quad (u, s) \leftarrow \mathrm{block}(g, s),\quad
    p \leftarrow p - \eta_t (u + \lambda p)

  in one kernel call that reads the gradient, the parameter and the 8-bit state once and
  writes the parameter and the state once, in place when the step donates them
  (``jax.jit(step, donate_argnums=(0, 1))``). The kernel also takes float32 parameters with
  bfloat16 or float16 gradients, reading each in its own dtype; other pairs of dtypes step in
  float32 after converting both, and the new parameter is rounded back once. The state is
  ``tx``'s own pytree: a state from ``tx.init``, ``tx.update`` or a checkpoint of either works
  with both. The learning rate, the weight decay and the clip scale are runtime scalars.

  Args:
    tx: optax8's ``adam8bit``, ``adamw8bit``, ``sgd8bit`` (with momentum), ``lion8bit``,
      ``adagrad8bit``, ``ademamix8bit`` or ``rmsprop8bit`` (without momentum), or one of them
      under :func:`optax.inject_hyperparams`, optionally after
      :func:`optax.clip_by_global_norm` in an :func:`optax.chain`.

  Returns:
    A :class:`FusedStep` with ``init`` and ``step``.

  Raises:
    TypeError: ``tx`` is not one of those (then use ``tx.update`` and ``optax.apply_updates``).
    ValueError: (from ``step``) a parameter has ``max_unorm`` set, which clips the whole update
      by its norm before it is applied.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax8
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(1e-2, weight_decay=0.1))
    >>> fused = optax8.fused(tx)
    >>> params = {"w": jnp.ones((64, 64))}
    >>> state = fused.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    >>> params, state = jax.jit(fused.step, donate_argnums=(0, 1))(params, state, grads)
    >>> round(float(params["w"][0, 0]), 4)
    0.989
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(
        f"optax8.fused takes an optax GradientTransformation, got {type(tx).__name__}"
        + (" (gradient accumulation cannot be fused: the parameters change only every k steps)"
           if isinstance(tx, optax.MultiSteps) else "") + "."
    )
  plan = _plan(tx.update)
  unclipped = (jnp.ones([], f32), jnp.ones([], f32))

  def step(params, state, grads):
    return plan(params, state, grads, unclipped)

  return FusedStep(tx.init, step)
