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
import schema
import synthetic
from conftest import REAL_SAMPLES, ROOT, write_itop

J = schema.JOINT_INDEX


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


# The first 12 joints of a recorded NTU RGB+D frame (SpineBase, SpineMid, Neck, Head, Shoulder/Elbow/Wrist/Hand Left,
# the same Right), as quoted from a .skeleton file in https://github.com/shahroudy/NTURGB-D/issues/48:
# x y z (camera space, m), depthX depthY, colorX colorY, orientation wxyz, trackingState.
RECORDED_NTU_JOINTS = """\
0.2410551 -0.171228 4.294691 283.0309 224.2974 1027.245 581.2726 -0.2574076 0.123495 0.9539005 -0.09254229 2
0.2948349 0.1012649 4.225985 288.0122 200.99 1041.686 513.5756 -0.2665294 0.1243754 0.9513921 -0.09135558 2
0.3484591 0.3697312 4.144117 293.2654 177.1354 1056.9 444.3341 -0.2775609 0.1362276 0.9421903 -0.1291483 2
0.3180007 0.4567953 4.108379 290.831 169.0964 1049.855 421.0554 0 0 0 0 2
0.1822655 0.321388 4.28747 278.0624 182.3637 1012.409 459.6171 -0.281578 -0.6474488 0.683909 0.1838272 2
0.07589981 0.1205466 4.396867 268.8376 199.7327 985.4812 510.1192 0.06034974 -0.5202456 0.3134047 0.7921364 2
-0.05407938 0.00915651 4.244675 257.8868 208.9526 954.2135 537.0081 -0.2676778 0.8216244 -0.430342 0.2609363 1
-0.07004753 -0.036596 4.183693 256.4259 212.9325 950.2018 548.5809 -0.34924 0.8069586 -0.2904053 0.3775105 1
0.466928 0.2580718 4.100758 304.1543 186.7378 1088.714 472.0902 -0.09214124 0.7651293 0.5880391 -0.2455546 2
0.5106769 0.02274908 4.083334 308.2432 207.7038 1100.851 532.8464 -0.06122642 0.9532829 0.07727568 0.2855372 2
0.431269 -0.1834366 3.992133 302.0117 226.5302 1083.29 587.5076 0.1165461 0.2440035 -0.23478 0.9336796 2
0.3857652 -0.2527936 4.01325 297.6592 232.7558 1070.653 605.611 0.3048452 0.2731479 0.0439797 0.9113317 2"""


