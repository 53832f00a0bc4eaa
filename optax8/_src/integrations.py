"""optax8 inside other libraries: Flax NNX and linen metadata, flax.serialization, jax.export.

Nothing here imports Flax: a value can only be a Flax box if Flax is already imported, so the
checks look Flax's classes up in ``sys.modules``, and the ``flax.serialization`` handlers are
registered when that module is first imported (or at once, if it already is).

*Boxes* are the wrappers Flax puts around a parameter's array to carry metadata: an NNX
``Variable`` (``nnx.Param`` with ``out_sharding``, ...) and a linen ``AxisMetadata``
(``nn.Partitioned`` from ``nn.with_partitioning``, ``nn.LogicallyPartitioned``). optax's own
transformations map over the array inside and hand back the same boxes; optax8 does the same.
A parameter's 8-bit moment has two arrays, so it becomes a
:class:`~optax8.QuantizedArray` whose codes and absmax are each boxed like the parameter: the
codes with the parameter's metadata, the absmax with the same, except that a last axis whose
shards are not whole blocks is unsharded (the rule of :func:`optax8.state_sharding`). Flax's
own tools (``nnx.Optimizer``, ``nnx.get_partition_spec``, ``nn.get_partition_spec``,
``nn.get_sharding``) then see one array per box, with the right sharding names.

**jax.export.** Importing optax8 registers the serialization of its state types with ``jax.export``, under
stable names: :class:`~optax8.QuantizedArray` as ``"optax8.QuantizedArray"`` (its static
``block_size`` and ``signed`` in the auxdata), each optimizer state as
``"optax8.<TypeName>"`` (``"optax8.ScaleByAdam8bitState"``, ...,
``"optax8.PercentileClippingState"``), and the optax states that optax8's optimizers hold
(``optax.EmptyState``, ``optax.MaskedState``, ``optax.ScaleByScheduleState``) and those of the
wrappers its documentation uses (``optax.inject_hyperparams``', schedules' included,
``optax.MultiSteps``', ``optax.apply_if_finite``'s) as ``"optax.<TypeName>"`` unless already registered. Other optax
states in a signature need ``jax.export.register_namedtuple_serialization``.

An update that runs on the native kernel lowers to the custom call ``optax8.update.v1``, which
``jax.export`` serializes only when told to (:func:`export_safety_checks`). The kernel is used
for each exported platform whose kernel the exporting process can load; other platforms get
the reference, and so does everything exported under ``set_implementation("reference")``,
which needs no safety check.

The process that calls an exported function must have the kernel registered before XLA
compiles it. Deserializing a :class:`~optax8.QuantizedArray` in a signature does that (the
kernel is then loaded as on the first traced update), so ``import optax8`` before
``jax.export.deserialize`` is all a function taking or returning optax8 state needs; for one
whose signature holds no ``QuantizedArray``, call :func:`register_kernels` first. If the
kernel cannot be loaded there (optax8 warns), a function that calls it fails to compile.

The target's name is versioned: ``optax8.update.v1`` stands for one set of operands, results
and attributes. A function exported with it runs with any optax8 release that registers
``optax8.update.v1``; a change of the kernel's operands, results or attributes gets a new name,
and the old one stays registered as long as it is supported. This release registers only
``optax8.update.v1``. The rest of an exported function follows ``jax.export``'s own
compatibility guarantees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.abc
import importlib.util
import json
import sys
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from optax8._src import native, native_library
from optax8._src import quantization as qz
from optax8._src import sharding as sharding_lib

__all__ = [
    "box_like", "export_safety_checks", "is_array_box", "is_box", "rebox", "register_export", "register_kernels",
    "register_serialization", "unbox",
]


def _nnx_variable_type() -> type | None:
  module = sys.modules.get("flax.nnx.variablelib")
  return getattr(module, "Variable", None)


def _linen_metadata_type(name: str = "AxisMetadata") -> type | None:
  module = sys.modules.get("flax.core.meta")
  return getattr(module, name, None)


def _linen_partitioned_type(name: str) -> type | None:
  module = sys.modules.get("flax.linen.spmd")
  return getattr(module, name, None)


def _is_instance(x: Any, cls: type | None) -> bool:
  return cls is not None and isinstance(x, cls)


def is_box(x: Any) -> bool:
  """Whether ``x`` is a Flax metadata box (an NNX ``Variable`` or a linen ``AxisMetadata``)."""
  return _is_instance(x, _nnx_variable_type()) or _is_instance(x, _linen_metadata_type())


def is_array_box(x: Any) -> bool:
  """Whether ``x`` is a box around arrays: a leaf of the trees optax8's transformations walk.

  A box around an empty subtree (``optax.masked`` puts a ``MaskedNode`` in the boxes of the
  parameters it leaves out) is walked into instead, so it has no leaves, as optax sees it.
  """
  return is_box(x) and bool(jax.tree.leaves(unbox(x)))


def unbox(x: Any) -> Any:
  """The value inside a box (a :class:`~optax8.QuantizedArray`'s arrays unboxed); else ``x``."""
  if qz.is_quantized(x):
    return qz.QuantizedArray(unbox(x.codes), unbox(x.absmax), x.block_size, x.signed)
  if _is_instance(x, _nnx_variable_type()):
    return x.get_value()
  if _is_instance(x, _linen_metadata_type()):
    # Partitioned would add a sharding constraint; the value is what the update needs.
    return x.value if hasattr(x, "value") else x.unbox()
  return x


def rebox(like: Any, value: Any) -> Any:
  """``value`` in a box like ``like`` (same type and metadata); ``value`` itself if ``like`` is none.

  A :class:`~optax8.QuantizedArray` ``like`` reboxes ``value``'s codes and absmax like its own.
  """
  if qz.is_quantized(like):
    return qz.QuantizedArray(rebox(like.codes, value.codes), rebox(like.absmax, value.absmax), value.block_size,
                             value.signed)
  if _is_instance(like, _nnx_variable_type()):
    return like.copy(value)
  if _is_instance(like, _linen_metadata_type()):
    return like.replace_boxed(value)
  return value


def _names(box: Any) -> tuple[Any, ...] | None:
  """The per-axis sharding names a box carries, or ``None``."""
  if _is_instance(box, _nnx_variable_type()):
    names = box.get_metadata().get("out_sharding")
  else:
    names = getattr(box, "names", None)
  return None if names is None else tuple(names)


def _mesh_of(box: Any, value: Any) -> Any:
  """The mesh that decides whether shards are whole blocks: the box's, the value's, or the context's."""
  mesh = box.get_metadata().get("mesh") if _is_instance(box, _nnx_variable_type()) else getattr(box, "mesh", None)
  if mesh is None:
    sharding = sharding_lib.named_sharding_of(value)
    mesh = sharding.mesh if sharding is not None else jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def _rules(box: Any) -> Any:
  """The logical axis rules a box carries (NNX ``sharding_rules``, linen ``rules``), or ``None``."""
  if _is_instance(box, _nnx_variable_type()):
    return box.get_metadata().get("sharding_rules")
  return getattr(box, "rules", None)


def _mesh_axes(spec: PartitionSpec, rules: Any) -> PartitionSpec:
  """``spec`` with logical axis names replaced by mesh axes, by ``rules`` and Flax's context rules."""
  spmd = sys.modules.get("flax.core.spmd")
  return PartitionSpec(*spmd.apply_rules(spec, rules)) if spmd is not None else spec


def _absmax_names(label: str, names: tuple[Any, ...], shape: tuple[int, ...], block_size: int, mesh: Any,
                  rules: Any = None) -> tuple:
  """``names`` for a parameter's absmax: the last axis kept only where its shards are whole blocks.

  Logical names count by the mesh axes ``rules`` (and Flax's context rules) map them to.
  Without a mesh that has those axes the shard count is unknown; the axis is kept when the
  blocks tile it (``shape[-1] % block_size == 0``), which is whole blocks whenever the mesh
  splits the blocks evenly, and dropped otherwise.
  """
  names = (names + (None,) * len(shape))[: len(shape)]
  spec = _mesh_axes(PartitionSpec(*names), rules)
  axes = sharding_lib.last_axis_names(spec, shape)
  if not axes:
    return names
  if mesh is not None and all(name in mesh.axis_names for name in axes):
    keep = sharding_lib.absmax_spec(label, spec, shape, block_size, mesh)[-1] is not None
  else:
    keep = shape[-1] % block_size == 0
  return names if keep else names[:-1] + (None,)


# The absmax boxes of linen's two partitioning boxes, made when first needed (Flax is imported
# then) and found by pickle as this module's attributes (``__getattr__`` below).
_ABSMAX_BOXES = {"AbsmaxPartitioned": "Partitioned", "AbsmaxLogicallyPartitioned": "LogicallyPartitioned"}


def __getattr__(name: str) -> type:
  if name in _ABSMAX_BOXES:
    return _absmax_box(name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _absmax_box(name: str) -> type:
  """``nn.Partitioned`` or ``nn.LogicallyPartitioned``, for an absmax, deciding its last axis when asked."""
  from flax import struct

  module = "flax.core.meta" if _ABSMAX_BOXES[name] == "Partitioned" else "flax.linen.spmd"
  base = getattr(importlib.import_module(module), _ABSMAX_BOXES[name])

  class AbsmaxPartitioned(base):
    """The absmax of a parameter boxed in ``nn.Partitioned``; ``names`` are the parameter's.

    ``nn.get_sharding(tree, mesh)`` knows the mesh, so whether a sharded last axis is cut into
    whole blocks is decided exactly there; ``nn.get_partition_spec`` uses the box's mesh or the
    context's (``jax.set_mesh``), else the rule of ``_absmax_names`` for an unknown mesh.
    Logical names (``nn.LogicallyPartitioned``) count by the mesh axes their rules name.
    """

    param_shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    block_size: int = struct.field(pytree_node=False, default=1)
    label: str = struct.field(pytree_node=False, default="")

    def _spec(self, mesh: Any) -> PartitionSpec:
      names = _absmax_names(self.label, tuple(self.names), self.param_shape, self.block_size, mesh, _rules(self))
      return PartitionSpec(*names)

    def get_partition_spec(self) -> PartitionSpec:
      return self._spec(_mesh_of(self, None))

    def get_sharding(self, mesh: Any) -> NamedSharding:
      return NamedSharding(mesh, self._spec(mesh))

  AbsmaxPartitioned.__name__ = AbsmaxPartitioned.__qualname__ = name
  return AbsmaxPartitioned


def box_like(param: Any, moment: Any, label: str) -> Any:
  """A moment of a boxed parameter, boxed like it (see the module docstring)."""
  if not is_box(param):
    return moment
  if not qz.is_quantized(moment):
    return rebox(param, moment)
  codes = rebox(param, moment.codes)
  absmax_names = functools.partial(_absmax_names, label, shape=moment.shape, block_size=moment.block_size,
                                   mesh=_mesh_of(param, unbox(param)), rules=_rules(param))
  names = _names(param)
  if _is_instance(param, _nnx_variable_type()):
    # Both of a Variable's sharding names: its own, and the state's (nnx.Optimizer's optimizer_sharding).
    metadata = param.get_metadata()
    absmax = param.copy(moment.absmax, **{
        key: () if moment.block_size is None else absmax_names(tuple(metadata[key]))
        for key in ("out_sharding", "optimizer_sharding") if metadata.get(key) is not None
    })
  elif names is None:
    absmax = rebox(param, moment.absmax)
  elif moment.block_size is None:  # one absmax for the tensor, replicated
    absmax = param.replace(value=moment.absmax, names=())
  elif type(param) in (_linen_metadata_type("Partitioned"), _linen_partitioned_type("LogicallyPartitioned")):
    fields = {f.name: getattr(param, f.name) for f in dataclasses.fields(param)} | {"value": moment.absmax}
    absmax = _absmax_box("Absmax" + type(param).__name__)(
        **fields, param_shape=moment.shape, block_size=moment.block_size, label=label)
  else:
    absmax = param.replace(value=moment.absmax, names=absmax_names(names))
  return qz.QuantizedArray(codes, absmax, moment.block_size, moment.signed)


# flax.serialization: a QuantizedArray's state dict holds its arrays and its static facts, so
# that restoring into a target made with other quantization options fails instead of decoding
# codes with the wrong block size or map.
def _to_state_dict(q: qz.QuantizedArray) -> dict[str, Any]:
  from flax import serialization

  return {
      "codes": serialization.to_state_dict(q.codes),
      "absmax": serialization.to_state_dict(q.absmax),
      "block_size": q.block_size,
      "signed": q.signed,
  }


def _describe_saved(state: Any) -> str:
  if hasattr(state, "shape") and hasattr(state, "dtype"):
    return f"an array of shape {tuple(state.shape)} and dtype {state.dtype}"
  return f"a {type(state).__name__}"


def _from_key_names(state: dict[str, Any]) -> dict[str, Any]:
  """A state dict by the key paths' names (an Orbax restore without a target: ``codes_signed``,
  ``absmax_block256``, ...) as :func:`_to_state_dict` writes it; ``state`` if it is not one."""
  codes = [k for k in state if k in ("codes_signed", "codes_unsigned")]
  absmax = [k for k in state if k == "absmax_tensor" or (k.startswith("absmax_block") and k[12:].isdigit())]
  if len(state) != 2 or len(codes) != 1 or len(absmax) != 1:
    return state
  return {
      "codes": state[codes[0]], "absmax": state[absmax[0]], "signed": codes[0] == "codes_signed",
      "block_size": None if absmax[0] == "absmax_tensor" else int(absmax[0][12:]),
  }


def _from_state_dict(target: qz.QuantizedArray, state: dict[str, Any]) -> qz.QuantizedArray:
  from flax import serialization

  path = serialization.current_path()
  if isinstance(state, dict) and not {"codes", "absmax"} & state.keys():
    state = _from_key_names(state)
  if not isinstance(state, dict) or not {"codes", "absmax"} <= state.keys():
    raise ValueError(
        f"optax8: the state at {path!r} holds {_describe_saved(state)}, not an 8-bit moment; a 32-bit "
        "optimizer's state restores into an optax8 optimizer's through optax8.convert_state (restore it "
        "into the 32-bit optimizer's state first)."
    )
  held = (state.get("block_size"), state.get("signed"))
  if held != (target.block_size, target.signed):
    raise ValueError(
        f"optax8: the state at {path!r} was saved with block_size={held[0]}, signed={held[1]}, but the "
        f"target has block_size={target.block_size}, signed={target.signed}; restore it with an optimizer "
        "built with the options it was saved with (or convert it with optax8.convert_state)."
    )
  return qz.QuantizedArray(
      serialization.from_state_dict(target.codes, state["codes"], name="codes"),
      serialization.from_state_dict(target.absmax, state["absmax"], name="absmax"),
      target.block_size,
      target.signed,
  )


def _register_serialization(module: Any) -> None:
  module.register_serialization_state(qz.QuantizedArray, _to_state_dict, _from_state_dict, override=True)


class _AfterImport(importlib.abc.MetaPathFinder):
  """Runs ``callback(module)`` right after the module ``name`` is first imported."""

  def __init__(self, name: str, callback: Callable[[Any], None]):
    self.name, self.callback = name, callback

  def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
    if fullname != self.name:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None:
      return spec
    exec_module, callback = spec.loader.exec_module, self.callback

    def exec_and_register(module: Any) -> None:
      exec_module(module)
      callback(module)

    spec.loader.exec_module = exec_and_register
    return spec


def register_serialization() -> None:
  """Registers the state types with ``flax.serialization``, now or when Flax is first imported."""
  module = sys.modules.get("flax.serialization")
  if module is not None:
    _register_serialization(module)
  elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport("flax.serialization", _register_serialization))


# jax.export

# The optax states in optax8's optimizers (the last two with a mask or a schedule), and in the
# wrappers the README uses (by name: optax releases differ in which they have).
_OPTAX_STATES = (optax.EmptyState, optax.MaskedState, optax.ScaleByScheduleState) + tuple(
    getattr(optax, name) for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState", "MultiStepsState",
                                      "ApplyIfFiniteState") if hasattr(optax, name))


