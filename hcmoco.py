"""The HCMoCo model: encoders + mappers, three embedding levels, and Eq. 1 with the ablation switches.

    E_rgb, E_depth: HRNet (or PointNet++ for depth: pointnet_features)   E_kp: SemGCN on the 2D keypoints
    global  f^g = normalize(Linear(mean-pool(merged map)))   (keypoints: mean over visible joints)   -> Eq. 2
    dense   f^d = normalize(Conv1x1(merged map))   [B, D, H/4, W/4], RGB and depth                   -> Eq. 3-5
    sparse  f^s = f^d sampled at the 2D joints (RGB, depth);  normalize(GCN joint features)          -> Eq. 6

    L = lambda_g L_g + lambda_d L_d + lambda_s L_s                                                    (Eq. 1)

Each term is the published trainer's sum of its cross-entropies (L_g: the six ordered modality pairs; L_d: both
directions; L_s: RGB and depth joints against the keypoint GCN's, plus across samples), so lambdas of 1, the
default, weight them as published: effectively 6 : 2 : 3 per cross-entropy.

Missing modalities are masked everywhere: an encoder only sees the rows where its modality is present (so
zero-filled inputs never touch BatchNorm statistics), Eq. 2 skips pairs with an absent side, the dense term
uses the rows with both RGB and depth, and sparse entries of absent modalities or invisible joints are invalid.
The depth encoder reads depth through the person mask `batch['mask']` (depth_input), as the published loader
reads NTU RGB+D's masked depth maps.
"""
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import losses
from encoders import (HRNet, PointNet2, SemGCN, back_project, depth_to_points, gather, load_checkpoint, merge_maps,
                      three_nn_interpolate)
from schema import JOINT_INDEX, MODALITIES, PARENTS

# The rows of the paper's Table 3, by the name `train.py --targets` selects them with: which levels Eq. 1 adds to
# the sample-level term (always on).
TARGETS = {"global": dict(dense="none", sparse=False),
           "global+hard": dict(dense="hard", sparse=False),
           "global+soft": dict(dense="soft", sparse=False),
           "global+soft+sparse": dict(dense="soft", sparse=True)}
PELVIS = JOINT_INDEX["pelvis"]  # the root of the keypoint normalisation
# The keypoint GCN's graph as published (networks/SGCN/skeleton_meta.py): the MPII skeleton with both shoulders
# hanging from the upper neck instead of the thorax.
PUBLISHED_PARENTS = [JOINT_INDEX["upper_neck"] if j in (JOINT_INDEX["r_shoulder"], JOINT_INDEX["l_shoulder"]) else p
                     for j, p in enumerate(PARENTS)]


# what a checkpoint written before these options existed trained with: its config reads so wherever it is rebuilt
# (HCMoCoConfig.from_dict) or compared for reuse (harness.load_stage)
UNRECORDED = {"soft_width": 1.0}  # Eq. 4 in whole cells


