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
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import synthetic
import train
from encoders import HRNet, merge_maps
from hcmoco import HCMoCo, HCMoCoConfig, build_hrnet, depth_input, person_depth

NUM_CLASSES = 25
TASKS = ("rgb-parsing", "depth-parsing", "depth-pose", "dense-pose", "cross-modal", "missing-modal")
TRAIN_SEED, TEST_SEED = 100, 200


@dataclass
class Config:
    task: str = "rgb-parsing"
    init: str = "scratch"
    ratio: float = 1.0
    source: str = "rgb"  # cross-modal
    target: str = "depth"  # cross-modal
    contrast: str = "auto"  # cross/missing-modal: none | global | full | auto (the checkpoint's targets)
    out: str = "runs/finetune"
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    image_size: int = 96
    train_samples: int = 400
    test_samples: int = 100
    h36m_root: str = ""
    ntu_parsing_root: str = ""
    device: str = "auto"
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
    if cfg.init != "scratch" and not os.path.exists(cfg.init):
        parser.error(f"--init: {cfg.init} not found (give 'scratch' or a checkpoint)")
    if {cfg.source, cfg.target} != {"rgb", "depth"}:
        parser.error("--source and --target must be rgb and depth, one each")
    if cfg.contrast not in ("auto", "none", "global", "full"):
        parser.error("--contrast must be auto, none, global or full")
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
class SegHead(nn.Module):
    """HRNetV2 segmentation head: merged map -> 1x1 conv-BN-ReLU -> 1x1 classifier, upsampled to the input."""

    def __init__(self, cin, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cin, 1), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                  nn.Conv2d(cin, num_classes, 1))

    def forward(self, x, size):
        return F.interpolate(self.body(x), size=size, mode="bilinear", align_corners=False)


class PoseHead(nn.Module):
    """3D pose from depth as heatmaps + depth, chosen over A2J's anchors because it needs nothing beyond the same
    1/4-resolution map the other heads read, and the intrinsics lift it exactly: per joint j a heatmap H_j, whose
    soft-argmax gives (u_j, v_j), and a depth-offset map O_j read under the heatmap,
        z_j = z_person + sum_p softmax(H_j)_p O_j,p,    X_j = (u_j - cx) z_j / fx,  Y_j = (v_j - cy) z_j / fy,
    with z_person the mean depth of the person (hcmoco.person_depth, the centre depth_input subtracts)."""

    def __init__(self, cin, joints=16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cin, 1), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                  nn.Conv2d(cin, 2 * joints, 1))
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
        K = intrinsics
        X = (u - K[:, 0, 2, None]) * z / K[:, 0, 0, None]
        Y = (v - K[:, 1, 2, None]) * z / K[:, 1, 1, None]
        return torch.stack([X, Y, z], dim=-1), torch.stack([u, v], dim=-1)  # [B, J, 3], [B, J, 2]


class DensePoseHead(nn.Module):
    """Part classification (25) and (u, v) regression (sigmoid) from the merged map, upsampled to the input."""

    def __init__(self, cin):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cin, 1), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                  nn.Conv2d(cin, NUM_CLASSES + 2, 1))

    def forward(self, x, size):
        out = F.interpolate(self.body(x), size=size, mode="bilinear", align_corners=False)
        return out[:, :NUM_CLASSES], out[:, NUM_CLASSES:].sigmoid()


def load_backbone(init, modality, default_cfg):
    """(backbone, report). scratch: a fresh HRNet of `default_cfg`; a train.py checkpoint: its
    encoders.<modality> weights in an HRNet of the checkpoint's config; anything else: an external HRNet
    state_dict through HRNet.load_pretrained."""
    if init == "scratch":
        return build_hrnet(default_cfg), {}
    ckpt = torch.load(init, map_location="cpu", weights_only=False)
    if isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:
        net = build_hrnet(HCMoCoConfig(**ckpt["config"]["model"]))
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
        self.backbone, self.report = load_backbone(cfg.init, self.modality, HCMoCoConfig())
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
            self.hcmoco = HCMoCo(HCMoCoConfig(bank_size=train.PRESETS["cpu"]["synthetic_samples"],
                                              num_negatives=train.PRESETS["cpu"]["num_negatives"]))
        else:
            self.hcmoco = HCMoCo.from_checkpoint(cfg.init)
        contrast = cfg.contrast if cfg.contrast != "auto" else ("none" if cfg.init == "scratch" else "ckpt")
        targets = {"global": "global", "full": "global+soft+sparse"}.get(contrast, self.hcmoco.cfg.targets)
        self.hcmoco.cfg.targets, self.contrast = targets, contrast != "none"
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
def subset_indices(n, ratio):
    """A uniformly spaced subset of round(ratio * n) indices (at least one): round(linspace(0, n - 1, k))."""
    k = max(1, round(ratio * n))
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int)).tolist()


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
    make = lambda n, seed: synthetic.SyntheticHumans(n, cfg.image_size, seed=seed, domain="indoor")  # noqa: E731
    return make(cfg.train_samples, TRAIN_SEED), make(cfg.test_samples, TEST_SEED)


