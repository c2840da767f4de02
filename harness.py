"""What runs train.py's pre-training without being the method: the checks of its options, the stage files (which
are reused, continued or trained again), the log and its resume, Ctrl-C, DDP's set-up and gathers, warnings about
a run, the label-free monitors of what a stage learned and the loss plot. train.py reads top to bottom without
them; it imports this module, never the other way round."""
import contextlib
import json
import math
import os
import shlex
import sys
import warnings
from dataclasses import MISSING, asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli
import data
from encoders import CheckpointError, HRNet, apply_affine, load_checkpoint
from hcmoco import UNRECORDED, at_cells, draw_cells, person_cells, sample_at

MOVED = (30.0, 1.2, (8.0, -6.0))  # the monitors' moved depth view: rotation (degrees), scale, shift (pixels)
# What a stage file depends on: every option but these, which manage the run and leave the model as it is (a new
# option shapes the stage files until it is listed here). Stage 1 also does not read STAGE2_OPTIONS, and the
# model's STAGE_FIELDS each stage sets itself: its Table 3 row (from --targets) and its memory bank's size (from the
# pre-training set).
RUN_OPTIONS = ("stage", "out", "resume", "overwrite", "device", "workers", "compile", "eval_every", "heldout",
               "log_every", "save_every")
STAGE2_OPTIONS = ("epochs", "targets", "lambda_dense", "lambda_sparse", "dense_points", "soft_width")
STAGE_FIELDS = ("dense", "sparse", "bank_size")


# --------------------------------------------------------------------------------------------------------- options
def option_checks(cfg, given):
    """(ok, message) for each option of the train Config cfg: what parse_args stops at, naming the option and its
    value; `given` holds the options given on the command line. --out is checked apart, last (cli.out_check)."""
    model = cfg.model
    roots = {"synthetic": (), "synthetic+mpii": ("mpii_root",), "mpii": ("mpii_root",),
             "ntu+mpii": ("ntu_root", "mpii_root"), "ntu+coco": ("ntu_root", "coco_root")}
    return [
        *[(getattr(cfg, r), f"--data {cfg.data} needs --{r.replace('_', '-')}") for r in roots[cfg.data]],
        *[(getattr(cfg, r) is None, f"--{r.replace('_', '-')}: --data {cfg.data} does not read it")
          for r in ("ntu_root", "mpii_root", "coco_root") if r not in roots[cfg.data]],
        ("mpii_split" not in given or "mpii_root" in roots[cfg.data],
         f"--mpii-split: --data {cfg.data} does not read MPII"),
        (cfg.backbone_init is None or os.path.isfile(cfg.backbone_init), f"--backbone-init: {cfg.backbone_init} not found"),
        *cli.positive(cfg, ("stage1_epochs", "epochs", "batch_size", "lr")),
        *cli.positive(model, ("width", "num_negatives", "dense_points", "tau", "soft_width")),
        *cli.positive(cfg, ("eval_every", "save_every", "log_every")),
        *cli.positive(cfg, ("steps",) if cfg.steps is not None else ()),
        *cli.non_negative(cfg, ("warmup",)),
        (0 <= model.momentum < 1, f"--momentum must be in [0, 1), got {model.momentum}"),
        (0 < model.bn_momentum <= 1, f"--bn-momentum must be in (0, 1], got {model.bn_momentum}"),
        *cli.non_negative(model, ("lambda_global", "lambda_dense", "lambda_sparse")),
        (cfg.heldout >= 2, f"--heldout must be at least 2 (the monitors compare people), got {cfg.heldout}"),
        cli.image_size_check(cfg.image_size),
        (cfg.synthetic_samples >= 4,
         f"--synthetic-samples must be at least 4 (3/4 with depth, 1/4 without), got {cfg.synthetic_samples}"),
        *cli.non_negative(cfg, ("workers",)),
        (not (cfg.resume and cfg.overwrite), "--resume continues the stage files in --out, --overwrite discards "
         "them: give one"),
        (not cfg.resume or any(os.path.exists(stage_path(cfg.out, k)) for k in range(1, cfg.stage + 1)),
         f"--resume: nothing to resume in {cfg.out} (no stage file); leave --resume out to start a new run")]


