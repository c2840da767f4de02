r"""HCMoCo pre-training, two stages as published: stage 1 trains the sample-level target alone (Eq. 2), stage 2
starts from it and trains the whole hierarchy (Eq. 1).

    python train.py --stage 2                      # both stages, synthetic data, CPU preset without a GPU
    python train.py --stage 1                      # stage 1 only
    python train.py --stage 2 --targets global+hard --out runs/hard   # an ablation row of Table 3
    torchrun --nproc_per_node 8 train.py --stage 2 --preset paper --data ntu+mpii --ntu-root N --mpii-root M \
        --backbone-init hrnetv2_w18_imagenet_pretrained.pth      # as published: both HRNets from ImageNet

Every option has its preset's value unless given (Config, PRESETS); the resolved config is printed at the start.
Outputs in --out: config.json (that config), stage1.pt, stage2.pt (model with its memory bank, optimiser, step, RNG
state, config; written atomically), log.jsonl (one row per logged step) and loss.png. A finished stage file in
--out is reused when the options that shape it are the same (stage 2's own options do not shape stage1.pt; those
that only manage the run, RUN_OPTIONS, shape neither); a stage file made with other options stops the run, naming
them, unless --overwrite discards it. --resume continues a killed run (Ctrl-C prints the command).
"""
import argparse
import json
import math
import os
import shlex
import sys
import textwrap
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, replace
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
from data import PRETRAIN_SOURCES
from encoders import CheckpointError, HRNet, apply_affine, load_checkpoint
from hcmoco import TARGETS, HCMoCo, HCMoCoConfig, hrnet_prefixes, sample_at

MOVED = (30.0, 1.2, (8.0, -6.0))  # the monitors' moved depth view: rotation (degrees), scale, shift (pixels)
STAGE_SEED = 1000  # stage k draws its batches and augmentations from seed + k * STAGE_SEED


@dataclass
class Config:
    """Every option of a run; the defaults are the CPU preset (2 cores, both stages in under 10 minutes), each
    choice measured against the published recipe (docs/findings.md): He init (no ImageNet weights to replace
    the official std-0.001 init), AdamW with a short warm-up, in-batch Eq. 2 at tau 0.1 (a bank revisited a few
    times a run holds stale positives), 4,096 people rendered once into memory and augmented a batch at a time, the
    small HRNet at 64 px with batch 64 in bf16 where the CPU has it (more samples per second), 6 epochs per stage;
    48 dense points: a person covers 25-60 cells of the 16 x 16 grid, drawn with replacement; Eq. 6 weighted 6
    times the published weight (lambda_sparse 6: its intra-sample part is what the sparse level adds here);
    BatchNorm running statistics that keep up with a short run."""
    stage: Literal[1, 2] = 2  # train up to this stage
    preset: Literal["auto", "cpu", "paper"] = "cpu"  # the other options' defaults; auto: paper on a GPU, else cpu
    data: Literal[PRETRAIN_SOURCES] = "synthetic"  # rendered people, real data or both (data.pretraining_set)
    ntu_root: str | None = None  # NTU RGB+D's folder (data.NTURGBD)
    mpii_root: str | None = None  # MPII's folder (data.MPII)
    mpii_split: str = "train"  # MPII reads <mpii-root>/annot/<split>.json (train.json as published)
    coco_root: str | None = None  # COCO's folder (data.COCOKeypoints)
    targets: Literal[tuple(TARGETS)] = "global+soft+sparse"  # stage 2's Table 3 row; stage 1 is always 'global'
    depth_encoder: Literal["hrnet", "pointnet"] = "hrnet"  # of depth: an HRNet, or PointNet++ on the depth's points
    keypoint_graph: Literal["masked", "published"] = "masked"  # the keypoint GCN's (HCMoCoConfig.keypoint_graph)
    hrnet: Literal["small", "w18", "w32", "w48"] = "small"  # the HRNets: the small CPU one, or a published width
    width: int = 16  # of the small HRNet
    init: Literal["official", "he"] = "he"  # the HRNets' init when there is no --backbone-init
    # published 0.01 averages the running statistics over ~100 steps, stale in a run of a few hundred (README)
    bn_momentum: float = 0.1  # of the HRNets' BatchNorm running statistics (the eval-mode features)
    backbone_init: str | None = None  # both HRNets' weights: an HRNet file (ImageNet), a stage file, a model.pt
    image_size: int = 64  # pixels, square
    synthetic_samples: int = 4096  # people rendered for --data synthetic, 3/4 with depth
    cache: bool = True  # render the synthetic set once into memory
    global_loss: Literal["bank", "batch", "mmv"] = "batch"  # Eq. 2's negatives: the bank or the batch; or MMV's NCE
    num_negatives: int = 256  # drawn from the memory bank
    momentum: float = 0.5  # of the memory bank
    dense_points: int = 48  # per image
    # batch: the CPU recipe (rotation, scale, shift, flip, colour jitter) on whole batches in the training loop
    # (data.BatchAugment); published: the published NTU RGB+D / MPII recipes item by item in the loader's processes
    augment: Literal["batch", "published"] = "batch"  # where and how the pairs are augmented
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16 autocast: auto = on CUDA and on CPUs with native bf16
    tau: float = 0.1  # the temperature of the contrastive terms
    lambda_global: float = 1.0  # Eq. 1's weight of the sample-level term
    lambda_dense: float = 1.0  # Eq. 1's weight of the dense term
    lambda_sparse: float = 6.0  # Eq. 1's weight of the sparse term
    epochs: int = 6  # per stage
    steps: int | None = None  # per stage, instead of epochs (smoke runs)
    batch_size: int = 64  # global, over all ranks
    optimizer: Literal["sgd", "adamw"] = "adamw"  # SGD with momentum 0.9 (published) or AdamW; weight decay 1e-4
    lr: float = 3e-3  # the peak learning rate of each stage, on a cosine to 0
    warmup: int = 20  # linear learning-rate warm-up steps per stage, under the cosine schedule
    # 'step': a cosine over the steps down to 0; 'epoch': as published, constant within epoch e = 1..E at
    # lr_min + (lr - lr_min) (1 + cos(pi e / E)) / 2 with lr_min = lr x 1e-3 (learning_rate)
    lr_schedule: Literal["step", "epoch"] = "step"  # the learning rate's cosine: per step, or per epoch
    eval_every: int = 64  # steps between held-out monitors
    heldout: int = 256  # held-out people the monitors embed
    out: str = "runs/hcmoco"  # the run's folder: config.json, stage1.pt, stage2.pt, log.jsonl, loss.png
    resume: bool = False  # continue the unfinished stage in --out where it stopped
    overwrite: bool = False  # discard the stage files in --out made with other options, or unfinished, and retrain
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when there is a GPU
    seed: int = 0  # of the initialisation, the batches and the augmentations
    workers: int = 2  # data-loading processes
    compile: bool = False  # torch.compile the encoders
    save_every: int = 100  # steps between checkpoints
    log_every: int = 10  # steps between rows of log.jsonl


