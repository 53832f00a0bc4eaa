"""Quantization: the maps, exact nearest-code rounding, layout and error bounds."""

import json
import pathlib

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax8
from optax8._src import quantization as qz

REFERENCE_MAPS = pathlib.Path(__file__).parent / "data" / "bnb_dynamic_maps.json"


def brute_force_codes(x: np.ndarray, signed: bool) -> np.ndarray:
  """argmin_k |x - map[k]| in float64 (ties to the lower code), then bitsandbytes' sign fix
  (signed map) or its unsigned counterpart (a positive value is never code 0)."""
  qmap = optax8.dynamic_map(signed).astype(np.float64)
  x64 = np.asarray(x, np.float64)
  codes = np.argmin(np.abs(x64[..., None] - qmap), axis=-1)
  if signed:
    wrong = np.signbit(qmap[codes]) != np.signbit(x64)
    codes = np.where(wrong, np.where(x64 > 0, codes + 1, codes - 1), codes)
  else:
    codes = np.where((codes == 0) & (x64 > 0), 1, codes)
  return codes.astype(np.uint8)


def numpy_quantize(x: np.ndarray, block_size: int, signed: bool):
  """Direct NumPy statement of the layout: blocks along the last axis, absmax per block.

  Subnormal inputs count as signed zeros, as XLA's CPU and GPU backends flush them.
  """
  x = np.asarray(x, np.float32)
  x = np.where(np.abs(x) < np.finfo(np.float32).tiny, np.copysign(np.float32(0), x), x)
  n = x.shape[-1]
  nb = -(-n // block_size)
  padded = np.zeros(x.shape[:-1] + (nb * block_size,), np.float32)
  padded[..., :n] = x
  blocks = padded.reshape(x.shape[:-1] + (nb, block_size))
  # The signed map's lowest entry is -0.99297: a negative value claims |x| * NEGATIVE_STRETCH.
  claim = np.abs(blocks) * np.where(signed & (blocks < 0), optax8.NEGATIVE_STRETCH, np.float32(1))
  absmax = claim.max(-1)
  safe = np.where(absmax == 0, np.float32(1), absmax)
  codes = brute_force_codes(blocks * (np.float32(1) / safe)[..., None], signed)  # as documented: x * (1 / absmax)
  return codes.reshape(padded.shape)[..., :n], absmax


@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_bitsandbytes_tables_bit_for_bit(signed):
  table = json.loads(REFERENCE_MAPS.read_text())["signed" if signed else "unsigned"]["hex"]
  expected = np.array([float.fromhex(h) for h in table], np.float32)
  np.testing.assert_array_equal(optax8.dynamic_map(signed).view(np.uint32), expected.view(np.uint32))


def test_signed_map_has_exact_zero_at_127_and_no_minus_one():
  m = optax8.SIGNED_MAP
  assert m[127] == 0.0 and not np.signbit(m[127]) and m[255] == 1.0 and m.min() > -1.0
  np.testing.assert_array_equal(m[128:255], -m[126::-1])


def _adversarial_values(signed: bool) -> np.ndarray:
  qmap = optax8.dynamic_map(signed)
  mids32 = ((qmap[:-1].astype(np.float64) + qmap[1:]) / 2).astype(np.float32)
  around = np.concatenate([
      qmap, mids32,
      np.nextafter(mids32, np.float32(np.inf)), np.nextafter(mids32, np.float32(-np.inf)),
      np.nextafter(qmap, np.float32(0)),
  ])
  special = np.array([0.0, -0.0, 1.0, 1e-45, -1e-45, 1e-38, -1e-38, 1.2e-7, -1.2e-7], np.float32)
  values = np.concatenate([around, -around, special]) if signed else np.concatenate([around, special])
  values = values[np.abs(values) <= 1]
  return values if signed else values[values >= 0]


@pytest.mark.parametrize("signed", [True, False])
def test_encoding_equals_brute_force_nearest_code_on_adversarial_values(signed):
  x = _adversarial_values(signed)
  got = np.asarray(jax.jit(qz.encode, static_argnums=1)(jnp.asarray(x), signed))
  np.testing.assert_array_equal(got, brute_force_codes(x, signed))


@pytest.mark.parametrize("signed", [True, False])
def test_encoding_equals_brute_force_nearest_code_on_random_values(signed):
  rng = np.random.default_rng(0)
  lo = -1.0 if signed else 0.0
  x = np.concatenate([
      rng.uniform(lo, 1.0, 100_000),
      np.sign(rng.uniform(lo, 1.0, 100_000)) * 10.0 ** rng.uniform(-9, 0, 100_000),
  ]).astype(np.float32)
  got = np.asarray(jax.jit(qz.encode, static_argnums=1)(jnp.asarray(x), signed))
  np.testing.assert_array_equal(got, brute_force_codes(x, signed))


@pytest.mark.parametrize("signed", [True, False])
def test_encoding_equals_brute_force_at_every_bucket_edge_and_threshold(signed):
  # The encoder is exact iff every bucket's range is right: check each bucket's first and last
  # float, and each threshold with its neighbours.
  key_bits = 23 - int(np.log2(len(qz.encode_table(signed)) // 64))
  prefixes = np.arange(0, 1 << 31, 1 << key_bits, dtype=np.uint32)
  edges = np.concatenate([prefixes, prefixes | ((1 << key_bits) - 1)]).view(np.float32)
  t = qz.encode_thresholds(signed)
  x = np.concatenate([edges, t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf))])
  x = np.concatenate([x, -x]) if signed else x
  x = x[(np.abs(x) <= 1) & (x >= (-1 if signed else 0))]
  got = np.asarray(jax.jit(qz.encode, static_argnums=1)(jnp.asarray(x), signed))
  np.testing.assert_array_equal(got, brute_force_codes(x, signed))


def test_negative_values_that_round_to_zero_take_the_negative_code():
  x = jnp.array([-1e-9, -0.0, 1e-9, 0.0], jnp.float32)
  np.testing.assert_array_equal(np.asarray(qz.encode(x, True)), [126, 126, 127, 127])


block_sizes = st.sampled_from([1, 3, 16, 64, 256, 1000, 4096])
shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=300).filter(
    lambda s: np.prod(s) <= 20_000
)


