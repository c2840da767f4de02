"""HCMoCo's contrastive objectives (Hong et al., CVPR 2022), one function per equation.

    Eq. 2  sample-level, across modalities, against a momentum memory bank ...... MemoryBank
    Eq. 3  dense intra-sample, soft targets, one direction ....................... dense_contrastive_loss
    Eq. 4  the soft targets: weights that decay with pixel distance ............... soft_weights
    Eq. 5  Eq. 3 in both directions of a modality pair ........................... bidirectional_dense_loss
    Eq. 6  sparse structure-aware: joints within samples + across samples ......... sparse_structure_loss
           (= joint_keypoint_loss + cross_sample_joint_loss)
    MMV    the baseline's fine-and-coarse objective, in place of Eq. 2 ............. fine_and_coarse_loss

Each term is the published trainer's SUM of its cross-entropies (Eq. 2: one per ordered modality pair; Eq. 5: one
per direction; Eq. 6: one per image modality within samples plus one across samples), so Eq. 1 with all
lambdas 1 weights them as published.

Every function L2-normalises its features, computes in at least float32 (half-precision inputs from bf16/fp16
autocast are upcast: logits of magnitude 1/tau = 14 lose too much precision in bf16) and uses log-softmax,
never exp followed by log.
Only torch is imported, so the file can be copied into another project on its own.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _full(x):
    """Upcast half-precision tensors to float32; float32 and float64 pass unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_weights(coords, candidates=None):
    """Eq. 4: soft targets for the dense loss from the pixel coordinates of the sampled points.

        w_ij = exp(-||c_i - c_j||) / sum_{k in C(i)} exp(-||c_i - c_k||)    for j in C(i), 0 otherwise

    The paper prints exp(+||c_i - c_j||), which would favour the farthest pixels; the intended weighting, and
    the one the published code computes, decays with distance, so the point itself (distance 0) gets the
    largest weight and neighbours share the rest. Distances are in the units of `coords`.

    coords: [B, N, 2] pixel coordinates; candidates: [B, N, N] bool, C(i) = {j: candidates[b, i, j]} (default:
    every point) -> W: [B, N, N], rows summing to 1 over the candidates.
    """
    d = torch.cdist(_full(coords), _full(coords))  # [B, N, N]
    if candidates is not None:
        d = d.masked_fill(~candidates, float("inf"))
    return torch.softmax(-d, dim=-1)


def soft_cross_entropy(logits, weights, candidates=None):
    """-1/(B N) sum_{b,i} sum_{j in C(i)} w_bij log softmax_{j in C(i)}(logits_bi)   (Eq. 3's sum), for logits,
    weights [B, N, N]; candidates [B, N, N] bool restricts each anchor i's softmax to C(i) (default: all)."""
    log_p = _full(logits)
    if candidates is not None:
        log_p = log_p.masked_fill(~candidates, float("-inf"))
    log_p = log_p.log_softmax(dim=-1)
    if candidates is not None:
        log_p = log_p.masked_fill(~candidates, 0.0)  # 0 * -inf would be nan
    return -(weights * log_p).sum(dim=-1).mean()


def dense_contrastive_loss(f1, f2, weights, tau=0.07, candidates=None):
    """Eq. 3: dense intra-sample contrast with soft targets, from modality 1 (anchors) to modality 2 (candidates).

        L(1->2) = -1/(B N) sum_b sum_i sum_j w_ij log( exp(<f1_i, f2_j>/tau) / sum_k exp(<f1_i, f2_k>/tau) )

    f1, f2: [B, N, C] embeddings of the same N pixels in two pixel-aligned modalities; weights: [B, N, N],
    weights[b, i, j] the target of anchor i over candidate j, rows summing to 1 (soft_weights, or the identity for
    the "hard" InfoNCE ablation); candidates: see soft_cross_entropy.
    """
    f1 = F.normalize(_full(f1), dim=-1)
    f2 = F.normalize(_full(f2), dim=-1)
    logits = f1 @ f2.transpose(1, 2) / tau  # [B, N, N] logits[b, i, j] = <f1_i, f2_j> / tau
    return soft_cross_entropy(logits, weights, candidates)


