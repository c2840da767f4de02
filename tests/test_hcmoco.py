"""hcmoco.py: every ablation row trains, masking of missing modalities, the geometry of the embedding levels."""

import pytest
import torch
import torch.nn.functional as F

import data
import hcmoco
import losses
import schema
import synthetic
from conftest import dense_double_loop

SIZE = 48


def batch_of(n_indoor=3, n_wild=1, seed=0):
    mixed = data.MixedDataset([synthetic.SyntheticHumans(n_indoor, SIZE, seed=seed),
                               synthetic.SyntheticHumans(n_wild, SIZE, seed=seed + 1, domain="wild", with_depth=False)])
    t = data.PairedTransform(SIZE, train=False)
    return data.collate([t(mixed[i]) for i in range(len(mixed))])


def tiny(targets="global+soft+sparse", **kw):
    """A small model training the Table 3 row `targets`."""
    return hcmoco.HCMoCo(hcmoco.HCMoCoConfig(width=4, gcn_layers=1, embed_dim=16, bank_size=8,
                                             num_negatives=8, **hcmoco.TARGETS[targets], **kw))


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


@pytest.mark.parametrize("all_present", [True, False])
def test_global_only_embedding_skips_the_dense_maps_and_keeps_the_global_level(all_present):
    """embed(dense=False), what a sample-level model's forward uses: the same global embeddings as embed(), with
    every row present (no row selection) and with absent ones (rows taken and scattered back), and neither dense
    mapper run."""
    model = tiny(targets="global").eval()
    batch = data.batch_rows(batch_of(), 0, 3) if all_present else batch_of()  # row 3 has no depth
    assert batch["present"]["depth"].all() == all_present
    calls = []
    for mapper in model.dense_mappers.values():
        mapper.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        alone = model.embed(batch, dense=False)
        assert not calls and not alone["dense"] and not alone["sparse"]
        full = model.embed(batch)
    assert calls and set(alone["global"]) == set(full["global"])
    for m in full["global"]:
        torch.testing.assert_close(alone["global"][m], full["global"][m])
    absent = ~batch["present"]["depth"]
    assert torch.all(full["dense"]["depth"][absent] == 0) and torch.all(alone["global"]["depth"][absent] == 0)


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
    for m in schema.MODALITIES:
        batch["present"][m][:] = False
    batch["present"]["rgb"][0] = True  # a lone modality has no pair to contrast
    loss, terms = model(batch)
    assert terms["global"] == 0 and loss.requires_grad


def test_depth_input_centres_on_the_person_not_the_room():
    """The person's depth minus its mean over the person, 0 off the person and at holes; unchanged when the person
    moves along the optical axis, whatever the room behind does."""
    depth = torch.full((2, 1, 8, 8), 6.0)  # the room, far behind
    person = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    person[:, :, 2:6, 3:5] = True
    depth[person] = 2.5 + torch.rand(int(person.sum())) * 0.4
    depth[0, 0, 2, 3] = 0  # a hole on the person
    x = hcmoco.depth_input(depth, person)
    on = person & (depth > 0)
    assert x.shape == (2, 3, 8, 8) and (x[~on.expand(-1, 3, -1, -1)] == 0).all()
    torch.testing.assert_close(x[0, 0][on[0, 0]].mean(), torch.tensor(0.0))  # centred on the person's mean
    moved = torch.where(person, depth + 1.5, depth + torch.rand_like(depth))  # the room changes too
    moved[depth == 0] = 0  # the hole stays a hole
    torch.testing.assert_close(hcmoco.depth_input(moved, person), x)


def test_normalized_keypoints_are_pelvis_relative_and_scale_free():
    """normalize_joints_myway: invariant to shifting and uniformly scaling the image; invisible joints take no part
    (neither as input nor in the scale)."""
    kp = torch.rand(3, 16, 2) * 40 + 10
    vis = torch.rand(3, 16) > 0.2
    vis[0, hcmoco.PELVIS] = False  # falls back to the visible joints' mean
    vis[1:, hcmoco.PELVIS] = True
    out = hcmoco.normalized_keypoints(kp, vis)
    torch.testing.assert_close(hcmoco.normalized_keypoints(kp * 2.7 + torch.tensor([31.0, -12.0]), vis), out)
    assert (out[~vis] == 0).all()
    torch.testing.assert_close(out[1:, hcmoco.PELVIS], torch.zeros(2, 2))
    torch.testing.assert_close(out.abs().amax(dim=(1, 2)), torch.ones(3))
    far = kp.clone()
    far[~vis] = 1e4  # an invisible joint far away changes nothing
    torch.testing.assert_close(hcmoco.normalized_keypoints(far, vis), out)


