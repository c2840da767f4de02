"""Downstream transfer of pre-trained encoders, and HCMoCo's versatility experiments.

    python finetune.py --task rgb-parsing   --init runs/hcmoco/stage2.pt --ratio 0.1
    python finetune.py --task depth-parsing --init scratch
    python finetune.py --task depth-pose    --init runs/hcmoco/stage2.pt
    python finetune.py --task dense-pose    --init hrnetv2_w18_imagenet_pretrained.pth
    python finetune.py --task cross-modal   --source rgb --target depth --init runs/hcmoco/stage2.pt
    python finetune.py --task missing-modal --init runs/hcmoco/stage2.pt

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
import os
import sys
import textwrap
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import data
from encoders import CheckpointError, back_project, load_checkpoint, merge_maps
from hcmoco import person_depth
from metrics import dense_pose_scores, pose_metrics, segmentation_metrics
from probe import PROBE_LRS, ProbeTask
from schema import IGNORE, NUM_CLASSES, NUM_JOINTS
from transfer import Start, Task, backbone_input, load_backbone, save_finetuned, scratch_config, subset_indices
from versatility import VersatilityTask


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
    """Cross-entropy against the part labels (IGNORE left out) -> (loss, predicted parts [B, H, W])."""
    return F.cross_entropy(logits, batch["parts"], ignore_index=IGNORE), logits.argmax(1)


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


# ------------------------------------------------------------------------------------------------- fine-tuning
class Finetuner(nn.Module):
    """Backbone + task head for the single-modality tasks."""

    def __init__(self, cfg, task):
        super().__init__()
        self.task = task
        self.backbone, self.report = load_backbone(cfg.start, task.modality, scratch_config(cfg))
        # ITOP labels its own 15 joints; the synthetic people MPII's 16
        joints = {"joints": data.ITOP.JOINTS if cfg.itop_root else NUM_JOINTS} if task.head is PoseHead else {}
        self.head = task.head(sum(self.backbone.out_channels), **joints)

    def features(self, batch):
        return merge_maps(self.backbone(backbone_input(batch, self.task.modality)))

    def forward(self, batch):
        """-> (loss, predictions) for the batch's labels."""
        return self.task.loss(self.head(self.features(batch), batch), batch)


class FinetuneTask(Task):
    """A backbone + head fine-tuned on the labelled subset (Finetuner)."""

    def model(self, cfg):
        return Finetuner(cfg, self)

    def run(self, cfg, device):
        model = self.model(cfg).to(device)  # reads --init before any data is rendered
        train_set, test_set = self.labelled_split(cfg)
        self.fit(model, train_set, cfg, device, lambda batch: model(batch)[0])
        return save_finetuned(model, dict(self.evaluate(model, test_set, cfg, device), train_images=len(train_set)),
                              cfg)


