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


def write_itop(root, split, n, seed=0):
    """ITOP side-view files in the official layout (ITOP_side_{split}_depth_map.h5, ITOP_side_{split}_labels.h5):
    n frames of 240 x 320, a person at 2-2.6 m in a room at 4 m, 15 joints on the person whose real-world
    coordinates follow ITOP's projection (x = (u - 160) z 0.0035, y = (120 - v) z 0.0035), the last frame marked
    not valid. Returns the labels written, as numpy arrays."""
    import h5py
    import numpy as np
    rng = np.random.default_rng(seed)
    depth = np.full((n, 240, 320), 4.0, dtype=np.float16)
    segmentation = np.full((n, 240, 320), -1, dtype=np.int8)
    image = np.zeros((n, 15, 2), dtype=np.int64)
    world = np.zeros((n, 15, 3), dtype=np.float32)
    for k in range(n):
        top, left = rng.integers(20, 60), rng.integers(80, 180)
        body = (slice(top, top + 160), slice(left, left + 60))
        depth[k][body] = rng.uniform(2.0, 2.6, (160, 60)).astype(np.float16)
        segmentation[k][body] = rng.integers(0, 15, (160, 60))
        image[k] = np.stack([rng.integers(left, left + 60, 15), rng.integers(top, top + 160, 15)], 1)
        z = depth[k][image[k, :, 1], image[k, :, 0]].astype(np.float32)
        world[k] = np.stack([(image[k, :, 0] - 160) * z * 0.0035, (120 - image[k, :, 1]) * z * 0.0035, z], 1)
    valid = np.arange(n) < n - 1
    ids = np.array([f"{seed:02d}_{k:05d}".encode() for k in range(n)])
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / f"ITOP_side_{split}_depth_map.h5", "w") as f:
        f["id"], f["data"] = ids, depth
    with h5py.File(root / f"ITOP_side_{split}_labels.h5", "w") as f:
        f["id"], f["is_valid"], f["segmentation"] = ids, valid.astype(np.uint8), segmentation
        f["image_coordinates"], f["real_world_coordinates"] = image, world
        f["visible_joints"] = rng.integers(0, 2, (n, 15)).astype(np.uint8)
    return dict(depth=depth, segmentation=segmentation, image=image, world=world, valid=valid)
