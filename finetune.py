"""Downstream transfer of pre-trained encoders, and HCMoCo's versatility experiments.

    python finetune.py --task rgb-parsing   --init runs/hcmoco/stage2.pt --ratio 0.1
    python finetune.py --task depth-parsing --init scratch
    python finetune.py --task depth-pose    --init runs/hcmoco/stage2.pt
    python finetune.py --task dense-pose    --init hrnetv2_w18_imagenet_pretrained.pth
    python finetune.py --task cross-modal   --source rgb --target depth --init runs/hcmoco/stage2.pt
    python finetune.py --task missing-modal --init runs/hcmoco/stage2.pt
    python finetune.py experiments --out runs/experiments [--quick]   # the paper's comparisons (experiments.py)

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
import sys
from dataclasses import asdict, dataclass, replace
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
import synthetic
from encoders import CheckpointError, HRNet, back_project, load_checkpoint, merge_maps
from hcmoco import TARGETS, HCMoCo, HCMoCoConfig, build_hrnet, depth_input, person_depth

NUM_CLASSES = 25
KEYS = ("rgb", "depth", "mask", "keypoints", "keypoints_visible", "parts", "iuv", "joints3d", "intrinsics", "present",
        "index")  # what a labelled synthetic item carries
PROBE_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
TRAIN_SEED, TEST_SEED = 100, 200
# A scratch model is the one train.py's CPU preset starts from: a memory bank of one entry per pre-training sample
# (its synthetic_samples) drawing its num_negatives; the numbers are copied so that fine-tuning does not import the
# training script
SCRATCH_BANK_SIZE, SCRATCH_NEGATIVES = 4096, 256


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


def segmentation_metrics(pred, label):
    """parsing_metrics of predicted part maps against the labels, both [N, H, W]."""
    return parsing_metrics(confusion_matrix(pred, label))


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


def dense_pose_scores(pred, iuv):
    """densepose_metrics of the predicted (parts [N, H, W], uv [N, 2, H, W]) against iuv [N, 3, H, W]."""
    return densepose_metrics(*pred, iuv)


# ------------------------------------------------------------------------------------------------- heads, losses
def input_size(batch):
    """(H, W) of the batch's images; collate zero-fills an absent modality, so every batch has RGB at that size."""
    return batch["rgb"].shape[-2:]


def head_stem(cin, cout):
    """The HRNetV2 head on the merged map: 1x1 conv-BN-ReLU at the map's width, then a 1x1 conv to `cout`."""
    return nn.Sequential(nn.Conv2d(cin, cin, 1), nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1))


class SegHead(nn.Module):
    """HRNetV2 segmentation head: class logits [B, K, H, W], upsampled bilinearly to the input."""

    def __init__(self, cin, num_classes=NUM_CLASSES):
        super().__init__()
        self.body = head_stem(cin, num_classes)

    def forward(self, x, batch):
        return F.interpolate(self.body(x), size=input_size(batch), mode="bilinear", align_corners=False)


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

    def forward(self, x, batch):
        """-> (joints [B, J, 3] metres, camera frame; (u, v) [B, J, 2] image pixels)."""
        B, _, h, w = x.shape
        H, W = input_size(batch)
        heat, offset = self.body(x).split(self.joints, dim=1)  # [B, J, h, w] each
        p = heat.flatten(2).softmax(-1)  # [B, J, h*w]
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        u = (p * ((xs.flatten() + 0.5) * W / w - 0.5)).sum(-1)  # [B, J] image pixels, centres at integers
        v = (p * ((ys.flatten() + 0.5) * H / h - 0.5)).sum(-1)
        z = person_depth(batch["depth"], batch["mask"][:, None])[:, None] + (p * offset.flatten(2)).sum(-1)
        return back_project(u, v, z, batch["intrinsics"]), torch.stack([u, v], dim=-1)


