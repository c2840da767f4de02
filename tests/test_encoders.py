"""encoders.py: shapes, official HRNet names and size, gradients, PointNet++ primitives against brute force,
SemGCN graph locality and visibility masking."""
import pytest
import torch

import encoders as E
from schema import PARENTS


def test_hrnet_w18_matches_the_official_backbone():
    net = E.HRNet(width=18)
    assert sum(p.numel() for p in net.parameters()) == 9_562_260
    keys = net.state_dict()
    # a sample of official HRNetV2 names, one per kind of sub-module
    for k in ["conv1.weight", "bn2.running_var", "layer1.0.downsample.0.weight", "layer1.3.conv3.weight",
              "transition1.0.0.weight", "transition1.1.0.0.weight", "transition2.2.0.0.weight",
              "transition3.3.0.1.bias", "stage2.0.branches.1.3.conv2.weight", "stage3.3.fuse_layers.0.2.1.weight",
              "stage4.2.fuse_layers.3.0.0.0.weight", "stage4.2.fuse_layers.3.0.2.1.running_mean",
              "stage4.2.fuse_layers.3.2.0.0.weight"]:
        assert k in keys, k
    assert keys["transition3.3.0.0.weight"].shape == (144, 72, 3, 3)
    assert keys["stage4.0.fuse_layers.0.3.0.weight"].shape == (18, 144, 1, 1)
    assert "transition2.0.0.weight" not in keys  # equal widths: no transition conv, as in the official code
    assert E.HRNet(width=32).out_channels == [32, 64, 128, 256]


@pytest.mark.parametrize("in_channels", [1, 3])
def test_small_hrnet_shapes_and_every_parameter_gets_a_gradient(in_channels):
    net = E.HRNet.small(in_channels=in_channels, width=8)
    maps = net(torch.randn(2, in_channels, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 24), (2, 16, 8, 12), (2, 32, 4, 6), (2, 64, 2, 3)]
    merged = E.merge_maps(maps)
    assert merged.shape == (2, 120, 16, 24) and merged.dtype == torch.float32
    merged.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def upsample_written_out(x, size):
    """Bilinear resampling with pixel centres at (i + 0.5) * in / out - 0.5 (align_corners=False), borders clamped,
    as a loop over the output pixels. x [C, h, w] -> [C, H, W]."""
    (h, w), (H, W) = x.shape[-2:], size
    out = torch.empty(x.shape[0], H, W)
    for i in range(H):
        for j in range(W):
            y0, x0 = max((i + 0.5) * h / H - 0.5, 0.0), max((j + 0.5) * w / W - 0.5, 0.0)
            r, c = min(int(y0), h - 1), min(int(x0), w - 1)
            r1, c1 = min(r + 1, h - 1), min(c + 1, w - 1)
            a, b = y0 - r, x0 - c
            out[:, i, j] = ((1 - a) * (1 - b) * x[:, r, c] + (1 - a) * b * x[:, r, c1]
                            + a * (1 - b) * x[:, r1, c] + a * b * x[:, r1, c1])
    return out


