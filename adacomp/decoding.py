"""Batched autoregressive generation with a KV cache and SkipDecode layer skipping.

The prompt is prefilled through every layer; each later step runs only the layers its position's
schedule allows (`adacomp.methods.skipdecode.schedule`): the warm-up bottom layers, then the top ones, over
the stacked block parameters with loop bounds that are data (`lax.fori_loop` with dynamic
bounds compiles to a while loop), so skipped layers cost nothing. The schedule's monotonicity
means every cache entry a step reads was written earlier; no cache entry is ever rewritten
(each step writes only its own position).

Prompts in a batch share one length (batch-uniform positions are what SkipDecode needs).
"""
import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from adacomp.models.decoder import DecoderConfig, block_kwargs, parse_dtype
from layers.block import DecoderBlock
from layers.embedding import Embed
from layers.normalization import make_norm


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """greedy when temperature == 0; otherwise temperature, then top-k and top-p filtering."""
  temperature: float = 0.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None


def stacked_block_params(params, num_layers: int):
  """Block params with a leading layer axis, from a scanned or an unrolled model."""
  if "blocks" in params:
    return params["blocks"]
  return jax.tree.map(lambda *xs: jnp.stack(xs),
                      *[params[f"block_{i}"] for i in range(num_layers)])


class Decoder:
  """Runs a DecoderLM's parameters one position at a time, layer by layer."""

  def __init__(self, config: DecoderConfig, warmup_layers: int = 1):
    if config.vocab_size is None:
      raise ValueError("Decoder needs a DecoderConfig with vocab_size set.")
    self.config = config
    self.warmup_layers = warmup_layers
    dtype, param_dtype = parse_dtype(config.dtype), parse_dtype(config.param_dtype)
    self._dtype = dtype
    self.embed = Embed(config.vocab_size, config.d_model, dtype=dtype, param_dtype=param_dtype)
    self.block = DecoderBlock(**block_kwargs(config, decode=True))
    self.norm = make_norm(config.norm, dtype=dtype, param_dtype=param_dtype)

  # -- cache ---------------------------------------------------------------------------------
  def init_cache(self, batch: int, max_len: int):
    """Zero caches for every layer, stacked: {'attn': {cached_key: [L, b, max_len, h, d], ...}}."""
    x = jnp.zeros((batch, max_len, self.config.d_model), self._dtype)
    pos = jnp.zeros((batch, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: self.block.init(jax.random.key(0), x, pos)["cache"])
    return jax.tree.map(
        lambda s: jnp.zeros((self.config.num_layers,) + s.shape, s.dtype), shapes)

  # -- one layer -----------------------------------------------------------------------------
  def _layer(self, blocks, cache, layer, x, position):
    """Applies block `layer` (a traced index) to x at `position`, writing its cache there."""
    p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), blocks)
    c = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), cache)
    c = jax.tree_util.tree_map_with_path(
        lambda path, a: (jnp.asarray(position, a.dtype) if path[-1].key == "cache_index"
                         else a), c)
    positions = jnp.zeros(x.shape[:2], jnp.int32)
    y, mutated = self.block.apply({"params": p, "cache": c}, x, positions, layer=layer,
                                  mutable=["cache"])
    cache = jax.tree.map(
        lambda a, n: jax.lax.dynamic_update_index_in_dim(a, n, layer, 0), cache,
        mutated["cache"])
    return y, cache

  def _logits(self, params, x):
    x = self.norm.apply({"params": params.get("final_norm", {})}, x)
    if self.config.tied_embeddings:
      return self.embed.apply({"params": params["embed"]}, x, method=Embed.attend)
    return jnp.einsum("btd,dv->btv", x, params["logits"].astype(self._dtype),
                      preferred_element_type=jnp.float32)

  # -- prefill and step ----------------------------------------------------------------------
  def prefill(self, params, cache, tokens):
    """Runs the prompt [b, p] through every layer from position 0; returns logits [b, p, V]."""
    blocks = stacked_block_params(params, self.config.num_layers)
    x = self.embed.apply({"params": params["embed"]}, tokens)

    def body(layer, carry):
      x, cache = carry
      return self._layer(blocks, cache, layer, x, 0)

    x, cache = jax.lax.fori_loop(0, self.config.num_layers, body, (x, cache))
    return self._logits(params, x), cache

  def step(self, params, cache, token, position, num_active: Union[int, jax.Array]):
    """One decode step for token [b] at `position`, running `num_active` layers.

    A Python int unrolls exactly those layers (what the compiled-cost test measures); a traced
    value runs them in while loops with dynamic bounds.
    """
    cfg = self.config
    blocks = stacked_block_params(params, cfg.num_layers)
    x = self.embed.apply({"params": params["embed"]}, token[:, None])
    warm = self.warmup_layers
    if isinstance(num_active, (int, np.integer)):
      layers = list(range(min(warm, num_active))) + list(
          range(cfg.num_layers - (int(num_active) - warm), cfg.num_layers))
      for layer in sorted(set(layers)):
        x, cache = self._layer(blocks, cache, layer, x, position)
    else:
      def body(layer, carry):
        x, cache = carry
        return self._layer(blocks, cache, layer, x, position)

      x, cache = jax.lax.fori_loop(0, jnp.minimum(warm, num_active), body, (x, cache))
      x, cache = jax.lax.fori_loop(cfg.num_layers - (num_active - warm), cfg.num_layers, body,
                                   (x, cache))
    return self._logits(params, x)[:, 0], cache


