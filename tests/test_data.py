"""data.py: readers on the real samples and on files written here in each official format, mixing and masks,
paired transforms, bad input."""
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import data
import synthetic
from conftest import REAL_SAMPLES, ROOT

J = synthetic.JOINT_INDEX


def write_jpg(path, h=120, w=160, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)
    return arr


def pairwise(kp):
    return torch.cdist(kp, kp)


def test_the_project_stands_alone():
    """A fresh clone has what the tests, notebooks and comments point to: the real samples live in the repository,
    nothing reads from beside it, and every document a file names exists."""
    assert ROOT in REAL_SAMPLES.parents and (REAL_SAMPLES / "README.md").exists()
    files = [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("notebooks/*.ipynb")]
    for path in files:
        text = path.read_text()
        assert not re.search(r"\.\./shared|[\"']\.\.[\"'], [\"']shared|parent / [\"']shared", text), path.name
        for doc in set(re.findall(r"\b(?:docs/[\w/-]+|[A-Z]+)\.md\b", text)):  # not outputs such as results.md
            assert (ROOT / doc).exists(), f"{path.name} points to {doc}, which is not in the repository"


# ------------------------------------------------------------------------------------------------------ MPII
def test_mpii_crop_keeps_geometry_and_visibility():
    root = REAL_SAMPLES / "mpii"
    entries = json.loads((root / "annot" / "valid.json").read_text())
    ds = data.MPII(root, "valid", image_size=256)
    for i, e in enumerate(entries):
        s = ds[i]
        assert s["rgb"].shape == (3, 256, 256) and "depth" not in s and not s["present"]["depth"]
        vis = s["keypoints_visible"]
        orig = torch.tensor(e["joints"], dtype=torch.float32)
        assert torch.equal(vis, torch.tensor(e["joints_vis"]) > 0)  # all these people lie inside their crops
        ratio = pairwise(s["keypoints"][vis]) / pairwise(orig[vis]).clamp(min=1e-6)
        off_diag = ~torch.eye(int(vis.sum()), dtype=torch.bool)
        expected = 256 / round(1.25 * 200 * e["scale"])
        torch.testing.assert_close(ratio[off_diag], torch.full_like(ratio[off_diag], expected), rtol=1e-3, atol=1e-3)


def test_mpii_written_file_joint_outside_crop_becomes_invisible(tmp_path):
    write_jpg(tmp_path / "images" / "a.jpg", 400, 400)
    joints = [[200.0 + j, 200.0 + 2 * j] for j in range(16)]
    joints[9] = [5.0, 5.0]  # far outside a crop of 1.25 * 200 * 0.5 = 125 px around the centre
    (tmp_path / "annot").mkdir()
    (tmp_path / "annot" / "train.json").write_text(json.dumps(
        [{"image": "a.jpg", "center": [211.0, 201.0 - 7.5], "scale": 0.5, "joints": joints, "joints_vis": [1] * 16}]))
    s = data.MPII(tmp_path, "train", image_size=125)[0]
    assert not s["keypoints_visible"][9] and s["keypoints_visible"].sum() == 15
    # crop of exactly 125 px at scale 1: a joint moves by the crop's corner, (210 - 62.5, 200 - 62.5) rounded
    torch.testing.assert_close(s["keypoints"][0], torch.tensor([199.0 - 148, 199.0 - 138]))


def test_mpii_errors_name_the_path_and_the_entry(tmp_path):
    with pytest.raises(FileNotFoundError, match="annot"):
        data.MPII(tmp_path)
    (tmp_path / "annot").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "annot" / "train.json").write_text(json.dumps([{"image": "x.jpg", "center": [1, 1]}]))
    with pytest.raises(ValueError, match="entry 0 \\(x.jpg\\)"):
        data.MPII(tmp_path)