def test_hrnet_upsamples_and_averages_batch_statistics_as_published():
    """The published HRNet: BatchNorm momentum 0.01; bilinear upsampling with align_corners=False in the fuse
    layers and where the four branches are merged."""
    net = E.HRNet.small(width=4).eval()
    assert {m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}
    maps = [torch.randn(1, 4 * 2 ** k, 16 // 2 ** k, 12 // 2 ** k) for k in range(4)]
    merged = E.merge_maps(maps)[0]  # [60, 16, 12]
    expected = torch.cat([maps[0][0]] + [upsample_written_out(m[0], (16, 12)) for m in maps[1:]])
    torch.testing.assert_close(merged, expected)
    module = net.stage3[0]  # 3 branches: branch 0 receives branches 1 and 2 upsampled
    xs = [torch.randn(1, 4 * 2 ** k, 16 // 2 ** k, 12 // 2 ** k) for k in range(3)]
    with torch.no_grad():
        ys = [branch(x) for branch, x in zip(module.branches, xs)]
        fused = ys[0][0] + sum(upsample_written_out(module.fuse_layers[0][j](ys[j])[0], (16, 12)) for j in (1, 2))
        torch.testing.assert_close(module(xs)[0][0], fused.relu())


def test_load_pretrained_reports_and_skips_mismatches(tmp_path, capsys):
    src = E.HRNet.small(width=8)
    state = {"module." + k: v for k, v in src.state_dict().items()}
    state["module.incre_modules.0.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    dst = E.HRNet.small(in_channels=1, width=8)
    report = dst.load_pretrained(tmp_path / "ckpt.pth")
    assert report["mismatched"] == ["conv1.weight"] and report["unexpected"] == ["incre_modules.0.weight"]
    assert report["missing"] == ["conv1.weight"]
    torch.testing.assert_close(dst.stage4[0].branches[3][0].conv2.weight, src.stage4[0].branches[3][0].conv2.weight)
    assert "loaded" in capsys.readouterr().out


def test_load_pretrained_counts_the_tensors_it_copies_and_refuses_a_file_that_leaves_the_hrnet_unfilled(tmp_path,
                                                                                                       capsys):
    src = E.HRNet.small(width=4)
    state = src.state_dict()
    weights = [k for k in state if not k.endswith("num_batches_tracked")]
    dst = E.HRNet.small(width=4)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    for name, bad in (("foo", {"foo": torch.ones(3)}), ("most", {k: state[k] for k in weights[:len(weights) // 2]})):
        torch.save(bad, tmp_path / f"{name}.pth")
        with pytest.raises(E.CheckpointError, match=f"^{tmp_path / name}.pth: {len(bad) if name == 'most' else 0} of "
                                                    f"the HRNet's {len(weights)} weight tensors match"):
            dst.load_pretrained(tmp_path / f"{name}.pth")
        assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing copied
    kept = {k: state[k] for k in weights[:-len(weights) // 20]}  # 95 %: loads, and says how many it copied
    torch.save(kept, tmp_path / "kept.pth")
    report = dst.load_pretrained(tmp_path / "kept.pth")
    assert report["missing"] == weights[-len(weights) // 20:] and report["unexpected"] == []
    assert f"{len(kept)}/{len(weights)} weight tensors loaded" in capsys.readouterr().out


def test_semgcn_shapes_and_graph_locality():
    gcn = E.SemGCN(hidden=16, layers=2, parents=PARENTS).eval()
    x = torch.randn(2, 16, 2)
    assert gcn(x).shape == (2, 16, 16)
    layer = gcn.input.gconv
    x2 = x.clone()
    x2[:, 9] += 1.0  # head-top: neighbour of upper-neck (8) only
    changed = (layer(x2) - layer(x)).abs().sum(dim=(0, 2)) > 1e-6
    assert changed.nonzero().flatten().tolist() == [8, 9]
    x3 = x.clone()
    x3[:, 6] += 1.0  # pelvis: r-hip, l-hip, thorax
    changed = (layer(x3) - layer(x)).abs().sum(dim=(0, 2)) > 1e-6
    assert changed.nonzero().flatten().tolist() == [2, 3, 6, 7]


def test_semgcn_invisible_joints_feed_nobody():
    gcn = E.SemGCN(hidden=8, layers=2, parents=PARENTS).eval()
    x = torch.randn(1, 16, 2)
    visible = torch.ones(1, 16, dtype=torch.bool)
    visible[0, 10] = False  # r-wrist
    x2 = x.clone()
    x2[0, 10] = torch.randn(2) * 10
    out, out2 = gcn(x, visible), gcn(x2, visible)
    torch.testing.assert_close(out, out2)
    assert not torch.allclose(gcn(x), gcn(x2))


def test_farthest_point_sampling_matches_brute_force():
    xyz = torch.randn(2, 40, 3)
    idx = E.farthest_point_sample(xyz, 8)
    for b in range(2):
        picks = [0]
        for _ in range(7):
            d = torch.stack([((xyz[b] - xyz[b, p]) ** 2).sum(-1) for p in picks]).min(0).values
            picks.append(int(d.argmax()))
        assert idx[b].tolist() == picks


def test_farthest_point_sampling_skips_invalid_points():
    xyz = torch.randn(1, 30, 3)
    valid = torch.rand(1, 30) > 0.5
    xyz[~valid] = 100.0  # far away: would be picked first if invalid points counted
    assert valid[0, E.farthest_point_sample(xyz, 5, valid)[0]].all()


def test_ball_query_returns_only_points_within_radius():
    xyz = torch.rand(2, 200, 3)
    centers = xyz[:, :10]
    idx = E.ball_query(0.2, 8, xyz, centers)
    assert idx.shape == (2, 10, 8)
    d = (E.gather(xyz, idx) - centers[:, :, None]).norm(dim=-1)
    assert (d <= 0.2 + 1e-6).all()
    # the first in-radius indices, in index order
    inside = (torch.cdist(centers, xyz) <= 0.2)[0, 3].nonzero().flatten()[:8].tolist()
    assert idx[0, 3, :len(inside)].tolist() == inside


def test_three_nn_interpolation_reproduces_source_values():
    src = torch.randn(2, 20, 3)
    f = torch.randn(2, 20, 5)
    torch.testing.assert_close(E.three_nn_interpolate(src, src, f), f, atol=1e-4, rtol=1e-4)


def test_pointnet2_default_is_the_published_configuration():
    """networks/pointnet2_msg.py: 4 multi-scale levels 4,096 -> 64 centres, radii 0.025-1.0, MLPs of Conv + BN +
    ReLU, 4 propagations back to 128 channels per point."""
    net = E.PointNet2()
    assert [sa.npoint for sa in net.sa] == [4096, 1024, 256, 64] and [sa.nsamples for sa in net.sa] == [(16, 32)] * 4
    assert [sa.radii for sa in net.sa] == [(0.025, 0.125), (0.125, 0.25), (0.25, 0.5), (0.5, 1.0)]
    widths = [[[c.out_channels for c in mlp if isinstance(c, torch.nn.Conv2d)] for mlp in sa.mlps] for sa in net.sa]
    assert widths == [[[16, 32], [32, 64]], [[64, 128], [64, 128]], [[128, 256], [128, 256]], [[256, 512], [256, 512]]]
    assert [sa.mlps[0][0].in_channels for sa in net.sa] == [3, 96 + 3, 256 + 3, 512 + 3]  # + the relative xyz
    fp = [[(c.in_channels, c.out_channels) for c in f.mlp if isinstance(c, torch.nn.Conv1d)] for f in net.fp]
    assert fp == [[(256, 128), (128, 128)], [(512 + 96, 256), (256, 256)], [(512 + 256, 512), (512, 512)],
                  [(1024 + 512, 512), (512, 512)]]
    assert net.out_channels == 128
    assert all(isinstance(m[k + 1], torch.nn.BatchNorm1d) and isinstance(m[k + 2], torch.nn.ReLU)
               for f in net.fp for m in [f.mlp] for k in range(0, len(m), 3))


def test_pointnet2_shapes_and_gradients():
    net = E.PointNet2.small(in_features=1, out_channels=16, npoints=(32, 16, 8), width=4)
    pts = torch.rand(2, 100, 3)
    out = net(pts, pts[..., 2:], valid=torch.rand(2, 100) > 0.2)
    assert out.shape == (2, 16, 100)
    out.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_depth_to_points_back_projects_every_pixel():
    K = torch.tensor([[[10.0, 0, 4], [0, 10.0, 3], [0, 0, 1]]])
    depth = torch.zeros(1, 1, 6, 8)
    depth[0, 0, 1, 2] = 2.0
    pts, valid = E.depth_to_points(depth, K)
    assert valid.sum() == 1
    torch.testing.assert_close(pts[0, 1 * 8 + 2], torch.tensor([(2 - 4) * 2 / 10, (1 - 3) * 2 / 10, 2.0]))
