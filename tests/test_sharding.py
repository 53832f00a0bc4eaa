"""Sharded and multi-host training: the state sharded like the params, no extra communication.

Every case runs in a fresh process with simulated CPU devices (``sharding_worker.py``): on a
4 x 2 mesh (``fsdp``, ``tp``), parameters sharded FSDP, tensor-parallel, both, or replicated,
in Auto and Explicit mode, with the native kernel and with the reference implementation.
"""

import functools
import json
import os
import pathlib
import platform
import re
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
import sharding_worker as worker

from optax8._src import native_library

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
TIMEOUT_S = 600
# XLA:CPU on FMA hosts contracts a*b+c into one rounding, choosing which products by the
# surrounding fusion, which differs between a program and its partitioned form. The native
# kernel's bits do not depend on it; the reference's are compared with contraction off (as
# test_native.py does).
NO_CONTRACTION = "--xla_cpu_max_isa=AVX" if platform.machine().lower() in ("x86_64", "amd64") else ""
CASES = [f"{case}-{mode}" for case in worker.CASES for mode in worker.MODES]
IMPLEMENTATIONS = list(worker.IMPLEMENTATIONS)


def worker_env(devices: int, flags: str = "") -> dict[str, str]:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {flags}".strip())


def run_worker(out: pathlib.Path, section: str, *args: str, flags: str = "") -> dict:
  command = [sys.executable, str(TESTS / "sharding_worker.py"), section, str(out), *args]
  result = subprocess.run(command, env=worker_env(8, flags), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-6000:]
  return json.loads(out.read_text())


@functools.cache
def measured(section: str, implementation: str) -> dict:
  """What ``section`` measured with ``implementation`` (run once per test session)."""
  flags = NO_CONTRACTION if implementation == "reference" else ""
  with tempfile.TemporaryDirectory() as tmp:
    return run_worker(pathlib.Path(tmp) / "facts.json", section, implementation, flags=flags)


def extra_collectives(facts: dict) -> dict[str, int]:
  ours, theirs = facts["collectives"], facts["counterpart_collectives"]
  return {kind: n - theirs.get(kind, 0) for kind, n in ours.items() if n > theirs.get(kind, 0)}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_sharded_step_communicates_no_more_than_optax_adamw(case, implementation):
  facts = measured("matrix", implementation)[case]
  assert not extra_collectives(facts), facts


@pytest.mark.parametrize("case", CASES)
def test_sharded_step_runs_the_native_kernel(case):
  results = measured("matrix", "native")
  if not results["native_usable"]:
    pytest.skip("the native library is unusable here")
  assert results[case]["custom_call"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_each_device_holds_its_share_of_the_state_from_init_on(case, implementation):
  facts = measured("matrix", implementation)[case]
  assert not facts["init_misplaced"]
  assert not facts.get("eager_init_misplaced")  # Explicit mode: tx.init outside jit
  assert not facts["state_misplaced"]  # after training


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_sharded_training_is_bit_identical_to_one_device(case, implementation):
  assert not measured("matrix", implementation)[case]["differs_from_one_device"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("explicit")])
