"""`local_text`: a TFDS builder over local text files, written in array_record format.

The default config (`stdlib`) is a real corpus every machine has without a network: the `.py`
source files of the running Python's standard library (site-packages excluded). Any glob of
user text files works too (`local_text_builder(glob=...)`); its config name carries a hash of
the glob, so a different glob prepares a different dataset.

Splits are assigned per file by the MD5 of its path relative to the glob's root: the first 90%
of hash space is train, the next 5% validation, the last 5% test; if validation or test would be
empty (small corpora), the train files with the highest hashes move there. Preparation needs no
TensorFlow.
"""
import glob as glob_lib
import hashlib
import os
import sysconfig
from typing import Optional

import tensorflow_datasets as tfds


class DataError(ValueError):
  """Input data that is missing, empty or not prepared; the message says how to fix it."""


def stdlib_glob() -> str:
  return os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")


def _files(pattern: str) -> list[str]:
  files = sorted(f for f in glob_lib.glob(pattern, recursive=True) if os.path.isfile(f)
                 and "site-packages" not in f.split(os.sep))
  return files


def _hash_fraction(relative_path: str) -> float:
  return int(hashlib.md5(relative_path.encode("utf-8")).hexdigest()[:12], 16) / 16 ** 12


def assign_splits(files: list[str], root: str) -> dict[str, list[str]]:
  """Deterministic train/validation/test split of `files` by path hash (see module doc)."""
  scored = sorted(files, key=lambda f: _hash_fraction(os.path.relpath(f, root)))
  fractions = [_hash_fraction(os.path.relpath(f, root)) for f in scored]
  splits = {"train": [f for f, h in zip(scored, fractions) if h < 0.90],
            "validation": [f for f, h in zip(scored, fractions) if 0.90 <= h < 0.95],
            "test": [f for f, h in zip(scored, fractions) if h >= 0.95]}
  for name in ("validation", "test"):
    if not splits[name] and len(splits["train"]) > 1:
      splits[name].append(splits["train"].pop())
  return splits


def _glob_root(pattern: str) -> str:
  prefix = pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
  return prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)


class LocalTextConfig(tfds.core.BuilderConfig):

  def __init__(self, *, glob: str, **kwargs):
    super().__init__(version=tfds.core.Version("1.0.0"), **kwargs)
    self.glob = glob


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Local text files, one example per file: {'text': str, 'path': str}."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [LocalTextConfig(name="stdlib", glob=stdlib_glob(),
                                     description="Python standard library sources.")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f"Text files matching {self.builder_config.glob}",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "path": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    pattern = self.builder_config.glob
    files = _files(pattern)
    if not files:
      raise DataError(f"The corpus glob {pattern!r} matches no files. Point lm_dataset.glob "
                      f"at existing text files (e.g. '/data/books/**/*.txt').")
    if all(os.path.getsize(f) == 0 for f in files):
      raise DataError(f"The corpus glob {pattern!r} matches {len(files)} file(s), all empty. "
                      f"Point lm_dataset.glob at files that contain text.")
    splits = assign_splits(files, _glob_root(pattern))
    empty = [name for name, paths in splits.items() if not paths]
    if empty:
      raise DataError(f"The corpus glob {pattern!r} matches {len(files)} file(s), too few for "
                      f"its splits: splits are assigned per file, so {', '.join(empty)} would be "
                      f"empty. Point lm_dataset.glob at 3 or more files (train, validation, "
                      f"test each need one).")
    return {name: self._generate_examples(paths) for name, paths in splits.items()}

  def _generate_examples(self, paths):
    for path in paths:
      with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
      if text:
        yield path, {"text": text, "path": path}


def local_text_builder(glob: Optional[str] = None,
                       data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """The builder for the stdlib corpus (glob=None) or for a user glob."""
  if glob is None:
    return LocalText(config="stdlib", data_dir=data_dir, file_format="array_record")
  pattern = os.path.abspath(os.path.expanduser(glob))
  name = "files_" + hashlib.sha1(pattern.encode()).hexdigest()[:12]
  config = LocalTextConfig(name=name, glob=pattern, description=f"Files matching {pattern}")
  return LocalText(config=config, data_dir=data_dir, file_format="array_record")
