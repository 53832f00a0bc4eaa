import sys
from pathlib import Path

import pytest

import optax8

# Lets test modules import the shared `cases` module.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _default_implementation():
  """Every test starts and ends with the implementation chosen by the environment."""
  optax8.set_implementation(None)
  yield
  optax8.set_implementation(None)
