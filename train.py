"""HCMoCo pre-training, two stages as published: stage 1 trains the sample-level target alone (Eq. 2), stage 2
starts from it and trains the whole hierarchy (Eq. 1).

    python train.py --stage 2                      # both stages, synthetic data, CPU preset without a GPU
    python train.py --stage 1                      # stage 1 only
    python train.py --stage 2 --targets global+hard --out runs/hard   # an ablation row of Table 3
    torchrun --nproc_per_node 8 train.py --stage 2 --preset paper --data ntu+mpii --ntu-root N --mpii-root M \
        --backbone-init hrnetv2_w18_imagenet_pretrained.pth      # as published: both HRNets from ImageNet

Outputs in --out: stage1.pt, stage2.pt (model with its memory bank, optimiser, step, RNG state, config; written
atomically), log.jsonl (one row per logged step) and loss.png. --resume continues a killed run (Ctrl-C prints the
command); a finished stage1.pt found in --out is reused by stage 2.
"""
import argparse
import json
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
import synthetic
from encoders import CheckpointError, HRNet, load_checkpoint
from hcmoco import TARGETS, HCMoCo, HCMoCoConfig

PRESETS = {
    # CPU (2 cores, <= 10 min for both stages), each choice measured against the published recipe (README, "What
    # it took"): He init (no ImageNet weights to replace the official std-0.001 init), AdamW with a short warm-up,
    # in-batch Eq. 2 at tau 0.1 (a bank revisited a few times a run holds stale positives), 4,096 people rendered
    # once into memory, the small HRNet at 64 px with batch 64 (more samples per second), 4 epochs per stage;
    # 48 dense points: a person covers 25-60 cells of the 16 x 16 grid, drawn with replacement
    "cpu": dict(image_size=64, hrnet="small", width=16, batch_size=64, lr=3e-3, epochs=4, num_negatives=256,
                synthetic_samples=4096, dense_points=48, cache=True, init="he", global_loss="batch",
                tau=0.1, optimizer="adamw", warmup=20, eval_every=64),
    # supp. 1.1 and the published scripts: HRNet-W18 at 320 px, batch 224, SGD lr 0.03 with a cosine schedule,
    # 100 + 100 epochs, 16,384 negatives, 400 dense points per image, the published augmentation (build_dataset)
    "paper": dict(image_size=320, hrnet="w18", width=18, batch_size=224, lr=0.03, epochs=100, num_negatives=16384,
                  synthetic_samples=65536, dense_points=400, cache=False, init="he", global_loss="bank",
                  tau=0.07, optimizer="sgd", warmup=0, eval_every=500),
}

# At 32 px or less the HRNet's 1/32 branch is a single cell, and BatchNorm cannot train on one value per channel,
# which a batch holding one image of a modality gives (a mixed batch with one depth image, a tiny label subset).
# Any larger size works: the stride-2 convolutions round up and the branches are fused by resizing to exact sizes.
MIN_IMAGE_SIZE = 33


