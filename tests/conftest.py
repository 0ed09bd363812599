"""Shared test set-up: a fresh gin config for every test, the small text corpus and a run
trained on it."""
import os
import shutil
import tempfile

import gin
import jax
import pytest

# Tests parse every config, as the entry points do, so every method's configurables register.
from adacomp.methods import registry  # pylint: disable=unused-import


_CACHE_ENV = "ADACOMP_TEST_COMPILATION_CACHE"


def pytest_configure(config):
  """One persistent XLA compilation cache for the whole run, shared by the xdist workers and the
  subprocesses tests start: many tests compile the same tiny programs (the same config trained,
  evaluated or decoded again), and a cache hit replaces a compile. Keys hash the program and the
  compile options, so a hit is the same executable. A fresh directory per run unless
  ADACOMP_TEST_COMPILATION_CACHE names one to keep."""
  if not os.environ.get(_CACHE_ENV):
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="adacomp-xla-cache-")
    config._adacomp_cache_owner = True  # pylint: disable=protected-access
  settings = {"jax_compilation_cache_dir": os.environ[_CACHE_ENV],
              "jax_persistent_cache_min_compile_time_secs": 0,  # cache every compile
              "jax_persistent_cache_min_entry_size_bytes": -1}
  for name, value in settings.items():
    # The environment (JAX reads each option's upper-cased name) reaches xdist workers and
    # test subprocesses; the update, this process.
    os.environ[name.upper()] = str(value)
    jax.config.update(name, value)


def pytest_unconfigure(config):
  if getattr(config, "_adacomp_cache_owner", False):
    shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """A small Python-like corpus (tests/corpus.py) and a TFDS data_dir for it, once per worker."""
  from tests.corpus import write_corpus  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("corpus")
  glob = write_corpus(str(root / "text"))
  return {"glob": glob, "data_dir": str(root / "tfds")}


@pytest.fixture(scope="session")
def tiny_run(corpus, tmp_path_factory):
  """(workdir, summary) of tests/testdata/tiny_train.gin trained for its 8 steps (checkpoints 1,
  2, 4, 6, 8), once per worker. Tests read it; a test that writes into a run copies it first."""
  from adacomp import training  # pylint: disable=g-import-not-at-top
  from tests.corpus import configure  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("tiny_run") / "run"
  gin.clear_config()
  configure(corpus)
  summary = training.train(str(workdir))
  gin.clear_config()
  return workdir, summary