def test_truncated_image_names_the_file_or_is_skipped(tmp_path):
    for name, seed in (("good.jpg", 0), ("bad.jpg", 1)):
        write_jpg(tmp_path / "images" / name, 200, 200, seed)
    bad = tmp_path / "images" / "bad.jpg"
    bad.write_bytes(bad.read_bytes()[:500])
    entry = {"center": [100.0, 100.0], "scale": 0.5, "joints": [[100.0, 100.0]] * 16, "joints_vis": [1] * 16}
    (tmp_path / "annot").mkdir()
    (tmp_path / "annot" / "train.json").write_text(json.dumps([dict(entry, image="bad.jpg"),
                                                                dict(entry, image="good.jpg")]))
    with pytest.raises(OSError, match="bad.jpg"):
        data.MPII(tmp_path)[0]
    with pytest.warns(UserWarning, match="bad.jpg"):
        s = data.MPII(tmp_path, skip_bad=True)[0]
    assert s["index"] == 1


# ------------------------------------------------------------------------------------------------------ COCO
def test_coco_to_mpii_mapping():
    kp = [0] * 51
    def put(c, x, y, v=2):
        kp[3 * c:3 * c + 3] = [x, y, v]
    put(5, 10, 20); put(6, 30, 40, 1)    # shoulders (the right one occluded but labelled)
    put(11, 50, 60); put(9, 7, 8)       # left hip only, left wrist
    mpii, vis = data.COCOKeypoints.to_mpii(kp)
    assert vis[J["thorax"]] and torch.equal(mpii[J["thorax"]], torch.tensor([20.0, 30.0]))
    assert not vis[J["pelvis"]] and torch.equal(mpii[J["pelvis"]], torch.zeros(2))  # right hip missing: no pelvis
    assert not vis[J["upper_neck"]] and not vis[J["head_top"]]
    assert vis[J["l_hip"]] and torch.equal(mpii[J["l_hip"]], torch.tensor([50.0, 60.0]))
    assert vis[J["r_shoulder"]] and torch.equal(mpii[J["l_wrist"]], torch.tensor([7.0, 8.0]))
    assert vis.sum() == 5  # both shoulders, thorax, left hip, left wrist


def test_coco_real_persons():
    root = REAL_SAMPLES / "coco"
    ann = json.loads((root / "annotations" / "person_keypoints_val2017.json").read_text())
    ds = data.COCOKeypoints(root, "val2017", image_size=128)
    assert len(ds) == sum(a["num_keypoints"] >= 8 and not a["iscrowd"] for a in ann["annotations"])
    s = ds[0]  # image 785: a skier with all 17 keypoints
    a = ann["annotations"][0]
    k = torch.tensor(a["keypoints"], dtype=torch.float32).view(17, 3)
    crop = 1.25 * max(a["bbox"][2:])
    hips = (k[11, :2] + k[12, :2]) / 2
    left = round(a["bbox"][0] + a["bbox"][2] / 2 - crop / 2)
    top = round(a["bbox"][1] + a["bbox"][3] / 2 - crop / 2)
    scale = 128 / round(crop)
    torch.testing.assert_close(s["keypoints"][J["pelvis"]],
                               (hips - torch.tensor([left, top])) * scale + (scale - 1) / 2)
    assert s["keypoints_visible"].sum() == 14


# ------------------------------------------------------------------------------------------------------- NTU
def write_skeleton(path, frames):
    lines = [str(len(frames))]
    for bodies in frames:
        lines.append(str(len(bodies)))
        for body_id, joints in bodies:
            lines.append(f"{body_id} 0 1 1 1 1 0 0.1 -0.2 2")
            lines.append(str(len(joints)))
            lines += [" ".join(f"{v:.7g}" for v in row) for row in joints]
    path.write_text("\r\n".join(lines) + "\r\n")


def random_joints(rng, depth_xy=None, color_xy=None):
    j = rng.uniform(-1, 1, (25, 12)).round(5)
    j[:, 11] = 2
    if depth_xy is not None:
        j[:, 3:5], j[:, 5:7] = depth_xy, color_xy
    return j