def test_published_keypoint_graph_hangs_the_shoulders_from_the_neck_and_lets_invisible_joints_talk():
    """keypoint_graph='published' (networks/SGCN): shoulders connect to the upper neck, not the thorax, and an
    invisible joint is a joint with input 0 that passes messages like any other. So hiding a joint equals
    showing it at the pelvis (offset 0, the same input); under 'masked' hiding it also silences it."""
    J = schema.JOINT_INDEX
    batch = batch_of()
    batch["keypoints_visible"][:] = True
    shown = {k: (dict(v) if isinstance(v, dict) else v.clone()) for k, v in batch.items()}
    shown["keypoints"][:, J["l_wrist"]] = shown["keypoints"][:, hcmoco.PELVIS]
    hidden = {k: (dict(v) if isinstance(v, dict) else v.clone()) for k, v in shown.items()}
    hidden["keypoints_visible"][:, J["l_wrist"]] = False
    for graph, same in (("published", True), ("masked", False)):
        torch.manual_seed(0)
        model = tiny(keypoint_graph=graph).eval()
        adjacency = model.encoders["keypoints"].input.gconv.adjacency
        neck = J["upper_neck"] if graph == "published" else J["thorax"]
        for shoulder, elbow in (("r_shoulder", "r_elbow"), ("l_shoulder", "l_elbow")):
            assert adjacency[J[shoulder]].nonzero().flatten().tolist() == sorted([J[shoulder], J[elbow], neck])
        with torch.no_grad():
            a, b = (model.embed(x)["sparse"]["keypoints"] for x in (shown, hidden))
        assert torch.allclose(a, b, atol=1e-6) == same, graph


def test_joint_features_are_sampled_where_the_joints_are():
    """A map whose value is the image x-coordinate of each cell's centre returns each keypoint's own x."""
    H = W = 32
    h = w = 8
    centres = (torch.arange(w) * (W / w) + (W / w - 1) / 2).float()  # image x of each cell's centre
    maps = torch.stack([centres.expand(h, w), centres[:, None].expand(h, w)])[None]  # [1, 2, h, w]: x, y
    kp = torch.tensor([[[5.0, 9.0], [20.3, 14.7], [11.0, 26.0]]])
    got = hcmoco.sample_at(maps, kp, (H, W))
    torch.testing.assert_close(got[0], kp[0])