@dataclass
class Config:
    stage: int = 2
    preset: str = "auto"  # cpu | paper | auto (paper on a GPU, cpu otherwise)
    data: str = "synthetic"  # synthetic | ntu+mpii | ntu+coco
    ntu_root: str = ""
    mpii_root: str = ""
    coco_root: str = ""
    targets: str = "global+soft+sparse"  # stage 2's targets; stage 1 is always 'global'
    depth_encoder: str = "hrnet"
    epochs: int = 0  # per stage; 0 = the preset's
    steps: int = 0  # per stage, overrides epochs (smoke runs)
    batch_size: int = 0  # global; 0 = the preset's
    lr: float = 0.0  # 0 = the preset's
    image_size: int = 0
    hrnet: str = ""
    width: int = 0
    num_negatives: int = 0
    dense_points: int = 0
    synthetic_samples: int = 0
    cache: bool = None  # --cache / --no-cache: render the synthetic set once into memory (None = the preset's)
    init: str = ""  # HRNet init when no --backbone-init: official | he
    global_loss: str = ""  # bank | batch
    tau: float = 0.0
    optimizer: str = ""  # sgd | adamw
    warmup: int = -1  # linear learning-rate warm-up steps per stage
    eval_every: int = 0  # steps between held-out monitors (0 = the preset's)
    heldout: int = 256  # held-out people the monitors embed
    backbone_init: str = ""  # an official-format HRNet checkpoint for the RGB and depth HRNets (ImageNet weights)
    out: str = "runs/hcmoco"
    resume: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    compile: bool = False
    save_every: int = 100
    log_every: int = 10


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        name = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(name, type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    cfg = Config(**vars(args))
    checks = [(cfg.stage in (1, 2), "--stage must be 1 or 2"), (cfg.targets in TARGETS, f"--targets: one of {TARGETS}"),
              (cfg.preset in ("auto", "cpu", "paper"), "--preset: auto, cpu or paper"),
              (cfg.data in ("synthetic", "ntu+mpii", "ntu+coco"), "--data: synthetic, ntu+mpii or ntu+coco"),
              (cfg.device in ("auto", "cpu", "cuda"), "--device: auto, cpu or cuda"),
              (not cfg.backbone_init or os.path.isfile(cfg.backbone_init), f"--backbone-init: {cfg.backbone_init} not found")]
    # 0 leaves the preset's value (--steps 0: the epochs')
    checks += positive(cfg, ("epochs", "steps", "batch_size", "lr", "width", "num_negatives", "dense_points", "tau",
                             "eval_every"), zero_ok=True)
    checks += positive(cfg, ("save_every", "log_every"))
    checks += [(cfg.heldout >= 2, f"--heldout must be at least 2 (the monitors compare people), got {cfg.heldout}"),
               image_size_check(cfg.image_size, zero_ok=True),
               (not cfg.synthetic_samples or cfg.synthetic_samples >= 4,
                f"--synthetic-samples must be at least 4 (3/4 with depth, 1/4 without), got {cfg.synthetic_samples}"),
               (cfg.workers >= 0, f"--workers must be 0 or more, got {cfg.workers}"), out_check(cfg.out)]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return cfg


def positive(cfg, names, zero_ok=False):
    """(ok, message) per option of `names`: its value in cfg is positive (or 0, where 0 means a default)."""
    return [(getattr(cfg, n) > 0 or (zero_ok and getattr(cfg, n) == 0),
             f"--{n.replace('_', '-')} must be positive, got {getattr(cfg, n)}") for n in names]


def image_size_check(size, zero_ok=False):
    """(ok, message) for --image-size: at least MIN_IMAGE_SIZE (or 0, where 0 means the preset's)."""
    return ((zero_ok and size == 0) or size >= MIN_IMAGE_SIZE,
            f"--image-size must be at least {MIN_IMAGE_SIZE}, got {size} (below, the HRNet's 1/32 branch is one cell)")


def out_check(out):
    """(ok, message) for --out: a folder that exists or can be made, and written; found now, not at the first save."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return False, f"--out {out}: {existing} is a file, not a folder"
    return os.access(existing, os.W_OK | os.X_OK), f"--out {out}: {existing} is not writable"


def resolve(cfg):
    """Fill the options left at 0 / '' from the preset."""
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    preset = cfg.preset if cfg.preset != "auto" else ("paper" if device == "cuda" else "cpu")
    values, unset = asdict(cfg), asdict(Config())
    for k, v in PRESETS[preset].items():
        if values[k] == unset[k]:
            values[k] = v
    values.update(preset=preset, device=device)
    return Config(**values)


# ----------------------------------------------------------------------------------------------------------- data
def build_dataset(cfg):
    """data.pretraining_set of the config: the published augmentation recipes under the paper preset, the CPU
    recipe otherwise."""
    return data.pretraining_set(cfg.data, cfg.image_size, ("ntu", "mpii") if cfg.preset == "paper" else ("cpu", "cpu"),
                                cfg.synthetic_samples, cfg.seed, cfg.cache, cfg.workers, cfg.ntu_root, cfg.mpii_root,
                                cfg.coco_root)


HELDOUT_SEED = 900  # the monitors' fixed held-out people, disjoint from every training seed


def heldout_batch(image_size, n):
    """The fixed held-out batch of the monitors: n indoor synthetic people (every modality), resized only."""
    people = synthetic.SyntheticHumans(n, image_size, seed=HELDOUT_SEED, domain="indoor")
    transform = data.PairedTransform(image_size, train=False)
    return data.collate([transform(people[i]) for i in range(len(people))])


# ------------------------------------------------------------------------------------------------ checkpoints, logs
def load_stage(path, map_location="cpu"):
    """A checkpoint written by run_stage (CheckpointError if the file is not one)."""
    return load_checkpoint(path, "a train.py checkpoint", ("model", "optimizer", "step", "done", "rng", "config"),
                           map_location)


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


def plot_log(out):
    """loss.png: the loss terms (top row) and the held-out monitors (bottom row) against the step, stage 2 after
    stage 1 (dashed line)."""
    from matplotlib.figure import Figure  # not pyplot: a notebook calling train.main keeps its backend
    rows = read_log(out)
    if not rows:
        return
    offset = max((r["step"] for r in rows if r["stage"] == 1), default=-1) + 1
    x = [r["step"] + (offset if r["stage"] == 2 else 0) for r in rows]
    panels = [[(k, k) for k in ("loss", "global", "dense", "sparse")],
              [("retrieval", "held-out RGB -> depth top-1"), ("cos_rgb", "global cosine between samples"),
               ("dense_acc", "dense match: same person vs other person"), ("conv_cos_rgb", "conv cosine to start"),
               ("conv_norm_rgb", "conv weight norm")]]
    companions = {"cos_rgb": ("cos_depth", "cos_keypoints"), "dense_acc": ("dense_acc_other",),
                  "conv_cos_rgb": ("conv_cos_depth",), "conv_norm_rgb": ("conv_norm_depth",)}
    panels = [[(k, t) for k, t in row if any(k in r for r in rows)] for row in panels]
    panels = [row for row in panels if row]
    width = max(len(row) for row in panels)
    fig = Figure(figsize=(4 * width, 3 * len(panels)))
    axes = fig.subplots(len(panels), width, squeeze=False)
    for ax_row, row in zip(axes, panels):
        for ax, (key, title) in zip(ax_row, row):
            for k in (key, *companions.get(key, ())):
                pts = [(xi, r[k]) for xi, r in zip(x, rows) if k in r]
                if pts:
                    ax.plot(*zip(*pts), lw=1, marker="." if key != k or key in companions or key == "retrieval"
                            else None, label=k)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            if key in companions:
                ax.legend(fontsize=7)
            if offset and any(r["stage"] == 2 for r in rows):
                ax.axvline(offset, color="grey", ls="--", lw=0.8)
        for ax in ax_row[len(row):]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=90)


# -------------------------------------------------------------------------------------------------------- training
def model_config(cfg, stage, bank_size):
    return HCMoCoConfig(hrnet=cfg.hrnet, width=cfg.width, depth_encoder=cfg.depth_encoder,
                        **TARGETS["global" if stage == 1 else cfg.targets], num_negatives=cfg.num_negatives,
                        dense_points=cfg.dense_points, bank_size=bank_size, tau=cfg.tau, init=cfg.init,
                        global_loss=cfg.global_loss)


def gather_all(t):
    """Concatenate a tensor over ranks; float tensors keep their gradient to the rank that owns them."""
    import torch.distributed.nn.functional as dist_nn
    if t.is_floating_point():
        return torch.cat(dist_nn.all_gather(t))
    parts = [torch.empty_like(t, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.to(torch.int64))
    return torch.cat(parts).to(t.dtype)


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
                pixel position alone scores as high here as in dense_acc; content scores near chance
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
    person = F.interpolate((batch["mask"][:, None] & (batch["depth"] > 0)).float(), size=(h, w)).flatten(1) > 0
    other = person.roll(1, 0)  # the next person's cells, and their depth embeddings below
    for key, depth, where in (("dense_acc", dense["depth"], person),
                              ("dense_acc_other", dense["depth"].roll(1, 0), person & other)):
        keep = where.sum(1) > 0
        idx = torch.multinomial(where[keep].float(), points, replacement=True, generator=gen)  # [b, N]
        pick = lambda f: torch.gather(f[keep].flatten(2), 2, idx[:, None].expand(-1, D, -1))  # noqa: E731 [b, D, N]
        nearest = torch.einsum("bdi,bdj->bij", pick(dense["rgb"]), pick(depth)).argmax(-1)  # [b, N]
        out[key] = (torch.gather(idx, 1, nearest) == idx).float().mean().item()  # a repeat of the cell counts
    for m, weights in initial.items():
        now = [p for p in model.encoders[m].parameters() if p.dim() == 4]
        out[f"conv_norm_{m}"] = sum(p.norm().item() for p in now) / len(now)
        out[f"conv_cos_{m}"] = sum(F.cosine_similarity(p.flatten(), p0.flatten(), dim=0).item()
                                   for p, p0 in zip(now, weights)) / len(now)
    model.train(was_training)
    return {k: round(v, 4) for k, v in out.items()}


def run_stage(cfg, stage, dataset, rank=0, world=1, log=print):
    """Train one stage; returns the path of its finished checkpoint."""
    out, device = cfg.out, torch.device(cfg.device if cfg.device == "cpu" else f"cuda:{rank % max(1, torch.cuda.device_count())}")
    path = os.path.join(out, f"stage{stage}.pt")
    steps_per_epoch = math.ceil(len(dataset) / cfg.batch_size)
    total = cfg.steps or cfg.epochs * steps_per_epoch

    model = HCMoCo(model_config(cfg, stage, len(dataset))).to(device)
    optimizer = (torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4) if cfg.optimizer == "sgd"
                 else torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4))
    if stage == 2:
        first = load_stage(os.path.join(out, "stage1.pt"), device)
        model.load_state_dict(first["model"])  # encoders, mappers and memory bank of stage 1
    elif cfg.backbone_init:  # stage 1 starts both HRNets from the same weights, as the published scripts do
        for m in ("rgb", "depth"):
            report = model.encoders[m].load_pretrained(cfg.backbone_init)
            log(f"stage 1: {m} HRNet from {cfg.backbone_init}: " + ", ".join(f"{len(v)} {k}" for k, v in report.items()))
    initial = conv_weights(model)  # the stage's starting weights (a resumed run rebuilds the same ones first)
    start = 0
    if cfg.resume and os.path.exists(path):
        ckpt = load_stage(path, device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
        log(f"stage {stage}: resuming {path} at step {start}")
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        for encoder in model.encoders.values():
            encoder.compile()
    net = model
    if world > 1:
        # the memory bank is kept identical on every rank by the gathered update, so buffers are not broadcast
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None, broadcast_buffers=False, find_unused_parameters=True)

    sampler = data.StepBatches(len(dataset), cfg.batch_size, cfg.seed + 1000 * stage, start, total, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         num_workers=cfg.workers, collate_fn=data.collate,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))  # not the global RNG

    def save(step, done):
        if rank == 0:
            cli.save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, done=done,
                             stage=stage, rng=torch.get_rng_state(),
                             config=dict(train=asdict(cfg), model=asdict(model.cfg))), path)

    if rank == 0:
        rows = [r for r in read_log(out) if r["stage"] < stage or (r["stage"] == stage and r["step"] < start)]
        with open(os.path.join(out, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        heldout = data.to_device(heldout_batch(cfg.image_size, cfg.heldout), device)

    def write_row(row):
        if rank == 0:
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps(dict(stage=stage, **row)) + "\n")

    bar = tqdm(total=total, initial=start, desc=f"stage {stage}", disable=rank != 0, dynamic_ncols=True)
    model.train()
    t0 = time.time()
    for step, batch in zip(range(start, total), loader):
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / total))
        for group in optimizer.param_groups:
            group["lr"] = lr
        measured = monitors(model, heldout, initial) if rank == 0 and step % cfg.eval_every == 0 else {}
        batch = data.to_device(batch, device)
        if device.type == "cuda":
            batch = dict(batch, rgb=batch["rgb"].contiguous(memory_format=torch.channels_last))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, terms = net(batch, gather=gather_all if world > 1 else None)
        if not torch.isfinite(loss):
            bar.close()
            raise SystemExit(f"stage {stage}: non-finite loss at step {step} ({ {k: v.item() for k, v in terms.items()} }); "
                             f"the last good checkpoint is {path}" + ("" if os.path.exists(path) else " (none yet)"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        if step % cfg.log_every == 0 or step == total - 1 or measured:
            values = {k: round(v.item(), 4) for k, v in terms.items()}
            bar.set_postfix(values)
            write_row(dict(step=step, lr=lr, time=round(time.time() - t0, 2), **values, **measured))
        if (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save(step + 1, done=False)
    bar.close()
    if rank == 0:  # after the last update
        write_row(dict(step=total, time=round(time.time() - t0, 2), **monitors(model, heldout, initial)))
    save(total, done=True)
    if rank == 0:
        plot_log(out)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = resolve(parse_args(argv))
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
        if cfg.batch_size % world:
            raise SystemExit(f"--batch-size {cfg.batch_size} must be divisible by the {world} ranks")
    torch.manual_seed(cfg.seed + rank)
    try:
        dataset = build_dataset(cfg)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    os.makedirs(cfg.out, exist_ok=True)
    log = print if rank == 0 else (lambda *a: None)
    log(f"HCMoCo pre-training: preset {cfg.preset} on {cfg.device} x{world}, {cfg.data} data ({len(dataset)} "
        f"samples), HRNet {cfg.hrnet}, {cfg.image_size} px, batch {cfg.batch_size}")
    saved = []
    try:
        for stage in range(1, cfg.stage + 1):
            path = os.path.join(cfg.out, f"stage{stage}.pt")
            if os.path.exists(path) and load_stage(path)["done"]:
                log(f"stage {stage}: reusing the finished {path}")
            else:
                run_stage(cfg, stage, dataset, rank, world, log)
            saved.append(path)
    except CheckpointError as e:  # --backbone-init, or a stage file in --out
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: the checkpoints on disk are whole (save_atomic)
        if rank == 0:
            again = argv if "--resume" in argv else [*argv, "--resume"]
            print(f"\ninterrupted; continue from the last checkpoint in {cfg.out} with\n"
                  f"    python train.py {shlex.join(again)}", file=sys.stderr)
        raise SystemExit(130)
    if world > 1:
        dist.destroy_process_group()
    log(f"saved {', '.join(saved)}, log {os.path.join(cfg.out, 'log.jsonl')} and {os.path.join(cfg.out, 'loss.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