def test_ntu_left_and_right_match_mpii_on_a_recorded_frame(tmp_path):
    """Kinect's images are mirrored: in the recorded frame the person faces the camera (by the body's chirality
    in Kinect's right-handed camera space, x to the sensor's left, y up, z out; and both wrists are nearer the
    camera than their shoulders), yet ShoulderLeft is on the image's left. MPII labels a person facing the camera
    with the right shoulder on the image's left, so the reader must give Kinect's left joints MPII's right slots."""
    joints = np.zeros((25, 12))  # joints 12-24 were not quoted: written as not tracked (state 0)
    joints[:12] = np.array([[float(v) for v in line.split()] for line in RECORDED_NTU_JOINTS.splitlines()])
    xyz = joints[:, :3]
    left, up = xyz[4] - xyz[8], xyz[2] - xyz[0]  # right -> left shoulder, spine base -> neck
    assert np.cross(left, up)[2] < 0  # the body's front (left x up) points at the camera
    assert xyz[6, 2] < xyz[4, 2] and xyz[10, 2] < xyz[8, 2]  # wrists in front of the shoulders
    assert joints[4, 3] < joints[8, 3] and joints[4, 5] < joints[8, 5]  # ShoulderLeft left of ShoulderRight
    name = "S001C001P001R001A001"
    (tmp_path / "nturgb+d_skeletons").mkdir()
    write_skeleton(tmp_path / "nturgb+d_skeletons" / f"{name}.skeleton", [[("72057594037932358", joints)]])
    write_jpg(tmp_path / "rgb" / name / "00001.jpg", 1080, 1920)
    depth = np.zeros((424, 512), dtype=np.uint16)
    depth[160:260, 240:330] = 4200
    (tmp_path / "nturgb+d_depth_masked" / name).mkdir(parents=True)
    Image.fromarray(depth).save(tmp_path / "nturgb+d_depth_masked" / name / "MDepth-00000001.png")
    s = data.NTURGBD(tmp_path, image_size=128)[0]
    kp, vis = s["keypoints"], s["keypoints_visible"]
    for r, l in (("r_shoulder", "l_shoulder"), ("r_elbow", "l_elbow"), ("r_wrist", "l_wrist")):
        assert vis[J[r]] and vis[J[l]] and kp[J[r], 0] < kp[J[l], 0], (r, l)
    assert not vis[J["r_hip"]] and not vis[J["thorax"]]  # untracked Kinect joints stay invisible


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
    lut = torch.tensor(schema.FLIP_PARTS)
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
    """Eval: the resize, then RGB in ImageNet units, (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225] per
    channel: a flat colour becomes exactly that value, and a person's per-channel means (kept by the antialiased
    resize) move with it; RGB left in [0, 1], or normalised twice or with swapped channels, fails."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    t = data.PairedTransform(32, train=False)
    s = synthetic.SyntheticHumans(1, 64)[0]
    out = t(s)
    assert out["rgb"].shape == (3, 32, 32) and out["parts"].shape == (32, 32)
    torch.testing.assert_close(out["keypoints"], (s["keypoints"] + 0.5) / 2 - 0.5)
    torch.testing.assert_close(out["rgb"].mean((1, 2)), (s["rgb"].mean((1, 2)) - mean) / std, atol=2e-3, rtol=0)
    colour = torch.tensor([0.2, 0.5, 0.9])
    flat = t(dict(s, rgb=colour[:, None, None].expand(3, 64, 64)))["rgb"]  # [3, 32, 32]
    torch.testing.assert_close(flat, ((colour - mean) / std)[:, None, None].expand(3, 32, 32))


def test_itop_without_h5py_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        data.ITOP(tmp_path)


def test_itop_reads_the_official_files_into_the_camera_frame(tmp_path):
    """Valid frames only; joints3d in the camera frame (y down) with intrinsics that project them onto ITOP's
    image coordinates, before and after the paired resize; the mask is the segmentation's person."""
    written = write_itop(tmp_path, "train", 4)
    itop = data.ITOP(tmp_path, "train")
    assert len(itop) == 3
    for i in range(3):
        s = itop[i]
        assert s["present"] == {"rgb": False, "depth": True, "keypoints": False} and s["joints3d"].shape == (15, 3)
        torch.testing.assert_close(s["depth"][0], torch.from_numpy(written["depth"][i].astype(np.float32)))
        assert torch.equal(s["mask"], torch.from_numpy(written["segmentation"][i] >= 0))
        p = s["joints3d"] @ s["intrinsics"].T
        torch.testing.assert_close(p[:, :2] / p[:, 2:], torch.from_numpy(written["image"][i]).float(), atol=1e-3,
                                   rtol=0)
        out = data.PairedTransform(64, train=False)(s)
        p = out["joints3d"] @ out["intrinsics"].T
        expected = (torch.from_numpy(written["image"][i]).float() + 0.5) * torch.tensor([64 / 320, 64 / 240]) - 0.5
        torch.testing.assert_close(p[:, :2] / p[:, 2:], expected, atol=1e-3, rtol=0)


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
    """After the published NTU RGB+D augmentation: a square crop of area 0.08-1.2 x the sample's frame, centred
    inside the visible joints' box, the same for every modality; no flip, no rotation, no colour jitter."""
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



def ramp_batch(B=6, H=48, W=40):
    """A collated batch whose images hold their own pixel coordinates: RGB (x, y, 0) / 100, depth x + 1 metres, the
    mask everywhere; keypoints at random interior pixels."""
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    kp = 4 + torch.rand(B, 16, 2, generator=g) * torch.tensor([W - 9, H - 9])
    return dict(rgb=torch.stack([xs, ys, torch.zeros_like(xs)])[None].repeat(B, 1, 1, 1) / 100,
                depth=(xs + 1)[None, None].repeat(B, 1, 1, 1), mask=torch.ones(B, H, W, dtype=torch.bool),
                keypoints=kp, keypoints_visible=torch.ones(B, 16, dtype=torch.bool),
                intrinsics=torch.tensor([[50.0, 0, 20], [0, 50, 24], [0, 0, 1]]).repeat(B, 1, 1),
                present={m: torch.ones(B, dtype=torch.bool) for m in schema.MODALITIES}, index=torch.arange(B))


def read_at(images, points):
    """images [B, C, H, W] read bilinearly at pixel positions points [B, N, 2] -> [B, N, C]."""
    H, W = images.shape[-2:]
    grid = (points + 0.5) / torch.tensor([W, H]) * 2 - 1
    return torch.nn.functional.grid_sample(images, grid[:, :, None], align_corners=False)[..., 0].transpose(1, 2)


def source_slots(out):
    """[B, 16]: the keypoint slot of the source each output slot holds (FLIP_JOINTS where the RGB ramp runs
    backwards, i.e. the image was flipped)."""
    x = data.denormalize_rgb(out["rgb"])[:, 0, 24]  # [B, W]: the source x along a row
    flipped = x[:, 25] < x[:, 15]
    return torch.where(flipped[:, None], torch.tensor(schema.FLIP_JOINTS), torch.arange(16)), flipped


