"""The CUDA kernel against the reference and the CPU kernel on a GPU, and its build.

The GPU tests run where JAX has a CUDA device and are skipped elsewhere. The CPU kernel and the
CUDA kernel compute every operation alike, so their codes and absmax are compared bit for bit;
XLA:CPU flushes subnormal floats to zero where XLA:GPU keeps them, so those comparisons use
inputs without subnormals. The reference on the GPU is compared bit for bit unless XLA:GPU
fuses multiply-adds, which moves a moment by its last bit (and so a code by at most one step).
``test_build_included_the_cuda_kernel`` runs everywhere: wherever nvcc is on PATH the install
must have built the CUDA library.
"""

import ctypes
import functools
import os
import shutil
import subprocess
import sys

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_native
from cases import CASES

import optax8
from optax8._src import moments as moments_lib
from optax8._src import native_call, native_library, update_math
from optax8._src import quantization as qz

TARGET = native_library.TARGET
FAMILIES = test_native.FAMILIES
# Set in the subprocess that reruns this file without command buffers.
NO_COMMAND_BUFFERS_ENV = "OPTAX8_TEST_NO_COMMAND_BUFFERS"


def cuda_devices():
  try:
    return jax.devices("cuda")
  except RuntimeError:
    return []


GPUS = cuda_devices()
gpu = pytest.mark.skipif(not GPUS, reason="needs a CUDA GPU")


def build_disabled():
  return any(os.environ.get(name, "").upper() == "OFF" for name in ("OPTAX8_CUDA", "OPTAX8_NATIVE"))


@pytest.mark.skipif(shutil.which("nvcc") is None or build_disabled(),
                    reason="the CUDA kernel is built only where nvcc is found and OPTAX8_CUDA is not OFF")
def test_build_included_the_cuda_kernel():
  path = native_library.library_path("cuda")
  assert path.is_file(), f"nvcc is on PATH but the install has no {path.name}"
  # It loads without a GPU (the CUDA runtime is linked in statically) and was compiled against
  # the same XLA FFI headers as the CPU kernel.
  library = ctypes.CDLL(str(path))
  version = library.Optax8CudaFfiApiVersion()
  cpu_path = native_library.library_path("cpu")
  if cpu_path.is_file():
    assert version == ctypes.CDLL(str(cpu_path)).Optax8FfiApiVersion()


def contracts_multiply_add(device):
  """Whether XLA fuses a*b+c into one rounding on ``device``."""
  a, c = jax.device_put((np.float32(1 + 2**-12), np.float32(-(1 + 2**-11))), device)
  return float(jax.jit(lambda a, c: a * a + c)(a, c)) != 0.0  # the unfused result is exactly 0


@pytest.fixture(scope="module")
def gpu_contracts():
  assert native_library.usable("cuda"), "the CUDA library did not load"
  return contracts_multiply_add(GPUS[0])


def run_on(device, update, family, static, g, moments, scalars):
  """One leaf update, compiled for and run on ``device``."""
  args = jax.device_put((g, moments, scalars), device)
  return jax.jit(functools.partial(update, family, static))(*args)


def without_subnormals(g):
  """``g`` with its subnormal elements zeroed, as XLA:CPU reads them."""
  x = np.asarray(g, np.float32)
  return jnp.asarray(np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)).astype(g.dtype)


def cancellation_atol(u_ref):
  """An absolute update tolerance against XLA:GPU's reference: XLA may reassociate or fuse its
  update expression, and where the expression's terms cancel (Nesterov, AdEMAMix) a last-bit
  difference in a term is a larger relative one in a small update."""
  return 1e-6 * float(np.nanmax(np.abs(np.asarray(u_ref, np.float32)), initial=0.0))


def assert_close(kernel, reference, rtol):
  """Moments equal up to a last bit (codes to one step, rarely); updates to ``rtol``-ish."""
  (u_kernel, m_kernel), (u_ref, m_ref) = kernel, reference
  for a, b in zip(m_kernel, m_ref):
    codes = np.asarray(a.codes, np.int32) - np.asarray(b.codes, np.int32)
    assert np.abs(codes).max(initial=0) <= 1 and np.mean(codes != 0) < 1e-3
    np.testing.assert_allclose(a.absmax, b.absmax, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(u_kernel, np.float32), np.asarray(u_ref, np.float32),
                             rtol=max(rtol, 1e-5), atol=cancellation_atol(u_ref))


