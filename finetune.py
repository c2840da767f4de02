"""Downstream transfer of pre-trained encoders, and HCMoCo's versatility experiments.

    python finetune.py --task rgb-parsing   --init runs/hcmoco/stage2.pt --ratio 0.1
    python finetune.py --task depth-parsing --init scratch
    python finetune.py --task depth-pose    --init runs/hcmoco/stage2.pt
    python finetune.py --task dense-pose    --init hrnetv2_w18_imagenet_pretrained.pth
    python finetune.py --task cross-modal   --source rgb --target depth --init runs/hcmoco/stage2.pt
    python finetune.py --task missing-modal --init runs/hcmoco/stage2.pt
    python finetune.py experiments --out runs/experiments [--quick]   # the paper's comparisons, resumable

Tasks (heads on the HRNet backbone of the task's modality, all reading the merged 1/4-resolution map):
    rgb-parsing, depth-parsing   HRNetV2 segmentation head, 25 classes; mIoU, mAcc, aAcc, per-class IoU (%)
    depth-pose                   3D joints from depth: heatmaps + per-joint depth (see PoseHead); acc@10cm, MPJPE
    dense-pose                   part index + (u, v) per pixel from RGB; part accuracy, uv accuracy, GPS-style score
    cross-modal                  the head trains on the source modality's dense embeddings while the contrastive
                                 targets keep training on unlabelled pairs; tested on the target modality (Sec. 3.5)
    missing-modal                the head trains on the max-pooled RGB + depth dense embeddings; tested on each alone

Data: synthetic by default, labelled splits with their own seeds (train 100, test 200), disjoint from the
pre-training samples (seeds 0 and 1 in train.py); `--ratio` keeps a uniformly spaced subset of the training set,
as the paper does. With --h36m-root / --ntu-parsing-root the parsing tasks read the real datasets.
Inits: `scratch`, a train.py checkpoint (stage1.pt = CMC, stage2.pt = HCMoCo or an ablation row), or an external
HRNet state_dict (e.g. ImageNet weights).
"""
import argparse
import functools
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
import synthetic
import train
from encoders import CheckpointError, back_project, load_checkpoint, merge_maps
from hcmoco import TARGETS, HCMoCo, HCMoCoConfig, build_hrnet, depth_input, person_depth

NUM_CLASSES = 25
KEYS = ("rgb", "depth", "mask", "keypoints", "keypoints_visible", "parts", "iuv", "joints3d", "intrinsics", "present",
        "index")  # what a labelled synthetic item carries
TASKS = ("rgb-parsing", "depth-parsing", "depth-pose", "dense-pose", "cross-modal", "missing-modal", "rgb-probe",
         "depth-probe")
PROBE_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
TRAIN_SEED, TEST_SEED = 100, 200


@dataclass
class Config:
    task: str = "rgb-parsing"
    init: str = "scratch"
    scratch_init: str = "he"  # the HRNet init of a scratch backbone: he | official (std 0.001)
    ratio: float = 1.0
    subset: int = 0  # which labelled subset at --ratio: 0 uniformly spaced (the paper's), s > 0 random, seeded by s
    source: str = "rgb"  # cross-modal
    target: str = "depth"  # cross-modal
    contrast: str = "auto"  # cross/missing-modal: none | global | full | auto (the checkpoint's targets)
    out: str = "runs/finetune"
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    image_size: int = 96
    train_samples: int = 400
    test_samples: int = 500  # the fixed held-out test set (TEST_SEED)
    h36m_root: str = ""
    ntu_parsing_root: str = ""
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    workers: int = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.task not in TASKS:
        parser.error(f"--task must be one of {TASKS}")
    if not 0 < cfg.ratio <= 1:
        parser.error("--ratio must be in (0, 1]")
    if cfg.init not in ("scratch", "pixels") and not os.path.exists(cfg.init):
        parser.error(f"--init: {cfg.init} not found (give 'scratch' or a checkpoint)")
    if cfg.init == "pixels" and not cfg.task.endswith("probe"):
        parser.error("--init pixels (the probe's control) only goes with --task rgb-probe / depth-probe")
    if {cfg.source, cfg.target} != {"rgb", "depth"}:
        parser.error("--source and --target must be rgb and depth, one each")
    if cfg.scratch_init not in ("he", "official"):
        parser.error("--scratch-init must be he or official")
    if cfg.contrast not in ("auto", "none", "global", "full"):
        parser.error("--contrast must be auto, none, global or full")
    # the probe holds a fifth of its labelled images (at least one) out to choose its learning rate
    labelled = len(subset_indices(cfg.train_samples, cfg.ratio)) if cfg.train_samples > 0 else 0
    checks = cli.positive(cfg, ("steps", "batch_size", "lr", "train_samples", "test_samples"))
    checks += [(cfg.weight_decay >= 0, f"--weight-decay must be 0 or more, got {cfg.weight_decay}"),
               (cfg.subset >= 0, f"--subset must be 0 or more, got {cfg.subset}"),
               (cfg.workers >= 0, f"--workers must be 0 or more, got {cfg.workers}"),
               (not cfg.task.endswith("probe") or labelled >= 2, f"--train-samples {cfg.train_samples} at --ratio "
                f"{cfg.ratio} leaves {labelled} labelled image(s); the probe needs at least 2"),
               cli.image_size_check(cfg.image_size), cli.out_check(cfg.out)]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return cfg