def test_batch_augment_moves_keypoints_with_the_images():
    """Each output pixel shows the source pixel the transform sent there, so at a visible keypoint's new position the
    RGB ramp reads that keypoint's old coordinates (the left/right slots swapped on flipped images), and the depth
    ramp its old x."""
    batch = ramp_batch()
    out = data.BatchAugment(color_jitter=0)(batch, torch.Generator().manual_seed(1))
    slots, flipped = source_slots(out)
    assert 0 < flipped.sum() < 6
    old = torch.gather(batch["keypoints"], 1, slots[..., None].expand(-1, -1, 2))  # [B, 16, 2]
    vis = out["keypoints_visible"]
    assert 0.5 < vis.float().mean() < 1  # some keypoints left the frame
    seen = read_at(data.denormalize_rgb(out["rgb"]), out["keypoints"])[..., :2] * 100
    assert (seen - old).norm(dim=-1)[vis].max() < 0.05  # a linear ramp is read exactly by bilinear sampling
    inner = vis & ((out["keypoints"] >= 1) & (out["keypoints"] <= torch.tensor([38, 46]))).all(-1)
    x_seen = read_at(out["depth"], out["keypoints"])[..., 0] - 1  # nearest: the source x of the depth pixel there
    assert (x_seen - old[..., 0]).abs()[inner].max() <= 1.0
    assert torch.equal(out["mask"], out["depth"][:, 0] > 0)  # the mask moves with the depth


