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
that only manage the run, harness.RUN_OPTIONS, shape neither); a stage file made with other options stops the run,
naming them, unless --overwrite discards it. --resume continues a killed run (Ctrl-C prints the command).
"""
import argparse
import math
import os
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import data
import harness
from data import PRETRAIN_SOURCES
from hcmoco import TARGETS, HCMoCo, HCMoCoConfig, hrnet_prefixes

STAGE_SEED = 1000  # stage k draws its batches and augmentations from seed + k * STAGE_SEED


def cpu_model():
    """The CPU preset's model: the published one (HCMoCoConfig's defaults) but for what Config's docstring says."""
    # published 0.01 averages the running statistics over ~100 steps, stale in a run of a few hundred (README)
    return HCMoCoConfig(init="he", bn_momentum=0.1, global_loss="batch", num_negatives=256, tau=0.1,
                        lambda_sparse=6.0, dense_points=48, soft_width=0.2)


@dataclass
class Config:
    """Every option of a run; the defaults are the CPU preset (2 cores, both stages in under 10 minutes), each
    choice measured against the published recipe (docs/findings.md): He init (no ImageNet weights to replace
    the official std-0.001 init), AdamW with a short warm-up, in-batch Eq. 2 at tau 0.1 (a bank revisited a few
    times a run holds stale positives), 4,096 people rendered once into memory and augmented a batch at a time, the
    small HRNet at 64 px with batch 64 in bf16 where the CPU has it (more samples per second); 3 epochs of stage 1
    and 9 of stage 2 (the same steps as 6 + 6 retrieve better: stage 2's targets give more per step);
    48 dense points: a person covers 25-60 cells of the 16 x 16 grid, drawn with replacement; Eq. 6 weighted 6
    times the published weight (lambda_sparse 6: its intra-sample part is what the sparse level adds here);
    Eq. 4's distances in fifths of a cell (soft_width 0.2: a cell of the 16 x 16 grid covers as much of the person
    as 5 of the published 80 x 80 grid's); BatchNorm running statistics that keep up with a short run."""
    stage: Literal[1, 2] = 2  # train up to this stage
    preset: Literal["auto", "cpu", "paper"] = "cpu"  # the other options' defaults; auto: paper on a GPU, else cpu
    data: Literal[PRETRAIN_SOURCES] = "synthetic"  # rendered people, real data or both (data.pretraining_set)
    ntu_root: str | None = None  # NTU RGB+D's folder (data.NTURGBD)
    mpii_root: str | None = None  # MPII's folder (data.MPII)
    mpii_split: str = "train"  # MPII reads <mpii-root>/annot/<split>.json (train.json as published)
    coco_root: str | None = None  # COCO's folder (data.COCOKeypoints)
    targets: Literal[tuple(TARGETS)] = "global+soft+sparse"  # stage 2's Table 3 row; stage 1 is always 'global'
    # the command line sets its fields MODEL_OPTIONS (--tau, ...); each stage sets its Table 3 row (dense, sparse:
    # 'global' in stage 1, --targets in stage 2) and its memory bank's size (bank_size: the pre-training set's)
    model: HCMoCoConfig = field(default_factory=cpu_model)  # the model of both stages
    backbone_init: str | None = None  # both HRNets' weights: an HRNet file (ImageNet), a stage file, a model.pt
    image_size: int = 64  # pixels, square
    synthetic_samples: int = 4096  # people rendered for --data synthetic, 3/4 with depth
    cache: bool = True  # render the synthetic set once into memory
    # batch: the CPU recipe (rotation, scale, shift, flip, colour jitter) on whole batches in the training loop
    # (data.BatchAugment); published: the published NTU RGB+D / MPII recipes item by item in the loader's processes
    augment: Literal["batch", "published"] = "batch"  # where and how the pairs are augmented
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16 autocast: auto = on CUDA and on CPUs with native bf16
    stage1_epochs: int = 3  # stage 1's epochs (the sample-level target alone)
    epochs: int = 9  # stage 2's epochs (all targets, from stage 1)
    steps: int | None = None  # per stage, instead of the epochs (smoke runs)
    batch_size: int = 64  # global, over all ranks
    optimizer: Literal["sgd", "adamw"] = "adamw"  # SGD with momentum 0.9 (published) or AdamW; weight decay 1e-4
    lr: float = 1e-2  # the peak learning rate of each stage, on a cosine to 0
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


