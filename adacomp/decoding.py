"""Batched autoregressive generation with a KV cache and SkipDecode layer skipping.

The prompt is prefilled through every layer; each later step runs only the layers its position's
schedule allows (`adacomp.methods.skipdecode.schedule`): the warm-up bottom layers, then the
top ones, over the stacked block parameters with loop bounds that are data (`lax.fori_loop` with
dynamic bounds compiles to a while loop), so skipped layers cost nothing. The schedule's monotonicity
means every cache entry a step reads was written earlier; no cache entry is ever rewritten
(each step writes only its own position).

Prompts in a batch share one length (batch-uniform positions are what SkipDecode needs).
"""
import dataclasses
import functools
import time
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from adacomp import scoring
from adacomp.models.decoder import (DecoderConfig, block_kwargs, final_norm_kind, parse_dtype,
                                    position_embed)
from layers import routing
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
    topk = [s for s, d in routing.routed_decisions(config).items() if d != "causal"]
    if topk:
      raise ValueError(
          f"DecoderConfig.{topk[0]} routes with a per-sequence top-k, which cannot be decoded "
          f"(it is not causal); decode with causal decisions: --gin_bindings="
          f"\"routed_ffn.decision = 'causal'\" (and routed_attention.decision).")
    self.config = config
    self.warmup_layers = warmup_layers
    dtype, param_dtype = parse_dtype(config.dtype), parse_dtype(config.param_dtype)
    self._dtype = dtype
    self.embed = Embed(config.vocab_size, config.d_model, dtype=dtype, param_dtype=param_dtype)
    self.block = DecoderBlock(**block_kwargs(config, decode=True))
    self.norm = make_norm(final_norm_kind(config), dtype=dtype, param_dtype=param_dtype,
                          epsilon=config.norm_epsilon)
    self.pos_embed = position_embed(config, dtype, param_dtype)

  # -- cache ---------------------------------------------------------------------------------
  def init_cache(self, batch: int, max_len: int):
    """Zero caches for every layer, stacked: {'attn': {cached_key: [L, b, max_len, h, d], ...}}."""
    x = jnp.zeros((batch, max_len, self.config.d_model), self._dtype)
    pos = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
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
    # Attention in decode mode takes its positions from cache_index; FFNs keyed by position
    # (Duo's evaluation-time random routes) need the real ones.
    positions = position + jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    y, mutated = self.block.apply({"params": p, "cache": c}, x, positions, layer=layer,
                                  mutable=["cache"])
    cache = jax.tree.map(
        lambda a, n: jax.lax.dynamic_update_index_in_dim(a, n, layer, 0), cache,
        mutated["cache"])
    return y, cache

  def _embed(self, params, tokens, start):
    """Token embeddings of tokens [b, T] at positions start.. (plus learned positions)."""
    x = self.embed.apply({"params": params["embed"]}, tokens)
    if self.pos_embed is None:
      return x
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    return x + self.pos_embed.apply({"params": params["pos_embed"]},
                                    positions + self.config.position_offset)

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
    x = self._embed(params, tokens, 0)

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
    x = self._embed(params, token[:, None], position)
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


class Generation(NamedTuple):
  """What `generate` returns, row by row.

  tokens:   int32 [b, p_max + max_new_tokens]: each row's prompt, then its continuation of at
            most max_new_tokens tokens; after it (or after the row's EOS, kept) `pad_id`.
  logprobs: float32 [b, p_max + max_new_tokens]: log-probability under the model (the raw
            logits, before temperature or filtering) of each generated token; 0 at prompt and
            padding positions.
  generated: bool [b, p_max + max_new_tokens]: which positions hold generated tokens.
  """
  tokens: jax.Array
  logprobs: jax.Array
  generated: jax.Array


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens", "sampling", "eos_id",
                                             "pad_id"))
def generate(decoder: Decoder, params, prompt, schedule, key, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), prompt_lens=None,
             eos_id: Optional[int] = None, pad_id: int = 0) -> Generation:
  """Continues every row of `prompt` by `max_new_tokens` tokens.

  prompt: int [b, p_max], right-padded; prompt_lens: int [b] (default: every row p_max). Rows
  keep their own positions (no left padding): the shortest prompt is prefilled, and at later
  positions a row still inside its prompt is fed its next prompt token instead of a sample, so
  every prompt is used whole and a row's tokens do not depend on the other rows' lengths (the
  dense decoder's rows never interact). schedule: int [>= p_max + max_new_tokens], active
  layers per position; a position inside any row's prompt should run every layer (SkipDecode
  schedules take warmup_len = p_max). A row stops at its first generated `eos_id`.
  """
  b, p = prompt.shape
  total = p + max_new_tokens
  lens = jnp.full((b,), p, jnp.int32) if prompt_lens is None else jnp.asarray(prompt_lens,
                                                                              jnp.int32)
  start = jnp.min(lens)
  # Prefill the longest prefix every row has; rows run on from their own prompts below.
  cache = decoder.init_cache(b, total)
  prompt_area = jnp.arange(p)[None, :] < lens[:, None]
  tokens = jnp.zeros((b, total), jnp.int32).at[:, :p].set(jnp.where(prompt_area, prompt, 0))
  prefix = jnp.where(jnp.arange(p)[None, :] < start, prompt, 0)
  logits, cache = _prefill_prefix(decoder, params, cache, prefix, start)

  def choose(position, logits, carry):
    """The token at `position` + 1: the prompt's while inside it, else a sample."""
    tokens, logprobs, generated, done = carry
    nxt = sample(logits, jax.random.fold_in(key, position + 1), sampling)
    in_prompt = position + 1 < lens
    prompt_token = jax.lax.dynamic_index_in_dim(tokens, position + 1, axis=1, keepdims=False)
    new = ~in_prompt & ~done
    token = jnp.where(in_prompt, prompt_token, jnp.where(done, pad_id, nxt))
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1),
                             token[:, None], -1)[:, 0]
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, position + 1, axis=1)
    logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, jnp.where(new, lp, 0.0),
                                                   position + 1, axis=1)
    generated = jax.lax.dynamic_update_index_in_dim(generated, new, position + 1, axis=1)
    # A row is done after its own max_new_tokens (rows with shorter prompts start earlier) or
    # at its first EOS.
    done = done | (new & (position + 2 - lens >= max_new_tokens))
    if eos_id is not None:
      done = done | (new & (token == eos_id))
    return tokens, logprobs, generated, done

  carry = (tokens, jnp.zeros((b, total), jnp.float32), jnp.zeros((b, total), bool),
           jnp.zeros((b,), bool))
  carry = choose(start - 1, logits, carry)

  def body(position, carry):
    token = jax.lax.dynamic_index_in_dim(carry[0], position, axis=1, keepdims=False)
    logits, cache = decoder.step(params, carry[4], token, position, schedule[position])
    return (*choose(position, logits, carry[:4]), cache)

  tokens, logprobs, generated, _, _ = jax.lax.fori_loop(start, total - 1, body,
                                                         (*carry, cache))
  return Generation(tokens, logprobs, generated)