def test_state_types_are_the_same_after_update_under_sharding_in_types(case, implementation):
  assert not measured("matrix", implementation)[case]["types_changed"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", list(worker.MODES))
def test_update_inside_shard_map_runs_on_each_devices_shard_bit_identically(mode, implementation):
  results = measured("matrix", implementation)
  facts = results[f"shard_map-{mode}"]
  assert not facts["collectives"]
  assert not facts["differs_from_one_device"]
  assert facts["custom_call"] == (implementation == "native" and results["native_usable"])


def test_last_axis_split_into_partial_blocks_warns_once_naming_the_parameter_and_a_block_size_that_fits():
  runs = measured("partial_blocks", "native")
  first, *others = [run["warnings"] for run in runs.values()]
  assert not any(others)
  assert len(first) == 3
  (v,) = [w for w in first if "'v' of shape (32, 300)" in w]
  (w,) = [w for w in first if "'w' of shape (64, 384)" in w]
  (u,) = [w for w in first if "'u' of shape (32, 512)" in w]
  assert "block size 150 would fit" in v and "block size 192 would fit" in w and "block size 128 would fit" in u


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", list(worker.MODES))
def test_last_axis_split_into_partial_blocks_trains_bit_identically(mode, implementation):
  facts = measured("partial_blocks", implementation)[mode]
  assert not facts["differs_from_one_device"]
  assert not facts["types_changed"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", list(worker.MODES))
def test_update_options_add_only_scalar_all_reduces_and_train_as_on_one_device_under_sharding(mode, implementation):
  facts = measured("update_options", implementation)[mode]
  assert not facts["non_scalar_collectives"], facts
  assert 1 <= facts["all_reduces"], facts  # max_unorm's norms and the tensor-wise absmax of sharded tensors
  assert not facts["state_differs_from_one_device"]
  assert facts["params_max_relative_difference"] < 1e-6
  assert facts["custom_call"] == (implementation == "native" and native_library.usable())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", list(worker.MODES))
def test_fused_step_needs_no_communication_and_trains_as_the_unfused_step_on_one_device(mode, implementation):
  facts = measured("fused", implementation)[mode]
  assert not facts["non_scalar_collectives"], facts  # the clip's norm is a scalar all-reduce
  assert not facts["state_differs_from_one_device"]
  assert facts["params_max_relative_difference"] < 1e-6
  assert facts["custom_call"] == (implementation == "native" and native_library.usable())


def test_checkpoint_restores_onto_another_mesh_and_training_continues_bit_identically(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  facts = run_worker(tmp_path / "facts.json", "checkpoint", str(tmp_path / "checkpoint"))
  assert not facts["restored_misplaced"]
  assert not facts["differs_from_unsharded"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_together_bit_identically_to_one(tmp_path):
  port = str(free_port())
  outs = [tmp_path / f"process{i}.json" for i in range(2)]
  workers = [
      subprocess.Popen(
          [sys.executable, str(TESTS / "sharding_worker.py"), "multiprocess", str(out), str(i), port],
          env=worker_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for i, out in enumerate(outs)
  ]
  try:
    logs = [w.communicate(timeout=TIMEOUT_S)[0] for w in workers]
  finally:
    for w in workers:
      w.kill()
  assert all(w.returncode == 0 for w in workers), "\n".join(log[-4000:] for log in logs)
  facts = json.loads(outs[0].read_text())
  assert facts["devices"] == 8 and facts["local_devices"] == 4
  if native_library.usable():
    assert all(facts[f"{mode}-custom_call"] for mode in worker.MODES)
  trained = np.load(f"{outs[0]}.npz")
  tx, params = worker.optimizer(), worker.host_params(worker.PARAMS)
  expected = worker.train(jax.jit(worker.step_fn(tx)), params, tx.init(params), worker.host_grads(worker.PARAMS))
  for mode in worker.MODES:
    for key, value in worker.flat(expected).items():
      np.testing.assert_array_equal(trained[mode + key], value, err_msg=mode + key)


def test_sharded_training_example_shrinks_the_state_each_device_holds():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the example simulates its devices
  command = [sys.executable, "-m", "examples.sharded_training", "--steps", "3"]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-6000:]
  table = re.findall(r"^(adamw8bit|adamw)\s+\S+\s+(\d+)\s+(\d+)\s", result.stdout, re.M)
  per_device = {name: (int(device), int(total)) for name, device, total in table}
  assert per_device["adamw8bit"][0] < 0.5 * per_device["adamw"][0]
  assert per_device["adamw8bit"][0] < per_device["adamw8bit"][1] / 4  # sharded, not replicated
  assert "not whole blocks" not in result.stderr


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_mesh_axis_of_size_one_naming_the_last_axis_trains_bit_identically_with_either_rounding(implementation):
  facts = measured("idioms", implementation)
  assert facts["size_one_axis_rounding_False"] == []
  assert facts["size_one_axis_rounding_True"] == []


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_shard_map_keeps_the_8bit_state_of_a_parameter_whose_shards_are_below_min_8bit_size(implementation):
  facts = measured("idioms", implementation)
  assert facts["small_shards_8bit"]
  assert facts["small_shards_differ"] == []


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_shard_map_refuses_to_return_as_replicated_an_absmax_its_shards_computed_apart(implementation):
  facts = measured("idioms", implementation)
  assert "absmax_block256 is P(None, None)" in facts["partial_blocks_in_shard_map"]
  assert "varying over {tp}" in facts["partial_blocks_in_shard_map"]


def test_state_sharding_of_short_specs_shards_only_what_is_shaped_like_the_parameter():
  facts = measured("idioms", "native")
  specs = facts["short_specs_percentile_clipping"]
  assert specs["[0].history['w']"] == [] and specs["[0].history['v']"] == []
  assert specs["[1][0].mu['w'].codes_signed"] == ["fsdp"] and specs["[1][0].nu['v'].absmax_block256"] == ["fsdp"]
  # optax.adafactor's factored statistics are smaller than their parameters: replicated, not refused.
  assert all(spec == [] for spec in facts["short_specs_adafactor"].values())
