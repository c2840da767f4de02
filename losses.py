"""HCMoCo's contrastive objectives (Hong et al., CVPR 2022), one function per equation.

    Eq. 2  sample-level, across modalities, against a momentum memory bank ...... MemoryBank
    Eq. 3  dense intra-sample, soft targets ...................................... dense_contrastive_loss
    Eq. 4  the soft targets: weights that decay with pixel distance ............... soft_weights
    Eq. 5  Eq. 3 summed over both directions and modality pairs ................... the caller (hcmoco.py)
    Eq. 6  sparse structure-aware, joints within and across samples ............... sparse_structure_loss

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


def soft_weights(coords):
    """Eq. 4: soft targets for the dense loss from the pixel coordinates of the sampled points.

        w_ij = exp(-||c_i - c_j||) / sum_k exp(-||c_i - c_k||)

    The paper prints exp(+||c_i - c_j||), which would favour the farthest pixels; the intended weighting, and
    the one the published code computes, decays with distance, so the point itself (distance 0) gets the
    largest weight and neighbours share the rest. Distances are in the units of `coords`.

    coords: [B, N, 2] pixel coordinates -> W: [B, N, N], rows summing to 1.
    """
    d = torch.cdist(_full(coords), _full(coords))  # [B, N, N]
    return torch.softmax(-d, dim=-1)


def dense_contrastive_loss(f1, f2, weights, tau=0.07):
    """Eq. 3: dense intra-sample contrast with soft targets, from modality 1 to modality 2.

        L(1->2) = -1/(B N) sum_b sum_i sum_j w_ij log( exp(<f1_i, f2_j>/tau) / sum_k exp(<f1_i, f2_k>/tau) )

    f1, f2: [B, N, C] embeddings of the same N pixels in two pixel-aligned modalities; weights: [B, N, N] with
    rows summing to 1 (soft_weights, or the identity for the "hard" InfoNCE ablation).

    Eq. 5 adds the other direction. Both come from ONE similarity matrix S = f1 f2^T: L(1->2) normalises the rows
    of S, L(2->1) its columns, so the reverse direction is `dense_contrastive_loss(f2, f1, weights^T)`, or, sharing
    S, `dense_contrastive_loss_from_logits(S.transpose(1, 2), weights^T)`.
    """
    f1 = F.normalize(_full(f1), dim=-1)
    f2 = F.normalize(_full(f2), dim=-1)
    logits = f1 @ f2.transpose(1, 2) / tau  # [B, N, N] logits[b, i, j] = <f1_i, f2_j> / tau
    return soft_cross_entropy(logits, weights)


def soft_cross_entropy(logits, weights):
    """-1/(B N) sum_{b,i,j} w_bij log softmax_j(logits_bi)   for logits, weights [B, N, N] (Eq. 3's sum)."""
    return -(weights * _full(logits).log_softmax(dim=-1)).sum(dim=-1).mean()


def sparse_structure_loss(feats, valid, tau=0.07, inter_sample=True):
    """Eq. 6: sparse structure-aware contrast between joint embeddings.

    Entries a = (b, m, j): sample b, sparse representation m (e.g. RGB pooled at the joints, depth pooled at the
    joints, keypoint GCN), joint j. For every valid anchor a,
        C(a) = valid entries other than a            (restricted to sample b when inter_sample=False)
        P(a) = entries of C(a) with the same joint j  (the same joint in other modalities / other people)
        L = mean_{a: |P(a)| > 0}  -1/|P(a)| sum_{p in P(a)} log( exp(s_ap/tau) / sum_{c in C(a)} exp(s_ac/tau) )
    with s the cosine similarity. The published code keeps the anchor itself in its denominator; this follows
    the supervised-contrastive form (Khosla et al., 2020) and leaves it out.

    feats: [B, M, J, C], valid: [B, M, J] bool -> scalar. Invalid entries take no part and get zero gradient.
    """
    B, M, J, C = feats.shape
    f = F.normalize(_full(feats).reshape(B * M * J, C), dim=-1)  # [E, C]
    valid = valid.reshape(-1)  # [E]
    sample = torch.arange(B, device=f.device).repeat_interleave(M * J)  # [E]
    joint = torch.arange(J, device=f.device).repeat(B * M)  # [E]

    candidate = valid[:, None] & valid[None, :]  # [E, E]
    candidate &= ~torch.eye(len(f), dtype=torch.bool, device=f.device)
    if not inter_sample:
        candidate &= sample[:, None] == sample[None, :]
    positive = candidate & (joint[:, None] == joint[None, :])  # [E, E]

    logits = (f @ f.T / tau).masked_fill(~candidate, float("-inf"))  # [E, E]
    log_prob = logits.log_softmax(dim=-1).masked_fill(~positive, 0.0)  # -inf -> 0 keeps gradients finite
    n_pos = positive.sum(dim=-1)  # [E]
    anchor = n_pos > 0
    if not anchor.any():
        return feats.sum() * 0.0
    return -(log_prob.sum(dim=-1)[anchor] / n_pos[anchor]).mean()


class MemoryBank(nn.Module):
    """Eq. 2: sample-level contrast across modalities against a momentum memory bank.

    One L2-normalised table per modality, bank_m: [size, dim], indexed by the dataset-wide sample id. For an
    ordered pair of distinct modalities (a, b) and a sample i with both present,
        L_i(a->b) = -log( exp(<f_a_i, v_b_i>/tau) / (exp(<f_a_i, v_b_i>/tau) + sum_{k in K} exp(<f_a_i, v_b_k>/tau)) )
    with v_b_i = bank_b[i] the positive and K = num_negatives ids drawn uniformly from the bank. The loss is the
    mean over pairs and rows. Then, without gradient, for every present row
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
        losses = []
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
                rows = present[a] & present[b]  # [B]
                l_pos = (feats[a] * positive).sum(-1, keepdim=True)  # [B, 1]
                l_neg = feats[a] @ negatives.T  # [B, K]
                logits = torch.cat([l_pos, l_neg], dim=1) / self.tau  # [B, 1 + K], target 0
                nll = -logits.log_softmax(dim=-1)[:, 0]  # [B]
                losses.append(nll[rows])
        self.update(feats, index, present)
        loss = torch.cat(losses)
        return loss.mean() if len(loss) else sum(f.sum() for f in feats.values()) * 0.0

    @torch.no_grad()
    def update(self, feats, index, present):
        """bank_m[i] <- normalize(momentum * bank_m[i] + (1 - momentum) * f_m_i) for every present row i."""
        for m in self.modalities:
            rows = present[m]
            bank, i = self.memory(m), index[rows]
            bank[i] = F.normalize(self.momentum * bank[i] + (1 - self.momentum) * feats[m][rows].detach(), dim=-1)
