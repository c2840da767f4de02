"""Data: real dataset readers, modality masks, mixing, paired transforms, collate and the fixed held-out batch.

Every reader returns the sample dict of docs/conventions.md, keypoints in the MPII-16 order (schema.py):
    rgb [3,H,W] float in [0, 1] (PairedTransform normalises it), depth [1,H,W] metres (0 = no return),
    keypoints [16,2] pixel (x, y), keypoints_visible [16] bool, optional labels parts [H,W] int64 (0 background,
    1..24 parts, IGNORE = 255 ignored), joints3d [J,3], iuv [3,H,W], mask [H,W] bool, intrinsics [3,3];
    present {rgb, depth, keypoints} bools; index int.
A modality a dataset lacks is left out of its items (present[...] = False); `collate` zero-fills it.

Depth stays in metres all the way into the batch. The person-centred normalisation the depth encoder expects
(the published loader subtracts the mean depth of the person and zeroes everything else) happens at the model
input, `hcmoco.depth_input(depth, mask)`, so that augmentation, point clouds and 3D-pose labels all see metric
depth. Every reader with depth therefore supplies the person `mask` (synthetic: the rendered silhouette; NTU
RGB+D: the non-zero pixels of its masked depth maps; parsing sets: the labelled pixels; ITOP: its segmentation).

Pre-training: MPII, COCOKeypoints, NTURGBD (+ read_ntu_skeleton), mixed by pretraining_set. Downstream:
Human36MParts, NTURGBDParsing, ITOP. Batches: StepBatches (seeded, resumable), collate, to_device; the monitors' and
notebooks' fixed batch of held-out people: heldout_batch.
"""
import json
import math
import os
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import synthetic
from encoders import apply_affine
from schema import FLIP_JOINTS, FLIP_PARTS, IGNORE, MODALITIES, NUM_JOINTS

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

# COCO-17 -> MPII-16: the COCO index of each MPII joint; pelvis and thorax are midpoints, neck and head-top absent.
COCO_TO_MPII = [16, 14, 12, 11, 13, 15, None, None, None, None, 10, 8, 6, 5, 7, 9]
COCO_MIDPOINTS = {6: (11, 12), 7: (5, 6)}  # pelvis = hip midpoint, thorax = shoulder midpoint
# Kinect v2 (25 joints, NTU RGB+D) -> MPII-16, the Kinect index of each MPII joint. Kinect's depth and colour frames
# (and the skeleton's depthX/Y, colorX/Y) are mirror images: a person facing the camera has their left shoulder on
# the image's left, where MPII, labelling photographs, puts the right shoulder. So Kinect's left joints become
# MPII's right ones, as in the published map (tests/test_data.py checks it on a recorded NTU RGB+D frame).
# thorax = SpineShoulder (20, at shoulder height, as MPII's thorax; the published map takes SpineMid, 1);
# head_top = the Kinect head centre, the closest joint it has.
KINECT_TO_MPII = [14, 13, 12, 16, 17, 18, 0, 20, 2, 3, 6, 5, 4, 8, 9, 10]


# ------------------------------------------------------------------------------------------------------ file I/O
def require(path, layout):
    """Raise FileNotFoundError naming `path` and the layout the reader expects, if it does not exist."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; expected layout:\n{layout}")
    return path


def read_image(path, mode="RGB"):
    """An image file as a float tensor [C,H,W] in [0, 1] (RGB) or the raw integers (mode 'I;16' / 'L' labels).
    Unreadable or truncated files raise OSError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert(mode) if mode == "RGB" else im)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e
    if mode == "RGB":
        return torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    return torch.from_numpy(arr.astype(np.int64))


class SkipBad:
    """Mixin for readers: with skip_bad=True an unreadable item is skipped with a warning and the next one is
    returned instead; otherwise the error, which names the file, propagates."""

    def __getitem__(self, i):
        for k in range(len(self)):
            j = (i + k) % len(self)
            try:
                return self.load(j)
            except OSError as e:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping item {j}: {e}")
        raise OSError(f"{type(self).__name__}: no readable item at all")


def crop_person(rgb, keypoints, visible, center, size, image_size, depth=None, labels=None):
    """Square crop of side `size` around `center` (x, y), zero-padded where it leaves the image, resized to
    image_size. Keypoints follow; those leaving the crop become not visible."""
    top, left = center[1] - size / 2, center[0] - size / 2
    out = dict(rgb=TF.resized_crop(rgb, round(top), round(left), round(size), round(size), [image_size] * 2,
                                   antialias=True).clamp(0, 1))
    scale = image_size / round(size)
    kp = (keypoints - torch.tensor([round(left), round(top)])) * scale + (scale - 1) / 2  # pixel centres stay centres
    visible = visible & ((kp >= 0) & (kp <= image_size - 1)).all(dim=1)
    out["keypoints"], out["keypoints_visible"] = (kp * visible[:, None]).float(), visible
    return out


