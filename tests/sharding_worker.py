"""Sharded training runs for test_sharding.py, each in a fresh process with simulated devices.

Run as a script, ``python sharding_worker.py SECTION OUT [ARGS...]``, with ``XLA_FLAGS`` giving
the number of simulated CPU devices: it runs one section and writes what it measured to
``OUT`` (JSON; ``multiprocess`` also writes the trained trees next to it as ``.npz``). The
gradients are inputs made on the host, so every run sees the same ones whatever the device
layout, and results can be compared bit for bit.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax8
from optax8._src import native_library

MESH_AXES = ("fsdp", "tp")
MESH_SHAPE = (4, 2)
MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
IMPLEMENTATIONS = {"native": "auto", "reference": "reference"}
STEPS = 3
# name: (shape, spec). The bias has fewer than min_8bit_size elements: 32-bit moments.
PARAMS = {
    "fsdp": ((256, 512), P("fsdp", None)),
    "tensor_parallel": ((128, 1024), P(None, "tp")),
    "two_d": ((256, 1024), P("fsdp", "tp")),
    "replicated": ((16, 512), P()),
    "bias": ((512,), P("tp")),
}
# Ensemble members under vmap: a leading, unsharded member axis.
ENSEMBLE = {"fsdp": ((4, 64, 512), P(None, "fsdp", None)), "two_d": ((4, 128, 512), P(None, "fsdp", "tp"))}
# Last axes sharded in pieces that are not whole blocks of 256 elements: 384 / 2, 300 / 2, and
# 512 / 4 (two whole blocks over four devices).
PARTIAL = {"w": ((64, 384), P("fsdp", "tp")), "v": ((32, 300), P(None, "tp")), "u": ((32, 512), P(None, "fsdp"))}
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


def optimizer() -> optax.GradientTransformation:
  return optax8.adamw8bit(1e-2, weight_decay=0.1)


def counterpart() -> optax.GradientTransformation:
  """The same step with optax's 32-bit AdamW."""
  return optax.adamw(1e-2, weight_decay=0.1)


def host_params(layout: dict, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(shape) * 0.1).astype(np.float32) for k, (shape, _) in layout.items()}


def host_grads(layout: dict, steps: int = STEPS) -> list[dict[str, np.ndarray]]:
  return [host_params(layout, seed=1 + i) for i in range(steps)]


def step_fn(tx: optax.GradientTransformation) -> Callable:
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def scanned_members_step_fn(tx: optax.GradientTransformation) -> Callable:
  """Every step in one call: ``lax.scan`` over the steps' gradients of ``vmap``-ed members."""
  member_step = jax.vmap(step_fn(tx))
  return lambda params, state, grads: jax.lax.scan(
      lambda carry, g: (member_step(*carry, g), None), (params, state), grads
  )[0]


class Case(NamedTuple):
  layout: dict
  init: Callable[[optax.GradientTransformation], Callable]
  step: Callable[[optax.GradientTransformation], Callable]
  scanned: bool  # one call with the steps' gradients stacked, or one call per step


CASES = {
    "step": Case(PARAMS, lambda tx: tx.init, step_fn, False),
    "scan_vmap": Case(ENSEMBLE, lambda tx: jax.vmap(tx.init), scanned_members_step_fn, True),
}


def gradient_inputs(case: Case) -> list[dict[str, np.ndarray]]:
  grads = host_grads(case.layout)
  return [jax.tree.map(lambda *g: np.stack(g), *grads)] if case.scanned else grads


def train(step: Callable, params: Any, state: Any, inputs: list) -> tuple[Any, Any]:
  """Calls ``step`` (jitted or compiled) once per input, one step in flight at a time.

  (With several in flight, simulated devices' collectives can stall on a host with few cores.)
  """
  for g in inputs:
    params, state = jax.block_until_ready(step(params, state, g))
  return params, state


def run_on_one_device(case: Case) -> tuple[Any, Any]:
  tx, params = optimizer(), host_params(case.layout)
  return train(jax.jit(case.step(tx)), params, case.init(tx)(params), gradient_inputs(case))


def collectives(hlo: str) -> dict[str, int]:
  return dict(collections.Counter(COLLECTIVE.findall(hlo)))


def flat(tree: Any) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def differences(expected: Any, actual: Any) -> list[str]:
  """Paths of the leaves whose bits differ."""
  expected, actual = flat(expected), flat(actual)
  assert expected.keys() == actual.keys()
  return [k for k in expected if not np.array_equal(expected[k], actual[k])]


