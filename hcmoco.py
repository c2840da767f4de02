"""The HCMoCo model: encoders + mappers, three embedding levels, and Eq. 1 with the ablation switches.

    E_rgb, E_depth: HRNet (or PointNet++ for depth)   E_kp: SemGCN on the 2D keypoints
    global  f^g = normalize(Linear(mean-pool(merged map)))   (keypoints: mean over visible joints)   -> Eq. 2
    dense   f^d = normalize(Conv1x1(merged map))   [B, D, H/4, W/4], RGB and depth                   -> Eq. 3-5
    sparse  f^s = f^d sampled at the 2D joints (RGB, depth);  normalize(Linear(GCN)) (keypoints)     -> Eq. 6

    L = lambda_g L_g + lambda_d L_d + lambda_s L_s                                                    (Eq. 1)

Missing modalities are masked everywhere: an encoder only sees the rows where its modality is present (so
zero-filled inputs never touch BatchNorm statistics), Eq. 2 skips pairs with an absent side, the dense term
uses the rows with both RGB and depth, and sparse entries of absent modalities or invisible joints are invalid.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import losses
from encoders import HRNet, PointNet2, SemGCN, depth_to_points, merge_maps, pixel_grid, points_to_map

MODALITIES = ("rgb", "depth", "keypoints")
TARGETS = ("global", "global+hard", "global+soft", "global+soft+sparse")  # the rows of the paper's Table 3
DEPTH_SCALE = 2.0  # metres mapped to one unit of the depth encoder's input


@dataclass
class HCMoCoConfig:
    hrnet: str = "small"  # 'small' (HRNet.small) or 'w18' / 'w32' / 'w48'
    width: int = 16  # of the small HRNet
    embed_dim: int = 128
    gcn_hidden: int = 128
    gcn_layers: int = 4
    depth_encoder: str = "hrnet"  # or 'pointnet'
    targets: str = "global+soft+sparse"
    lambda_global: float = 1.0
    lambda_dense: float = 1.0
    lambda_sparse: float = 1.0
    tau: float = 0.07
    num_negatives: int = 16384
    momentum: float = 0.5
    bank_size: int = 1024  # the number of pre-training samples (one bank entry each)
    dense_points: int = 400  # as published, sampled from the person (valid depth)
    pointnet_points: int = 4096

    def __post_init__(self):
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}")
        if self.hrnet not in ("small", "w18", "w32", "w48"):
            raise ValueError(f"hrnet must be 'small', 'w18', 'w32' or 'w48', got {self.hrnet!r}")
        if self.depth_encoder not in ("hrnet", "pointnet"):
            raise ValueError(f"depth_encoder must be 'hrnet' or 'pointnet', got {self.depth_encoder!r}")


def build_hrnet(cfg, in_channels=3):
    return HRNet.small(in_channels, cfg.width) if cfg.hrnet == "small" else HRNet(int(cfg.hrnet[1:]), in_channels)


def depth_input(depth):
    """Depth in metres -> the depth HRNet's input: person-centred, (d - median of the valid depth) / 2 m, holes 0,
    repeated to 3 channels as in the paper (supp. 1.4). Centring removes the camera distance, which says nothing
    about the person. [B, 1, H, W] -> [B, 3, H, W]."""
    valid = depth > 0
    centre = torch.nanmedian(depth.masked_fill(~valid, float("nan")).flatten(1), dim=1).values  # [B]
    centre = torch.nan_to_num(centre, nan=0.0).view(-1, 1, 1, 1)
    x = torch.where(valid, (depth - centre) / DEPTH_SCALE, torch.zeros_like(depth))
    return x.expand(-1, 3, -1, -1)


def normalized_keypoints(keypoints, size):
    """Pixel (x, y) -> [-1, 1] over an image of `size` (H, W), the GCN's input."""
    H, W = size
    return keypoints / keypoints.new_tensor([W - 1, H - 1]) * 2 - 1


def sample_at(maps, keypoints, image_size):
    """Bilinear samples of a map at pixel positions of the image it came from (pixel centres at integers).
    maps [B, C, h, w], keypoints [B, J, 2] -> [B, J, C]."""
    H, W = image_size
    grid = (keypoints + 0.5) / keypoints.new_tensor([W, H]) * 2 - 1  # [B, J, 2] for align_corners=False
    return F.grid_sample(maps, grid[:, :, None], align_corners=False)[..., 0].transpose(1, 2)