# The model's fields that are options of the command line (--tau, --lambda-sparse, ...), under their own names
MODEL_OPTIONS = ("hrnet", "width", "keypoint_graph", "depth_encoder", "lambda_global", "lambda_dense", "lambda_sparse",
                 "tau", "init", "bn_momentum", "global_loss", "num_negatives", "momentum", "dense_points",
                 "soft_width")

PRESETS = {
    "cpu": Config(),
    # supp. 1.1 and the published scripts: HRNet-W18 at 320 px, batch 224, SGD lr 0.03 with the per-epoch cosine
    # schedule, 100 + 100 epochs, 16,384 negatives from the memory bank at tau 0.07, 400 dense points per image and
    # the BatchNorm momentum (HCMoCoConfig's defaults), the published keypoint graph and augmentation (build_dataset);
    # He init as in the CPU preset, which --backbone-init replaces
    "paper": Config(preset="paper", model=HCMoCoConfig(hrnet="w18", keypoint_graph="published", init="he"),
                    image_size=320, synthetic_samples=65536, cache=False, stage1_epochs=100, epochs=100,
                    batch_size=224, optimizer="sgd", lr=0.03, warmup=0, lr_schedule="epoch", eval_every=500,
                    augment="published"),
}


def options(cfg):
    """{option: value} of a Config as the command line names them, the model's MODEL_OPTIONS among them."""
    values = asdict(cfg)
    model = values.pop("model")
    return values | {k: model[k] for k in MODEL_OPTIONS}


def preset_defaults():
    """--help's default of each option: its value in both presets, or the value of each."""
    cpu, paper = options(PRESETS["cpu"]), options(PRESETS["paper"])
    return {k: v if v == paper[k] else f"{v}, paper preset {paper[k]}" for k, v in cpu.items()} | {"preset": "auto"}


def resolved(cfg, device):
    """cfg on `device` ('cpu' | 'cuda'), its --precision auto made fp32 or bf16: what config.json records and what a
    stage file's options are compared with."""
    return replace(cfg, device=device, precision="bf16" if cli.use_bf16(cfg.precision, device) else "fp32")


def parse_args(argv=None):
    """The run's complete Config: the preset's values, replaced by the options given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_options(parser, Config, defaults=False, shown=preset_defaults(), nested={"model": MODEL_OPTIONS})
    given = vars(parser.parse_args(argv))
    cli.check(parser, [cli.device_check(given.get("device", "auto"))])  # before the device picks the preset
    device = cli.pick_device(given.pop("device", "auto"))
    preset = given.pop("preset", "auto")
    preset = PRESETS[{"auto": "paper" if device == "cuda" else "cpu"}.get(preset, preset)]
    model = {k: given.pop(k) for k in MODEL_OPTIONS if k in given}
    cfg = resolved(replace(preset, **given, model=replace(preset.model, **model)), device)
    cli.check(parser, harness.option_checks(cfg, given))
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


# -------------------------------------------------------------------------------------------------------- training
def stage_model(cfg, stage, bank_size):
    """The HCMoCoConfig that stage `stage` trains: cfg.model with the stage's Table 3 row (Eq. 1's dense and sparse
    switches: 'global' in stage 1, cfg.targets in stage 2) and one memory-bank entry per pre-training sample."""
    return replace(cfg.model, **TARGETS["global" if stage == 1 else cfg.targets], bank_size=bank_size)


def build_model(cfg, stage, bank_size, device, log):
    """The stage's model (stage_model) and optimiser. Stage 2 starts from stage 1's finished weights
    (encoders, mappers, memory bank); stage 1 from --backbone-init when given (both HRNets from the same weights,
    as the published scripts)."""
    model = HCMoCo(stage_model(cfg, stage, bank_size)).to(device)
    if stage == 2:
        model.load_state_dict(harness.load_stage(harness.stage_path(cfg.out, 1), device)["model"])
    elif cfg.backbone_init:
        for m in ("rgb", "depth"):
            report = model.encoders[m].load_pretrained(cfg.backbone_init, hrnet_prefixes(m))
            log(f"stage 1: {m} HRNet from {cfg.backbone_init}: " + ", ".join(f"{len(v)} {k}" for k, v in report.items()))
    return model, make_optimizer(cfg, model.parameters())


def make_optimizer(cfg, params):
    """cfg.optimizer over `params`: SGD with momentum 0.9 as published, or AdamW fused into one kernel over all
    parameters (CPU and CUDA; the per-parameter loop took 6x as long on CPU); weight decay 1e-4."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4, fused=True)