def pieces(sharding: NamedSharding) -> int:
  """Into how many pieces ``sharding`` cuts an array."""
  names = [n for entry in sharding.spec if entry is not None for n in ((entry,) if isinstance(entry, str) else entry)]
  return math.prod(sharding.mesh.shape[n] for n in names)


def misplaced(tree: Any, shardings: Any) -> list[str]:
  """Leaves not placed as ``shardings`` says, or of which a device holds more than its share."""
  wrong = []
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings)):
    held = leaf.addressable_shards[0].data.size
    if not leaf.sharding.is_equivalent_to(sharding, leaf.ndim) or held * pieces(sharding) != leaf.size:
      wrong.append(f"{jax.tree_util.keystr(path)}: {leaf.sharding.spec}, a device holds {held} of {leaf.size}")
  return wrong


def placement(mesh: Any, layout: dict, leading: int = 0) -> dict[str, NamedSharding]:
  """Each parameter's sharding (``leading`` more unsharded axes in front)."""
  return {k: NamedSharding(mesh, P(*(None,) * leading, *spec)) for k, (_, spec) in layout.items()}


def sharded_init(tx: optax.GradientTransformation, init: Callable, params: Any, params_sharding: Any) -> tuple:
  """The state made under ``jit`` with the helper's shardings, and those shardings."""
  state_sharding = optax8.state_sharding(jax.eval_shape(init, params), params_sharding)
  return jax.jit(init, out_shardings=state_sharding)(params), state_sharding


def changed_types(before: Any, after: Any) -> list[str]:
  """Paths of the leaves whose types (shardings included) differ."""
  typed = lambda tree: {k: jax.typeof(v) for k, v in zip(flat(tree), jax.tree.leaves(tree))}
  before, after = typed(before), typed(after)
  return [k for k in before if before[k] != after[k]]


def sharded_setup(tx: optax.GradientTransformation, case: Case, mesh: Any) -> tuple:
  """``case``'s params, gradient inputs and state on ``mesh``, and the state's shardings."""
  params_sharding = placement(mesh, case.layout)
  params = jax.device_put(host_params(case.layout), params_sharding)
  grads_sharding = placement(mesh, case.layout, leading=int(case.scanned))
  inputs = [jax.device_put(g, grads_sharding) for g in gradient_inputs(case)]
  return params, inputs, *sharded_init(tx, case.init(tx), params, params_sharding)


def sharded_run(case: Case, mesh: Any) -> tuple[dict, tuple]:
  """Initialises, compiles and runs ``case`` on ``mesh``; returns what it saw and the results."""
  tx, adamw = optimizer(), counterpart()
  params, inputs, state, state_sharding = sharded_setup(tx, case, mesh)
  facts = {"init_misplaced": misplaced(state, state_sharding)}
  if mesh.axis_types[0] == AxisType.Explicit:
    facts["eager_init_misplaced"] = misplaced(case.init(tx)(params), state_sharding)
  step = jax.jit(case.step(tx)).lower(params, state, inputs[0]).compile()
  adamw_state = jax.jit(case.init(adamw))(params)
  adamw_step = jax.jit(case.step(adamw)).lower(params, adamw_state, inputs[0]).compile()
  facts["collectives"] = collectives(step.as_text())
  facts["counterpart_collectives"] = collectives(adamw_step.as_text())
  facts["custom_call"] = native_library.TARGET in step.as_text()
  trained = train(step, params, state, inputs)
  facts["types_changed"] = changed_types(state, trained[1])
  facts["state_misplaced"] = misplaced(trained[1], state_sharding)
  return facts, trained


def make_mesh(axis_type: AxisType, shape: tuple[int, ...] = MESH_SHAPE) -> jax.sharding.Mesh:
  return jax.make_mesh(shape, MESH_AXES, axis_types=(axis_type,) * len(MESH_AXES))


def shard_mapped_run(mesh: Any) -> tuple[dict, tuple]:
  """The step of ``CASES["step"]`` inside ``shard_map``, with the helper's specs."""
  tx = optimizer()
  params, grads, state, state_sharding = sharded_setup(tx, CASES["step"], mesh)
  specs = jax.tree.map(lambda s: s.spec, (placement(mesh, PARAMS), state_sharding))
  step = jax.shard_map(step_fn(tx), in_specs=(*specs, specs[0]), out_specs=specs)
  compiled = jax.jit(step).lower(params, state, grads[0]).compile()
  facts = {"collectives": collectives(compiled.as_text()), "custom_call": native_library.TARGET in compiled.as_text()}
  return facts, train(compiled, params, state, grads)