class DensePoseHead(nn.Module):
    """Part classification (25) and (u, v) regression (sigmoid) from the merged map, upsampled to the input."""

    def __init__(self, cin):
        super().__init__()
        self.body = head_stem(cin, NUM_CLASSES + 2)

    def forward(self, x, batch):
        out = F.interpolate(self.body(x), size=input_size(batch), mode="bilinear", align_corners=False)
        return out[:, :NUM_CLASSES], out[:, NUM_CLASSES:].sigmoid()


def parsing_loss(logits, batch):
    """Cross-entropy against the part labels (255 ignored) -> (loss, predicted parts [B, H, W])."""
    return F.cross_entropy(logits, batch["parts"], ignore_index=255), logits.argmax(1)


def pose_loss(out, batch):
    """L1 between the 2D joints and the labels' projection, both over the image size, plus L1 on the 3D joints
    (metres) -> (loss, joints [B, J, 3])."""
    joints, uv = out
    H, W = input_size(batch)
    p = batch["joints3d"] @ batch["intrinsics"].transpose(1, 2)  # exact 2D joints in the augmented frame
    norm = uv.new_tensor([W, H])
    return F.l1_loss(uv / norm, p[..., :2] / p[..., 2:] / norm) + F.l1_loss(joints, batch["joints3d"]), joints


def dense_pose_loss(out, batch):
    """Cross-entropy on the part index plus the L1 distance of (u, v) on body pixels -> (loss, (parts, uv))."""
    logits, uv = out
    iuv = batch["iuv"]
    body = iuv[:, 0] > 0
    uv_loss = (uv - iuv[:, 1:]).abs().sum(1)[body].mean() if body.any() else uv.sum() * 0
    return F.cross_entropy(logits, iuv[:, 0].long()) + uv_loss, (logits.argmax(1), uv)


# ------------------------------------------------------------------------------------------------------- tasks
H36M = ("h36m_root", data.Human36MParts)  # a real labelled set: the option that gives its root, its reader
NTU = ("ntu_parsing_root", data.NTURGBDParsing)


class Task(NamedTuple):
    """A --task: the input its head reads, the head, the loss that trains it and the metric that tests it."""

    kind: Literal["finetune", "versatile", "probe"]  # a backbone + head; a full HCMoCo + head; a frozen linear probe
    modality: str | None  # the backbone's input; the versatility tasks take theirs from --source / --target
    head: Callable | None  # input channels -> head module, called as head(map, batch); probes fit a Probe
    loss: Callable | None  # (head output, batch) -> (loss, prediction)
    metric: Callable  # (predictions, labels) over the test set -> metrics
    label: str  # the batch key the metric reads
    camera_frame: bool = False  # 3D labels in the camera frame: trained without rotations and flips, which move it
    real: tuple = ()  # real labelled sets it reads instead of synthetic people: the first whose root is given


TASKS = {
    "rgb-parsing": Task("finetune", "rgb", SegHead, parsing_loss, segmentation_metrics, "parts", real=(H36M, NTU)),
    "depth-parsing": Task("finetune", "depth", SegHead, parsing_loss, segmentation_metrics, "parts", real=(NTU,)),
    "depth-pose": Task("finetune", "depth", PoseHead, pose_loss, pose_metrics, "joints3d", camera_frame=True),
    "dense-pose": Task("finetune", "rgb", DensePoseHead, dense_pose_loss, dense_pose_scores, "iuv"),
    "cross-modal": Task("versatile", None, SegHead, parsing_loss, segmentation_metrics, "parts", real=(NTU,)),
    "missing-modal": Task("versatile", None, SegHead, parsing_loss, segmentation_metrics, "parts", real=(NTU,)),
    "rgb-probe": Task("probe", "rgb", None, None, segmentation_metrics, "parts"),
    "depth-probe": Task("probe", "depth", None, None, segmentation_metrics, "parts"),
}
# --contrast's rows of Table 3 for the versatility tasks; 'auto' keeps the checkpoint's own ('none' for scratch)
CONTRAST = {"global": TARGETS["global"], "full": TARGETS["global+soft+sparse"]}


