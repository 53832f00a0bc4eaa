"""The native CPU kernel against the pure-JAX reference, and its loading, dispatch and build."""

import functools
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import warnings

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import optax8
from optax8._src import moments as moments_lib
from optax8._src import native, native_call, native_library, update_math
from optax8._src import quantization as qz

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = native_library.TARGET


def xla_contracts_multiply_add() -> bool:
  """Whether XLA:CPU fuses a*b+c into one rounding here (it does on hosts with FMA)."""
  a, c = np.float32(1 + 2**-12), np.float32(-(1 + 2**-11))
  return float(jax.jit(lambda a, c: a * a + c)(a, c)) != 0.0  # the unfused result is exactly 0


# The kernel rounds every operation to float32, as the reference does where XLA does not
# contract a*b+c. Where XLA contracts, it picks the fused product from the surrounding fusion
# (the gradient's dtype, padding, ...), so bit parity is tested with contraction off:
# test_every_instruction_set_is_bit_identical_to_the_reference_without_contraction reruns the
# parity tests with --xla_cpu_max_isa=AVX, once per instruction set of the CPU kernel.
NO_CONTRACTION_FLAG = "--xla_cpu_max_isa=AVX"
parity = pytest.mark.skipif(
    xla_contracts_multiply_add(),
    reason="run by test_every_instruction_set_is_bit_identical_to_the_reference_without_contraction",
)

# family, static options, hyperparameters.
FAMILIES = {
    "adam": (update_math.ADAM, {"nesterov": False}, dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0)),
    "adam_nesterov": (update_math.ADAM, {"nesterov": True}, dict(b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9)),
    "momentum": (update_math.MOMENTUM, {"nesterov": False}, dict(decay=0.9)),
    "momentum_nesterov": (update_math.MOMENTUM, {"nesterov": True}, dict(decay=0.7)),
    "lion": (update_math.LION, {}, dict(b1=0.9, b2=0.99)),
    **{
        f"rmsprop_{sqrt:d}{correct:d}": (
            update_math.RMSPROP,
            {"eps_in_sqrt": sqrt, "bias_correction": correct},
            dict(decay=0.9, eps=1e-6, initial_scale=0.0),
        )
        for sqrt in (False, True)
        for correct in (False, True)
    },
    "adagrad": (update_math.ADAGRAD, {}, dict(eps=1e-7, initial_accumulator_value=0.1)),
    "ademamix": (
        update_math.ADEMAMIX,
        {},
        dict(b1=0.9, b2=0.999, b3=0.9999, alpha=5.0, eps=1e-8, eps_root=0.0),
    ),
}
# skip_zeros, a flag of every family's kernel.
FAMILIES.update({
    f"{name}_skip": (family, {**static, "skip_zeros": True}, hyper)
    for name, (family, static, hyper) in list(FAMILIES.items())
    if name in ("adam_nesterov", "momentum", "lion", "rmsprop_11", "adagrad", "ademamix")
})


def random_moments(rng, family, shape, block_size):
  """Quantized moments with realistic signs, and an all-zero first block."""
  out = []
  for signed in family.signed:
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(rng.uniform(1e-4, 10.0))
    if not signed:
      x = x * x
    x[..., :block_size] = 0.0
    out.append(qz.quantize_blockwise(jnp.asarray(x), block_size, signed=signed))
  return out