def check_dataset(cfg, dataset):
    """ValueError for a dataset given to train.pretrain that --augment batch would spoil: its items must be raw, at
    cfg.image_size, as the training loop augments whole batches (an augmented or normalised item would be augmented
    again)."""
    if cfg.augment != "batch":
        return
    rgb = dataset[(0, 0)]["rgb"]  # [3, H, W]
    if rgb.shape[-2:] != (cfg.image_size, cfg.image_size) or rgb.min() < 0:
        raise ValueError(
            f"augment='batch' augments raw items in the training loop: the dataset's RGB must be "
            f"{cfg.image_size} x {cfg.image_size} in [0, 1], not augmented or normalised (its first item's is "
            f"{list(rgb.shape)}, minimum {rgb.min():.2f}); or set augment='published' and augment each item "
            "(data.Transformed with a data.PairedTransform)")


def run_warnings(cfg, n, steps):
    """What would make a run whose shortest stage has `steps` steps, on n pre-training samples, train other than its
    options suggest."""
    return ([f"a stage has {steps} steps, fewer than --warmup {cfg.warmup}: the learning rate never leaves the "
             "warm-up"] if steps < cfg.warmup else []) + \
        ([f"{n} pre-training samples, fewer than --batch-size {cfg.batch_size}: a batch holds people more than once, "
          "each then its own negative"] if n < cfg.batch_size else [])


# ----------------------------------------------------------------------------------------------------- stage files
def stage_path(out, stage):
    return os.path.join(out, f"stage{stage}.pt")


def load_stage(path, map_location="cpu"):
    """A checkpoint written by train.run_stage (CheckpointError if the file is not one). A file from before
    --stage1-epochs records --epochs alone, which its run trained in both stages, and one from before --soft-width
    records no width (its Eq. 4 was in whole cells, width 1): its config says so here."""
    ckpt = load_checkpoint(path, "a train.py checkpoint", ("model", "optimizer", "step", "done", "rng", "config"),
                           map_location)
    train = ckpt["config"].get("train", {})
    if "epochs" in train:
        train.setdefault("stage1_epochs", train["epochs"])
    ckpt["config"]["model"] = {**UNRECORDED, **ckpt["config"]["model"]}
    return ckpt


def changed_options(saved, cfg, stage):
    """'--name old -> new' for each option that shapes stage `stage` (RUN_OPTIONS, STAGE_FIELDS and, for stage 1,
    STAGE2_OPTIONS aside) whose value in the train Config cfg differs from `saved`, the config stored in a stage
    file: its train config beside the model's as the stage built it (the model's fields go by their own names)."""
    skip = RUN_OPTIONS + STAGE_FIELDS + (STAGE2_OPTIONS if stage == 1 else ())
    old = {k: v for k, v in saved["train"].items() if k != "model"} | saved["model"]
    new = asdict(cfg)
    new.update(new.pop("model"))
    return option_changes(old, new, skip)


def option_changes(old, new, skip=()):
    """'--name old -> new' for each option of the dict `new` but those in `skip` whose value differs from the
    recorded dict `old` (an option `old` lacks: '(not recorded)')."""
    return [f"--{k.replace('_', '-')} {old.get(k, '(not recorded)')} -> {v}" for k, v in new.items()
            if k not in skip and old.get(k, MISSING) != v]


def plan(cfg):
    """What train.pretrain does with each stage 1..cfg.stage: 'reuse' a finished stage file of the same shaping
    options, 'resume' an unfinished one (--resume), or 'train' from step 0; once a stage trains, every later stage
    file is outdated. Stops with one line before it would reuse, continue or replace a stage file made with other
    options, replace an unfinished one without --resume or --overwrite, or leave an outdated later one beside it."""
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
        changed = changed_options(ckpt["config"], cfg, stage)
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


def resume(path, model, optimizer, device):
    """The step to continue from: that of the checkpoint at `path` (model, optimiser and RNG restored), else 0."""
    if not os.path.exists(path):
        return 0
    ckpt = load_stage(path, device)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"]


@contextlib.contextmanager
def interruptible(cfg, argv, rank, world):
    """Runs the body as the command `argv` of a run of cfg: a missing dataset root or a file that is not a
    checkpoint ends it in one line, and Ctrl-C with the command that continues it (the checkpoints on disk are
    whole: cli.save_atomic), or starts it again when there is none yet."""
    try:
        yield
    except (FileNotFoundError, CheckpointError) as e:  # a dataset root; --backbone-init, or a stage file in --out
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
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


