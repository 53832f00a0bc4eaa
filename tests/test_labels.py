"""Per-parameter options by label."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax8

PARAMS = {
    "params": {
        "Embed_0": {"embedding": jnp.ones((512, 64))},
        "Dense_0": {"kernel": jnp.ones((64, 512)), "bias": jnp.zeros((512,))},
        "Attn": {"query": {"kernel": jnp.ones((64, 256))}},
    }
}


def grads_like(params, seed=0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])


def test_default_labels_are_slash_joined_tree_paths():
  labels = optax8.default_labels(PARAMS)
  assert labels["params"]["Embed_0"]["embedding"] == "params/Embed_0/embedding"
  assert labels["params"]["Attn"]["query"]["kernel"] == "params/Attn/query/kernel"


def test_flax_nnx_labels_leave_out_the_variable_value_attribute():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  labels = optax8.default_labels(nnx.state(model, nnx.Param))
  assert sorted(jax.tree.leaves(labels)) == ["bias", "kernel"]


def test_flax_linen_boxed_params_are_labelled_by_their_path():
  nn = pytest.importorskip("flax.linen")
  dense = nn.Dense(3, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")))
  params = dense.init(jax.random.key(0), jnp.ones((1, 4)))
  labels = optax8.default_labels(params)
  assert labels["params"]["kernel"] == "params/kernel" and labels["params"]["bias"] == "params/bias"


def test_overrides_set_bits_and_block_size_per_label():
  tx = optax8.adam8bit(1e-3, min_8bit_size=0, overrides={
      "*embed*": {"optim_bits": 32},  # case-sensitive: does not match Embed_0
      "*Embed_0*": {"optim_bits": 32},
      "*/Attn/*": {"block_size": 128},
  })
  mu = tx.init(PARAMS)[0].mu["params"]
  assert mu["Embed_0"]["embedding"].dtype == jnp.float32
  assert mu["Attn"]["query"]["kernel"].block_size == 128
  assert mu["Attn"]["query"]["kernel"].absmax.shape == (64, 2)
  assert mu["Dense_0"]["kernel"].block_size == 256


def test_later_patterns_override_earlier_ones():
  tx = optax8.adam8bit(1e-3, min_8bit_size=0, overrides={"*": {"block_size": 64}, "*Dense_0*": {"block_size": 32}})
  mu = tx.init(PARAMS)[0].mu["params"]
  assert mu["Dense_0"]["kernel"].block_size == 32 and mu["Attn"]["query"]["kernel"].block_size == 64


def test_keep_embeddings_32bit_recipe_replaces_stable_embedding():
  tx = optax8.adamw8bit(1e-3, overrides={"*embed*": {"optim_bits": 32}},
                        param_labels=lambda p: jax.tree.map(str.lower, optax8.default_labels(p)))
  state = tx.init(PARAMS)[0]
  assert state.mu["params"]["Embed_0"]["embedding"].dtype == jnp.float32
  assert isinstance(state.mu["params"]["Dense_0"]["kernel"], optax8.QuantizedArray)


def test_per_label_hyperparameters_apply_only_to_their_parameters():
  tx = optax8.adam8bit(1e-3, min_8bit_size=0, overrides={"*Dense_0/kernel": {"b1": 0.0}})
  plain = optax8.adam8bit(1e-3, min_8bit_size=0)
  no_momentum = optax8.adam8bit(1e-3, b1=0.0, min_8bit_size=0)
  g = grads_like(PARAMS)
  u = tx.update(g, tx.init(PARAMS), PARAMS)[0]["params"]
  u_plain = plain.update(g, plain.init(PARAMS), PARAMS)[0]["params"]
  u_nom = no_momentum.update(g, no_momentum.init(PARAMS), PARAMS)[0]["params"]
  np.testing.assert_array_equal(u["Dense_0"]["kernel"], u_nom["Dense_0"]["kernel"])
  np.testing.assert_array_equal(u["Attn"]["query"]["kernel"], u_plain["Attn"]["query"]["kernel"])


def test_param_labels_tree_and_patterns_give_identical_states():
  by_pattern = optax8.adam8bit(1e-3, min_8bit_size=0, overrides={"*Dense_0*": {"block_size": 64}})
  label_tree = jax.tree.map(lambda _: "other", PARAMS)
  label_tree["params"]["Dense_0"] = {"kernel": "dense", "bias": "dense"}
  by_tree = optax8.adam8bit(1e-3, min_8bit_size=0, overrides={"dense": {"block_size": 64}},
                            param_labels=label_tree)
  g = grads_like(PARAMS)
  a = by_pattern.update(g, by_pattern.init(PARAMS), PARAMS)
  b = by_tree.update(g, by_tree.init(PARAMS), PARAMS)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_same_optimizer_gives_identical_results_for_rebuilt_trees_and_under_jit():
  tx = optax8.adam8bit(1e-3, min_8bit_size=0, overrides={"*Attn*": {"block_size": 64, "b2": 0.99}})
  g = grads_like(PARAMS)
  rebuilt = jax.tree.map(lambda x: jnp.array(np.asarray(x)), PARAMS)
  eager = tx.update(g, tx.init(PARAMS), PARAMS)
  jitted = jax.jit(tx.update)(jax.tree.map(jnp.copy, g), tx.init(rebuilt), rebuilt)
  jax.tree.map(np.testing.assert_array_equal, eager, jitted)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(overrides={"*": {"bogus": 1}}), ValueError, r"overrides\['\*'\]: unknown option 'bogus'"),
        (dict(overrides={"*": {"learning_rate": 1.0}}), ValueError, "optax.partition"),
        (dict(overrides={"*": {"weight_decay": 0.1}}), ValueError, "mask"),
        (dict(overrides={"*": {"block_size": -1}}), ValueError, r"block_size'\] must be a positive int, got -1"),
        (dict(overrides={"*": {"b1": 1.5}}), ValueError, r"b1'\] must be in \[0, 1\), got 1.5"),
        (dict(overrides={"*": {"optim_bits": 4}}), ValueError, "must be 8 or 32, got 4"),
        (dict(overrides=["*"]), TypeError, "overrides must be a mapping"),
        (dict(overrides={"*": 32}), TypeError, r"overrides\['\*'\] must be a dict"),
    ],
)
def test_bad_overrides_raise_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax8.adam8bit(1e-3, **kwargs)


def test_pattern_matching_nothing_raises_naming_the_pattern():
  tx = optax8.adam8bit(1e-3, overrides={"*lm_head*": {"optim_bits": 32}})
  with pytest.raises(ValueError, match=r"'\*lm_head\*' matches no parameter label"):
    tx.init(PARAMS)


def test_bad_label_trees_raise():
  with pytest.raises(ValueError, match="same tree structure"):
    optax8.adam8bit(1e-3, param_labels={"a": "x"}).init(PARAMS)
  with pytest.raises(TypeError, match="must hold strings, got 3"):
    optax8.adam8bit(1e-3, param_labels=lambda p: jax.tree.map(lambda _: 3, p)).init(PARAMS)


def test_labels_work_inside_optax_partition():
  tx = optax.partition(
      {"q": optax8.adam8bit(1e-3, min_8bit_size=0, overrides={"*Dense_0/kernel": {"block_size": 64}}),
       "f": optax.adam(1e-3)},
      lambda p: jax.tree.map(lambda _: "q", p),
  )
  state = tx.init(PARAMS)
  inner = state.inner_states["q"].inner_state[0]
  assert inner.mu["params"]["Dense_0"]["kernel"].block_size == 64
