"""The options that change the update itself: ``skip_zeros`` and ``max_unorm`` (bitsandbytes' names).

Each is checked against a NumPy statement of its rule on both implementations (the reference and
the native kernel), per label, under ``inject_hyperparams``, through an Orbax round trip, on a
training run, and with bad values. The sharded cases are in test_sharding.py; kernel bit parity
with ``skip_zeros`` is in test_native.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax8
from optax8._src import quantization as qz

IMPLEMENTATIONS = ("reference", "native")

# name: a building block with the given options (every moment 8-bit).
BLOCKS = {
    "adam": lambda **o: optax8.scale_by_adam8bit(**o),
    "momentum": lambda **o: optax8.trace8bit(0.9, **o),
    "lion": lambda **o: optax8.scale_by_lion8bit(**o),
    "rmsprop": lambda **o: optax8.scale_by_rms8bit(**o),
    "adagrad": lambda **o: optax8.scale_by_rss8bit(**o),
    "ademamix": lambda **o: optax8.scale_by_ademamix8bit(**o),
}


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
  optax8.set_implementation(request.param)
  yield request.param
  optax8.set_implementation(None)


def dense(rng, shape):
  return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def sparse(rng, shape, block_size=128):
  """Zero rows, a zero block inside a non-zero row, scattered zeros; -0.0 counts as zero too."""
  g = rng.standard_normal(shape).astype(np.float32)
  g[: shape[0] // 3] = 0.0
  g[-1, block_size : 2 * block_size] = -0.0
  g[rng.random(shape) < 0.2] = 0.0
  return jnp.asarray(g)


def quantized_leaves(state):
  return [x for x in jax.tree.leaves(state, is_leaf=qz.is_quantized) if qz.is_quantized(x)]


def half_code_step(values, absmax, signed):
  """Half the gap between the two map entries around each ``value / absmax``, times ``absmax``."""
  qmap = qz.dynamic_map(signed).astype(np.float64)
  y = np.clip(values / np.where(absmax == 0, 1.0, absmax), qmap[0], qmap[-1])
  hi = np.clip(np.searchsorted(qmap, y), 1, len(qmap) - 1)
  return (qmap[hi] - qmap[hi - 1]) / 2 * absmax


def block_any(mask, block_size):
  """Per block of the last axis: whether any element of ``mask`` is set."""
  n = mask.shape[-1]
  padded = np.zeros(mask.shape[:-1] + (-(-n // block_size) * block_size,), bool)
  padded[..., :n] = mask
  return padded.reshape(mask.shape[:-1] + (-1, block_size)).any(-1)


def blockwise(absmax, block_size, n):
  """Each element's block value."""
  return np.repeat(absmax, block_size, axis=-1)[..., :n]


@pytest.mark.parametrize("name", BLOCKS)
def test_skip_zeros_leaves_zero_gradient_elements_and_blocks_alone(name, implementation):
  """Touched elements update as without skip_zeros; untouched ones get a zero update and keep
  their moments (within one re-encoding error of the new absmax); untouched blocks keep their bits."""
  shape, block_size = (9, 700), 128
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros(shape)}
  lazy, eager = (BLOCKS[name](skip_zeros=s, block_size=block_size, min_8bit_size=0) for s in (True, False))
  _, before = jax.jit(eager.update)({"w": dense(rng, shape)}, eager.init(params))
  g = sparse(rng, shape, block_size)
  u_lazy, after = jax.jit(lazy.update)({"w": g}, before)
  u_eager, _ = jax.jit(eager.update)({"w": g}, before)
  touched = np.asarray(g) != 0
  u_lazy, u_eager = np.asarray(u_lazy["w"]), np.asarray(u_eager["w"])
  # (Equal to float32 rounding: XLA:CPU may contract the reference's multiply-adds differently.)
  np.testing.assert_allclose(u_lazy[touched], u_eager[touched], rtol=2e-6, atol=1e-6 * np.abs(u_eager).max())
  assert np.all(u_lazy[~touched] == 0)
  blocks_touched = block_any(touched, block_size)
  assert (~blocks_touched).sum() >= 4  # zero rows and the zero block
  for old, new in zip(quantized_leaves(before), quantized_leaves(after)):
    np.testing.assert_array_equal(np.asarray(new.absmax)[~blocks_touched], np.asarray(old.absmax)[~blocks_touched])
    codes_kept = blockwise(~blocks_touched, block_size, shape[-1])
    np.testing.assert_array_equal(np.asarray(new.codes)[codes_kept], np.asarray(old.codes)[codes_kept])
    x_old, x_new = np.asarray(qz.dequantize_blockwise(old), np.float64), np.asarray(qz.dequantize_blockwise(new))
    bound = half_code_step(x_old, blockwise(np.asarray(new.absmax, np.float64), block_size, shape[-1]), new.signed)
    drift = np.abs(x_new - x_old)
    assert np.all(drift[~touched] <= bound[~touched] * (1 + 1e-6) + 1e-30)


