"""`digits`: a TFDS builder over the handwritten-digit images scikit-learn ships (no network).

`sklearn.datasets.load_digits()` holds 1,797 grey-scale 8x8 digits (UCI optdigits, values 0..16,
classes 0..9). Each image is scaled to 0..255 and resized bilinearly to `image_size` (default
32x32), so a 4x4 patch grid has 64 tokens, enough for token pruning to matter.

Splits are fixed: a permutation of the 1,797 indices by numpy's generator seeded 0, then 70% train
(1,258), 15% validation (270), 15% test (269). Written as array_record, read by random access
without TensorFlow; `digits_builder(...).download_and_prepare()` takes seconds and the image
pipeline calls it on first use.
"""
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

SPLIT_FRACTIONS = (("train", 0.70), ("validation", 0.15), ("test", 0.15))


def split_indices(num_examples: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Deterministic disjoint train/validation/test index sets covering every example."""
  order = np.random.default_rng(seed).permutation(num_examples)
  n_train = int(round(SPLIT_FRACTIONS[0][1] * num_examples))
  n_val = int(round(SPLIT_FRACTIONS[1][1] * num_examples))
  return {"train": np.sort(order[:n_train]),
          "validation": np.sort(order[n_train:n_train + n_val]),
          "test": np.sort(order[n_train + n_val:])}


def resize(image8: np.ndarray, size: int) -> np.ndarray:
  """An 8x8 digit (0..16) as a uint8 [size, size, 1] image, bilinear, 0..255."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scaled = np.clip(image8 * (255.0 / 16.0), 0, 255).astype(np.uint8)
  return np.asarray(Image.fromarray(scaled).resize((size, size), Image.BILINEAR))[..., None]


class DigitsConfig(tfds.core.BuilderConfig):

  def __init__(self, *, image_size: int, **kwargs):
    super().__init__(version=tfds.core.Version("1.0.0"), **kwargs)
    self.image_size = image_size


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits resized: {'image': uint8 [s, s, 1], 'label': 0..9}."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [DigitsConfig(name="32", image_size=32,
                                  description="8x8 digits resized to 32x32.")]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self, description="scikit-learn load_digits (UCI optdigits), resized.",
        features=tfds.features.FeaturesDict({
            # A raw uint8 tensor, not tfds.features.Image: PNG encoding would need TensorFlow.
            "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    try:
      from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("The digits dataset needs scikit-learn: `pip install scikit-learn` "
                        "(it is in setup.py's install_requires).") from e
    digits = load_digits()
    splits = split_indices(len(digits.target))
    return {name: self._generate_examples(digits, idx) for name, idx in splits.items()}

  def _generate_examples(self, digits, indices):
    size = self.builder_config.image_size
    for i in indices:
      yield int(i), {"image": resize(digits.images[i], size), "label": int(digits.target[i])}


def digits_builder(image_size: int = 32,
                   data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """The digits builder at `image_size` (one prepared dataset per size)."""
  if image_size == 32:
    config = "32"
  else:
    config = DigitsConfig(name=str(image_size), image_size=image_size,
                          description=f"8x8 digits resized to {image_size}x{image_size}.")
  return Digits(config=config, data_dir=data_dir, file_format="array_record")
