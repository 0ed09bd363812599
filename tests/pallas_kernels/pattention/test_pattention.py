"""pattention: the TPU and GPU kernels, interpreted on CPU, against the reference and against
the released formula written independently; the float32 erf of the Triton kernel."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import _common
from pallas_kernels.pattention import reference
from tests.pallas_kernels import util

# 37 tokens in blocks of 16, 300 parameter tokens in blocks of 128: nothing divides evenly.
T, D_IN, N, D_OUT = 37, 96, 300, 80
BLOCKS = dict(block_t=16, block_n=128)
INTERPRET = pytest.mark.parametrize("impl", util.INTERPRETERS)


def _inputs(dtype=jnp.float32, seed=0):
  k = util.keys(seed, 3)
  return (util.normal(k[0], (T, D_IN), dtype), util.normal(k[1], (N, D_IN), dtype),
          util.normal(k[2], (N, D_OUT), dtype, N ** -0.5))


@INTERPRET
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pattention_matches_reference(impl, dtype):
  x, k_p, v_p = _inputs(dtype)
  out = util.jit_call(pallas_kernels.pattention, x, k_p, v_p, impl=impl, **BLOCKS)
  util.assert_matches(out, util.jit_call(pallas_kernels.pattention, x, k_p, v_p, impl="xla"))


def _released_theta_v(x, k_p, v_p):
  """The released TokenFormer Pattention (Haiyang-W/TokenFormer megatron/model/tokenformer.py,
  'l2_norm_gelu'): S = X K^T, S / ||S_i||_2 * sqrt(n), F.gelu (exact, erf), times V. float64
  numpy with math.erf: shares no code with the package."""
  s = np.asarray(x, np.float64) @ np.asarray(k_p, np.float64).T
  a = s / np.linalg.norm(s, axis=1, keepdims=True) * math.sqrt(s.shape[1])
  erf = np.vectorize(math.erf)
  return (0.5 * a * (1.0 + erf(a / math.sqrt(2.0)))) @ np.asarray(v_p, np.float64)


@pytest.mark.parametrize("impl", ("xla",) + util.INTERPRETERS)
def test_pattention_matches_the_released_formula_to_1e_5_relative_in_float32(impl):
  x, k_p, v_p = _inputs()
  out = np.asarray(util.jit_call(pallas_kernels.pattention, x, k_p, v_p, impl=impl, **BLOCKS),
                   np.float64)
  expected = _released_theta_v(x, k_p, v_p)
  # Whole-output relative error (an element near 0 carries its large terms' rounding) and per
  # element against the output's scale. The tanh GeLU is 2-3e-4 off, so this tells them apart.
  assert np.linalg.norm(out - expected) / np.linalg.norm(expected) <= 1e-5
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _released_loss(x, k_p, v_p, cotangent):
  """sum(cotangent * released Pattention) in jnp, written independently of the package."""
  s = x @ k_p.T
  a = s / jnp.linalg.norm(s, axis=1, keepdims=True) * jnp.sqrt(1.0 * s.shape[1])
  return jnp.sum(cotangent * ((0.5 * a * (1.0 + jax.scipy.special.erf(a / jnp.sqrt(2.0)))) @ v_p))


@INTERPRET
def test_pattention_gradients_match_the_released_formulas_float64_gradient(impl):
  x, k_p, v_p = _inputs()
  cotangent = util.normal(util.keys(3, 1)[0], (T, D_OUT))
  got = jax.jit(jax.grad(lambda *a: jnp.sum(
      pallas_kernels.pattention(*a, impl=impl, **BLOCKS) * cotangent), argnums=(0, 1, 2)))(
          x, k_p, v_p)
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, k_p, v_p, cotangent)]
    want = jax.grad(_released_loss, argnums=(0, 1, 2))(*args)
    want = [np.asarray(w) for w in want]
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-4,
                               atol=1e-5 * np.abs(w).max())


def test_erf_f32_matches_jax_scipy_erf_to_float32_accuracy_on_a_dense_grid():
  x = np.linspace(-9.0, 9.0, 1_800_001, dtype=np.float32)
  with jax.enable_x64(True):
    truth = np.asarray(jax.scipy.special.erf(jnp.asarray(x, jnp.float64)))
    truth_c = np.asarray(jax.scipy.special.erfc(jnp.asarray(x, jnp.float64)))
  erf = np.asarray(jax.jit(_common.erf_f32)(x), np.float64)
  erfc = np.asarray(jax.jit(_common.erfc_f32)(x), np.float64)
  assert np.abs(erf - truth).max() <= 1.5e-7
  assert np.abs(erfc - truth_c).max() <= 2.5e-7  # 2 ulp of erfc near 1.5
  # Relative accuracy where erfc is small: 2e-6 down to erfc(4) = 1.5e-8; further out the
  # float32 rounding of -x^2 in exp(-x^2 + ...) (ulp(x^2) ~ 1e-6 x^2) sets it, <= 1e-5 to
  # erfc(9) = 4e-37.
  rel = np.abs(erfc - truth_c) / truth_c
  assert rel[(x > 0.8) & (x <= 4.0)].max() <= 2e-6
  assert rel[(x > 4.0) & (truth_c > 1e-37)].max() <= 1e-5
  # and GeLU from it, relative even in the negative tail.
  gelu = np.asarray(jax.jit(_common.gelu_exact_triton)(x), np.float64)
  with jax.enable_x64(True):
    gelu_truth = np.asarray(jax.nn.gelu(jnp.asarray(x, jnp.float64), approximate=False))
  rel = np.abs(gelu - gelu_truth) / np.maximum(np.abs(gelu_truth), 1e-300)
  assert rel[x >= -4.0 * math.sqrt(2.0)].max() <= 5e-6  # incl. the rounding of x / sqrt 2
  assert rel[(x < -4.0 * math.sqrt(2.0)) & (np.abs(gelu_truth) > 1e-36)].max() <= 2e-5


@INTERPRET
def test_zero_parameter_tokens_added_with_the_old_tau_leave_the_output_unchanged(impl):
  # TokenFormer grows a model by appending zero-initialised key/value tokens; keeping tau at its
  # old value keeps every row norm, so the function is unchanged.
  x, k_p, v_p = _inputs()
  grown_k = jnp.concatenate([k_p, jnp.zeros((60, D_IN))])
  grown_v = jnp.concatenate([v_p, jnp.zeros((60, D_OUT))])
  grown = util.jit_call(pallas_kernels.pattention, x, grown_k, grown_v, tau=math.sqrt(N),
                        impl=impl, **BLOCKS)
  util.assert_matches(grown, util.jit_call(pallas_kernels.pattention, x, k_p, v_p, impl="xla"))


def test_leading_dims_are_flattened_into_tokens():
  x, k_p, v_p = _inputs()
  batched = pallas_kernels.pattention(jnp.stack([x, -x]), k_p, v_p, impl="xla")
  assert batched.shape == (2, T, D_OUT)
  util.assert_matches(batched[1], reference.pattention(-x, k_p, v_p, tau=math.sqrt(N)))


@pytest.mark.skipif("interpret" not in util.INTERPRETERS and jax.default_backend() != "tpu",
                    reason="runs the TPU kernel: interpreted, or compiled on a TPU")
def test_tpu_kernel_without_the_score_cache_recomputes_the_scores_and_agrees(monkeypatch):
  from pallas_kernels.pattention import tpu  # pylint: disable=g-import-not-at-top
  impl = "interpret" if "interpret" in util.INTERPRETERS else "pallas"
  x, k_p, v_p = _inputs()
  assert tpu._blocks(T, N, D_IN, D_OUT, jnp.float32, 16, 128)[2]  # cached by default here
  monkeypatch.setattr(tpu, "CACHE_BYTES", 0)
  assert not tpu._blocks(T, N, D_IN, D_OUT, jnp.float32, 16, 128)[2]
  out = util.jit_call(pallas_kernels.pattention, x, k_p, v_p, impl=impl, **BLOCKS)
  util.assert_matches(out, util.jit_call(pallas_kernels.pattention, x, k_p, v_p, impl="xla"))


@pytest.mark.parametrize("impl", util.INTERPRETERS)
def test_split_halves_summed_over_key_shards_give_the_whole_op(impl):
  # What the op runs with its parameter tokens split over a mesh axis, here over 2 halves by
  # hand: the halves' row norms summed, each half attending with the full norm, summed.
  from pallas_kernels.pattention import gpu, tpu  # pylint: disable=g-import-not-at-top
  backend, interpret = util.kernel_module(impl, tpu, gpu)
  x, k_p, v_p = _inputs()
  tau = math.sqrt(N)
  halves = [(k_p[:150], v_p[:150]), (k_p[150:], v_p[150:])]
  blocks = dict(block_t=16, block_n=128)
  ss = sum(jax.jit(lambda x, k: backend.row_norms(x, k, interpret=interpret, **blocks))(x, k)
           for k, _ in halves)
  np.testing.assert_allclose(ss, reference.row_norms(x, k_p), rtol=1e-5)
  out = sum(jax.jit(lambda x, k, v, ss: backend.attend(
      x, k, v, ss, tau=tau, out_dtype=jnp.float32, interpret=interpret, **blocks))(x, k, v, ss)
            for k, v in halves)
  util.assert_matches(out, reference.pattention(x, k_p, v_p, tau=tau))


def test_tpu_blocks_for_bf16_at_d_4096_fit_the_default_scoped_vmem_of_v5e():
  from pallas_kernels.pattention import tpu  # pylint: disable=g-import-not-at-top
  tt, tn, cached, vmem = tpu._blocks(8192, 4096, 4096, 4096, jnp.bfloat16, 256, 512)
  # Counted independently: double-buffered x [tt, d], K [tn, d], V [tn, d], out [tt, d] in bf16,
  # the f32 accumulator [tt, d] and row norms [tt, 128], the f32 score cache [tt, n].
  d, n = 4096, 4096
  counted = 2 * 2 * (tt * d + 2 * tn * d + tt * d) + 4 * tt * (d + 128) + (4 * tt * n) * cached
  assert vmem == counted and counted <= 16 * 2 ** 20, (tt, tn, cached, counted)
  assert tt % 16 == 0 and tn % 128 == 0 and cached
