"""Generation for every LM method config, in its inference mode (tiny float32 models).

Each config is parsed as the entry points parse it, shrunk to a tiny size, with routed units in
causal mode (what eval.py and scripts/generate.py use). For every one: the logits are causal
(exactly; to float32 rounding with routed attention), KV-cache decoding equals the
teacher-forced forward pass at every position (under the SkipDecode schedule where the config
has one), and a row's logits do not depend on the other rows of its batch.
"""
import functools

import flax
import gin
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adacomp import decoding, gin_utils, scoring, tasks
from adacomp.methods.informed_routing import factories
from adacomp.methods.skipdecode import schedule as skip_schedule
from adacomp.models import build

VOCAB, T, PROMPT = 40, 14, 4
TINY = ["DecoderConfig.num_layers = 3", "DecoderConfig.d_model = 32",
        "DecoderConfig.num_heads = 2", "DecoderConfig.head_dim = 16",
        "DecoderConfig.d_ff = 64", "DecoderConfig.max_len = 64",
        "DecoderConfig.dtype = 'float32'", f"PROMPT_LEN = {PROMPT}",
        "tokenformer_attention.n_qkv = 16", "tokenformer_attention.n_out = 16",
        "tokenformer_ffn.n_ffn = 32"]
# (config, extra bindings): every LM method config, and MoD with its attention routed too.
CONFIGS = {
    "dense": ("dense.gin", []),
    "duo": ("duo.gin", []),
    "duo_router": ("duo_router.gin", []),
    "informed_routing": ("informed_routing.gin", []),
    "informed_routing_gather": ("informed_routing.gin", ["routed_ffn.compute = 'gather'"]),
    "informed_routing_lora": ("informed_routing_lora.gin", []),
    "mod": ("mod.gin", []),
    "mod_attention": ("mod.gin", ["DecoderConfig.attention_cls = @routed_attention()",
                                  "routed_attention.mode = 'greedy'",
                                  "routed_attention.sparsity = %SPARSITY",
                                  "routed_attention.compute = 'gather'",
                                  "routed_ffn.compute = 'gather'"]),
    "skipdecode": ("skipdecode.gin", []),
    "duo_skipdecode": ("duo_skipdecode.gin", []),
    "tokenformer": ("tokenformer.gin", []),
    "tokenformer_duo": ("tokenformer_duo.gin", []),
}


def _randomize(params, key):
  """Non-trivial routed parts: trained-looking forecasters, LoRA B and thresholds."""
  flat = flax.traverse_util.flatten_dict(params)
  for i, (path, value) in enumerate(sorted(flat.items())):
    if (path[-1] == "up" and "forecaster" in path) or path[-2:] in (("lora_wi", "b"),
                                                                     ("lora_wo", "b")):
      flat[path] = 0.1 * jax.random.normal(jax.random.fold_in(key, i), value.shape)
    if path[-1] == "causal_threshold":
      flat[path] = jnp.full(value.shape, 0.05, value.dtype)
  return flax.traverse_util.unflatten_dict(flat)


def _build(name):
  """(model, params, layer_mask, jitted apply) of the config, parsed afresh for every test."""
  path, extra = CONFIGS[name]
  gin.clear_config()
  gin_utils.parse([f"configs/{path}"], TINY + extra + factories.decision_bindings("causal"))
  return _init(name)