def loader(dataset, cfg, train_mode, steps=None):
    """Train: `steps` batches of seeded augmentations (train.StepBatches); test: one pass without augmentation.
    Depth-pose trains without rotation and flips (they would change the camera geometry of the 3D labels)."""
    pose = cfg.task == "depth-pose"
    transform = data.PairedTransform(cfg.image_size, train=train_mode, rotate=0 if pose else 30,
                                     flip=0 if pose else 0.5)
    ds = data.Transformed(dataset, transform)
    if train_mode:
        batches = train.StepBatches(len(dataset), min(cfg.batch_size, len(dataset)), cfg.seed, 0, steps)
        return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=cfg.workers,
                                           collate_fn=data.collate)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                       collate_fn=data.collate)


# ----------------------------------------------------------------------------------------------- train, evaluate
def run(cfg):
    """Fine-tune and evaluate; writes cfg.out/metrics.json and cfg.out/model.pt (load_finetuned), returns the
    metrics."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          cfg.device.replace("auto", "cpu"))
    torch.manual_seed(cfg.seed)
    train_set, test_set = datasets(cfg)
    keep = subset_indices(len(train_set), cfg.ratio)
    train_set = torch.utils.data.Subset(train_set, keep)
    versatile = cfg.task in ("cross-modal", "missing-modal")
    if versatile:
        model = Versatile(cfg).to(device)
        sources = [cfg.source] if cfg.task == "cross-modal" else ["rgb", "depth"]
        train_set = LabelledView(train_set, keep=sources)
        # the unlabelled pairs are the pre-training set, whose ids the checkpoint's memory bank is indexed by
        pairs = train.build_dataset(train.resolve(train.Config(image_size=cfg.image_size, device="cpu",
                                                               synthetic_samples=model.hcmoco.cfg.bank_size)))
        unlabelled = iter(train_loader_unlabelled(pairs, cfg))
    else:
        model = Finetuner(cfg).to(device)
    # AdamW rather than SGD: its step does not scale with the gradient, which under BatchNorm is ~1/||w|| and so
    # differs a hundredfold between a scratch backbone (official init, std 0.001) and a pre-trained one (README)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    bar = tqdm(loader(train_set, cfg, True, cfg.steps), total=cfg.steps, desc=cfg.task, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        batch = train.to_device(batch, device)
        if versatile:
            loss, _ = model(batch, sources)
            if model.contrast:
                contrastive, _ = model.hcmoco(train.to_device(next(unlabelled), device))
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
    train.save_atomic(dict(model=model.state_dict(), config=asdict(cfg)), os.path.join(cfg.out, "model.pt"))
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(dict(metrics, config=asdict(cfg)), f, indent=1)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items() if k != "iou"}))
    return metrics


def load_finetuned(out, map_location="cpu"):
    """(model in eval mode, Config) of the run that wrote `out`/model.pt; its --init must still be readable,
    because the backbone is rebuilt from it before the fine-tuned weights replace it."""
    ckpt = torch.load(os.path.join(out, "model.pt"), map_location=map_location, weights_only=False)
    cfg = Config(**ckpt["config"])
    model = (Versatile if cfg.task in ("cross-modal", "missing-modal") else Finetuner)(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


def train_loader_unlabelled(pairs, cfg):
    """Unlabelled paired batches (train.build_dataset, augmented) for the contrastive targets of the versatility
    tasks, one per fine-tuning step."""
    batches = train.StepBatches(len(pairs), cfg.batch_size, cfg.seed + 1, 0, cfg.steps)
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
                batch = train.to_device(batch, device)
                _, pred = model(batch, modalities)
                cm += confusion_matrix(pred.cpu(), batch["parts"].cpu())
            m = parsing_metrics(cm)
            out.update({f"{name}_{k}": v for k, v in m.items() if k != "iou"})
        return out
    preds, labels = [], []
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for batch in loader(test_set, cfg, False):
        batch = train.to_device(batch, device)
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


# --------------------------------------------------------------------------------------------------- experiments
def experiments(argv):
    """The paper's comparisons on the synthetic benchmark, resumable: a finished pre-training stage or a fine-tuning
    run with a metrics.json is not redone.
    Pre-training: one stage 1 (= the CMC model), then four stage-2 runs, one per row of Table 3. Then
    scratch / CMC / HCMoCo on rgb- and depth-parsing at two label ratios, the Table-3 ladder on depth-parsing at
    the low ratio, cross-modal supervision both ways and missing-modality inference (Tables 6-7)."""
    parser = argparse.ArgumentParser(prog="finetune.py experiments")
    parser.add_argument("--out", default="runs/experiments")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    quick = args.quick
    pre_steps = ["--steps", "4"] if quick else []
    tiny = ["--image-size", "48", "--synthetic-samples", "64", "--batch-size", "8"] if quick else []
    pre = os.path.join(args.out, "pretrain")
    rows = {"global": "global", "hard": "global+hard", "soft": "global+soft", "full": "global+soft+sparse"}
    first = os.path.join(pre, "full")
    # --resume: a finished stage is not trained again, a killed one continues
    train.main(["--stage", "1", "--out", first, "--workers", str(args.workers), "--resume", *pre_steps, *tiny])
    for name, targets in rows.items():
        out = os.path.join(pre, name)
        os.makedirs(out, exist_ok=True)
        if out != first and not os.path.exists(os.path.join(out, "stage1.pt")):
            shutil.copy(os.path.join(first, "stage1.pt"), out)
        train.main(["--stage", "2", "--targets", targets, "--out", out, "--workers", str(args.workers), "--resume",
                    *pre_steps, *tiny])
    inits = {"scratch": "scratch", "CMC": os.path.join(first, "stage1.pt"),
             "HCMoCo": os.path.join(pre, "full", "stage2.pt")}
    ft = ["--steps", "3", "--train-samples", "16", "--test-samples", "8", "--image-size", "48", "--batch-size", "8"] \
        if quick else []
    low, high = 0.05, 1.0
    results = {}

    def job(key, **kw):
        out = os.path.join(args.out, key)
        path = os.path.join(out, "metrics.json")
        if not os.path.exists(path):
            argv = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()] + ["--out", out, "--workers",
                                                                               str(args.workers), *ft]
            run(parse_args(argv))
        with open(path) as f:
            results[key] = {k: v for k, v in json.load(f).items() if k not in ("config", "iou")}

    for task in ("rgb-parsing", "depth-parsing"):
        for ratio in (low, high):
            for name, init in inits.items():
                job(f"{task}/{name}/ratio{ratio}", task=task, init=init, ratio=ratio)
    for name in rows:
        job(f"ablation/{name}", task="depth-parsing", init=os.path.join(pre, name, "stage2.pt"), ratio=low)
    for name, init, contrast in (("none", "scratch", "none"), ("CMC", inits["CMC"], "global"),
                                 ("HCMoCo", inits["HCMoCo"], "full")):
        for source, target in (("rgb", "depth"), ("depth", "rgb")):
            job(f"cross-modal/{source}-to-{target}/{name}", task="cross-modal", init=init, source=source,
                target=target, contrast=contrast)
        job(f"missing-modal/{name}", task="missing-modal", init=init, contrast=contrast)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = results_markdown(results, low, high)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)


def results_markdown(r, low, high):
    """The measured tables in the shapes of the paper's Tables 2-3 and 6-7."""
    f = lambda x: f"{x:.1f}"  # noqa: E731
    lines = [f"| init | RGB parsing mIoU ({low:.0%} labels) | RGB ({high:.0%}) | depth parsing mIoU ({low:.0%}) "
             f"| depth ({high:.0%}) |", "|---|---|---|---|---|"]
    for name in ("scratch", "CMC", "HCMoCo"):
        cells = [f(r[f"{t}/{name}/ratio{q}"]["miou"]) for t in ("rgb-parsing", "depth-parsing") for q in (low, high)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"| Table 3 row (targets) | depth parsing mIoU ({low:.0%} labels) |", "|---|---|"]
    for name, label in (("global", "sample-level (CMC)"), ("hard", "+ dense, hard (InfoNCE)"),
                        ("soft", "+ dense, soft"), ("full", "+ sparse (HCMoCo)")):
        lines.append(f"| {label} | {f(r[f'ablation/{name}']['miou'])} |")
    lines += ["", "| contrastive targets | RGB -> depth mIoU | depth -> RGB mIoU | missing-modal: RGB only | depth only "
              "| both |", "|---|---|---|---|---|---|"]
    for name in ("none", "CMC", "HCMoCo"):
        mm = r[f"missing-modal/{name}"]
        lines.append(f"| {name} | {f(r[f'cross-modal/rgb-to-depth/{name}']['depth_miou'])} | "
                     f"{f(r[f'cross-modal/depth-to-rgb/{name}']['rgb_miou'])} | {f(mm['rgb_miou'])} | "
                     f"{f(mm['depth_miou'])} | {f(mm['fused_miou'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["experiments"]:
        return experiments(argv[1:])
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
