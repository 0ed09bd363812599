"""Every gin file in configs/ parses and builds its task's model, so a broken config fails here.

The model is the one the trainer would build: a ViT for image configs (`train.task =
'image_classification'`, or image data overlays), a DecoderLM otherwise. Each is checked for
its output shape and, where the architecture has a closed form, its parameter count.
"""
import glob
import os

import gin
import jax
import jax.numpy as jnp
import pytest

from adacomp import gin_utils, training
from adacomp.models import build
from adacomp.models.decoder import DecoderConfig
from adacomp.models.vit import ViTConfig, build_vit
from layers.attention import MultiHeadAttention
from layers.mlp import DenseFFN

CONFIGS = sorted(glob.glob(os.path.join(gin_utils.CONFIGS_DIR, "**", "*.gin"), recursive=True))
VOCAB = 259


def _name(path):
  return os.path.relpath(path, gin_utils.CONFIGS_DIR)


def _bound(name, default=None):
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def _is_image_config():
  return (_bound("train.task") == "image_classification" or
          _bound("image_dataset.name") is not None)


def test_there_are_configs():
  names = {_name(c) for c in CONFIGS}
  assert {"dense.gin", "sizes/tiny.gin", "sizes/small.gin", "sizes/base.gin",
          "data/local_text.gin", "data/lm1b.gin", "data/c4.gin", "vit.gin",
          "as_vit.gin"} <= names


def _vit_param_count(cfg: ViTConfig) -> int:
  """ViT/DeiT parameters by hand: embedding, class token, positions, blocks, norm, head, and
  one threshold per AS-ViT stage."""
  d, inner, n = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_patches
  block = (2 * 2 * d  # two LayerNorms, scale and bias
           + 3 * (d * inner + inner) + inner * d + d  # q, k, v with biases; out with bias
           + d * cfg.d_ff + cfg.d_ff + cfg.d_ff * d + d)  # MLP with biases
  return (cfg.patch_size ** 2 * cfg.channels * d + d + d + (n + 1) * d + cfg.num_layers * block
          + 2 * d + d * cfg.num_classes + cfg.num_classes + len(cfg.prune_after))


def _decoder_param_count(cfg: DecoderConfig) -> int:
  """A dense decoder's parameters by hand: tied or untied embedding, per layer attention
  (q, k, v, out, no biases), the FFN's two matrices and two norms, the final norm."""
  inner = cfg.num_heads * cfg.head_dim
  norm = {"rms": cfg.d_model, "layernorm": 0, "layernorm_affine": 2 * cfg.d_model}
  layer = 4 * cfg.d_model * inner + 2 * cfg.d_model * cfg.d_ff + 2 * norm[cfg.norm]
  logits = 0 if cfg.tied_embeddings else cfg.d_model * VOCAB
  final = norm[cfg.norm if cfg.final_norm is None else cfg.final_norm]
  return VOCAB * cfg.d_model + logits + cfg.num_layers * layer + final


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_parses_and_builds_its_tasks_model(path):
  gin_utils.parse([path])
  if _is_image_config():
    channels = len(_bound("image_dataset.mean", (0.0,)))
    model = build_vit(channels, 10, ViTConfig())
    size = model.config.image_size
    images = jnp.zeros((2, size, size, channels))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1]))
    logits = jax.eval_shape(lambda p: model.apply(p, images), shapes)
    assert logits.shape == (2, 10)
    assert training.count_params(shapes["params"]) == _vit_param_count(model.config)
    stages = model.config.prune_after
    assert sorted(k for k in shapes["params"] if k.startswith("pruner_")) == [
        f"pruner_{i}" for i in range(len(stages))]
  else:
    cfg = DecoderConfig()
    model = build.build_decoder(VOCAB, cfg)
    ids = jnp.zeros((2, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids[:1]))
    logits = jax.eval_shape(lambda p: model.apply(p, ids), shapes)
    assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32
    if cfg.ffn_cls is DenseFFN and cfg.attention_cls is MultiHeadAttention:
      assert training.count_params(shapes["params"]) == _decoder_param_count(
          model.config), _name(path)
  if "train.num_steps" in gin.config_str():
    training.make_optimizer(gin.query_parameter("train.num_steps"))


def test_tokenformer_config_counts_its_parameter_tokens():
  gin_utils.parse([os.path.join(gin_utils.CONFIGS_DIR, "tokenformer.gin")])
  model = build.build_decoder(VOCAB, DecoderConfig())
  cfg = model.config
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  d, inner = cfg.d_model, cfg.num_heads * cfg.head_dim
  n_qkv, n_out, n_ffn = 64, 64, 512  # configs/tokenformer.gin
  # Each Pattention holds n keys [n, d_in] and n values [n, d_out]; non-parametric norms.
  layer = 3 * n_qkv * (d + inner) + n_out * (inner + d) + n_ffn * (d + d)
  assert training.count_params(shapes["params"]) == VOCAB * d + cfg.num_layers * layer