def random_gradient(rng, shape, dtype, block_size):
  """A gradient with non-finite, subnormal and zero elements.

  Zero where the moments' first block is, in the second block of each row (whose moments are
  not zero: skip_zeros keeps such a block as it is), and at random places.
  """
  g = rng.standard_normal(shape).astype(np.float32) * np.float32(0.1)
  g[..., :block_size] = 0.0
  g[..., block_size:2 * block_size] = 0.0
  flat = g.reshape(-1)
  n = flat.size
  flat[rng.integers(0, n, max(1, n // 20))] = 0.0
  flat[rng.integers(0, n, 4)] = np.nan
  flat[rng.integers(0, n, 2)] = np.inf
  flat[rng.integers(0, n, 2)] = -np.inf
  flat[rng.integers(0, n, 2)] = 1e-40  # a float32 subnormal: XLA flushes it to zero
  return jnp.asarray(g).astype(dtype)


def both(family, static, g, moments, scalars):
  """(kernel, reference) results of one leaf update, each compiled on its own."""
  assert native_library.usable(), "the native library did not load"
  run = lambda update: jax.jit(functools.partial(update, family, static))(g, moments, scalars)
  return run(native_call.update), run(moments_lib.reference_leaf_update)


def assert_same(kernel, reference, rtol=2e-6, atol=1e-30):
  """Codes and absmax identical; updates to ``rtol`` (and ``atol``)."""
  (u_kernel, m_kernel), (u_ref, m_ref) = kernel, reference
  for a, b in zip(m_kernel, m_ref):
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    np.testing.assert_array_equal(np.asarray(a.absmax), np.asarray(b.absmax))
  assert u_kernel.dtype == u_ref.dtype and u_kernel.shape == u_ref.shape
  np.testing.assert_allclose(
      np.asarray(u_kernel, np.float32), np.asarray(u_ref, np.float32), rtol=rtol, atol=atol
  )


def leaf_case(name, shape, dtype=jnp.float32, block_size=128, count=3, seed=0):
  family, static, hyper = FAMILIES[name]
  rng = np.random.default_rng(seed)
  moments = random_moments(rng, family, shape, block_size)
  g = random_gradient(rng, shape, dtype, block_size)
  return family, static, g, moments, family.scalars(jnp.int32(count), **hyper)


def test_kernel_is_close_to_the_reference_where_xla_contracts():
  """Wherever XLA fuses multiply-adds, the moments agree to a last bit, so codes to one step."""
  kernel, reference = both(*leaf_case("adam", (16, 1000), block_size=256))
  for a, b in zip(kernel[1], reference[1]):
    codes = np.asarray(a.codes, np.int32) - np.asarray(b.codes, np.int32)
    assert np.abs(codes).max() <= 1 and np.mean(codes != 0) < 1e-3
    np.testing.assert_allclose(a.absmax, b.absmax, rtol=3e-7)
  # Where b1*m and (1-b1)*g nearly cancel, a last-bit difference is large relative to m.
  np.testing.assert_allclose(kernel[0], reference[0], rtol=1e-5, atol=1e-6 * float(np.abs(reference[0]).max()))


PARITY_CASES = {
    # Every family and static option.
    **{name: (name, (2, 3, 300), jnp.float32, 128) for name in FAMILIES},
    # Gradient dtypes.
    "adam_bf16": ("adam", (4, 500), jnp.bfloat16, 128),
    "adam_f16": ("adam", (4, 500), jnp.float16, 128),
    "rmsprop_11_bf16": ("rmsprop_11", (4, 500), jnp.bfloat16, 128),
    "momentum_f16": ("momentum", (4, 500), jnp.float16, 128),
    # Ranks 1 to 4, ragged rows, rows shorter than a block, block sizes.
    "rank1": ("momentum", (1000,), jnp.float32, 64),
    "rank2_ragged": ("momentum", (7, 33), jnp.float32, 32),
    "short_rows": ("adam", (5, 100), jnp.float32, 256),
    "rank3_three_moments": ("ademamix", (2, 3, 257), jnp.float32, 256),
    "rank4": ("momentum", (2, 2, 3, 130), jnp.float32, 64),
    "one_big_block": ("momentum", (4096,), jnp.float32, 4096),
    "one_column": ("lion", (3, 1), jnp.float32, 8),
}


@parity
def test_parity_families_dtypes_shapes_and_block_sizes():
  cases = {key: leaf_case(name, shape, dtype, block_size) for key, (name, shape, dtype, block_size)
           in PARITY_CASES.items()}
  # A gradient whose square overflows resets the element like a non-finite one.
  family, static, g, moments, scalars = leaf_case("adam", (2, 256))
  cases["overflow"] = (family, static, g.at[0, 200].set(1e30), moments, scalars)
  results = {key: both(*case) for key, case in cases.items()}
  failures = []
  for key, (kernel, reference) in results.items():
    dtype = jnp.dtype(kernel[0].dtype)
    try:
      # The float32 updates agree to rsqrt's last bits; rounding to a 16-bit dtype may move one ulp.
      assert_same(kernel, reference, rtol=update_rtol(dtype))
    except AssertionError as e:
      failures.append(f"{key}: {e}")
  assert not failures, "\n".join(failures)
  reference_update, (_, v) = results["overflow"][1]
  assert reference_update[0, 200] == 0 and v.codes[0, 200] == 0


@parity
def test_parity_several_steps_of_optimizers():
  params = {"w": jnp.ones((16, 700)), "v": jnp.ones((5000,)), "small": jnp.ones((10,))}
  optimizers = {
      "adam": optax8.adam8bit(1e-2),
      "nesterov": optax8.sgd8bit(1e-2, momentum=0.9, nesterov=True),
      "adamw": optax8.adamw8bit(1e-2, weight_decay=0.1, block_size=64),
  }
  rng = np.random.default_rng(1)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params) for _ in range(4)]
  for name, tx in optimizers.items():
    results = {}
    for impl in ("native", "reference"):
      native.set_implementation(impl)
      state, update = tx.init(params), jax.jit(tx.update)
      for g in grads:
        u, state = update(g, state, params)
      results[impl] = (u, state)
    # Identical states; updates equal to float32 rounding.
    (u_native, state_native), (u_ref, state_ref) = results["native"], results["reference"]
    for a, b in zip(jax.tree.leaves(state_native), jax.tree.leaves(state_ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    for a, b in zip(jax.tree.leaves(u_native), jax.tree.leaves(u_ref)):
      np.testing.assert_allclose(a, b, rtol=2e-6, err_msg=name)


@parity
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["adam", "momentum", "lion"])
def test_parity_skip_zeros_treats_a_subnormal_gradient_as_zero(name, dtype):
  # XLA:CPU computes with subnormals as zeros; whether a bit test or a float comparison decides
  # `touched` must not matter, in the kernels or in the reference.
  family, static, g, moments, scalars = leaf_case(name, (4, 55), dtype, block_size=7)
  g = g.at[0, 7:14].set(0).at[0, 10].set(jnp.asarray(1e-40, jnp.float32).astype(dtype))
  assert 0 < abs(float(g[0, 10])) < np.finfo(np.float32).tiny  # subnormal in this dtype too
  kernel, reference = both(family, {**static, "skip_zeros": True}, g, moments, scalars)
  assert_same(kernel, reference, rtol=update_rtol(dtype))
  for before, after in zip(moments, kernel[1]):  # the block of zeros and a subnormal kept its state
    np.testing.assert_array_equal(after.codes[0, 7:14], before.codes[0, 7:14])
    assert after.absmax[0, 1] == before.absmax[0, 1]
  assert np.all(np.asarray(kernel[0][0, 7:14], np.float32) == 0)


HYPERPARAMETER_RANGES = {  # what each randomised hyperparameter may be
    "b1": (0.0, 0.99), "b2": (0.5, 0.9999), "b3": (0.9, 0.9999), "decay": (0.0, 0.99),
    "eps": (1e-10, 1e-3), "eps_root": (0.0, 1e-6), "alpha": (0.0, 10.0),
}


def update_rtol(dtype):
  """How far a kernel's update may be from another implementation's, in ``dtype``."""
  return 2e-6 if jnp.dtype(dtype) == jnp.float32 else float(jnp.finfo(dtype).eps)


@st.composite
def random_leaf_cases(draw, block_sizes=(1, 7, 32, 64, 256, 1000)):
  """A random parameter's update: (family, static, g, moments, scalars), any family and dtype."""
  name = draw(st.sampled_from(sorted(FAMILIES)))
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=70).filter(
      lambda s: np.prod(s) <= 30_000))
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
  block_size = draw(st.sampled_from(block_sizes))
  family, static, hyper = FAMILIES[name]
  drawn = {k: draw(st.floats(lo, hi)) for k, (lo, hi) in HYPERPARAMETER_RANGES.items()}
  hyper = {k: drawn.get(k, v) for k, v in hyper.items()}
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  moments = random_moments(rng, family, shape, block_size)
  g = random_gradient(rng, shape, dtype, block_size)
  return family, static, g, moments, family.scalars(jnp.int32(draw(st.integers(1, 1000))), **hyper)