def test_read_ntu_skeleton_parses_back_what_was_written(tmp_path):
    rng = np.random.default_rng(0)
    frames = [[("72057594037931101", random_joints(rng))], [],
              [("1", random_joints(rng)), ("2", random_joints(rng))]]
    write_skeleton(tmp_path / "S001C001P001R001A001.skeleton", frames)
    got = data.read_ntu_skeleton(tmp_path / "S001C001P001R001A001.skeleton")
    assert [len(f) for f in got] == [1, 0, 2]
    assert got[0][0]["body_id"] == "72057594037931101" and got[2][1]["body_id"] == "2"
    np.testing.assert_allclose(got[2][1]["joints"], frames[2][1][1], rtol=1e-6)
    (tmp_path / "short.skeleton").write_text("2\n1\n")
    with pytest.raises(ValueError, match="short.skeleton"):
        data.read_ntu_skeleton(tmp_path / "short.skeleton")


def test_nturgbd_registers_rgb_to_depth(tmp_path):
    """Colour pixels map to depth pixels by x_d = 0.25 x_c + (40, 10); a red square drawn at a joint's colour
    position must land on that joint's keypoint in the registered crop."""
    rng = np.random.default_rng(1)
    depth_xy = np.stack([rng.uniform(80, 160, 25), rng.uniform(60, 150, 25)], 1)
    color_xy = (depth_xy - [40, 10]) / 0.25
    name = "S001C001P001R001A001"
    (tmp_path / "nturgb+d_skeletons").mkdir()
    write_skeleton(tmp_path / "nturgb+d_skeletons" / f"{name}.skeleton", [[("1", random_joints(rng, depth_xy, color_xy))]])
    rgb = np.zeros((1080, 1920, 3), dtype=np.uint8)
    cx, cy = color_xy[3].round().astype(int)  # Kinect head -> MPII head_top
    rgb[cy - 12:cy + 13, cx - 12:cx + 13] = [255, 0, 0]
    (tmp_path / "rgb" / name).mkdir(parents=True)
    Image.fromarray(rgb).save(tmp_path / "rgb" / name / "00001.jpg", quality=98)
    depth = np.zeros((424, 512), dtype=np.uint16)
    depth[60:150, 80:160] = 2500
    (tmp_path / "nturgb+d_depth_masked" / name).mkdir(parents=True)
    Image.fromarray(depth).save(tmp_path / "nturgb+d_depth_masked" / name / "MDepth-00000001.png")
    s = data.NTURGBD(tmp_path, image_size=128)[0]
    assert s["present"] == {"rgb": True, "depth": True, "keypoints": True}
    assert s["depth"].shape == (1, 128, 128) and set(s["depth"].unique().tolist()) <= {0.0, 2.5}
    red = (s["rgb"][0] > 0.6) & (s["rgb"][1] < 0.3)
    centre = red.nonzero().float().mean(0).flip(0)  # (x, y)
    assert (centre - s["keypoints"][J["head_top"]]).norm() < 1.5


def test_fit_color_to_depth_recovers_scale_and_shift():
    c = np.random.default_rng(2).uniform(0, 1900, (20, 2))
    s, t = data.fit_color_to_depth(c, 0.27 * c + [31.0, -5.0])
    assert abs(s - 0.27) < 1e-9 and np.allclose(t, [31.0, -5.0])


# ------------------------------------------------------------------------------------- mixing and transforms
def test_mixing_gives_masks_unique_indices_and_zero_depth():
    mixed = data.MixedDataset([synthetic.SyntheticHumans(3, 32), synthetic.SyntheticHumans(2, 32, domain="wild",
                                                                                            with_depth=False)])
    batch = data.collate([mixed[i] for i in range(5)])
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["present"]["depth"].tolist() == [True, True, True, False, False]
    assert batch["present"]["rgb"].all() and batch["present"]["keypoints"].all()
    assert batch["depth"].shape == (5, 1, 32, 32) and (batch["depth"][3:] == 0).all() and (batch["depth"][:3] > 0).any()
    assert "parts" in batch and batch["parts"].shape == (5, 32, 32)


