"""The embedded digits dataset and the image pipeline: splits, batches, augmentation, state."""
import numpy as np
import pytest

from adacomp import data
from adacomp.data.digits import split_indices
from adacomp.data.images import augment


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _dataset(data_dir, split="train", **kw):
  kw.setdefault("batch_size", 16)
  kw.setdefault("train", split == "train")
  return data.image_dataset(split, name="digits", data_dir=data_dir, **kw)


def test_digits_splits_are_fixed_disjoint_and_cover_every_image():
  splits = split_indices(1797)
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [1258, 270, 269]
  joined = np.concatenate(list(splits.values()))
  assert len(np.unique(joined)) == 1797
  for name, idx in split_indices(1797).items():
    np.testing.assert_array_equal(idx, splits[name])


def test_digits_batches_have_the_documented_shapes_and_ranges(data_dir):
  ds = _dataset(data_dir, crop_padding=0)
  assert (ds.num_classes, ds.channels, ds.image_size) == (10, 1, 32)
  batch = next(iter(ds))
  assert batch["inputs"].shape == (16, 32, 32, 1) and batch["inputs"].dtype == np.float32
  assert batch["targets"].shape == (16,) and set(batch["targets"]) <= set(range(10))
  np.testing.assert_array_equal(batch["weights"], 1.0)
  # (x / 255 - 0.5) / 0.5 lies in [-1, 1]; digits have a black (x = 0) background.
  assert batch["inputs"].min() == -1.0 and batch["inputs"].max() <= 1.0


def test_evaluation_pass_sees_every_image_once_with_zero_weight_padding(data_dir):
  batches = list(_dataset(data_dir, "validation", batch_size=64))
  weights = np.concatenate([b["weights"] for b in batches])
  assert len(batches) == 5 and weights.sum() == 270
  np.testing.assert_array_equal(weights[270:], 0.0)
  again = list(_dataset(data_dir, "validation", batch_size=64))
  np.testing.assert_array_equal(batches[-1]["inputs"], again[-1]["inputs"])


def test_restored_iterator_state_continues_the_same_stream(data_dir):
  ds = _dataset(data_dir, batch_size=400)  # > 1 epoch in 4 batches
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = iter(_dataset(data_dir, batch_size=400))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["targets"], want["targets"])
  assert state["epoch"] == 0 and it.get_state()["epoch"] == 1


def test_augmentation_translates_and_flips_only_when_asked():
  image = np.zeros((8, 8, 1), np.uint8)
  image[4, 3] = 255
  rng = np.random.default_rng(0)
  shifts = set()
  for _ in range(30):
    (r,), (c,) = np.nonzero(augment(image, rng, padding=2, flip=False)[..., 0])
    assert abs(r - 4) <= 2 and abs(c - 3) <= 2
    shifts.add((r - 4, c - 3))
  assert len(shifts) > 5  # translations vary, and no mirror moved the pixel to column 4
  image[4, 3], image[2, 1] = 0, 255
  flipped = [augment(image, np.random.default_rng(s), padding=0, flip=True) for s in range(20)]
  assert any(f[2, 6, 0] == 255 for f in flipped) and any(f[2, 1, 0] == 255 for f in flipped)


def test_unknown_split_and_unprepared_dataset_name_the_fix(data_dir):
  with pytest.raises(data.DataError, match="no split"):
    _dataset(data_dir, "holdout")
  with pytest.raises(data.DataError, match="tfds build"):
    data.image_dataset("train", name="cifar10", batch_size=8, train=True, data_dir=data_dir)