# -------------------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    task: Literal[tuple(TASKS)] = "rgb-parsing"
    init: str = "scratch"  # scratch | a train.py checkpoint | an HRNet state_dict | pixels (the probes' control)
    scratch_init: Literal["he", "official"] = "he"  # the HRNet init of a scratch backbone (official: std 0.001)
    ratio: float = 1.0
    subset: int = 0  # which labelled subset at --ratio: 0 uniformly spaced (the paper's), s > 0 random, seeded by s
    source: Literal["rgb", "depth"] = "rgb"  # cross-modal
    target: Literal["rgb", "depth"] = "depth"  # cross-modal
    contrast: Literal["auto", "none", "global", "full"] = "auto"  # cross/missing-modal: the targets that keep training
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
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    workers: int = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_options(parser, Config)
    cfg = Config(**vars(parser.parse_args(argv)))
    probe = TASKS[cfg.task].kind == "probe"
    # the probe holds a fifth of its labelled images (at least one) out to choose its learning rate
    labelled = len(subset_indices(cfg.train_samples, cfg.ratio)) if cfg.train_samples > 0 else 0
    cli.check(parser, [
        (0 < cfg.ratio <= 1, "--ratio must be in (0, 1]"),
        (cfg.init in ("scratch", "pixels") or os.path.exists(cfg.init),
         f"--init: {cfg.init} not found (give 'scratch' or a checkpoint)"),
        (cfg.init != "pixels" or probe,
         "--init pixels (the probe's control) only goes with --task rgb-probe / depth-probe"),
        (cfg.source != cfg.target, "--source and --target must be rgb and depth, one each"),
        *cli.positive(cfg, ("steps", "batch_size", "lr", "train_samples", "test_samples")),
        (cfg.weight_decay >= 0, f"--weight-decay must be 0 or more, got {cfg.weight_decay}"),
        (cfg.subset >= 0, f"--subset must be 0 or more, got {cfg.subset}"),
        (cfg.workers >= 0, f"--workers must be 0 or more, got {cfg.workers}"),
        (not probe or labelled >= 2, f"--train-samples {cfg.train_samples} at --ratio {cfg.ratio} leaves {labelled} "
         "labelled image(s); the probe needs at least 2"),
        cli.image_size_check(cfg.image_size), cli.out_check(cfg.out)])
    return cfg


# ------------------------------------------------------------------------------------------------------- models
def scratch_config(cfg):
    """The model configuration of a scratch init: the CPU preset's, with the --scratch-init HRNet init."""
    return HCMoCoConfig(init=cfg.scratch_init, bank_size=SCRATCH_BANK_SIZE, num_negatives=SCRATCH_NEGATIVES)


def backbone_input(batch, modality):
    """What the HRNet of `modality` reads: RGB, or depth through the person mask (hcmoco.depth_input)."""
    return batch["rgb"] if modality == "rgb" else depth_input(batch["depth"], batch["mask"][:, None])


def load_backbone(init, modality, default_cfg):
    """(backbone, report). scratch: a fresh HRNet of `default_cfg`; a train.py checkpoint: its
    encoders.<modality> weights in an HRNet of the checkpoint's config; anything else: an external HRNet
    state_dict (ImageNet weights, export.py's file) in an HRNet of the file's own configuration
    (HRNet.from_pretrained), `default_cfg.init` for what it lacks."""
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
    return HRNet.from_pretrained(init, default_cfg.init)


class Finetuner(nn.Module):
    """Backbone + task head for the single-modality tasks."""

    def __init__(self, cfg):
        super().__init__()
        self.task = TASKS[cfg.task]
        self.backbone, self.report = load_backbone(cfg.init, self.task.modality, scratch_config(cfg))
        self.head = self.task.head(sum(self.backbone.out_channels))

    def features(self, batch):
        return merge_maps(self.backbone(backbone_input(batch, self.task.modality)))

    def forward(self, batch):
        """-> (loss, predictions) for the batch's labels."""
        return self.task.loss(self.head(self.features(batch), batch), batch)