# ------------------------------------------------------------------------------------------------ pre-training
class MPII(SkipBad, torch.utils.data.Dataset):
    """MPII Human Pose in the layout HRNet and HCMoCo read: root/annot/{split}.json, a list of
    {image, center [x, y], scale (person height / 200 px), joints [16][2], joints_vis [16]}, and root/images/.
    A square person-centred crop of side 1.25 * 200 * scale around center. RGB and keypoints; no depth.
    Joints with joints_vis 0, and joints that leave the crop, are not visible."""

    LAYOUT = ("  <root>/annot/{split}.json  (list of {image, center, scale, joints, joints_vis}; train.py's "
              "--mpii-split names the split)\n  <root>/images/<image>")

    def __init__(self, root, split="train", image_size=256, skip_bad=False):
        path = require(os.path.join(root, "annot", f"{split}.json"), self.LAYOUT)
        require(os.path.join(root, "images"), self.LAYOUT)
        with open(path) as f:
            self.entries = json.load(f)
        for k, e in enumerate(self.entries):
            missing = {"image", "center", "scale", "joints", "joints_vis"} - set(e)
            if missing or len(e["joints"]) != NUM_JOINTS:
                raise ValueError(f"{path}: entry {k} ({e.get('image', '?')}) is malformed: "
                                 f"{'missing ' + str(sorted(missing)) if missing else 'needs 16 joints'}")
        self.root, self.image_size, self.skip_bad = root, image_size, skip_bad

    def __len__(self):
        return len(self.entries)

    def load(self, i):
        e = self.entries[i]
        rgb = read_image(os.path.join(self.root, "images", e["image"]))
        # MPII's centre and joints are 1-based (Matlab) pixels; the centre moves down 15 px per unit of scale so
        # that the feet stay in the crop, as HRNet's reader does
        joints = torch.tensor(e["joints"], dtype=torch.float32) - 1
        visible = torch.tensor(e["joints_vis"]) > 0
        centre = (e["center"][0] - 1, e["center"][1] - 1 + 15 * e["scale"])
        out = crop_person(rgb, joints, visible, centre, 1.25 * 200 * e["scale"], self.image_size)
        return dict(out, present={"rgb": True, "depth": False, "keypoints": True}, index=i)


class COCOKeypoints(SkipBad, torch.utils.data.Dataset):
    """COCO person keypoints: root/annotations/person_keypoints_{split}.json and root/{split}/<file_name>.
    One item per person with iscrowd 0 and at least `min_keypoints` labelled keypoints; a square crop of
    1.25 x the bbox's longer side. COCO-17 -> MPII-16: pelvis and thorax are midpoints when both ends are
    labelled; upper-neck and head-top, which COCO lacks, are marked not visible, never invented."""

    LAYOUT = "  <root>/annotations/person_keypoints_{split}.json\n  <root>/{split}/<file_name>"

    def __init__(self, root, split="train2017", image_size=256, min_keypoints=8, skip_bad=False):
        path = require(os.path.join(root, "annotations", f"person_keypoints_{split}.json"), self.LAYOUT)
        require(os.path.join(root, split), self.LAYOUT)
        with open(path) as f:
            coco = json.load(f)
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        self.people = []
        for a in coco["annotations"]:
            if len(a.get("keypoints", [])) != 51 or "bbox" not in a or a.get("image_id") not in files:
                raise ValueError(f"{path}: annotation {a.get('id', '?')} is malformed (needs 17 keypoints, bbox, "
                                 f"a known image_id)")
            if not a.get("iscrowd", 0) and a.get("num_keypoints", 0) >= min_keypoints:
                self.people.append((files[a["image_id"]], a["bbox"], a["keypoints"]))
        self.root, self.split, self.image_size, self.skip_bad = root, split, image_size, skip_bad

    def __len__(self):
        return len(self.people)

    @staticmethod
    def to_mpii(coco_keypoints):
        """[17*3] COCO (x, y, v) -> MPII-16 keypoints [16,2] and visibility [16] (labelled = v > 0)."""
        k = torch.tensor(coco_keypoints, dtype=torch.float32).view(17, 3)
        labelled = k[:, 2] > 0
        kp, vis = torch.zeros(NUM_JOINTS, 2), torch.zeros(NUM_JOINTS, dtype=torch.bool)
        for m, c in enumerate(COCO_TO_MPII):
            if c is not None:
                kp[m], vis[m] = k[c, :2], labelled[c]
        for m, (a, b) in COCO_MIDPOINTS.items():
            if labelled[a] and labelled[b]:
                kp[m], vis[m] = (k[a, :2] + k[b, :2]) / 2, True
        return kp * vis[:, None], vis

    def load(self, i):
        file_name, (x, y, w, h), coco_kp = self.people[i]
        rgb = read_image(os.path.join(self.root, self.split, file_name))
        kp, vis = self.to_mpii(coco_kp)
        out = crop_person(rgb, kp, vis, (x + w / 2, y + h / 2), 1.25 * max(w, h), self.image_size)
        return dict(out, present={"rgb": True, "depth": False, "keypoints": True}, index=i)


def read_ntu_skeleton(path):
    """The official NTU RGB+D .skeleton text format: the frame count; per frame the body count; per body a line of
    10 values (body id, clipedEdges, handLeftConfidence, handLeftState, handRightConfidence, handRightState,
    isRestricted, leanX, leanY, trackingState), the joint count (25) and one line per joint of
    x y z depthX depthY colorX colorY orientationW orientationX orientationY orientationZ trackingState.
    Returns frames -> bodies -> {'body_id': str, 'joints': float array [25, 12] in that column order}."""
    with open(require(path, "  an NTU RGB+D .skeleton file")) as f:
        tokens = iter([line for line in f.read().splitlines() if line.strip()])
    try:
        frames = []
        for _ in range(int(next(tokens))):
            bodies = []
            for _ in range(int(next(tokens))):
                body_id = next(tokens).split()[0]
                n = int(next(tokens))
                joints = np.array([[float(v) for v in next(tokens).split()] for _ in range(n)])
                if joints.shape != (n, 12):
                    raise ValueError(f"joint lines need 12 values, got shape {joints.shape}")
                bodies.append({"body_id": body_id, "joints": joints})
            frames.append(bodies)
    except (StopIteration, ValueError, IndexError) as e:
        raise ValueError(f"{path}: malformed .skeleton file ({e or 'ends early'})") from e
    return frames


