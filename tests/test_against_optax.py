"""bitsandbytes' 50-step procedure: each 8-bit optimizer against its 32-bit counterpart.

Every step both take the same gradient; then the dequantized 8-bit moments are checked against
the 32-bit ones, the parameters against the 32-bit run's, and the 32-bit run is
re-synchronised to the 8-bit one (so each step measures one step's deviation), with
bitsandbytes' own thresholds. For float32 parameters the counterpart is the optax optimizer
itself; for 16-bit parameters it is the same optax8 optimizer with ``optim_bits=32`` on the
same 16-bit parameters, so both round updates and parameters alike and only the state's
quantization differs (``test_32bit_state_equals_optax`` ties that path to optax).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import CASE_NAMES, CASES_BY_NAME, moments_of

STEPS = 50
CORE = ["adam", "adamw", "sgd"]
# (mean abs, mean rel) parameter error bounds by dtype, from bitsandbytes' test_optimizer8bit.
PARAM_BOUNDS = {jnp.float32: (6e-5, 6e-4), jnp.float16: (6e-5, 6.2e-4), jnp.bfloat16: (1.7e-4, 1.6e-3)}
DTYPES = list(PARAM_BOUNDS)
DEVIATIONS = {}  # (case, shape, dtype) -> largest deviations seen, reported at the end


def run_procedure(name, shape, dtype, seed=0, check=True, row_scales=None, **options):
  """Runs the procedure; returns the largest deviations seen.

  Args:
    check: assert bitsandbytes' bounds.
    row_scales: scale the gradient's rows by these factors (bitsandbytes' procedure: all 1).
    **options: the optimizer's quantization options.
  """
  case = CASES_BY_NAME[name]
  tx = case.make(case.lr, **options)
  ref = case.reference(case.lr) if dtype == jnp.float32 else case.make(case.lr, optim_bits=32)
  key_p, key_g = jax.random.split(jax.random.key(seed))
  params = {"w": (jax.random.normal(key_p, shape) * 0.1).astype(dtype)}
  ref_params = params
  state, ref_state = tx.init(params), ref.init(ref_params)

  @jax.jit
  def step(params, state, ref_params, ref_state, g):
    updates, state = tx.update(g, state, params)
    ref_updates, ref_state = ref.update(g, ref_state, ref_params)
    return optax.apply_updates(params, updates), state, optax.apply_updates(ref_params, ref_updates), ref_state

  worst = dict(state_mismatches=0, state_rel=0.0, param_abs=0.0, param_rel=0.0)
  abs_bound, rel_bound = PARAM_BOUNDS[dtype]
  for key in jax.random.split(key_g, STEPS):
    g = jax.random.normal(key, shape) * 0.01
    g = {"w": (g if row_scales is None else g * row_scales[:, None]).astype(dtype)}
    params, state, ref_params, ref_state = step(params, state, ref_params, ref_state, g)
    ours = moments_of(state, case.moments)
    for field, tree in ours.items():
      got, want = np.asarray(tree["w"]), np.asarray(optax.tree.get(ref_state, field)["w"])
      mismatches = int(np.sum(~np.isclose(want, got, atol=3e-3, rtol=1e-3)))
      worst["state_mismatches"] = max(worst["state_mismatches"], mismatches)
      # The state's quantization error (the mismatch count's tolerance hides it at this scale).
      worst["state_rel"] = max(worst["state_rel"], float(np.abs(got - want).mean() / (np.abs(want).mean() + 1e-30)))
      assert not check or mismatches < 20, f"{field}: {mismatches} elements off"
    p, p_ref = np.asarray(params["w"], np.float32), np.asarray(ref_params["w"], np.float32)
    err = np.abs(p_ref - p)
    # bitsandbytes floors |p| at 1e-9; a 16-bit parameter that rounds to 0 in one run and not in
    # the other would dominate that mean, so 16-bit runs floor it at their resolution's tenth.
    floor = 1e-9 if dtype == jnp.float32 else float(jnp.finfo(dtype).resolution) / 10
    rel = err / (np.abs(p_ref) + floor)
    worst["param_abs"] = max(worst["param_abs"], float(err.mean()))
    worst["param_rel"] = max(worst["param_rel"], float(rel.mean()))
    assert not check or (err.mean() < abs_bound and rel.mean() < rel_bound), (err.mean(), rel.mean())
    # Re-synchronise: the 32-bit run continues from the 8-bit run's parameters and moments.
    ref_params = params
    ref_state = optax.tree.set(ref_state, **ours)
  label = name + "".join(f" {k}={v}" for k, v in options.items()) + (" rows scaled" if row_scales is not None else "")
  DEVIATIONS[(label, shape, jnp.dtype(dtype).name)] = worst
  return worst


@pytest.mark.parametrize("name", CASE_NAMES)
def test_32bit_state_equals_optax(name):
  case = CASES_BY_NAME[name]
  tx, ref = case.make(case.lr, optim_bits=32), case.reference(case.lr)
  params = {"w": jax.random.normal(jax.random.key(0), (64, 300)) * 0.1, "b": jnp.zeros((7,))}
  state, ref_state = tx.init(params), ref.init(params)
  for seed in range(10):
    g = {k: jax.random.normal(jax.random.key(seed), p.shape) * 0.01 for k, p in params.items()}
    u, state = tx.update(g, state, params)
    u_ref, ref_state = ref.update(g, ref_state, params)
    # Equal up to float32 rounding (operation order differs, e.g. in the bias corrections).
    np.testing.assert_allclose(u["w"], u_ref["w"], rtol=1e-4, atol=1e-8)
    params = optax.apply_updates(params, u)
  for field in case.moments:
    np.testing.assert_allclose(
        optax.tree.get(state, field)["w"], optax.tree.get(ref_state, field)["w"], rtol=1e-4, atol=1e-8
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(1024, 32), (1024, 1024), (1024, 4097)], ids=str)
@pytest.mark.parametrize("name", CORE)
def test_core_optimizers_track_optax_within_bitsandbytes_thresholds(name, shape, dtype):
  if shape == (1024, 4097) and dtype != jnp.float32:
    pytest.skip("the ragged large shape runs in float32; smaller ragged shapes cover 16-bit below")
  run_procedure(name, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(1024, 32), (64, 4097)], ids=str)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_optimizer_tracks_optax_within_bitsandbytes_thresholds(name, shape, dtype):
  run_procedure(name, shape, dtype)


@pytest.mark.parametrize("name", ["adam", "sgd", "adagrad"])
def test_tensor_wise_scale_keeps_the_state_less_exactly_than_blockwise(name):
  """bitsandbytes' block_wise=False against the blockwise default, on its procedure with iid
  gradients and with gradient rows of scales spread over three decades."""
  row_scales = 10.0 ** jax.random.uniform(jax.random.key(1), (256,), minval=-3, maxval=0)
  for scales in (None, row_scales):
    blockwise = run_procedure(name, (256, 1024), jnp.float32, row_scales=scales)
    tensor_wise = run_procedure(name, (256, 1024), jnp.float32, row_scales=scales, block_wise=False)
    assert blockwise["state_rel"] < tensor_wise["state_rel"], (blockwise, tensor_wise)


@pytest.fixture(scope="module", autouse=True)
def report_deviations():
  yield
  if DEVIATIONS:
    print("\nlargest one-step deviation from the optax float32 counterpart")
    print(f"{'optimizer':34} {'shape':12} {'dtype':9} {'state mism.':>11} {'state rel':>9} {'mean |dp|':>10} "
          f"{'mean rel':>9}")
    for (name, shape, dtype), w in sorted(DEVIATIONS.items(), key=str):
      print(f"{name:34} {str(shape):12} {dtype:9} {w['state_mismatches']:>11} {w['state_rel']:>9.2e} "
            f"{w['param_abs']:>10.2e} {w['param_rel']:>9.2e}")