@parity
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(case=random_leaf_cases())
def test_parity_random_shapes_dtypes_block_sizes_and_hyperparameters(case):
  assert_same(*both(*case), rtol=update_rtol(case[2].dtype))


@parity
@pytest.mark.parametrize("batched_scalars", [False, True])
def test_parity_vmap(batched_scalars):
  family, static, _, _, _ = leaf_case("adam", (3, 200))
  rng = np.random.default_rng(2)
  gs = jnp.stack([random_gradient(rng, (3, 200), jnp.float32, 64) for _ in range(4)])
  ms = [jax.tree.map(lambda *x: jnp.stack(x), *ms) for ms in zip(*(random_moments(rng, family, (3, 200), 64)
                                                                     for _ in range(4)))]
  b1 = jnp.array([0.9, 0.8, 0.7, 0.95]) if batched_scalars else jnp.float32(0.9)
  scalars_of = lambda b1: family.scalars(jnp.int32(5), b1=b1, b2=0.999, eps=1e-8, eps_root=0.0)

  def run(fn):
    update = lambda g, m, b1: fn(family, static, g, m, scalars_of(b1))
    return jax.jit(jax.vmap(update, in_axes=(0, 0, 0 if batched_scalars else None)))(gs, ms, b1)

  assert native_library.usable()
  kernel = run(native_call.update)
  assert TARGET in jax.jit(jax.vmap(lambda g, m: native_call.update(
      family, static, g, m, scalars_of(0.9)))).lower(gs, ms).as_text()
  assert_same(kernel, run(moments_lib.reference_leaf_update))


