"""Frozen linear probes: what a backbone's merged 1/4 map holds linearly about the body parts, with nothing of the
backbone trained, and the control a probe is read against, pixel (x, y) and the input itself (--init pixels).

    python finetune.py --task depth-probe --init runs/hcmoco/stage2.pt    # also rgb-probe; --init pixels, scratch

A probe is a 1x1 convolution on the standardised features, fitted to each 1/4-grid cell's majority label; its
learning rate is the best of PROBE_LRS on held-out labels.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import data
from encoders import merge_maps
from metrics import segmentation_metrics
from schema import IGNORE, NUM_CLASSES
from transfer import Start, Task, backbone_input, load_backbone, loader, scratch_config

PROBE_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


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
    labelled pixels (IGNORE where it has none). A feature cell sees its whole area: a nearest-neighbour downsampling
    would label it with one corner pixel's part."""
    cells = []
    for part in y.split(64):
        votes = F.one_hot(torch.where(part == IGNORE, NUM_CLASSES, part), NUM_CLASSES + 1)[..., :NUM_CLASSES]
        votes = F.adaptive_avg_pool2d(votes.permute(0, 3, 1, 2).float(), size)  # [n, K, h, w]
        cells.append(torch.where(votes.sum(1) > 0, votes.argmax(1), IGNORE))
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
    keep = labels != IGNORE
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


class ProbeTask(Task):
    """A frozen linear probe of the backbone's merged 1/4 map (or of pixel_features for --init pixels): the
    learning rate is chosen among PROBE_LRS on a fifth of the labelled images held out, then the probe is
    retrained on all of them and tested. Saves no model."""

    def run(self, cfg, device):
        modality = self.modality
        if cfg.start is Start.PIXELS:
            features = lambda batch: pixel_features(batch, modality)  # noqa: E731
        else:
            backbone = load_backbone(cfg.start, modality, scratch_config(cfg))[0].to(device).eval()
            features = lambda batch: merge_maps(backbone(backbone_input(batch, modality)))  # noqa: E731
        train_set, test_set = self.labelled_split(cfg)
        x, y = probe_inputs(features, train_set, cfg, device)
        n_val = max(1, len(x) // 5)
        sweep = {}
        for k, lr in enumerate(PROBE_LRS, 1):
            sweep[lr] = probe_miou(fit_probe(x[n_val:], y[n_val:], lr, cfg.steps, cfg.seed), x[:n_val],
                                   y[:n_val])["miou"]
            print(f"[{k}/{len(PROBE_LRS)}] probe at lr {lr:g}: held-out mIoU {sweep[lr]:.2f} % ({n_val} images)")
        lr = max(sweep, key=sweep.get)
        metrics = probe_miou(fit_probe(x, y, lr, cfg.steps, cfg.seed), *probe_inputs(features, test_set, cfg, device))
        return dict(metrics, lr=lr, sweep={str(k): round(v, 2) for k, v in sweep.items()})