def test_collate_zero_fills_missing_keypoints_and_drops_partial_labels():
    a = synthetic.SyntheticHumans(1, 32)[0]
    b = {k: v for k, v in a.items() if k not in ("keypoints", "keypoints_visible", "parts")}
    b["present"] = dict(a["present"], keypoints=False)
    batch = data.collate([a, b])
    assert batch["present"]["keypoints"].tolist() == [True, False]
    assert (batch["keypoints"][1] == 0).all() and not batch["keypoints_visible"][1].any()
    assert "parts" not in batch


def test_paired_flip_swaps_wrists_and_part_labels():
    s = synthetic.SyntheticHumans(1, 64, seed=4)[0]
    t = data.PairedTransform(64, rotate=0, scale=(1, 1), translate=0, flip=1.0, color_jitter=0)
    out = t(s)
    torch.testing.assert_close(out["keypoints"][J["r_wrist"]],
                               torch.stack([63 - s["keypoints"][J["l_wrist"], 0], s["keypoints"][J["l_wrist"], 1]]))
    lut = torch.tensor(synthetic.FLIP_PARTS)
    assert torch.equal(out["parts"], lut[s["parts"].flip(-1)])
    torch.testing.assert_close(data.denormalize_rgb(out["rgb"]), s["rgb"].flip(-1), atol=1e-5, rtol=0)


def test_random_transform_moves_every_modality_together():
    """Put a one-pixel marker under each visible keypoint in the mask and depth; after a random rotation, scale
    and translation the markers must still sit under the keypoints."""
    torch.manual_seed(0)
    import random
    random.seed(0)
    s = synthetic.SyntheticHumans(1, 64, seed=5)[0]
    kp = s["keypoints"].round()
    s["keypoints"] = kp
    marker = torch.zeros(64, 64, dtype=torch.bool)
    marker[kp[:, 1].long(), kp[:, 0].long()] = True
    s["mask"], s["depth"] = marker, marker[None].float() * 3.0
    t = data.PairedTransform(64, rotate=40, scale=(0.8, 1.2), translate=0.1, flip=0.5)
    for _ in range(5):
        out = t(s)
        vis = out["keypoints_visible"]
        pix = out["keypoints"][vis].round().long()
        near = torch.nn.functional.max_pool2d(out["mask"][None, None].float(), 3, 1, 1)[0, 0]
        assert (near[pix[:, 1], pix[:, 0]] > 0).float().mean() > 0.9
        assert set(out["depth"].unique().tolist()) <= {0.0, 3.0}  # nearest: depth never blends with holes


def test_eval_transform_resizes_and_normalises():
    s = synthetic.SyntheticHumans(1, 64)[0]
    out = data.PairedTransform(32, train=False)(s)
    assert out["rgb"].shape == (3, 32, 32) and out["parts"].shape == (32, 32)
    torch.testing.assert_close(out["keypoints"], (s["keypoints"] + 0.5) / 2 - 0.5)
    assert out["rgb"].mean().abs() < 2


def test_itop_without_h5py_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        data.ITOP(tmp_path)


def test_list_readers_name_malformed_lines(tmp_path):
    (tmp_path / "train.txt").write_text("a.jpg a.png\nb.jpg\n")
    with pytest.raises(ValueError, match="train.txt:2"):
        data.Human36MParts(tmp_path)
    with pytest.raises(FileNotFoundError, match="val.txt"):
        data.NTURGBDParsing(tmp_path, "val")


# ------------------------------------------------------------------------------------ the published recipes
def affine_params(transform, sample, seed):
    """The (flip, angle, scale, shift, jitter) a seeded call of `transform` draws, and that call's output."""
    import random
    random.seed(seed)
    params = transform.draw(sample, sample["rgb"].shape[-2:])
    random.seed(seed)
    return params, transform(sample)