def contrast_model(cfg):
    """(HCMoCo, whether its targets keep training) of a versatility task: the model of --init (scratch: the scratch
    config) with the targets of --contrast (CONTRAST), then the checkpoint's weights."""
    contrast = "none" if cfg.contrast == "auto" and cfg.init == "scratch" else cfg.contrast
    if cfg.init == "scratch":
        model_cfg, state = scratch_config(cfg), None
    else:
        ckpt = load_checkpoint(cfg.init, "a train.py checkpoint", ("model", "config"))
        model_cfg, state = HCMoCoConfig.from_dict(ckpt["config"]["model"]), ckpt["model"]
    model = HCMoCo(replace(model_cfg, **CONTRAST.get(contrast, {})))
    if state is not None:
        model.load_state_dict(state)
    return model, contrast != "none"


class Versatile(nn.Module):
    """A full HCMoCo model plus the task's head on its dense embeddings (cross-modal, missing-modal)."""

    def __init__(self, cfg):
        super().__init__()
        self.hcmoco, self.contrast = contrast_model(cfg)
        self.task = TASKS[cfg.task]
        self.head = self.task.head(self.hcmoco.cfg.embed_dim)

    def embed(self, batch, modalities):
        """Dense embeddings of the given modalities, max-pooled when there are two."""
        maps = [self.hcmoco.dense_embed(batch, m) for m in modalities]
        return maps[0] if len(maps) == 1 else torch.maximum(*maps)

    def forward(self, batch, modalities):
        """-> (loss, predictions) of the head on the embeddings of `modalities`."""
        return self.task.loss(self.head(self.embed(batch, modalities), batch), batch)


def views(cfg):
    """(the modalities a versatility task's head trains on, {test name: the modalities it is tested on})."""
    if cfg.task == "cross-modal":
        return [cfg.source], {cfg.target: [cfg.target]}
    return ["rgb", "depth"], {"rgb": ["rgb"], "depth": ["depth"], "fused": ["rgb", "depth"]}


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
    """(train, test) for the task: the first of its real sets whose root is given, else synthetic people."""
    for option, reader in TASKS[cfg.task].real:
        root = getattr(cfg, option)
        if root:
            return reader(root, "train"), reader(root, "test")
    return (labelled_people(cfg.train_samples, cfg.image_size, TRAIN_SEED),
            labelled_people(cfg.test_samples, cfg.image_size, TEST_SEED))


def labelled_split(cfg):
    """(the labelled training images at --ratio, --subset; the test set) of the task."""
    train_set, test_set = datasets(cfg)
    return torch.utils.data.Subset(train_set, subset_indices(len(train_set), cfg.ratio, cfg.subset)), test_set


@functools.lru_cache(maxsize=4)
def labelled_people(n, image_size, seed):
    """n labelled synthetic people, rendered once per process: the experiment runner's many runs share them."""
    return data.Cached(synthetic.SyntheticHumans(n, image_size, seed=seed, domain="indoor"), KEYS)


@functools.lru_cache(maxsize=2)
def unlabelled_pairs(image_size, n):
    """The pre-training set (data.pretraining_set as the CPU preset builds it: n samples rendered once into memory),
    built once per process: the unlabelled pairs the versatility tasks keep training the contrastive targets on.
    Rendered in this process (workers=0): the experiment runner's jobs are pool workers, which cannot start a pool
    of their own."""
    return data.pretraining_set("synthetic", image_size, synthetic_samples=n, cache=True)


def loader(dataset, cfg, train_mode, steps=None):
    """Train: `steps` batches of seeded augmentations (data.StepBatches); test: one pass without augmentation.
    A task with camera-frame labels trains without rotation and flips (they would change the camera geometry)."""
    camera = TASKS[cfg.task].camera_frame
    transform = data.PairedTransform(cfg.image_size, train=train_mode, rotate=0 if camera else 30,
                                     flip=0 if camera else 0.5)
    ds = data.Transformed(dataset, transform)
    if train_mode:
        batches = data.StepBatches(len(dataset), min(cfg.batch_size, len(dataset)), cfg.seed, 0, steps)
        return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=cfg.workers,
                                           collate_fn=data.collate)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                       collate_fn=data.collate)