def matrix(implementation: str) -> dict:
  """Every case in every mode with one implementation: placement, communication, bits."""
  optax8.set_implementation(IMPLEMENTATIONS[implementation])
  results = {"native_usable": native_library.usable()}
  expected = {name: run_on_one_device(case) for name, case in CASES.items()}
  expected["shard_map"] = expected["step"]  # the same step, written per device
  runs = {name: functools.partial(sharded_run, case) for name, case in CASES.items()}
  runs["shard_map"] = shard_mapped_run
  for mode, axis_type in MODES.items():
    mesh = make_mesh(axis_type)
    for name, run in runs.items():
      with jax.set_mesh(mesh):
        facts, result = run(mesh)
      facts["differs_from_one_device"] = differences(expected[name], result)
      results[f"{name}-{mode}"] = facts
  return results


def partial_blocks(implementation: str) -> dict:
  """Last axes sharded in pieces that are not whole blocks: warnings, types and bits."""
  optax8.set_implementation(IMPLEMENTATIONS[implementation])
  results = {}
  expected = run_on_one_device(Case(PARTIAL, lambda tx: tx.init, step_fn, False))
  for mode, axis_type in MODES.items():
    mesh = make_mesh(axis_type)
    tx, params_sharding = optimizer(), placement(mesh, PARTIAL)
    with warnings.catch_warnings(record=True) as caught, jax.set_mesh(mesh):
      warnings.simplefilter("always")
      params = jax.device_put(host_params(PARTIAL), params_sharding)
      state = tx.init(params)
      sharded_init(tx, tx.init, params, params_sharding)
      grads = [jax.device_put(g, params_sharding) for g in host_grads(PARTIAL)]
      trained = train(jax.jit(step_fn(tx)), params, state, grads)
    results[mode] = {
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("optax8")],
        "types_changed": changed_types(state, trained[1]),
        "differs_from_one_device": differences(expected, trained),
    }
  return results


def checkpoint(folder: str) -> dict:
  """Saved on one mesh, restored onto another, trained on: the same bits as without sharding."""
  import orbax.checkpoint as ocp

  tx, grads, params = optimizer(), host_grads(PARAMS, 2 * STEPS), host_params(PARAMS)
  step = jax.jit(step_fn(tx))
  expected = train(step, params, tx.init(params), grads)
  checkpointer = ocp.StandardCheckpointer()
  save_mesh = make_mesh(AxisType.Auto)
  with jax.set_mesh(save_mesh):
    params_sharding = placement(save_mesh, PARAMS)
    params = jax.device_put(params, params_sharding)
    state, _ = sharded_init(tx, tx.init, params, params_sharding)
    trained = train(step, params, state, [jax.device_put(g, params_sharding) for g in grads[:STEPS]])
    checkpointer.save(folder, {"params": trained[0], "state": trained[1]})
    checkpointer.wait_until_finished()
  restore_mesh = make_mesh(AxisType.Explicit, MESH_SHAPE[::-1])
  with jax.set_mesh(restore_mesh):
    params_sharding = placement(restore_mesh, PARAMS)
    abstract = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host_params(PARAMS))}
    abstract["state"] = jax.eval_shape(tx.init, abstract["params"])
    shardings = {"params": params_sharding, "state": optax8.state_sharding(abstract["state"], params_sharding)}
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = checkpointer.restore(folder, target)
    facts = {"restored_misplaced": misplaced(restored, shardings)}
    grads = [jax.device_put(g, params_sharding) for g in grads[STEPS:]]
    facts["differs_from_unsharded"] = differences(expected, train(step, restored["params"], restored["state"], grads))
  return facts


def global_arrays(tree: Any, shardings: Any) -> Any:
  """Arrays over every process's devices, each process holding the same host values."""
  return jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda index: a[index]), tree, shardings)