def test_ntu_recipe_is_one_crop_around_the_joints_without_flip_rotation_or_jitter():
    """The published NTU RGB+D augmentation: a square crop of area 0.08-1.2 x the frame, centred inside the visible
    joints' box, the same for every modality; no flip, no rotation, no colour jitter."""
    s = synthetic.SyntheticHumans(1, 64, seed=3)[0]
    t = data.PairedTransform(64, recipe="ntu")
    vis = s["keypoints_visible"]
    lo, hi = s["keypoints"][vis].min(0).values, s["keypoints"][vis].max(0).values
    scales = []
    for seed in range(40):
        (flip, angle, scale, shift, jitter), out = affine_params(t, s, seed)
        assert not flip and angle == 0 and not jitter
        scales.append(scale)
        assert 1 / 1.2 ** 0.5 - 1e-6 <= scale <= 1 / 0.08 ** 0.5 + 1e-6
        centre = torch.tensor([31.5, 31.5]) - torch.tensor(shift, dtype=torch.float32) / scale  # maps to the centre
        assert ((centre >= lo - 1) & (centre <= hi + 1)).all()
        both = vis & out["keypoints_visible"]
        a, b = out["keypoints"][both], s["keypoints"][both]
        # no flip, no rotation: every keypoint offset is the original offset times the scale
        torch.testing.assert_close(a - a[:1], (b - b[:1]) * scale, atol=0.6, rtol=0)
        # no colour jitter: RGB is exactly the geometric transform of the input
        want = TF.affine(s["rgb"], angle=0.0, translate=shift, scale=scale, shear=[0.0, 0.0],
                         interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
        torch.testing.assert_close(data.denormalize_rgb(out["rgb"]), want, atol=1e-5, rtol=0)
    assert max(scales) > 2 and min(scales) < 1  # the whole published range is drawn


@pytest.mark.slow
def test_mpii_recipe_scales_and_rotates_about_the_centre_without_flip():
    s = synthetic.SyntheticHumans(1, 64, seed=3, domain="wild", with_depth=False)[0]
    t = data.PairedTransform(64, recipe="mpii")
    angles = []
    for seed in range(200):
        (flip, angle, scale, shift, jitter), _ = affine_params(t, s, seed)
        assert not flip and not jitter and shift == [0, 0] and 0.75 <= scale <= 1.25 and abs(angle) <= 60
        angles.append(angle)
    rotated = sum(a != 0 for a in angles) / len(angles)
    assert 0.5 < rotated < 0.7  # with probability 0.6
    assert max(abs(a) for a in angles) > 30  # N(0, 30 deg), clipped at 60


def test_unknown_recipe_names_itself():
    with pytest.raises(ValueError, match="recipe"):
        data.PairedTransform(64, recipe="imagenet")


def test_mixed_dataset_passes_seeds_to_transformed_parts():
    parts = [data.Transformed(synthetic.SyntheticHumans(2, 32), data.PairedTransform(32, recipe="ntu")),
             data.Transformed(synthetic.SyntheticHumans(2, 32, domain="wild", with_depth=False),
                              data.PairedTransform(32, recipe="mpii"))]
    mixed = data.MixedDataset(parts)
    a, b = mixed[(3, 7)], parts[1][(1, 7)]
    assert a["index"] == 3 and torch.equal(a["rgb"], b["rgb"]) and not torch.equal(a["rgb"], mixed[(3, 8)]["rgb"])


def test_cached_items_equal_the_rendered_ones_with_the_kept_keys():
    people = synthetic.SyntheticHumans(5, 32, seed=2)
    for workers in (0, 2):
        cached = data.Cached(people, ("rgb", "depth", "present", "index"), workers=workers)
        assert len(cached) == 5 and set(cached[3]) == {"rgb", "depth", "present", "index"}
        assert torch.equal(cached[3]["depth"], people[3]["depth"]) and cached[3]["index"] == 3