# What a stage file depends on: every option but these, which manage the run and leave the model as it is (a new
# option shapes the stage files until it is listed here). Stage 1 also does not read STAGE2_OPTIONS.
RUN_OPTIONS = ("stage", "out", "resume", "overwrite", "device", "workers", "compile", "eval_every", "heldout",
               "log_every", "save_every")
STAGE2_OPTIONS = ("targets", "lambda_dense", "lambda_sparse", "dense_points")

PRESETS = {
    "cpu": Config(),
    # supp. 1.1 and the published scripts: HRNet-W18 at 320 px, batch 224, SGD lr 0.03 with the per-epoch cosine
    # schedule, 100 + 100 epochs, 16,384 negatives from the memory bank at tau 0.07, 400 dense points per image, the
    # published augmentation (build_dataset), keypoint graph and BatchNorm momentum
    "paper": Config(preset="paper", hrnet="w18", bn_momentum=0.01, keypoint_graph="published", image_size=320,
                    synthetic_samples=65536, cache=False, global_loss="bank", num_negatives=16384, dense_points=400,
                    tau=0.07, epochs=100, batch_size=224, optimizer="sgd", lr=0.03, warmup=0, lr_schedule="epoch",
                    eval_every=500, augment="published", lambda_sparse=1.0),
}


def preset_defaults():
    """--help's default of each option: its value in both presets, or the value of each."""
    cpu, paper = asdict(PRESETS["cpu"]), asdict(PRESETS["paper"])
    return {k: v if v == paper[k] else f"{v}, paper preset {paper[k]}" for k, v in cpu.items()} | {"preset": "auto"}


def resolved(cfg, device):
    """cfg on `device` ('cpu' | 'cuda'), its --precision auto made fp32 or bf16: what config.json records and what a
    stage file's options are compared with."""
    return replace(cfg, device=device, precision="bf16" if cli.use_bf16(cfg.precision, device) else "fp32")