def bidirectional_dense_loss(f1, f2, weights, tau=0.07, candidates=None):
    """Eq. 5 for one modality pair: Eq. 3 in both directions, L(1->2) + L(2->1), from one similarity matrix.

        S = f1 f2^T / tau                     [B, N, N], S[b, i, j] = <f1_i, f2_j> / tau
        L(1->2) = soft cross-entropy of the rows of S   against weights
        L(2->1) = soft cross-entropy of the rows of S^T against weights

    Both modalities are sampled at the same N points, so weights[b, i, j], the target of anchor i over candidate j,
    serves both directions: a depth anchor i's targets over the RGB candidates come from its own distances to
    them, exactly as an RGB anchor i's do (W = soft_weights(coords) is symmetric only before its rows are
    normalised, so the reverse direction takes W, not W^T). `candidates` must be symmetric for the same reason.
    It is the sum of dense_contrastive_loss(f1, f2, ...) and dense_contrastive_loss(f2, f1, ...) (tested), computed
    by _BidirectionalSoftCrossEntropy, which writes out the forward and backward passes so that the [B, N, N]
    tensors are made three times instead of once per operation: the term is bound by that memory traffic.
    f1, f2: [B, N, C], weights: [B, N, N] (constants: they get no gradient) -> scalar.
    """
    f1 = F.normalize(_full(f1), dim=-1)
    f2 = F.normalize(_full(f2), dim=-1)
    return _BidirectionalSoftCrossEntropy.apply(f1, f2, _full(weights), tau, candidates)


class _BidirectionalSoftCrossEntropy(torch.autograd.Function):
    """Eq. 5's two soft cross-entropies of S = f1 f2^T / tau, for unit f1, f2 [B, N, C]. With r_i = sum_j w_ij
    (1 for soft_weights and the identity) and w_ij = 0 outside anchor i's candidates C(i),

        L = 1/(B N) sum_b [ sum_i r_i lse_{j in C(i)} S_ij + sum_j r_j lse_{i in C(j)} S_ij - sum_ij S_ij (w_ij + w_ji) ]
        dL/dS_ij = (r_i P_ij + r_j Q_ij - w_ij - w_ji) / (B N),   P = softmax of the rows of S, Q = of its columns
        dL/df1 = dL/dS f2 / tau,   dL/df2 = (dL/dS)^T f1 / tau

    The forward pass computes G = r P + r Q - W - W^T in place and keeps only G for the backward pass, which is
    then two matrix products. float32, also under autocast (logits of magnitude 1/tau lose too much in bf16).
    """

    @staticmethod
    def forward(ctx, f1, f2, weights, tau, candidates):
        with torch.autocast(f1.device.type, enabled=False):
            s = torch.bmm(f1, f2.transpose(1, 2)).div_(tau)  # [B, N, N] S
            g = torch.empty_like(s).copy_(weights).add_(weights.transpose(1, 2))  # [B, N, N] W + W^T
            target = torch.vdot(s.flatten(), g.flatten())  # sum_ij S_ij (w_ij + w_ji), before -inf enters S
            r = weights.sum(-1).expand(s.shape[:2])  # [B, N]
            if candidates is not None:
                s.masked_fill_(candidates.logical_not(), float("-inf"))
            m = s.amax(-1, keepdim=True)  # [B, N, 1]
            p = torch.sub(s, m).exp_()  # [B, N, N]
            z = p.sum(-1, keepdim=True)
            lse = (r[:, :, None] * (m + z.log())).sum()  # sum_i r_i lse_j S_ij
            g.neg_().add_(p.div_(z / r[:, :, None]))  # r P - W - W^T
            del p
            m = s.amax(-2, keepdim=True)  # [B, 1, N]
            q = s.sub_(m).exp_()  # [B, N, N], in S's memory: S is not needed any more
            z = q.sum(-2, keepdim=True)
            lse = lse + (r[:, None, :] * (m + z.log())).sum()  # + sum_j r_j lse_i S_ij
            g.add_(q.div_(z / r[:, None, :]))  # G = r P + r Q - W - W^T
            n = s.shape[0] * s.shape[1]
        ctx.save_for_backward(g, f1, f2)
        ctx.scale = 1 / (n * tau)
        return (lse - target) / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        g, f1, f2 = ctx.saved_tensors
        k = grad * ctx.scale
        with torch.autocast(f1.device.type, enabled=False):
            return torch.bmm(g, f2).mul_(k), torch.bmm(g.transpose(1, 2), f1).mul_(k), None, None, None


