"""Shared test set-up: a fresh gin config for every test, and the small text corpus."""
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