# ------------------------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred, label, num_classes=NUM_CLASSES, ignore=255):
    """[K, K] counts, rows = ground truth, columns = prediction; `ignore` pixels are left out."""
    keep = label != ignore
    return torch.bincount(label[keep] * num_classes + pred[keep], minlength=num_classes ** 2).view(num_classes, -1)


def parsing_metrics(cm):
    """From a confusion matrix C (rows truth): IoU_k = C_kk / (sum_j C_kj + sum_i C_ik - C_kk),
    mIoU = mean_k IoU_k, mAcc = mean_k C_kk / sum_j C_kj, aAcc = sum_k C_kk / sum C, over the classes that occur
    in the ground truth; in percent."""
    cm = cm.double()
    tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    seen = gt > 0
    iou = tp / (gt + pred - tp).clamp(min=1)
    return {"miou": 100 * iou[seen].mean().item(), "macc": 100 * (tp[seen] / gt[seen]).mean().item(),
            "aacc": 100 * (tp.sum() / cm.sum()).item(),
            "iou": {synthetic.PART_NAMES[k]: round(100 * iou[k].item(), 2) for k in range(len(cm)) if seen[k]}}


def pose_metrics(pred, gt):
    """pred, gt [N, J, 3] metres: acc@10cm = share of joints with ||pred - gt|| < 0.1 m (ITOP's mAP),
    MPJPE = mean ||pred - gt|| in cm."""
    err = (pred - gt).norm(dim=-1)
    return {"acc10cm": 100 * (err < 0.1).float().mean().item(), "mpjpe_cm": 100 * err.mean().item()}


def densepose_metrics(part_pred, uv_pred, iuv, threshold=0.1, kappa=0.1):
    """On body pixels (iuv part > 0): part_acc = share with the right part; uv_acc = share with the right part and
    ||uv - uv*|| < threshold; GPS-style score = mean of exp(-||uv - uv*||^2 / (2 kappa^2)) with 0 for a wrong part
    (DensePose's geodesic point similarity with the uv distance standing in for the geodesic one). Percent."""
    part = iuv[:, 0].long()
    body = part > 0
    right = (part_pred == part) & body
    d = (uv_pred - iuv[:, 1:]).norm(dim=1)
    n = body.sum().clamp(min=1)
    return {"part_acc": 100 * (right.sum() / n).item(), "uv_acc": 100 * ((right & (d < threshold)).sum() / n).item(),
            "gps": 100 * ((torch.exp(-d ** 2 / (2 * kappa ** 2)) * right).sum() / n).item()}


# ------------------------------------------------------------------------------------------------------- models
def head_stem(cin, cout):
    """The HRNetV2 head on the merged map: 1x1 conv-BN-ReLU at the map's width, then a 1x1 conv to `cout`."""
    return nn.Sequential(nn.Conv2d(cin, cin, 1), nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1))


class SegHead(nn.Module):
    """HRNetV2 segmentation head: merged map -> 1x1 conv-BN-ReLU -> 1x1 classifier, upsampled to the input."""

    def __init__(self, cin, num_classes):
        super().__init__()
        self.body = head_stem(cin, num_classes)

    def forward(self, x, size):
        return F.interpolate(self.body(x), size=size, mode="bilinear", align_corners=False)


class PoseHead(nn.Module):
    """3D pose from depth as heatmaps + depth, chosen over A2J's anchors because it needs nothing beyond the same
    1/4-resolution map the other heads read, and the intrinsics lift it exactly: per joint j a heatmap H_j, whose
    soft-argmax gives (u_j, v_j), and a depth-offset map O_j read under the heatmap,
        z_j = z_person + sum_p softmax(H_j)_p O_j,p,    X_j = (u_j - cx) z_j / fx,  Y_j = (v_j - cy) z_j / fy,
    with z_person the mean depth of the person (hcmoco.person_depth, the centre depth_input subtracts) and the
    lift encoders.back_project."""

    def __init__(self, cin, joints=16):
        super().__init__()
        self.body = head_stem(cin, 2 * joints)
        self.joints = joints

    def forward(self, x, depth, person, intrinsics, image_size):
        B, _, h, w = x.shape
        H, W = image_size
        heat, offset = self.body(x).split(self.joints, dim=1)  # [B, J, h, w] each
        p = heat.flatten(2).softmax(-1)  # [B, J, h*w]
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        u = (p * ((xs.flatten() + 0.5) * W / w - 0.5)).sum(-1)  # [B, J] image pixels, centres at integers
        v = (p * ((ys.flatten() + 0.5) * H / h - 0.5)).sum(-1)
        z = person_depth(depth, person)[:, None] + (p * offset.flatten(2)).sum(-1)
        return back_project(u, v, z, intrinsics), torch.stack([u, v], dim=-1)  # [B, J, 3], [B, J, 2]


class DensePoseHead(nn.Module):
    """Part classification (25) and (u, v) regression (sigmoid) from the merged map, upsampled to the input."""

    def __init__(self, cin):
        super().__init__()
        self.body = head_stem(cin, NUM_CLASSES + 2)

    def forward(self, x, size):
        out = F.interpolate(self.body(x), size=size, mode="bilinear", align_corners=False)
        return out[:, :NUM_CLASSES], out[:, NUM_CLASSES:].sigmoid()