def _prefill_prefix(decoder, params, cache, tokens, length):
  """Prefills positions [0, length) (a traced length <= tokens.shape[1]) and returns the logits
  at position length - 1, [b, V]. Runs the whole padded width through every layer: entries
  past `length` are written to the cache but each decode step overwrites its own position
  before any query reads it, and causal masking keeps them out of the earlier positions."""
  logits, cache = decoder.prefill(params, cache, tokens)
  return jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False), cache


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




def generate_rows(model, params, tokenizer, prompts, schedule_fn, key, *, max_new_tokens: int,
                  sampling: SamplingConfig = SamplingConfig(), warmup_layers: int = 1,
                  layer_mask_fn=None) -> tuple:
  """Generates a continuation of every prompt (strings, any lengths) in one batch.

  `schedule_fn(total_len, prompt_len)` gives the active layers per position (the prompt,
  the longest one's positions, runs every layer); `layer_mask_fn(schedule)` the bool
  [layers, positions] mask that prices the generated tokens (None: every layer). Returns
  (rows, stats): one dict per prompt with `prompt`, `continuation`, `ids` and `logprobs` of the
  generated tokens (EOS included when the row stopped there) and `macs_per_token` (the sown
  MACs of the generated positions under the schedule); stats has `tokens_per_s` (generated
  tokens over the compiled call's time, compile excluded), `compile_s`, `schedule` and
  `prompt_width` (the longest prompt, BOS included).
  """
  # A tokenizer with `encode_prompt` (the HF kind) adds its own special tokens, as transformers'.
  encode = getattr(tokenizer, "encode_prompt", None) or (
      lambda p: np.concatenate([[tokenizer.bos_id], tokenizer.encode(p)]))
  encoded = [np.asarray(encode(p)).astype(np.int32) for p in prompts]
  lens = np.asarray([len(e) for e in encoded], np.int32)
  width = int(lens.max())
  total = width + max_new_tokens
  if total > model.config.max_len:
    raise ValueError(f"The longest prompt ({width} tokens with BOS) plus --max_new_tokens="
                     f"{max_new_tokens} exceeds the model's max_len={model.config.max_len}; "
                     f"shorten the prompts or generate fewer tokens.")
  prompt = np.zeros((len(prompts), width), np.int32)
  for row, e in enumerate(encoded):
    prompt[row, :len(e)] = e
  schedule = jnp.asarray(schedule_fn(total, width), jnp.int32)
  decoder = Decoder(model.config, warmup_layers=warmup_layers)
  args = (params, jnp.asarray(prompt), schedule, key)
  kwargs = dict(max_new_tokens=max_new_tokens, sampling=sampling, prompt_lens=jnp.asarray(lens),
                eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  start = time.perf_counter()
  compiled = generate.lower(decoder, *args, **kwargs).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args, prompt_lens=kwargs["prompt_lens"]))
  elapsed = time.perf_counter() - start
  tokens, logprobs, generated = (np.asarray(a) for a in out)
  mask = None if layer_mask_fn is None else layer_mask_fn(np.asarray(schedule))
  # Price the generated positions with the layers' own sown MACs under the schedule's mask.
  _, state = model.apply({"params": params}, jnp.asarray(tokens), layer_mask=mask,
                         mutable=["intermediates"])
  macs = np.asarray(scoring.macs_per_token(state["intermediates"], tokens.shape, mask))
  rows = []
  for row, text in enumerate(prompts):
    new = generated[row]
    ids = tokens[row][new]
    rows.append({"prompt": text, "continuation": tokenizer.decode(
        [int(i) for i in ids if int(i) != tokenizer.eos_id]),
                 "ids": [int(i) for i in ids], "logprobs": [float(x) for x in logprobs[row][new]],
                 "macs_per_token": float(macs[row][new].mean()) if new.any() else 0.0})
  count = int(generated.sum())
  return rows, {"tokens_per_s": count / max(elapsed, 1e-9), "compile_s": compile_s,
                "generated_tokens": count, "schedule": np.asarray(schedule),
                "prompt_width": width}


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