def train_loader_unlabelled(pairs, cfg):
    """Unlabelled paired batches (unlabelled_pairs, augmented) for the contrastive targets of the versatility
    tasks, one per fine-tuning step."""
    batches = data.StepBatches(len(pairs), cfg.batch_size, cfg.seed + 1, 0, cfg.steps)
    return torch.utils.data.DataLoader(pairs, batch_sampler=batches, num_workers=0, collate_fn=data.collate)


# ----------------------------------------------------------------------------------------------- train, evaluate
def run(cfg):
    """Fine-tune (or probe) and evaluate; writes cfg.out/metrics.json and, but for the probes, cfg.out/model.pt
    (load_finetuned); returns the metrics."""
    device = torch.device(cli.pick_device(cfg.device))
    torch.manual_seed(cfg.seed)
    kind = TASKS[cfg.task].kind
    run_kind = run_probe if kind == "probe" else run_versatile if kind == "versatile" else run_finetune
    return write_metrics(run_kind(cfg, device), cfg)


def run_finetune(cfg, device):
    """A backbone + head fine-tuned on the labelled subset."""
    model = Finetuner(cfg).to(device)  # reads --init before any data is rendered
    train_set, test_set = labelled_split(cfg)
    fit(model, train_set, cfg, device, lambda batch: model(batch)[0])
    return save_finetuned(model, dict(evaluate(model, test_set, cfg, device), train_images=len(train_set)), cfg)


def run_versatile(cfg, device):
    """The head trains on the labelled subset's views (views) while, with --contrast, the contrastive targets keep
    training on unlabelled pairs, a batch of each per step."""
    model = Versatile(cfg).to(device)  # reads --init before any data is rendered
    train_set, test_set = labelled_split(cfg)
    sources = views(cfg)[0]
    labelled = LabelledView(train_set, keep=sources)
    # the unlabelled pairs are the pre-training set, whose ids the checkpoint's memory bank is indexed by
    unlabelled = iter(train_loader_unlabelled(unlabelled_pairs(cfg.image_size, model.hcmoco.cfg.bank_size), cfg))

    def loss(batch):
        head, _ = model(batch, sources)
        if not model.contrast:
            return head
        contrastive, _ = model.hcmoco(data.to_device(next(unlabelled), device))
        return head + contrastive

    fit(model, labelled, cfg, device, loss)
    return save_finetuned(model, dict(evaluate(model, test_set, cfg, device), train_images=len(train_set)), cfg)


