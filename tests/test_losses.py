"""losses.py against brute-force evaluations of the paper's sums, masking, invariances and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

import losses


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


def test_reverse_direction_from_the_same_similarity_matrix():
    f1, f2 = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    w = losses.soft_weights(torch.rand(2, 5, 2))
    s = unit(f1) @ unit(f2).transpose(1, 2) / 0.07
    torch.testing.assert_close(losses.soft_cross_entropy(s.transpose(1, 2), w.transpose(1, 2)),
                               losses.dense_contrastive_loss(f2, f1, w.transpose(1, 2)))


# ---------------------------------------------------------------- Eq. 6
def sparse_brute_force(feats, valid, tau, inter_sample):
    B, M, J, _ = feats.shape
    f = unit(feats.double())
    entries = [(b, m, j) for b in range(B) for m in range(M) for j in range(J) if valid[b, m, j]]
    terms = []
    for a in entries:
        cands = [c for c in entries if c != a and (inter_sample or c[0] == a[0])]
        pos = [c for c in cands if c[2] == a[2]]
        if not pos:
            continue
        s = lambda c: float(f[a] @ f[c]) / tau  # noqa: E731
        log_den = math.log(sum(math.exp(s(c)) for c in cands))
        terms.append(-sum(s(p) - log_den for p in pos) / len(pos))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("inter_sample", [True, False])
def test_sparse_loss_matches_brute_force(inter_sample):
    feats = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    valid = torch.rand(3, 2, 4) > 0.25
    got = losses.sparse_structure_loss(feats, valid, tau=0.2, inter_sample=inter_sample)
    assert abs(float(got) - sparse_brute_force(feats, valid, 0.2, inter_sample)) < 1e-9


def test_sparse_intra_sample_ignores_other_samples():
    feats = torch.randn(2, 3, 5, 8)
    valid = torch.ones(2, 3, 5, dtype=torch.bool)
    ref = losses.sparse_structure_loss(feats, valid, inter_sample=False)
    changed = feats.clone()
    changed[1] = torch.randn(3, 5, 8)
    # sample 0's anchors are untouched, sample 1's change: compare sample 0 alone
    only0 = losses.sparse_structure_loss(feats[:1], valid[:1], inter_sample=False)
    only0_changed = losses.sparse_structure_loss(changed[:1], valid[:1], inter_sample=False)
    torch.testing.assert_close(only0, only0_changed)
    # and the batched loss is the mean of per-sample losses (equal anchor counts)
    per = torch.stack([losses.sparse_structure_loss(feats[b:b + 1], valid[b:b + 1], inter_sample=False)
                       for b in range(2)])
    torch.testing.assert_close(ref, per.mean())
    assert not torch.allclose(losses.sparse_structure_loss(changed, valid, inter_sample=True),
                              losses.sparse_structure_loss(feats, valid, inter_sample=True))


def test_sparse_invalid_entries_have_no_influence_and_zero_grad():
    feats = torch.randn(2, 3, 4, 6, requires_grad=True)
    valid = torch.rand(2, 3, 4) > 0.3
    valid[0, 0, 0] = False
    loss = losses.sparse_structure_loss(feats, valid)
    loss.backward()
    assert torch.all(feats.grad[~valid] == 0)
    garbage = feats.detach().clone()
    garbage[~valid] = torch.randn(int((~valid).sum()), 6) * 100
    torch.testing.assert_close(losses.sparse_structure_loss(garbage, valid), loss.detach())


def test_sparse_no_positive_returns_zero_with_grad():
    feats = torch.randn(2, 2, 3, 4, requires_grad=True)
    valid = torch.zeros(2, 2, 3, dtype=torch.bool)
    valid[0, 0, 1] = True  # a lone entry: no candidate shares its joint
    loss = losses.sparse_structure_loss(feats, valid)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(feats.grad).all()


# ---------------------------------------------------------------- Eq. 2
def test_memory_bank_matches_brute_force_with_whole_bank_as_negatives():
    torch.manual_seed(1)
    size, dim, tau = 6, 4, 0.5
    bank = losses.MemoryBank(size, dim, ["rgb", "depth"], num_negatives=size, momentum=0.5, tau=tau).double()
    mem = {m: bank.memory(m).clone() for m in ["rgb", "depth"]}
    feats = {m: torch.randn(3, dim, dtype=torch.float64, requires_grad=True) for m in ["rgb", "depth"]}
    index = torch.tensor([4, 0, 2])
    present = {"rgb": torch.tensor([True, True, True]), "depth": torch.tensor([True, False, True])}
    got = bank(feats, index, present)
    got.backward()  # the update after the loss must not invalidate what backward needs
    terms = []
    for a, b in [("rgb", "depth"), ("depth", "rgb")]:
        for r in range(3):
            if not (present[a][r] and present[b][r]):
                continue
            q = unit(feats[a][r].detach())
            pos = math.exp(float(q @ mem[b][index[r]]) / tau)
            neg = sum(math.exp(float(q @ mem[b][k]) / tau) for k in range(size))
            terms.append(-math.log(pos / (pos + neg)))
    assert abs(got.item() - sum(terms) / len(terms)) < 1e-9


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
    valid = torch.ones(2, 2, 2, dtype=torch.bool)
    valid[1, 1, 0] = False
    assert torch.autograd.gradcheck(lambda f: losses.sparse_structure_loss(f, valid, tau=0.5), (feats,))


def test_finite_under_bf16_autocast():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 50, 8)
    bank = losses.MemoryBank(100, 8, ["rgb", "depth"], num_negatives=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f1, f2 = lin(x), lin(x.flip(1))
        assert f1.dtype == torch.bfloat16
        w = losses.soft_weights(torch.rand(2, 50, 2) * 64)
        loss = (losses.dense_contrastive_loss(f1, f2, w)
                + losses.sparse_structure_loss(f1.view(2, 2, 25, 8), torch.ones(2, 2, 25, dtype=torch.bool))
                + bank({"rgb": f1[:, 0], "depth": f2[:, 0]}, torch.arange(2),
                       {m: torch.ones(2, dtype=torch.bool) for m in ["rgb", "depth"]}))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in lin.parameters())
