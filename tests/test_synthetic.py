"""synthetic.py: determinism, cross-modal consistency, label coverage, flips, honest RGB, the sheet command."""
import os

import numpy as np
import pytest
import torch

import data
import synthetic as S
from schema import FLIP_JOINTS, FLIP_PARTS, JOINT_INDEX, PART_NAMES

SIZE = 64


@pytest.fixture(scope="module")
def samples():
    data = S.SyntheticHumans(50, SIZE, seed=3)
    return [data[i] for i in range(50)]


def test_items_are_deterministic_and_distinct():
    a, b = S.SyntheticHumans(4, SIZE, seed=1), S.SyntheticHumans(4, SIZE, seed=1)
    for key in ("rgb", "depth", "keypoints", "parts", "iuv", "joints3d"):
        assert torch.equal(a[2][key], b[2][key]), key
    assert not torch.equal(a[2]["rgb"], a[3]["rgb"])
    assert not torch.equal(a[2]["rgb"], S.SyntheticHumans(4, SIZE, seed=2)[2]["rgb"])


def test_sample_schema(samples):
    s = samples[0]
    assert s["rgb"].shape == (3, SIZE, SIZE) and 0 <= s["rgb"].min() and s["rgb"].max() <= 1
    assert s["depth"].shape == (1, SIZE, SIZE) and s["depth"].dtype == torch.float32
    assert s["keypoints"].shape == (16, 2) and s["keypoints_visible"].dtype == torch.bool
    assert s["parts"].dtype == torch.int64 and s["iuv"].shape == (3, SIZE, SIZE)
    assert torch.equal(s["iuv"][0].long(), s["parts"]) and torch.equal(s["mask"], s["parts"] > 0)
    assert s["present"] == {"rgb": True, "depth": True, "keypoints": True}
    assert ((s["iuv"][1:] >= 0) & (s["iuv"][1:] <= 1)).all()


def test_every_part_pixel_has_clean_depth():
    for i in range(10):
        r = S.render(S.sample_params(0, i, "indoor"), SIZE)
        assert (r["depth"][r["parts"] > 0] > 0).all()
        # joints3d project to the exact keypoints through K
        proj = r["joints3d"] @ r["K"].T
        np.testing.assert_allclose(proj[:, :2] / proj[:, 2:], r["keypoints"], atol=1e-6)


def test_depth_is_metric_and_noisy_like_a_kinect(samples):
    s = samples[0]
    person = s["depth"][0][s["mask"] & (s["depth"][0] > 0)]
    assert 1.5 < person.median() < 5.5
    holes = (s["depth"][0] == 0) & s["mask"]
    assert 0 < holes.sum() < 0.5 * s["mask"].sum()  # silhouettes and grazing angles lose returns


def test_visible_keypoints_lie_on_the_body_and_in_the_frame(samples):
    for s in samples:
        kp = s["keypoints"]
        assert ((kp >= 0) & (kp <= SIZE - 1)).all()
        body = s["mask"].nonzero().flip(1).float()  # [P, 2] (x, y)
        d = torch.cdist(kp[s["keypoints_visible"]], body).min(dim=1).values
        assert (d < 0.08 * SIZE).all()


def test_every_part_occurs_within_50_samples(samples):
    seen = torch.zeros(25, dtype=torch.bool)
    for s in samples:
        seen[s["parts"].unique()] = True
    assert seen.all(), [PART_NAMES[i] for i in (~seen).nonzero().flatten()]


def right_left_columns(parts):
    cols = torch.arange(parts.shape[1]).expand_as(parts).float()
    right = sum(parts == S.PART_INDEX[n] for n in ("right_thigh", "right_calf", "right_arm", "right_hip")).bool()
    left = sum(parts == S.PART_INDEX[n] for n in ("left_thigh", "left_calf", "left_arm", "left_hip")).bool()
    return cols[right].mean(), cols[left].mean()


def test_frontal_view_shows_right_parts_on_the_image_left():
    params = dict(seed=[0, 0, 1], pose="standing", domain="indoor", yaw=0.0)
    r = S.render(params, SIZE)
    right, left = right_left_columns(torch.from_numpy(r["parts"]))
    assert right < left
    kp = r["keypoints"]
    assert kp[JOINT_INDEX["r_shoulder"], 0] < kp[JOINT_INDEX["l_shoulder"], 0]