LEAF_CASES = {
    **test_native.PARITY_CASES,
    # Blocks longer than the kernel's chunk of 256, with ragged last chunks and blocks.
    "long_blocks": ("adam", (3, 1000), jnp.float32, 1000),
    "long_ragged_blocks": ("ademamix", (2, 2500), jnp.bfloat16, 1024),
    "long_blocks_f16": ("rmsprop_01", (2, 3000), jnp.float16, 512),
    # Blocks shorter than a warp.
    "tiny_blocks": ("lion", (5, 77), jnp.float16, 7),
    "unit_blocks": ("momentum_nesterov", (4, 33), jnp.float32, 1),
    "adagrad_bf16": ("adagrad", (6, 700), jnp.bfloat16, 64),
}


def leaf_case(key):
  name, shape, dtype, block_size = LEAF_CASES[key]
  return test_native.leaf_case(name, shape, dtype, block_size)


@gpu
@pytest.mark.parametrize("key", sorted(LEAF_CASES))
def test_cuda_kernel_equals_cpu_kernel(key):
  assert native_library.usable("cuda") and native_library.usable("cpu")
  family, static, g, moments, scalars = leaf_case(key)
  g = without_subnormals(g)
  cuda = run_on(GPUS[0], native_call.update, family, static, g, moments, scalars)
  cpu = run_on(jax.devices("cpu")[0], native_call.update, family, static, g, moments, scalars)
  test_native.assert_same(cuda, cpu, rtol=test_native.update_rtol(g.dtype))


@gpu
@pytest.mark.parametrize("key", sorted(LEAF_CASES))
def test_cuda_kernel_equals_reference_on_gpu(key, gpu_contracts):
  family, static, g, moments, scalars = leaf_case(key)  # subnormal gradient elements included
  kernel = run_on(GPUS[0], native_call.update, family, static, g, moments, scalars)
  reference = run_on(GPUS[0], moments_lib.reference_leaf_update, family, static, g, moments, scalars)
  if gpu_contracts:
    assert_close(kernel, reference, test_native.update_rtol(g.dtype))
  else:
    test_native.assert_same(kernel, reference, rtol=test_native.update_rtol(g.dtype),
                            atol=cancellation_atol(reference[0]))


@gpu
def test_all_zero_and_non_finite_blocks():
  family, static, hyper = FAMILIES["adam"]
  shape, block_size = (4, 512), 128
  moments = [qz.quantize_blockwise(jnp.zeros(shape), block_size, signed=s) for s in family.signed]
  g = np.zeros(shape, np.float32)
  g[1, :] = np.nan  # a whole row of non-finite elements
  g[2, 5], g[2, 300] = np.inf, -np.inf
  g[3, 130:200] = 0.5
  scalars = family.scalars(jnp.int32(1), **hyper)
  update, (m, v) = run_on(GPUS[0], native_call.update, family, static, jnp.asarray(g), moments, scalars)
  update, m, v = np.asarray(update), jax.device_get(m), jax.device_get(v)
  assert np.all(np.isfinite(update)) and np.all(update[:3] == 0) and np.all(update[3, :128] == 0)
  assert np.all(np.asarray(m.absmax)[:3] == 0) and np.all(np.asarray(v.absmax)[:3] == 0)
  assert np.asarray(m.absmax)[3, 1] > 0 and np.asarray(v.absmax)[3, 1] > 0
  cpu = run_on(jax.devices("cpu")[0], native_call.update, family, static, jnp.asarray(g), moments, scalars)
  test_native.assert_same((update, [m, v]), cpu)


@gpu
@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(case=test_native.random_leaf_cases(block_sizes=(1, 7, 32, 64, 256, 300, 1000)))
def test_hypothesis_cuda_kernel_equals_cpu_kernel(case):
  family, static, g, moments, scalars = case
  g = without_subnormals(g)
  cuda = run_on(GPUS[0], native_call.update, family, static, g, moments, scalars)
  cpu = run_on(jax.devices("cpu")[0], native_call.update, family, static, g, moments, scalars)
  test_native.assert_same(cuda, cpu, rtol=test_native.update_rtol(g.dtype))


