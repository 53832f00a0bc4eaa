"""Calls a serialized exported function in a fresh process, as a deployment would.

``python export_worker.py FOLDER [--register-kernels]`` reads ``exported.bin`` and
``inputs.npz`` (the flat arguments) from FOLDER, rebuilds the arguments with the function's own
``in_tree``, calls it and writes ``outputs.npz`` (the flat results) and ``out_tree.txt``. The
process traces no optax8 update, so the call compiles only if deserializing (or
``optax8.register_kernels()``, called first with ``--register-kernels``) registered the kernel.
"""

import pathlib
import sys

import jax
import numpy as np

import optax8  # registers the serialization of optax8's state types
from optax8._src import native_library


def main(folder, register_kernels=False):
  folder = pathlib.Path(folder)
  assert not native_library._problems, "importing optax8 loaded a kernel"
  if register_kernels:
    optax8.register_kernels()
  exported = jax.export.deserialize(bytearray((folder / "exported.bin").read_bytes()))
  with np.load(folder / "inputs.npz") as inputs:
    leaves = [inputs[f"leaf{i}"] for i in range(len(inputs.files))]
  args, kwargs = jax.tree.unflatten(exported.in_tree, leaves)
  results = exported.call(*args, **kwargs)
  np.savez(folder / "outputs.npz", **{f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(results))})
  (folder / "out_tree.txt").write_text(str(jax.tree.structure(results)))


if __name__ == "__main__":
  main(sys.argv[1], register_kernels="--register-kernels" in sys.argv[2:])