def test_flip_swaps_joints_and_parts_consistently(samples):
    s = samples[5]
    f = data.flip_sample(s)
    W = SIZE
    torch.testing.assert_close(f["keypoints"][JOINT_INDEX["r_wrist"], 0],
                               W - 1 - s["keypoints"][JOINT_INDEX["l_wrist"], 0])
    assert f["keypoints_visible"][JOINT_INDEX["r_wrist"]] == s["keypoints_visible"][JOINT_INDEX["l_wrist"]]
    lut = torch.tensor(FLIP_PARTS)
    assert (lut[s["parts"]] != s["parts"]).sum() > 50  # many left or right part pixels, whose labels must swap
    assert torch.equal(f["parts"], lut[s["parts"].flip(-1)])
    assert torch.equal(f["iuv"][0].long(), f["parts"])
    for key in ("rgb", "depth", "parts", "iuv", "keypoints", "joints3d", "intrinsics"):
        assert torch.allclose(data.flip_sample(f)[key].float(), s[key].float()), key
    # a sample whose RGB was removed (cross-modal depth -> RGB training) flips the same way
    no_rgb = data.flip_sample({k: v for k, v in s.items() if k != "rgb"})
    for key in ("depth", "parts", "keypoints", "intrinsics"):
        assert torch.equal(no_rgb[key], f[key]), key
    # the mirror image of a frontal person is a frontal person: with labels remapped, right parts stay on the
    # image's left (pixels moved without remapping would put them on the right)
    r = S.render(dict(seed=[0, 0, 1], pose="standing", domain="indoor", yaw=0.0), SIZE)
    flipped = data.flip_sample({"rgb": torch.zeros(3, W, W), "parts": torch.from_numpy(r["parts"])})
    right, left = right_left_columns(flipped["parts"])
    assert right < left
    # projection stays consistent after a flip
    K, j3 = f["intrinsics"], f["joints3d"]
    proj = j3 @ K.T
    clean = S.render(S.sample_params(3, 5, "indoor"), SIZE)
    exact = torch.from_numpy(clean["keypoints"]).float()[FLIP_JOINTS]
    exact[:, 0] = W - 1 - exact[:, 0]
    torch.testing.assert_close(proj[:, :2] / proj[:, 2:], exact, atol=1e-3, rtol=1e-4)


def test_no_depth_domain_marks_depth_absent():
    s = S.SyntheticHumans(2, SIZE, domain="wild", with_depth=False)[1]
    assert "depth" not in s and s["present"]["depth"] is False and s["present"]["rgb"]


def test_colour_alone_does_not_give_parts_away(samples):
    """A nearest-centroid classifier from a pixel's RGB to its part, fitted and scored on person pixels."""
    rgb = torch.cat([s["rgb"][:, s["mask"]].T for s in samples])
    parts = torch.cat([s["parts"][s["mask"]] for s in samples])
    centroids = torch.stack([rgb[parts == p].mean(0) for p in range(1, 25)])
    pred = torch.cdist(rgb, centroids).argmin(1) + 1
    accuracy = (pred == parts).float().mean()
    assert accuracy < 0.2  # chance is about 1/24 on uniform parts; the largest part alone covers ~15 %


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="domain"):
        S.SyntheticHumans(2, domain="outdoor")
    with pytest.raises(IndexError):
        S.SyntheticHumans(2, SIZE)[2]


@pytest.mark.parametrize("args,message", [(["--n", "0"], "--n must be positive, got 0"),
                                          (["--size", "16"], "--size must be at least 32, got 16"),
                                          (["--out", "{tmp}/sheet.bmpx"], ".bmpx is not an image type"),
                                          (["--out", "{tmp}/sheet"], "no suffix to tell the image type"),
                                          (["--out", "/proc/hcmoco/sheet.png"], "cannot make or write /proc/hcmoco")])
def test_the_sheet_command_names_a_bad_option_before_rendering(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(S, "SyntheticHumans", None)  # nothing may be rendered
    with pytest.raises(SystemExit) as e:
        S.main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {args[0]} " in err and message in err


def test_the_sheet_command_makes_its_folder(tmp_path):
    S.main(["--out", str(tmp_path / "a" / "b" / "sheet.png"), "--n", "1", "--size", "40"])
    assert (tmp_path / "a" / "b" / "sheet.png").stat().st_size > 1000 and os.listdir(tmp_path / "a" / "b") == ["sheet.png"]


def test_contact_sheet_has_a_depth_scale_in_metres_a_part_legend_and_says_no_depth(tmp_path):
    """`python synthetic.py` draws indoor people with depth and wild ones without: every depth image on one colour
    scale, labelled in metres; 'no depth' exactly in the rows without; every part's colour in the legend."""
    S.main(["--out", str(tmp_path / "sheet.png"), "--n", "3", "--size", "48"])
    indoor, wild = S.SyntheticHumans(2, 48, seed=0), S.SyntheticHumans(1, 48, seed=1, domain="wild", with_depth=False)
    people = [indoor[0], indoor[1], wild[0]]
    fig = S.contact_sheet(people, 3, str(tmp_path / "again.png"))
    assert (tmp_path / "sheet.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    depth_column = np.array(fig.axes[:12]).reshape(3, 4)[:, 1]
    assert [[t.get_text() for t in ax.texts] for ax in depth_column] == [[], [], ["no depth"]]
    images = [ax.images[0] for ax in depth_column[:2]]
    measured = torch.cat([p["depth"][p["depth"] > 0] for p in people[:2]])
    assert [im.get_clim() for im in images] == [(measured.min().item(), measured.max().item())] * 2
    assert [ax.get_xlabel() for ax in fig.axes[12:]] == ["depth (m); white: no measurement"]  # the colour bar
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [n.replace("_", " ") for n in PART_NAMES]
    colours = [tuple(h.get_facecolor()[:3]) for h in legend.legend_handles]
    np.testing.assert_allclose(colours, S.PART_COLOURS, atol=1e-6)