def train_step(tx):
  def step(params, state, target):
    grads = jax.grad(lambda p: 0.5 * jnp.sum((p["w"] - target) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def test_donated_step_updates_in_place_without_float32_temporaries():
  params = {"w": jnp.ones((256, 1024))}
  param_bytes = 256 * 1024 * 4
  tx = optax8.adam8bit(1e-3)
  state = tx.init(params)
  target = jnp.full((256, 1024), 0.5)
  compiled = train_step(tx).lower(params, state, target).compile()
  assert TARGET in compiled.as_text()
  stats = compiled.memory_analysis()
  # The only full-size temporary is the gradient, which the update overwrites in place.
  assert stats.temp_size_in_bytes <= param_bytes + 1024
  assert stats.alias_size_in_bytes >= param_bytes + qz.state_bytes(state) - 4  # all but the count
  optax8.set_implementation("reference")
  reference = train_step(tx).lower(params, state, target).compile().memory_analysis()
  assert reference.temp_size_in_bytes > 2 * param_bytes
  mu = state[0].mu["w"]
  before = mu.codes.unsafe_buffer_pointer(), mu.absmax.unsafe_buffer_pointer()
  params, state = compiled(params, state, target)
  after = state[0].mu["w"]
  assert (after.codes.unsafe_buffer_pointer(), after.absmax.unsafe_buffer_pointer()) == before
  assert mu.codes.is_deleted()


def test_changing_hyperparameters_does_not_recompile():
  tx = optax.inject_hyperparams(optax8.adam8bit)(learning_rate=1e-3, b1=0.9, b2=0.999)
  params = {"w": jnp.ones((8, 512))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  g = {"w": jnp.linspace(-1.0, 1.0, 8 * 512).reshape(8, 512)}
  for b1, b2 in [(0.9, 0.999), (0.5, 0.9), (0.0, 0.5)]:
    state.hyperparams["b1"], state.hyperparams["b2"] = jnp.float32(b1), jnp.float32(b2)
    native.set_implementation("native")
    u_kernel, _ = update(g, state)
    native.set_implementation("reference")
    u_ref, _ = jax.jit(tx.update)(g, state)
    np.testing.assert_allclose(u_kernel["w"], u_ref["w"], rtol=2e-6)
  # One trace per implementation (JAX shares it between jax.jit objects of one function).
  assert update._cache_size() == 2


def test_platform_picks_the_implementation():
  tx = optax8.adam8bit(1e-3)
  params = {"w": jnp.ones((8, 512))}
  state = tx.init(params)

  def exported(platforms):
    allow = [jax.export.DisabledSafetyCheck.custom_call(TARGET)]
    return jax.export.export(jax.jit(tx.update), platforms=platforms, disabled_checks=allow)(params, state)

  assert TARGET in exported(["cpu"]).mlir_module()
  # CUDA runs the kernel only where its library is registered (a machine with a CUDA backend).
  assert (TARGET in exported(["cuda"]).mlir_module()) == native_library.usable("cuda")
  assert TARGET not in exported(["tpu"]).mlir_module()


def test_the_reference_is_traced_only_for_platforms_without_a_kernel(monkeypatch):
  reference, traced = moments_lib.reference_leaf_update, []
  monkeypatch.setattr(moments_lib, "reference_leaf_update", lambda *args: traced.append(1) or reference(*args))
  tx = optax8.adam8bit(1e-3)
  params = {"w": jnp.ones((3, 8, 512))}
  state = jax.vmap(tx.init)(params)
  update = jax.jit(jax.vmap(tx.update))
  update.lower(params, state)
  assert not traced
  assert TARGET not in jax.export.export(update, platforms=["tpu"])(params, state).mlir_module() and traced
  # There the default branch computes the reference's results (here on the CPU), under vmap too.
  family, static, hyper = FAMILIES["adam"]
  g = jnp.linspace(-1.0, 1.0, 3 * 8 * 512).reshape(3, 8, 512)
  moments = [jax.vmap(lambda x, s=signed: qz.quantize_blockwise(x, 256, signed=s))(g * 0.1) for signed in family.signed]
  scalars = family.scalars(jnp.int32(2), **hyper)
  branch = functools.partial(native._staged_reference, functools.partial(reference, family, static))
  want = jax.jit(jax.vmap(functools.partial(reference, family, static), (0, 0, None)))(g, moments, scalars)
  got = jax.jit(jax.vmap(branch, (0, 0, None)))(g, moments, scalars)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))


@pytest.mark.parametrize("how", ["function", "environment"])
def test_reference_can_be_forced(how, monkeypatch):
  if how == "function":
    optax8.set_implementation("reference")
  else:
    monkeypatch.setenv(native.IMPLEMENTATION_ENV, "reference")
  assert optax8.get_implementation() == "reference"
  tx = optax8.adam8bit(1e-3)
  params = {"w": jnp.ones((8, 512))}
  assert TARGET not in jax.jit(tx.update).lower(params, tx.init(params)).as_text()
  with pytest.raises(ValueError, match="implementation"):
    optax8.set_implementation("fast")


def test_switching_the_implementation_retraces_functions_traced_before():
  tx = optax8.adam8bit(1e-3)
  params = {"w": jnp.ones((8, 512))}
  state = tx.init(params)

  def step(g, state):
    return tx.update(g, state)

  uses_kernel = lambda: TARGET in jax.jit(step).lower(params, state).as_text()  # a new jax.jit each time
  jitted = jax.jit(step)
  jitted(params, state)
  assert uses_kernel()
  optax8.set_implementation("reference")
  assert not uses_kernel()
  jitted(params, state)
  assert jitted._cache_size() == 2  # the same jax.jit object traced anew
  optax8.set_implementation(None)
  assert uses_kernel()
  jitted(params, state)
  assert jitted._cache_size() == 2  # the kernel's trace found again


@pytest.fixture
def fresh_loader(monkeypatch):
  """Makes the next trace load the library anew (the registered one stays registered)."""
  monkeypatch.setattr(native_library, "_problems", {})
  monkeypatch.setattr(native_library, "_warned", set())


def broken_library(kind, tmp_path, monkeypatch):
  if kind == "missing":
    monkeypatch.setenv(native_library.LIBRARY_ENV, str(tmp_path / "nonexistent.so"))
  elif kind == "not_a_library":
    path = tmp_path / "liboptax8_cpu.so"
    path.write_bytes(b"this is not an ELF file")
    monkeypatch.setenv(native_library.LIBRARY_ENV, str(path))
  elif kind in ("cannot_run_here", "other_contract"):
    contract = update_math.kernel_contract() + ("" if kind == "cannot_run_here" else "; adam8(x)")
    isa = "error: OPTAX8_CPU_ISA=avx512 but this CPU lacks it" if kind == "cannot_run_here" else "scalar"
    monkeypatch.setenv(native_library.LIBRARY_ENV, str(stub_library(tmp_path, contract, isa)))
  else:  # the library loads but jaxlib rejects it, as with FFI API version skew

    def reject(*args, **kwargs):
      raise RuntimeError("handler's API version (0.9) is incompatible with the framework's (0.3)")

    monkeypatch.setattr(jax.ffi, "register_ffi_target", reject)


def stub_library(tmp_path, contract, isa):
  """A library with the CPU kernel's symbols, exporting `contract` and `isa`."""
  if compiler() is None:
    pytest.skip("needs a C++ compiler")
  path = tmp_path / "liboptax8_cpu.so"
  source = f"""
    extern "C" int Optax8FfiApiVersion() {{ return 0; }}
    extern "C" const char* Optax8CpuContract() {{ return "{contract}"; }}
    extern "C" const char* Optax8CpuIsa() {{ return "{isa}"; }}
    extern "C" void* Optax8CpuUpdate(void*) {{ return nullptr; }}
  """
  subprocess.run([compiler(), "-shared", "-fPIC", "-x", "c++", "-", "-o", str(path)], input=source.encode(), check=True)
  return path


@pytest.mark.parametrize("kind", ["missing", "not_a_library", "cannot_run_here", "rejected"])
def test_unusable_library_warns_once_and_falls_back(kind, tmp_path, monkeypatch, fresh_loader):
  broken_library(kind, tmp_path, monkeypatch)
  tx = optax8.sgd8bit(0.1, momentum=0.9)
  params = {"w": jnp.ones((4, 1024)), "v": jnp.ones((2, 4096))}
  state = tx.init(params)
  g = jax.tree.map(lambda p: jnp.full(p.shape, 0.25), params)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lowered = jax.jit(tx.update).lower(g, state)
    jax.jit(lambda g, s: tx.update(g, s)).lower(g, state)
  messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  assert len(messages) == 1 and "reference" in messages[0], messages
  assert TARGET not in lowered.as_text()
  u, _ = lowered.compile()(g, state)
  np.testing.assert_allclose(u["w"], -0.1 * 0.25)


def test_a_library_built_from_other_kernel_declarations_is_an_error(tmp_path, monkeypatch, fresh_loader):
  broken_library("other_contract", tmp_path, monkeypatch)
  tx = optax8.adam8bit(1e-3)
  params = {"w": jnp.ones((8, 512))}
  with pytest.raises(RuntimeError, match="other kernel declarations"):
    jax.jit(tx.update).lower(params, tx.init(params))


def test_the_installed_library_exports_this_packages_kernel_declarations():
  assert native_library.usable()
  library = native_library._libraries["cpu"]
  assert native_library._exported_text(library, "Optax8CpuContract") == update_math.kernel_contract()


def test_native_implementation_raises_when_the_library_is_unusable(tmp_path, monkeypatch, fresh_loader):
  broken_library("missing", tmp_path, monkeypatch)
  optax8.set_implementation("native")
  tx = optax8.adam8bit(1e-3)
  params = {"w": jnp.ones((8, 512))}
  with pytest.raises(RuntimeError, match="native kernel"):
    jax.jit(tx.update).lower(params, tx.init(params))


def run_with_cpu_isa(isa, *args, env=None):
  env = dict(os.environ if env is None else env, **{native_library.CPU_ISA_ENV: isa})
  return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=900)


