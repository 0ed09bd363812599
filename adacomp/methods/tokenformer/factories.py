"""Gin registration of TokenFormer's layers (`layers.pattention`).

As for Duo (adacomp/methods/duo/factories.py), gin configures factories returning the layer
classes with their TokenFormer attributes bound; `DecoderBlock` then calls them like any
attention / FFN:

    DecoderConfig.attention_cls = @tokenformer_attention()
    DecoderConfig.ffn_cls = @tokenformer_ffn()
    tokenformer_attention.n_qkv = 64
    tokenformer_ffn.n_ffn = 512

`tau_tokens*` fix tau = sqrt(tau_tokens) (None: sqrt of the current token count); scripts/grow.py
binds them to the pre-growth counts so that a grown model computes the same function.

`value_std=None` gives the TokenFormer code's value init, 2 / (num_layers * sqrt(d_model))
(GPT-NeoX 'wang_init'), with num_layers and d_model read from the operative gin config's
DecoderConfig (its defaults where unbound): a factory cannot see the config it is part of.
"""
import functools
import math
from typing import Optional

import gin

from adacomp.models.decoder import DecoderConfig
from layers.pattention import DEFAULT_KEY_STD, PattentionAttention, PattentionFFN


def _decoder_value(name: str):
  try:
    return gin.query_parameter(f"DecoderConfig.{name}")
  except ValueError:
    return getattr(DecoderConfig, name)


def wang_value_std() -> float:
  """2 / (L sqrt(d)) for the gin-configured decoder."""
  return 2.0 / (_decoder_value("num_layers") * math.sqrt(_decoder_value("d_model")))


def _check_tokens(**counts):
  for name, n in counts.items():
    if n is not None and (not isinstance(n, int) or n < 1):
      raise ValueError(f"TokenFormer: {name}={n!r} must be a positive integer number of "
                       f"parameter tokens.")


@gin.configurable
def tokenformer_attention(*, n_qkv: int = PattentionAttention.n_qkv,
                          n_out: int = PattentionAttention.n_out,
                          tau_tokens_qkv: Optional[int] = None,
                          tau_tokens_out: Optional[int] = None,
                          key_std: float = DEFAULT_KEY_STD, value_std: Optional[float] = None,
                          impl: Optional[str] = None):
  """`PattentionAttention` with these attributes bound; the block supplies heads, RoPE, dtypes."""
  _check_tokens(n_qkv=n_qkv, n_out=n_out, tau_tokens_qkv=tau_tokens_qkv,
                tau_tokens_out=tau_tokens_out)
  return functools.partial(
      PattentionAttention, n_qkv=n_qkv, n_out=n_out, tau_tokens_qkv=tau_tokens_qkv,
      tau_tokens_out=tau_tokens_out, key_std=key_std,
      value_std=wang_value_std() if value_std is None else value_std, impl=impl)


@gin.configurable
def tokenformer_ffn(*, n_ffn: int = PattentionFFN.n_ffn, tau_tokens: Optional[int] = None,
                    key_std: float = DEFAULT_KEY_STD, value_std: Optional[float] = None,
                    impl: Optional[str] = None):
  """`PattentionFFN` with these attributes bound; the block supplies d_ff (unused) and dtypes."""
  _check_tokens(n_ffn=n_ffn, tau_tokens=tau_tokens)
  return functools.partial(
      PattentionFFN, n_ffn=n_ffn, tau_tokens=tau_tokens, key_std=key_std,
      value_std=wang_value_std() if value_std is None else value_std, impl=impl)