def _schedule_states() -> tuple[type, ...]:
  """The state ``optax.inject_hyperparams`` keeps for a schedule, a type optax does not export."""
  state = getattr(sys.modules.get("optax.schedules._inject"), "WrappedScheduleState", None)
  return () if state is None else (state,)


def export_safety_checks() -> list[jax.export.DisabledSafetyCheck]:
  """The ``disabled_checks`` that let ``jax.export`` serialize optax8's native kernel.

  ``jax.export`` refuses custom calls whose target it does not know to be stable; optax8's
  kernel target ``optax8.update.v1`` is versioned instead (README.md, "Exporting", says what
  that promises). The list is new on every call, so it can be extended.

  Returns:
    ``[jax.export.DisabledSafetyCheck.custom_call("optax8.update.v1")]``.

  Example:
    >>> import jax, jax.numpy as jnp, optax8
    >>> tx = optax8.adam8bit(1e-3)
    >>> params = {"w": jnp.ones((64, 128))}
    >>> exported = jax.export.export(jax.jit(tx.update), platforms=["cpu"],
    ...                              disabled_checks=optax8.export_safety_checks())(params, tx.init(params))
    >>> restored = jax.export.deserialize(exported.serialize())
    >>> restored.in_tree == exported.in_tree
    True
  """
  return [jax.export.DisabledSafetyCheck.custom_call(native_library.TARGET)]


