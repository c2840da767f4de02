"""hcmoco.py: every ablation row trains, masking of missing modalities, the geometry of the embedding levels."""
import pytest
import torch

import data
import hcmoco
import synthetic

SIZE = 48


def batch_of(n_indoor=3, n_wild=1, seed=0):
    mixed = data.MixedDataset([synthetic.SyntheticHumans(n_indoor, SIZE, seed=seed),
                               synthetic.SyntheticHumans(n_wild, SIZE, seed=seed + 1, domain="wild", with_depth=False)])
    t = data.PairedTransform(SIZE, train=False)
    return data.collate([t(mixed[i]) for i in range(len(mixed))])


def tiny(**kw):
    return hcmoco.HCMoCo(hcmoco.HCMoCoConfig(width=4, gcn_hidden=16, gcn_layers=1, embed_dim=16, bank_size=8,
                                             num_negatives=8, **kw))


@pytest.mark.parametrize("targets", hcmoco.TARGETS)
def test_every_ablation_row_gives_its_terms_and_gradients(targets):
    model = tiny(targets=targets)
    loss, terms = model(batch_of())
    expected = {"loss", "global"} | ({"dense"} if "+" in targets else set()) | ({"sparse"} if "sparse" in targets else set())
    assert set(terms) == expected
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    loss.backward()
    used = [model.encoders, model.global_mappers] + ([model.dense_mappers] if "+" in targets else [])
    for module in used:
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_depth_terms_vanish_without_depth_and_training_goes_on():
    model = tiny()
    batch = batch_of(n_indoor=1, n_wild=3)
    batch["present"]["depth"][:] = False
    loss, terms = model(batch)
    assert terms["dense"] == 0 and terms["sparse"] > 0 and terms["global"] > 0
    loss.backward()
    assert all(p.grad is None for p in model.encoders["depth"].parameters())
    assert model.encoders["rgb"].conv1.weight.grad.abs().sum() > 0


def test_absent_rows_do_not_influence_anything():
    """Garbage in the zero-filled depth of a no-depth row changes neither the loss nor the depth encoder's
    BatchNorm statistics: the encoder only sees present rows."""
    batch = batch_of()
    garbage = {k: (dict(v) if isinstance(v, dict) else v.clone()) for k, v in batch.items()}
    garbage["depth"][3] = torch.rand_like(garbage["depth"][3]) * 10
    results = []
    for b in (batch, garbage):
        torch.manual_seed(0)
        model = tiny()
        loss, _ = model(b)
        results.append((loss.detach(), model.encoders["depth"].bn1.running_mean.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_global_term_counts_only_present_pairs():
    model = tiny(targets="global")
    batch = batch_of()
    for m in hcmoco.MODALITIES:
        batch["present"][m][:] = False
    batch["present"]["rgb"][0] = True  # a lone modality has no pair to contrast
    loss, terms = model(batch)
    assert terms["global"] == 0 and loss.requires_grad


def test_depth_input_is_person_centred():
    depth = torch.rand(2, 1, 8, 8) + 2
    depth[0, 0, 0, 0] = 0
    x = hcmoco.depth_input(depth)
    assert x.shape == (2, 3, 8, 8) and x[0, :, 0, 0].eq(0).all()
    shifted = torch.where(depth > 0, depth + 1.5, depth)
    torch.testing.assert_close(hcmoco.depth_input(shifted), x)


def test_joint_features_are_sampled_where_the_joints_are():
    """A map whose value is the image x-coordinate of each cell's centre returns each keypoint's own x."""
    H = W = 32
    h = w = 8
    centres = (torch.arange(w) * (W / w) + (W / w - 1) / 2).float()  # image x of each cell's centre
    maps = torch.stack([centres.expand(h, w), centres[:, None].expand(h, w)])[None]  # [1, 2, h, w]: x, y
    kp = torch.tensor([[[5.0, 9.0], [20.3, 14.7], [11.0, 26.0]]])
    got = hcmoco.sample_at(maps, kp, (H, W))
    torch.testing.assert_close(got[0], kp[0])


def test_hard_and_soft_dense_terms_differ_only_in_their_targets():
    batch = batch_of()
    results = {}
    for targets in ("global+hard", "global+soft"):
        torch.manual_seed(0)
        results[targets] = tiny(targets=targets)(batch)[1]["dense"]
    assert results["global+hard"] != results["global+soft"]


def test_pointnet_depth_encoder_variant():
    model = tiny(depth_encoder="pointnet", pointnet_points=256)
    model.encoders["depth"] = hcmoco.PointNet2(out_channels=60, npoints=(64, 32, 16), width=4)  # small, for speed
    loss, terms = model(batch_of())
    loss.backward()
    assert terms["dense"] > 0 and model.encoders["depth"].fp1.mlp[0].weight.grad.abs().sum() > 0


def test_bad_config_names_the_option():
    with pytest.raises(ValueError, match="targets"):
        hcmoco.HCMoCoConfig(targets="soft")
