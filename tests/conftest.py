"""Shared test setup: the project's modules live at the repository root."""
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_SAMPLES = ROOT / "tests" / "data" / "real-samples"  # a few MPII and COCO files, README.md there


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