def register_kernels() -> list[str]:
  """Loads and registers the native kernels now; returns the platforms whose kernel is usable.

  optax8 does this itself on the first traced update and when ``jax.export.deserialize``
  meets a :class:`~optax8.QuantizedArray`; call it before calling an exported function that
  uses the kernel but has no ``QuantizedArray`` in its signature. It warns as a traced update
  does when a kernel cannot be loaded (and raises under ``set_implementation("native")``).

  Returns:
    A sublist of ``["cpu", "cuda"]``.

  Example:
    >>> import optax8
    >>> set(optax8.register_kernels()) <= {"cpu", "cuda"}
    True
  """
  return native.kernel_platforms()


def _serialize_quantized(auxdata: tuple[int | None, bool]) -> bytes:
  block_size, signed = auxdata
  return json.dumps({"block_size": None if block_size is None else int(block_size), "signed": bool(signed)}).encode()


def _deserialize_quantized(data: bytes) -> tuple[int | None, bool]:
  try:
    fields = json.loads(data)
  except ValueError:
    fields = None
  if not isinstance(fields, dict) or set(fields) != {"block_size", "signed"}:
    fields = {}
  block_size, signed = fields.get("block_size"), fields.get("signed")
  if not (block_size is None or (type(block_size) is int and block_size > 0)) or type(signed) is not bool:
    raise ValueError(
        f"optax8: cannot deserialize an optax8.QuantizedArray from {data!r}: expected a JSON object of an int "
        "block_size > 0 (or null) and a bool signed (was the function exported by a newer optax8?)."
    )
  # The function may call the kernel: register it before XLA compiles the function.
  native.kernel_platforms()
  return block_size, signed


def register_export() -> None:
  """Registers the state types with ``jax.export``, skipping any registered already."""
  from optax8._src import clipping, transform  # they import the engine, which imports this module

  states = (
      transform.ScaleByAdam8bitState,
      transform.ScaleByAdemamix8bitState,
      transform.ScaleByLion8bitState,
      transform.ScaleByRms8bitState,
      transform.ScaleByRss8bitState,
      transform.Trace8bitState,
      clipping.PercentileClippingState,
  )
  # Already registered: optax's states by optax or the user; all when this module runs a
  # second time (doctest collection imports it again).
  with contextlib.suppress(ValueError):
    jax.export.register_pytree_node_serialization(
        qz.QuantizedArray,
        serialized_name="optax8.QuantizedArray",
        serialize_auxdata=_serialize_quantized,
        deserialize_auxdata=_deserialize_quantized,
        from_children=lambda auxdata, children: qz.QuantizedArray(*children, *auxdata),
    )
  names = [(state, f"optax8.{state.__name__}") for state in states]
  for state, name in names + [(state, f"optax.{state.__name__}") for state in _OPTAX_STATES + _schedule_states()]:
    with contextlib.suppress(ValueError, TypeError):
      jax.export.register_namedtuple_serialization(state, serialized_name=name)
