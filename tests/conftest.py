"""Shared test setup: the project's modules live at the repository root."""
import os
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


class RunsCode:
    """Unpickles as os.mkdir(path): what a crafted checkpoint could do, made visible."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


BAD_CHECKPOINTS = ("garbage", "truncated", "runs-code")


def write_bad_checkpoint(path, kind):
    """A file at `path` that is not a checkpoint: random bytes, the first half of a real one, or one that creates
    the folder returned here when it is loaded with weights_only=False."""
    ran = path.parent / f"{path.name}.ran-code"
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        path.write_bytes(os.urandom(3000))
    elif kind == "truncated":
        torch.save({"model": {"w": torch.ones(100)}}, path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        torch.save({"model": RunsCode(ran), "config": {}, "optimizer": {}, "step": 0, "done": True, "rng": None}, path)
    return ran
