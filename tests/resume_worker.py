"""Training steps shared by the resume test and the fresh process it starts.

Run as a script: restores every checkpoint under a folder from ``jax.eval_shape(tx.init, ...)``,
trains more steps and writes the resulting trees to an ``.npz`` file.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from cases import CASES_BY_NAME

SHAPES = {"w": (64, 300), "b": (300,)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def optimizer(name):
  case = CASES_BY_NAME[name]
  return case.make(case.lr, min_8bit_size=256)


def initial_params(dtype):
  keys = jax.random.split(jax.random.key(0), len(SHAPES))
  return {k: (jax.random.normal(key, s) * 0.1).astype(dtype) for key, (k, s) in zip(keys, SHAPES.items())}


def train(tx, params, state, start, steps):
  """``steps`` steps whose gradients depend only on the step index.

  Op by op rather than jitted: the tests run every optimizer on the same small shapes, so the
  operations compile once and are shared, where a jitted step would compile per optimizer.
  """

  def step(params, state, i):
    grads = {k: (jax.random.normal(jax.random.fold_in(jax.random.key(1), i), p.shape) * 0.01).astype(p.dtype)
             for k, p in params.items()}
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(start, start + steps):
    params, state = step(params, state, i)
  return params, state


def flat(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(leaf.astype(jnp.float32) if leaf.dtype == jnp.bfloat16 else leaf)
          for path, leaf in leaves}


def main(folder, steps, start):
  checkpointer = ocp.StandardCheckpointer()
  results = {}
  for path in sorted(pathlib.Path(folder).iterdir()):
    name, dtype = path.name.rsplit("-", 1)
    tx, params = optimizer(name), initial_params(DTYPES[dtype])
    abstract = {"params": jax.eval_shape(lambda p: p, params), "state": jax.eval_shape(tx.init, params)}
    restored = checkpointer.restore(path.absolute(), abstract)
    params, state = train(tx, restored["params"], restored["state"], start, steps)
    results.update({f"{path.name}{k}": v for k, v in flat({"params": params, "state": state}).items()})
  return results


if __name__ == "__main__":
  folder, out, steps, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
  np.savez(out, **main(folder, steps, start))