@st.composite
def blocks_to_quantize(draw):
  shape = draw(shapes)
  signed = draw(st.booleans())
  kind = draw(st.sampled_from(["normal", "tiny", "huge", "zeros", "subnormal", "mixed"]))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  x = rng.standard_normal(shape).astype(np.float32)
  if kind == "tiny":
    x *= np.float32(1e-30)
  elif kind == "huge":
    x *= np.float32(1e30)
  elif kind == "zeros":
    x[...] = 0
  elif kind == "subnormal":
    x *= np.float32(1e-42)
  elif kind == "mixed":
    x *= np.float32(10.0) ** rng.integers(-12, 6, shape).astype(np.float32)
  if not signed:
    x = np.abs(x)
  return x, draw(block_sizes), signed


@settings(max_examples=60, deadline=None)
@given(blocks_to_quantize())
def test_quantize_blockwise_matches_numpy_brute_force(case):
  x, block_size, signed = case
  q = optax8.quantize_blockwise(jnp.asarray(x), block_size, signed=signed)
  codes, absmax = numpy_quantize(x, block_size, signed)
  assert q.codes.shape == x.shape and q.codes.dtype == jnp.uint8
  assert q.absmax.shape == x.shape[:-1] + (-(-x.shape[-1] // block_size),)
  np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
  np.testing.assert_array_equal(np.asarray(q.codes), codes)
  decoded = np.asarray(optax8.dequantize_blockwise(q))
  assert np.all(np.isfinite(decoded))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_all_zero_block_encodes_to_zero_code_and_decodes_to_zero(dtype):
  x = jnp.zeros((3, 300), dtype).at[0, 260].set(1.0)
  for signed, zero_code in [(True, 127), (False, 0)]:
    q = optax8.quantize_blockwise(x, 256, signed=signed)
    assert float(q.absmax[1, 0]) == 0.0
    assert np.all(np.asarray(q.codes[1:]) == zero_code)
    decoded = np.asarray(optax8.dequantize_blockwise(q))
    np.testing.assert_array_equal(decoded[1:], 0.0)
    assert decoded[0, 260] == 1.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_quantize_as_their_float32_values(dtype):
  x = jax.random.normal(jax.random.key(1), (8, 512)).astype(dtype)
  a = optax8.quantize_blockwise(x, 128)
  b = optax8.quantize_blockwise(x.astype(jnp.float32), 128)
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  np.testing.assert_array_equal(np.asarray(a.absmax), np.asarray(b.absmax))


@pytest.mark.parametrize("block_size", [64, 128, 256, 512, 1024, 2048, 4096])
def test_quantization_error_within_bitsandbytes_bounds(block_size):
  x = jax.random.normal(jax.random.key(block_size), (1024, 1024))
  err = jnp.abs(x - optax8.dequantize_blockwise(optax8.quantize_blockwise(x, block_size)))
  assert float(err.mean()) < 0.011
  assert float((err / (jnp.abs(x) + 1e-8)).mean()) < 0.018
  u = jax.random.uniform(jax.random.key(block_size), (1024, 1024))
  for signed, abs_bound, rel_bound in [(True, 0.0036, 0.015), (False, 0.0023, 0.012)]:
    err = jnp.abs(u - optax8.dequantize_blockwise(optax8.quantize_blockwise(u, block_size, signed=signed)))
    assert float(err.mean()) < abs_bound
    assert float((err / (u + 1e-8)).mean()) < rel_bound


def test_layout_equals_flat_bitsandbytes_layout_when_rows_are_whole_blocks():
  x = jax.random.normal(jax.random.key(2), (4, 512))
  rows = optax8.quantize_blockwise(x, 256)
  flat = optax8.quantize_blockwise(x.reshape(-1), 256)
  np.testing.assert_array_equal(np.asarray(rows.codes).reshape(-1), np.asarray(flat.codes))
  np.testing.assert_array_equal(np.asarray(rows.absmax).reshape(-1), np.asarray(flat.absmax))


def test_quantized_array_is_a_pytree_with_static_block_size_and_map():
  q = optax8.quantize_blockwise(jnp.ones((2, 300)), 128, signed=False)
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 2
  other = optax8.quantize_blockwise(jnp.ones((2, 300)), 64, signed=False)
  assert jax.tree.structure(other) != treedef
  abstract = jax.eval_shape(lambda x: optax8.quantize_blockwise(x, 128, signed=False), jnp.ones((2, 300)))
  assert abstract.codes.shape == (2, 300) and abstract.absmax.shape == (2, 3)
  assert abstract.block_size == 128 and abstract.signed is False


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(block_size=0), ValueError, "block_size must be a positive int, got 0"),
        (dict(block_size=2.5), TypeError, "block_size must be a Python int"),
        (dict(x=jnp.ones((4,), jnp.int32)), TypeError, "floating array, got dtype int32"),
        (dict(x=jnp.float32(1.0)), ValueError, "rank >= 1"),
    ],
)
def test_quantize_blockwise_rejects_bad_arguments(kwargs, error, match):
  args = dict(x=jnp.ones((4,)), block_size=4) | kwargs
  with pytest.raises(error, match=match):
    optax8.quantize_blockwise(**args)
