"""Offloaded training on 8 simulated devices, for test_offload.py.

Run as a script, ``python offload_worker.py OUT CHECKPOINT``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``: on a 4 x 2 mesh in Auto and in
Explicit mode, it trains ``optax8.offload(adamw8bit)`` and ``adamw8bit`` side by side from
sharded parameters, saves and restores the offloaded state with Orbax (at ``CHECKPOINT``), and
writes to ``OUT`` (JSON) every leaf whose sharding is not the un-offloaded leaf's spec in the
expected memory kind, and every array that differs from the un-offloaded run.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax8
from optax8._src.offload import is_offloaded

MIN_SIZE = 1024
STEPS = 3
# w: 8-bit moments, offloaded; v: 32-bit moments (< min_8bit_size), offloaded; b: in device memory.
PARAMS = {"w": ((64, 512), P("fsdp", "tp")), "v": ((48, 64), P("fsdp", None)), "b": ((512,), P("tp"))}


def inner() -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(1e-2, weight_decay=0.1))


def host_trees() -> tuple[dict, list[dict]]:
  rng = np.random.default_rng(0)
  draw = lambda: {name: rng.standard_normal(shape, np.float32) for name, (shape, _) in PARAMS.items()}
  return draw(), [draw() for _ in range(STEPS)]


def step_fn(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  return step


def keyed(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def misplaced(state: Any, plain: Any) -> list[str]:
  """Leaves of ``state`` not on ``plain``'s leaf's spec, or not in the memory kind the rule gives."""
  bad = []
  is_q = lambda x: isinstance(x, optax8.QuantizedArray)
  plain_leaves = jax.tree.leaves(plain, is_leaf=is_q)
  for (path, leaf), plain_leaf in zip(jax.tree_util.tree_leaves_with_path(state, is_leaf=is_q), plain_leaves):
    kind = "pinned_host" if is_offloaded(leaf, MIN_SIZE) else "device"
    for (key, x), theirs in zip(keyed(leaf).items(), jax.tree.leaves(plain_leaf)):
      expected = theirs.sharding.with_memory_kind(kind)
      if x.sharding.memory_kind != kind or not x.sharding.is_equivalent_to(expected, x.ndim):
        bad.append(f"{jax.tree_util.keystr(path)}{key}: {x.sharding} (expected {expected})")
  return bad


def differences(a: Any, b: Any) -> list[str]:
  ours, theirs = keyed(a), keyed(b)
  assert ours.keys() == theirs.keys()
  return [k for k in ours if not np.array_equal(np.asarray(ours[k]), np.asarray(theirs[k]))]


def run(axis_type: AxisType, checkpoint: str | None) -> dict:
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(axis_type,) * 2)
  tx, plain = optax8.offload(inner(), min_size=MIN_SIZE), inner()
  host_params, grads = host_trees()
  facts: dict[str, Any] = {"misplaced": [], "differences": []}
  with jax.set_mesh(mesh):
    params_sharding = {name: NamedSharding(mesh, spec) for name, (_, spec) in PARAMS.items()}
    params = jax.device_put(host_params, params_sharding)
    grads = [jax.device_put(g, params_sharding) for g in grads]
    abstract = jax.eval_shape(tx.init, params)
    shardings = optax8.state_sharding(abstract, params_sharding, memory_kind="pinned_host", min_size=MIN_SIZE)
    plain_shardings = optax8.state_sharding(jax.eval_shape(plain.init, params), params_sharding)
    t = jax.jit(plain.init, out_shardings=plain_shardings)(params)
    s = jax.jit(tx.init, out_shardings=shardings)(params)
    facts["host_leaves"] = sum(x.sharding.memory_kind == "pinned_host" for x in jax.tree.leaves(s))
    facts["misplaced"] += [f"jit init {m}" for m in misplaced(s, t)]
    facts["misplaced"] += [f"eager init {m}" for m in misplaced(tx.init(params), t)]
    # Auto mode: out_shardings carry the outputs' memory kinds, which JAX needs to pair each donated
    # buffer with an output in its own memory; an Explicit mesh's types carry them.
    out_shardings = (params_sharding, shardings, params_sharding) if axis_type == AxisType.Auto else None
    step = jax.jit(step_fn(tx), donate_argnums=(0, 1), out_shardings=out_shardings)
    plain_step = jax.jit(step_fn(plain), donate_argnums=(0, 1))
    p, q = params, jax.device_put(host_params, params_sharding)
    for i, g in enumerate(grads):
      p, s, u = step(p, s, g)
      q, t, v = plain_step(q, t, g)
      facts["misplaced"] += [f"step {i} {m}" for m in misplaced(s, t)]
      facts["differences"] += [f"step {i} updates{k}" for k in differences(u, v)]
      facts["differences"] += [f"step {i} state{k}" for k in differences(s, t)]
    facts["differences"] += [f"params{k}" for k in differences(p, q)]
    if checkpoint is not None:
      import orbax.checkpoint as ocp

      checkpointer = ocp.StandardCheckpointer()
      checkpointer.save(checkpoint, s)
      checkpointer.wait_until_finished()
      target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
      restored = checkpointer.restore(checkpoint, target)
      facts["misplaced"] += [f"restored {m}" for m in misplaced(restored, t)]
      facts["differences"] += [f"restored{k}" for k in differences(restored, s)]
  return facts


def main(out: str, checkpoint: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  facts = {"auto": run(AxisType.Auto, checkpoint), "explicit": run(AxisType.Explicit, None)}
  pathlib.Path(out).write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
  main(*sys.argv[1:])