def parse_args(argv=None):
    """The run's complete Config: the preset's values, replaced by the options given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_options(parser, Config, defaults=False, shown=preset_defaults())
    given = vars(parser.parse_args(argv))
    cli.check(parser, [cli.device_check(given.get("device", "auto"))])  # before the device picks the preset
    device = cli.pick_device(given.pop("device", "auto"))
    preset = given.pop("preset", "auto")
    preset = {"auto": "paper" if device == "cuda" else "cpu"}.get(preset, preset)
    cfg = resolved(replace(PRESETS[preset], **given), device)
    roots = {"synthetic": (), "synthetic+mpii": ("mpii_root",), "mpii": ("mpii_root",),
             "ntu+mpii": ("ntu_root", "mpii_root"), "ntu+coco": ("ntu_root", "coco_root")}
    cli.check(parser, [
        *[(getattr(cfg, r), f"--data {cfg.data} needs --{r.replace('_', '-')}") for r in roots[cfg.data]],
        *[(getattr(cfg, r) is None, f"--{r.replace('_', '-')}: --data {cfg.data} does not read it")
          for r in ("ntu_root", "mpii_root", "coco_root") if r not in roots[cfg.data]],
        ("mpii_split" not in given or "mpii_root" in roots[cfg.data],
         f"--mpii-split: --data {cfg.data} does not read MPII"),
        (cfg.backbone_init is None or os.path.isfile(cfg.backbone_init), f"--backbone-init: {cfg.backbone_init} not found"),
        *cli.positive(cfg, ("epochs", "batch_size", "lr", "width", "num_negatives", "dense_points", "tau", "eval_every",
                            "save_every", "log_every")),
        *cli.positive(cfg, ("steps",) if cfg.steps is not None else ()),
        (cfg.warmup >= 0, f"--warmup must be 0 or more, got {cfg.warmup}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (0 < cfg.bn_momentum <= 1, f"--bn-momentum must be in (0, 1], got {cfg.bn_momentum}"),
        *[(getattr(cfg, n) >= 0, f"--{n.replace('_', '-')} must be 0 or more, got {getattr(cfg, n)}")
          for n in ("lambda_global", "lambda_dense", "lambda_sparse")],
        (cfg.heldout >= 2, f"--heldout must be at least 2 (the monitors compare people), got {cfg.heldout}"),
        cli.image_size_check(cfg.image_size),
        (cfg.synthetic_samples >= 4,
         f"--synthetic-samples must be at least 4 (3/4 with depth, 1/4 without), got {cfg.synthetic_samples}"),
        (cfg.workers >= 0, f"--workers must be 0 or more, got {cfg.workers}"),
        (not (cfg.resume and cfg.overwrite), "--resume continues the stage files in --out, --overwrite discards "
         "them: give one"),
        (not cfg.resume or any(os.path.exists(stage_path(cfg.out, k)) for k in range(1, cfg.stage + 1)),
         f"--resume: nothing to resume in {cfg.out} (no stage file); leave --resume out to start a new run")])
    cli.check(parser, [cli.out_check(cfg.out)])  # last: it makes the folder
    return cfg


# ----------------------------------------------------------------------------------------------------------- data
def build_dataset(cfg):
    """data.pretraining_set of the config: item by item with the published recipes, or not at all when the training
    loop augments whole batches (--augment batch)."""
    recipes = ("ntu", "mpii") if cfg.augment == "published" else None
    return data.pretraining_set(cfg.data, cfg.image_size, recipes,
                                cfg.synthetic_samples, cfg.seed, cfg.cache, cfg.workers, cfg.ntu_root, cfg.mpii_root,
                                cfg.coco_root, cfg.mpii_split)


# ------------------------------------------------------------------------------------------------ checkpoints, logs
def stage_path(out, stage):
    return os.path.join(out, f"stage{stage}.pt")


def load_stage(path, map_location="cpu"):
    """A checkpoint written by run_stage (CheckpointError if the file is not one)."""
    return load_checkpoint(path, "a train.py checkpoint", ("model", "optimizer", "step", "done", "rng", "config"),
                           map_location)


def changed_options(saved, cfg, stage):
    """'--name old -> new' for each option that shapes stage `stage` (RUN_OPTIONS and, for stage 1,
    STAGE2_OPTIONS aside) whose value in cfg differs from `saved`, the train config stored in a stage file."""
    skip = RUN_OPTIONS + (STAGE2_OPTIONS if stage == 1 else ())
    return [f"--{k.replace('_', '-')} {saved.get(k, '(not recorded)')} -> {v}" for k, v in asdict(cfg).items()
            if k not in skip and saved.get(k, MISSING) != v]


def plan(cfg):
    """What pretrain does with each stage 1..cfg.stage: 'reuse' a finished stage file of the same shaping options,
    'resume' an unfinished one (--resume), or 'train' from step 0; once a stage trains, every later stage file is
    outdated. Stops with one line before it would reuse, continue or replace a stage file made with other options,
    replace an unfinished one without --resume or --overwrite, or leave an outdated later one beside it."""
    actions, outdated = [], False
    for stage in (1, 2):  # stage2.pt too under --stage 1: a stage 1 trained again outdates it
        path = stage_path(cfg.out, stage)
        if stage > cfg.stage and not (outdated and os.path.exists(path)):
            break
        if not os.path.exists(path):
            actions.append("train")
            outdated = True
            continue
        ckpt = load_stage(path)
        changed = changed_options(ckpt["config"]["train"], cfg, stage)
        if changed or outdated:
            why = (f"was trained with other options ({', '.join(changed)})" if changed
                   else "started from the stage 1 that this run trains again")
            if not cfg.overwrite:
                keep = "give the same options to continue it, or " if cfg.resume and changed else ""
                raise SystemExit(f"error: {path} {why}: {keep}give another --out, or --overwrite to discard it")
            action = "train"
        elif ckpt["done"]:
            action = "reuse"
        elif cfg.resume:
            action = "resume"
        elif cfg.overwrite:
            action = "train"
        else:
            raise SystemExit(f"error: {path} is unfinished (step {ckpt['step']}): continue it with --resume, or "
                             "train it again with --overwrite")
        actions.append(action)
        outdated = outdated or action != "reuse"
    return actions


def read_log(out):
    """The rows of out/log.jsonl. A line that is not JSON, the last one cut by a kill, is dropped with a warning
    (run_stage rewrites the log without it)."""
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.strip():  # blank lines are not worth a warning
                    warnings.warn(f"{path}, line {n}: not a whole JSON row (cut by a kill?), dropped")
    return rows


# loss.png's panels: (log keys with their legend labels, title, y axis, factor from the logged value): the losses are
# sums of cross-entropies (natural log: nats), the monitors' shares are drawn in percent as the README quotes them
LOSS_PANELS = [({"loss": "loss"}, "total loss (Eq. 1)", "nats", 1),
               ({"global": "global"}, "sample-level (Eq. 2)", "nats", 1),
               ({"dense": "dense"}, "dense intra-sample (Eq. 5)", "nats", 1),
               ({"sparse": "sparse"}, "sparse structure-aware (Eq. 6)", "nats", 1)]
MONITOR_PANELS = [
    ({"retrieval": "RGB → depth"}, "held-out retrieval, top-1", "top-1 (%)", 100),
    ({"cos_rgb": "RGB", "cos_depth": "depth", "cos_keypoints": "keypoints"},
     "global embeddings: mean cosine between people", "cosine (1 = collapsed)", 1),
    ({"dense_acc": "own depth view", "dense_acc_other": "another person's, same positions",
      "dense_acc_moved": "own depth view, moved"}, "dense match: RGB cell finds its depth cell", "accuracy (%)", 100),
    ({"conv_cos_rgb": "RGB HRNet", "conv_cos_depth": "depth HRNet"}, "conv weights: cosine to the stage's start",
     "cosine", 1),
    ({"conv_norm_rgb": "RGB HRNet", "conv_norm_depth": "depth HRNet"}, "conv weights: mean norm", "L2 norm", 1)]


def plot_log(out):
    """loss.png in `out`: the loss terms (top row) and the held-out monitors (bottom row, every eval_every steps)
    against the training step, stage 2 counted on from stage 1's last step after a dashed line that every x axis
    names; only the panels the log has values for, each row filling the width. Returns the Figure (None without a
    log)."""
    from matplotlib.figure import Figure  # not pyplot: a notebook calling train.main keeps its backend
    rows = read_log(out)
    if not rows:
        return None
    offset = max((r["step"] for r in rows if r["stage"] == 1), default=-1) + 1
    x = [r["step"] + (offset if r["stage"] == 2 else 0) for r in rows]
    panels = [[(p, marker) for p in row if any(k in r for r in rows for k in p[0])]
              for row, marker in ((LOSS_PANELS, None), (MONITOR_PANELS, "."))]  # monitors: few points, marked
    panels = [row for row in panels if row]
    columns = math.lcm(*(len(row) for row in panels))
    fig = Figure(figsize=(20, 3.4 * len(panels)))
    grid = fig.add_gridspec(len(panels), columns)
    stage2 = offset > 0 and any(r["stage"] == 2 for r in rows)
    first = None
    for i, row in enumerate(panels):
        span = columns // len(row)
        for j, ((keys, title, ylabel, factor), marker) in enumerate(row):
            ax = fig.add_subplot(grid[i, j * span:(j + 1) * span], sharex=first)
            first = first or ax
            for k, label in keys.items():
                pts = [(xi, r[k] * factor) for xi, r in zip(x, rows) if k in r]
                if pts:
                    ax.plot(*zip(*pts), lw=1, marker=marker, label=label)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("training step" + (f"; stage 2 from step {offset} (dashed)" if stage2 else ""), fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            if len(keys) > 1:
                ax.legend(fontsize=7)
            if stage2:
                ax.axvline(offset, color="grey", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=90)
    return fig


# -------------------------------------------------------------------------------------------------------- training
def model_config(cfg, stage, bank_size):
    """The HCMoCo model of a stage: stage 1 trains the sample-level term alone, stage 2 the Table 3 row
    cfg.targets; one memory-bank entry per pre-training sample."""
    return HCMoCoConfig(hrnet=cfg.hrnet, width=cfg.width, depth_encoder=cfg.depth_encoder,
                        keypoint_graph=cfg.keypoint_graph, **TARGETS["global" if stage == 1 else cfg.targets],
                        lambda_global=cfg.lambda_global, lambda_dense=cfg.lambda_dense,
                        lambda_sparse=cfg.lambda_sparse, tau=cfg.tau, init=cfg.init, bn_momentum=cfg.bn_momentum,
                        global_loss=cfg.global_loss, num_negatives=cfg.num_negatives, momentum=cfg.momentum,
                        bank_size=bank_size, dense_points=cfg.dense_points)


def learning_rate(cfg, step, total, steps_per_epoch):
    """The learning rate of `step` of a stage of `total` steps, under cfg.lr_schedule and the linear warm-up over
    the first cfg.warmup steps."""
    if cfg.lr_schedule == "step":
        return cli.cosine_lr(cfg.lr, step, total, cfg.warmup)
    epoch, epochs = step // steps_per_epoch + 1, math.ceil(total / steps_per_epoch)  # 1-based, as published
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    return warm * cli.cosine_lr(cfg.lr, epoch, epochs, floor=cfg.lr * 1e-3)


def gather_all(t):
    """Concatenate a tensor over ranks along dim 0; a float tensor's gradient flows back to the rank that owns
    each part, summed over the ranks whose losses read it (torch.distributed.nn's all_gather did the same)."""
    from torch.distributed import _functional_collectives as fc  # the API torch >= 2.13 points to
    whole = fc.wait_tensor(fc.all_gather_single(t if t.is_floating_point() else t.to(torch.int64), 0,
                                                dist.group.WORLD))  # int64: gloo gathers no bool
    return whole.to(t.dtype)


# -------------------------------------------------------------------------------------------------------- monitors
def conv_weights(model):
    """{modality: [conv weight, ...]} of the RGB and depth HRNets (detached copies)."""
    return {m: [p.detach().clone() for p in model.encoders[m].parameters() if p.dim() == 4]
            for m in ("rgb", "depth") if isinstance(model.encoders[m], HRNet)}


@torch.no_grad()
def monitors(model, batch, initial, points=32):
    """Label-free measurements of what pre-training learned, on the fixed held-out batch (eval mode):
    retrieval   RGB -> depth top-1 of the global embeddings among the held-out samples (chance 1 / samples)
    cos_<m>     mean cosine between the global embeddings of different samples (1 = collapsed to one point)
    dense_acc   share of `points` person cells per image whose RGB dense embedding's nearest depth embedding, among
                the same cells, is its own cell (chance about 1 / points)
    dense_acc_other   the same with the depth of ANOTHER held-out person, at cells both people cover: a code of
                pixel position alone scores as high here as in dense_acc; so does a code of the body part, since the
                people are centred in their crops and the same cell often shows the same part
    dense_acc_moved   dense_acc with the depth image moved (MOVED: rotated, scaled, shifted), each RGB cell against
                the depth embeddings at the moved positions of the same cells: a code of the body point scores as
                in dense_acc, a code of pixel position near chance
    conv_norm_<m>, conv_cos_<m>   mean norm of the HRNet's convolutions, and mean cosine to `initial` (the stage's
                starting weights): a cosine near 0 with a huge norm is the frozen-backbone failure"""
    was_training = model.training
    model.eval()
    emb = [model.embed({k: ({m: p[i:i + 64] for m, p in v.items()} if isinstance(v, dict) else v[i:i + 64])
                        for k, v in batch.items()}) for i in range(0, len(batch["index"]), 64)]
    g = {m: torch.cat([e["global"][m] for e in emb]) for m in emb[0]["global"]}
    dense = {m: torch.cat([e["dense"][m] for e in emb]) for m in ("rgb", "depth")}  # [B, D, h, w]
    out = {}
    sim = g["rgb"] @ g["depth"].T  # [B, B]
    out["retrieval"] = (sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean().item()
    for m, f in g.items():
        c = f @ f.T
        out[f"cos_{m}"] = ((c.sum() - c.diagonal().sum()) / (len(c) * (len(c) - 1))).item()
    gen = torch.Generator(device=sim.device).manual_seed(0)  # the same cells every time, the global RNG untouched
    B, D, h, w = dense["rgb"].shape
    person = person_cells(batch, h, w)
    other = person.roll(1, 0)  # the next person's cells, and their depth embeddings below
    for key, depth, where in (("dense_acc", dense["depth"], person),
                              ("dense_acc_other", dense["depth"].roll(1, 0), person & other)):
        out[key] = cell_matching(dense["rgb"], where, points, gen, lambda keep, idx, depth=depth: torch.gather(
            depth[keep].flatten(2), 2, idx[:, None].expand(-1, D, -1)))
    out["dense_acc_moved"] = moved_matching(model, batch, dense["rgb"], points, gen)
    for m, weights in initial.items():
        now = [p for p in model.encoders[m].parameters() if p.dim() == 4]
        out[f"conv_norm_{m}"] = sum(p.norm().item() for p in now) / len(now)
        out[f"conv_cos_{m}"] = sum(F.cosine_similarity(p.flatten(), p0.flatten(), dim=0).item()
                                   for p, p0 in zip(now, weights)) / len(now)
    model.train(was_training)
    return {k: round(v, 4) for k, v in out.items()}


def person_cells(batch, h, w):
    """[B, h*w]: the cells of the h x w grid that hold some of the person's depth."""
    return F.interpolate((batch["mask"][:, None] & (batch["depth"] > 0)).float(), size=(h, w)).flatten(1) > 0


def cell_matching(rgb, where, points, gen, depth_at):
    """The share of `points` cells drawn per image among `where` [B, h*w] (with replacement, from `gen`) whose RGB
    embedding's nearest depth embedding among the drawn cells' is its own cell. rgb: [B, D, h, w]; depth_at(keep,
    idx) gives the depth embeddings [b, D, N] of the drawn cells idx [b, N] of the images `keep` that have any."""
    keep = where.sum(1) > 0
    idx = torch.multinomial(where[keep].float(), points, replacement=True, generator=gen)  # [b, N]
    f1 = torch.gather(rgb[keep].flatten(2), 2, idx[:, None].expand(-1, rgb.shape[1], -1))  # [b, D, N]
    nearest = torch.einsum("bdi,bdj->bij", f1, depth_at(keep, idx)).argmax(-1)  # [b, N]
    return (torch.gather(idx, 1, nearest) == idx).float().mean().item()  # a repeat of the cell counts


def moved_matching(model, batch, rgb, points, gen):
    """monitors' dense_acc_moved: the held-out depth seen through the fixed map MOVED (rotation, scale, shift), and
    each of `points` person cells per image matched from its RGB embedding among the moved depth embeddings at the
    moved positions of the same cells (bilinear). rgb: [B, D, h, w] dense RGB embeddings of the batch."""
    B, D, h, w = rgb.shape
    H, W = batch["depth"].shape[-2:]
    angle, scale, shift = MOVED
    M = data.affine_matrix(torch.full((B,), angle), torch.full((B,), scale), torch.tensor(shift).expand(B, 2),
                           torch.zeros(B, dtype=torch.bool), (H, W)).to(rgb.device)
    moved = dict(batch, depth=data.warp(batch["depth"], M, "nearest"),
                 mask=data.warp(batch["mask"][:, None].float(), M, "nearest")[:, 0] > 0.5)
    depth = torch.cat([model.dense_embed({k: v[i:i + 64] for k, v in moved.items() if k in ("depth", "mask")}, "depth")
                       for i in range(0, B, 64)])  # [B, D, h, w]
    ys, xs = torch.meshgrid(torch.arange(h, device=rgb.device), torch.arange(w, device=rgb.device), indexing="ij")
    cells = torch.stack([xs, ys], -1).flatten(0, 1).float()  # [h*w, 2] (x, y) of each cell
    centres = (cells + 0.5) * rgb.new_tensor([W / w, H / h]) - 0.5  # [h*w, 2] in image pixels
    there = apply_affine(M, centres.expand(B, -1, -1))  # [B, h*w, 2] in the moved image
    lands = sample_at(moved["mask"][:, None].float() * (moved["depth"] > 0), there, (H, W))[..., 0] > 0.5
    where = person_cells(batch, h, w) & lands & ((there >= 0) & (there <= there.new_tensor([W - 1, H - 1]))).all(-1)
    return cell_matching(rgb, where, points, gen, lambda keep, idx: sample_at(
        depth[keep], torch.gather(there[keep], 1, idx[..., None].expand(-1, -1, 2)), (H, W)).transpose(1, 2))


def monitor_line(m, people):
    """The headline monitors of a log row in words."""
    return (f"held-out RGB -> depth top-1 {100 * m['retrieval']:.1f} % among {people} people (chance "
            f"{100 / people:.1f} %), global cosine between people {m['cos_rgb']:.2f} (1 = collapsed), dense matching "
            f"{100 * m['dense_acc']:.0f} % vs {100 * m['dense_acc_other']:.0f} % with another person's depth and "
            f"{100 * m['dense_acc_moved']:.0f} % with the depth moved (pixel position alone: ~18 %)")


def build_model(cfg, stage, bank_size, device, log):
    """The stage's model and optimiser: stage 2 starts from stage 1's finished weights (encoders, mappers, memory
    bank); stage 1 from --backbone-init when given (both HRNets from the same weights, as the published scripts)."""
    model = HCMoCo(model_config(cfg, stage, bank_size)).to(device)
    if stage == 2:
        model.load_state_dict(load_stage(stage_path(cfg.out, 1), device)["model"])
    elif cfg.backbone_init:
        for m in ("rgb", "depth"):
            report = model.encoders[m].load_pretrained(cfg.backbone_init, hrnet_prefixes(m))
            log(f"stage 1: {m} HRNet from {cfg.backbone_init}: " + ", ".join(f"{len(v)} {k}" for k, v in report.items()))
    optimizer = (torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
                 if cfg.optimizer == "sgd" else torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4))
    return model, optimizer


def resume(path, model, optimizer, device):
    """The step to continue from: that of the checkpoint at `path` (model, optimiser and RNG restored), else 0."""
    if not os.path.exists(path):
        return 0
    ckpt = load_stage(path, device)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"]


def for_device(model, cfg, device, rank, world):
    """(model, net): the model in the device's memory layout with its encoders compiled when asked; net wraps it
    in DDP when there are several ranks."""
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        for encoder in model.encoders.values():
            encoder.compile()
    if world == 1:
        return model, model
    # rank 0's buffers reach every rank once, at the wrapping; afterwards the memory bank stays identical on every
    # rank through the gathered update, and each rank keeps the BatchNorm statistics of its own batches. A rank's
    # batch can lack a modality, whose encoder then takes no part in the step (find_unused_parameters)
    return model, torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
        find_unused_parameters=True)