@dataclass
class HCMoCoConfig:
    """The defaults are the published model's. The comment ending a field's line is its help as an option of
    train.py (train.MODEL_OPTIONS)."""
    # 'small' is HRNet.small
    hrnet: Literal["small", "w18", "w32", "w48"] = "small"  # the HRNets: the small CPU one, or a published width
    width: int = 16  # of the small HRNet
    embed_dim: int = 128  # also the keypoint GCN's width: its joint features are the sparse embeddings, as published
    gcn_layers: int = 4
    # 'masked': shoulders from the thorax, invisible joints send no messages (SemGCN's visibility mask);
    # 'published': PUBLISHED_PARENTS, and every joint sends, an invisible one from its input of 0
    keypoint_graph: Literal["masked", "published"] = "masked"  # the keypoint GCN's (HCMoCoConfig.keypoint_graph)
    # PointNet2.small() with the small HRNet, else PointNet2()
    depth_encoder: Literal["hrnet", "pointnet"] = "hrnet"  # of depth: an HRNet, or PointNet++ on the depth's points
    dense: Literal["none", "hard", "soft"] = "soft"  # Eq. 3-5's targets: none, identity (InfoNCE) or Eq. 4's
    # 1 as published, at 320 px an 80 x 80 grid; at 64 px a cell covers 5 times as much of the person
    soft_width: float = 1.0  # Eq. 4's unit of distance, in cells of the dense grid
    sparse: bool = True  # Eq. 6
    # Eq. 1's weights, on terms that are sums as published (module docstring)
    lambda_global: float = 1.0  # Eq. 1's weight of the sample-level term
    lambda_dense: float = 1.0  # Eq. 1's weight of the dense term
    lambda_sparse: float = 1.0  # Eq. 1's weight of the sparse term
    tau: float = 0.07  # the temperature of the contrastive terms
    # std 0.001 (replaced by ImageNet weights) or He
    init: Literal["official", "he"] = "official"  # the HRNets' init when there is no --backbone-init
    bn_momentum: float = 0.01  # of the HRNets' BatchNorm running statistics (the eval-mode features)
    # the sample-level term: Eq. 2 against the memory bank (as published) or in-batch; or 'mmv', the MMV baseline's
    # fine-and-coarse objective (losses.fine_and_coarse_loss) in its place
    global_loss: Literal["bank", "batch", "mmv"] = "bank"  # Eq. 2's negatives: the bank or the batch; or MMV's NCE
    num_negatives: int = 16384  # drawn from the memory bank
    momentum: float = 0.5  # of the memory bank
    bank_size: int = 1024  # the number of pre-training samples (one bank entry each)
    # drawn with replacement from the person (mask, valid depth): person_cells, draw_cells
    dense_points: int = 400  # per image
    pointnet_points: int = 4096  # drawn per image, with replacement, from the person's depth pixels, as published

    def __post_init__(self):
        for f in fields(self):
            allowed = getattr(f.type, "__args__", None)  # the values of a Literal field
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name} must be one of {allowed}, got {getattr(self, f.name)!r}")

    @classmethod
    def from_dict(cls, values):
        """The config saved in a checkpoint; one written before the switches were typed names its Table 3 row in
        a 'targets' string, and one written before bn_momentum or soft_width was an option has none."""
        values = {**UNRECORDED, **values}
        if "targets" in values:
            values.update(TARGETS[values.pop("targets")])
        values.setdefault("bn_momentum", 0.1)  # what the HRNets trained with before it was an option
        return cls(**values)


def build_hrnet(cfg, in_channels=3):
    if cfg.hrnet == "small":
        return HRNet.small(in_channels, cfg.width, init=cfg.init, bn_momentum=cfg.bn_momentum)
    return HRNet(int(cfg.hrnet[1:]), in_channels, init=cfg.init, bn_momentum=cfg.bn_momentum)


def hrnet_prefixes(modality):
    """Where the project's checkpoints hold the HRNet of `modality` (HRNet.load_state's prefixes): a train.py stage
    file under 'encoders.<modality>.', a fine-tuned cross-/missing-modal model under 'hcmoco.encoders.<modality>.',
    a fine-tuned backbone under 'backbone.'."""
    return f"hcmoco.encoders.{modality}.", f"encoders.{modality}.", "backbone."


def depth_input(depth, person):
    """Depth in metres -> the depth HRNet's input, as the published loader makes it: the person's depth minus its
    mean over the person's valid pixels, 0 at holes and everywhere off the person, repeated to 3 channels (supp.
    1.4). Centring on the person (not on the room behind it) removes the camera distance, which says nothing
    about the body, so the input does not change when the person moves along the optical axis.
    depth [B, 1, H, W] metres, person [B, 1, H, W] bool -> [B, 3, H, W]."""
    on = person & (depth > 0)  # [B, 1, H, W]
    centre = person_depth(depth, person).view(-1, 1, 1, 1)
    return torch.where(on, depth - centre, torch.zeros_like(depth)).expand(-1, 3, -1, -1)


def person_depth(depth, person):
    """Mean depth [B] of the person's valid pixels (0 where there are none). depth, person: [B, 1, H, W]."""
    on = person & (depth > 0)
    return (depth * on).sum(dim=(1, 2, 3)) / on.sum(dim=(1, 2, 3)).clamp(min=1)


