"""A Hugging Face ViTForImageClassification imports into adacomp's ViT with the same logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adacomp import checkpointing, gin_utils, sharding
from adacomp.hf import families, importer, vision
from adacomp.models import vit
from tests.hf.common import HAVE_TRANSFORMERS, assert_logits_close, fixture, reference


def _load(workdir):
  step, meta = gin_utils.parse_checkpoint_config(workdir)
  model = vit.build_vit(meta["channels"], meta["num_classes"])
  images = jnp.zeros((1, model.config.image_size, model.config.image_size, meta["channels"]))
  abstract = sharding.strip_boxes(jax.eval_shape(
      lambda: model.init(jax.random.key(0), images))["params"])
  return model, checkpointing.restore_params(workdir, abstract, step=step)


def test_imported_vit_matches_the_transformers_reference_logits(tmp_path):
  workdir = str(tmp_path / "vit")
  importer.import_model(fixture("vit"), workdir, log=lambda m: None)
  model, params = _load(workdir)
  ref = reference("vit")
  images = np.transpose(ref["pixel_values"], (0, 2, 3, 1))  # NCHW -> NHWC
  logits = model.apply({"params": params}, images)
  assert_logits_close(logits, ref["logits"])
  if HAVE_TRANSFORMERS:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    hf = transformers.ViTForImageClassification.from_pretrained(fixture("vit")).eval()
    with torch.no_grad():
      live = hf(torch.from_numpy(ref["pixel_values"])).logits.numpy()
    assert_logits_close(logits, live)


def test_distilled_deit_is_refused_by_name():
  config = importer.read_config(fixture("vit"))
  config["architectures"] = ["DeiTForImageClassificationWithTeacher"]
  with pytest.raises(families.UnsupportedConfigError,
                     match=r"distilled DeiT.*distillation token.*deit-small-patch16-224"):
    vision.vit_config(config)
