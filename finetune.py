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

Data: synthetic by default, a labelled training set (--train-samples people) and a test set (--test-samples), each
rendered from its own seed and disjoint from the pre-training samples; `--ratio` keeps a uniformly spaced subset
of the training set, as the paper does. With --h36m-root / --ntu-parsing-root the parsing tasks read the real
datasets, with --itop-root depth-pose reads ITOP's side view (train and test; its 15 joints).
Inits: `scratch`, a train.py checkpoint (stage1.pt = CMC, stage2.pt = HCMoCo or an ablation row), a fine-tuned
model.pt (its backbone), or an external HRNet state_dict (e.g. ImageNet weights); a file that does not fill the
HRNet is refused.
"""
import argparse
import functools
import os
import sys
import textwrap
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
from hcmoco import TARGETS, HCMoCo, HCMoCoConfig, build_hrnet, depth_input, hrnet_prefixes, person_depth

NUM_CLASSES = 25
KEYS = ("rgb", "depth", "mask", "keypoints", "keypoints_visible", "parts", "iuv", "joints3d", "intrinsics", "present",
        "index")  # what a labelled synthetic item carries
PROBE_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
TRAIN_SEED, TEST_SEED = 100, 200
# A scratch model is the one train.py's CPU preset starts from: a memory bank of one entry per pre-training sample
# (its synthetic_samples) drawing its num_negatives, its HRNets' bn_momentum; the numbers are copied so that
# fine-tuning does not import the training script
SCRATCH_BANK_SIZE, SCRATCH_NEGATIVES, SCRATCH_BN_MOMENTUM = 4096, 256, 0.1


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
    """parsing_metrics of predicted part maps against the labels, both [N, H, W], and their image_counts under
    'per_image' (write_metrics saves those apart, for experiments.image_bootstrap)."""
    return dict(parsing_metrics(confusion_matrix(pred, label)), per_image=image_counts(pred, label))


def image_counts(pred, label, num_classes=NUM_CLASSES, ignore=255):
    """Per image and class: pixels of the intersection of prediction and truth, of their union, and of the truth.
    pred, label [N, H, W] -> [N, 3, K] long; summed over any set of images they give that set's IoUs."""
    classes = torch.arange(num_classes, device=pred.device).view(1, -1, 1, 1)
    counts = []
    for p, t in zip(pred.split(64), label.split(64)):
        keep = (t != ignore)[:, None]
        p, t = (p[:, None] == classes) & keep, (t[:, None] == classes) & keep  # [n, K, H, W]
        counts.append(torch.stack([(p & t).sum((2, 3)), (p | t).sum((2, 3)), t.sum((2, 3))], 1))
    return torch.cat(counts)


