"""Shared test set-up: a fresh gin config for every test, the small text corpus and a run
trained on it."""
import gin
import pytest

# Tests parse every config, as the entry points do, so every method's configurables register.
from adacomp.methods import registry  # pylint: disable=unused-import


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