def scratch_config(cfg):
    """The model configuration of a scratch init: the CPU preset's, with the --scratch-init HRNet init."""
    preset = train.PRESETS["cpu"]
    return HCMoCoConfig(init=cfg.scratch_init, bank_size=preset["synthetic_samples"],
                        num_negatives=preset["num_negatives"])


def load_backbone(init, modality, default_cfg):
    """(backbone, report). scratch: a fresh HRNet of `default_cfg`; a train.py checkpoint: its
    encoders.<modality> weights in an HRNet of the checkpoint's config; anything else: an external HRNet
    state_dict through HRNet.load_pretrained."""
    if init == "scratch":
        return build_hrnet(default_cfg), {}
    ckpt = load_checkpoint(init, "a train.py checkpoint or an HRNet state_dict")
    if isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:
        net = build_hrnet(HCMoCoConfig.from_dict(ckpt["config"]["model"]))
        prefix = f"encoders.{modality}."
        state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
        result = net.load_state_dict(state, strict=False)
        report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
        print(f"loaded {len(state) - len(report['unexpected'])} {modality} backbone tensors from {init}; "
              f"missing: {len(report['missing'])}")
        return net, report
    net = build_hrnet(default_cfg)
    return net, net.load_pretrained(init)


class Finetuner(nn.Module):
    """Backbone + task head for the single-modality tasks."""

    def __init__(self, cfg):
        super().__init__()
        self.task = cfg.task
        self.modality = "depth" if cfg.task.startswith("depth") else "rgb"
        self.backbone, self.report = load_backbone(cfg.init, self.modality, scratch_config(cfg))
        C = sum(self.backbone.out_channels)
        self.head = (PoseHead(C) if cfg.task == "depth-pose" else DensePoseHead(C) if cfg.task == "dense-pose"
                     else SegHead(C, NUM_CLASSES))

    def features(self, batch):
        x = batch["rgb"] if self.modality == "rgb" else depth_input(batch["depth"], batch["mask"][:, None])
        return merge_maps(self.backbone(x))

    def forward(self, batch):
        """-> (loss, predictions) for the batch's labels."""
        f = self.features(batch)
        size = batch["rgb"].shape[-2:] if "rgb" in batch else batch["depth"].shape[-2:]
        if self.task == "depth-pose":
            joints, uv = self.head(f, batch["depth"], batch["mask"][:, None], batch["intrinsics"], size)
            p = batch["joints3d"] @ batch["intrinsics"].transpose(1, 2)  # exact 2D joints in the augmented frame
            norm = uv.new_tensor([size[1], size[0]])
            loss = F.l1_loss(uv / norm, p[..., :2] / p[..., 2:] / norm) + F.l1_loss(joints, batch["joints3d"])
            return loss, joints
        if self.task == "dense-pose":
            logits, uv = self.head(f, size)
            iuv = batch["iuv"]
            body = iuv[:, 0] > 0
            uv_loss = (uv - iuv[:, 1:]).abs().sum(1)[body].mean() if body.any() else uv.sum() * 0
            return F.cross_entropy(logits, iuv[:, 0].long()) + uv_loss, (logits.argmax(1), uv)
        logits = self.head(f, size)
        return F.cross_entropy(logits, batch["parts"], ignore_index=255), logits.argmax(1)


class Versatile(nn.Module):
    """A full HCMoCo model plus a segmentation head on its dense embeddings (cross-modal, missing-modal)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.init == "scratch":
            self.hcmoco = HCMoCo(scratch_config(cfg))
        else:
            self.hcmoco = HCMoCo.from_checkpoint(cfg.init)
        contrast = cfg.contrast if cfg.contrast != "auto" else ("none" if cfg.init == "scratch" else "ckpt")
        rows = {"global": TARGETS["global"], "full": TARGETS["global+soft+sparse"]}
        self.hcmoco.cfg = replace(self.hcmoco.cfg, **rows.get(contrast, {}))
        self.contrast = contrast != "none"
        self.head = SegHead(self.hcmoco.cfg.embed_dim, NUM_CLASSES)
        self.task, self.source = cfg.task, cfg.source

    def embed(self, batch, modalities):
        """Dense embeddings of the given modalities, max-pooled when there are two."""
        maps = [self.hcmoco.dense_embed(batch, m) for m in modalities]
        return maps[0] if len(maps) == 1 else torch.maximum(*maps)

    def forward(self, batch, modalities):
        logits = self.head(self.embed(batch, modalities), batch["parts"].shape[-2:])
        return F.cross_entropy(logits, batch["parts"], ignore_index=255), logits.argmax(1)


# ---------------------------------------------------------------------------------------------------------- data
def subset_indices(n, ratio, subset=0):
    """round(ratio * n) indices (at least one): subset 0 is uniformly spaced, round(linspace(0, n - 1, k)), as the
    paper takes its label ratios; subset s > 0 is a sorted uniform random draw seeded by s, for repeated runs."""
    k = max(1, round(ratio * n))
    if subset == 0:
        return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int)).tolist()
    return sorted(np.random.default_rng(subset).choice(n, size=k, replace=False).tolist())


class LabelledView(torch.utils.data.Dataset):
    """Items with only the `keep` input modalities (and the labels): the others are removed before anything
    reads them, so a cross-modal run cannot train on the target modality's labelled images."""

    def __init__(self, dataset, keep):
        self.dataset, self.keep = dataset, set(keep)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        s = dict(self.dataset[key])
        for m in ("rgb", "depth"):
            if m not in self.keep:
                s.pop(m, None)
                s["present"] = dict(s["present"], **{m: False})
        return s


