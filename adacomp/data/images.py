"""Image-classification batches from TFDS: decode, resize, augment, normalise, shard, checkpoint.

Sources: the embedded `digits` builder (adacomp/data/digits.py, prepared on first use, no
network) or any TFDS image dataset prepared as array_record under `data_dir` (`cifar10`,
`imagenet2012`, ...; `tfds build cifar10 --data_dir=... --file_format=array_record`), read
through `tfds.data_source` wrapped in a `grain.MapDataset`, like the language-model pipeline.

Per example: images whose size differs from `image_size` have their shorter side resized to it
(bilinear) and are centre-cropped square. Training then augments with a random translation
(zero-pad by `crop_padding` pixels, random crop back to `image_size`) and, where `flip` is on
(natural images; never for digits, where a mirrored 2 or 3 is no digit), a random horizontal
flip. Pixels become (x / 255 - mean) / std.

Training (`train=True`): each process owns examples `process_index::process_count`, visits them
in a fresh permutation every epoch (seeded by seed, epoch and process), forever; an example's
augmentation is seeded by (seed, epoch, position), so the iterator's state (epoch, position,
batches) restores the stream exactly. Evaluation: one pass in order, the last batch padded with
weight 0; every process reads the same global batch and keeps its own rows.

Batches: {'inputs': float32 [b, s, s, C], 'targets': int32 [b], 'weights': float32 [b]}.
"""
from typing import Iterator, Optional, Sequence

import gin
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from adacomp.data.digits import digits_builder
from adacomp.data.local_text import DataError
from adacomp.data import pipeline
from adacomp.data.pipeline import _default_data_dir, _open_source


def _digits_source(split: str, image_size: int, data_dir: str):
  builder = digits_builder(image_size, data_dir)
  if not builder.is_prepared():
    if jax.process_index() == 0:
      print(f"Preparing digits/{builder.builder_config.name} under {data_dir} (one-time)...",
            flush=True)
      builder.download_and_prepare()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("digits_prepared")
  if split not in builder.info.splits:
    raise DataError(f"digits has no split {split!r}; it has {sorted(builder.info.splits)}.")
  return builder.as_data_source(split=split), builder.info