def stage_steps(cfg, stage, n):
    """The steps of stage `stage` on a pre-training set of n samples: --steps, or its epochs' passes over it."""
    epochs = cfg.stage1_epochs if stage == 1 else cfg.epochs
    return cfg.steps or epochs * math.ceil(n / cfg.batch_size)  # as learning_rate counts epochs


def learning_rate(cfg, step, total, steps_per_epoch):
    """The learning rate of `step` of a stage of `total` steps, under cfg.lr_schedule and the linear warm-up over
    the first cfg.warmup steps."""
    if cfg.lr_schedule == "step":
        return cli.cosine_lr(cfg.lr, step, total, cfg.warmup)
    epoch, epochs = step // steps_per_epoch + 1, math.ceil(total / steps_per_epoch)  # 1-based, as published
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    return warm * cli.cosine_lr(cfg.lr, epoch, epochs, floor=cfg.lr * 1e-3)


def run_stage(cfg, stage, dataset, device, rank=0, world=1, log=print):
    """Train one stage on `device` (this rank's); returns the path of its finished checkpoint."""
    path = harness.stage_path(cfg.out, stage)
    per_epoch = math.ceil(len(dataset) / cfg.batch_size)
    total = stage_steps(cfg, stage, len(dataset))
    # the stage's new weights and random draws depend on (seed, stage, rank) alone: a stage 2 after a stage 1 trained
    # in this process is the stage 2 of one that reused stage1.pt
    torch.manual_seed(cfg.seed + STAGE_SEED * stage + rank)
    model, optimizer = build_model(cfg, stage, len(dataset), device, log)
    initial = harness.conv_weights(model)  # the stage's starting weights (a resumed run rebuilds the same ones first)
    start = harness.resume(path, model, optimizer, device) if cfg.resume else 0
    if start:
        log(f"stage {stage}: resuming {path} at step {start}")
    model, net = harness.for_device(model, cfg, device, rank, world)
    loader = batches(cfg, dataset, stage, start, total, rank, world, device)
    lead = rank == 0  # the rank that measures, logs and saves
    if lead:
        write_row = harness.start_log(cfg.out, stage, start)
        heldout = data.to_device(data.heldout_batch(cfg.image_size, cfg.heldout), device)

    def save(step, done):
        if lead:
            cli.save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, done=done,
                                 stage=stage, rng=torch.get_rng_state(),
                                 config=dict(train=asdict(cfg), model=asdict(model.cfg))), path)

    augment = data.BatchAugment() if cfg.augment == "batch" else None
    bf16 = cli.use_bf16(cfg.precision, device.type)  # a Config built in code may still say 'auto'
    model.train()
    t0 = time.time()
    quiet = {} if lead else {"disable": True}  # an explicit disable=False would override TQDM_DISABLE
    with tqdm(total=total, initial=start, desc=f"stage {stage}", dynamic_ncols=True, **quiet) as bar:
        for step, batch in zip(range(start, total), loader):
            lr = learning_rate(cfg, step, total, per_epoch)
            cli.set_lr(optimizer, lr)
            measured = harness.monitors(model, heldout, initial) if lead and step % cfg.eval_every == 0 else {}
            if augment is not None:
                seed = (cfg.seed + STAGE_SEED * stage) * 1_000_003 + step  # the step's draws, whatever the ranks
                batch = augment(batch, torch.Generator().manual_seed(seed), rank * len(batch["index"]), cfg.batch_size)
            batch = data.to_device(batch, device)
            batch = dict(batch, rgb=batch["rgb"].contiguous(memory_format=torch.channels_last))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, terms = net(batch, gather=harness.gather_all if world > 1 else None)
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
        final = harness.monitors(model, heldout, initial)
        write_row(dict(step=total, time=round(time.time() - t0, 2), **final))
        log(f"stage {stage} done after {total} steps: {harness.monitor_line(final, cfg.heldout)}")
    save(total, done=True)
    if world > 1:
        dist.barrier()  # the next stage starts from this file on every rank: none may read it before rank 0 wrote it
    if lead:
        harness.plot_log(cfg.out)
    return path