def joint_keypoint_loss(joints, keypoints, valid, tau=0.07):
    """Eq. 6, intra-sample part: every image joint feature picks its own joint among the keypoint-GCN joint
    features of the same sample. For image modality m, anchors a = (b, j) with valid[b, m, j],
        L_m = mean_a -log( exp(<f_bmj, g_bj>/tau) / sum_{k=1..J} exp(<f_bmj, g_bk>/tau) )
    joints [B, M, J, C] (e.g. RGB and depth pooled at the joints), keypoints [B, J, C] (GCN), valid [B, M, J] bool
    (modality and keypoints present, joint visible) -> sum_m L_m; a modality without anchors adds 0.
    """
    B, M, J, C = joints.shape
    f = F.normalize(_full(joints), dim=-1)
    g = F.normalize(_full(keypoints), dim=-1)
    logits = torch.einsum("bmjc,bkc->bmjk", f, g) / tau  # [B, M, J, J]: anchor joint j, candidate GCN joint k
    nll = -logits.log_softmax(dim=-1).diagonal(dim1=-2, dim2=-1)  # [B, M, J]
    per_modality = (nll * valid).sum(dim=(0, 2)) / valid.sum(dim=(0, 2)).clamp(min=1)  # [M]
    return per_modality.sum()


def cross_sample_joint_loss(joints, valid, tau=0.07):
    """Eq. 6, inter-sample part: joint features of all samples and image modalities; the same joint is positive.

    Entries a = (b, m, j): sample b, image modality m, joint j. For every valid anchor a,
        C(a) = valid entries other than a
        P(a) = entries of C(a) with the same joint j  (the same joint in the other modality and in other people)
        L = mean_{a: |P(a)| > 0}  -1/|P(a)| sum_{p in P(a)} log( exp(s_ap/tau) / sum_{c in C(a)} exp(s_ac/tau) )
    with s the cosine similarity. The published code keeps the anchor itself in its denominator; this follows
    the supervised-contrastive form (Khosla et al., 2020) and leaves it out.

    Each anchor's term splits into lse_a - mean_{p in P(a)} s_ap/tau, lse_a = log sum_{c in C(a)} exp(s_ac/tau). The
    positives' sum needs no [E, E] mask: sum_{p in P(a)} s_ap = <f_a, S_j - f_a> with S_j the sum of joint j's valid
    entries, and |P(a)| = n_j - 1. Only lse needs the [E, E] similarities (_CandidateLogSumExp).

    joints: [B, M, J, C], valid: [B, M, J] bool -> scalar. Invalid entries take no part and get zero gradient.
    """
    B, M, J, C = joints.shape
    f = F.normalize(_full(joints).reshape(B * M * J, C), dim=-1)  # [E, C]
    valid = valid.reshape(-1)  # [E]
    joint = torch.arange(J, device=f.device).repeat(B * M)  # [E]
    members = F.one_hot(joint, J).to(f.dtype) * valid[:, None]  # [E, J]: the valid entries of each joint
    n_pos = (members.sum(0)[joint] - 1) * valid  # [E] |P(a)|
    anchor = n_pos > 0
    if not anchor.any():
        return joints.sum() * 0.0
    positives = (f * ((members.T @ f)[joint] - f)).sum(-1) / tau  # [E] sum_{p in P(a)} s_ap / tau
    nll = _CandidateLogSumExp.apply(f, valid, tau) - positives / n_pos.clamp(min=1)  # [E]
    return nll[anchor].mean()