def lazy_adam_numpy(params, grads, b1=0.9, b2=0.999, eps=1e-8, lr=1e-2):
  """Adam in float32 NumPy where a zero gradient element keeps its moments and does not move."""
  f32 = np.float32
  p, m, v = params.astype(f32), np.zeros_like(params, f32), np.zeros_like(params, f32)
  for t, g in enumerate(grads, start=1):
    touched = g != 0
    m = np.where(touched, f32(b1) * m + f32(1 - b1) * g, m)
    v = np.where(touched, f32(b2) * v + f32(1 - b2) * (g * g), v)
    u = (m / f32(1 - b1**t)) / (np.sqrt(v / f32(1 - b2**t)) + f32(eps))
    p = p - f32(lr) * np.where(touched, u, f32(0))
  return p


def test_skip_zeros_with_float32_state_is_lazy_adam():
  rng = np.random.default_rng(1)
  shape = (16, 300)
  grads = [np.asarray(sparse(rng, shape)) for _ in range(6)]
  params = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
  tx = optax8.adam8bit(1e-2, optim_bits=32, skip_zeros=True)
  state, step = tx.init(params), jax.jit(tx.update)
  p = params
  for g in grads:
    u, state = step({"w": jnp.asarray(g)}, state, p)
    p = optax.apply_updates(p, u)
  np.testing.assert_allclose(p["w"], lazy_adam_numpy(np.asarray(params["w"]), grads), rtol=2e-6, atol=1e-7)


def test_skip_zeros_by_label_applies_only_to_matching_parameters(implementation):
  rng = np.random.default_rng(2)
  params = {"embedding": jnp.zeros((64, 128)), "dense": jnp.zeros((64, 128))}
  tx = optax8.adam8bit(1e-2, overrides={"embedding": {"skip_zeros": True}})
  state = tx.init(params)
  _, state = tx.update({k: dense(rng, (64, 128)) for k in params}, state, params)
  zeros = {k: jnp.zeros((64, 128)) for k in params}
  u, _ = tx.update(zeros, state, params)
  assert float(jnp.abs(u["embedding"]).max()) == 0.0
  assert float(jnp.abs(u["dense"]).max()) > 0.0  # the momentum still moves it