def multiprocess(process_id: int, port: int, out: str) -> dict:
  """One of two processes training together; process 0 also writes the trained trees."""
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  tx, trees = optimizer(), {}
  facts = {"devices": jax.device_count(), "local_devices": jax.local_device_count()}
  for mode, axis_type in MODES.items():
    mesh = make_mesh(axis_type)
    params_sharding = placement(mesh, PARAMS)
    with jax.set_mesh(mesh):
      params = global_arrays(host_params(PARAMS), params_sharding)
      grads = [global_arrays(g, params_sharding) for g in host_grads(PARAMS)]
      state, _ = sharded_init(tx, tx.init, params, params_sharding)
      step = jax.jit(step_fn(tx)).lower(params, state, grads[0]).compile()
      facts[f"{mode}-custom_call"] = native_library.TARGET in step.as_text()
      trained = multihost_utils.process_allgather(train(step, params, state, grads), tiled=True)
    trees.update({f"{mode}{k}": v for k, v in flat(trained).items()})
  if process_id == 0:
    np.savez(out + ".npz", **trees)
  return facts


def sparse_grads(layout: dict, steps: int = STEPS) -> list[dict[str, np.ndarray]]:
  """Gradients with whole rows zero (embedding rows absent from a batch) and scattered zeros."""
  rng = np.random.default_rng(7)
  grads = host_grads(layout, steps)
  for g in grads:
    for x in g.values():
      if x.ndim > 1:
        x[rng.random(x.shape[0]) < 0.5] = 0.0
      x[rng.random(x.shape) < 0.1] = 0.0
  return grads


COLLECTIVE_SHAPE = re.compile(r"= (.+?) " + COLLECTIVE.pattern[2:])  # a collective's result shape and kind


def non_scalar_collectives(hlo: str) -> list[str]:
  """The collectives of ``hlo`` whose results are not (tuples of) scalars."""
  found = COLLECTIVE_SHAPE.findall(hlo)
  scalars = lambda shape: not re.sub(r"/\*.*?\*/|[a-z0-9]+\[\]|[(), ]", "", shape)
  return [f"{kind} {shape}" for shape, kind in found if not scalars(shape)]


def update_options(implementation: str) -> dict:
  """skip_zeros, max_unorm, block_wise=False and stochastic rounding (per label) on a sharded step:
  communication and bits (stochastic rounding's bits hash each element's global index)."""
  optax8.set_implementation(IMPLEMENTATIONS[implementation])
  tx = optax8.adamw8bit(1e-2, weight_decay=0.1, skip_zeros=True, max_unorm=0.02,
                        overrides={"replicated": {"max_unorm": 0.0, "skip_zeros": False},
                                   "tensor_parallel": {"block_wise": False},
                                   "two_d": {"stochastic_rounding": True}})
  return sharded_against_one_device(tx, step_fn(tx), sparse_grads(PARAMS))


def sharded_against_one_device(tx: optax.GradientTransformation, step: Callable, grads: list) -> dict:
  """Per mesh mode, ``step`` trained sharded against ``tx``'s unfused step on one device:
  the compiled step's communication, whether it calls the kernel, and the trained trees' bits."""
  params = host_params(PARAMS)
  expected = train(jax.jit(step_fn(tx)), params, tx.init(params), grads)
  results = {}
  for mode, axis_type in MODES.items():
    mesh = make_mesh(axis_type)
    params_sharding = placement(mesh, PARAMS)
    with jax.set_mesh(mesh):
      sharded_params = jax.device_put(params, params_sharding)
      state, _ = sharded_init(tx, tx.init, sharded_params, params_sharding)
      inputs = [jax.device_put(g, params_sharding) for g in grads]
      compiled = jax.jit(step, donate_argnums=(0, 1)).lower(sharded_params, state, inputs[0]).compile()
      trained = train(compiled, sharded_params, state, inputs)
    hlo = compiled.as_text()
    results[mode] = {
        "all_reduces": collectives(hlo).get("all-reduce", 0),
        "non_scalar_collectives": non_scalar_collectives(hlo),
        "custom_call": native_library.TARGET in hlo,
        "state_differs_from_one_device": differences(expected[1], trained[1]),
        # The norms are sums over shards, in another order than on one device, and XLA may
        # contract the reference's multiply-adds (stochastic rounding's path) differently.
        "params_max_relative_difference": max(
            float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))
            for a, b in zip(jax.tree.leaves(trained[0]), jax.tree.leaves(expected[0]))
        ),
    }
  return results


def fused(implementation: str) -> dict:
  """optax8.fused's step under sharding, against the unfused step on one device: communication and bits."""
  optax8.set_implementation(IMPLEMENTATIONS[implementation])
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(1e-2, weight_decay=0.1))
  return sharded_against_one_device(tx, optax8.fused(tx).step, host_grads(PARAMS))


