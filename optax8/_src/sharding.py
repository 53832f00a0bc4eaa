"""Shardings of the optimizer state, derived from the parameters' shardings.

Every params-shaped array of an optax8 state takes its parameter's sharding: the codes of a
:class:`~optax8.QuantizedArray` and a 32-bit moment exactly, the per-block ``absmax`` the same
``PartitionSpec`` (it has the parameter's rank). The one exception is a last axis cut into
pieces that are not whole blocks: ``absmax`` then stays unsharded on that axis, the update
gathers that axis of the parameter's gradient and state, and optax8 warns once, naming the
parameter and a block size that would fit.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from optax8._src import labels as labels_lib
from optax8._src import offload as offload_lib
from optax8._src import quantization as qz

__all__ = [
    "absmax_spec", "in_whole_blocks", "last_axis_names", "named_sharding_of", "partitioned_by_blocks", "state_sharding",
]

Spec = NamedSharding | PartitionSpec

_warned: set[tuple[Any, ...]] = set()


def in_shard_map() -> bool:
  """Whether this code is traced inside ``jax.shard_map``, which hands it shards, not whole arrays."""
  return bool(jax.sharding.get_abstract_mesh().manual_axes)


def varying_alike(*operands: jax.Array) -> list[jax.Array]:
  """``operands``, each varying over every ``shard_map`` axis that any of them varies over.

  A kernel's results are typed like its operands; each result depends on every operand, so
  (as the reference's would) a new state computed from a gradient that differs between shards
  differs too, and ``shard_map`` refuses to return it as replicated.
  """
  if not in_shard_map():
    return list(operands)
  varying = [_varying_axes(x) for x in operands]
  axes = frozenset().union(*varying)
  return [x if v == axes else _vary(x, tuple(sorted(axes - v))) for x, v in zip(operands, varying)]


def _varying_axes(x: jax.Array) -> frozenset[str]:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10; earlier releases call the set `vma`
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)  # JAX before 0.8


def named_sharding_of(x: Any) -> NamedSharding | None:
  """The ``NamedSharding`` of an array, tracer or ``ShapeDtypeStruct``, or ``None``.

  A tracer's is its type's (set in Explicit mode; all-``None`` specs in Auto mode); an array's
  or ``ShapeDtypeStruct``'s is its ``sharding`` attribute.
  """
  sharding = jax.typeof(x).sharding if isinstance(x, jax.core.Tracer) else getattr(x, "sharding", None)
  return sharding if isinstance(sharding, NamedSharding) and not sharding.mesh.empty else None


def last_axis_names(spec: PartitionSpec, shape: tuple[int, ...]) -> tuple[str, ...]:
  """The mesh axes ``spec`` shards the last axis of an array of ``shape`` over."""
  entry = spec[len(shape) - 1] if shape and len(spec) >= len(shape) else None
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _last_axis_pieces(spec: PartitionSpec, shape: tuple[int, ...], mesh: Any) -> int:
  """How many pieces ``spec`` cuts the last axis of an array of ``shape`` into."""
  return math.prod(mesh.shape[name] for name in last_axis_names(spec, shape))


def _whole_blocks(spec: PartitionSpec, shape: tuple[int, ...], block_size: int, mesh: Any) -> bool:
  """Whether every device holds whole blocks of the last axis under ``spec``."""
  pieces = _last_axis_pieces(spec, shape, mesh)
  return pieces == 1 or shape[-1] % (pieces * block_size) == 0


def _without_last_axis(spec: PartitionSpec, rank: int) -> PartitionSpec:
  """``spec`` over ``rank`` axes with the last one unsharded."""
  entries = (tuple(spec) + (None,) * rank)[:rank]
  return PartitionSpec(*entries[:-1], None)


def _update_spec(spec: PartitionSpec, shape: tuple[int, ...], block_size: int | None, mesh: Any) -> PartitionSpec:
  """How a blockwise update shards its operands, given their parameter's ``spec``.

  ``spec`` over every axis of ``shape``, the last one unsharded unless it is cut into whole
  blocks (``block_size`` ``None``: no blocks).
  """
  if block_size is not None and not _whole_blocks(spec, shape, block_size, mesh):
    return _without_last_axis(spec, len(shape))
  return PartitionSpec(*(tuple(spec) + (None,) * len(shape))[: len(shape)])


def _warn_partial_blocks(label: str, shape: tuple[int, ...], block_size: int, pieces: int) -> None:
  key = (label, shape, block_size, pieces)
  if key in _warned:
    return
  _warned.add(key)
  n = shape[-1]
  if n % pieces:
    advice = "no block size fits, as the axis does not split evenly; shard another axis instead"
  else:
    local = n // pieces
    fits = max(d for d in range(1, min(block_size, local) + 1) if local % d == 0)
    advice = f"block size {fits} would fit (overrides={{{label!r}: {{'block_size': {fits}}}}})"
  warnings.warn(
      f"optax8: parameter {label!r} of shape {shape} is sharded on its last axis in {pieces} "
      f"pieces, which are not whole blocks of {block_size} elements; its state's absmax stays "
      f"unsharded on that axis and each update gathers that axis (correct, but with "
      f"communication); {advice}.",
      stacklevel=2,
  )


def absmax_spec(
    label: str, spec: PartitionSpec, shape: tuple[int, ...], block_size: int | None, mesh: Any
) -> PartitionSpec:
  """The ``PartitionSpec`` of the absmax of a parameter sharded by ``spec``.

  The parameter's own, unless its last axis is cut into pieces that are not whole blocks:
  then that axis is unsharded, and a warning (once per parameter) names ``label`` and a block
  size that would fit. One absmax for the tensor (``block_size`` ``None``) is replicated.
  """
  if block_size is None:
    return PartitionSpec()
  if _whole_blocks(spec, shape, block_size, mesh):
    return spec
  _warn_partial_blocks(label, shape, block_size, _last_axis_pieces(spec, shape, mesh))
  return _without_last_axis(spec, len(shape))


def in_whole_blocks(
    update: Callable[..., tuple[jax.Array, list[Any]]], g: jax.Array, moments: Sequence[Any], scalars: Any,
    param: jax.Array | None = None,
) -> tuple[jax.Array, list[Any]]:
  """``update(g, moments, scalars, param)`` with operands that agree on whole blocks, under sharding-in-types.

  With an Explicit mesh every moment (and ``param``, the fused apply step's) takes ``g``'s
  sharding, except that a last axis cut into pieces that are not whole blocks is gathered
  first; the results come back with the operands' own types (the first one ``param``'s, if
  given, else ``g``'s), so the state's types never change (a tensor's one absmax stays
  replicated). Elsewhere (Auto mode, one device) XLA places the operands and this is
  ``update(g, moments, scalars, param)``.
  """
  sharding = jax.typeof(g).sharding
  if AxisType.Explicit not in sharding.mesh.axis_types:
    return update(g, list(moments), scalars, param)
  block_size = next((m.block_size for m in moments if qz.is_quantized(m)), None)
  spec = _update_spec(sharding.spec, g.shape, block_size, sharding.mesh)
  to = lambda x, spec: jax.sharding.reshard(x, NamedSharding(sharding.mesh, spec if jnp.ndim(x) else PartitionSpec()))
  new_first, new = update(to(g, spec), [jax.tree.map(lambda x: to(x, spec), m) for m in moments], scalars,
                          None if param is None else to(param, spec))
  back = lambda after, before: to(after, jax.typeof(before).sharding.spec)
  return back(new_first, g if param is None else param), [
      jax.tree.map(back, after, before) for after, before in zip(new, moments)
  ]


def _block_rule(shape: tuple[int, ...], hp_rank: int, num_state: int, block_size: int,
                num_tensors: int = 0) -> tuple[str, dict[str, Any]]:
  """The Shardy rule of a blockwise update ``(g, hp, *state, *tensors) -> (update, *state)``.

  ``tensors`` (the fused apply step's parameter) are shaped like ``g``.

  ``state`` alternates codes (``g``'s shape) and absmax (blocks along the last axis); ``hp``'s
  leading axes, if any, are ``g``'s leading (vmapped) axes. Leading axes shard freely. The last
  axis of the tensors (``n``) and of the absmax (``k``) are separate factors: tied as ``(k b)``,
  Shardy would shard ``k`` over part of a mesh axis that does not divide it (2 blocks over 4
  devices), which no ``PartitionSpec`` can express. The partition keeps them in whole blocks
  (:func:`_partition`); without whole blocks to shard at all, both are replicated.
  """
  if shape[-1] % block_size or shape[-1] // block_size <= 1:  # no whole blocks to shard
    factors = {"need_replication_factors": ("n", "h", "k")}  # in order of appearance
  else:
    factors = {"need_replication_factors": ("h",)}
  lead = [f"d{i}" for i in range(len(shape) - 1)]
  tensor, absmax = " ".join([*lead, "n"]), " ".join([*lead, "k"])
  hp = " ".join([*lead[: hp_rank - 1], "h"])
  state = [tensor, absmax] * (num_state // 2)
  operands = [tensor, hp, *state, *[tensor] * num_tensors]
  return f"{', '.join(operands)} -> {', '.join([tensor, *state])}", factors


def _partition(
    call: Callable[..., Sequence[jax.Array]], block_size: int, mesh: Any, arg_shapes: Any, result_shape: Any
) -> tuple[Any, Callable[..., Sequence[jax.Array]], Any, tuple[NamedSharding, ...]]:
  """Every operand keeps the gradient's sharding, its last axis only in whole blocks."""
  g, hp, *state = arg_shapes
  spec = _update_spec(g.sharding.spec, g.shape, block_size, mesh)
  tensor = NamedSharding(mesh, spec)
  hp_sharding = NamedSharding(mesh, PartitionSpec(*spec[: len(hp.shape) - 1], None))
  results = jax.tree.map(lambda _: tensor, result_shape)
  return mesh, call, results, (tensor, hp_sharding, *(tensor,) * len(state))


def partitioned_by_blocks(call: Callable[..., Sequence[jax.Array]], block_size: int,
                          num_tensors: int = 0) -> Callable[..., tuple]:
  """Wraps a blockwise update so that XLA partitions it with its operands' sharding.

  ``call(g, hp, *state, *tensors) -> (update, *new_state)`` updates every block of
  ``block_size`` elements along the last axis on its own: ``state`` alternates codes (``g``'s
  shape) and absmax (one per block), ``hp`` holds the per-step scalars (``hp[..., K]``, its
  leading axes batching ``g``'s rows), the last ``num_tensors`` operands are shaped like ``g``.
  Its results must be typed like ``g`` and ``state`` (``jax.typeof``), so that they keep their
  shardings under sharding-in-types.

  Under ``jit`` on several devices each device runs ``call`` on its own blocks, with no
  communication, whenever every device holds whole blocks (a last axis that is not sharded,
  or sharded in pieces of whole blocks); otherwise that axis is gathered first. Under
  ``vmap``, unbatched operands are broadcast and the batch axis becomes more rows.

  Args:
    call: the update on per-device arrays.
    block_size: the elements per block along the last axis.

  Returns:
    ``call``, partitioned (``custom_partitioning``, with a Shardy rule) and batchable.
  """

  @jax.custom_batching.custom_vmap
  def update(g, hp, *state):
    if AxisType.Manual in jax.typeof(g).sharding.mesh.axis_types:  # in shard_map: per device already
      return tuple(call(g, hp, *state))
    op = custom_partitioning(call)
    rule, factors = _block_rule(tuple(g.shape), jnp.ndim(hp), len(state) - num_tensors, block_size, num_tensors)
    op.def_partition(partition=lambda *a: _partition(call, block_size, *a), sharding_rule=rule, **factors)
    return tuple(op(g, hp, *state))

  @update.def_vmap
  def _batched(axis_size, in_batched, g, hp, *state):
    operands = [
        x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
        for x, batched in zip((g, hp, *state), in_batched)
    ]
    out = partitioned_by_blocks(call, block_size, num_tensors)(*operands)
    return out, (True,) * len(out)

  return update


def _is_spec(x: Any) -> bool:
  return isinstance(x, (NamedSharding, PartitionSpec))


def _spec_of(sharding: Spec) -> PartitionSpec:
  return sharding.spec if isinstance(sharding, NamedSharding) else sharding


def _shape(leaf: Any) -> tuple[int, ...] | None:
  shape = getattr(leaf, "shape", None)
  return None if shape is None else tuple(shape)


def state_sharding(
    abstract_state: Any,
    params_sharding: Any,
    *,
    mesh: Any = None,
    memory_kind: str | None = None,
    min_size: int = offload_lib.DEFAULT_MIN_SIZE,
) -> Any:
  """The optimizer state's shardings, derived from the parameters' ones.

  Walks the state (from ``jax.eval_shape(tx.init, params)``): every subtree with the
  params' tree structure (a moment tree of :class:`~optax8.QuantizedArray`\\ s or arrays, or
  any other params-shaped tree such as ``optax.MultiSteps``' accumulated gradients) takes the
  params' shardings; everything else (step counts, hyperparameters) is replicated. A
  quantized moment's codes take its parameter's sharding, its absmax the same spec, except
  that a last axis cut into pieces that are not whole blocks stays unsharded in the absmax
  (optax8 warns once, naming the parameter and a block size that would fit). Works for any
  optax state, so chains mixing optax8 and optax transformations are covered.

  Use it to create the state already sharded, and to restore an Orbax checkpoint onto a
  mesh (any mesh: the state's layout does not depend on it)::

    params_sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs)
    abstract_state = jax.eval_shape(tx.init, params)
    shardings = optax8.state_sharding(abstract_state, params_sharding)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    # Restoring instead:
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    state = orbax.checkpoint.StandardCheckpointer().restore(path, target)

  For a state offloaded with :func:`optax8.offload`, pass its ``memory_kind`` (and its
  ``min_size``, if not the default): the leaves it keeps in host memory get shardings in that
  memory kind, by the rule ``offload`` applies, so ``jax.jit(tx.init, out_shardings=...)``
  and an Orbax restore put them straight into host memory::

    tx = optax8.offload(optax8.adamw8bit(1e-3))
    shardings = optax8.state_sharding(
        jax.eval_shape(tx.init, params), params_sharding, memory_kind="pinned_host")

  With Flax, take the params' specs from their partitioning metadata
  (``nn.with_partitioning``, ``nnx.with_partitioning``, or logical axis names)::

    # linen
    abstract = jax.eval_shape(model.init, key, x)
    param_specs = nn.get_partition_spec(abstract)["params"]
    # logical axis names: nn.logical_to_mesh_sharding(param_specs, mesh, rules)
    abstract_state = jax.eval_shape(tx.init, nn.unbox(abstract)["params"])
    # NNX
    params = nnx.state(model, nnx.Param)
    param_specs = nnx.get_partition_spec(params)
    abstract_state = jax.eval_shape(tx.init, params)

  Args:
    abstract_state: the optimizer state or its ``jax.eval_shape``.
    params_sharding: a tree with the params' structure of ``NamedSharding``\\ s or of
      ``PartitionSpec``\\ s.
    mesh: the mesh (or ``AbstractMesh``) that ``PartitionSpec``\\ s refer to, by default the
      one set by ``jax.set_mesh``; only its axis sizes are read, to tell whether a sharded
      last axis splits into whole blocks (``NamedSharding``\\ s carry their own).
    memory_kind: ``None`` (the default) leaves memory kinds alone; otherwise the memory kind of
      the leaves :func:`optax8.offload` keeps in host memory (with ``params_sharding`` of
      ``NamedSharding``\\ s: a ``PartitionSpec`` has no memory kind).
    min_size: ``optax8.offload``'s ``min_size``: with ``memory_kind``, leaves with at least that
      many elements (a ``QuantizedArray``'s codes, which moves whole) get it.

  Returns:
    A tree with the state's structure holding ``NamedSharding``\\ s, or ``PartitionSpec``\\ s
    when ``params_sharding`` holds them: usable as ``out_shardings``, in
    ``jax.ShapeDtypeStruct(..., sharding=)`` or with ``jax.device_put``.

  Example:
    >>> import jax, jax.numpy as jnp, optax8
    >>> from jax.sharding import AbstractMesh, PartitionSpec as P
    >>> tx = optax8.adamw8bit(1e-3)
    >>> params = {"w": jnp.zeros((1024, 512)), "b": jnp.zeros((512,))}
    >>> specs = optax8.state_sharding(
    ...     jax.eval_shape(tx.init, params), {"w": P("fsdp", "tp"), "b": P()},
    ...     mesh=AbstractMesh((4, 2), ("fsdp", "tp")))
    >>> mu = specs[0].mu
    >>> mu["w"].codes, mu["w"].absmax, mu["b"], specs[0].count
    (P('fsdp', 'tp'), P('fsdp', 'tp'), P(), P())
  """
  from optax8._src import integrations  # it imports this module

  # Flax boxes (nnx.get_partition_spec's Variables of specs, the state's boxed moments) are leaves.
  is_box = integrations.is_array_box
  boxed, params_def = jax.tree.flatten(params_sharding, is_leaf=lambda x: _is_spec(x) or is_box(x))
  shardings = [integrations.unbox(x) for x in boxed]
  for x in shardings:
    if not _is_spec(x):
      raise TypeError(f"params_sharding must hold NamedShardings or PartitionSpecs, got {x!r}.")
  offload_lib.check_min_size(min_size)
  if memory_kind is not None:
    offload_lib.check_memory_kind(memory_kind)
    for x in shardings:
      if not isinstance(x, NamedSharding):
        raise ValueError(
            f"state_sharding: memory_kind={memory_kind!r} needs params_sharding of NamedShardings, got {x!r} "
            "(a PartitionSpec has no memory kind)."
        )
  named = [x for x in shardings if isinstance(x, NamedSharding)]
  replicated = NamedSharding(named[0].mesh, PartitionSpec()) if named else PartitionSpec()
  labels = labels_lib.resolve_labels(params_sharding, None) if shardings else []

  from optax8._src import clipping  # it imports integrations, which imports this module

  is_moment = lambda x: qz.is_quantized(x) or is_box(x)
  is_history = lambda x: isinstance(x, clipping.PercentileClippingState)  # per-parameter norms, not arrays like it

  def shapes_if_params_shaped(node: Any) -> list[tuple[int, ...] | None] | None:
    leaves, treedef = jax.tree.flatten(node, is_leaf=is_moment)
    return [_shape(integrations.unbox(x)) for x in leaves] if treedef == params_def else None

  # Each parameter's shape, as the largest of the arrays in its place in the params-shaped trees
  # (a moment has it; factored or per-parameter statistics are smaller).
  candidate = lambda node: is_history(node) or is_moment(node) or shapes_if_params_shaped(node) is not None
  nodes = jax.tree.leaves(abstract_state, is_leaf=candidate)
  shape_lists = [shapes for node in nodes if not is_history(node) and (shapes := shapes_if_params_shaped(node))]
  param_shapes = [
      max((shapes[i] for shapes in shape_lists if shapes[i] is not None), key=math.prod, default=None)
      for i in range(len(shardings))
  ]

  def is_params_shaped(node: Any) -> bool:
    shapes = None if is_history(node) else shapes_if_params_shaped(node)
    return shapes is not None and all(
        shape is not None and shape == param_shape and len(_spec_of(spec)) <= len(shape)
        for shape, param_shape, spec in zip(shapes, param_shapes, shardings)
    )

  def absmax_sharding(label: str, sharding: Spec, q: qz.QuantizedArray) -> Spec:
    if isinstance(sharding, NamedSharding):
      return sharding.update(spec=absmax_spec(label, sharding.spec, q.shape, q.block_size, sharding.mesh))
    axes = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if axes.empty and last_axis_names(sharding, q.shape) and q.block_size is not None:
      raise ValueError(
          f"state_sharding: {label!r} is sharded on its last axis by {sharding}; pass mesh= (or call it "
          "under jax.set_mesh) so that optax8 can tell whether its blocks split evenly."
      )
    return absmax_spec(label, sharding, q.shape, q.block_size, axes)

  def place(node: Any) -> Any:
    if not is_params_shaped(node):
      return jax.tree.map(lambda _: replicated, node)
    leaves, treedef = jax.tree.flatten(node, is_leaf=is_moment)
    rebox = integrations.rebox  # each sharding boxed as the state's leaf is
    return treedef.unflatten([
        dataclasses.replace(x, codes=rebox(x.codes, s),
                            absmax=rebox(x.absmax, absmax_sharding(label, s, integrations.unbox(x))))
        if qz.is_quantized(x) else rebox(x, s)
        for x, s, label in zip(leaves, shardings, labels)
    ])

  placed = jax.tree.map(place, abstract_state,
                        is_leaf=lambda node: is_history(node) or qz.is_quantized(node) or is_params_shaped(node))
  if memory_kind is None:
    return placed
  in_memory = lambda s: s.with_memory_kind(memory_kind)
  return jax.tree.map(
      lambda leaf, s: jax.tree.map(in_memory, s) if offload_lib.is_offloaded(leaf, min_size) else s,
      abstract_state,
      placed,
      is_leaf=qz.is_quantized,
  )