def pretrain(cfg, rank=0, world=1, dataset=None):
    """Stages 1..cfg.stage of a complete Config (parse_args's), as harness.plan decides: a stage file in cfg.out is
    reused, continued or replaced only when its options allow it. The pre-training set is built (rendered, read)
    only when a stage has to train; `dataset`, when given, is trained on instead of the one cfg describes (items
    indexed by (index, augmentation seed) as data.MixedDataset gives them; under --augment batch raw items at
    cfg.image_size, under --augment published data.Transformed parts; docs/own-dataset.md: ValueError for an
    augmented or normalised item, or one of another size, under --augment batch, which would augment it again).
    When a stage trains, the stage files it replaces go first and cfg.out/config.json describes the run, so that
    it always describes the stage files beside it. Returns the stage files' paths."""
    if dataset is not None:
        harness.check_dataset(cfg, dataset)
    kind = cli.pick_device(cfg.device)  # a Config built in code may still say 'auto'
    device = torch.device(kind if kind == "cpu" else f"cuda:{rank % max(1, torch.cuda.device_count())}")
    log = print if rank == 0 else (lambda *a: None)
    os.makedirs(cfg.out, exist_ok=True)
    actions = harness.plan(cfg)
    if world > 1:
        dist.barrier()  # every rank has read the stage files before rank 0 removes any
    if rank == 0 and set(actions) != {"reuse"}:
        for stage, action in enumerate(actions, 1):
            if action == "train" and os.path.exists(harness.stage_path(cfg.out, stage)):
                os.remove(harness.stage_path(cfg.out, stage))
        cli.save_json(asdict(cfg), os.path.join(cfg.out, "config.json"))
    paths = []
    for stage, action in enumerate(actions[:cfg.stage], 1):
        if action == "reuse":
            log(f"stage {stage}: reusing the finished {harness.stage_path(cfg.out, stage)}, made with the same options")
        else:
            if dataset is None:
                dataset = build_dataset(cfg)
                log(f"{cfg.data} data: {len(dataset)} samples")
                steps = min(stage_steps(cfg, s, len(dataset)) for s in range(stage, cfg.stage + 1))
                for warning in harness.run_warnings(cfg, len(dataset), steps):
                    log(f"warning: {warning}")
            run_stage(cfg, stage, dataset, device, rank, world, log)
        paths.append(harness.stage_path(cfg.out, stage))
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    rank, world = harness.ranks(cfg)
    if rank == 0:
        print(f"HCMoCo pre-training on {cfg.device} x{world}; the resolved config (written to "
              f"{os.path.join(cfg.out, 'config.json')} when a stage trains):\n" + textwrap.fill(
                  " ".join(f"{k}={v}" for k, v in options(cfg).items()), 118, initial_indent="    ",
                  subsequent_indent="    "))
        if cfg.precision == "bf16" and not cli.native_bf16(cfg.device):
            print(f"note: --precision bf16 on a {cfg.device.upper()} without native bf16: it is emulated, several "
                  "times slower than fp32 (--precision auto takes fp32 here)")
    with harness.interruptible(cfg, argv, rank, world):
        saved = pretrain(cfg, rank, world)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        print(f"saved {', '.join(saved)}, log {os.path.join(cfg.out, 'log.jsonl')} and "
              f"{os.path.join(cfg.out, 'loss.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
