"""Shared test set-up: a fresh gin config for every test."""
import gin
import pytest


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()