def fit(model, labelled, cfg, device, loss_of):
    """cfg.steps AdamW steps on loss_of(batch) over augmented batches of the labelled set, the learning rate on a
    cosine from cfg.lr to 0."""
    # AdamW rather than SGD: its step does not scale with the gradient, which under BatchNorm is ~1/||w|| and so
    # differs a hundredfold between a scratch backbone (official init, std 0.001) and a pre-trained one (README)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    bar = tqdm(loader(labelled, cfg, True, cfg.steps), total=cfg.steps, desc=cfg.task, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = cli.cosine_lr(cfg.lr, step, cfg.steps)
        loss = loss_of(data.to_device(batch, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=round(loss.item(), 4))


@torch.no_grad()
def predict(model, test_set, cfg, device, *args):
    """(predictions, the labels the task's metric reads) over the test set, one pass without augmentation, on the
    CPU; `args` follow the batch into the model (a Versatile's modalities)."""
    preds, labels = [], []
    for batch in loader(test_set, cfg, False):
        batch = data.to_device(batch, device)
        pred = model(batch, *args)[1]
        preds.append(tuple(p.cpu() for p in pred) if isinstance(pred, tuple) else pred.cpu())
        labels.append(batch[TASKS[cfg.task].label].cpu())
    return (tuple(map(torch.cat, zip(*preds))) if isinstance(preds[0], tuple) else torch.cat(preds)), torch.cat(labels)


def evaluate(model, test_set, cfg, device):
    """The task's metric on the test set; a versatility task's on each of its test views, prefixed with the view's
    name, without the per-class table."""
    model.eval()
    task = TASKS[cfg.task]
    if task.kind != "versatile":
        return task.metric(*predict(model, test_set, cfg, device))
    return {f"{name}_{k}": v for name, modalities in views(cfg)[1].items()
            for k, v in task.metric(*predict(model, test_set, cfg, device, modalities)).items() if k != "iou"}


def save_finetuned(model, metrics, cfg):
    """cfg.out/model.pt (the weights and the run's config, for load_finetuned); returns the metrics."""
    os.makedirs(cfg.out, exist_ok=True)
    cli.save_atomic(dict(model=model.state_dict(), config=asdict(cfg)), os.path.join(cfg.out, "model.pt"))
    return metrics


def write_metrics(metrics, cfg):
    """cfg.out/metrics.json (the metrics and the run's config), printed without the per-class table. Written
    through a temporary file and a rename: the experiment runner takes a run with a metrics.json as done."""
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "metrics.json")
    cli.save_json(dict(metrics, config=asdict(cfg)), path)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()
                      if k not in ("iou", "sweep")}))
    return metrics


def load_finetuned(out, map_location="cpu"):
    """(model in eval mode, Config) of the run that wrote `out`/model.pt; its --init must still be readable,
    because the backbone is rebuilt from it before the fine-tuned weights replace it."""
    ckpt = load_checkpoint(os.path.join(out, "model.pt"), "a finetune.py model", ("model", "config"), map_location)
    cfg = Config(**ckpt["config"])
    model = (Versatile if TASKS[cfg.task].kind == "versatile" else Finetuner)(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


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
    x = backbone_input(batch, modality)
    x = x if modality == "rgb" else x[:, :1]  # depth's three channels are copies
    B, _, H, W = x.shape
    ys, xs = torch.meshgrid(torch.linspace(0, 1, H, device=x.device), torch.linspace(0, 1, W, device=x.device),
                            indexing="ij")
    return F.avg_pool2d(torch.cat([xs.expand(B, 1, H, W), ys.expand(B, 1, H, W), x], 1), 4)


def run_probe(cfg, device):
    """A frozen linear probe of the backbone's merged 1/4 map (or of pixel_features for --init pixels): the
    learning rate is chosen among PROBE_LRS on a fifth of the labelled images held out, then the probe is
    retrained on all of them and tested."""
    modality = TASKS[cfg.task].modality
    if cfg.init == "pixels":
        features = lambda batch: pixel_features(batch, modality)  # noqa: E731
    else:
        backbone = load_backbone(cfg.init, modality, scratch_config(cfg))[0].to(device).eval()
        features = lambda batch: merge_maps(backbone(backbone_input(batch, modality)))  # noqa: E731
    train_set, test_set = labelled_split(cfg)
    x, y = probe_inputs(features, train_set, cfg, device)
    n_val = max(1, len(x) // 5)
    sweep = {lr: probe_miou(fit_probe(x[n_val:], y[n_val:], lr, cfg.steps, cfg.seed), x[:n_val], y[:n_val])["miou"]
             for lr in PROBE_LRS}
    lr = max(sweep, key=sweep.get)
    metrics = probe_miou(fit_probe(x, y, lr, cfg.steps, cfg.seed), *probe_inputs(features, test_set, cfg, device))
    return dict(metrics, lr=lr, sweep={str(k): round(v, 2) for k, v in sweep.items()})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["experiments"]:
        import experiments  # here: experiments.py imports this module
        return experiments.main(argv[1:])
    try:
        return run(parse_args(argv))
    except CheckpointError as e:  # --init
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