def datasets(cfg):
    """(train, test) for the task; the real readers when their roots are given."""
    if cfg.h36m_root and cfg.task == "rgb-parsing":
        return data.Human36MParts(cfg.h36m_root, "train"), data.Human36MParts(cfg.h36m_root, "test")
    if cfg.ntu_parsing_root and cfg.task in ("rgb-parsing", "depth-parsing", "cross-modal", "missing-modal"):
        return data.NTURGBDParsing(cfg.ntu_parsing_root, "train"), data.NTURGBDParsing(cfg.ntu_parsing_root, "test")
    return (labelled_people(cfg.train_samples, cfg.image_size, TRAIN_SEED),
            labelled_people(cfg.test_samples, cfg.image_size, TEST_SEED))


@functools.lru_cache(maxsize=4)
def labelled_people(n, image_size, seed):
    """n labelled synthetic people, rendered once per process: the experiment runner's many runs share them."""
    return data.Cached(synthetic.SyntheticHumans(n, image_size, seed=seed, domain="indoor"), KEYS)


@functools.lru_cache(maxsize=2)
def unlabelled_pairs(image_size, n):
    """The pre-training set (data.pretraining_set as the CPU preset builds it, n samples), built once per process: the
    unlabelled pairs the versatility tasks keep training the contrastive targets on. Rendered in this process
    (workers=0): the experiment runner's jobs are pool workers, which cannot start a pool of their own."""
    preset = train.PRESETS["cpu"]
    return data.pretraining_set("synthetic", image_size, synthetic_samples=n, cache=preset["cache"])


def loader(dataset, cfg, train_mode, steps=None):
    """Train: `steps` batches of seeded augmentations (data.StepBatches); test: one pass without augmentation.
    Depth-pose trains without rotation and flips (they would change the camera geometry of the 3D labels)."""
    pose = cfg.task == "depth-pose"
    transform = data.PairedTransform(cfg.image_size, train=train_mode, rotate=0 if pose else 30,
                                     flip=0 if pose else 0.5)
    ds = data.Transformed(dataset, transform)
    if train_mode:
        batches = data.StepBatches(len(dataset), min(cfg.batch_size, len(dataset)), cfg.seed, 0, steps)
        return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=cfg.workers,
                                           collate_fn=data.collate)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                       collate_fn=data.collate)


# ----------------------------------------------------------------------------------------------- train, evaluate
def run(cfg):
    """Fine-tune and evaluate; writes cfg.out/metrics.json and cfg.out/model.pt (load_finetuned), returns the
    metrics."""
    device = torch.device(cli.pick_device(cfg.device))
    torch.manual_seed(cfg.seed)
    if cfg.task.endswith("probe"):
        return write_metrics(run_probe(cfg, device), cfg)
    versatile = cfg.task in ("cross-modal", "missing-modal")
    model = (Versatile if versatile else Finetuner)(cfg).to(device)  # reads --init before any data is rendered
    train_set, test_set = datasets(cfg)
    keep = subset_indices(len(train_set), cfg.ratio, cfg.subset)
    train_set = torch.utils.data.Subset(train_set, keep)
    if versatile:
        sources = [cfg.source] if cfg.task == "cross-modal" else ["rgb", "depth"]
        train_set = LabelledView(train_set, keep=sources)
        # the unlabelled pairs are the pre-training set, whose ids the checkpoint's memory bank is indexed by
        unlabelled = iter(train_loader_unlabelled(unlabelled_pairs(cfg.image_size, model.hcmoco.cfg.bank_size), cfg))
    # AdamW rather than SGD: its step does not scale with the gradient, which under BatchNorm is ~1/||w|| and so
    # differs a hundredfold between a scratch backbone (official init, std 0.001) and a pre-trained one (README)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    bar = tqdm(loader(train_set, cfg, True, cfg.steps), total=cfg.steps, desc=cfg.task, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = cli.cosine_lr(cfg.lr, step, cfg.steps)
        batch = data.to_device(batch, device)
        if versatile:
            loss, _ = model(batch, sources)
            if model.contrast:
                contrastive, _ = model.hcmoco(data.to_device(next(unlabelled), device))
                loss = loss + contrastive
        else:
            loss, _ = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=round(loss.item(), 4))
    metrics = evaluate(model, test_set, cfg, device)
    metrics["train_images"] = len(keep)
    os.makedirs(cfg.out, exist_ok=True)
    cli.save_atomic(dict(model=model.state_dict(), config=asdict(cfg)), os.path.join(cfg.out, "model.pt"))
    return write_metrics(metrics, cfg)


def write_metrics(metrics, cfg):
    """cfg.out/metrics.json (the metrics and the run's config), printed without the per-class table. Written
    through a temporary file and a rename: the experiment runner takes a run with a metrics.json as done."""
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "metrics.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(dict(metrics, config=asdict(cfg)), f, indent=1)
    os.replace(f"{path}.tmp", path)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()
                      if k not in ("iou", "sweep")}))
    return metrics


