"""Shared test setup: the project's modules live at the repository root."""
import math
import os
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

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


def dense_double_loop(f1, f2, coords, tau, candidates=None, hard=False):
    """Eq. 5 written out, the reference of losses.py's and hcmoco.py's dense terms: both directions, and every
    anchor's targets over the other modality's candidates come from ITS OWN distances to them (a soft-max over
    candidates of -distance), whichever modality the anchor is in; `hard`: the anchor's own point alone.
    f1, f2 [B, N, C] features of the same N points, coords [B, N, 2], candidates [B, N, N] bool (None: all).
    -> the mean over the B * N anchors of each modality, summed over both directions."""
    B, N, _ = f1.shape
    u1, u2 = F.normalize(f1.double(), dim=-1), F.normalize(f2.double(), dim=-1)
    ok = (lambda b, i, j: True) if candidates is None else (lambda b, i, j: bool(candidates[b, i, j]))  # noqa: E731
    total = 0.0
    for anchors, others in ((u1, u2), (u2, u1)):
        for b in range(B):
            for i in range(N):
                cands = [j for j in range(N) if ok(b, i, j)]
                dist = {j: float((coords[b, i] - coords[b, j]).norm()) for j in cands}
                if hard:
                    target = {j: float(j == i) for j in cands}
                else:
                    z = sum(math.exp(-dist[k]) for k in cands)
                    target = {j: math.exp(-dist[j]) / z for j in cands}
                log_den = math.log(sum(math.exp(float(anchors[b, i] @ others[b, k]) / tau) for k in cands))
                total -= sum(target[j] * (float(anchors[b, i] @ others[b, j]) / tau - log_den) for j in cands)
    return total / (B * N)


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