@pytest.mark.parametrize("targets, soft_width", [("global+soft", 1.0), ("global+soft", 0.2), ("global+hard", 1.0)])
def test_dense_term_is_the_written_out_double_loop(targets, soft_width, monkeypatch):
    """HCMoCo.dense_term at fixed points, repeats included, against Eq. 5 written out, Eq. 4's distances in units
    of soft_width cells; with W^T in the reverse direction (or repeats as extra negatives) it differs."""
    model = tiny(targets=targets, dense_points=12, soft_width=soft_width)
    batch = batch_of()
    with torch.no_grad():
        dense = model.embed(batch)["dense"]
    h, w = dense["rgb"].shape[-2:]
    idx = torch.randint(h * w, (3, 12))
    idx[:, 1] = idx[:, 0]  # a repeat in every row
    monkeypatch.setattr(model, "dense_points", lambda batch, rows, size: (rows, idx))
    got = model.dense_term(dense, batch)

    def at_cells(f):  # [B, D, h, w] -> [3, 12, D]: the features at the drawn cells
        return f[:3].flatten(2).transpose(1, 2)[torch.arange(3)[:, None], idx]

    coords = torch.stack([idx % w, idx // w], -1).double() / soft_width  # [3, 12, 2] (x, y) in soft_width cells
    # a cell drawn twice is one candidate: an anchor keeps itself and drops the other copies of its cell
    candidates = torch.tensor([[[j == i or cj != ci for j, cj in enumerate(row)] for i, ci in enumerate(row)]
                               for row in idx.tolist()])  # [3, 12, 12]
    want = dense_double_loop(at_cells(dense["rgb"]), at_cells(dense["depth"]), coords, model.cfg.tau, candidates,
                             hard=targets == "global+hard")
    assert abs(got.item() - want) < 1e-4 * abs(want)


def test_the_soft_term_narrows_to_the_hard_one_as_its_width_shrinks():
    """Eq. 4 with distances in units of soft_width cells: as the width shrinks, every other cell's weight vanishes
    and the soft row's dense term becomes the hard row's InfoNCE; at the published width of 1 cell it is not."""
    batch = batch_of()
    dense = {}
    for name, targets, width in (("hard", "global+hard", 1.0), ("narrow", "global+soft", 0.01),
                                 ("published", "global+soft", 1.0)):
        torch.manual_seed(0)
        model = tiny(targets=targets, soft_width=width)
        torch.manual_seed(1)
        dense[name] = model(batch)[1]["dense"]
    torch.testing.assert_close(dense["narrow"], dense["hard"])
    assert not torch.allclose(dense["published"], dense["hard"])


def test_dense_term_draws_the_same_number_of_points_every_batch(monkeypatch):
    """N = dense_points in every batch, however small the person (drawn with replacement), and only from the
    person's cells with valid depth."""
    model = tiny(dense_points=64)
    batch = batch_of()
    batch["mask"][0] = False
    batch["mask"][0, 20:24, 20:24] = True  # one person covers a single 1/4 cell of the 12 x 12 grid
    batch["depth"][1, :, :, :24] = 0  # no depth on the left half of sample 1
    rows, idx = model.dense_points(batch, torch.tensor([0, 1, 2]), (12, 12))
    assert rows.tolist() == [0, 1, 2] and idx.shape == (3, 64)
    assert (idx[0] == 5 * 12 + 5).all()
    assert (idx[1] % 12 >= 6).all()
    person = F.interpolate((batch["mask"][:, None] & (batch["depth"] > 0)).float(), size=(12, 12)).flatten(1)
    assert (person[rows[:, None], idx] > 0).all()
    seen = []
    monkeypatch.setattr(hcmoco.losses, "bidirectional_dense_loss",
                        lambda f1, f2, *a, **k: seen.append(f1.shape) or f1.sum() * 0)
    for seed in range(3):
        torch.manual_seed(seed)
        model(batch_of(seed=seed))
    assert [s[1] for s in seen] == [64, 64, 64]


def test_eq1_weights_the_terms_as_published():
    """Default lambdas of 1 on terms that are the published sums: the total is global + dense + sparse."""
    model = tiny()
    loss, terms = model(batch_of())
    torch.testing.assert_close(loss, terms["global"] + terms["dense"] + terms["sparse"])
    assert (model.cfg.lambda_global, model.cfg.lambda_dense, model.cfg.lambda_sparse) == (1.0, 1.0, 1.0)


def test_hard_and_soft_dense_terms_differ_only_in_their_targets(monkeypatch):
    """Table 3's global+hard and global+soft rows from one seed on one batch: the same global term, and Eq. 5 sees
    the same features at the same drawn cells with the same candidates; only its targets differ, the identity in
    the hard row and Eq. 4's soft_weights of the drawn cells in the soft one, and so do the dense terms."""
    drawn, seen = {}, []
    draw, loss = hcmoco.HCMoCo.dense_points, losses.bidirectional_dense_loss

    def dense_points(model, batch, rows, size):  # keeps each row's drawn cells idx [b, N] and the grid size
        drawn[model.cfg.dense] = (*draw(model, batch, rows, size), size)
        return drawn[model.cfg.dense][:2]

    def bidirectional_dense_loss(f1, f2, weights, tau, candidates):  # keeps what Eq. 5 is given
        seen.append(dict(f1=f1, f2=f2, weights=weights, candidates=candidates))
        return loss(f1, f2, weights, tau, candidates)

    monkeypatch.setattr(hcmoco.HCMoCo, "dense_points", dense_points)
    monkeypatch.setattr(hcmoco.losses, "bidirectional_dense_loss", bidirectional_dense_loss)
    batch = batch_of()
    terms = {}
    for targets in ("global+hard", "global+soft"):
        torch.manual_seed(0)
        terms[targets] = tiny(targets=targets)(batch)[1]
    hard, soft = seen
    assert terms["global+hard"]["global"] == terms["global+soft"]["global"]
    assert torch.equal(drawn["hard"][1], drawn["soft"][1])
    for key in ("f1", "f2", "candidates"):
        assert torch.equal(hard[key], soft[key]), key
    b, n = drawn["soft"][1].shape
    assert torch.equal(hard["weights"], torch.eye(n).expand(b, n, n))
    _, idx, (h, w) = drawn["soft"]
    coords = torch.stack([idx % w, idx // w], -1).float()  # [b, N, 2] grid cells (x, y)
    torch.testing.assert_close(soft["weights"], losses.soft_weights(coords, soft["candidates"]))
    assert soft["weights"].diagonal(dim1=1, dim2=2).max() < 1  # targets spread over the neighbours
    assert terms["global+hard"]["dense"] != terms["global+soft"]["dense"]


def small_pointnet(**kw):
    model = tiny(depth_encoder="pointnet", **kw)
    model.encoders["depth"] = hcmoco.PointNet2.small(npoints=(64, 32, 16), width=4)  # smaller still, for speed
    return model


def test_pointnet_depth_encoder_variant():
    model = small_pointnet(pointnet_points=256)
    loss, terms = model(batch_of())
    loss.backward()
    assert terms["dense"] > 0 and model.encoders["depth"].fp[0].mlp[0].weight.grad.abs().sum() > 0
    assert model.dense_mappers["depth"][0].weight.grad.abs().sum() > 0


def test_pointnet_features_reach_every_pixel_from_the_nearest_points():
    """As published: points drawn with replacement from the person's depth pixels; the pooled features are the
    mean over the drawn points; the dense map gives every pixel of the 1/4 grid the mapped features of its 3
    nearest drawn points (off the person at the person's mean depth). With two person pixels A and B every grid
    pixel takes A's or B's features, whichever is nearer in 3D."""
    class Coordinates(torch.nn.Module):  # features that tell points apart (PointNet++ sees relative xyz only)
        def forward(self, points, valid):
            return points.transpose(1, 2).repeat(1, 43, 1)[:, :128]  # [B, 128, n]

    model = small_pointnet(pointnet_points=64).eval()
    model.encoders["depth"] = Coordinates()
    depth, person = torch.zeros(1, 1, SIZE, SIZE), torch.zeros(1, 1, SIZE, SIZE, dtype=torch.bool)
    (ya, xa), (yb, xb) = (8, 12), (37, 41)  # in the 1/4 grid's cells (2, 3) and (9, 10); no grid pixel ties
    for y, x in ((ya, xa), (yb, xb)):
        depth[0, 0, y, x], person[0, 0, y, x] = 2.0, True
    K = torch.tensor([[[50.0, 0, 24], [0, 50.0, 24], [0, 0, 1]]])
    seen = []
    model.encoders["depth"].register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        pooled, dense = model.pointnet_features(depth, person, K)
    torch.testing.assert_close(pooled, seen[0].mean(dim=2))
    a, b = dense[0, :, ya // 4, xa // 4], dense[0, :, yb // 4, xb // 4]
    assert not torch.allclose(a, b)
    xy = torch.stack(torch.meshgrid(torch.arange(12.0) * 4, torch.arange(12.0) * 4, indexing="ij"), -1)  # (y, x)
    nearer_a = (xy - torch.tensor([ya, xa])).norm(dim=-1) < (xy - torch.tensor([yb, xb])).norm(dim=-1)  # all at 2 m
    expected = torch.where(nearer_a, a[:, None, None], b[:, None, None])  # [D, 12, 12]
    torch.testing.assert_close(dense[0], expected, atol=1e-5, rtol=1e-5)


def test_mmv_baseline_replaces_eq2_with_fine_and_coarse_nce():
    """global_loss='mmv': the sample-level term is losses.fine_and_coarse_loss on the global embeddings (RGB and
    depth fine, keypoints coarse, RGB projected into the coarse space by a learnt linear map); it trains."""
    model = tiny(targets="global", global_loss="mmv")
    batch = batch_of()
    loss, terms = model(batch)
    emb = model.embed(batch)["global"]
    coarse = {"rgb": F.normalize(model.fine_to_coarse(emb["rgb"]), dim=-1), "keypoints": emb["keypoints"]}
    torch.testing.assert_close(terms["global"], losses.fine_and_coarse_loss(emb, coarse, batch["present"], 0.07))
    loss.backward()
    assert model.fine_to_coarse.weight.grad.abs().sum() > 0 and not hasattr(model, "bank")


def test_bad_config_names_the_option():
    with pytest.raises(ValueError, match="dense"):
        hcmoco.HCMoCoConfig(dense="soft+sparse")