def test_batch_augment_flip_is_exact_and_swaps_left_and_right():
    batch = ramp_batch()
    aug = data.BatchAugment(rotate=0, scale=(1, 1), translate=0, flip=1.0, color_jitter=0)
    out = aug(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(data.denormalize_rgb(out["rgb"]), batch["rgb"].flip(-1), atol=1e-5, rtol=0)
    assert torch.equal(out["depth"], batch["depth"].flip(-1))
    l, r = schema.JOINT_INDEX["l_wrist"], schema.JOINT_INDEX["r_wrist"]
    torch.testing.assert_close(out["keypoints"][:, r, 0], 39 - batch["keypoints"][:, l, 0])
    torch.testing.assert_close(out["intrinsics"][:, 0, 2], torch.full((6,), 39 - 20.0))


def test_batch_augment_depends_only_on_its_generator():
    batch = ramp_batch()
    aug = data.BatchAugment()
    a, b = (aug(batch, torch.Generator().manual_seed(5)) for _ in range(2))
    c = aug(batch, torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in ("rgb", "depth", "keypoints"))
    assert not torch.equal(a["rgb"], c["rgb"])


def test_batch_augment_jitters_colours_as_colorjitter_does():
    """With the geometry off, each image's colours go through brightness, contrast and saturation factors and a hue
    rotation drawn per image: a grey image stays grey (saturation and hue leave it), and every image moves."""
    batch = ramp_batch()
    batch["rgb"][0] = 0.5
    aug = data.BatchAugment(rotate=0, scale=(1, 1), translate=0, flip=0.0, color_jitter=0.4)
    out = data.denormalize_rgb(aug(batch, torch.Generator().manual_seed(0))["rgb"])
    grey = out[0]
    assert (grey - grey[0:1]).abs().max() < 1e-5 and not torch.allclose(grey, torch.full_like(grey, 0.5))
    assert all(not torch.allclose(out[b], batch["rgb"][b], atol=1e-3) for b in range(6))


def test_batch_augment_keeps_the_intrinsics_of_the_view():
    """Without rotation, a pixel of the augmented view back-projects with the new intrinsics to the point its source
    pixel gives with the old ones (x mirrored on flipped images, as flip_sample mirrors joints3d)."""
    from encoders import back_project
    batch = ramp_batch()
    out = data.BatchAugment(rotate=0, color_jitter=0)(batch, torch.Generator().manual_seed(3))
    _, flipped = source_slots(out)
    pixels = torch.tensor([[12.0, 20.0], [25.0, 30.0]]).expand(6, 2, 2)
    src = read_at(data.denormalize_rgb(out["rgb"]), pixels)[..., :2] * 100  # [B, 2, 2] source (x, y)
    z = torch.full((6, 2), 2.0)
    new = back_project(pixels[..., 0], pixels[..., 1], z, out["intrinsics"])
    old = back_project(src[..., 0], src[..., 1], z, batch["intrinsics"])
    old[..., 0] = torch.where(flipped[:, None], -old[..., 0], old[..., 0])
    torch.testing.assert_close(new, old, atol=1e-3, rtol=0)


def test_batch_augment_gives_a_rank_the_rows_of_the_whole_batch():
    """Under DDP each rank augments its slice of the global batch: with the slice's first row and the global size,
    the rows come out as they do when one process augments the whole batch."""
    batch = ramp_batch()
    aug = data.BatchAugment()
    whole = aug(batch, torch.Generator().manual_seed(7))
    for first in (0, 3):
        half = aug(data.batch_rows(batch, first, first + 3), torch.Generator().manual_seed(7), first, 6)
        for k in ("rgb", "depth", "keypoints", "keypoints_visible", "intrinsics"):
            torch.testing.assert_close(half[k], whole[k][first:first + 3])


# ------------------------------------------------------------------------------------------------ the published mix
def test_weighted_steps_draw_each_part_half_the_time_with_replacement_and_resume_exactly():
    """MixedDataset(balanced=True) + StepBatches: items drawn in proportion to 1 / their part's size (the published
    WeightedRandomSampler, with replacement): a part of 30 and one of 270 each give half the draws; repeats within
    an epoch; what a step sees depends on (seed, step) alone, whatever the start, ranks or the epoch drawn before."""
    mixed = data.MixedDataset([list(range(30)), list(range(270))], balanced=True)
    torch.testing.assert_close(mixed.weights[[0, 29, 30, 299]].float(), torch.tensor([1 / 30, 1 / 30, 1 / 270, 1 / 270]))
    whole = [[i for i, _ in b] for b in data.StepBatches(300, 20, 5, 0, 60, weights=mixed.weights)]
    drawn = torch.tensor(whole).flatten()
    assert abs((drawn < 30).float().mean().item() - 0.5) < 0.05
    assert len(set(drawn[:300].tolist())) < 250  # one epoch of 300 draws repeats items
    resumed = [[i for i, _ in b] for b in data.StepBatches(300, 20, 5, 37, 60, weights=mixed.weights)]
    assert resumed == whole[37:]
    halves = [list(data.StepBatches(300, 20, 5, 10, 12, rank, 2, weights=mixed.weights)) for rank in (0, 1)]
    assert [[i for i, _ in a + b] for a, b in zip(*halves)] == whole[10:12]
    assert data.MixedDataset([list(range(3))]).weights is None


def test_ntu_reader_takes_one_frame_in_thirty(tmp_path):
    """The published pre-training reads 1 NTU RGB+D frame in 30 (143,648 frames of NTU RGB+D 60)."""
    rng = np.random.default_rng(3)
    (tmp_path / "nturgb+d_skeletons").mkdir()
    for sub in ("nturgb+d_depth_masked", "rgb"):
        (tmp_path / sub).mkdir()
    write_skeleton(tmp_path / "nturgb+d_skeletons" / "S001C001P001R001A001.skeleton",
                   [[("1", random_joints(rng))] for _ in range(61)])
    assert [t for _, t, _ in data.NTURGBD(tmp_path).items] == [0, 30, 60]


def test_real_data_sources_mix_halves_and_the_synthetic_default_keeps_its_proportions():
    """'synthetic+mpii' and 'mpii' on the real MPII samples (only annot/valid.json ships: the split is an
    argument); the synthetic default stays a plain concatenation, 3/4 with depth."""
    mpii = str(REAL_SAMPLES / "mpii")
    mixed = data.pretraining_set("synthetic+mpii", 64, synthetic_samples=12, mpii_root=mpii, mpii_split="valid")
    assert [len(p) for p in mixed.datasets] == [12, 5] and mixed.weights is not None
    depth = torch.tensor([mixed[(i, 0)]["present"]["depth"] for i in range(17)])
    assert depth.tolist() == [True] * 12 + [False] * 5
    steps = data.StepBatches(17, 8, 0, 0, 50, weights=mixed.weights)
    from_mpii = torch.tensor([i >= 12 for batch in steps for i, _ in batch]).float().mean().item()
    assert abs(from_mpii - 0.5) < 0.08
    alone = data.pretraining_set("mpii", 64, mpii_root=mpii, mpii_split="valid")
    assert len(alone) == 5 and alone.weights is None and not alone[(0, 0)]["present"]["depth"]
    assert alone[(0, 0)]["present"]["rgb"] and alone[(0, 0)]["keypoints_visible"].any()
    default = data.pretraining_set("synthetic", 64, synthetic_samples=12)
    assert [len(p) for p in default.datasets] == [9, 3] and default.weights is None
    with pytest.raises(FileNotFoundError, match="train.json"):
        data.pretraining_set("mpii", 64, mpii_root=mpii)  # train.json, the published split, does not ship
