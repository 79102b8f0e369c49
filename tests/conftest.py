"""Shared fixtures: a seeded generator, the repository's folders, and ../shared when present."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "models"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def shared() -> Path:
    if not (SHARED / "models").is_dir():
        pytest.skip("../shared is not beside this checkout (it holds the real MNIST models and data)")
    return SHARED
