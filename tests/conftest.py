"""Shared test setup: the project's modules live at the repository root."""
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_SAMPLES = ROOT.parent / "shared" / "real-samples"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
