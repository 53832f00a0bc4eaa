"""optax8 under ``jax_enable_x64``: the same codes, absmax, updates and dtypes as with the flag off."""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import CASE_NAMES, CASES_BY_NAME

import optax8
from optax8._src import native_library

IMPLEMENTATIONS = ["reference", "native"]
STEPS = 3  # from the second step on, updates read the quantized state back
# A 64-bit array type in an XLA program (HLO spells them s64[...], u64[...], f64[...]).
WIDE_TYPE = re.compile(r"\b[suf]64\[")


@contextlib.contextmanager
def x64(enabled: bool):
  """Sets ``jax_enable_x64`` for the block, and restores it afterwards even when the block raises."""
  before = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", enabled)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", before)


def in_both_modes(fn):
  """``fn()`` with x64 off, then on; each result with its JAX arrays as NumPy arrays."""
  results = []
  for enabled in (False, True):
    with x64(enabled):
      results.append(jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, fn()))
  return results


def assert_bit_identical(expected, actual):
  leaves, treedef = jax.tree.flatten(expected)
  actual_leaves, actual_treedef = jax.tree.flatten(actual)
  assert actual_treedef == treedef
  for e, a in zip(leaves, actual_leaves):
    assert (a.dtype, a.shape) == (e.dtype, e.shape)
    assert a.tobytes() == e.tobytes()  # bitwise, so NaN and -0.0 compare too


def make_params(dtype):
  """NumPy params: two 8-bit tensors (one with a short last block) and one with 32-bit moments.

  Values are rounded to float32 first, so every dtype sees the same numbers in both modes and a
  float64 copy holds exactly the float32 values.
  """
  rng = np.random.default_rng(0)
  shapes = {"w": (64, 130), "t": (4, 8, 300), "b": (10,)}
  return {k: rng.normal(size=s).astype(np.float32).astype(dtype) for k, s in shapes.items()}


def make_grads(dtype, step):
  """NumPy gradients whose magnitudes span 1e-6 to 10, different at each step."""
  rng = np.random.default_rng(step + 1)
  return {
      k: (rng.normal(size=p.shape) * 10.0 ** rng.integers(-6, 2, size=p.shape)).astype(np.float32).astype(dtype)
      for k, p in make_params(np.float32).items()
  }


def run_steps(name, dtype, *, jit=True, steps=STEPS):
  """Applies ``steps`` updates of optimizer ``name``.

  Returns:
    The ``(updates, state)`` of each step, and the compiled update's HLO text (``None`` eagerly).
  """
  case = CASES_BY_NAME[name]
  tx = case.make(case.lr)
  params = jax.tree.map(jnp.asarray, make_params(dtype))
  state = tx.init(params)
  grads = [jax.tree.map(jnp.asarray, make_grads(dtype, step)) for step in range(steps)]
  update, text = tx.update, None
  if jit:
    update = jax.jit(tx.update).lower(grads[0], state, params).compile()
    text = update.as_text()
  history = []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    history.append((updates, state))
  return history, text


def counts(state):
  """The dtypes of a state's step counts (fields named like optax's)."""
  paths = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jnp.dtype(leaf.dtype) for path, leaf in paths if getattr(path[-1], "name", None) in ("count", "count_m2")}


