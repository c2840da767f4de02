"""losses.py against brute-force evaluations of the paper's sums, masking, invariances and gradients."""
import math

import torch
import torch.nn.functional as F

import losses
from conftest import dense_double_loop


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- Eq. 4
def test_soft_weights_rows_sum_to_one_and_fall_with_distance():
    coords = torch.rand(2, 7, 2) * 10
    w = losses.soft_weights(coords)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 7))
    d = torch.cdist(coords, coords)
    for b in range(2):
        for i in range(7):
            order = d[b, i].argsort()
            assert torch.all(w[b, i, order][1:] <= w[b, i, order][:-1] + 1e-7)  # nearer -> heavier
            assert w[b, i].argmax() == i


def test_soft_weights_brute_force_and_symmetry():
    coords = torch.rand(1, 5, 2, dtype=torch.float64) * 4
    w = losses.soft_weights(coords)
    for i in range(5):
        den = sum(math.exp(-float((coords[0, i] - coords[0, k]).norm())) for k in range(5))
        for j in range(5):
            assert abs(float(w[0, i, j]) - math.exp(-float((coords[0, i] - coords[0, j]).norm())) / den) < 1e-12
    # points placed symmetrically about the centre: mirrored pairs see mirrored weights
    sym = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [4.0, 0.0]]])
    ws = losses.soft_weights(sym)[0]
    flip = torch.tensor([3, 2, 1, 0])
    torch.testing.assert_close(ws, ws[flip][:, flip])


# ---------------------------------------------------------------- Eq. 3
def test_dense_loss_with_delta_weights_is_infonce():
    B, N, C = 3, 6, 8
    f1, f2 = torch.randn(B, N, C), torch.randn(B, N, C)
    eye = torch.eye(N).expand(B, N, N)
    got = losses.dense_contrastive_loss(f1, f2, eye, tau=0.07)
    logits = unit(f1) @ unit(f2).transpose(1, 2) / 0.07
    want = F.cross_entropy(logits.reshape(B * N, N), torch.arange(N).repeat(B))
    torch.testing.assert_close(got, want)


def test_dense_loss_matches_brute_force_sum():
    B, N, C, tau = 2, 4, 3, 0.1
    f1 = torch.randn(B, N, C, dtype=torch.float64)
    f2 = torch.randn(B, N, C, dtype=torch.float64)
    w = losses.soft_weights(torch.rand(B, N, 2, dtype=torch.float64) * 3).double()
    u1, u2 = unit(f1), unit(f2)
    total = 0.0
    for b in range(B):
        for i in range(N):
            den = sum(math.exp(float(u1[b, i] @ u2[b, k]) / tau) for k in range(N))
            for j in range(N):
                total -= float(w[b, i, j]) * math.log(math.exp(float(u1[b, i] @ u2[b, j]) / tau) / den)
    got = losses.dense_contrastive_loss(f1, f2, w, tau=tau)
    assert abs(float(got) - total / (B * N)) < 1e-9


def test_bidirectional_dense_loss_matches_the_double_loop_with_each_anchors_own_targets():
    """Fails if the reverse direction takes W^T: a depth anchor's targets are row j of W, not column j (rows of W^T
    do not even sum to 1)."""
    B, N, C, tau = 2, 6, 4, 0.1
    f1, f2 = torch.randn(B, N, C, dtype=torch.float64), torch.randn(B, N, C, dtype=torch.float64)
    coords = torch.rand(B, N, 2, dtype=torch.float64) * torch.tensor([1.0, 6.0], dtype=torch.float64)  # uneven
    w = losses.soft_weights(coords)
    assert not torch.allclose(w.transpose(1, 2).sum(-1), torch.ones(B, N, dtype=torch.float64))
    got = losses.bidirectional_dense_loss(f1, f2, w, tau=tau)
    assert abs(float(got) - dense_double_loop(f1, f2, coords, tau)) < 1e-9
    # = Eq. 3 in each direction with the same weights
    torch.testing.assert_close(got, losses.dense_contrastive_loss(f1, f2, w, tau) + losses.dense_contrastive_loss(
        f2, f1, w, tau))