def fit_size(image: np.ndarray, size: int) -> np.ndarray:
  """Shorter side resized to `size` (bilinear), then a centred size x size crop."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image).resize((nw, nh), Image.BILINEAR)
  out = np.asarray(pil)
  out = out[..., None] if squeeze else out
  top, left = (nh - size) // 2, (nw - size) // 2
  return out[top:top + size, left:left + size]


def augment(image: np.ndarray, rng: np.random.Generator, padding: int, flip: bool) -> np.ndarray:
  """Random translation by up to `padding` pixels (zero padding) and optional mirror."""
  if padding:
    h, w = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    image = padded[top:top + h, left:left + w]
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return image


class ImageDataset:
  """An iterable of image batches; `iter()` gives a checkpointable iterator."""

  def __init__(self, source, *, num_classes: int, batch_size: int, image_size: int, train: bool,
               seed: int, eval_max_batches: Optional[int], crop_padding: int, flip: bool,
               mean: Sequence[float], std: Sequence[float], image_key: str, label_key: str,
               process_index: int, process_count: int, cache: bool = False):
    self.num_classes = num_classes
    self.batch_size, self.image_size, self.train, self.seed = batch_size, image_size, train, seed
    self.local_batch = batch_size // process_count
    self.eval_max_batches = eval_max_batches
    self.crop_padding, self.flip = crop_padding, flip
    self.process_index, self.process_count = process_index, process_count
    n = len(source)
    self.ids = np.arange(process_index, n, process_count) if train else np.arange(n)
    if len(self.ids) == 0:
      raise DataError(f"The split has {n} images, too few to give each of {process_count} "
                      f"processes one; use a larger split.")
    self.examples = grain.MapDataset.source(source).map(
        lambda ex: (fit_size(np.asarray(ex[image_key]), image_size), int(ex[label_key])))
    if cache:  # small splits: read every record once, then index memory
      self.examples = [self.examples[i] for i in range(n)]
    first, _ = self.examples[int(self.ids[0])]
    self.channels = int(first.shape[-1])
    self.mean = np.broadcast_to(np.asarray(mean, np.float32), (self.channels,))
    self.std = np.broadcast_to(np.asarray(std, np.float32), (self.channels,))

  def normalise(self, image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) / 255.0 - self.mean) / self.std

  def __iter__(self) -> "ImageIterator":
    return ImageIterator(self)


class ImageIterator(Iterator[dict]):
  """Yields {'inputs', 'targets', 'weights'} numpy batches of this process."""

  def __init__(self, ds: ImageDataset):
    self._ds = ds
    self._state = {"epoch": 0, "position": 0, "batches": 0}
    self._order_epoch, self._order = None, None

  def get_state(self) -> dict:
    return dict(self._state)

  def set_state(self, state: dict) -> None:
    self._state = {k: int(state[k]) for k in ("epoch", "position", "batches")}

  def _order_for(self, epoch: int) -> np.ndarray:
    if self._order_epoch != epoch:
      self._order_epoch, self._order = epoch, pipeline.epoch_order(
          self._ds.ids, epoch, self._ds.train, self._ds.seed, self._ds.process_index)
    return self._order

  def __next__(self) -> dict:
    ds = self._ds
    if not ds.train and ds.eval_max_batches is not None and \
        self._state["batches"] >= ds.eval_max_batches:
      raise StopIteration
    rows = ds.local_batch if ds.train else ds.batch_size
    images, labels = [], []
    epoch, position = self._state["epoch"], self._state["position"]
    while len(images) < rows:
      if position >= len(ds.ids):
        if not ds.train:
          break
        epoch, position = epoch + 1, 0
      image, label = ds.examples[int(self._order_for(epoch)[position])]
      if ds.train:
        rng = np.random.default_rng([ds.seed, epoch, position, ds.process_index, 7])
        image = augment(image, rng, ds.crop_padding, ds.flip)
      images.append(ds.normalise(image))
      labels.append(label)
      position += 1
    if not images:
      raise StopIteration
    self._state.update(epoch=epoch, position=position, batches=self._state["batches"] + 1)
    s = ds.image_size
    inputs = np.zeros((rows, s, s, ds.channels), np.float32)
    targets = np.zeros((rows,), np.int32)
    weights = np.zeros((rows,), np.float32)
    inputs[:len(images)] = np.stack(images)
    targets[:len(labels)] = labels
    weights[:len(images)] = 1.0
    batch = {"inputs": inputs, "targets": targets, "weights": weights}
    if not ds.train:
      rows_here = slice(ds.process_index * ds.local_batch, (ds.process_index + 1) * ds.local_batch)
      batch = {k: v[rows_here] for k, v in batch.items()}
    return batch


@gin.configurable
def image_dataset(split: str, *, batch_size: int, train: bool, name: str = "digits",
                  data_dir: Optional[str] = None, image_size: int = 32, seed: int = 0,
                  eval_max_batches: Optional[int] = None, crop_padding: Optional[int] = None,
                  flip: bool = False, mean: Sequence[float] = (0.5,),
                  std: Sequence[float] = (0.5,), image_key: str = "image",
                  label_key: str = "label", process_index: Optional[int] = None,
                  process_count: Optional[int] = None,
                  cache: Optional[bool] = None) -> ImageDataset:
  """Image batches of `split` (see the module docstring); `batch_size` is global.

  `crop_padding` defaults to image_size // 8 (4 pixels at 32, the CIFAR convention). `cache`
  holds the decoded split in memory (default: for digits only, 1.8 MB).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise DataError(f"Global batch size {batch_size} is not divisible by the {process_count} "
                    f"processes; make train.batch_size a multiple of {process_count}.")
  data_dir = _default_data_dir(data_dir)
  if name == "digits":
    source, info = _digits_source(split, image_size, data_dir)
  else:
    source = _open_source(name, split, data_dir, None, "array_record")
    info = tfds.builder(name, data_dir=data_dir).info
  if len(source) == 0:
    raise DataError(f"Split {split!r} of {name!r} under {data_dir!r} is empty; use another "
                    f"split.")
  num_classes = info.features[label_key].num_classes
  crop_padding = image_size // 8 if crop_padding is None else crop_padding
  return ImageDataset(source, num_classes=num_classes, batch_size=batch_size,
                      image_size=image_size, train=train, seed=seed,
                      eval_max_batches=eval_max_batches, crop_padding=crop_padding, flip=flip,
                      mean=mean, std=std, image_key=image_key, label_key=label_key,
                      process_index=process_index, process_count=process_count,
                      cache=(name == "digits") if cache is None else cache)