# ------------------------------------------------------------------------------------------------------------- DDP
def ranks(cfg):
    """(rank, world) of this process: torchrun's, with the process group started (NCCL on CUDA, else gloo), or
    (0, 1) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
        if cfg.batch_size % world:
            raise SystemExit(f"--batch-size {cfg.batch_size} must be divisible by the {world} ranks")
    return rank, world


def for_device(model, cfg, device, rank, world):
    """(model, net): the model in the device's memory layout with its encoders compiled when asked; net wraps it
    in DDP when there are several ranks."""
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


def gather_all(t):
    """Concatenate a tensor over ranks along dim 0; a float tensor's gradient flows back to the rank that owns
    each part, summed over the ranks whose losses read it (torch.distributed.nn's all_gather did the same)."""
    from torch.distributed import _functional_collectives as fc  # the API torch >= 2.13 points to
    whole = fc.wait_tensor(fc.all_gather_single(t if t.is_floating_point() else t.to(torch.int64), 0,
                                                dist.group.WORLD))  # int64: gloo gathers no bool
    return whole.to(t.dtype)


# ------------------------------------------------------------------------------------------------------------- log
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


def read_log(out):
    """The rows of out/log.jsonl. A line that is not JSON, the last one cut by a kill, is dropped with a warning
    (start_log rewrites the log without it)."""
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
    emb = [model.embed(data.batch_rows(batch, i, i + 64)) for i in range(0, len(batch["index"]), 64)]
    g = {m: torch.cat([e["global"][m] for e in emb]) for m in emb[0]["global"]}
    dense = {m: torch.cat([e["dense"][m] for e in emb]) for m in ("rgb", "depth")}  # [B, D, h, w]
    out = {}
    sim = g["rgb"] @ g["depth"].T  # [B, B]
    out["retrieval"] = (sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean().item()
    for m, f in g.items():
        c = f @ f.T
        out[f"cos_{m}"] = ((c.sum() - c.diagonal().sum()) / (len(c) * (len(c) - 1))).item()
    gen = torch.Generator(device=sim.device).manual_seed(0)  # the same cells every time, the global RNG untouched
    person = person_cells(batch["mask"], batch["depth"], dense["rgb"].shape[-2:])  # [B, h*w]
    other = person.roll(1, 0)  # the next person's cells, and their depth embeddings below
    for key, depth, where in (("dense_acc", dense["depth"], person),
                              ("dense_acc_other", dense["depth"].roll(1, 0), person & other)):
        out[key] = cell_matching(dense["rgb"], where, points, gen, lambda keep, idx, depth=depth: at_cells(
            depth[keep], idx))
    out["dense_acc_moved"] = moved_matching(model, batch, dense["rgb"], points, gen)
    for m, weights in initial.items():
        now = [p for p in model.encoders[m].parameters() if p.dim() == 4]
        out[f"conv_norm_{m}"] = sum(p.norm().item() for p in now) / len(now)
        out[f"conv_cos_{m}"] = sum(F.cosine_similarity(p.flatten(), p0.flatten(), dim=0).item()
                                   for p, p0 in zip(now, weights)) / len(now)
    model.train(was_training)
    return {k: round(v, 4) for k, v in out.items()}


def cell_matching(rgb, where, points, gen, depth_at):
    """The share of `points` cells drawn per image among `where` [B, h*w] (with replacement, from `gen`) whose RGB
    embedding's nearest depth embedding among the drawn cells' is its own cell. rgb: [B, D, h, w]; depth_at(keep,
    idx) gives the depth embeddings [b, D, N] of the drawn cells idx [b, N] of the images `keep` that have any."""
    keep, idx = draw_cells(where, points, gen)  # [B], [b, N]
    f1 = at_cells(rgb[keep], idx)  # [b, D, N]
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
    inside = ((there >= 0) & (there <= there.new_tensor([W - 1, H - 1]))).all(-1)  # [B, h*w]
    where = person_cells(batch["mask"], batch["depth"], (h, w)) & lands & inside
    return cell_matching(rgb, where, points, gen, lambda keep, idx: sample_at(
        depth[keep], torch.gather(there[keep], 1, idx[..., None].expand(-1, -1, 2)), (H, W)).transpose(1, 2))


def monitor_line(m, people):
    """The headline monitors of a log row in words."""
    return (f"held-out RGB -> depth top-1 {100 * m['retrieval']:.1f} % among {people} people (chance "
            f"{100 / people:.1f} %), global cosine between people {m['cos_rgb']:.2f} (1 = collapsed), dense matching "
            f"{100 * m['dense_acc']:.0f} % vs {100 * m['dense_acc_other']:.0f} % with another person's depth and "
            f"{100 * m['dense_acc_moved']:.0f} % with the depth moved (pixel position alone: ~18 %)")


# -------------------------------------------------------------------------------------------------------- loss.png
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