def load_finetuned(out, map_location="cpu"):
    """(model in eval mode, Config) of the run that wrote `out`/model.pt; its --init must still be readable,
    because the backbone is rebuilt from it before the fine-tuned weights replace it."""
    ckpt = load_checkpoint(os.path.join(out, "model.pt"), "a finetune.py model", ("model", "config"), map_location)
    cfg = Config(**ckpt["config"])
    model = (Versatile if cfg.task in ("cross-modal", "missing-modal") else Finetuner)(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


def train_loader_unlabelled(pairs, cfg):
    """Unlabelled paired batches (train.build_dataset, augmented) for the contrastive targets of the versatility
    tasks, one per fine-tuning step."""
    batches = data.StepBatches(len(pairs), cfg.batch_size, cfg.seed + 1, 0, cfg.steps)
    return torch.utils.data.DataLoader(pairs, batch_sampler=batches, num_workers=0, collate_fn=data.collate)


@torch.no_grad()
def evaluate(model, test_set, cfg, device):
    model.eval()
    if cfg.task in ("cross-modal", "missing-modal"):
        tests = {cfg.target: [cfg.target]} if cfg.task == "cross-modal" else {"rgb": ["rgb"], "depth": ["depth"],
                                                                             "fused": ["rgb", "depth"]}
        out = {}
        for name, modalities in tests.items():
            cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
            for batch in loader(test_set, cfg, False):
                batch = data.to_device(batch, device)
                _, pred = model(batch, modalities)
                cm += confusion_matrix(pred.cpu(), batch["parts"].cpu())
            m = parsing_metrics(cm)
            out.update({f"{name}_{k}": v for k, v in m.items() if k != "iou"})
        return out
    preds, labels = [], []
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for batch in loader(test_set, cfg, False):
        batch = data.to_device(batch, device)
        _, pred = model(batch)
        if cfg.task == "depth-pose":
            preds.append(pred.cpu())
            labels.append(batch["joints3d"].cpu())
        elif cfg.task == "dense-pose":
            preds.append((pred[0].cpu(), pred[1].cpu()))
            labels.append(batch["iuv"].cpu())
        else:
            cm += confusion_matrix(pred.cpu(), batch["parts"].cpu())
    if cfg.task == "depth-pose":
        return pose_metrics(torch.cat(preds), torch.cat(labels))
    if cfg.task == "dense-pose":
        return densepose_metrics(torch.cat([p[0] for p in preds]), torch.cat([p[1] for p in preds]), torch.cat(labels))
    return parsing_metrics(cm)


# -------------------------------------------------------------------------------------------------- frozen probe
@torch.no_grad()
def probe_inputs(features, dataset, cfg, device):
    """(features [N, C, h, w], labels [N, H, W]) of a dataset, one eval-mode pass without augmentation."""
    feats, labels = [], []
    for batch in loader(dataset, cfg, False):
        batch = data.to_device(batch, device)
        feats.append(features(batch).cpu())
        labels.append(batch["parts"].cpu())
    return torch.cat(feats), torch.cat(labels)


class Probe(nn.Module):
    """BatchNorm without affine, with the statistics of the training features, then a 1x1 conv to the classes."""

    def __init__(self, x):
        super().__init__()
        self.register_buffer("mean", x.mean(dim=(0, 2, 3)))  # [C]
        self.register_buffer("std", x.std(dim=(0, 2, 3)).clamp(min=1e-6))
        self.conv = nn.Conv2d(x.shape[1], NUM_CLASSES, 1)

    def forward(self, x):  # [B, C, h, w] -> [B, classes, h, w]
        return self.conv((x - self.mean[:, None, None]) / self.std[:, None, None])


def fit_probe(x, y, lr, steps, seed, pixels=4096):
    """A Probe on frozen features x [N, C, h, w] against part labels y [N, H, W], trained at the features'
    resolution (labels nearest-downsampled) on `pixels` random labelled cells per step, with class-balanced
    cross-entropy (weights 1 / class frequency, normalised to mean 1 over the classes present), AdamW, cosine."""
    g = torch.Generator().manual_seed(seed)
    small = F.interpolate(y[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0].long()  # [N, h, w]
    probe = Probe(x)
    feats = ((x - probe.mean[:, None, None]) / probe.std[:, None, None]).permute(0, 2, 3, 1).flatten(0, 2)  # [P, C]
    labels = small.flatten()
    keep = labels != 255
    feats, labels = feats[keep], labels[keep]
    counts = torch.bincount(labels, minlength=NUM_CLASSES).float()
    weight = torch.where(counts > 0, 1 / counts.clamp(min=1), torch.zeros_like(counts))
    weight = weight / weight[counts > 0].mean()
    optimizer = torch.optim.AdamW(probe.conv.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cli.cosine_lr(lr, step, steps)
        pick = torch.randint(len(feats), (pixels,), generator=g)
        logits = feats[pick] @ probe.conv.weight[:, :, 0, 0].T + probe.conv.bias  # the 1x1 conv on single cells
        loss = F.cross_entropy(logits, labels[pick], weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe.eval()


@torch.no_grad()
def probe_miou(probe, x, y):
    """Parsing metrics of a probe on features x, logits upsampled bilinearly to the labels' size, as SegHead's."""
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for i in range(0, len(x), 64):
        logits = F.interpolate(probe(x[i:i + 64]), size=y.shape[-2:], mode="bilinear", align_corners=False)
        cm += confusion_matrix(logits.argmax(1), y[i:i + 64])
    return parsing_metrics(cm)


def pixel_features(batch, modality):
    """The probe's control: pixel (x, y) in [0, 1] and the input itself (RGB; depth_input's first channel),
    average-pooled to the backbone's 1/4 grid. [B, 5 | 3, H/4, W/4]."""
    x = batch["rgb"] if modality == "rgb" else depth_input(batch["depth"], batch["mask"][:, None])[:, :1]
    B, _, H, W = x.shape
    ys, xs = torch.meshgrid(torch.linspace(0, 1, H, device=x.device), torch.linspace(0, 1, W, device=x.device),
                            indexing="ij")
    return F.avg_pool2d(torch.cat([xs.expand(B, 1, H, W), ys.expand(B, 1, H, W), x], 1), 4)


def run_probe(cfg, device):
    """A frozen linear probe of the backbone's merged 1/4 map (or of pixel_features for --init pixels): the
    learning rate is chosen among PROBE_LRS on a fifth of the labelled images held out, then the probe is
    retrained on all of them and tested."""
    modality = "rgb" if cfg.task == "rgb-probe" else "depth"
    if cfg.init == "pixels":
        features = lambda batch: pixel_features(batch, modality)  # noqa: E731
    else:
        backbone = load_backbone(cfg.init, modality, scratch_config(cfg))[0].to(device).eval()
        features = lambda batch: merge_maps(backbone(  # noqa: E731
            batch["rgb"] if modality == "rgb" else depth_input(batch["depth"], batch["mask"][:, None])))
    train_set, test_set = datasets(cfg)
    train_set = torch.utils.data.Subset(train_set, subset_indices(len(train_set), cfg.ratio, cfg.subset))
    x, y = probe_inputs(features, train_set, cfg, device)
    n_val = max(1, len(x) // 5)
    sweep = {lr: probe_miou(fit_probe(x[n_val:], y[n_val:], lr, cfg.steps, cfg.seed), x[:n_val], y[:n_val])["miou"]
             for lr in PROBE_LRS}
    lr = max(sweep, key=sweep.get)
    metrics = probe_miou(fit_probe(x, y, lr, cfg.steps, cfg.seed), *probe_inputs(features, test_set, cfg, device))
    return dict(metrics, lr=lr, sweep={str(k): round(v, 2) for k, v in sweep.items()})


# --------------------------------------------------------------------------------------------------- experiments
ARMS = ("scratch", "CMC", "HCMoCo")  # Table 2's inits
LADDER = {"global": "global", "hard": "global+hard", "soft": "global+soft", "full": "global+soft+sparse"}  # Table 3
LOW, HIGH = 0.05, 1.0  # the label ratios


def experiments(argv):
    """The paper's comparisons on the synthetic benchmark, with repeats and intervals; resumable (a finished
    pre-training stage or a run with a metrics.json is not redone).

    Pre-training (train.py's CPU preset): one stage 1 (the CMC model), then a stage 2 per row of Table 3 from it.
    Fine-tuning, all tested on the same 500 images:
      Table 2   scratch / CMC / HCMoCo on RGB and depth parsing; at 5 % labels every arm runs on the same 3 label
                subsets x 2 seeds, so each HCMoCo run has a scratch and a CMC twin; at 100 % labels one seed
      curves    scratch and HCMoCo at 5 % labels after 100 fine-tuning steps (the tables use 300)
      probes    frozen linear probes (rgb-probe, depth-probe) of CMC, HCMoCo, a random network with the same init
                and pixel (x, y) + input
      Table 3   the ladder of targets on depth parsing at 5 % labels (label subset 1, seed 0)
      Tables 6-7   cross-modal supervision both ways and missing-modality inference
    Jobs run `--jobs` at a time, each on its share of the cores. results.json holds every run and the summary;
    results.md the tables: means, and paired gains with a bootstrap 95 % interval and the win rate."""
    parser = argparse.ArgumentParser(prog="finetune.py experiments")
    parser.add_argument("--out", default="runs/experiments")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, each on cores / jobs threads")
    args = parser.parse_args(argv)
    for ok, message in [(args.jobs >= 1, f"--jobs must be positive, got {args.jobs}"), cli.out_check(args.out)]:
        if not ok:
            parser.error(message)
    quick = args.quick
    subsets, seeds, budgets = ((1,), (0,), (2,)) if quick else ((1, 2, 3), (0, 1), (100,))
    small = ["--steps", "4", "--image-size", "48", "--synthetic-samples", "64", "--batch-size", "8",
             "--heldout", "8"] if quick else []
    pre = os.path.join(args.out, "pretrain")
    first = os.path.join(pre, "full")
    # --resume: a finished stage is not trained again, a killed one continues
    run_jobs([("train", ["--stage", "1", "--out", first, "--resume", "--workers", "0", *small])], 1)
    stage2 = []
    for name, targets in LADDER.items():
        out = os.path.join(pre, name)
        os.makedirs(out, exist_ok=True)
        if out != first and not os.path.exists(os.path.join(out, "stage1.pt")):
            shutil.copy(os.path.join(first, "stage1.pt"), out)
        stage2.append(("train", ["--stage", "2", "--targets", targets, "--out", out, "--resume", "--workers", "0",
                                 *small]))
    run_jobs(stage2, args.jobs)
    inits = {"scratch": "scratch", "CMC": os.path.join(first, "stage1.pt"),
             "HCMoCo": os.path.join(pre, "full", "stage2.pt")}
    same_init = train.load_stage(inits["CMC"])["config"]["model"]["init"]
    ft = ["--steps", "3", "--train-samples", "16", "--test-samples", "8", "--image-size", "48"] if quick else []
    keys, jobs = [], []

    def job(key, **kw):
        keys.append(key)
        out = os.path.join(args.out, key)
        if not os.path.exists(os.path.join(out, "metrics.json")):
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
            jobs.append(("finetune", flags + ["--out", out, "--workers", "0", *ft]))

    grid = [(s, seed) for s in subsets for seed in seeds]
    for task in ("rgb-parsing", "depth-parsing"):
        for arm in ARMS:
            for s, seed in grid:
                job(f"{task}/{arm}/low/subset{s}-seed{seed}", task=task, init=inits[arm], ratio=LOW, subset=s, seed=seed)
            job(f"{task}/{arm}/high/seed{seeds[0]}", task=task, init=inits[arm], ratio=HIGH, seed=seeds[0])
        for arm in ("scratch", "HCMoCo"):
            for steps in budgets:
                job(f"{task}/{arm}/low/subset{subsets[0]}-seed{seeds[0]}/steps{steps}", task=task, init=inits[arm],
                    ratio=LOW, subset=subsets[0], seed=seeds[0], steps=steps)
    for modality in ("rgb", "depth"):
        for arm, init in (("random", "scratch"), ("pixels", "pixels"), ("CMC", inits["CMC"]),
                          ("HCMoCo", inits["HCMoCo"])):
            job(f"probe/{modality}/{arm}", task=f"{modality}-probe", init=init, scratch_init=same_init)
    for name in ("global", "hard", "soft"):  # the first label subset only, to keep the run under 2 h
        for s in subsets[:1]:
            job(f"ablation/{name}/subset{s}-seed{seeds[0]}", task="depth-parsing",
                init=os.path.join(pre, name, "stage2.pt"), ratio=LOW, subset=s, seed=seeds[0])
    for arm, init, contrast in (("none", "scratch", "none"), ("CMC", inits["CMC"], "global"),
                                ("HCMoCo", inits["HCMoCo"], "full")):
        for source, target in (("rgb", "depth"), ("depth", "rgb")):
            job(f"cross-modal/{source}-to-{target}/{arm}/seed{seeds[0]}", task="cross-modal", init=init,
                source=source, target=target, contrast=contrast, seed=seeds[0])
        job(f"missing-modal/{arm}/seed{seeds[0]}", task="missing-modal", init=init, contrast=contrast, seed=seeds[0])
    run_jobs(jobs, args.jobs)
    runs = {}
    for key in keys:
        with open(os.path.join(args.out, key, "metrics.json")) as f:
            runs[key] = {k: v for k, v in json.load(f).items() if k not in ("config", "iou", "sweep")}
    summary = summarise(runs, subsets, seeds, budgets, 3 if quick else Config.steps)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(runs=runs, summary=summary), f, indent=1)
    table = results_markdown(summary)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)


def run_jobs(jobs, n):
    """Run ('train' | 'finetune', argv) jobs, n at a time in fresh processes that share the cores (their
    progress bars off when n > 1); a line per finished job."""
    threads = max(1, (os.cpu_count() or 1) // n)
    if n == 1:
        for k, job in enumerate(jobs, 1):
            run_job(job, threads, quiet=False)
        return
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        for k, (kind, argv) in enumerate(pool.imap_unordered(functools.partial(run_job, threads=threads, quiet=True),
                                                             jobs), 1):
            print(f"[{k}/{len(jobs)}] {kind} {argv[argv.index('--out') + 1]}", flush=True)


def run_job(job, threads, quiet):
    """One experiment job in this process: train.main or a fine-tuning run, on `threads` threads."""
    kind, argv = job
    torch.set_num_threads(threads)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    if kind == "train":
        train.main(argv)
    else:
        run(parse_args(argv))
    return job


def paired_gain(a, b, resamples=10_000, seed=0):
    """Mean of the paired differences a - b, its bootstrap 95 % interval (percentiles of the means of
    `resamples` resamples of the pairs) and the win rate (share of pairs with a > b)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    means = np.random.default_rng(seed).choice(d, size=(resamples, len(d))).mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return dict(mean=float(d.mean()), lo=float(lo), hi=float(hi), wins=float((d > 0).mean()), n=len(d))


def summarise(runs, subsets, seeds, budgets, main_steps):
    """The tables' numbers from the runs: means over repeats, and paired gains at 5 % labels (main_steps: the
    fine-tuning budget of the main runs)."""
    low = [f"subset{s}-seed{seed}" for s in subsets for seed in seeds]
    one = f"subset{subsets[0]}-seed{seeds[0]}"  # the curves' run
    out = {"table2": {}, "gains": {}, "curves": {}, "probes": {}, "ladder": {}, "versatility": {}}
    for task in ("rgb-parsing", "depth-parsing"):
        miou = {arm: [runs[f"{task}/{arm}/low/{k}"]["miou"] for k in low] for arm in ARMS}
        for arm in ARMS:
            out["table2"][f"{task}/{arm}"] = {"low": float(np.mean(miou[arm])), "low_sd": float(np.std(miou[arm])),
                                              "high": runs[f"{task}/{arm}/high/seed{seeds[0]}"]["miou"]}
        for a, b in (("HCMoCo", "scratch"), ("HCMoCo", "CMC"), ("CMC", "scratch")):
            out["gains"][f"{task}/{a}-{b}"] = paired_gain(miou[a], miou[b])
        for arm in ("scratch", "HCMoCo"):
            for steps in budgets:
                out["curves"][f"{task}/{arm}/{steps}"] = runs[f"{task}/{arm}/low/{one}/steps{steps}"]["miou"]
            out["curves"][f"{task}/{arm}/{main_steps}"] = runs[f"{task}/{arm}/low/{one}"]["miou"]
    for key, r in runs.items():
        if key.startswith("probe/"):
            out["probes"][key[len("probe/"):]] = r["miou"]
    for name in ("global", "hard", "soft"):
        out["ladder"][name] = runs[f"ablation/{name}/{one}"]["miou"]
    out["ladder"]["full"] = runs[f"depth-parsing/HCMoCo/low/{one}"]["miou"]
    for arm in ("none", "CMC", "HCMoCo"):
        mm = runs[f"missing-modal/{arm}/seed{seeds[0]}"]
        out["versatility"][arm] = {"rgb_to_depth": runs[f"cross-modal/rgb-to-depth/{arm}/seed{seeds[0]}"]["depth_miou"],
                                   "depth_to_rgb": runs[f"cross-modal/depth-to-rgb/{arm}/seed{seeds[0]}"]["rgb_miou"],
                                   **{f"missing_{m}": mm[f"{m}_miou"] for m in ("rgb", "depth", "fused")}}
    return out


def results_markdown(s):
    """The measured tables in the shapes of the paper's Tables 2-3 and 6-7, with the paired gains, the probes and
    the fine-tuning curves."""
    f = lambda x: f"{x:.1f}"  # noqa: E731
    t2 = s["table2"]
    lines = [f"| init | RGB parsing mIoU ({LOW:.0%} labels) | RGB ({HIGH:.0%}) | depth parsing mIoU ({LOW:.0%}) "
             f"| depth ({HIGH:.0%}) |", "|---|---|---|---|---|"]
    for arm in ARMS:
        cells = [f"{f(t2[f'{t}/{arm}']['low'])} ± {f(t2[f'{t}/{arm}']['low_sd'])} | {f(t2[f'{t}/{arm}']['high'])}"
                 for t in ("rgb-parsing", "depth-parsing")]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"| paired gain at {LOW:.0%} labels (mIoU) | RGB parsing: mean [95 % CI], wins | depth parsing |",
              "|---|---|---|"]
    for pair in ("HCMoCo-scratch", "HCMoCo-CMC", "CMC-scratch"):
        cells = [s["gains"][f"{t}/{pair}"] for t in ("rgb-parsing", "depth-parsing")]
        lines.append(f"| {pair.replace('-', ' − ')} | " + " | ".join(
            f"{g['mean']:+.1f} [{g['lo']:+.1f}, {g['hi']:+.1f}], {round(g['wins'] * g['n'])}/{g['n']}" for g in cells)
            + " |")
    budgets = sorted({int(k.rsplit("/", 1)[1]) for k in s["curves"]})
    lines += ["", f"| fine-tuning steps ({LOW:.0%} labels) | " + " | ".join(
        f"{t} {arm}" for t in ("RGB", "depth") for arm in ("scratch", "HCMoCo")) + " |", "|---" * 5 + "|"]
    for steps in budgets:
        lines.append(f"| {steps} | " + " | ".join(f(s["curves"][f"{t}/{arm}/{steps}"]) for t in ("rgb-parsing",
                     "depth-parsing") for arm in ("scratch", "HCMoCo")) + " |")
    p = s["probes"]
    lines += ["", "| frozen linear probe (all labels) | RGB mIoU | depth mIoU |", "|---|---|---|"]
    for arm, label in (("pixels", "pixel (x, y) + input"), ("random", "random network, same init"), ("CMC", "CMC"),
                       ("HCMoCo", "HCMoCo")):
        lines.append(f"| {label} | {f(p[f'rgb/{arm}'])} | {f(p[f'depth/{arm}'])} |")
    lines += ["", f"| Table 3 row (targets) | depth parsing mIoU ({LOW:.0%} labels) |", "|---|---|"]
    for name, label in (("global", "sample-level (CMC)"), ("hard", "+ dense, hard (InfoNCE)"),
                        ("soft", "+ dense, soft"), ("full", "+ sparse (HCMoCo)")):
        lines.append(f"| {label} | {f(s['ladder'][name])} |")
    lines += ["", "| contrastive targets | RGB -> depth mIoU | depth -> RGB mIoU | missing-modal: RGB only | depth only "
              "| both |", "|---|---|---|---|---|---|"]
    for arm, v in s["versatility"].items():
        lines.append(f"| {arm} | {f(v['rgb_to_depth'])} | {f(v['depth_to_rgb'])} | {f(v['missing_rgb'])} | "
                     f"{f(v['missing_depth'])} | {f(v['missing_fused'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["experiments"]:
            return experiments(argv[1:])
        return run(parse_args(argv))
    except CheckpointError as e:  # --init
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