def sample(logits, key, sampling: SamplingConfig):
  """Next token ids [b] from logits [b, V]."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None and sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens", "sampling"))
def generate(decoder: Decoder, params, prompt, schedule, key, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig()):
  """Prompt [b, p] -> tokens [b, p + max_new_tokens]; schedule: int [>= p + max_new_tokens]
  active layers per position (the prompt always runs every layer)."""
  b, p = prompt.shape
  total = p + max_new_tokens
  cache = decoder.init_cache(b, total)
  logits, cache = decoder.prefill(params, cache, prompt)
  tokens = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt)
  first = sample(logits[:, -1], jax.random.fold_in(key, p), sampling)
  tokens = tokens.at[:, p].set(first)

  def body(position, carry):
    tokens, cache = carry
    token = jax.lax.dynamic_index_in_dim(tokens, position, axis=1, keepdims=False)
    logits, cache = decoder.step(params, cache, token, position, schedule[position])
    nxt = sample(logits, jax.random.fold_in(key, position + 1), sampling)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, position + 1, axis=1)
    return tokens, cache

  tokens, _ = jax.lax.fori_loop(p, total - 1, body, (tokens, cache))
  return tokens


def teacher_forced_logits(decoder: Decoder, params, tokens, schedule, prompt_len: int = 1):
  """Logits [b, t, V] from decoding `tokens` one by one (positions >= prompt_len step with the
  schedule) instead of sampling: what the decoder would see for a known continuation."""
  b, t = tokens.shape
  cache = decoder.init_cache(b, t)
  logits, cache = decoder.prefill(params, cache, tokens[:, :prompt_len])
  out = [logits]
  step = jax.jit(decoder.step)
  for position in range(prompt_len, t):
    logits, cache = step(params, cache, tokens[:, position], position,
                         jnp.asarray(schedule[position], jnp.int32))
    out.append(logits[:, None])
  return jnp.concatenate(out, axis=1)




def load_checkpoint_for_decoding(checkpoint_dir: str, step: Optional[int] = None):
  """(Decoder, params, tokenizer, meta) for a trained decoder checkpoint.

  The gin config saved with the checkpoint must already be parsed
  (`gin_utils.parse_checkpoint_config`).
  """
  from adacomp import checkpointing  # pylint: disable=g-import-not-at-top
  from adacomp import data as data_lib  # pylint: disable=g-import-not-at-top
  from adacomp.models.build import load_decoder  # pylint: disable=g-import-not-at-top
  step, meta = checkpointing.read_meta(checkpoint_dir, step)
  model, params = load_decoder(checkpoint_dir, meta, step)
  return Decoder(model.config), params, data_lib.get_tokenizer(), {**meta, "step": step}