def cpu_runs(isa):
  probe = "from optax8._src import native_library; print(native_library.cpu_isa())"
  return run_with_cpu_isa(isa, "-W", "ignore", "-c", probe).stdout.strip() == isa


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the flag is x86's")
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_instruction_set_is_bit_identical_to_the_reference_without_contraction(isa):
  # The parity tests again, in a process whose CPU kernel is forced to `isa`.
  if not cpu_runs(isa):
    pytest.skip(f"this CPU, or this build, has no {isa} path")
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {NO_CONTRACTION_FLAG}".strip())
  result = run_with_cpu_isa(isa, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-k", "parity",
                            "-W", "ignore::pytest.PytestAssertRewriteWarning", __file__, env=env)
  assert result.returncode == 0 and " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-6000:]


def test_an_instruction_set_the_cpu_kernel_lacks_is_refused_with_its_name():
  result = run_with_cpu_isa("sse9", "-c", "from optax8._src import native_library; print(native_library.cpu_isa())")
  assert result.stdout.strip() == "None"
  assert "OPTAX8_CPU_ISA=sse9 is not one of auto, " in result.stderr, result.stderr


def test_the_instruction_set_is_named_in_any_case_with_spaces_around():
  assert run_with_cpu_isa(" Scalar\n", "-c", "from optax8._src import native_library; print(native_library.cpu_isa())"
                          ).stdout.strip() == "scalar"