def miou_of_counts(counts):
    """mIoU (%) of summed image_counts [..., N, 3, K] over the classes in the truth -> [...]."""
    inter, union, truth = counts.sum(-3).unbind(-2)
    iou = inter / union.clamp(min=1)
    seen = truth > 0
    return 100 * (iou * seen).sum(-1) / seen.sum(-1)


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
ITOP = ("itop_root", data.ITOP)


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
    "depth-pose": Task("finetune", "depth", PoseHead, pose_loss, pose_metrics, "joints3d", camera_frame=True,
                       real=(ITOP,)),
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
    task: Literal[tuple(TASKS)] = "rgb-parsing"  # what the head learns (the tasks above)
    init: str = "scratch"  # scratch | a train.py stage file | a fine-tuned model.pt | an HRNet state_dict | pixels
    scratch_init: Literal["he", "official"] = "he"  # the HRNet init of a scratch backbone (official: std 0.001)
    ratio: float = 1.0  # the share of the labelled training images that trains, in (0, 1]
    subset: int = 0  # which labelled subset at --ratio: 0 uniformly spaced (the paper's), s > 0 random, seeded by s
    source: Literal["rgb", "depth"] = "rgb"  # cross-modal: the modality the head trains on
    target: Literal["rgb", "depth"] = "depth"  # cross-modal: the modality it is tested on
    contrast: Literal["auto", "none", "global", "full"] = "auto"  # cross/missing-modal: the targets that keep training
    out: str | None = None  # the run's folder (default: runs/finetune/<task>/<init>)
    steps: int = 300  # fine-tuning steps (a probe: the steps of each of its fits)
    batch_size: int = 8  # images per step
    lr: float = 1e-3  # AdamW's peak learning rate, on a cosine to 0
    weight_decay: float = 1e-4  # AdamW's
    image_size: int = 96  # pixels, square
    train_samples: int = 400  # labelled synthetic training people, before --ratio
    test_samples: int = 500  # the fixed held-out test set (TEST_SEED)
    h36m_root: str = ""  # Human3.6M parsing's folder: rgb-parsing reads it instead of synthetic people
    ntu_parsing_root: str = ""  # NTURGBD-Parsing-4K's folder: parsing and cross/missing-modal read it
    itop_root: str = ""  # ITOP's folder: depth-pose reads its side view (train and test splits, 15 joints)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when there is a GPU
    seed: int = 0  # of the head's initialisation, the batches and the augmentations
    workers: int = 2  # data-loading processes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_options(parser, Config, defaults=False)
    given = vars(parser.parse_args(argv))
    cfg = Config(**given)
    cfg = replace(cfg, out=cfg.out or default_out(cfg))
    task = TASKS[cfg.task]
    probe = task.kind == "probe"
    roots = [option for option, _ in (H36M, NTU, ITOP)]
    readers = {r: [t for t, v in TASKS.items() if r in dict(v.real)] for r in roots}
    unread = {  # option: (the run would ignore it, why)
        "source": (cfg.task != "cross-modal", "only --task cross-modal reads it"),
        "target": (cfg.task != "cross-modal", "only --task cross-modal reads it"),
        "contrast": (task.kind != "versatile", "only --task cross-modal and missing-modal read it"),
        "scratch_init": (cfg.init != "scratch", "only --init scratch reads it"),
        "lr": (probe, f"the probes choose their learning rate among {', '.join(map(str, PROBE_LRS))} on held-out "
                      "labels"),
        "weight_decay": (probe, "the probes do not read it (theirs is 1e-4)"),
        **{r: (cfg.task not in tasks, f"--task {cfg.task} does not read it (--task {' / '.join(tasks)} does)")
           for r, tasks in readers.items()}}
    # the probe holds a fifth of its labelled images (at least one) out to choose its learning rate
    labelled = len(subset_indices(cfg.train_samples, cfg.ratio)) if cfg.train_samples > 0 else 0
    cli.check(parser, [
        *[(not ignored, f"--{k.replace('_', '-')}: {why}") for k, (ignored, why) in unread.items() if k in given],
        cli.device_check(cfg.device),
        *[(os.path.isdir(getattr(cfg, r)), f"--{r.replace('_', '-')} {getattr(cfg, r)}: not a folder")
          for r in roots if getattr(cfg, r)],
        (0 < cfg.ratio <= 1, "--ratio must be in (0, 1]"),
        (cfg.init in ("scratch", "pixels") or os.path.exists(cfg.init),
         f"--init: {cfg.init} not found (give 'scratch' or a checkpoint)"),
        (cfg.init != "pixels" or probe,
         "--init pixels (the probe's control) only goes with --task rgb-probe / depth-probe"),
        (cfg.source != cfg.target, "--source and --target must be rgb and depth, one each"),
        *cli.positive(cfg, ("steps", "batch_size", "lr", "train_samples", "test_samples")),
        *cli.non_negative(cfg, ("weight_decay", "subset", "workers")),
        (not probe or labelled >= 2, f"--train-samples {cfg.train_samples} at --ratio {cfg.ratio} leaves {labelled} "
         "labelled image(s); the probe needs at least 2"),
        cli.image_size_check(cfg.image_size)])
    cli.check(parser, [cli.out_check(cfg.out)])  # last: it makes the folder
    return cfg


def default_out(cfg):
    """runs/finetune/<task>/<init>, so that runs of other tasks and inits do not overwrite each other: the task
    (cross-modal with its direction), the init (scratch, pixels, or the checkpoint's folder and name:
    runs/hcmoco/stage2.pt -> hcmoco-stage2) and a label ratio below 1."""
    task = f"{cfg.task}-{cfg.source}-to-{cfg.target}" if cfg.task == "cross-modal" else cfg.task
    init = cfg.init
    if init not in ("scratch", "pixels"):
        folder, name = os.path.split(os.path.normpath(init))
        init = "-".join(filter(None, (os.path.basename(folder), os.path.splitext(name)[0])))
    return os.path.join("runs", "finetune", task, init + (f"-ratio{cfg.ratio:g}" if cfg.ratio < 1 else ""))


# ------------------------------------------------------------------------------------------------------- models
def scratch_config(cfg):
    """The model configuration of a scratch init: the CPU preset's, with the --scratch-init HRNet init."""
    return HCMoCoConfig(init=cfg.scratch_init, bank_size=SCRATCH_BANK_SIZE, num_negatives=SCRATCH_NEGATIVES,
                        bn_momentum=SCRATCH_BN_MOMENTUM)