def normalized_keypoints(keypoints, visible):
    """The keypoint GCN's input, after the published `normalize_joints_myway`: joints relative to the pelvis (MPII
    joint 6; the mean of the visible joints when the pelvis is not visible), divided by the largest absolute
    coordinate of a visible joint, so the input is invariant to a shift and a uniform scale of the image and
    carries no absolute position in the crop. Invisible joints are 0 and take no part. The published function
    takes the largest coordinate over all 16 joints, out-of-crop and unannotated ones included (MPII stores the
    latter at (0, 0), far from the pelvis), and roots at the pelvis even when it is not annotated; invisible joints
    carry no coordinates here (the readers zero them), so the scale comes from the visible ones.
    keypoints [B, J, 2] pixels, visible [B, J] bool -> [B, J, 2] in [-1, 1]."""
    vis = visible[..., None].to(keypoints.dtype)  # [B, J, 1]
    mean = (keypoints * vis).sum(1) / vis.sum(1).clamp(min=1)  # [B, 2]
    root = torch.where(visible[:, PELVIS, None], keypoints[:, PELVIS], mean)  # [B, 2]
    offsets = (keypoints - root[:, None]) * vis  # [B, J, 2]
    scale = offsets.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-6)  # [B, 1, 1]
    return offsets / scale


def sample_at(maps, keypoints, image_size):
    """Bilinear samples of a map at pixel positions of the image it came from (pixel centres at integers).
    maps [B, C, h, w], keypoints [B, J, 2] -> [B, J, C]."""
    H, W = image_size
    grid = (keypoints + 0.5) / keypoints.new_tensor([W, H]) * 2 - 1  # [B, J, 2] for align_corners=False
    return F.grid_sample(maps, grid[:, :, None], align_corners=False)[..., 0].transpose(1, 2)


def person_cells(mask, depth, size):
    """The cells of the (h, w) grid that hold some of the person's valid depth, nearest-downsampled: the cells the
    dense term and the monitors draw from. mask [B, H, W] bool, depth [B, 1, H, W] -> [B, h*w] bool."""
    person = (mask[:, None] & (depth > 0)).float()  # [B, 1, H, W]
    return F.interpolate(person, size=size, mode="nearest").flatten(1) > 0


def draw_cells(where, n, generator=None):
    """n cells per row drawn uniformly with replacement among `where` [B, h*w] -> (keep [B] bool: the rows that
    have a cell, idx [b, n] flat cell indices of those rows)."""
    keep = where.any(1)
    return keep, torch.multinomial(where[keep].float(), n, replacement=True, generator=generator)


def at_cells(maps, idx):
    """The maps' vectors at flat cell indices: maps [b, C, h, w], idx [b, N] -> [b, C, N]."""
    return torch.gather(maps.flatten(2), 2, idx[:, None].expand(-1, maps.shape[1], -1))


def take_rows(x, rows):
    """x[rows] for sorted distinct row indices (nonzero()'s); x itself when rows is None or holds all of its rows,
    which spares a copy of x in the forward pass and a scatter of its gradient in the backward one."""
    return x if rows is None or len(rows) == len(x) else x[rows]


def scatter_rows(x, rows, n):
    """x [b, ...] computed on the batch's sorted distinct `rows` -> [n, ...] with zeros in the other rows (x itself
    when they are all n)."""
    return x if len(rows) == n else x.new_zeros(n, *x.shape[1:]).index_copy(0, rows, x)


