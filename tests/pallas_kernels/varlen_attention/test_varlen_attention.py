"""varlen_attention: the TPU and GPU kernels, interpreted on CPU, against the reference; its spec."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from tests.pallas_kernels import util

# Lengths: full, empty, partial; 37 tokens in blocks of 16.
B, T, H, D = 3, 37, 2, 40
LENGTHS = jnp.array([37, 0, 20], jnp.int32)
BLOCKS = dict(block_q=16, block_k=16)
INTERPRET = pytest.mark.parametrize("impl", util.INTERPRETERS)
CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])


def _qkv(dtype=jnp.float32, seed=0):
  return tuple(util.normal(k, (B, T, H, D), dtype) for k in util.keys(seed, 3))


def _attend(impl, q, k, v, lengths=LENGTHS, causal=False):
  return util.jit_call(pallas_kernels.varlen_attention, q, k, v, lengths, causal=causal,
                       impl=impl, **BLOCKS)


@INTERPRET
@CAUSAL
def test_varlen_attention_matches_reference(impl, causal):
  qkv = _qkv()
  util.assert_matches(_attend(impl, *qkv, causal=causal), _attend("xla", *qkv, causal=causal))


@INTERPRET
def test_varlen_attention_bf16_matches_reference(impl):
  qkv = _qkv(jnp.bfloat16)
  util.assert_matches(_attend(impl, *qkv), _attend("xla", *qkv))


@INTERPRET
@CAUSAL
def test_queries_past_the_length_are_exactly_zero(impl, causal):
  out = np.asarray(_attend(impl, *_qkv(), causal=causal))
  valid = np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]
  assert not out[~valid].any() and np.isfinite(out).all()


@INTERPRET
def test_keys_and_values_past_the_length_are_ignored_even_when_nan(impl):
  q, k, v = _qkv()
  past = (jnp.arange(T)[None, :] >= LENGTHS[:, None])[:, :, None, None]
  poisoned = [jnp.where(past, jnp.nan, a) for a in (k, v)]
  util.assert_matches(_attend(impl, q, *poisoned), _attend("xla", q, k, v))


def _independent_loss(q, k, v, cotangent, lengths, causal):
  """sum(cotangent * attention) written per example on its first L tokens (zeros past L), with
  no masking constants: shares no code with the package."""
  outs = []
  for b, n in enumerate(lengths):
    if n == 0:  # an empty example's output is all zeros
      outs.append(jnp.zeros(q.shape[1:], q.dtype))
      continue
    qb, kb, vb = q[b, :n], k[b, :n], v[b, :n]
    s = jnp.einsum("qhd,khd->hqk", qb, kb) / jnp.sqrt(1.0 * q.shape[-1])
    if causal:
      s = jnp.where(jnp.tril(jnp.ones((n, n), bool))[None], s, -jnp.inf)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    out = jnp.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), vb)
    outs.append(jnp.concatenate([out, jnp.zeros((q.shape[1] - n,) + out.shape[1:], out.dtype)]))
  return jnp.sum(cotangent * jnp.stack(outs))


@INTERPRET
@CAUSAL
def test_gradients_match_an_independent_formulas_float64_gradient(impl, causal):
  qkv = _qkv()
  cotangent = util.normal(util.keys(9, 1)[0], (B, T, H, D))
  got = jax.jit(jax.grad(lambda *a: jnp.sum(_attend(impl, *a, causal=causal) * cotangent),
                         argnums=(0, 1, 2)))(*qkv)
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(a), jnp.float64) for a in qkv + (cotangent,)]
    want = jax.grad(_independent_loss, argnums=(0, 1, 2))(
        *args, [int(n) for n in LENGTHS], causal)
    want = [np.asarray(w) for w in want]
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-4,
                               atol=1e-5 * np.abs(w).max())


@CAUSAL
def test_reference_at_full_length_equals_dense_attention(causal):
  q, k, v = _qkv()
  full = jnp.full((B,), T, jnp.int32)
  np.testing.assert_allclose(_attend("xla", q, k, v, full, causal),
                             jax.nn.dot_product_attention(q, k, v, is_causal=causal),
                             rtol=1e-5, atol=1e-5)