@functools.cache
def _init(name):
  """The model of the config _build just parsed: built, initialised and jitted once per module."""
  model = build.build_decoder(VOCAB)
  init = jax.jit(model.init)  # eager flax is slow op by op
  params = nn.meta.unbox(init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params = _randomize(params, jax.random.key(1))
  layer_mask = tasks.position_layer_mask(T, model.config.num_layers)
  apply = jax.jit(lambda p, x, mask: model.apply({"params": p}, x, layer_mask=mask))
  return model, params, layer_mask, apply


def _tokens(b=2, t=T, seed=3):
  return jax.random.randint(jax.random.key(seed), (b, t), 1, VOCAB)


def _forward(apply, params, tokens, layer_mask):
  mask = None if layer_mask is None else jnp.asarray(layer_mask[:, :tokens.shape[1]])
  return apply(params, tokens, mask)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_before_p_ignore_the_tokens_from_p_on(name):
  _, params, layer_mask, apply = _build(name)
  tokens = _tokens()
  other = tokens.at[:, 7:].set((tokens[:, 7:] + 5) % VOCAB)
  a = np.asarray(_forward(apply, params, tokens, layer_mask))
  b = np.asarray(_forward(apply, params, other, layer_mask))
  if name == "mod_attention":
    # Routed attention runs the executed tokens in a bucket of slots sized by how many the
    # whole batch executes, so another future can change the length of the value product's
    # sum: float32 rounding (the future keys' weights are exactly 0), not information.
    np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-6)
  else:
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert not np.allclose(a[:, 7:], b[:, 7:])


def _schedule(layer_mask, num_layers):
  if layer_mask is None:
    return skip_schedule.full_schedule(T, num_layers), 1
  schedule = skip_schedule.schedule_for_speedup(T, num_layers)
  np.testing.assert_array_equal(
      skip_schedule.active_layer_mask(schedule, num_layers, 1), layer_mask)
  return schedule, 1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cache_decoding_equals_the_teacher_forced_forward_pass(name):
  model, params, layer_mask, apply = _build(name)
  tokens = _tokens()
  want = _forward(apply, params, tokens, layer_mask)
  schedule, warmup = _schedule(layer_mask, model.config.num_layers)
  decoder = decoding.Decoder(model.config, warmup_layers=warmup)
  got = decoding.teacher_forced_logits(decoder, params, tokens, schedule, prompt_len=PROMPT)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if layer_mask is not None:  # the schedule skipped layers: not the full model
    full = _forward(apply, params, tokens, None)
    assert not np.allclose(got[:, PROMPT + 2:], full[:, PROMPT + 2:], atol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_rows_logits_do_not_depend_on_the_other_rows(name):
  """Alone, and in a batch with two other rows of other lengths (right-padded)."""
  _, params, layer_mask, apply = _build(name)
  lens = [T, 9, 5]
  batch = np.array(_tokens(3, T, seed=5))
  for row, n in enumerate(lens):
    batch[row, n:] = 0
  together = np.asarray(_forward(apply, params, jnp.asarray(batch), layer_mask))
  for row, n in enumerate(lens):
    alone = np.asarray(_forward(apply, params, jnp.asarray(batch[row:row + 1, :n]), layer_mask))
    np.testing.assert_allclose(together[row, :n], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["informed_routing", "mod_attention"])
def test_decoding_refuses_top_k_routing(name):
  path, extra = CONFIGS[name]
  gin_utils.parse([f"configs/{path}"], TINY + extra)
  model = build.build_decoder(VOCAB)
  with pytest.raises(ValueError, match="routed_ffn.decision = 'causal'"):
    decoding.Decoder(model.config)


def test_causal_routing_skips_tokens_and_costs_less_than_dense():
  """The routed configs really route in causal mode: some tokens do not execute, and the
  generated tokens' sown MACs are below the dense model's."""
  def sown(name):
    model, params, _, _ = _build(name)
    apply = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))  # eager is slow
    return apply({"params": params}, _tokens())[1]

  state = sown("mod")
  executed = np.asarray(state["intermediates"]["blocks"]["ffn"]["executed"][0])
  assert 0 < executed.mean() < 1
  dense_state = sown("dense")
  macs = scoring.macs_per_token(state["intermediates"], (2, T))
  dense_macs = scoring.macs_per_token(dense_state["intermediates"], (2, T))
  assert float(jnp.mean(macs)) < float(jnp.mean(dense_macs))