def backbone_input(batch, modality):
    """What the HRNet of `modality` reads: RGB, or depth through the person mask (hcmoco.depth_input)."""
    return batch["rgb"] if modality == "rgb" else depth_input(batch["depth"], batch["mask"][:, None])


def load_backbone(init, modality, default_cfg):
    """(backbone, report). scratch: a fresh HRNet of `default_cfg`; otherwise the HRNet of `modality` that the file
    holds, copied by HRNet.load_state (which refuses a file that does not fill it): a train.py checkpoint's
    encoders.<modality> in an HRNet of the checkpoint's config; a fine-tuned model.pt's backbone or an external
    HRNet state_dict (ImageNet weights, export.py's file) in an HRNet of the file's own configuration
    (HRNet.from_pretrained), `default_cfg.init` for what it lacks."""
    if init == "scratch":
        return build_hrnet(default_cfg), {}
    ckpt = load_checkpoint(init, "a train.py checkpoint, a finetune.py model.pt or an HRNet state_dict")
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(config, dict) and "model" in config:  # a train.py stage file
        arch = HCMoCoConfig.from_dict(config["model"])
        if modality == "depth" and arch.depth_encoder != "hrnet":
            raise CheckpointError(f"{init}: its depth encoder is a {arch.depth_encoder}, not an HRNet")
        net = build_hrnet(arch)
        return net, net.load_state(ckpt, init, hrnet_prefixes(modality))
    return HRNet.from_pretrained(init, default_cfg.init, hrnet_prefixes(modality), ckpt, build_hrnet(default_cfg),
                                 default_cfg.bn_momentum)


class Finetuner(nn.Module):
    """Backbone + task head for the single-modality tasks."""

    def __init__(self, cfg):
        super().__init__()
        self.task = TASKS[cfg.task]
        self.backbone, self.report = load_backbone(cfg.init, self.task.modality, scratch_config(cfg))
        # ITOP labels its own 15 joints; the synthetic people MPII's 16
        joints = {"joints": data.ITOP.JOINTS if cfg.itop_root else len(synthetic.JOINT_NAMES)} \
            if self.task.head is PoseHead else {}
        self.head = self.task.head(sum(self.backbone.out_channels), **joints)

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
        if not (isinstance(ckpt["config"], dict) and "model" in ckpt["config"]):  # e.g. a fine-tuned model.pt
            raise CheckpointError(f"{cfg.init}: not a train.py checkpoint (no model config): {cfg.task} starts from "
                                  "the whole pre-trained model of a stage file")
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
    """(the modalities a versatility task's head trains on, {test name: the modalities it is tested on}). A cross-modal
    head is tested on the target modality and, for reference, on its own: the transfer keeps that much of it."""
    if cfg.task == "cross-modal":
        return [cfg.source], {cfg.target: [cfg.target], cfg.source: [cfg.source]}
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
            try:
                sets = reader(root, "train"), reader(root, "test")
            except (OSError, ValueError) as e:  # a missing split list, a malformed line
                raise SystemExit(f"error: --{option.replace('_', '-')} {root}: {' '.join(str(e).split())}") from e
            if not all(len(s) for s in sets):
                raise SystemExit(f"error: --{option.replace('_', '-')} {root}: a split lists no image")
            return sets
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
        cli.set_lr(optimizer, cli.cosine_lr(cfg.lr, step, cfg.steps))
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
    """cfg.out/metrics.json (the metrics and the run's config), and one line: the task, the init, the metrics with
    their units (metrics_text) and what was written. Written through a temporary file and a rename: the
    experiment runner takes a run with a metrics.json as done."""
    os.makedirs(cfg.out, exist_ok=True)
    per_image = {k: v for k, v in metrics.items() if k.endswith("per_image")}
    metrics = {k: v for k, v in metrics.items() if k not in per_image}
    if per_image:
        cli.save_atomic(per_image, os.path.join(cfg.out, "per_image.pt"))
    path = os.path.join(cfg.out, "metrics.json")
    cli.save_json(dict(metrics, config=asdict(cfg)), path)
    written = path + (", model.pt" if os.path.exists(os.path.join(cfg.out, "model.pt")) else "")
    print(f"{cfg.task} from {cfg.init}: {metrics_text(metrics)}; wrote {written}")
    return metrics


