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


def test_gradients_match_the_reference():
  qkv = _qkv()
  cotangent = util.normal(util.keys(9, 1)[0], (B, T, H, D))
  grads = {i: jax.jit(jax.grad(lambda *a: jnp.sum(_attend(i, *a, causal=True) * cotangent),
                               argnums=(0, 1, 2)))(*qkv) for i in ("interpret_gpu", "xla")}
  for got, want in zip(grads["interpret_gpu"], grads["xla"]):
    util.assert_matches(got, want)


@CAUSAL
def test_reference_at_full_length_equals_dense_attention(causal):
  q, k, v = _qkv()
  full = jnp.full((B,), T, jnp.int32)
  np.testing.assert_allclose(_attend("xla", q, k, v, full, causal),
                             jax.nn.dot_product_attention(q, k, v, is_causal=causal),
                             rtol=1e-5, atol=1e-5)