def fit_color_to_depth(color_xy, depth_xy):
    """Least-squares map from Kinect colour pixels to depth pixels, x_d = s x_c + t (one scale, a translation):
    the two cameras are side by side and parallel, so at a person's distance the registration is close to a
    scaling plus a shift. The fit uses the skeleton's tracked joints, whose colorX/Y and depthX/Y locate the same
    body point in both frames. [N,2] + [N,2] -> (s, t [2])."""
    c = color_xy - color_xy.mean(0)
    d = depth_xy - depth_xy.mean(0)
    s = float((c * d).sum() / (c * c).sum())
    return s, depth_xy.mean(0) - s * color_xy.mean(0)


class NTURGBD(SkipBad, torch.utils.data.Dataset):
    """NTU RGB+D 60 frames: RGB, masked depth and skeleton, registered into the depth camera's frame.

    Layout (the official masked depth maps and skeletons; RGB as frames extracted from the .avi files,
    e.g. `ffmpeg -i S001C001P001R001A001_rgb.avi rgb/S001C001P001R001A001/%05d.jpg`, 1-based):
        <root>/nturgb+d_skeletons/<name>.skeleton
        <root>/nturgb+d_depth_masked/<name>/MDepth-%08d.png    (uint16 millimetres, background 0)
        <root>/rgb/<name>/%05d.jpg
    Every `stride`-th frame with a tracked body is an item (1 in 30 as published: 143,648 frames of NTU RGB+D 60);
    the first body is used. Registration: the colour
    frame is resampled onto the depth pixel grid with the per-frame fit of `fit_color_to_depth`; then a square
    person-centred crop (1.25 x the skeleton's extent in the depth frame) is resized to image_size."""

    LAYOUT = ("  <root>/nturgb+d_skeletons/<name>.skeleton\n  <root>/nturgb+d_depth_masked/<name>/MDepth-%08d.png\n"
              "  <root>/rgb/<name>/%05d.jpg")

    def __init__(self, root, image_size=256, stride=30, skip_bad=False):
        skel_dir = require(os.path.join(root, "nturgb+d_skeletons"), self.LAYOUT)
        require(os.path.join(root, "nturgb+d_depth_masked"), self.LAYOUT)
        require(os.path.join(root, "rgb"), self.LAYOUT)
        self.items = []
        for fname in sorted(os.listdir(skel_dir)):
            if not fname.endswith(".skeleton"):
                continue
            name = fname[:-len(".skeleton")]
            frames = read_ntu_skeleton(os.path.join(skel_dir, fname))
            for t in range(0, len(frames), stride):
                if frames[t]:
                    self.items.append((name, t, frames[t][0]["joints"]))
        self.root, self.image_size, self.skip_bad = root, image_size, skip_bad

    def __len__(self):
        return len(self.items)

    def load(self, i):
        name, t, joints = self.items[i]
        depth = read_image(os.path.join(self.root, "nturgb+d_depth_masked", name, f"MDepth-{t + 1:08d}.png"), "I")
        depth = depth.float()[None] / 1000  # [1, H, W] metres
        rgb = read_image(os.path.join(self.root, "rgb", name, f"{t + 1:05d}.jpg"))
        tracked = joints[:, 11] == 2
        s, shift = fit_color_to_depth(joints[tracked][:, 5:7], joints[tracked][:, 3:5])
        H, W = depth.shape[-2:]
        # depth pixel (u, v) sees the colour pixel ((u, v) - shift) / s
        v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                              indexing="ij")
        cx, cy = (u - float(shift[0])) / s, (v - float(shift[1])) / s
        Hc, Wc = rgb.shape[-2:]
        grid = torch.stack([cx / (Wc - 1) * 2 - 1, cy / (Hc - 1) * 2 - 1], dim=-1)[None]
        rgb = torch.nn.functional.grid_sample(rgb[None], grid, align_corners=True)[0]  # [3, H, W] in depth frame
        kp = torch.from_numpy(joints[KINECT_TO_MPII, 3:5]).float()
        vis = torch.from_numpy(joints[KINECT_TO_MPII, 11] > 0)
        lo, hi = kp[vis].min(0).values, kp[vis].max(0).values
        centre, size = ((lo + hi) / 2).tolist(), 1.25 * float((hi - lo).max()) + 16
        out = crop_person(rgb, kp, vis, centre, size, self.image_size)
        top, left = round(centre[1] - size / 2), round(centre[0] - size / 2)
        out["depth"] = TF.resized_crop(depth, top, left, round(size), round(size), [self.image_size] * 2,
                                       interpolation=v2.InterpolationMode.NEAREST)
        out["mask"] = out["depth"][0] > 0  # the masked depth maps keep the person's pixels only
        return dict(out, present={"rgb": True, "depth": True, "keypoints": True}, index=i)


# -------------------------------------------------------------------------------------------------- downstream
class Human36MParts(SkipBad, torch.utils.data.Dataset):
    """Human3.6M human parsing (24 parts, as HCMoCo uses it): root/{split}.txt with one
    `<rgb path> <label path>` pair per line, paths relative to root; label PNGs hold 0..24 (255 ignore)."""

    LAYOUT = "  <root>/{split}.txt  (lines: <rgb path> <label png path>, relative to <root>)"

    def __init__(self, root, split="train", skip_bad=False):
        self.pairs = read_list(require(os.path.join(root, f"{split}.txt"), self.LAYOUT), 2)
        self.root, self.skip_bad = root, skip_bad

    def __len__(self):
        return len(self.pairs)

    def load(self, i):
        rgb_path, label_path = (os.path.join(self.root, p) for p in self.pairs[i])
        parts = read_image(label_path, "L")
        return dict(rgb=read_image(rgb_path), parts=parts, mask=(parts > 0) & (parts < IGNORE),
                    present={"rgb": True, "depth": False, "keypoints": False}, index=i)