class _CandidateLogSumExp(torch.autograd.Function):
    """lse_a = log sum_{c in C(a)} exp(<f_a, f_c>/tau) for unit f [E, C], C(a) = the columns where `keep` [E] bool,
    less a itself. With P the softmax of each row over C(a) and g = dL/dlse [E],

        dL/df = (diag(g) P + (diag(g) P)^T) f / tau

    The forward pass turns the similarities into P in place and keeps it alone for the backward pass, which scales
    rows of [E, C] products instead of P: one [E, E] tensor where autograd through masked log-softmaxes made one per
    operation. Every row needs a candidate (the caller returns early when no anchor has a positive, and then every
    row has one). float32, also under autocast.
    """

    @staticmethod
    def forward(ctx, f, keep, tau):
        with torch.autocast(f.device.type, enabled=False):
            p = (f / tau) @ f.T  # [E, E] s_ac / tau
            p.masked_fill_(keep.logical_not()[None, :], float("-inf")).diagonal().fill_(float("-inf"))
            lse = p.logsumexp(dim=-1)  # [E]
            p.sub_(lse[:, None]).exp_()  # P, in place
        ctx.save_for_backward(f, p)
        ctx.tau = tau
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        f, p = ctx.saved_tensors
        with torch.autocast(f.device.type, enabled=False):
            g = (grad / ctx.tau)[:, None]  # [E, 1]
            return g * (p @ f) + p.T @ (g * f), None, None


def sparse_structure_loss(joints, keypoints, valid, tau=0.07):
    """Eq. 6, sparse structure-aware contrast, in the published structure: the intra-sample part (each RGB and each
    depth joint feature against the sample's keypoint-GCN joints, joint_keypoint_loss) plus the inter-sample part
    (RGB and depth joint features across the batch, the same joint positive, cross_sample_joint_loss):

        L_sparse = L_intra(RGB) + L_intra(depth) + L_inter

    joints [B, M, J, C] image joint features, keypoints [B, J, C] GCN joint features, valid [B, M, J] bool (image
    modality present, 2D joint visible; so the sample's keypoints, and its GCN features, exist) -> scalar.
    """
    return joint_keypoint_loss(joints, keypoints, valid, tau) + cross_sample_joint_loss(joints, valid, tau)


def batch_contrastive_loss(feats, present, tau=0.07):
    """Eq. 2 with the other samples of the batch as negatives instead of a memory bank (CMC's softmax form, as
    CLIP): for an ordered pair of distinct modalities (a, b) and a row i with both present,
        L_i(a->b) = -log( exp(<f_a_i, f_b_i>/tau) / sum_{k: b present} exp(<f_a_i, f_b_k>/tau) )
    and, as MemoryBank, L = sum over ordered pairs of each pair's mean over its rows. Both sides get gradients.
    feats {modality: [B, dim]}, present {modality: [B] bool} -> scalar."""
    f = {m: F.normalize(_full(x), dim=-1) for m, x in feats.items()}
    loss = 0.0
    for a in f:
        for b in f:
            if a == b:
                continue
            logits = (f[a] @ f[b].T / tau).masked_fill(~present[b][None, :], float("-inf"))  # [B, B]
            rows = present[a] & present[b]
            nll = -logits.log_softmax(dim=-1).diagonal().masked_fill(~rows, 0.0)  # [B]
            loss = loss + nll.sum() / rows.sum().clamp(min=1)
    return loss


def fine_and_coarse_loss(fine, coarse, present, tau=0.07):
    """MMV's fine-and-coarse objective (Alayrac et al., NeurIPS 2020, Sec. 3.1: "FAC"), the baseline the paper
    compares against, with RGB and depth as the fine modalities (MMV's video and audio: pixel-aligned, compared in
    a fine space S_f) and keypoints as the coarse one (MMV's text: compared with RGB in a coarse space S_c, which
    RGB reaches through a projection of its fine embedding):

        L_MMV = NCE(z_rgb^f, z_depth^f) + NCE(z_rgb^c, z_kp^c),    z_rgb^c = g_{f->c}(z_rgb^f)

        NCE(a, b) = sum over the directions (a->b, b->a) of mean_{i: a, b present}
                    -log( exp(<a_i, b_i>/tau) / sum_{k: b present} exp(<a_i, b_k>/tau) )

    the in-batch InfoNCE of batch_contrastive_loss. MMV's MIL-NCE over several narrations of a clip is this NCE
    when, as here, a sample has one keypoint set.
    fine {'rgb', 'depth': [B, dim]}, coarse {'rgb', 'keypoints': [B, dim]}, present {modality: [B] bool} -> scalar.
    """
    return (batch_contrastive_loss({m: fine[m] for m in ("rgb", "depth")}, present, tau)
            + batch_contrastive_loss({m: coarse[m] for m in ("rgb", "keypoints")}, present, tau))