def batches(cfg, dataset, stage, start, total, rank, world, device):
    """The stage's batches for steps start..total-1 (data.StepBatches: what a step sees depends on the seed and the
    step only), drawn in proportion to the dataset's `weights` when it has them (MixedDataset)."""
    sampler = data.StepBatches(len(dataset), cfg.batch_size, cfg.seed + STAGE_SEED * stage, start, total, rank, world,
                               getattr(dataset, "weights", None))
    # items held in memory and augmented by the training loop collate in microseconds: loader processes would only
    # compete with the training threads for the cores
    in_memory = cfg.augment == "batch" and cfg.data == "synthetic" and cfg.cache
    workers = 0 if in_memory else cfg.workers
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       collate_fn=data.collate, pin_memory=device.type == "cuda",
                                       generator=torch.Generator().manual_seed(cfg.seed))  # not the global RNG


def start_log(out, stage, start):
    """Rewrite out/log.jsonl without the rows a resumed stage will write again (and a torn last line); returns
    write_row(row), which appends one row of this stage."""
    path = os.path.join(out, "log.jsonl")
    rows = [r for r in read_log(out) if r["stage"] < stage or (r["stage"] == stage and r["step"] < start)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    def write_row(row):
        with open(path, "a") as f:
            f.write(json.dumps(dict(stage=stage, **row)) + "\n")
    return write_row


def stage_steps(cfg, n):
    """The steps of a stage on a pre-training set of n samples: --steps, or --epochs passes over it."""
    return cfg.steps or cfg.epochs * math.ceil(n / cfg.batch_size)  # as learning_rate counts epochs


def run_warnings(cfg, n):
    """What would make a run on n pre-training samples train other than its options suggest."""
    total = stage_steps(cfg, n)
    return ([f"a stage has {total} steps, fewer than --warmup {cfg.warmup}: the learning rate never leaves the "
             "warm-up"] if total < cfg.warmup else []) + \
        ([f"{n} pre-training samples, fewer than --batch-size {cfg.batch_size}: a batch holds people more than once, "
          "each then its own negative"] if n < cfg.batch_size else [])


def run_stage(cfg, stage, dataset, rank=0, world=1, log=print):
    """Train one stage; returns the path of its finished checkpoint."""
    kind = cli.pick_device(cfg.device)  # a Config built in code may still say 'auto'
    device = torch.device(kind if kind == "cpu" else f"cuda:{rank % max(1, torch.cuda.device_count())}")
    path = stage_path(cfg.out, stage)
    per_epoch = math.ceil(len(dataset) / cfg.batch_size)
    total = stage_steps(cfg, len(dataset))
    model, optimizer = build_model(cfg, stage, len(dataset), device, log)
    initial = conv_weights(model)  # the stage's starting weights (a resumed run rebuilds the same ones first)
    start = resume(path, model, optimizer, device) if cfg.resume else 0
    if start:
        log(f"stage {stage}: resuming {path} at step {start}")
    model, net = for_device(model, cfg, device, rank, world)
    loader = batches(cfg, dataset, stage, start, total, rank, world, device)
    lead = rank == 0  # the rank that measures, logs and saves
    if lead:
        write_row = start_log(cfg.out, stage, start)
        heldout = data.to_device(data.heldout_batch(cfg.image_size, cfg.heldout), device)

    def save(step, done):
        if lead:
            cli.save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, done=done,
                                 stage=stage, rng=torch.get_rng_state(),
                                 config=dict(train=asdict(cfg), model=asdict(model.cfg))), path)

    augment = data.BatchAugment() if cfg.augment == "batch" else None
    model.train()
    t0 = time.time()
    quiet = {} if lead else {"disable": True}  # an explicit disable=False would override TQDM_DISABLE
    with tqdm(total=total, initial=start, desc=f"stage {stage}", dynamic_ncols=True, **quiet) as bar:
        for step, batch in zip(range(start, total), loader):
            lr = learning_rate(cfg, step, total, per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            measured = monitors(model, heldout, initial) if lead and step % cfg.eval_every == 0 else {}
            if augment is not None:
                seed = (cfg.seed + STAGE_SEED * stage) * 1_000_003 + step  # the step's draws, whatever the ranks
                batch = augment(batch, torch.Generator().manual_seed(seed), rank * len(batch["index"]), cfg.batch_size)
            batch = data.to_device(batch, device)
            if device.type == "cuda":
                batch = dict(batch, rgb=batch["rgb"].contiguous(memory_format=torch.channels_last))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cli.use_bf16(cfg.precision, device.type)):
                loss, terms = net(batch, gather=gather_all if world > 1 else None)
            if not torch.isfinite(loss):
                last = path if os.path.exists(path) else f"{path} (none yet)"
                raise SystemExit(f"stage {stage}: non-finite loss at step {step} "
                                 f"({ {k: v.item() for k, v in terms.items()} }); the last good checkpoint is {last}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            if lead and (step % cfg.log_every == 0 or step == total - 1 or measured):
                values = {k: round(v.item(), 4) for k, v in terms.items()}
                bar.set_postfix(values)
                write_row(dict(step=step, lr=lr, time=round(time.time() - t0, 2), **values, **measured))
            if (step + 1) % cfg.save_every == 0 and step + 1 < total:
                save(step + 1, done=False)
    if lead:  # after the last update
        final = monitors(model, heldout, initial)
        write_row(dict(step=total, time=round(time.time() - t0, 2), **final))
        log(f"stage {stage} done after {total} steps: {monitor_line(final, cfg.heldout)}")
    save(total, done=True)
    if world > 1:
        dist.barrier()  # the next stage starts from this file on every rank: none may read it before rank 0 wrote it
    if lead:
        plot_log(cfg.out)
    return path


def pretrain(cfg, rank=0, world=1, dataset=None):
    """Stages 1..cfg.stage of a complete Config (parse_args's), as plan() decides: a stage file in cfg.out is
    reused, continued or replaced only when its options allow it. The pre-training set is built (rendered, read)
    only when a stage has to train; `dataset`, when given, is trained on instead of the one cfg describes (items
    indexed by (index, augmentation seed) as data.MixedDataset gives them; under --augment batch raw items at
    cfg.image_size, under --augment published data.Transformed parts; docs/own-dataset.md: ValueError for an
    augmented or normalised item, or one of another size, under --augment batch, which would augment it again).
    When a stage trains, the stage files it replaces go first and cfg.out/config.json describes the run, so that
    it always describes the stage files beside it. Returns the stage files' paths."""
    if dataset is not None and cfg.augment == "batch":
        rgb = dataset[(0, 0)]["rgb"]  # [3, H, W]
        if rgb.shape[-2:] != (cfg.image_size, cfg.image_size) or rgb.min() < 0:
            raise ValueError(
                f"augment='batch' augments raw items in the training loop: the dataset's RGB must be "
                f"{cfg.image_size} x {cfg.image_size} in [0, 1], not augmented or normalised (its first item's is "
                f"{list(rgb.shape)}, minimum {rgb.min():.2f}); or set augment='published' and augment each item "
                "(data.Transformed with a data.PairedTransform)")
    log = print if rank == 0 else (lambda *a: None)
    torch.manual_seed(cfg.seed + rank)
    os.makedirs(cfg.out, exist_ok=True)
    actions = plan(cfg)
    if world > 1:
        dist.barrier()  # every rank has read the stage files before rank 0 removes any
    if rank == 0 and set(actions) != {"reuse"}:
        for stage, action in enumerate(actions, 1):
            if action == "train" and os.path.exists(stage_path(cfg.out, stage)):
                os.remove(stage_path(cfg.out, stage))
        cli.save_json(asdict(cfg), os.path.join(cfg.out, "config.json"))
    paths = []
    for stage, action in enumerate(actions[:cfg.stage], 1):
        if action == "reuse":
            log(f"stage {stage}: reusing the finished {stage_path(cfg.out, stage)}, made with the same options")
        else:
            if dataset is None:
                dataset = build_dataset(cfg)
                log(f"{cfg.data} data: {len(dataset)} samples")
                for warning in run_warnings(cfg, len(dataset)):
                    log(f"warning: {warning}")
            run_stage(cfg, stage, dataset, rank, world, log)
        paths.append(stage_path(cfg.out, stage))
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
        if cfg.batch_size % world:
            raise SystemExit(f"--batch-size {cfg.batch_size} must be divisible by the {world} ranks")
    if rank == 0:
        print(f"HCMoCo pre-training on {cfg.device} x{world}; the resolved config (written to "
              f"{os.path.join(cfg.out, 'config.json')} when a stage trains):\n" + textwrap.fill(
                  " ".join(f"{k}={v}" for k, v in asdict(cfg).items()), 118, initial_indent="    ",
                  subsequent_indent="    "))
    try:
        saved = pretrain(cfg, rank, world)
    except FileNotFoundError as e:  # a dataset root
        raise SystemExit(f"error: {e}")
    except CheckpointError as e:  # --backbone-init, or a stage file in --out
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: the checkpoints on disk are whole (save_atomic)
        if rank == 0:
            launcher = f"torchrun --nproc_per_node {world} train.py" if world > 1 else "python train.py"
            if any(os.path.exists(stage_path(cfg.out, k)) for k in range(1, cfg.stage + 1)):
                again = [a for a in argv if a not in ("--resume", "--no-resume", "--overwrite")] + ["--resume"]
                print(f"\ninterrupted; continue from the last checkpoint in {cfg.out} with\n"
                      f"    {launcher} {shlex.join(again)}", file=sys.stderr)
            else:
                print(f"\ninterrupted before the first checkpoint: nothing to continue; start again with\n"
                      f"    {launcher} {shlex.join(argv)}", file=sys.stderr)
        raise SystemExit(130)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        print(f"saved {', '.join(saved)}, log {os.path.join(cfg.out, 'log.jsonl')} and "
              f"{os.path.join(cfg.out, 'loss.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