# ------------------------------------------------------------------------------------------------------- tasks
H36M = ("h36m_root", data.Human36MParts)  # a real labelled set: the option that gives its root, its reader
NTU = ("ntu_parsing_root", data.NTURGBDParsing)
ITOP = ("itop_root", data.ITOP)
# --task's choices; a task's kind says what a run of it does: FinetuneTask, VersatilityTask or ProbeTask
TASKS = {
    "rgb-parsing": FinetuneTask("rgb", SegHead, parsing_loss, segmentation_metrics, "parts", real=(H36M, NTU)),
    "depth-parsing": FinetuneTask("depth", SegHead, parsing_loss, segmentation_metrics, "parts", real=(NTU,)),
    "depth-pose": FinetuneTask("depth", PoseHead, pose_loss, pose_metrics, "joints3d", camera_frame=True,
                               real=(ITOP,)),
    "dense-pose": FinetuneTask("rgb", DensePoseHead, dense_pose_loss, dense_pose_scores, "iuv"),
    "cross-modal": VersatilityTask(None, SegHead, parsing_loss, segmentation_metrics, "parts", real=(NTU,)),
    "missing-modal": VersatilityTask(None, SegHead, parsing_loss, segmentation_metrics, "parts", real=(NTU,)),
    "rgb-probe": ProbeTask("rgb", None, None, segmentation_metrics, "parts"),
    "depth-probe": ProbeTask("depth", None, None, segmentation_metrics, "parts"),
}


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
    lr: float = 3e-3  # AdamW's peak learning rate, on a cosine to 0: scratch parses best at it (docs/findings.md)
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

    @property
    def start(self):
        """What init names: a transfer.Start for its words, else the path of a file."""
        return next((start for start in Start if start.value == self.init), self.init)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_options(parser, Config, defaults=False)
    given = vars(parser.parse_args(argv))
    cfg = Config(**given)
    cfg = replace(cfg, out=cfg.out or default_out(cfg))
    task = TASKS[cfg.task]
    probe = isinstance(task, ProbeTask)
    roots = [option for option, _ in (H36M, NTU, ITOP)]
    unread = unread_options(cfg)
    # the probe holds a fifth of its labelled images (at least one) out to choose its learning rate
    labelled = len(subset_indices(cfg.train_samples, cfg.ratio)) if cfg.train_samples > 0 else 0
    cli.check(parser, [
        *[(not ignored, f"--{k.replace('_', '-')}: {why}") for k, (ignored, why) in unread.items() if k in given],
        cli.device_check(cfg.device),
        *[(os.path.isdir(getattr(cfg, r)), f"--{r.replace('_', '-')} {getattr(cfg, r)}: not a folder")
          for r in roots if getattr(cfg, r)],
        (0 < cfg.ratio <= 1, "--ratio must be in (0, 1]"),
        (isinstance(cfg.start, Start) or os.path.exists(cfg.init),
         f"--init: {cfg.init} not found (give 'scratch' or a checkpoint)"),
        (cfg.start is not Start.PIXELS or probe,
         "--init pixels (the probe's control) only goes with --task rgb-probe / depth-probe"),
        (cfg.source != cfg.target, "--source and --target must be rgb and depth, one each"),
        *cli.positive(cfg, ("steps", "batch_size", "lr", "train_samples", "test_samples")),
        *cli.non_negative(cfg, ("weight_decay", "subset", "workers")),
        (not probe or labelled >= 2, f"--train-samples {cfg.train_samples} at --ratio {cfg.ratio} leaves {labelled} "
         "labelled image(s); the probe needs at least 2"),
        cli.image_size_check(cfg.image_size)])
    cli.check(parser, [cli.out_check(cfg.out)])  # last: it makes the folder
    return cfg


def unread_options(cfg):
    """{option: (the run of cfg ignores it, why)} for the options that only some runs read."""
    task = TASKS[cfg.task]
    probe = isinstance(task, ProbeTask)
    readers = {r: [t for t, v in TASKS.items() if r in dict(v.real)] for r, _ in (H36M, NTU, ITOP)}
    return {
        "source": (cfg.task != "cross-modal", "only --task cross-modal reads it"),
        "target": (cfg.task != "cross-modal", "only --task cross-modal reads it"),
        "contrast": (not isinstance(task, VersatilityTask), "only --task cross-modal and missing-modal read it"),
        "scratch_init": (cfg.start is not Start.SCRATCH, "only --init scratch reads it"),
        "lr": (probe, f"the probes choose their learning rate among {', '.join(map(str, PROBE_LRS))} on held-out "
                      "labels"),
        "weight_decay": (probe, "the probes do not read it (theirs is 1e-4)"),
        **{r: (cfg.task not in tasks, f"--task {cfg.task} does not read it (--task {' / '.join(tasks)} does)")
           for r, tasks in readers.items()}}


def default_out(cfg):
    """runs/finetune/<task>/<init>, so that runs of other tasks and inits do not overwrite each other: the task
    (cross-modal with its direction), the init (scratch, pixels, or the checkpoint's folder and name:
    runs/hcmoco/stage2.pt -> hcmoco-stage2) and a label ratio below 1."""
    task = f"{cfg.task}-{cfg.source}-to-{cfg.target}" if cfg.task == "cross-modal" else cfg.task
    init = cfg.init
    if not isinstance(cfg.start, Start):
        folder, name = os.path.split(os.path.normpath(init))
        init = "-".join(filter(None, (os.path.basename(folder), os.path.splitext(name)[0])))
    return os.path.join("runs", "finetune", task, init + (f"-ratio{cfg.ratio:g}" if cfg.ratio < 1 else ""))


# --------------------------------------------------------------------------------------------------------- runs
def run(cfg):
    """Run the task (fine-tune, probe, or a versatility run) and evaluate; writes cfg.out/metrics.json and, but for
    the probes, cfg.out/model.pt (load_finetuned); returns the metrics."""
    device = torch.device(cli.pick_device(cfg.device))
    torch.manual_seed(cfg.seed)
    return write_metrics(TASKS[cfg.task].run(cfg, device), cfg)


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
    model = TASKS[cfg.task].model(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


def main(argv=None):
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