class MemoryBank(nn.Module):
    """Eq. 2: sample-level contrast across modalities against a momentum memory bank.

    One L2-normalised table per modality, bank_m: [size, dim], indexed by the dataset-wide sample id. For an
    ordered pair of distinct modalities (a, b) and a sample i with both present,
        L_i(a->b) = -log( exp(<f_a_i, v_b_i>/tau) / (exp(<f_a_i, v_b_i>/tau) + sum_{k in K} exp(<f_a_i, v_b_k>/tau)) )
    with v_b_i = bank_b[i] the positive and K = num_negatives ids drawn uniformly from the bank. As in the
    published trainer, the loss is the SUM over ordered pairs of each pair's mean over its rows,
        L_global = sum_{a != b} mean_{i: a, b present} L_i(a->b)        (six pairs for RGB, depth, keypoints),
    so its chance level is (number of pairs) x ln(K + 1). Then, without gradient, for every present row
        bank_m[i] <- normalize(momentum * bank_m[i] + (1 - momentum) * f_m_i).

    Negatives are drawn once per call and target modality and shared by every row of the batch, so the
    similarities are one [B, D] x [D, K] matrix product instead of a [B, K, D] gather. The estimator keeps its
    meaning: each row still contrasts its positive against K uniform draws from the same noise distribution
    (the bank); rows are only no longer independent of one another. A draw may hit the positive's own id, which
    happens with probability K / size, as it also does with per-row draws in the published code.
    When num_negatives >= size the whole bank serves as the negative set.

    Under DDP the caller passes features and indices gathered from every rank, so every rank updates its copy of
    the bank identically.
    """

    def __init__(self, size, dim, modalities, num_negatives=16384, momentum=0.5, tau=0.07):
        super().__init__()
        self.size, self.dim, self.modalities = size, dim, list(modalities)
        self.num_negatives, self.momentum, self.tau = num_negatives, momentum, tau
        for m in self.modalities:
            self.register_buffer(f"bank_{m}", F.normalize(torch.randn(size, dim), dim=-1))

    def memory(self, name):
        """The [size, dim] table of modality `name`."""
        return getattr(self, f"bank_{name}")

    def forward(self, feats, index, present):
        """feats {modality: [B, dim]}, index [B] long, present {modality: [B] bool} -> scalar loss."""
        dtype = self.memory(self.modalities[0]).dtype  # float32 unless the bank was cast
        feats = {m: F.normalize(f.to(dtype), dim=-1) for m, f in feats.items()}
        loss = 0.0
        for b in self.modalities:
            bank = self.memory(b)
            if self.num_negatives >= self.size:
                negatives = bank.clone()  # [K, D]; a copy, because update() below writes into the bank
            else:
                negatives = bank[torch.randint(self.size, (self.num_negatives,), device=bank.device)]  # [K, D]
            positive = bank[index]  # [B, D]
            for a in self.modalities:
                if a == b:
                    continue
                rows = (present[a] & present[b]).to(dtype)  # [B]
                l_pos = (feats[a] * positive).sum(-1, keepdim=True)  # [B, 1]
                l_neg = feats[a] @ negatives.T  # [B, K]
                logits = torch.cat([l_pos, l_neg], dim=1) / self.tau  # [B, 1 + K], target 0
                nll = -logits.log_softmax(dim=-1)[:, 0]  # [B]
                loss = loss + (nll * rows).sum() / rows.sum().clamp(min=1)
        self.update(feats, index, present)
        return loss

    @torch.no_grad()
    def update(self, feats, index, present):
        """bank_m[i] <- normalize(momentum * bank_m[i] + (1 - momentum) * f_m_i) for every present row i."""
        for m in self.modalities:
            rows = present[m]
            bank, i = self.memory(m), index[rows]
            bank[i] = F.normalize(self.momentum * bank[i] + (1 - self.momentum) * feats[m][rows].detach(), dim=-1)