def test_repeated_points_are_one_candidate_and_the_hard_row_stays_infonce():
    """Points drawn with replacement: an anchor's other copies of its own point leave its softmax. With identity
    weights the loss is then exactly InfoNCE over the distinct points, in both directions."""
    B, N, C, tau = 1, 7, 5, 0.2
    cell = torch.tensor([[0, 3, 3, 5, 0, 8, 2]])  # points 1, 2 and 0, 4 are the same cells
    coords = torch.stack([cell % 4, cell // 4], -1).double()
    candidates = (cell[:, :, None] != cell[:, None, :]) | torch.eye(N, dtype=torch.bool)
    f1, f2 = torch.randn(B, N, C, dtype=torch.float64), torch.randn(B, N, C, dtype=torch.float64)
    soft = losses.bidirectional_dense_loss(f1, f2, losses.soft_weights(coords, candidates), tau, candidates)
    assert abs(float(soft) - dense_double_loop(f1, f2, coords, tau, candidates)) < 1e-9
    eye = torch.eye(N, dtype=torch.float64)[None]
    hard = losses.bidirectional_dense_loss(f1, f2, eye, tau, candidates)
    assert abs(float(hard) - dense_double_loop(f1, f2, coords, tau, candidates, hard=True)) < 1e-9
    s = unit(f1[0]) @ unit(f2[0]).T / tau  # [N, N]: RGB anchors in rows, depth anchors in columns

    def infonce(logits, keep):  # [N, N], [N, N] bool -> per anchor, its cross-entropy over its kept candidates
        # keep[i, i] holds, so the positive's place among anchor i's kept candidates is the count kept before it
        return [float(F.cross_entropy(logits[i, keep[i]][None], keep[i, :i].sum()[None])) for i in range(N)]

    masked = infonce(s, candidates[0]) + infonce(s.T, candidates[0])
    assert abs(float(hard) - sum(masked) / N) < 1e-9
    # anchor 1 (cell 3) by hand: its candidates are every point but point 2, the other copy of cell 3
    keep = [0, 1, 3, 4, 5, 6]
    assert abs(masked[1] - float(F.cross_entropy(s[1, keep][None], torch.tensor([1])))) < 1e-12
    w = losses.soft_weights(coords, candidates)
    assert w[0, 1, 2] == 0 and abs(float(w[0, 1].sum()) - 1) < 1e-12
    # without candidates the other copies count as negatives: InfoNCE over all N points, larger for every anchor
    # that has a copy
    unmasked = losses.bidirectional_dense_loss(f1, f2, eye, tau)
    everyone = torch.ones(N, N, dtype=torch.bool)
    assert abs(float(unmasked) - sum(infonce(s, everyone) + infonce(s.T, everyone)) / N) < 1e-9
    assert unmasked > hard


def test_bidirectional_dense_loss_gradients_are_those_of_eq_3_in_both_directions():
    """The written-out backward pass of Eq. 5 against autograd through the two Eq. 3 directions, with repeated
    points (candidates), soft weights and the hard row's broadcast identity; and torch's numerical gradcheck."""
    B, N, C, tau = 2, 9, 5, 0.1
    cell = torch.randint(0, 6, (B, N))
    candidates = (cell[:, :, None] != cell[:, None, :]) | torch.eye(N, dtype=torch.bool)
    soft = losses.soft_weights(torch.stack([cell % 3, cell // 3], -1).double(), candidates)
    hard = torch.eye(N, dtype=torch.float64)[None]
    for weights, cands in ((soft, candidates), (hard, candidates), (losses.soft_weights(torch.rand(B, N, 2)).double(),
                                                                      None)):
        f1 = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
        f2 = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
        got = torch.autograd.grad(losses.bidirectional_dense_loss(f1, f2, weights, tau, cands), (f1, f2))
        reference = (losses.dense_contrastive_loss(f1, f2, weights.expand(B, N, N), tau, cands)
                     + losses.dense_contrastive_loss(f2, f1, weights.expand(B, N, N), tau, cands))
        want = torch.autograd.grad(reference, (f1, f2))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert torch.autograd.gradcheck(lambda a, b: losses.bidirectional_dense_loss(a, b, weights, tau, cands),
                                        (f1, f2))


def test_bidirectional_dense_loss_computes_in_float32_under_bf16_autocast():
    B, N, C = 2, 16, 8
    f1, f2 = torch.randn(B, N, C), torch.randn(B, N, C)
    w = losses.soft_weights(torch.rand(B, N, 2) * 4)
    want = losses.bidirectional_dense_loss(f1, f2, w)
    a, b = f1.bfloat16().requires_grad_(), f2.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losses.bidirectional_dense_loss(a, b, w)
    got.backward()
    assert got.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    # only the inputs' rounding to bf16 differs; in bf16 the logits (|S| up to 14) would be off by ~0.05 each
    torch.testing.assert_close(got, losses.bidirectional_dense_loss(a.detach().float(), b.detach().float(), w))
    assert abs(float(got.detach()) - float(want)) < 0.05


# ---------------------------------------------------------------- Eq. 6
def cross_sample_brute_force(feats, valid, tau):
    B, M, J, _ = feats.shape
    f = unit(feats.double())
    entries = [(b, m, j) for b in range(B) for m in range(M) for j in range(J) if valid[b, m, j]]
    terms = []
    for a in entries:
        cands = [c for c in entries if c != a]
        pos = [c for c in cands if c[2] == a[2]]
        if not pos:
            continue
        s = lambda c: float(f[a] @ f[c]) / tau  # noqa: E731
        log_den = math.log(sum(math.exp(s(c)) for c in cands))
        terms.append(-sum(s(p) - log_den for p in pos) / len(pos))
    return sum(terms) / len(terms)


def joint_keypoint_brute_force(feats, keypoints, valid, tau):
    """For each image modality: the mean over valid (sample, joint) anchors of -log softmax over that sample's J
    keypoint-GCN joints, at the anchor's own joint; summed over modalities."""
    B, M, J, _ = feats.shape
    f, g = unit(feats.double()), unit(keypoints.double())
    total = 0.0
    for m in range(M):
        nll = []
        for b in range(B):
            for j in range(J):
                if valid[b, m, j]:
                    logits = [float(f[b, m, j] @ g[b, k]) / tau for k in range(J)]
                    nll.append(-(logits[j] - math.log(sum(math.exp(x) for x in logits))))
        total += sum(nll) / len(nll) if nll else 0.0
    return total


def test_sparse_loss_is_the_published_intra_plus_inter_structure():
    """Eq. 6 as published: RGB joints vs the sample's GCN joints + depth joints vs the sample's GCN joints + RGB and
    depth joints across the batch. The old pooled form (GCN joints among the inter-sample entries) differs."""
    feats = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    keypoints = torch.randn(3, 4, 5, dtype=torch.float64)
    valid = torch.rand(3, 2, 4) > 0.25
    valid[2, 1] = False  # a sample without depth
    want = joint_keypoint_brute_force(feats, keypoints, valid, 0.2) + cross_sample_brute_force(feats, valid, 0.2)
    got = losses.sparse_structure_loss(feats, keypoints, valid, tau=0.2)
    assert abs(float(got) - want) < 1e-9
    assert abs(float(losses.joint_keypoint_loss(feats, keypoints, valid, 0.2))
               - joint_keypoint_brute_force(feats, keypoints, valid, 0.2)) < 1e-9
    assert abs(float(losses.cross_sample_joint_loss(feats, valid, 0.2)) - cross_sample_brute_force(feats, valid, 0.2)) < 1e-9


def test_joint_keypoint_part_compares_within_each_sample_only():
    feats, keypoints = torch.randn(2, 2, 5, 8), torch.randn(2, 5, 8)
    valid = torch.ones(2, 2, 5, dtype=torch.bool)
    changed = keypoints.clone()
    changed[1] = torch.randn(5, 8)
    only0 = losses.joint_keypoint_loss(feats[:1], keypoints[:1], valid[:1])
    torch.testing.assert_close(only0, losses.joint_keypoint_loss(feats[:1], changed[:1], valid[:1]))
    per = torch.stack([losses.joint_keypoint_loss(feats[b:b + 1], keypoints[b:b + 1], valid[b:b + 1]) for b in range(2)])
    torch.testing.assert_close(losses.joint_keypoint_loss(feats, keypoints, valid), per.mean())


def test_sparse_invalid_entries_have_no_influence_and_zero_grad():
    feats = torch.randn(2, 3, 4, 6, requires_grad=True)
    keypoints = torch.randn(2, 4, 6)
    valid = torch.rand(2, 3, 4) > 0.3
    valid[0, 0, 0] = False
    loss = losses.sparse_structure_loss(feats, keypoints, valid)
    loss.backward()
    assert torch.all(feats.grad[~valid] == 0)
    garbage = feats.detach().clone()
    garbage[~valid] = torch.randn(int((~valid).sum()), 6) * 100
    torch.testing.assert_close(losses.sparse_structure_loss(garbage, keypoints, valid), loss.detach())


def test_sparse_no_anchor_returns_zero_with_grad():
    feats = torch.randn(2, 2, 3, 4, requires_grad=True)
    keypoints = torch.randn(2, 3, 4, requires_grad=True)
    valid = torch.zeros(2, 2, 3, dtype=torch.bool)
    loss = losses.sparse_structure_loss(feats, keypoints, valid)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(feats.grad).all()


# ---------------------------------------------------------------- Eq. 2
def test_memory_bank_sums_the_ordered_pairs_as_published():
    """L_global = sum over the six ordered pairs of each pair's mean over its rows (the published trainer sums six
    cross-entropies), checked by hand with the whole bank as negatives and pairs of different row counts."""
    torch.manual_seed(1)
    size, dim, tau, mods = 6, 4, 0.5, ["rgb", "depth", "keypoints"]
    bank = losses.MemoryBank(size, dim, mods, num_negatives=size, momentum=0.5, tau=tau).double()
    mem = {m: bank.memory(m).clone() for m in mods}
    feats = {m: torch.randn(3, dim, dtype=torch.float64, requires_grad=True) for m in mods}
    index = torch.tensor([4, 0, 2])
    present = {"rgb": torch.tensor([True, True, True]), "depth": torch.tensor([True, False, True]),
               "keypoints": torch.tensor([True, True, True])}
    got = bank(feats, index, present)
    got.backward()  # the update after the loss must not invalidate what backward needs
    want = 0.0
    for a in mods:
        for b in mods:
            if a == b:
                continue
            terms = []
            for r in range(3):
                if not (present[a][r] and present[b][r]):
                    continue
                q = unit(feats[a][r].detach())
                pos = math.exp(float(q @ mem[b][index[r]]) / tau)
                neg = sum(math.exp(float(q @ mem[b][k]) / tau) for k in range(size))
                terms.append(-math.log(pos / (pos + neg)))
            want += sum(terms) / len(terms)
    assert abs(got.item() - want) < 1e-9


def test_memory_bank_momentum_update_is_exact_and_skips_absent_rows():
    bank = losses.MemoryBank(8, 4, ["rgb", "depth"], num_negatives=3, momentum=0.5)
    before = {m: bank.memory(m).clone() for m in ["rgb", "depth"]}
    feats = {m: torch.randn(2, 4, requires_grad=True) for m in ["rgb", "depth"]}
    index = torch.tensor([5, 1])
    present = {"rgb": torch.tensor([True, True]), "depth": torch.tensor([True, False])}
    loss = bank(feats, index, present)
    loss.backward()
    for m in ["rgb", "depth"]:
        for r in range(2):
            i = index[r]
            if present[m][r]:
                want = unit(0.5 * before[m][i] + 0.5 * unit(feats[m][r].detach()))
                torch.testing.assert_close(bank.memory(m)[i], want)
            else:
                torch.testing.assert_close(bank.memory(m)[i], before[m][i])
        untouched = torch.ones(8, dtype=torch.bool)
        untouched[index] = False
        torch.testing.assert_close(bank.memory(m)[untouched], before[m][untouched])
        assert not bank.memory(m).requires_grad
    assert feats["depth"].grad[1].abs().sum() == 0  # the absent depth row contributes nothing


def test_memory_bank_loss_falls_when_embeddings_match_their_entries():
    bank = losses.MemoryBank(64, 16, ["rgb", "depth"], num_negatives=32, momentum=0.5)
    index = torch.arange(8)
    present = {m: torch.ones(8, dtype=torch.bool) for m in ["rgb", "depth"]}
    random_loss = bank({m: torch.randn(8, 16) for m in ["rgb", "depth"]}, index, present)
    matched = {"rgb": bank.memory("depth")[index].clone(), "depth": bank.memory("rgb")[index].clone()}
    assert bank(matched, index, present) < random_loss - 1.0


def test_memory_bank_no_present_pair_returns_zero_with_grad():
    bank = losses.MemoryBank(8, 4, ["rgb", "depth"], num_negatives=4)
    feats = {m: torch.randn(2, 4, requires_grad=True) for m in ["rgb", "depth"]}
    present = {"rgb": torch.tensor([True, False]), "depth": torch.tensor([False, True])}
    loss = bank(feats, torch.tensor([0, 1]), present)
    assert loss.item() == 0.0 and loss.requires_grad


# ---------------------------------------------------------------- gradients and precision
def test_gradcheck_dense_and_sparse():
    f1 = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    w = losses.soft_weights(torch.rand(1, 3, 2, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: losses.dense_contrastive_loss(a, b, w, tau=0.5), (f1, f2))
    feats = torch.randn(2, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    keypoints = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(2, 2, 2, dtype=torch.bool)
    valid[1, 1, 0] = False
    assert torch.autograd.gradcheck(lambda f, k: losses.sparse_structure_loss(f, k, valid, tau=0.5), (feats, keypoints))
    assert torch.autograd.gradcheck(lambda a, b: losses.bidirectional_dense_loss(a, b, w, tau=0.5), (f1, f2))


def test_finite_under_bf16_autocast():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 50, 8)
    bank = losses.MemoryBank(100, 8, ["rgb", "depth"], num_negatives=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f1, f2 = lin(x), lin(x.flip(1))
        assert f1.dtype == torch.bfloat16
        w = losses.soft_weights(torch.rand(2, 50, 2) * 64)
        loss = (losses.bidirectional_dense_loss(f1, f2, w)
                + losses.sparse_structure_loss(f1.view(2, 2, 25, 8), f2[:, :25], torch.ones(2, 2, 25, dtype=torch.bool))
                + bank({"rgb": f1[:, 0], "depth": f2[:, 0]}, torch.arange(2),
                       {m: torch.ones(2, dtype=torch.bool) for m in ["rgb", "depth"]}))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in lin.parameters())


def test_batch_contrastive_loss_is_eq2_with_the_batch_as_negatives():
    """In-batch Eq. 2: for every ordered pair, each row's positive is its own other-modality embedding among the
    batch's rows that have that modality; the sum over pairs of per-pair means, checked by hand."""
    mods = ["rgb", "depth", "keypoints"]
    feats = {m: torch.randn(4, 5, dtype=torch.float64) for m in mods}
    present = {"rgb": torch.tensor([True, True, True, True]), "depth": torch.tensor([True, False, True, True]),
               "keypoints": torch.tensor([True, True, False, True])}
    want = 0.0
    for a in mods:
        for b in mods:
            if a == b:
                continue
            nll = []
            for i in range(4):
                if present[a][i] and present[b][i]:
                    q = unit(feats[a][i])
                    keys = [k for k in range(4) if present[b][k]]
                    den = sum(math.exp(float(q @ unit(feats[b][k])) / 0.2) for k in keys)
                    nll.append(-math.log(math.exp(float(q @ unit(feats[b][i])) / 0.2) / den))
            want += sum(nll) / len(nll)
    got = losses.batch_contrastive_loss(feats, present, tau=0.2)
    assert abs(float(got) - want) < 1e-9


def test_mmv_fine_and_coarse_loss_is_its_written_out_sum():
    """MMV's FAC: RGB-depth NCE in the fine space plus RGB-keypoints NCE in the coarse space, each in both
    directions over the rows where both sides are present, negatives the batch's rows of the other side. Checked
    by a loop; the coarse RGB embedding enters only the second NCE, the fine keypoint one (absent) nowhere."""
    B, tau = 5, 0.3
    fine = {m: torch.randn(B, 6, dtype=torch.float64) for m in ("rgb", "depth")}
    coarse = {m: torch.randn(B, 6, dtype=torch.float64) for m in ("rgb", "keypoints")}
    present = {"rgb": torch.tensor([True, True, True, False, True]),
               "depth": torch.tensor([True, False, True, True, True]),
               "keypoints": torch.tensor([True, True, False, True, True])}

    def nce(fa, fb, a, b):
        total = 0.0
        for x, y, p, q in ((fa, fb, a, b), (fb, fa, b, a)):  # both directions
            rows = [i for i in range(B) if present[p][i] and present[q][i]]
            nll = [-math.log(math.exp(float(unit(x[i]) @ unit(y[i])) / tau)
                             / sum(math.exp(float(unit(x[i]) @ unit(y[k])) / tau) for k in range(B) if present[q][k]))
                   for i in rows]
            total += sum(nll) / len(nll)
        return total

    want = nce(fine["rgb"], fine["depth"], "rgb", "depth") + nce(coarse["rgb"], coarse["keypoints"], "rgb", "keypoints")
    got = losses.fine_and_coarse_loss(fine, coarse, present, tau)
    assert abs(float(got) - want) < 1e-9
