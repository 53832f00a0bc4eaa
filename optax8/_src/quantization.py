"""Blockwise 8-bit quantization with bitsandbytes' dynamic maps.

A tensor ``s`` of shape ``(..., n)`` is cut into blocks of ``block_size`` elements along its
last axis (the last block of a row may be short). Each block ``b`` stores one float32
``absmax[..., b] = max |s|`` (see :data:`NEGATIVE_STRETCH` for the signed map) and one uint8
code per element::

    code = nearest_code(s / absmax)          # nearest entry of a 256-entry map
    s    ~ qmap[code] * absmax               # dequantization

The codes keep the tensor's shape and ``absmax`` keeps its rank, so both can be sharded with
the tensor's own ``PartitionSpec``.

``block_size=None`` is the tensor-wise variant of the scale layout (bitsandbytes' original
``block_wise=False``): one float32 ``absmax = max |s|`` of shape ``()`` for the whole tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "NEGATIVE_STRETCH",
    "SIGNED_MAP",
    "UNSIGNED_MAP",
    "QuantizedArray",
    "dequantize_blockwise",
    "dynamic_map",
    "encode_table",
    "encode_thresholds",
    "num_blocks",
    "quantize_blockwise",
    "rounding_bits",
]


def _load_maps() -> tuple[np.ndarray, np.ndarray]:
  text = importlib.resources.files("optax8._src").joinpath("dynamic_maps.json").read_text()
  table = json.loads(text)
  to_f32 = lambda hexes: np.array([float.fromhex(h) for h in hexes], np.float32)
  return to_f32(table["signed"]), to_f32(table["unsigned"])


SIGNED_MAP, UNSIGNED_MAP = _load_maps()
SIGNED_MAP.flags.writeable = False
UNSIGNED_MAP.flags.writeable = False


# The signed map's most negative entry is -0.99297, not -1. A block whose largest magnitude is
# a negative value takes that magnitude times this as its absmax, so that the value is code 0's
# (to float32 rounding) instead of shrinking by 0.7% each time the block is re-quantized, which
# an EMA with beta near 1 (Lion's, AdEMAMix's slow one) cannot outgrow.
NEGATIVE_STRETCH = np.float32(1 / -np.float64(SIGNED_MAP[0]))


def dynamic_map(signed: bool) -> np.ndarray:
  """Returns bitsandbytes' dynamic quantization map (256 float32 values, ascending).

  The signed map holds 0 at index 127 and +1 at index 255 (there is no -1); the unsigned map
  covers [0, 1]. Both are bit-identical to bitsandbytes 0.50's ``create_dynamic_map``.
  """
  return SIGNED_MAP if signed else UNSIGNED_MAP


@functools.cache
def encode_thresholds(signed: bool) -> np.ndarray:
  """Float32 decision thresholds that make encoding an exact nearest-code search.

  ``code(x) = #{k : x > t[k]}`` equals ``argmin_k |x - map[k]|`` computed exactly, with ties
  going to the lower code. ``t[k]`` is the exact midpoint of ``map[k]`` and ``map[k+1]`` when
  it is a float32, and otherwise the largest float32 below it, so that comparing a float32 with
  ``t[k]`` decides the same as comparing it with the exact midpoint.

  Args:
    signed: which map.

  Returns:
    A read-only float32 array of 255 ascending thresholds.
  """
  qmap = dynamic_map(signed).astype(np.float64)
  mid = (qmap[:-1] + qmap[1:]) / 2  # exact: adjacent float32s sum exactly in float64
  t = mid.astype(np.float32)
  above = t.astype(np.float64) > mid
  t[above] = np.nextafter(t[above], np.float32(-np.inf))
  t.flags.writeable = False
  return t


def num_blocks(n: int, block_size: int) -> int:
  """Number of blocks along a last axis of length ``n``."""
  return -(-n // block_size)


def absmax_shape(shape: tuple[int, ...], block_size: int | None) -> tuple[int, ...]:
  """Shape of the absmax for a tensor of ``shape`` (rank >= 1): per block, or ``()`` for ``None``."""
  if block_size is None:
    return ()
  return tuple(shape[:-1]) + (num_blocks(shape[-1], block_size),)


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """An 8-bit blockwise-quantized float32 tensor.

  A registered pytree: ``codes`` and ``absmax`` are its leaves; ``block_size`` and ``signed``
  (which dynamic map) are static and live in the tree structure, so two states with other
  block sizes or maps never unify, and ``jax.eval_shape`` describes one exactly. The leaves'
  key paths carry the static facts too (``codes_signed``, ``absmax_block256``, or
  ``absmax_tensor`` for one scale per tensor): checkpoints name arrays by path (Orbax,
  ``nnx.State``), so restoring one into a target with another block size or map fails on the
  names instead of decoding codes wrongly.

  Attributes:
    codes: ``uint8[shape]``, one code per element.
    absmax: ``float32[shape[:-1] + (ceil(shape[-1] / block_size),)]``, or ``float32[]`` when
      ``block_size`` is ``None``.
    block_size: elements per block along the last axis, or ``None`` for one block holding the
      whole tensor (bitsandbytes' ``block_wise=False``).
    signed: ``True`` for the signed dynamic map, ``False`` for the unsigned one.
  """

  codes: jax.Array
  absmax: jax.Array
  block_size: int | None
  signed: bool

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def qmap(self) -> np.ndarray:
    return dynamic_map(self.signed)

  @classmethod
  def full(
      cls,
      shape: tuple[int, ...],
      block_size: int | None,
      signed: bool,
      value: float = 0.0,
      *,
      sharding: jax.sharding.Sharding | None = None,
      absmax_sharding: jax.sharding.Sharding | None = None,
  ) -> QuantizedArray:
    """``quantize_blockwise(jnp.full(shape, value))`` without computing it (``value >= 0``).

    Both maps hold 1.0 at code 255, so a constant is that code times an absmax of ``value``;
    zero is the code of exact 0 with absmax 0. ``sharding`` and ``absmax_sharding`` place the
    codes and the absmax (under ``jit`` in Explicit mode: their types' shardings).
    """
    value = jnp.asarray(value, jnp.float32)
    zero_code = 127 if signed else 0
    return cls(
        codes=jax.lax.full(shape, jnp.where(value == 0, zero_code, 255), jnp.uint8, sharding=sharding),
        absmax=jax.lax.full(absmax_shape(shape, block_size), value, jnp.float32, sharding=absmax_sharding),
        block_size=block_size,
        signed=signed,
    )


def _keyed_children(q: QuantizedArray) -> tuple[tuple[tuple[jax.tree_util.GetAttrKey, jax.Array], ...], tuple]:
  codes_key = jax.tree_util.GetAttrKey("codes_signed" if q.signed else "codes_unsigned")
  absmax_key = jax.tree_util.GetAttrKey("absmax_tensor" if q.block_size is None else f"absmax_block{q.block_size}")
  return ((codes_key, q.codes), (absmax_key, q.absmax)), (q.block_size, q.signed)


jax.tree_util.register_pytree_with_keys(
    QuantizedArray,
    _keyed_children,
    lambda static, children: QuantizedArray(*children, *static),
    lambda q: ((q.codes, q.absmax), (q.block_size, q.signed)),
)


def _check_block_size(block_size: int | None) -> None:
  if block_size is None:
    return
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
    raise TypeError(
        f"block_size must be a Python int (a static value) or None (one absmax for the tensor), got "
        f"{block_size!r} of type {type(block_size).__name__}."
    )
  if block_size <= 0:
    raise ValueError(f"block_size must be a positive int, got {block_size}.")


def _blocked(x: jax.Array, block_size: int) -> jax.Array:
  """Zero-pads the last axis to whole blocks and reshapes to ``(..., blocks, block_size)``.

  In Explicit mode the last axis's sharding goes to the blocks, as the absmax has it (where a
  mesh axis of size 1 names it, the reshape could put it on either).
  """
  n = x.shape[-1]
  nb = num_blocks(n, block_size)
  pad = nb * block_size - n
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  shape = x.shape[:-1] + (nb, block_size)
  sharding = jax.typeof(x).sharding
  if isinstance(sharding, jax.sharding.NamedSharding) and jax.sharding.AxisType.Explicit in sharding.mesh.axis_types:
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return jnp.reshape(x, shape, out_sharding=sharding.update(spec=jax.sharding.PartitionSpec(*spec, None)))
  return jnp.reshape(x, shape)


def _unblocked(x: jax.Array, n: int) -> jax.Array:
  return x.reshape(x.shape[:-2] + (-1,))[..., :n]


def _lookup(table: np.ndarray, index: jax.Array) -> jax.Array:
  """``table[index]``, sharded like ``index`` (Explicit mode cannot infer a gather's sharding)."""
  sharding = jax.typeof(index).sharding
  if jax.sharding.AxisType.Explicit in sharding.mesh.axis_types:
    return jnp.asarray(table).at[index].get(out_sharding=sharding)
  return jnp.asarray(table)[index]


# Encoding without a search (the same tables as custom_calls/optax8_math.h). A float's sign,
# exponent and top `sub_bits` mantissa bits select a bucket, a contiguous range of floats that
# holds at most one threshold; its entry is `(base << 24) + (0xFFFFFF - position)`, from the code
# of the bucket's lowest float and where in the bucket the threshold lies. Then code(x) =
# (entry + x's position in its bucket) >> 24: one lookup, one add. Rows (per sign): 0 holds
# |x| < 2^-23 (below every threshold, zeros included), 1..24 the binades [2^-23, 2^1), 25..31
# larger values and NaN (code 255). 32 rows make the sign one index bit.
_MIN_EXPONENT = 104  # biased exponent of 2^-23
_ROWS = 32
_SUB_BITS = {True: 6, False: 7}  # enough to separate adjacent thresholds of each map


def _order_keys(bits: np.ndarray) -> np.ndarray:
  """An order-preserving map from float32 bits to unsigned integers (-0 just below +0)."""
  bits = bits.astype(np.int64)
  return np.where(bits >> 31, ~bits & 0xFFFFFFFF, bits | 0x80000000)


@functools.cache
def encode_table(signed: bool) -> np.ndarray:
  """The bucket table of the search-free encoder, with bitsandbytes' sign fix folded in.

  Args:
    signed: which map.

  Returns:
    A read-only int32 array of ``2 * 32 << sub_bits`` entries (6 sub-bits for the signed map,
    7 for the unsigned one).
  """
  sub_bits = _SUB_BITS[signed]
  key_bits = 23 - sub_bits
  none = (1 << key_bits) - 1  # position meaning "no threshold in this bucket"
  t = encode_thresholds(signed)
  keys = _order_keys(t.view(np.uint32))
  exponents = (t.view(np.uint32) >> 23) & 0xFF
  if np.any((exponents < _MIN_EXPONENT) | (exponents > 126)) or np.any(np.diff(t) <= 0):
    raise AssertionError("thresholds outside the encoder's binades or not ascending")
  sign, row, sub = np.meshgrid(np.arange(2), np.arange(_ROWS), np.arange(1 << sub_bits), indexing="ij")
  prefix = (sign << 31) | ((_MIN_EXPONENT + row - 1) << 23) | (sub << key_bits)
  lowest = _order_keys(np.where(sign == 1, prefix | none, prefix))  # most negative when negative
  base = np.searchsorted(keys, lowest)
  following = keys[np.minimum(base, 254)] - lowest
  position = np.where((base < 255) & (following <= none), following, none)
  if np.any((base < 254) & (keys[np.minimum(base + 1, 254)] - lowest <= none)):
    raise AssertionError("a bucket holds two thresholds")
  tiny, large = row == 0, row > 127 - _MIN_EXPONENT + 1
  base = np.where(tiny, np.sum(t < 0), np.where(large, 255, base))
  position = np.where(tiny | large, none, position)
  if signed:
    # bitsandbytes moves a code whose value has the other sign than x one step towards x's
    # sign. Given the map's layout (negatives, +0 at 127, positives) that only moves a
    # negative x (or -0) that counted 127 or more thresholds; all of its bucket gets one code.
    moved = (sign == 1) & (base + (position != none) >= 127)
    base = np.where(moved, np.where(base == 255, 254, 126), base)
    position = np.where(moved, none, position)
  else:
    # A positive x never takes code 0: its buckets' code 0 becomes 1, but in the bucket that
    # `encode` sends +0 (and +0 alone, of those below 2^-23) to, where a threshold at position
    # 0 keeps +0's code 0.
    zero = tiny & (sub == 0)
    floored = (sign == 0) & (base == 0)
    base = np.where(floored & ~zero, 1, base)
    position = np.where(floored, np.where(zero, 0, none), position)
  table = ((base << 24) + (0xFFFFFF - position)).astype(np.uint32).view(np.int32).reshape(-1)
  table.flags.writeable = False
  return table


def encode(x: jax.Array, signed: bool) -> jax.Array:
  """Nearest code of each normalised float32 value ``x`` in ``[-1, 1]`` (ties to the lower code).

  Signed map: a value whose sign differs from its code's (a negative value, or -0.0, that
  rounds to the code of 0) moves one code towards its own sign, as bitsandbytes does. Unsigned
  map, its counterpart: a positive value that rounds to the code of 0 takes code 1, the smallest
  positive entry, so a non-negative state (a second moment) is zero only where it is exactly
  zero. NaN encodes as 255 (254 with the sign bit set, signed map).
  """
  sub_bits = _SUB_BITS[signed]
  key_bits = 23 - sub_bits
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  bucket = (bits & 0x7FFFFFFF) >> key_bits
  # Unsigned map: row 0's sub-bucket 0 takes bucket 0 alone (where +0 is), the other tiny x go to 1.
  floor = 0 if signed else jnp.minimum(bucket, 1)
  row_sub = jnp.minimum(jnp.maximum(bucket - ((_MIN_EXPONENT - 1) << sub_bits), floor), (_ROWS << sub_bits) - 1)
  entry = _lookup(encode_table(signed), row_sub | ((bits >> 31) & (_ROWS << sub_bits)))
  # Position within the bucket in value order: negative floats order by decreasing magnitude.
  position = (bits ^ (bits >> 31)) & ((1 << key_bits) - 1)
  # lax needs both operands int32, and a Python int shift would be int64 under jax_enable_x64.
  return jax.lax.shift_right_logical(entry + position, np.int32(24)).astype(jnp.uint8)


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser: a bijection of uint32 that mixes every bit into every other."""
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> np.uint32(13))
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> np.uint32(16))


def rounding_bits(seed: jax.Array, x: jax.Array) -> jax.Array:
  """Random uint32 bits per element of ``x`` for stochastic rounding: a hash of ``seed``, the
  element's index in the whole array and its float32 value.

  Counter-based: reproducible, with no key to carry, and the same on every backend and mesh
  for the same ``x`` (the index is global: XLA partitions the iota). The value's bits make the
  bits change from step to step even where ``seed`` does not.
  """
  x = jnp.asarray(x, jnp.float32)
  sharding = jax.typeof(x).sharding
  out = sharding if jax.sharding.AxisType.Explicit in sharding.mesh.axis_types else None
  index = jnp.zeros(x.shape, jnp.uint32)
  for axis, stride in enumerate(np.cumprod((x.shape[1:] + (1,))[::-1])[::-1]):
    iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis, out_sharding=out)
    index = index + iota * np.uint32(stride % 2**32)
  value = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return _fmix32(_fmix32(index * np.uint32(0x9E3779B9) + _fmix32(jnp.asarray(seed, jnp.uint32))) ^ value)


def _round_stochastically(codes: jax.Array, y: jax.Array, signed: bool, bits: jax.Array) -> jax.Array:
  """Codes of ``y`` rounded up or down at random, unbiased: the two codes around ``y`` (of which
  ``codes``, the nearest, is one), the upper one with probability proportional to ``y``'s distance
  from the lower one. Exact entries and NaN keep ``codes``; the unsigned map's rule (a positive
  value is never code 0) holds afterwards as in :func:`encode`."""
  value = _lookup(dynamic_map(signed), codes.astype(jnp.int32))
  low = jnp.clip(jnp.where(value > y, codes.astype(jnp.int32) - 1, codes.astype(jnp.int32)), 0, 254)
  low_value, high_value = _lookup(dynamic_map(signed), low), _lookup(dynamic_map(signed), low + 1)
  # r uniform in [0, 1) on a 2^-24 grid; up with probability (y - low) / (high - low).
  r = (bits >> np.uint32(8)).astype(jnp.float32) * np.float32(2.0**-24)
  inside = (low_value <= y) & (y <= high_value) & (value != y)
  up = (y - low_value) > r * (high_value - low_value)
  rounded = jnp.where(inside, low + up.astype(jnp.int32), codes.astype(jnp.int32))
  if not signed:
    rounded = jnp.maximum(rounded, (y > 0).astype(jnp.int32))
  return rounded.astype(jnp.uint8)


def _absmax(x: jax.Array, signed: bool, axis: int | None) -> jax.Array:
  """The scale of each block (of ``x`` along ``axis``): its largest magnitude, a negative value's
  times :data:`NEGATIVE_STRETCH` on the signed map; ``float32``'s largest finite value where that
  product alone overflows."""
  magnitude = jnp.abs(x)
  if signed:
    stretched = magnitude * jnp.where(x < 0, NEGATIVE_STRETCH, np.float32(1))
    # A finite value's claim stays finite; an infinite or NaN one stays what it is.
    magnitude = jnp.minimum(stretched, jnp.maximum(magnitude, np.finfo(np.float32).max))
  return jnp.max(magnitude, axis=axis, initial=0.0)


def quantize_blockwise(
    x: jax.Array, block_size: int | None = 256, *, signed: bool = True, rounding_bits: jax.Array | None = None
) -> QuantizedArray:
  """Quantizes ``x`` blockwise along its last axis.

  ``absmax`` is each block's largest magnitude (on the signed map, a negative value's times
  :data:`NEGATIVE_STRETCH`, so that it decodes to itself); the codes are the nearest map entries
  of ``x * (1 / absmax)`` in float32. An all-zero block has absmax 0 and encodes to the
  code of exact 0, so it decodes to zeros without NaN.

  Args:
    x: a floating array of rank >= 1 (float32, bfloat16, float16, or float64 under
      ``jax_enable_x64``; computed in float32).
    block_size: elements per block along the last axis (a static positive int), or ``None``
      for one absmax of the whole tensor.
    signed: use the signed dynamic map (for values of either sign) or the unsigned one
      (for values >= 0).
    rounding_bits: ``None`` to round to the nearest code; else uint32 random bits shaped like
      ``x`` (:func:`rounding_bits`) to round stochastically: up or down to the two codes around
      each value, the expected decoded value equal to the value.

  Returns:
    The :class:`QuantizedArray`.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> q = optax8.quantize_blockwise(jnp.linspace(-1.0, 1.0, 300), block_size=256)
    >>> q.codes.shape, q.absmax.shape
    ((300,), (2,))
  """
  _check_block_size(block_size)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize_blockwise needs a floating array, got dtype {x.dtype}.")
  if x.ndim == 0:
    raise ValueError("quantize_blockwise needs an array of rank >= 1, got a scalar.")
  x = x.astype(jnp.float32)

  def codes_of(y, bits):
    codes = encode(y, signed)
    return codes if bits is None else _round_stochastically(codes, y, signed, bits)

  if block_size is None:  # one block: the whole tensor, without reshaping a sharded array
    absmax = _absmax(x, signed, axis=None)
    codes = codes_of(x * (1 / jnp.where(absmax == 0, 1.0, absmax)), rounding_bits)
    return QuantizedArray(codes, absmax, None, bool(signed))
  blocks = _blocked(x, block_size)
  absmax = _absmax(blocks, signed, axis=-1)
  scale = jnp.where(absmax == 0, 1.0, absmax)[..., None]
  # x / absmax as XLA computes it in most programs; written out to be the same in all.
  bits = None if rounding_bits is None else _blocked(rounding_bits, block_size)
  codes = codes_of(blocks * (1 / scale), bits)
  return QuantizedArray(_unblocked(codes, x.shape[-1]), absmax, int(block_size), bool(signed))


def dequantize_blockwise(q: QuantizedArray) -> jax.Array:
  """Decodes a :class:`QuantizedArray` to float32: ``qmap[codes] * absmax`` per block.

  Example:
    >>> import jax.numpy as jnp, optax8
    >>> x = jnp.array([0.5, -0.25, 0.0, 2.0])
    >>> y = optax8.dequantize_blockwise(optax8.quantize_blockwise(x, block_size=4))
    >>> [round(float(v), 3) for v in y]
    [0.495, -0.242, 0.0, 2.0]
  """
  if q.block_size is None:
    return _lookup(q.qmap, q.codes.astype(jnp.int32)) * q.absmax
  values = _lookup(q.qmap, _blocked(q.codes, q.block_size).astype(jnp.int32))
  return _unblocked(values * q.absmax[..., None], q.codes.shape[-1])


def keep_untouched_blocks(new: QuantizedArray, old: QuantizedArray, touched: jax.Array) -> QuantizedArray:
  """``new``, except that each block with no ``touched`` element keeps ``old``'s codes and absmax."""
  if new.block_size is None:
    block_touched = codes_touched = jnp.any(touched)
  else:
    blocks = _blocked(touched, new.block_size)
    block_touched = jnp.any(blocks, axis=-1)
    codes_touched = _unblocked(jnp.broadcast_to(block_touched[..., None], blocks.shape), new.codes.shape[-1])
  return dataclasses.replace(
      new,
      codes=jnp.where(codes_touched, new.codes, old.codes),
      absmax=jnp.where(block_touched, new.absmax, old.absmax),
  )


def is_quantized(x: object) -> bool:
  return isinstance(x, QuantizedArray)


def state_bytes(tree) -> int:
  """Bytes held by the arrays of a pytree (for example an optimizer state)."""
  return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))