# a metric's name (the end of a versatility task's view_name keys) -> (label, unit)
METRIC_LABELS = {"miou": ("mIoU", " %"), "macc": ("mAcc", " %"), "aacc": ("aAcc", " %"), "acc10cm": ("acc@10cm", " %"),
                 "mpjpe_cm": ("MPJPE", " cm"), "part_acc": ("part accuracy", " %"), "uv_acc": ("uv accuracy", " %"),
                 "gps": ("GPS", " %"), "train_images": ("labelled training images", ""), "lr": ("probe lr", "")}


def metrics_text(metrics):
    """'mIoU 14.52 %, mAcc 20.10 %, ...' of a run's metrics (the per-class table and the probe's sweep aside)."""
    parts = []
    for k, v in metrics.items():
        name = next((n for n in METRIC_LABELS if k == n or k.endswith(f"_{n}")), None)
        if name is not None:
            label, unit = METRIC_LABELS[name]
            view = k[:-len(name)].rstrip("_").replace("_", " ")
            parts.append(f"{view + ' ' if view else ''}{label} {f'{v:.2f}' if isinstance(v, float) else v}{unit}")
    return ", ".join(parts)


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


def cell_labels(y, size):
    """The majority label of each cell of a `size` (h, w) grid over part labels y [N, H, W], among the cell's
    labelled pixels (255 where it has none). A feature cell sees its whole area: a nearest-neighbour downsampling
    would label it with one corner pixel's part."""
    cells = []
    for part in y.split(64):
        votes = F.one_hot(torch.where(part == 255, NUM_CLASSES, part), NUM_CLASSES + 1)[..., :NUM_CLASSES]
        votes = F.adaptive_avg_pool2d(votes.permute(0, 3, 1, 2).float(), size)  # [n, K, h, w]
        cells.append(torch.where(votes.sum(1) > 0, votes.argmax(1), 255))
    return torch.cat(cells)


def fit_probe(x, y, lr, steps, seed, pixels=4096):
    """A Probe on frozen features x [N, C, h, w] against part labels y [N, H, W], trained at the features'
    resolution (each cell's majority label, cell_labels) on `pixels` random labelled cells per step, with
    class-balanced cross-entropy (weights 1 / class frequency, normalised to mean 1 over the classes present),
    AdamW, cosine."""
    g = torch.Generator().manual_seed(seed)
    small = cell_labels(y, x.shape[-2:])  # [N, h, w]
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
        cli.set_lr(optimizer, cli.cosine_lr(lr, step, steps))
        pick = torch.randint(len(feats), (pixels,), generator=g)
        logits = feats[pick] @ probe.conv.weight[:, :, 0, 0].T + probe.conv.bias  # the 1x1 conv on single cells
        loss = F.cross_entropy(logits, labels[pick], weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe.eval()


@torch.no_grad()
def probe_miou(probe, x, y):
    """segmentation_metrics of a probe on features x, logits upsampled bilinearly to the labels' size, as
    SegHead's."""
    pred = torch.cat([F.interpolate(probe(x[i:i + 64]), size=y.shape[-2:], mode="bilinear", align_corners=False)
                      .argmax(1) for i in range(0, len(x), 64)])
    return segmentation_metrics(pred, y)


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
    sweep = {}
    for k, lr in enumerate(PROBE_LRS, 1):
        sweep[lr] = probe_miou(fit_probe(x[n_val:], y[n_val:], lr, cfg.steps, cfg.seed), x[:n_val], y[:n_val])["miou"]
        print(f"[{k}/{len(PROBE_LRS)}] probe at lr {lr:g}: held-out mIoU {sweep[lr]:.2f} % ({n_val} images)")
    lr = max(sweep, key=sweep.get)
    metrics = probe_miou(fit_probe(x, y, lr, cfg.steps, cfg.seed), *probe_inputs(features, test_set, cfg, device))
    return dict(metrics, lr=lr, sweep={str(k): round(v, 2) for k, v in sweep.items()})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["experiments"]:
        import experiments  # here: experiments.py imports this module
        return experiments.main(argv[1:])
    cfg = parse_args(argv)
    print(f"{cfg.task} from {cfg.init} on {cli.pick_device(cfg.device)}; the resolved config (also in "
          f"{os.path.join(cfg.out, 'metrics.json')} at the end):\n" + textwrap.fill(
              " ".join(f"{k}={v}" for k, v in asdict(cfg).items()), 118, initial_indent="    ",
              subsequent_indent="    "))
    try:
        return run(cfg)
    except (CheckpointError, FileNotFoundError, ImportError) as e:  # --init, a dataset's files, h5py for ITOP
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C
        print(f"\ninterrupted: nothing of this run is saved (model.pt and metrics.json are written at its end, in "
              f"{cfg.out}); run the command again to start over", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