@gpu
@pytest.mark.parametrize("batched_scalars", [False, True])
def test_vmap(batched_scalars):
  family, static, _ = FAMILIES["adam"]
  rng = np.random.default_rng(2)
  gs = jnp.stack([without_subnormals(test_native.random_gradient(rng, (3, 200), jnp.float32, 64))
                  for _ in range(4)])
  ms = [jax.tree.map(lambda *x: jnp.stack(x), *ms)
        for ms in zip(*(test_native.random_moments(rng, family, (3, 200), 64) for _ in range(4)))]
  b1 = jnp.array([0.9, 0.8, 0.7, 0.95]) if batched_scalars else jnp.float32(0.9)
  scalars_of = lambda b1: family.scalars(jnp.int32(5), b1=b1, b2=0.999, eps=1e-8, eps_root=0.0)

  def run(device):
    update = lambda g, m, b1: native_call.update(family, static, g, m, scalars_of(b1))
    fn = jax.jit(jax.vmap(update, in_axes=(0, 0, 0 if batched_scalars else None)))
    args = jax.device_put((gs, ms, b1), device)
    assert TARGET in fn.lower(*args).as_text()
    return fn(*args)

  assert native_library.usable("cuda")
  test_native.assert_same(run(GPUS[0]), run(jax.devices("cpu")[0]))


@gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_optimizers_match_the_cpu_kernel_over_steps(case):
  """Every optimizer, several steps: the same state on GPU and CPU (LARS's trust ratio, a
  reduction before its kernel, may round differently; its state is compared to one code step)."""
  params = {"w": jnp.ones((16, 700)), "v": jnp.linspace(-1.0, 1.0, 5000)}
  rng = np.random.default_rng(3)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params) for _ in range(3)]
  tx = case.make(case.lr, block_size=128)
  results = {}
  for device in (GPUS[0], jax.devices("cpu")[0]):
    state, update = jax.device_put(tx.init(params), device), jax.jit(tx.update)
    p = jax.device_put(params, device)
    assert TARGET in update.lower(jax.device_put(grads[0], device), state, p).as_text()
    for g in grads:
      u, state = update(jax.device_put(g, device), state, p)
    results[device.platform] = (u, state)
  (u_gpu, s_gpu), (u_cpu, s_cpu) = results["gpu"], results["cpu"]
  for a, b in zip(jax.tree.leaves(s_gpu), jax.tree.leaves(s_cpu)):
    a, b = np.asarray(a), np.asarray(b)
    if case.name == "lars" and a.dtype == np.uint8:
      diff = a.astype(np.int32) - b.astype(np.int32)
      assert np.abs(diff).max(initial=0) <= 1 and np.mean(diff != 0) < 1e-3
    elif case.name == "lars":
      np.testing.assert_allclose(a, b, rtol=1e-6)
    else:
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(u_gpu), jax.tree.leaves(u_cpu)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def train_step(tx):
  def step(params, state, target):
    grads = jax.grad(lambda p: 0.5 * sum(jnp.sum((x - target) ** 2) for x in jax.tree.leaves(p)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


@gpu
def test_donated_step_updates_the_state_in_place():
  params = jax.device_put({"w": jnp.ones((256, 1024)), "u": jnp.ones((64, 4096), jnp.bfloat16)}, GPUS[0])
  tx = optax8.adam8bit(1e-3)
  state = jax.device_put(tx.init(params), GPUS[0])
  target = jax.device_put(jnp.full((), 0.5), GPUS[0])
  compiled = train_step(tx).lower(params, state, target).compile()
  calls = [line for line in compiled.as_text().splitlines() if TARGET in line and "custom-call" in line]
  assert len(calls) == 2 and all("output_to_operand_aliasing" in line for line in calls), calls
  mu = state[0].mu["w"]
  before = mu.codes.unsafe_buffer_pointer(), mu.absmax.unsafe_buffer_pointer()
  for _ in range(3):
    params, state = compiled(params, state, target)
  after = state[0].mu["w"]
  assert (after.codes.unsafe_buffer_pointer(), after.absmax.unsafe_buffer_pointer()) == before
  assert mu.codes.is_deleted()
  # Three steps towards the target, as the reference takes them.
  optax8.set_implementation("reference")
  p_ref = jax.device_put({"w": jnp.ones((256, 1024)), "u": jnp.ones((64, 4096), jnp.bfloat16)}, GPUS[0])
  s_ref = jax.device_put(tx.init(p_ref), GPUS[0])
  for _ in range(3):
    p_ref, s_ref = train_step(tx)(p_ref, s_ref, target)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2)


@gpu
def test_the_cuda_platform_gets_the_kernel():
  assert native_library.usable("cuda")
  tx = optax8.adam8bit(1e-3)
  params = {"w": jnp.ones((8, 512))}
  allow = [jax.export.DisabledSafetyCheck.custom_call(TARGET)]
  exported = jax.export.export(jax.jit(tx.update), platforms=["cuda"], disabled_checks=allow)
  assert TARGET in exported(params, tx.init(params), params).mlir_module()


@gpu
def test_bad_attributes_are_errors_not_crashes():
  family, static, g, moments, scalars = test_native.leaf_case("momentum", (4, 256))
  hp = jnp.stack([jnp.asarray(scalars[name], jnp.float32) for name in update_math.MOMENTUM.scalar_names])
  state = [moments[0].codes, moments[0].absmax]
  types = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (g, *state)]
  call = lambda **attributes: jax.ffi.ffi_call(TARGET, types)(*jax.device_put((g, hp, *state), GPUS[0]), **attributes)
  good = dict(family="momentum", block_size=np.int64(128), flags=np.int64(0), signed=np.int64(1))
  jax.block_until_ready(call(**good))
  for bad, message in [({"family": "nope"}, "unknown family"), ({"flags": np.int64(2)}, "flags not supported"),
                       ({"signed": np.int64(0)}, "wrong maps"), ({"block_size": np.int64(0)}, "block size"),
                       ({"block_size": np.int64(64)}, "state shapes")]:
    with pytest.raises(Exception, match=message):
      jax.block_until_ready(call(**{**good, **bad}))