def kernel_result(shape=(64, 4100)):
  assert native_library.usable()
  family, static, g, moments, scalars = leaf_case("adam", shape, block_size=256)
  u, (m, v) = jax.jit(functools.partial(native_call.update, family, static))(g, moments, scalars)
  return dict(u=u, m_codes=m.codes, m_absmax=m.absmax, v_codes=v.codes, v_absmax=v.absmax)


THREADS_SCRIPT = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # XLA sizes its thread pool by this
sys.path.insert(0, sys.argv[2])
import numpy as np, test_native
np.savez(sys.argv[1], **test_native.kernel_result())
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity control and two CPUs")
def test_result_does_not_depend_on_the_thread_count(tmp_path):
  out = tmp_path / "one_thread.npz"
  subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(out), str(pathlib.Path(__file__).parent)], check=True)
  single = np.load(out)
  for key, value in kernel_result().items():
    np.testing.assert_array_equal(single[key], np.asarray(value), err_msg=key)


def compiler():
  return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(compiler() is None, reason="needs a C++ compiler")
def test_the_cuda_walks_division_by_constants_equals_integer_division(tmp_path):
  binary = tmp_path / "divisor_test"
  source = ROOT / "custom_calls" / "tests" / "divisor_test.cc"
  subprocess.run([compiler(), "-std=c++17", "-O2", f"-I{ROOT / 'custom_calls'}", str(source), "-o", str(binary)],
                 check=True)
  result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith("0 failures"), result.stdout[-2000:]