class NTURGBDParsing(SkipBad, torch.utils.data.Dataset):
    """NTURGBD-Parsing-4K (HCMoCo's release): root/{split}.txt with `<rgb> <depth png, uint16 mm> <label png>`
    per line, relative to root; RGB already registered to depth; labels 0..24 (255 ignore)."""

    LAYOUT = "  <root>/{split}.txt  (lines: <rgb path> <depth png path> <label png path>, relative to <root>)"

    def __init__(self, root, split="train", skip_bad=False):
        self.triples = read_list(require(os.path.join(root, f"{split}.txt"), self.LAYOUT), 3)
        self.root, self.skip_bad = root, skip_bad

    def __len__(self):
        return len(self.triples)

    def load(self, i):
        rgb_path, depth_path, label_path = (os.path.join(self.root, p) for p in self.triples[i])
        parts = read_image(label_path, "L")
        return dict(rgb=read_image(rgb_path), depth=read_image(depth_path, "I").float()[None] / 1000, parts=parts,
                    mask=(parts > 0) & (parts < IGNORE), present={"rgb": True, "depth": True, "keypoints": False},
                    index=i)


def read_list(path, columns):
    """Lines of `columns` whitespace-separated paths; a malformed line is named."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = line.split()
                if len(row) != columns:
                    raise ValueError(f"{path}:{n}: expected {columns} paths, got {len(row)}")
                rows.append(row)
    return rows


class ITOP(torch.utils.data.Dataset):
    """ITOP side view (Haque et al., 2016): root/ITOP_side_{split}_depth_map.h5 (`data` [N,240,320] metres) and
    root/ITOP_side_{split}_labels.h5 (`real_world_coordinates` [N,15,3] metres, `image_coordinates` [N,15,2],
    `visible_joints` [N,15], `is_valid` [N], `segmentation` [N,240,320] with -1 off the person). Items are valid
    frames with depth, the person mask (segmentation >= 0), joints3d in ITOP's 15-joint order (head, neck, r/l
    shoulder, r/l elbow, r/l hand, torso, r/l hip, r/l knee, r/l foot) and the intrinsics. ITOP's real-world frame
    has y up; joints3d are in the camera frame of docs/conventions.md, (x, -y, z), which the intrinsics of ITOP's
    projection, u = 160 + x / (0.0035 z), v = 120 - y / (0.0035 z) (the published A2J code's world2pixel), map
    to the image. Needs h5py, imported here only."""

    JOINTS = 15
    INTRINSICS = torch.tensor([[1 / 0.0035, 0, 160], [0, 1 / 0.0035, 120], [0, 0, 1]])

    def __init__(self, root, split="train"):
        try:
            import h5py
        except ImportError as e:
            raise ImportError("ITOP reads HDF5 files: pip install h5py") from e
        layout = "  <root>/ITOP_side_{split}_depth_map.h5\n  <root>/ITOP_side_{split}_labels.h5"
        with h5py.File(require(os.path.join(root, f"ITOP_side_{split}_labels.h5"), layout), "r") as f:
            valid = np.asarray(f["is_valid"]).astype(bool)
            self.joints3d = np.asarray(f["real_world_coordinates"])[valid].astype(np.float32) * [1, -1, 1]
            self.visible = np.asarray(f["visible_joints"])[valid].astype(bool)
            self.mask = np.asarray(f["segmentation"])[valid] >= 0
        with h5py.File(require(os.path.join(root, f"ITOP_side_{split}_depth_map.h5"), layout), "r") as f:
            self.depth = np.asarray(f["data"])[valid].astype(np.float32)

    def __len__(self):
        return len(self.depth)

    def __getitem__(self, i):
        return dict(depth=torch.from_numpy(self.depth[i])[None], mask=torch.from_numpy(self.mask[i]),
                    joints3d=torch.from_numpy(self.joints3d[i]).float(), intrinsics=self.INTRINSICS.clone(),
                    joints_visible=torch.from_numpy(self.visible[i]),
                    present={"rgb": False, "depth": True, "keypoints": False}, index=i)


# ---------------------------------------------------------------------------------------------- mixing, collate
class MixedDataset(torch.utils.data.Dataset):
    """Concatenation of heterogeneous datasets. `index` becomes dataset-wide (each dataset's items are offset by the
    sizes of those before it), the memory bank's key; each item keeps its `present` mask. A key (i, seed) reaches
    the part as (local i, seed), so parts that are `Transformed` keep their seeded augmentation.
    `weights` [N] (StepBatches draws items with replacement in proportion to them): with balanced=True each item
    weighs 1 / its part's size, so every part is drawn equally often, as the published loader draws NTU RGB+D and
    MPII (or COCO) 50/50; None (uniform permutations) otherwise."""

    def __init__(self, datasets, balanced=False):
        self.datasets = list(datasets)
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])
        self.weights = torch.cat([torch.full((len(d),), 1 / len(d), dtype=torch.float64) for d in self.datasets]) \
            if balanced else None

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for MixedDataset of {len(self)} items")
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        local = i - int(self.offsets[k])
        part = self.datasets[k]
        sample = dict(part[local if seed is None or not isinstance(part, Transformed) else (local, seed)])
        sample["index"] = i
        return sample


def collate(samples):
    """Stack samples into the batch dict of docs/conventions.md. A modality an item lacks is zero-filled (depth
    [1,H,W] with an empty person mask, keypoints [16,2] with keypoints_visible False) and present[...] = False, so
    the losses can mask it. Label keys are kept when every sample has them."""
    H, W = next(s[k] for s in samples for k in ("rgb", "depth") if k in s).shape[-2:]
    blank = {"rgb": torch.zeros(3, H, W), "depth": torch.zeros(1, H, W), "mask": torch.zeros(H, W, dtype=torch.bool),
             "keypoints": torch.zeros(NUM_JOINTS, 2), "keypoints_visible": torch.zeros(NUM_JOINTS, dtype=torch.bool)}
    batch = {k: torch.stack([s.get(k, v) for s in samples]) for k, v in blank.items()}
    batch["present"] = {m: torch.tensor([bool(s["present"][m]) and (m in s) for s in samples]) for m in MODALITIES}
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    common = set.intersection(*(set(s) for s in samples)) - set(batch)
    for k in sorted(common):
        batch[k] = torch.stack([torch.as_tensor(s[k]) for s in samples])
    return batch


# -------------------------------------------------------------------------------------------------- transforms
def normalize_rgb(rgb):
    return (rgb - IMAGENET_MEAN.to(rgb)) / IMAGENET_STD.to(rgb)


def denormalize_rgb(rgb):
    """Undo normalize_rgb for display: [..., 3, H, W] -> values in [0, 1]."""
    return (rgb * IMAGENET_STD.to(rgb) + IMAGENET_MEAN.to(rgb)).clamp(0, 1)


def flip_sample(sample):
    """Mirror a sample left-right: images flipped, keypoint x -> W - 1 - x with slots swapped by FLIP_JOINTS, part
    labels (and iuv's part channel) remapped by FLIP_PARTS, the u surface coordinate mirrored (u -> 1 - u on the
    person), joints3d x negated and swapped, cx -> W - 1 - cx. Works on samples that lack RGB or depth."""
    out = dict(sample)
    W = next(sample[k] for k in ("rgb", "depth", "parts", "mask") if k in sample).shape[-1]
    fj, fp = torch.tensor(FLIP_JOINTS), torch.tensor(FLIP_PARTS)
    for k in ("rgb", "depth", "mask"):
        if k in sample:
            out[k] = sample[k].flip(-1)
    if "parts" in sample:
        parts = sample["parts"].flip(-1)
        out["parts"] = torch.where(parts == IGNORE, parts, fp[parts.clamp(max=24)])
    if "iuv" in sample:
        iuv = sample["iuv"].flip(-1).clone()
        body = iuv[0] > 0
        iuv[0] = fp[iuv[0].long()].float()
        iuv[1] = torch.where(body, 1 - iuv[1], iuv[1])
        out["iuv"] = iuv
    if "keypoints" in sample:
        kp = sample["keypoints"][fj].clone()
        kp[:, 0] = W - 1 - kp[:, 0]
        out["keypoints"], out["keypoints_visible"] = kp, sample["keypoints_visible"][fj]
    if "joints3d" in sample:
        j3 = sample["joints3d"][fj].clone()
        j3[:, 0] = -j3[:, 0]
        out["joints3d"] = j3
    if "intrinsics" in sample:
        K = sample["intrinsics"].clone()
        K[0, 2] = W - 1 - K[0, 2]
        out["intrinsics"] = K
    return out


class PairedTransform:
    """One random geometric transform applied identically to every modality and label of a sample.

    Train: the geometry comes from `recipe`:
      'cpu'   a rotation uniform in +-rotate deg, a log-uniform scale in `scale` and a translation of up to
              +-translate of the image about the image centre, a horizontal flip with probability `flip` (keypoint
              slots swapped by FLIP_JOINTS, part labels by FLIP_PARTS: flip_sample), colour jitter on RGB.
              The CPU preset's and fine-tuning's choice (README, "Departures").
      'ntu'   after the published NTU RGB+D augmentation: one square crop whose area is U(0.08, 1.2) x the area
              of the sample's frame (square: for NTURGBD, its person crop of 1.25 x the skeleton's extent), zero-
              padded where it leaves the frame (areas above 1 shrink the person), centred at a uniform point of the
              visible joints' bounding box; no rotation, flip or colour jitter. The published crop is of the
              512 x 424 depth frame, and torchvision's RandomResizedCrop redraws squares that do not fit, so its
              area is U(0.08, 0.83) x the frame's (side 132-424 px).
      'mpii'  the published MPII / COCO augmentation, about the centre of the reader's person crop: scale
              clip(N(1, 0.25), 0.75, 1.25), rotation clip(N(0, 30), -60, 60) deg with probability 0.6; no flip,
              no colour jitter.
    Eval (train=False): only the resize. Both resize to image_size and normalise RGB with the ImageNet statistics.
    Depth, parts, iuv and mask use nearest-neighbour sampling so that depth never blends with holes; pixels from
    outside the source are 0 (depth: no return; parts: 255, ignored). Keypoints that leave the frame become not
    visible. Intrinsics are updated for the scale and translation and left alone by the rotation (about the image
    centre), so a back-projected cloud is rotated about the optical axis, a rigid motion."""

    RECIPES = ("cpu", "ntu", "mpii")

    def __init__(self, image_size, train=True, rotate=30.0, scale=(0.75, 1.25), translate=0.1, flip=0.5,
                 color_jitter=0.4, recipe="cpu"):
        if recipe not in self.RECIPES:
            raise ValueError(f"recipe must be one of {self.RECIPES}, got {recipe!r}")
        self.image_size, self.train, self.recipe = image_size, train, recipe
        self.rotate, self.scale, self.translate, self.flip = rotate, scale, translate, flip
        self.jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter, color_jitter / 8)

    def draw(self, sample, size):
        """(flip, angle in degrees, scale, shift [dx, dy] in pixels, colour jitter) of one training transform of a
        sample whose frame is `size` (H, W); x' = c + scale R(angle)(x - c) + shift, c the frame's centre."""
        H, W = size
        if self.recipe == "cpu":
            shift = [round(random.uniform(-self.translate, self.translate) * n) for n in (W, H)]
            return (random.random() < self.flip, random.uniform(-self.rotate, self.rotate),
                    math.exp(random.uniform(*np.log(self.scale))), shift, True)
        if self.recipe == "ntu":
            s = 1 / math.sqrt(random.uniform(0.08, 1.2))  # the crop's side is sqrt(area) of a square frame's
            kp = sample["keypoints"][sample["keypoints_visible"]]
            lo, hi = (kp.min(0).values.tolist(), kp.max(0).values.tolist()) if len(kp) else ([0, 0], [W - 1, H - 1])
            p = [random.uniform(lo[0], hi[0]), random.uniform(lo[1], hi[1])]  # the crop's centre
            return False, 0.0, s, [round(s * ((W - 1) / 2 - p[0])), round(s * ((H - 1) / 2 - p[1]))], False
        s = float(np.clip(random.gauss(1, 0.25), 0.75, 1.25))
        angle = float(np.clip(random.gauss(0, 30), -60, 60)) if random.random() < 0.6 else 0.0
        return False, angle, s, [0, 0], False

    def __call__(self, sample):
        out = dict(sample)
        size = sample["rgb"].shape[-2:] if "rgb" in sample else sample["depth"].shape[-2:]
        if self.train:
            flip, angle, s, shift, jitter = self.draw(sample, size)
            if flip:
                out = flip_sample(out)
            out = self._geometric(out, lambda x, interp, fill: TF.affine(
                x, angle=angle, translate=shift, scale=s, shear=[0.0, 0.0], interpolation=interp, fill=fill))
            if "intrinsics" in out:
                K = out["intrinsics"].clone()
                centre = torch.tensor([(size[1] - 1) / 2, (size[0] - 1) / 2])
                K[:2, :2] *= s
                K[:2, 2] = (K[:2, 2] - centre) * s + centre + torch.tensor(shift, dtype=torch.float32)
                out["intrinsics"] = K
            if jitter and "rgb" in out:
                out["rgb"] = self.jitter(out["rgb"])
        if tuple(size) != (self.image_size, self.image_size):
            out = self._geometric(out, lambda x, interp, fill: TF.resize(
                x, [self.image_size] * 2, interpolation=interp, antialias=interp != v2.InterpolationMode.NEAREST))
            if "intrinsics" in out:
                K = out["intrinsics"].clone()
                ratio = torch.tensor([self.image_size / size[1], self.image_size / size[0]])
                K[0, :] *= ratio[0]
                K[1, :] *= ratio[1]
                K[:2, 2] += (ratio - 1) / 2  # pixel centres at integers
                out["intrinsics"] = K
        if "rgb" in out:
            out["rgb"] = normalize_rgb(out["rgb"])
        return out

    @staticmethod
    def _geometric(sample, op):
        """Apply op(tensor, interpolation, fill) to every spatial entry. Keypoints go through torchvision's
        continuous coordinates (pixel i spans [i, i + 1)), hence the half-pixel shifts."""
        out = dict(sample)
        nearest, bilinear = v2.InterpolationMode.NEAREST, v2.InterpolationMode.BILINEAR
        if "rgb" in out:
            out["rgb"] = op(tv_tensors.Image(out["rgb"]), bilinear, 0.0).as_subclass(torch.Tensor)
        for key, fill in (("depth", 0.0), ("iuv", 0.0), ("mask", False), ("parts", IGNORE)):
            if key in out:
                out[key] = op(tv_tensors.Mask(out[key]), nearest, fill).as_subclass(torch.Tensor)
        if "keypoints" in out:
            canvas = tuple((out.get("rgb", out.get("depth"))).shape[-2:])
            before = tuple(sample.get("rgb", sample.get("depth")).shape[-2:])
            kp = tv_tensors.KeyPoints(out["keypoints"] + 0.5, canvas_size=before)
            kp = op(kp, bilinear, 0.0).as_subclass(torch.Tensor) - 0.5
            inside = ((kp >= 0) & (kp <= torch.tensor([canvas[1] - 1, canvas[0] - 1]))).all(dim=1)
            out["keypoints"], out["keypoints_visible"] = kp.float(), out["keypoints_visible"] & inside
        return out


def affine_matrix(angle, scale, shift, flip, size):
    """[B, 3, 3] maps of pixel coordinates (x, y, 1) (centres at integers) in a frame of `size` (H, W):
    x' = c + scale R(angle) (F(x) - c) + shift, c the frame's centre, F the horizontal flip x -> W - 1 - x where
    `flip`, R a rotation by `angle` degrees. angle, scale, flip [B]; shift [B, 2] pixels."""
    H, W = size
    B = len(angle)
    a = torch.deg2rad(angle)
    c = angle.new_tensor([(W - 1) / 2, (H - 1) / 2])
    M = angle.new_zeros(B, 3, 3)
    M[:, 0, 0], M[:, 0, 1] = scale * torch.cos(a), -scale * torch.sin(a)
    M[:, 1, 0], M[:, 1, 1] = scale * torch.sin(a), scale * torch.cos(a)
    M[:, :2, 2] = c + shift - (M[:, :2, :2] @ c)
    M[:, 2, 2] = 1
    F_ = torch.eye(3).repeat(B, 1, 1)
    F_[flip, 0, 0], F_[flip, 0, 2] = -1, W - 1
    return M @ F_


def warp(images, M, mode):
    """images [B, C, H, W] seen through the maps M [B, 3, 3] (pixel coordinates of the source -> of the output):
    output pixel p takes the source at M^-1 p, sampled with `mode` ('bilinear' | 'nearest'), 0 outside."""
    B, _, H, W = images.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=M.dtype), torch.arange(W, dtype=M.dtype), indexing="ij")
    out = torch.stack([xs, ys], -1).reshape(1, H * W, 2).expand(B, -1, -1)  # [B, HW, 2] output pixel centres
    src = apply_affine(torch.linalg.inv(M), out)  # [B, HW, 2]
    grid = (src + 0.5) / src.new_tensor([W, H]) * 2 - 1  # align_corners=False: pixel i spans [i, i + 1)
    return F.grid_sample(images, grid.view(B, H, W, 2), mode=mode, padding_mode="zeros", align_corners=False)


def jitter_colours(rgb, brightness, contrast, saturation, hue):
    """Colour jitter of a batch [B, 3, H, W] in [0, 1] with one draw per image, as torchvision's ColorJitter: the
    brightness, contrast and saturation factors [B], then a hue rotation by `hue` [B] turns (in YIQ space), clamped
    to [0, 1] after each step. ColorJitter applies the four in a random order, this in that fixed one."""
    f = lambda x: x.to(rgb).view(-1, 1, 1, 1)  # noqa: E731
    grey = lambda x: (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)  # noqa: E731
    rgb = (rgb * f(brightness)).clamp(0, 1)
    mean = grey(rgb).mean(dim=(2, 3), keepdim=True)
    rgb = (mean + f(contrast) * (rgb - mean)).clamp(0, 1)
    rgb = (grey(rgb) + f(saturation) * (rgb - grey(rgb))).clamp(0, 1)
    theta = 2 * math.pi * hue
    yiq = rgb.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rotate = torch.zeros(len(rgb), 3, 3)
    rotate[:, 0, 0] = 1
    rotate[:, 1, 1], rotate[:, 1, 2], rotate[:, 2, 1], rotate[:, 2, 2] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    T = torch.linalg.inv(yiq) @ rotate.to(rgb) @ yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", T, rgb).clamp(0, 1)


class BatchAugment:
    """PairedTransform's 'cpu' recipe applied to a whole collated batch at once, on tensors: one affine warp
    (grid_sample) of every image, then colour jitter, then the ImageNet normalisation of RGB. Per sample: a flip with
    probability `flip`, a rotation uniform in +-rotate degrees, a log-uniform scale in `scale` and a shift of up to
    +-translate of the frame, about the frame's centre, the same for every modality (pixel-aligned views, as
    published); flipping swaps the left and right keypoint slots (FLIP_JOINTS). Intrinsics follow: focal lengths
    times the scale, the principal point through the map (a rotation about the optical axis, so the back-projected
    cloud moves rigidly). The draws come from `gen` (a torch.Generator), so a step's augmentation depends only on the
    generator's seed; a rank of a DDP run passes the whole (global) batch's size and its first row, and its rows
    get the draws they would get in one process. About 30x faster than PairedTransform item by item (bench.py), and
    it needs no loader processes competing with the training threads."""

    def __init__(self, rotate=30.0, scale=(0.75, 1.25), translate=0.1, flip=0.5, color_jitter=0.4):
        self.rotate, self.scale, self.translate, self.flip, self.jitter = rotate, scale, translate, flip, color_jitter

    def __call__(self, batch, gen, first=0, total=None):
        B, _, H, W = batch["rgb"].shape
        n, rows = total or B, slice(first, first + B)  # draws for the whole batch, of which these are `rows`
        u = lambda *shape: 2 * torch.rand(*shape, generator=gen)[rows] - 1  # noqa: E731 uniform in [-1, 1]
        flip = torch.rand(n, generator=gen)[rows] < self.flip
        lo, hi = math.log(self.scale[0]), math.log(self.scale[1])
        scale = torch.exp(lo + (hi - lo) * torch.rand(n, generator=gen)[rows])
        shift = u(n, 2) * self.translate * torch.tensor([W, H], dtype=torch.float32)
        M = affine_matrix(self.rotate * u(n), scale, shift, flip, (H, W))  # [B, 3, 3]
        colour = [1 + self.jitter * u(n) for _ in range(3)] + [self.jitter / 8 * u(n)]  # ColorJitter(j, j, j, j / 8)
        out = dict(batch)
        out["rgb"] = normalize_rgb(jitter_colours(warp(batch["rgb"], M, "bilinear"), *colour))
        out["depth"] = warp(batch["depth"], M, "nearest")
        out["mask"] = warp(batch["mask"][:, None].float(), M, "nearest")[:, 0] > 0.5
        slots = torch.where(flip[:, None], torch.tensor(FLIP_JOINTS), torch.arange(len(FLIP_JOINTS)))  # [B, J]
        kp = apply_affine(M, torch.gather(batch["keypoints"], 1, slots[..., None].expand(-1, -1, 2)))
        inside = ((kp >= 0) & (kp <= kp.new_tensor([W - 1, H - 1]))).all(-1)
        out["keypoints_visible"] = torch.gather(batch["keypoints_visible"], 1, slots) & inside
        out["keypoints"] = kp * out["keypoints_visible"][..., None]
        if "intrinsics" in batch:
            K = batch["intrinsics"].clone()
            K[:, :2, :2] *= scale[:, None, None]
            K[:, :2, 2] = apply_affine(M, K[:, None, :2, 2])[:, 0]
            out["intrinsics"] = K
        return out


class Cached(torch.utils.data.Dataset):
    """A dataset rendered or read once into memory, keeping only `keys` of each item: the training loop then spends
    the CPU on model steps instead of re-rendering the same items every epoch. Filled at construction by `workers`
    processes (0 = this one), with a progress bar."""

    def __init__(self, dataset, keys, workers=0):
        self.keys = set(keys)
        indices = range(len(dataset))
        desc = f"caching {len(dataset)} items of {type(dataset).__name__}"
        if workers > 0:
            import functools
            import multiprocessing
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                items = pool.imap(functools.partial(_numpy_item, dataset, self.keys), indices, chunksize=16)
                # numpy arrays travel by value; torch tensors would travel as file descriptors, thousands at once
                self.items = [{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in s.items()}
                              for s in tqdm(items, total=len(dataset), desc=desc, leave=False)]
        else:
            self.items = [_keep(dataset[i], self.keys) for i in tqdm(indices, desc=desc, leave=False)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _keep(sample, keys):
    return {k: v for k, v in sample.items() if k in keys}


def _numpy_item(dataset, keys, i):
    """Item i of a dataset with its tensors as numpy arrays (Cached's worker processes send these)."""
    return {k: v.numpy() if torch.is_tensor(v) else v for k, v in _keep(dataset[i], keys).items()}


class Transformed(torch.utils.data.Dataset):
    """A dataset with a PairedTransform applied to each item. Indexed by a pair (i, seed), the transform draws its
    randomness from `seed` alone (Python's and torch's generators are forked around the call), so augmentations
    do not depend on the number of workers or ranks, and a resumed run sees what an uninterrupted one would."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.transform(self.dataset[key])
        i, seed = key
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            try:
                return self.transform(self.dataset[i])
            finally:
                random.setstate(state)


# ------------------------------------------------------------------------------------------------ pre-training set
PRETRAIN_KEYS = ("rgb", "depth", "mask", "keypoints", "keypoints_visible", "intrinsics", "present", "index")


PRETRAIN_SOURCES = ("synthetic", "synthetic+mpii", "mpii", "ntu+mpii", "ntu+coco")
HELDOUT_SEED = 900  # the monitors' fixed held-out people, disjoint from every training seed


def pretraining_set(source, image_size, recipes=("cpu", "cpu"), synthetic_samples=4096, seed=0, cache=False,
                    workers=0, ntu_root="", mpii_root="", coco_root="", mpii_split="train"):
    """The pre-training set with its augmentation: an all-modality set mixed with a no-depth set, each under its own
    PairedTransform recipe (the published ones: 'ntu', 'mpii'). source
      'synthetic'       the synthetic stand-ins, 3/4 'indoor' with depth (seed) and 1/4 'wild' without (seed + 1),
                        concatenated (drawn in proportion to their sizes)
      'synthetic+mpii'  synthetic 'indoor' people (all modalities) and real MPII (RGB + keypoints), drawn 50/50
      'mpii'            real MPII alone (RGB + keypoints)
      'ntu+mpii', 'ntu+coco'   the published mixtures, drawn 50/50 (MixedDataset(balanced=True))
    The synthetic people are rendered once into memory with cache=True (by `workers` processes); the real readers
    raise FileNotFoundError naming a missing root or file; MPII reads root/annot/{mpii_split}.json. Items are
    indexed by (index, augmentation seed)."""
    if source not in PRETRAIN_SOURCES:
        raise ValueError(f"source must be one of {PRETRAIN_SOURCES}, got {source!r}")
    n = synthetic_samples
    if source == "synthetic":
        parts = [synthetic.SyntheticHumans(n - n // 4, image_size, seed=seed, domain="indoor"),
                 synthetic.SyntheticHumans(n // 4, image_size, seed=seed + 1, domain="wild", with_depth=False)]
    elif source == "synthetic+mpii":
        parts = [synthetic.SyntheticHumans(n, image_size, seed=seed, domain="indoor"),
                 MPII(mpii_root, mpii_split, image_size)]
    elif source == "mpii":
        parts, recipes = [MPII(mpii_root, mpii_split, image_size)], recipes and recipes[1:]
    else:
        parts = [NTURGBD(ntu_root, image_size), MPII(mpii_root, mpii_split, image_size) if source == "ntu+mpii"
                 else COCOKeypoints(coco_root, "train2017", image_size)]
    if cache:
        parts = [Cached(p, PRETRAIN_KEYS, workers) if isinstance(p, synthetic.SyntheticHumans) else p for p in parts]
    balanced = source in ("synthetic+mpii", "ntu+mpii", "ntu+coco")
    if recipes is None:
        return MixedDataset(parts, balanced=balanced)
    return MixedDataset([Transformed(p, PairedTransform(image_size, recipe=r)) for p, r in zip(parts, recipes)],
                        balanced=balanced)


def heldout_batch(image_size, n, seed=HELDOUT_SEED):
    """A fixed batch of n indoor synthetic people (every modality), resized only: by default the monitors' held-out
    people, whom no training seed draws."""
    people = synthetic.SyntheticHumans(n, image_size, seed=seed, domain="indoor")
    transform = PairedTransform(image_size, train=False)
    return collate([transform(people[i]) for i in range(len(people))])


# --------------------------------------------------------------------------------------------------------- batches
class StepBatches(torch.utils.data.Sampler):
    """Batches of (index, augmentation seed) for steps start..stop-1. Step k takes items [k G, (k + 1) G) of an
    endless stream of seeded epochs of n items (G = global batch); rank r takes the r-th slice. An epoch is a
    permutation of the dataset, or with `weights` [n] n draws with replacement in proportion to them (the
    published WeightedRandomSampler). The data of a step depends only on (seed, k), so resuming, the number of
    workers and the number of ranks do not change what the model sees."""

    def __init__(self, n, global_batch, seed, start, stop, rank=0, world=1, weights=None):
        self.n, self.G, self.seed, self.start, self.stop = n, global_batch, seed, start, stop
        self.rank, self.local, self.weights = rank, global_batch // world, weights
        self.epoch = (None, None)  # (number, its items): the epoch last drawn

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        for k in range(self.start, self.stop):
            first = k * self.G + self.rank * self.local
            yield [(self.item(p), self.seed * 1_000_003 + p) for p in range(first, first + self.local)]

    def item(self, p):
        epoch, offset = divmod(p, self.n)
        if self.epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 10_007 + epoch)
            self.epoch = (epoch, torch.randperm(self.n, generator=g) if self.weights is None
                          else torch.multinomial(self.weights, self.n, replacement=True, generator=g))
        return int(self.epoch[1][offset])


def batch_rows(batch, start, stop):
    """Rows start..stop-1 of a batch dict (with its nested `present`)."""
    return {k: ({m: v[start:stop] for m, v in t.items()} if isinstance(t, dict) else t[start:stop])
            for k, t in batch.items()}


def to_device(batch, device):
    """A batch dict (with its nested `present`) on `device`."""
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return {k: ({m: move(v) for m, v in t.items()} if isinstance(t, dict) else move(t)) for k, t in batch.items()}