@gpu
@pytest.mark.slow
def test_more_than_two_to_the_31_elements():
  """64-bit indexing: past element 2^31, the update equals the same rows updated on their own."""
  family, static, hyper = FAMILIES["momentum"]
  rows, columns, block_size = 2**31 // 4096 + 2, 4096, 256
  keys = jax.random.split(jax.random.key(0), 3)
  update_fn = jax.jit(functools.partial(native_call.update, family, static))
  with jax.default_device(GPUS[0]):
    g = jax.random.normal(keys[0], (rows, columns), jnp.bfloat16)
    codes = jax.random.randint(keys[1], (rows, columns), 0, 256, jnp.int32).astype(jnp.uint8)
    absmax = jax.random.uniform(keys[2], (rows, columns // block_size))
    scalars = family.scalars(jnp.int32(3), **hyper)
    tail = slice(rows - 3, rows)
    expected_u, (expected_m,) = update_fn(
        g[tail], [qz.QuantizedArray(codes[tail], absmax[tail], block_size, True)], scalars)
    update, (new_m,) = update_fn(g, [qz.QuantizedArray(codes, absmax, block_size, True)], scalars)
    got_u, got_codes, got_absmax = update[tail], new_m.codes[tail], new_m.absmax[tail]
  np.testing.assert_array_equal(np.asarray(got_codes), np.asarray(expected_m.codes))
  np.testing.assert_array_equal(np.asarray(got_absmax), np.asarray(expected_m.absmax))
  np.testing.assert_array_equal(np.asarray(got_u, np.float32), np.asarray(expected_u, np.float32))


@gpu
def test_without_command_buffers():
  """This file's leaf, vmap and donation tests again, with XLA's command buffers (CUDA graphs) off."""
  if os.environ.get(NO_COMMAND_BUFFERS_ENV):
    pytest.skip("this is the run without command buffers")
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer=".strip()
  env = dict(os.environ, XLA_FLAGS=flags, **{NO_COMMAND_BUFFERS_ENV: "1"})
  command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
             "-k", "cpu_kernel or vmap or donated or zero", "-W", "ignore::pytest.PytestAssertRewriteWarning",
             __file__]
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-6000:]