def embedding_run(skip_zeros, steps=30, seed=0):
  """A bag-of-tokens regression: rows 0..99 of a 1000-token table appear in the first 10 steps only.

  Returns the rows' values after step 10 and at the end, and the losses.
  """
  vocab, dim = 1000, 32
  rng = np.random.default_rng(seed)
  target = jnp.asarray(rng.standard_normal((vocab,)), jnp.float32)
  params = {"embedding": jnp.asarray(rng.standard_normal((vocab, dim)) * 0.1, jnp.float32),
            "head": jnp.asarray(rng.standard_normal((dim, 128)) * 0.1, jnp.float32)}
  tx = optax8.adamw8bit(3e-2, weight_decay=0.0, overrides={"embedding": {"skip_zeros": skip_zeros}})

  def loss_fn(params, tokens):
    features = params["embedding"][tokens].mean(1) @ params["head"]
    return jnp.mean((features.mean(-1) - target[tokens].mean(1)) ** 2)

  @jax.jit
  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state, losses, early = tx.init(params), [], None
  for t in range(steps):
    low = 0 if t < 10 else 100  # the first 100 rows leave the batches after step 10
    tokens = jnp.asarray(rng.integers(low, vocab // 2, (64, 8)))
    params, state, loss = step(params, state, tokens)
    losses.append(float(loss))
    if t == 9:
      early = np.asarray(params["embedding"])
  return early, np.asarray(params["embedding"]), losses


def test_skip_zeros_keeps_embedding_rows_absent_from_batches_where_they_were():
  early, final, losses = embedding_run(skip_zeros=True)
  np.testing.assert_array_equal(final[:100], early[:100])  # absent since step 10: not moved
  np.testing.assert_array_equal(final[500:], embedding_run(skip_zeros=True, steps=1)[1][500:])  # never seen
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  early_eager, final_eager, _ = embedding_run(skip_zeros=False)
  assert np.abs(final_eager[:100] - early_eager[:100]).max() > 1e-3  # Adam's momentum drifts them


def unorm_numpy(u, p, max_unorm):
  u64, p64 = np.asarray(u, np.float64), np.asarray(p, np.float64)
  unorm, limit = np.linalg.norm(u64), max_unorm * np.linalg.norm(p64)
  return u64 * (limit / unorm if max_unorm > 0 and unorm > limit else 1.0)


@pytest.mark.parametrize("name", BLOCKS)
def test_max_unorm_scales_the_update_as_bitsandbytes_rule(name, implementation):
  rng = np.random.default_rng(3)
  params = {"big": dense(rng, (32, 256)) * 0.01, "zero": jnp.zeros((32, 256)), "large": dense(rng, (32, 256)) * 100}
  grads = {k: dense(rng, (32, 256)) for k in params}
  plain = BLOCKS[name](min_8bit_size=0)
  clipped = BLOCKS[name](min_8bit_size=0, max_unorm=0.5)
  u_plain, s_plain = jax.jit(plain.update)(grads, plain.init(params), params)
  u_clip, s_clip = jax.jit(clipped.update)(grads, clipped.init(params), params)
  for k in params:
    np.testing.assert_allclose(u_clip[k], unorm_numpy(u_plain[k], params[k], 0.5), rtol=1e-6, atol=1e-30)
  assert float(jnp.abs(u_clip["zero"]).max()) == 0.0  # bitsandbytes: a zero parameter does not move
  np.testing.assert_array_equal(u_clip["large"], u_plain["large"])  # within the limit: untouched
  for a, b in zip(jax.tree.leaves(s_plain), jax.tree.leaves(s_clip)):  # the state does not depend on it
    np.testing.assert_array_equal(a, b)


def test_max_unorm_in_adamw_clips_the_adam_step_but_not_the_decay(implementation):
  rng = np.random.default_rng(4)
  params, grads = {"w": dense(rng, (64, 256)) * 0.01}, {"w": dense(rng, (64, 256))}
  lr, wd = 1e-2, 0.1
  raw, _ = optax8.scale_by_adam8bit().update(grads, optax8.scale_by_adam8bit().init(params))
  tx = optax8.adamw8bit(lr, weight_decay=wd, max_unorm=0.1)
  u, _ = tx.update(grads, tx.init(params), params)
  expected = -lr * (unorm_numpy(raw["w"], params["w"], 0.1) + wd * np.asarray(params["w"], np.float64))
  np.testing.assert_allclose(u["w"], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_max_unorm_by_label_and_as_a_transformation_for_chains():
  rng = np.random.default_rng(5)
  params = {"w": dense(rng, (64, 128)) * 0.01, "bias": jnp.zeros((64, 128))}
  grads = {k: dense(rng, (64, 128)) for k in params}
  tx = optax8.adam8bit(1.0, max_unorm=0.1, overrides={"bias": {"max_unorm": 0.0}})
  u, _ = tx.update(grads, tx.init(params), params)
  chained = optax.chain(optax8.scale_by_adam8bit(), optax8.clip_by_unorm(0.1), optax.scale_by_learning_rate(1.0))
  u_chain, _ = chained.update(grads, chained.init(params), params)
  np.testing.assert_allclose(u["w"], u_chain["w"], rtol=1e-6)
  assert float(jnp.abs(u["bias"]).max()) > 0  # exempt: moves although its parameter is zero
  assert float(jnp.abs(u_chain["bias"]).max()) == 0


def test_max_unorm_is_injectable_without_recompiling():
  rng = np.random.default_rng(6)
  params, grads = {"w": dense(rng, (64, 128)) * 0.01}, {"w": dense(rng, (64, 128))}
  tx = optax.inject_hyperparams(optax8.adamw8bit)(learning_rate=1e-2, max_unorm=0.1)
  state = tx.init(params)
  step = jax.jit(tx.update)
  results = {}
  for value in (0.1, 0.0, 0.3):
    state.hyperparams["max_unorm"] = jnp.asarray(value)
    results[value] = step(grads, state, params)[0]["w"]
  assert step._cache_size() == 1
  for value, u in results.items():
    direct = optax8.adamw8bit(1e-2, max_unorm=value)
    np.testing.assert_allclose(u, direct.update(grads, direct.init(params), params)[0]["w"], rtol=1e-6)


def test_max_unorm_of_plain_sgd_is_injectable():
  params = {"w": jnp.full((64, 128), 0.01)}
  tx = optax.inject_hyperparams(optax8.sgd8bit)(learning_rate=1.0, max_unorm=0.5)
  updates, _ = jax.jit(tx.update)({"w": jnp.ones((64, 128))}, tx.init(params), params)
  np.testing.assert_allclose(jnp.linalg.norm(updates["w"]), 0.5 * jnp.linalg.norm(params["w"]), rtol=1e-5)


def regression_run(max_unorm, lr=0.3, steps=40):
  """A two-layer regression with a learning rate far too large for Adam; returns losses and step ratios."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
  y = jnp.sin(x @ jnp.asarray(rng.standard_normal((64,)), jnp.float32))
  params = {"w1": jnp.asarray(rng.standard_normal((64, 256)) * 0.1, jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((256, 64)) * 0.1, jnp.float32)}
  tx = optax8.adam8bit(lr, max_unorm=max_unorm)
  loss_fn = lambda p: jnp.mean(((jnp.tanh(x @ p["w1"]) @ p["w2"]).mean(-1) - y) ** 2)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    ratio = jnp.max(jnp.stack([jnp.linalg.norm(updates[k]) / jnp.linalg.norm(params[k]) for k in params]))
    return optax.apply_updates(params, updates), state, loss, ratio

  state, losses, ratios = tx.init(params), [], []
  for _ in range(steps):
    params, state, loss, ratio = step(params, state)
    losses.append(float(loss))
    ratios.append(float(ratio))
  return losses, ratios


def test_max_unorm_bounds_each_step_and_removes_the_loss_spike_of_a_run_with_large_updates():
  losses, ratios = regression_run(max_unorm=0.1)
  free_losses, free_ratios = regression_run(max_unorm=None)
  assert max(ratios) <= 0.3 * 0.1 * (1 + 1e-5)  # lr * max_unorm
  assert max(free_ratios) > 10 * max(ratios)
  assert max(free_losses) > 10 * free_losses[0]  # unclipped Adam at this learning rate jumps
  assert max(losses) <= losses[0] and losses[-1] < 0.5 * free_losses[-1]


def orbax_round_trip(path, state, target):
  """``state`` saved with Orbax and restored into ``target``; checks the leaves are the same."""
  import orbax.checkpoint as ocp

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(path, target)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  return restored


def test_update_options_survive_an_orbax_round_trip(tmp_path):
  rng = np.random.default_rng(8)
  params = {"w": dense(rng, (32, 512)) * 0.1}
  grads = [{"w": sparse(rng, (32, 512))} for _ in range(4)]
  tx = optax8.adamw8bit(1e-2, skip_zeros=True, max_unorm=0.05)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  p, s = params, tx.init(params)
  for g in grads[:2]:
    p, s = step(p, s, g)
  restored = orbax_round_trip(tmp_path / "state", s, jax.eval_shape(tx.init, params))
  p1, s1, p2, s2 = p, s, p, restored
  for g in grads[2:]:
    p1, s1 = step(p1, s1, g)
    p2, s2 = step(p2, s2, g)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: optax8.adam8bit(1e-3, max_unorm=-1.0), ValueError, "max_unorm must be >= 0, got -1.0"),
        (lambda: optax8.adam8bit(1e-3, max_unorm="big"), TypeError, "max_unorm must be a float"),
        (lambda: optax8.sgd8bit(1e-3, momentum=0.9, skip_zeros=1), TypeError, "skip_zeros must be a bool, got 1"),
        (lambda: optax8.lion8bit(1e-3, overrides={"w": {"skip_zeros": "yes"}}), TypeError,
         r"overrides\['w'\]\['skip_zeros'\] must be a bool"),
        (lambda: optax8.rmsprop8bit(1e-3, overrides={"w": {"max_unorm": -0.5}}), ValueError,
         r"overrides\['w'\]\['max_unorm'\] must be >= 0"),
        (lambda: optax8.clip_by_unorm(-0.1), ValueError, "max_unorm must be >= 0, got -0.1"),
        (lambda: optax8.adam8bit(1e-3, stochastic_rounding="yes"), TypeError,
         "stochastic_rounding must be a bool, got 'yes'"),
        (lambda: optax8.adam8bit(1e-3, overrides={"w": {"stochastic_rounding": 1}}), TypeError,
         r"overrides\['w'\]\['stochastic_rounding'\] must be a bool"),
        (lambda: optax8.clip_by_unorm(None), TypeError, "max_unorm must be a float >= 0, got None"),
    ],
)
def test_bad_update_options_are_refused_naming_the_option(make, error, message):
  with pytest.raises(error, match=message):
    make()


@pytest.mark.parametrize("tx", [optax8.adam8bit(1e-3, max_unorm=0.1), optax8.clip_by_unorm(0.1)],
                         ids=["alias", "transformation"])
def test_max_unorm_without_params_asks_for_them(tx):
  params = {"w": jnp.ones((64, 128))}
  with pytest.raises(ValueError, match=r"update\(grads, state, params\)"):
    tx.update(params, tx.init(params))


def test_skip_zeros_and_max_unorm_pass_through_rmsprop_to_its_trace():
  tx = optax8.rmsprop8bit(1e-2, momentum=0.9, skip_zeros=True, max_unorm=0.1,
                          overrides={"w": {"skip_zeros": False}})
  params = {"w": jnp.ones((64, 128)), "v": jnp.ones((64, 128))}
  state = tx.init(params)
  zeros = {k: jnp.zeros((64, 128)) for k in params}
  rng = np.random.default_rng(9)
  _, state = tx.update({k: dense(rng, (64, 128)) for k in params}, state, params)
  u, _ = functools.partial(tx.update, params=params)(zeros, state)
  assert float(jnp.abs(u["v"]).max()) == 0.0  # lazy in both states
  assert float(jnp.abs(u["w"]).max()) > 0.0  # its trace still moves it
