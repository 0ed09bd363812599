"""Every test starts and ends with the process-wide kernel default at "auto"."""
import pytest

import pallas_kernels


@pytest.fixture(autouse=True)
def _auto_impl():
  pallas_kernels.set_default_impl("auto")
  yield
  pallas_kernels.set_default_impl("auto")