class HCMoCo(nn.Module):
    def __init__(self, cfg: HCMoCoConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        rgb = build_hrnet(cfg)
        if cfg.depth_encoder == "hrnet":
            depth = build_hrnet(cfg)
            depth_channels = sum(depth.out_channels)
        else:
            depth = PointNet2(in_features=0, out_channels=sum(rgb.out_channels))
            depth_channels = depth.out_channels
        self.encoders = nn.ModuleDict(dict(rgb=rgb, depth=depth, keypoints=SemGCN(cfg.gcn_hidden, cfg.gcn_layers)))
        C = {"rgb": sum(rgb.out_channels), "depth": depth_channels}
        self.global_mappers = nn.ModuleDict(dict(rgb=nn.Linear(C["rgb"], D), depth=nn.Linear(C["depth"], D),
                                                 keypoints=nn.Linear(cfg.gcn_hidden, D)))
        self.dense_mappers = nn.ModuleDict(dict(rgb=nn.Conv2d(C["rgb"], D, 1), depth=nn.Conv2d(C["depth"], D, 1)))
        self.sparse_mapper = nn.Linear(cfg.gcn_hidden, D)
        self.bank = losses.MemoryBank(cfg.bank_size, D, MODALITIES, cfg.num_negatives, cfg.momentum, cfg.tau)

    # ------------------------------------------------------------------------------------------------ features
    def feature_map(self, x, modality, intrinsics=None):
        """Merged multi-resolution map [B, C, H/4, W/4]. x: normalised RGB, or depth in metres (depth_input is
        applied here); the PointNet++ depth encoder needs the intrinsics to lift depth to points."""
        if modality == "rgb":
            return merge_maps(self.encoders["rgb"](x))
        if self.cfg.depth_encoder == "hrnet":
            return merge_maps(self.encoders["depth"](depth_input(x)))
        return self.pointnet_map(x, intrinsics)

    def pointnet_map(self, depth, intrinsics):
        """PointNet++ on `pointnet_points` valid depth points per image, features scattered back to the 1/4 grid."""
        B, _, H, W = depth.shape
        points, valid = depth_to_points(depth, intrinsics)  # [B, HW, 3], [B, HW]
        n = min(self.cfg.pointnet_points, H * W)
        pick = (torch.rand(B, H * W, device=depth.device) + valid.float()).topk(n, dim=1).indices  # valid first
        pts = torch.gather(points, 1, pick[..., None].expand(-1, -1, 3))
        ok = torch.gather(valid, 1, pick)
        centre = (pts * ok[..., None]).sum(1, keepdim=True) / ok.sum(1).clamp(min=1)[:, None, None]
        feats = self.encoders["depth"](pts - centre, valid=ok)  # [B, C, n]
        return points_to_map(feats, pixel_grid(H, W, depth.device)[pick], ok, (H, W), (H // 4, W // 4))

    def dense_embed(self, x, modality, intrinsics=None):
        """L2-normalised dense embeddings f^d [B, D, H/4, W/4] of 'rgb' (normalised RGB) or 'depth' (metres)."""
        return F.normalize(self.dense_mappers[modality](self.feature_map(x, modality, intrinsics)), dim=1)

    def embed(self, batch):
        """Global [B, D], dense [B, D, h, w] and sparse [B, J, D] embeddings of every present modality, each
        computed on its present rows only and scattered back to the batch (zeros elsewhere)."""
        present = batch["present"]
        size = batch["rgb"].shape[-2:]
        B = len(batch["index"])
        out = {"global": {}, "dense": {}, "sparse": {}}
        for m in ("rgb", "depth"):
            rows = present[m].nonzero().flatten()
            if len(rows) == 0:
                continue
            K = batch["intrinsics"][rows] if "intrinsics" in batch else None
            maps = self.feature_map(batch[m][rows], m, K)  # [b, C, h, w]
            g = F.normalize(self.global_mappers[m](maps.mean(dim=(2, 3))), dim=-1)
            d = F.normalize(self.dense_mappers[m](maps), dim=1)
            out["global"][m] = g.new_zeros(B, g.shape[1]).index_copy(0, rows, g)
            out["dense"][m] = d.new_zeros(B, *d.shape[1:]).index_copy(0, rows, d)
            out["sparse"][m] = out["dense"][m].new_zeros(B, 16, d.shape[1]).index_copy(
                0, rows, sample_at(d, batch["keypoints"][rows], size))
        rows = present["keypoints"].nonzero().flatten()
        if len(rows):
            vis = batch["keypoints_visible"][rows]  # [b, J]
            h = self.encoders["keypoints"](normalized_keypoints(batch["keypoints"][rows], size), vis)  # [b, J, H]
            pooled = (h * vis[..., None]).sum(1) / vis.sum(1, keepdim=True).clamp(min=1)
            g = F.normalize(self.global_mappers["keypoints"](pooled), dim=-1)
            s = F.normalize(self.sparse_mapper(h), dim=-1)
            out["global"]["keypoints"] = g.new_zeros(B, g.shape[1]).index_copy(0, rows, g)
            out["sparse"]["keypoints"] = s.new_zeros(B, *s.shape[1:]).index_copy(0, rows, s)
        return out

    # ----------------------------------------------------------------------------------------------- objective
    def forward(self, batch, gather=None):
        """Eq. 1 on a batch dict -> (loss, terms). terms: detached scalars 'loss', 'global' and, as the targets
        ask, 'dense' and 'sparse'; a term whose modalities are absent from the batch is 0.
        `gather(tensor)`, under DDP, concatenates a tensor over ranks (with gradients to the owner): Eq. 2 then
        runs on the global batch so that every rank updates its memory bank identically."""
        cfg = self.cfg
        emb = self.embed(batch)
        present, index = batch["present"], batch["index"]
        absent = batch["rgb"].new_zeros(len(index), cfg.embed_dim)
        feats = {m: emb["global"].get(m, absent) for m in MODALITIES}
        if gather is not None:
            feats = {m: gather(f) for m, f in feats.items()}
            present, index = {m: gather(p) for m, p in present.items()}, gather(index)
        terms = {"global": self.bank(feats, index, present)}
        if "+" in cfg.targets:
            terms["dense"] = self.dense_term(emb["dense"], batch)
        if cfg.targets.endswith("sparse"):
            terms["sparse"] = self.sparse_term(emb["sparse"], batch)
        weights = {"global": cfg.lambda_global, "dense": cfg.lambda_dense, "sparse": cfg.lambda_sparse}
        loss = sum(weights[k] * v for k, v in terms.items())
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def dense_term(self, dense, batch):
        """Eq. 5 for the RGB-depth pair: Eq. 3 in both directions from one similarity matrix, over the rows with
        both modalities, at N points drawn without replacement from the person (mask if the batch has one, else
        valid depth) on the 1/4 grid. N = min(dense_points, the fewest person cells in the batch), so that every
        row has N distinct points. Soft targets: soft_weights over the points' grid coordinates (cells);
        hard: the identity (InfoNCE)."""
        none = batch["rgb"].new_zeros(())
        if "rgb" not in dense or "depth" not in dense:
            return none
        rows = (batch["present"]["rgb"] & batch["present"]["depth"]).nonzero().flatten()
        if len(rows) == 0:
            return none
        f_rgb, f_depth = dense["rgb"][rows], dense["depth"][rows]  # [b, D, h, w]
        b, D, h, w = f_rgb.shape
        person = batch["depth"][rows] > 0  # [b, 1, H, W]
        if "mask" in batch:
            person = person & batch["mask"][rows, None]
        person = F.interpolate(person.float(), size=(h, w), mode="nearest").flatten(1) > 0  # [b, h*w]
        n = min(self.cfg.dense_points, int(person.sum(1).min()))
        if n < 2:
            return none
        idx = (torch.rand(b, h * w, device=person.device) + person.float()).topk(n, dim=1).indices  # [b, n]
        f1 = torch.gather(f_rgb.flatten(2), 2, idx[:, None].expand(-1, D, -1)).transpose(1, 2)  # [b, n, D]
        f2 = torch.gather(f_depth.flatten(2), 2, idx[:, None].expand(-1, D, -1)).transpose(1, 2)
        if self.cfg.targets == "global+hard":
            W = torch.eye(n, device=f1.device).expand(b, n, n)
        else:
            coords = torch.stack([idx % w, idx // w], dim=-1).float()  # [b, n, 2] grid cells (x, y)
            W = losses.soft_weights(coords)
        logits = f1.float() @ f2.float().transpose(1, 2) / self.cfg.tau  # [b, n, n] rgb_i . depth_j
        return (losses.soft_cross_entropy(logits, W) + losses.soft_cross_entropy(logits.transpose(1, 2),
                                                                                 W.transpose(1, 2))) / 2

    def sparse_term(self, sparse, batch):
        """Eq. 6 over the M = 3 sparse representations (RGB and depth pooled at the joints, keypoint GCN); an
        entry is valid when its modality is present and the joint visible."""
        if len(sparse) == 0:
            return batch["rgb"].new_zeros(())
        feats, valid = [], []
        for m in MODALITIES:
            if m in sparse:
                feats.append(sparse[m])
                valid.append(batch["present"][m][:, None] & batch["keypoints_visible"]
                             & batch["present"]["keypoints"][:, None])
        feats, valid = torch.stack(feats, 1), torch.stack(valid, 1)  # [B, M, J, D], [B, M, J]
        return losses.sparse_structure_loss(feats, valid, self.cfg.tau, inter_sample=True)

    # ------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """The model saved by train.py at `path`, rebuilt from the checkpoint's config."""
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
        model = cls(HCMoCoConfig(**ckpt["config"]["model"]))
        model.load_state_dict(ckpt["model"])
        return model

    def config_dict(self):
        return asdict(self.cfg)
