"""Every gin file in configs/ parses and builds its model, so a broken config fails here."""
import glob
import os

import gin
import jax
import jax.numpy as jnp
import pytest

from adacomp import gin_utils, training
from adacomp.models import build
from adacomp.models.decoder import DecoderConfig

CONFIGS = sorted(glob.glob(os.path.join(gin_utils.CONFIGS_DIR, "**", "*.gin"), recursive=True))


def test_there_are_configs():
  names = {os.path.relpath(c, gin_utils.CONFIGS_DIR) for c in CONFIGS}
  assert {"dense.gin", "sizes/tiny.gin", "sizes/small.gin", "sizes/base.gin",
          "data/local_text.gin", "data/lm1b.gin", "data/c4.gin"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, gin_utils.CONFIGS_DIR))
def test_config_parses_and_builds_its_model(path):
  gin_utils.parse([path])
  model = build.build_decoder(259, DecoderConfig())
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  assert jax.tree.leaves(shapes)
  if "train.num_steps" in gin.config_str():
    training.make_optimizer(gin.query_parameter("train.num_steps"))