class HCMoCo(nn.Module):
    def __init__(self, cfg: HCMoCoConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        rgb = build_hrnet(cfg)
        if cfg.depth_encoder == "hrnet":
            depth = build_hrnet(cfg)
            depth_channels = sum(depth.out_channels)
            depth_mapper = nn.Conv2d(depth_channels, D, 1)
        else:
            depth = PointNet2.small() if cfg.hrnet == "small" else PointNet2()
            depth_channels = depth.out_channels
            # per point, as published (pt_utils.Conv1d with BatchNorm): [b, C, n] -> [b, D, n]
            depth_mapper = nn.Sequential(nn.Conv1d(depth_channels, D, 1, bias=False), nn.BatchNorm1d(D), nn.ReLU())
        keypoints = SemGCN(D, cfg.gcn_layers, parents=PARENTS if cfg.keypoint_graph == "masked" else PUBLISHED_PARENTS)
        self.encoders = nn.ModuleDict(dict(rgb=rgb, depth=depth, keypoints=keypoints))
        C = {"rgb": sum(rgb.out_channels), "depth": depth_channels}
        self.global_mappers = nn.ModuleDict({m: nn.Linear(c, D) for m, c in
                                             (("rgb", C["rgb"]), ("depth", C["depth"]), ("keypoints", D))})
        self.dense_mappers = nn.ModuleDict(dict(rgb=nn.Conv2d(C["rgb"], D, 1), depth=depth_mapper))
        if cfg.global_loss == "bank":
            self.bank = losses.MemoryBank(cfg.bank_size, D, MODALITIES, cfg.num_negatives, cfg.momentum, cfg.tau)
        if cfg.global_loss == "mmv":
            self.fine_to_coarse = nn.Linear(D, D)  # MMV's g_{va->vat}: RGB's global embedding into the coarse space

    # ------------------------------------------------------------------------------------------------ features
    def features(self, batch, modality, rows=None, dense=True):
        """The encoder's pooled features [b, C] (-> f^g) and dense map [b, D, H/4, W/4] before normalisation
        (-> f^d; None unless `dense`) of 'rgb' or 'depth', for the batch's sorted distinct `rows` (default: all).
        HRNet: the mean and the 1x1 conv of the merged multi-resolution map; depth goes through depth_input with the
        person mask `batch['mask']`. The PointNet++ variant: pointnet_features, with `batch['intrinsics']`."""
        if modality == "rgb":
            maps = merge_maps(self.encoders["rgb"](take_rows(batch["rgb"], rows)))  # [b, C, h, w]
            return maps.mean(dim=(2, 3)), self.dense_mappers["rgb"](maps) if dense else None
        if "mask" not in batch:
            raise KeyError("the depth encoder needs the person mask: batch['mask'] [B, H, W] bool")
        depth, person = take_rows(batch["depth"], rows), take_rows(batch["mask"], rows)[:, None]
        if self.cfg.depth_encoder == "pointnet":
            pooled, mapped = self.pointnet_features(depth, person, take_rows(batch["intrinsics"], rows))
            return pooled, mapped if dense else None
        maps = merge_maps(self.encoders["depth"](depth_input(depth, person)))
        return maps.mean(dim=(2, 3)), self.dense_mappers["depth"](maps) if dense else None

    def pointnet_features(self, depth, person, intrinsics):
        """The PointNet++ variant as published (CMC3HRNetSGCNPN2SingleHead): PointNet++ on `pointnet_points` points
        drawn with replacement from the person's valid depth pixels, back-projected with the intrinsics and centred
        on their mean. Pooled: the mean of the point features. Dense: the per-point Conv1d-BN-ReLU mapper, carried
        to the pixels of the 1/4 grid (those nearest-neighbour downsampling keeps) by inverse-distance weighting of
        the 3 nearest drawn points (three_nn_interpolate); a pixel off the person or in a hole stands at the
        person's mean depth, as the published zero of the centred depth map does.
        depth, person [b, 1, H, W], intrinsics [b, 3, 3] -> [b, C], [b, D, H/4, W/4]."""
        B, _, H, W = depth.shape
        h, w = H // 4, W // 4
        points, valid = depth_to_points(depth, intrinsics)  # [B, HW, 3], [B, HW]
        valid = valid & person.flatten(1)
        # a row without a valid person pixel draws from all its pixels, and its points stay invalid
        weights = torch.where(valid.any(1, keepdim=True), valid.float(), torch.ones_like(valid, dtype=torch.float))
        pick = torch.multinomial(weights, self.cfg.pointnet_points, replacement=True)  # [B, n]
        pts, ok = gather(points, pick), torch.gather(valid, 1, pick)  # [B, n, 3], [B, n]
        centre = (pts * ok[..., None]).sum(1, keepdim=True) / ok.sum(1).clamp(min=1)[:, None, None]  # [B, 1, 3]
        feats = self.encoders["depth"](pts - centre, valid=ok)  # [B, C, n]
        on = person & (depth > 0)
        z = torch.where(on, depth, person_depth(depth, person).view(-1, 1, 1, 1))  # [B, 1, H, W]
        rows, cols = torch.arange(h, device=depth.device) * H // h, torch.arange(w, device=depth.device) * W // w
        v, u = torch.meshgrid(rows.to(depth.dtype), cols.to(depth.dtype), indexing="ij")  # [h, w]
        grid = back_project(u.reshape(1, -1), v.reshape(1, -1), z[:, 0][:, rows][:, :, cols].reshape(B, -1),
                            intrinsics) - centre  # [B, h*w, 3]
        mapped = self.dense_mappers["depth"](feats).transpose(1, 2)  # [B, n, D]
        dense = three_nn_interpolate(grid, pts - centre, mapped)  # [B, h*w, D]
        return feats.mean(dim=2), dense.transpose(1, 2).reshape(B, -1, h, w)

    def dense_embed(self, batch, modality):
        """L2-normalised dense embeddings f^d [B, D, H/4, W/4] of the batch's 'rgb' or 'depth', every row."""
        return F.normalize(self.features(batch, modality)[1], dim=1)

    def embed(self, batch, dense=True):
        """Global [B, D], dense [B, D, h, w] and sparse [B, J, D] embeddings of every present modality, each
        computed on its present rows only and scattered back to the batch (zeros elsewhere); the global ones alone
        unless `dense` (the dense and sparse embeddings come from the dense maps)."""
        present = batch["present"]
        size = batch["rgb"].shape[-2:]
        B = len(batch["index"])
        out = {"global": {}, "dense": {}, "sparse": {}}
        for m in ("rgb", "depth"):
            rows = present[m].nonzero().flatten()
            if len(rows) == 0:
                continue
            pooled, maps = self.features(batch, m, rows, dense)  # [b, C], [b, D, h, w]
            out["global"][m] = scatter_rows(F.normalize(self.global_mappers[m](pooled), dim=-1), rows, B)  # [B, D]
            if dense:
                d = F.normalize(maps, dim=1)
                out["dense"][m] = scatter_rows(d, rows, B)  # [B, D, h, w]
                out["sparse"][m] = scatter_rows(sample_at(d, take_rows(batch["keypoints"], rows), size), rows, B)
        rows = present["keypoints"].nonzero().flatten()
        if len(rows):
            vis = take_rows(batch["keypoints_visible"], rows)  # [b, J]
            mask = vis if self.cfg.keypoint_graph == "masked" else None
            keypoints = normalized_keypoints(take_rows(batch["keypoints"], rows), vis)  # [b, J, 2]
            h = self.encoders["keypoints"](keypoints, mask)  # [b, J, H]
            pooled = (h * vis[..., None]).sum(1) / vis.sum(1, keepdim=True).clamp(min=1)
            g = F.normalize(self.global_mappers["keypoints"](pooled), dim=-1)
            out["global"]["keypoints"] = scatter_rows(g, rows, B)
            if dense:
                out["sparse"]["keypoints"] = scatter_rows(F.normalize(h, dim=-1), rows, B)
        return out

    # ----------------------------------------------------------------------------------------------- objective
    def forward(self, batch, gather=None):
        """Eq. 1 on a batch dict -> (loss, terms). terms: detached scalars 'loss', 'global' and, as cfg.dense and
        cfg.sparse ask, 'dense' and 'sparse'; a term whose modalities are absent from the batch is 0.
        `gather(tensor)`, under DDP, concatenates a tensor over ranks (with gradients to the owner): Eq. 2 then
        runs on the global batch so that every rank updates its memory bank identically."""
        cfg = self.cfg
        emb = self.embed(batch, dense=cfg.dense != "none" or cfg.sparse)
        present, index = batch["present"], batch["index"]
        absent = batch["rgb"].new_zeros(len(index), cfg.embed_dim)
        feats = {m: emb["global"].get(m, absent) for m in MODALITIES}
        if gather is not None:
            feats = {m: gather(f) for m, f in feats.items()}
            present, index = {m: gather(p) for m, p in present.items()}, gather(index)
        if cfg.global_loss == "bank":
            terms = {"global": self.bank(feats, index, present)}
        elif cfg.global_loss == "batch":
            terms = {"global": losses.batch_contrastive_loss(feats, present, cfg.tau)}
        else:  # the global embeddings of RGB and depth are MMV's fine space, those of the keypoints its coarse one
            coarse = {"rgb": F.normalize(self.fine_to_coarse(feats["rgb"]), dim=-1), "keypoints": feats["keypoints"]}
            terms = {"global": losses.fine_and_coarse_loss(feats, coarse, present, cfg.tau)}
        if cfg.dense != "none":
            terms["dense"] = self.dense_term(emb["dense"], batch)
        if cfg.sparse:
            terms["sparse"] = self.sparse_term(emb["sparse"], batch)
        weights = {"global": cfg.lambda_global, "dense": cfg.lambda_dense, "sparse": cfg.lambda_sparse}
        loss = sum(weights[k] * v for k, v in terms.items())
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def dense_points(self, batch, rows, size):
        """The dense term's sample: for each of the batch's `rows`, N = dense_points cells of the (h, w) grid drawn
        uniformly with replacement from the person (mask and valid depth, nearest-downsampled), as published; rows
        without a person cell are dropped. -> (rows [b], idx [b, N] flat cell indices)."""
        keep, idx = draw_cells(person_cells(batch["mask"][rows], batch["depth"][rows], size), self.cfg.dense_points)
        return rows[keep], idx

    def dense_term(self, dense, batch):
        """Eq. 5 for the RGB-depth pair, bidirectional_dense_loss over the rows with both modalities, at the N
        points of dense_points: N, and with it the term's chance level (about ln N), is the same in every batch.
        A cell drawn more than once is one candidate: each anchor's other copies of its own cell leave its softmax
        (they would be negatives identical to its positive), so the identity weights of the "hard" row give an
        exact InfoNCE and the soft weights spread over distinct cells. Soft targets: soft_weights over the cells'
        grid coordinates in units of soft_width cells; hard: the identity."""
        none = batch["rgb"].new_zeros(())
        if "rgb" not in dense or "depth" not in dense:
            return none
        rows = (batch["present"]["rgb"] & batch["present"]["depth"]).nonzero().flatten()
        if len(rows) == 0:
            return none
        h, w = dense["rgb"].shape[-2:]
        rows, idx = self.dense_points(batch, rows, (h, w))  # [b], [b, N]
        if len(rows) == 0:
            return none
        f1, f2 = (at_cells(take_rows(dense[m], rows), idx).transpose(1, 2) for m in ("rgb", "depth"))  # [b, N, D]
        n = idx.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=idx.device)
        candidates = (idx[:, :, None] != idx[:, None, :]) | eye  # [b, N, N]
        if self.cfg.dense == "hard":
            W = eye.expand(len(rows), n, n).to(f1.dtype)
        else:
            coords = torch.stack([idx % w, idx // w], dim=-1) / self.cfg.soft_width  # [b, N, 2] (x, y)
            W = losses.soft_weights(coords, candidates)
        return losses.bidirectional_dense_loss(f1, f2, W, self.cfg.tau, candidates)

    def sparse_term(self, sparse, batch):
        """Eq. 6: the RGB and depth dense embeddings sampled at the 2D joints, against the keypoint GCN's joint
        embeddings within each sample and against each other across the batch. An image joint is valid when its
        modality and the keypoints are present and the joint is visible."""
        image = [m for m in ("rgb", "depth") if m in sparse]
        if not image or "keypoints" not in sparse:
            return batch["rgb"].new_zeros(())
        joints = torch.stack([sparse[m] for m in image], 1)  # [B, M, J, D]
        known = batch["present"]["keypoints"][:, None] & batch["keypoints_visible"]  # [B, J]
        valid = torch.stack([batch["present"][m][:, None] & known for m in image], 1)  # [B, M, J]
        return losses.sparse_structure_loss(joints, sparse["keypoints"], valid, self.cfg.tau)

    # ------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """The model saved by train.py at `path`, rebuilt from the checkpoint's config (CheckpointError if the file
        is not one)."""
        ckpt = load_checkpoint(path, "a train.py checkpoint", ("model", "config"), map_location)
        model = cls(HCMoCoConfig.from_dict(ckpt["config"]["model"]))
        model.load_state_dict(ckpt["model"])
        return model