@pytest.mark.skipif(compiler() is None or not sys.platform.startswith("linux"),
                    reason="needs a C++ compiler and glibc's ucontext fibers")
def test_the_cuda_kernels_code_run_on_the_host_equals_the_cpu_kernel_bit_for_bit(tmp_path):
  # custom_calls/tests/cuda_kernel_emulation_test.cc: the CUDA kernel's source, with host
  # stand-ins for the CUDA headers, against the CPU kernel's scalar block walk.
  custom_calls = ROOT / "custom_calls"
  flags = ["-std=c++17", "-O1", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fno-strict-aliasing"]
  cpu_unit, binary = tmp_path / "cpu_scalar.o", tmp_path / "cuda_kernel_emulation_test"
  subprocess.run([compiler(), *flags, "-DOPTAX8_ISA=scalar", f"-I{custom_calls}", "-c",
                  str(custom_calls / "optax8_cpu_isa.cc"), "-o", str(cpu_unit)], check=True)
  subprocess.run([compiler(), *flags, f"-I{custom_calls / 'tests' / 'cuda_emulation'}", f"-I{custom_calls}",
                  str(custom_calls / "tests" / "cuda_kernel_emulation_test.cc"), str(cpu_unit), "-o", str(binary)],
                 check=True)
  result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and result.stdout.strip().endswith("\n0 failures"), result.stdout[-2000:]
  cases, aligned = (int(word) for word in result.stdout.splitlines()[-2].split()[::2][:2])
  assert cases > 1000 and 0 < aligned < cases, result.stdout[-2000:]  # both of the kernel's paths ran


@pytest.mark.skipif(compiler() is None, reason="needs a C++ compiler")
def test_encoder_is_exact_for_every_float_in_the_maps_range(tmp_path):
  binary = tmp_path / "encode_exhaustive_test"
  source = ROOT / "custom_calls" / "tests" / "encode_exhaustive_test.cc"
  flags = ["-std=c++17", "-O3", "-ffp-contract=off", f"-I{ROOT / 'custom_calls'}"]
  native_flags = ["-march=native"] if subprocess.run(
      [compiler(), "-march=native", "-x", "c++", "-E", "-"], input=b"", capture_output=True).returncode == 0 else []
  subprocess.run([compiler(), *flags, *native_flags, str(source), "-o", str(binary)], check=True)
  tables = [np.asarray(t, np.float32).view(np.uint32) for t in (qz.SIGNED_MAP, qz.UNSIGNED_MAP,
             qz.encode_thresholds(True), qz.encode_thresholds(False))]
  tables += [qz.encode_table(True).view(np.uint32), qz.encode_table(False).view(np.uint32)]
  stdin = " ".join(f"{v:08x}" for t in tables for v in t)
  result = subprocess.run([str(binary)], input=stdin, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and result.stdout.strip().endswith("\n0 failures"), result.stdout[-2000:]
  # Every vector encoder the CPU kernel runs here was among those checked.
  checked = result.stdout.splitlines()[-2].split()[2:]
  assert native_library.cpu_isa() in checked, result.stdout[-2000:]


@pytest.mark.skipif(not native_library.usable("cpu"), reason="no CPU kernel")
def test_the_cpu_kernel_refuses_bad_attributes_and_operands_with_errors():
  family, _, g, moments, scalars = leaf_case("momentum", (4, 256))
  state = [moments[0].codes, moments[0].absmax]
  apply = dict(clip_norm=1.0, clip_max=1.0, step_size=-1e-3, weight_decay=0.0)
  hp = jnp.asarray([scalars[name] for name in family.scalar_names], jnp.float32)
  hp_apply = jnp.asarray([*hp, *apply.values()], jnp.float32)
  good = dict(family="momentum", block_size=np.int64(128), flags=np.int64(0), signed=np.int64(1))

  def call(result_dtype=jnp.float32, param=None, grad=g, **attributes):
    types = [jax.ShapeDtypeStruct(g.shape, result_dtype), *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state)]
    operands = (grad, hp, *state) if param is None else (grad, hp_apply, *state, param)
    return jax.block_until_ready(jax.ffi.ffi_call(native_library.TARGET, types)(*operands, **{**good, **attributes}))

  applied = dict(flags=np.int64(update_math.FLAG_BITS["apply"]))
  g16 = g.astype(jnp.bfloat16)
  call()
  call(param=g, **applied)
  call(jnp.bfloat16, param=g16, grad=g16, **applied)
  call(param=g, grad=g16, **applied)  # a float32 parameter for a 16-bit gradient
  bad_cases = [
      (dict(family="nope"), "unknown family"),
      (dict(flags=np.int64(2)), "flags not supported"),
      (dict(signed=np.int64(0)), "wrong maps"),
      (dict(block_size=np.int64(0)), "block size"),
      (dict(block_size=np.int64(64)), "state shapes"),
      (dict(result_dtype=jnp.bfloat16), "the update must match the gradient"),
      (dict(param=g.astype(jnp.float16), grad=g16, result_dtype=jnp.float16, **applied), "its dtype or float32"),
      (dict(param=g16, result_dtype=jnp.bfloat16, **applied), "its dtype or float32"),
      (dict(param=g[:, :128], **applied), "the gradient's shape"),
      (dict(param=g, result_dtype=jnp.bfloat16, **applied),
       "the new parameter must match the parameter"),
  ]
  for bad, message in bad_cases:
    with pytest.raises(Exception, match=message):
      call(**bad)