def edge_values(dtype, signed):
  """Values to quantize: an all-zero row, magnitudes from 1e-30 to 1e30, and specials."""
  rng = np.random.default_rng(7)
  spread = rng.normal(size=150) * 10.0 ** rng.integers(-30, 30, size=150)
  specials = np.resize([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -1e-40, 1.0, -1.0, 3e38], 150)
  with np.errstate(over="ignore"):  # float16 overflows the largest to inf: more edge values
    x = np.stack([np.zeros(150), spread, specials]).astype(np.float32).astype(dtype)
  return x if signed else np.abs(x)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_and_dequantize_are_bit_identical_under_x64(signed, dtype, jit):
  x = edge_values(dtype, signed)
  quantize = functools.partial(optax8.quantize_blockwise, block_size=64, signed=signed)
  dequantize = optax8.dequantize_blockwise
  if jit:
    quantize, dequantize = jax.jit(quantize), jax.jit(dequantize)

  def roundtrip():
    q = quantize(jnp.asarray(x))
    return q, dequantize(q)

  x32, x64_results = in_both_modes(roundtrip)
  assert x32[0].codes.dtype == np.uint8 and x32[0].absmax.dtype == np.float32 and x32[1].dtype == np.float32
  assert_bit_identical(x32, x64_results)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_float64_input_quantizes_as_its_float32_rounding(signed, jit):
  x = edge_values(np.float64, signed)
  quantize = functools.partial(optax8.quantize_blockwise, block_size=64, signed=signed)
  dequantize = optax8.dequantize_blockwise
  if jit:
    quantize, dequantize = jax.jit(quantize), jax.jit(dequantize)
  with x64(False):
    q = quantize(jnp.asarray(x.astype(np.float32)))
    expected = jax.tree.map(np.asarray, (q, dequantize(q)))
  with x64(True):
    q = quantize(jnp.asarray(x))
    assert jnp.asarray(x).dtype == jnp.float64  # the input really is float64
    actual = jax.tree.map(np.asarray, (q, dequantize(q)))
  assert_bit_identical(expected, actual)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_optimizer_updates_bit_identically_under_x64(name, implementation, dtype):
  optax8.set_implementation(implementation)
  (x32, _), (x64_history, text) = in_both_modes(lambda: run_steps(name, dtype))
  assert_bit_identical(x32, x64_history)
  # The same float32 program in both modes, so XLA contracts a*b+c alike on every host.
  assert not WIDE_TYPE.search(text), WIDE_TYPE.findall(text)
  assert (native_library.TARGET in text) == (implementation == "native")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_optimizer_updates_eagerly_bit_identically_under_x64(name, implementation):
  optax8.set_implementation(implementation)
  x32, x64_history = in_both_modes(lambda: run_steps(name, jnp.float32, jit=False, steps=2)[0])
  assert_bit_identical(x32, x64_history)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_float64_params_get_float64_updates_and_8bit_state_under_x64(name, implementation):
  optax8.set_implementation(implementation)
  with x64(False):
    expected = run_steps(name, np.float32, steps=1)[0][0][0]
  with x64(True):
    history, text = run_steps(name, np.float64, steps=2)
  assert native_library.TARGET not in text  # the kernel takes no float64: the reference computes these
  for updates, state in history:
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float64)}
    moments = jax.tree.leaves(state, is_leaf=optax8._src.quantization.is_quantized)
    quantized = [m for m in moments if isinstance(m, optax8.QuantizedArray)]
    assert len(quantized) >= 2 and all(q.codes.dtype == jnp.uint8 and q.absmax.dtype == jnp.float32 for q in quantized)
    assert all(m.dtype == jnp.float32 for m in moments if not isinstance(m, optax8.QuantizedArray) and m.ndim)
    assert counts(state) <= {jnp.dtype(jnp.int32)}
  # Only the first step is compared: later ones read codes that may differ by one where the
  # float64 and float32 roundings of a moment straddle a code's threshold.
  for key, u in history[0][0].items():
    np.testing.assert_allclose(np.asarray(u), np.asarray(expected[key], np.float64), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_step_counts_stay_int32_under_x64_as_in_optax(name):
  case = CASES_BY_NAME[name]
  with x64(True):
    params = jax.tree.map(jnp.asarray, make_params(np.float32))
    ours, theirs = (
        counts(jax.eval_shape(tx.update, params, tx.init(params), params)[1])
        for tx in (case.make(case.lr), case.reference(case.lr))
    )
  # optax's RMSprop counts only with bias correction; optax8's always does.
  assert theirs <= ours <= {jnp.dtype(jnp.int32)}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_inject_hyperparams_adamw8bit_updates_bit_identically_under_x64(implementation):
  optax8.set_implementation(implementation)

  def steps():
    tx = optax.inject_hyperparams(optax8.adamw8bit)(learning_rate=1e-3)
    params = jax.tree.map(jnp.asarray, make_params(np.float32))
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for step in range(STEPS):
      updates, state = update(jax.tree.map(jnp.asarray, make_grads(np.float32, step)), state, params)
      params = optax.apply_updates(params, updates)
      history.append((updates, state))
    return history

  x32, x64_history = in_both_modes(steps)
  assert_bit_identical(x32, x64_history)
  # Hyperparameters and count typed as optax's own injected AdamW types them under x64.
  with x64(True):
    params = jax.tree.map(jnp.asarray, make_params(np.float32))
    like = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3).init(params)
  state = x64_history[-1][1]
  assert state.count.dtype == like.count.dtype == np.int32
  assert {k: v.dtype for k, v in state.hyperparams.items()} == {k: v.dtype for k, v in like.hyperparams.items()}


def test_x64_restores_the_flag_even_when_its_block_raises():
  before = jax.config.jax_enable_x64
  with pytest.raises(RuntimeError), x64(not before):
    assert jax.config.jax_enable_x64 != before
    raise RuntimeError("fails inside the block")
  assert jax.config.jax_enable_x64 == before
