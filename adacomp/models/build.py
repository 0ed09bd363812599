"""Building the gin-configured models and loading them from checkpoints.

The training loop, evaluation, decoding and the analysis scripts all build a decoder the same
way (the tokenizer's vocabulary unless the config fixes one) and restore its params the same way
(shapes checked against the config first), so they live here once.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from adacomp import checkpointing
from adacomp import sharding
from adacomp.models.decoder import DecoderConfig, DecoderLM


def build_decoder(vocab_size: int, config: Optional[DecoderConfig] = None,
                  decode: bool = False) -> DecoderLM:
  """The gin-configured decoder, with the tokenizer's vocabulary unless the config fixes one."""
  config = DecoderConfig() if config is None else config
  if config.vocab_size is None:
    config = dataclasses.replace(config, vocab_size=vocab_size)
  elif config.vocab_size < vocab_size:
    raise ValueError(f"DecoderConfig.vocab_size={config.vocab_size} is smaller than the "
                     f"tokenizer's {vocab_size} ids; remove the binding or raise it.")
  return DecoderLM(config, decode=decode)


def load_decoder(checkpoint_dir: str, meta: dict, step: int):
  """(model, params) of a language-model checkpoint whose gin config is parsed already
  (`gin_utils.parse_checkpoint_config`); `meta` and `step` as that returns them."""
  model = build_decoder(meta["vocab_size"])
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  abstract = sharding.strip_boxes(boxed["params"])
  return model, checkpointing.restore_params(checkpoint_dir, abstract, step=step)


def restore_sharded(checkpoint_dir: str, model, inputs, mesh, rules, step: Optional[int] = None):
  """`model`'s params from a checkpoint, each placed with its logical sharding on `mesh`.

  Call inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`; `inputs` is a dummy
  batch for `model.init` (shapes only: nothing is computed).
  """
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs))["params"]
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = sharding.abstract_with_shardings(boxed, shardings)
  return checkpointing.restore_params(checkpoint_dir, abstract, step=step)