def trained_on(mesh: Any, tx: optax.GradientTransformation, layout: dict) -> tuple[Any, Any]:
  """Three steps of ``tx`` under ``jit`` on ``mesh``, the params placed by ``layout``."""
  params_sharding = placement(mesh, layout)
  with jax.set_mesh(mesh):
    params = jax.device_put(host_params(layout), params_sharding)
    grads = [jax.device_put(g, params_sharding) for g in host_grads(layout)]
    return train(jax.jit(step_fn(tx)), params, tx.init(params), grads)


def shard_mapped(mesh: Any, tx: optax.GradientTransformation, layout: dict) -> tuple[Any, Any]:
  """Three steps of ``tx`` inside ``shard_map``, the state made outside it (specs: state_sharding)."""
  params_sharding = placement(mesh, layout)
  with jax.set_mesh(mesh):
    params = jax.device_put(host_params(layout), params_sharding)
    state, state_sharding = sharded_init(tx, tx.init, params, params_sharding)
    specs = jax.tree.map(lambda s: s.spec, (params_sharding, state_sharding))
    step = jax.jit(jax.shard_map(step_fn(tx), in_specs=(*specs, specs[0]), out_specs=specs))
    return train(step, params, state, [jax.device_put(g, params_sharding) for g in host_grads(layout)])


def idioms(implementation: str) -> dict:
  """Programs users write: a mesh axis of size 1 naming a last axis (a (8, 1) data-parallel
  mesh with model-parallel annotations), shard_map over shards below min_8bit_size or cut into
  partial blocks, and short PartitionSpecs for the state's shardings."""
  optax8.set_implementation(IMPLEMENTATIONS[implementation])
  warnings.simplefilter("ignore")  # partial blocks warn; test_sharding.py checks that elsewhere
  facts = {}
  size_one = jax.make_mesh((8, 1), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  layout = {"w": ((256, 256), P(None, "model")), "x": ((64, 256), P("data", "model"))}
  for rounding in (False, True):
    tx = optax8.adam8bit(1e-2, stochastic_rounding=rounding)
    expected = train(jax.jit(step_fn(tx)), host_params(layout), tx.init(host_params(layout)), host_grads(layout))
    facts[f"size_one_axis_rounding_{rounding}"] = differences(expected, trained_on(size_one, tx, layout))
  mesh = make_mesh(AxisType.Explicit)
  tx = optimizer()
  small_shards = {"w": ((32, 512), P(MESH_AXES, None))}  # 8 shards of 2048 elements, the param 16384
  expected = train(jax.jit(step_fn(tx)), host_params(small_shards), tx.init(host_params(small_shards)),
                   host_grads(small_shards))
  result = shard_mapped(mesh, tx, small_shards)
  facts["small_shards_8bit"] = isinstance(result[1][0].mu["w"], optax8.QuantizedArray)
  facts["small_shards_differ"] = differences(expected, result)
  try:
    shard_mapped(mesh, tx, {"w": ((32, 256), P(None, "tp"))})  # shards of 128 columns, blocks of 256
    facts["partial_blocks_in_shard_map"] = "ran"
  except ValueError as e:
    facts["partial_blocks_in_shard_map"] = str(e)
  short = {"w": ((256, 512), P("fsdp")), "v": ((256, 64), P("fsdp"))}  # trailing None left out
  for name, tx in (("percentile_clipping", optax.chain(optax8.percentile_clipping(95), optax8.adam8bit(1e-2))),
                   ("adafactor", optax.adafactor(1e-2))):
    params_sharding = placement(mesh, short)
    with jax.set_mesh(mesh):
      params = jax.device_put(host_params(short), params_sharding)
      state, shardings = sharded_init(tx, tx.init, params, params_sharding)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    facts[f"short_specs_{name}"] = {jax.tree_util.keystr(path): list(leaf.sharding.spec) for path, leaf in leaves}
  return facts


SECTIONS = {
    "matrix": matrix, "partial_blocks": partial_blocks, "checkpoint": checkpoint, "multiprocess": multiprocess,
    "update_options": update_options, "fused": fused, "idioms": idioms,
}


def main(argv: list[str]) -> None:
  section, out, *args = argv
  if section == "multiprocess":
    args = [int(args[0]), int(args[1]), out]
  facts = SECTIONS[section](*args)
  with open(out, "w") as f:
    json.dump(facts, f)


if __name__ == "__main__":
  main(sys.argv[1:])
