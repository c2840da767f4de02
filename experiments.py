"""The paper's comparisons on the synthetic benchmark, with repeats and intervals; resumable (a finished pre-training
stage or a run with a metrics.json is not redone; one made with other options stops the runner).

    python experiments.py --out runs/experiments [--quick] [--jobs 2] [--backbone-init W18.pth]

Pre-training (train.py's CPU preset): one stage 1, then a stage 2 per row of Table 3 from it; the sample-level
baselines, each a stage 1 as long as HCMoCo's two stages together (the same steps) at its own best peak rate
(BASELINE_LR): CMC (Eq. 2) and MMV (--global-loss mmv); HCMoCo's whole pre-training and CMC's again with two more
seeds (the noise floor); with --backbone-init, the whole pre-training once more from those weights (the paper's
Ours* vs Ours: ImageNet init vs none).
Fine-tuning (finetune.py), all tested on the same 500 images; at 5 % labels every arm runs on the same 3 label
subsets x 2 seeds, so every comparison is paired:
  Table 2   scratch / CMC / MMV / HCMoCo on RGB and depth parsing, at 5 % and (one seed) at 100 % labels; HCMoCo
            against CMC again from each noise seed's pre-trainings, and over all seeds
  curves    scratch and HCMoCo at 5 % labels after 100 fine-tuning steps (the tables use 300)
  probes    frozen linear probes (rgb-probe, depth-probe) of every Table 3 row, of MMV, of the noise-floor seeds, of a
            random network with the same init and of pixel (x, y) + input
  Table 3   every row (sample-level, + dense hard, + dense soft, + sparse) on RGB and depth parsing at 5 % labels
            and by its probes; each row's gain over the previous one with its interval
  Tables 6-7   cross-modal supervision both ways and missing-modality inference, under the published protocol
            (every arm starts from the CMC checkpoint and trains its head with its contrastive targets: none,
            sample-level, all) and under ours (scratch without targets; HCMoCo from its own stage 2)
Jobs run `--jobs` at a time, each on its share of the cores. results.json holds every run (its fields and metrics)
and the summary; results.md the tables: means, paired gains with a bootstrap 95 % interval and the win rate.
"""
import argparse
import functools
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

import cli
import finetune
import harness
import train
from encoders import CheckpointError
from metrics import miou_of_counts

ARMS = ("scratch", "CMC", "MMV", "HCMoCo")  # Table 2's inits
LADDER = {"global": "global", "hard": "global+hard", "soft": "global+soft", "full": "global+soft+sparse"}  # Table 3
LABELS = {"global": "sample-level (CMC form)", "hard": "+ dense, hard (InfoNCE)", "soft": "+ dense, soft",
          "full": "+ sparse (HCMoCo)"}
SHORT = {"global": "sample-level", "hard": "hard", "soft": "soft"}
# Table 3's steps (row, the row it adds to): hard and soft are each a dense term on the sample-level row, and
# the sparse term joins the soft one; soft against hard compares the two dense targets
STEPS = (("hard", "global"), ("soft", "global"), ("soft", "hard"), ("full", "soft"))
PARSING = ("rgb-parsing", "depth-parsing")
LOW, HIGH = 0.05, 1.0  # the label ratios
BASELINE_LR = 3e-3  # CMC's and MMV's peak rate: each retrieves best at it of 1e-3 / 3e-3 / 1e-2 (docs/findings.md)
NOISE_SEEDS = (1, 2)  # every Table 3 row and CMC pre-trained again with these seeds: the noise floor
PRETRAIN_SEEDS = (0, *NOISE_SEEDS)
CURVE_STEPS = 100  # the curves' shorter fine-tuning budget
# --quick: a few steps of everything, at these sizes (a run's own step budget, the curves', stays)
QUICK_PRETRAIN = dict(steps=4, image_size=48, synthetic_samples=64, batch_size=8, heldout=8)
QUICK_FINETUNE = dict(steps=3, train_samples=16, test_samples=8, image_size=48)


@dataclass
class Options:
    out: str = "runs/experiments"  # the runs' folder: a folder per run, results.json, results.md
    quick: bool = False  # a few steps of everything (smoke test)
    jobs: int = 2  # runs at once, each on cores / jobs threads
    backbone_init: str | None = None  # ImageNet HRNet weights: adds the Ours* arm (pre-training from them)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="experiments.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_options(parser, Options)
    opts = Options(**vars(parser.parse_args(argv)))
    cli.check(parser, [(opts.jobs >= 1, f"--jobs must be positive, got {opts.jobs}"),
                       (opts.backbone_init is None or os.path.isfile(opts.backbone_init),
                        f"--backbone-init: {opts.backbone_init} not found")])
    cli.check(parser, [cli.out_check(opts.out)])  # last: it makes the folder
    return opts


# ------------------------------------------------------------------------------------------------------ the runs
@dataclass(frozen=True)
class Run:
    """One fine-tuning or probe run: the fields the tables select it by, and where it writes."""
    group: str  # table2 | curve | ladder | probe | noise | versatility
    task: str
    arm: str  # the init (Table 2), the Table 3 row, the probe's features, the versatility arm
    ratio: float = HIGH
    subset: int = 0
    seed: int = 0
    steps: int | None = None  # None: finetune.Config's
    protocol: str = ""  # versatility: published | ours
    source: str = "rgb"  # cross-modal
    target: str = "depth"

    @property
    def folder(self):
        parts = [self.group, self.task, self.protocol, self.arm, f"{self.source}-to-{self.target}"
                 if self.task == "cross-modal" else "", f"ratio{self.ratio:g}", f"subset{self.subset}-seed{self.seed}",
                 f"steps{self.steps}" if self.steps else ""]
        return os.path.join(*[p for p in parts if p])


def seeded(name, seed):
    """A pre-training's name (its checkpoint's key, its folder's and its probes' arm) for a pre-training seed: seed
    0's is the name itself."""
    return name if seed == 0 else f"{name}-seed{seed}"


def pretraining(opts, quick):
    """Train every pre-training run not yet finished; -> {name: checkpoint}: each Table 3 row's stage 2 from each
    pre-training seed ('global', 'hard', ..., 'full-seed<s>': all rows of a seed start from its 'full' folder's
    stage 1) and the sample-level baselines ('CMC', 'MMV', 'CMC-seed<s>'); 'HCMoCo' is 'full'."""
    pre = os.path.join(opts.out, "pretrain")
    # resume: a finished stage is not trained again, a killed one continues
    base = replace(train.PRESETS["cpu"], resume=True, workers=0, **(QUICK_PRETRAIN if quick else {}))
    base = train.resolved(base, cli.pick_device(base.device))
    first = {s: os.path.join(pre, seeded("full", s)) for s in PRETRAIN_SEEDS}
    run_jobs([("train", replace(base, stage=1, seed=s, out=first[s])) for s in PRETRAIN_SEEDS], opts.jobs,
             "pre-training stage 1 (HCMoCo's, one per pre-training seed)")
    jobs, ckpts = [], {}
    for seed in PRETRAIN_SEEDS:
        for name, targets in LADDER.items():
            out = os.path.join(pre, seeded(name, seed))
            os.makedirs(out, exist_ok=True)
            if out != first[seed] and not os.path.exists(os.path.join(out, "stage1.pt")):
                shutil.copy(os.path.join(first[seed], "stage1.pt"), out)
            jobs.append(("train", replace(base, stage=2, targets=targets, seed=seed, out=out)))
            ckpts[seeded(name, seed)] = os.path.join(out, "stage2.pt")
    # the sample-level methods: one stage of their objective for as many steps as HCMoCo's two stages, each at
    # the rate it learns best at rather than HCMoCo's, so that Table 2 compares against their best; CMC again
    # with each noise seed, for HCMoCo - CMC over pre-training seeds
    baseline = replace(base, stage=1, stage1_epochs=base.stage1_epochs + base.epochs, lr=BASELINE_LR,
                       steps=base.steps and 2 * base.steps)
    for arm, loss, arm_seeds in (("CMC", base.model.global_loss, PRETRAIN_SEEDS), ("MMV", "mmv", (0,))):
        for seed in arm_seeds:
            out = os.path.join(pre, seeded(arm, seed).lower())
            jobs.append(("train", replace(baseline, model=replace(base.model, global_loss=loss), seed=seed, out=out)))
            ckpts[seeded(arm, seed)] = os.path.join(out, "stage1.pt")
    if opts.backbone_init:
        out = os.path.join(pre, "full-imagenet")
        jobs.append(("train", replace(base, stage=2, backbone_init=opts.backbone_init, out=out)))
        ckpts["imagenet"] = os.path.join(out, "stage2.pt")
    run_jobs(jobs, opts.jobs, "pre-training: each Table 3 row's stage 2 from each seed, CMC (each seed) and MMV")
    ckpts["HCMoCo"] = ckpts["full"]
    return ckpts


def grid(ckpts, quick):
    """Every fine-tuning and probe run, each with the finetune.Config it runs."""
    subsets, seeds = ((1,), (0,)) if quick else ((1, 2, 3), (0, 1))
    low = [dict(ratio=LOW, subset=s, seed=seed) for s in subsets for seed in seeds]
    inits = {"scratch": "scratch", **ckpts}
    same_init = harness.load_stage(ckpts["CMC"])["config"]["model"]["init"]
    runs = {}

    def add(run, **config):
        runs[run] = dict(task=run.task, ratio=run.ratio, subset=run.subset, seed=run.seed, **config,
                         **({"steps": run.steps} if run.steps else {}))

    for task in PARSING:
        for arm in ARMS:
            for kw in low:
                add(Run("table2", task, arm, **kw), init=inits[arm])
            add(Run("table2", task, arm, seed=seeds[0]), init=inits[arm])
        for arm in ("scratch", "HCMoCo"):
            add(Run("curve", task, arm, **low[0], steps=CURVE_STEPS), init=inits[arm])
        for row in ("global", "hard", "soft"):  # the full row is Table 2's HCMoCo, and the noise group's
            for seed in PRETRAIN_SEEDS:
                for kw in low:
                    add(Run("ladder", task, seeded(row, seed), **kw), init=inits[seeded(row, seed)])
        for seed in NOISE_SEEDS:  # HCMoCo against CMC again from each noise seed's pre-trainings
            for arm, init in (("HCMoCo", "full"), ("CMC", "CMC")):
                for kw in low:
                    add(Run("noise", task, seeded(arm, seed), **kw), init=inits[seeded(init, seed)])
        if "imagenet" in ckpts:  # Ours* (from ImageNet weights) against Ours (Table 2's HCMoCo)
            for kw in low:
                add(Run("table2", task, "HCMoCo*", **kw), init=inits["imagenet"])
    for modality in ("rgb", "depth"):
        task = f"{modality}-probe"
        for arm in ("random", "pixels", "CMC", "MMV", *(seeded(row, s) for s in PRETRAIN_SEEDS for row in LADDER)):
            init = {"random": "scratch", "pixels": "pixels"}.get(arm, inits.get(arm))
            add(Run("probe", task, arm), init=init, scratch_init=same_init)
    for protocol, arms in (("published", (("none", "CMC", "none"), ("CMC", "CMC", "global"), ("HCMoCo", "CMC", "full"))),
                           ("ours", (("none", "scratch", "none"), ("HCMoCo", "HCMoCo", "full")))):
        for arm, init, contrast in arms:
            for source, target in (("rgb", "depth"), ("depth", "rgb")):
                add(Run("versatility", "cross-modal", arm, protocol=protocol, source=source, target=target,
                        seed=seeds[0]), init=inits[init], contrast=contrast, source=source, target=target)
            add(Run("versatility", "missing-modal", arm, protocol=protocol, seed=seeds[0]), init=inits[init],
                contrast=contrast)
    return runs


def experiments(opts):
    """Pre-train, fine-tune every run not yet done, then write results.json and results.md."""
    quick = opts.quick
    ckpts = pretraining(opts, quick)
    runs = grid(ckpts, quick)
    sizes = QUICK_FINETUNE if quick else {}
    configs = [finetune.Config(**{**sizes, **config, "out": os.path.join(opts.out, run.folder)}, workers=0)
               for run, config in runs.items()]
    jobs = [("finetune", cfg) for cfg in configs if not finished(cfg)]
    run_jobs(jobs, opts.jobs, f"fine-tuning and probes ({len(runs) - len(jobs)} of {len(runs)} runs already done)")
    measured = {run: read_run(os.path.join(opts.out, run.folder)) for run in runs}
    summary = summarise(measured, QUICK_FINETUNE["steps"] if quick else finetune.Config.steps)
    cli.save_json(dict(runs=[dict(asdict(run), folder=run.folder, metrics=m["metrics"]) for run, m in measured.items()],
                       summary=summary), os.path.join(opts.out, "results.json"))
    table = results_markdown(summary)
    with open(os.path.join(opts.out, "results.md"), "w") as f:
        f.write(table)
    print(table)


FINETUNE_RUN_OPTIONS = ("out", "workers", "device")  # how a fine-tuning run ran, not what it measured


def finished(cfg):
    """Whether the run of this finetune.Config is done: its folder has a metrics.json written with the same options
    (FINETUNE_RUN_OPTIONS and the options its task does not read aside). A metrics.json of other options raises
    CheckpointError naming the run and the option, since taking it as done would put another experiment's number
    in the tables."""
    path = os.path.join(cfg.out, "metrics.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        ran = json.load(f)["config"]
    unread = tuple(k for k, (ignored, _) in finetune.unread_options(cfg).items() if ignored)
    changed = harness.option_changes(ran, asdict(cfg), FINETUNE_RUN_OPTIONS + unread)
    if changed:
        raise CheckpointError(f"{path} was measured with other options than this runner asks for ({', '.join(changed)})"
                              f"; delete its folder to run it again")
    return True


def read_run(folder):
    """{'metrics': the run's metrics.json without its config and per-class table, 'counts': its per_image.pt
    ({'per_image': metrics.image_counts of the test set}, a versatility run's per test view) or None}."""
    with open(os.path.join(folder, "metrics.json")) as f:
        metrics = {k: v for k, v in json.load(f).items() if k not in ("config", "iou", "sweep")}
    path = os.path.join(folder, "per_image.pt")
    return dict(metrics=metrics, counts=torch.load(path, weights_only=True) if os.path.exists(path) else None)


def run_jobs(jobs, n, what):
    """Run ('train' | 'finetune', Config) jobs, n at a time in fresh processes that share the cores (their
    progress bars off when n > 1); a line saying `what` they are, and a [k/N] line per finished job."""
    threads = max(1, (os.cpu_count() or 1) // n)
    print(f"{what}: {len(jobs)} job(s), {min(n, len(jobs))} at a time", flush=True)
    if n == 1:
        for k, (kind, cfg) in enumerate(jobs, 1):
            run_job((kind, cfg), threads)
            print(f"[{k}/{len(jobs)}] {kind} {cfg.out}", flush=True)
        return
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it when imported: the spawned processes start with it
    try:
        with multiprocessing.get_context("spawn").Pool(n) as pool:
            for k, (kind, cfg) in enumerate(pool.imap_unordered(functools.partial(run_job, threads=threads), jobs), 1):
                print(f"[{k}/{len(jobs)}] {kind} {cfg.out}", flush=True)
    finally:
        if previous is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = previous


def run_job(job, threads):
    """One job in this process, on `threads` threads: train.pretrain of a train.Config or finetune.run of a
    finetune.Config."""
    kind, cfg = job
    torch.set_num_threads(threads)
    if kind == "train":
        train.pretrain(cfg)
    else:
        finetune.run(cfg)
    return job


# ------------------------------------------------------------------------------------------------------ the tables
def paired_gain(a, b, resamples=10_000, seed=0):
    """Mean of the paired differences a - b, its bootstrap 95 % interval (percentiles of the means of
    `resamples` resamples) and the win rate (share of pairs with a > b). a, b: [P] pairs, or [S, P]: P pairs from
    each of S pairs of pre-trainings, resampled at both levels (the pre-trainings, then each one's pairs), so the
    interval holds the pre-training seeds' spread as well as the fine-tuning's."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d2 = d.reshape(-1, d.shape[-1])  # [S, P]
    rng = np.random.default_rng(seed)
    S, P = d2.shape
    pretrainings = rng.integers(S, size=(resamples, S, 1))  # [R, S, 1]
    means = d2[pretrainings, rng.integers(P, size=(resamples, S, P))].mean((1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return dict(mean=float(d.mean()), lo=float(lo), hi=float(hi), wins=float((d > 0).mean()), n=d.size)


def image_bootstrap(a, b, resamples=2_000, seed=0):
    """The mIoU difference of two runs on the same test images, mIoU(a) - mIoU(b), with its bootstrap 95 % interval
    over the images (each resample draws the images with replacement and recomputes both mIoUs from the per-image
    counts a, b [N, 3, K] of metrics.image_counts); n = the number of images. a, b [S, N, 3, K]: the same images
    under S pairs of pre-trainings, the mean of their S differences, resampled at both levels as paired_gain's."""
    a, b = (torch.as_tensor(x, dtype=torch.float64).reshape(-1, *x.shape[-3:]) for x in (a, b))  # [S, N, 3, K]
    S, N = a.shape[:2]
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(N, (resamples, S, N), generator=g)  # [R, S, N]
    pretrainings = torch.randint(S, (resamples, S), generator=g)  # [R, S]
    drawn = torch.zeros(resamples, S, N, dtype=torch.float64).scatter_add_(-1, images, torch.ones_like(
        images, dtype=torch.float64))  # [R, S, N]: how often each image is drawn
    pick = pretrainings[..., None, None, None].expand(-1, -1, 1, *a.shape[-2:])  # [R, S, 1, 3, K]

    def resampled(x):  # the resamples' summed counts of each drawn pre-training -> mIoU [R, S]
        counts = torch.einsum("rjn,pnck->rjpck", drawn, x).gather(2, pick)  # [R, S, 1, 3, K]
        return miou_of_counts(counts)

    d = (resampled(a) - resampled(b)).mean(1).numpy()  # [R]
    lo, hi = np.percentile(d, [2.5, 97.5])
    return dict(mean=float((miou_of_counts(a) - miou_of_counts(b)).mean()), lo=float(lo), hi=float(hi), n=N)


def select(measured, **fields):
    """The measured runs whose fields have these values, in the grid's order."""
    return [m for run, m in measured.items() if all(getattr(run, k) == v for k, v in fields.items())]


def summarise(measured, main_steps):
    """The tables' numbers: means over repeats, paired gains at 5 % labels (main_steps: the fine-tuning budget of
    the main runs), the ladder's steps with their intervals, the noise floor, the versatility tables."""
    miou = lambda runs, key="miou": [r["metrics"][key] for r in runs]  # noqa: E731
    out = {"table2": {}, "gains": {}, "seeds": {}, "curves": {}, "probes": {}, "ladder": {}, "noise": {},
           "versatility": {}}
    arms = [a for a in (*ARMS, "HCMoCo*") if select(measured, group="table2", arm=a)]
    for task in PARSING:
        low = {a: miou(select(measured, group="table2", task=task, arm=a, ratio=LOW)) for a in arms}
        for a in arms:
            high = select(measured, group="table2", task=task, arm=a, ratio=HIGH)
            out["table2"][f"{task}/{a}"] = dict(low=float(np.mean(low[a])), low_sd=float(np.std(low[a])),
                                                **({"high": high[0]["metrics"]["miou"]} if high else {}))
        pairs = [("HCMoCo", "scratch"), ("HCMoCo", "CMC"), ("HCMoCo", "MMV"), ("CMC", "scratch")]
        for a, b in pairs + ([("HCMoCo*", "HCMoCo")] if "HCMoCo*" in arms else []):
            out["gains"][f"{task}/{a}-{b}"] = paired_gain(low[a], low[b])
        # HCMoCo - CMC from each pre-training seed (0: Table 2's), and over all of them
        by_seed = {arm: [low[arm], *(miou(select(measured, group="noise", task=task, arm=seeded(arm, s)))
                                     for s in NOISE_SEEDS)] for arm in ("HCMoCo", "CMC")}  # [seeds][pairs]
        for s, a, b in zip(PRETRAIN_SEEDS, by_seed["HCMoCo"], by_seed["CMC"]):
            out["seeds"][f"{task}/seed{s}"] = paired_gain(a, b)
        out["seeds"][f"{task}/all"] = paired_gain(by_seed["HCMoCo"], by_seed["CMC"])
        means = {arm: [float(np.mean(v)) for v in runs] for arm, runs in by_seed.items()}
        out["noise"][f"{task}/pretrain-seed"] = {arm: dict(values=v, spread=float(np.ptp(v)))
                                                 for arm, v in means.items()}
        for arm in ("scratch", "HCMoCo"):  # the curves' subset and seed: the first of the grid
            out["curves"][f"{task}/{arm}/{CURVE_STEPS}"] = miou(select(measured, group="curve", task=task, arm=arm))[0]
            out["curves"][f"{task}/{arm}/{main_steps}"] = low[arm][0]
        rows = {row: by_seed["HCMoCo"] if row == "full" else  # [seeds][pairs]
                [miou(select(measured, group="ladder", task=task, arm=seeded(row, s))) for s in PRETRAIN_SEEDS]
                for row in LADDER}
        out["ladder"][task] = {row: float(np.mean(v)) for row, v in rows.items()}
        for row, prev in STEPS:
            out["ladder"][f"{task}/{row}-{prev}"] = paired_gain(rows[row], rows[prev])
    for modality in ("rgb", "depth"):
        probe = {r.arm: m for r, m in measured.items() if r.group == "probe" and r.task == f"{modality}-probe"}
        out["probes"][modality] = {arm: m["metrics"]["miou"] for arm, m in probe.items()}
        counts = {row: torch.stack([probe[seeded(row, s)]["counts"]["per_image"] for s in PRETRAIN_SEEDS])
                  for row in LADDER}  # [seeds, N, 3, K]
        for row, prev in STEPS:
            out["ladder"][f"{modality}-probe/{row}-{prev}"] = image_bootstrap(counts[row], counts[prev])
        out["ladder"][f"{modality}-probe"] = {row: float(np.mean([probe[seeded(row, s)]["metrics"]["miou"]
                                                                 for s in PRETRAIN_SEEDS])) for row in LADDER}
        seeds = [probe[seeded("full", s)]["metrics"]["miou"] for s in PRETRAIN_SEEDS]
        out["noise"][f"{modality}-probe"] = dict(values=seeds, spread=float(np.ptp(seeds)), sd=float(np.std(seeds)))
    for task in PARSING:  # the fine-tuning seeds' spread: the same init and label subset, another seed
        same = {}
        for r, m in measured.items():
            if r.group == "table2" and r.task == task and r.ratio == LOW:
                same.setdefault((r.arm, r.subset), []).append(m["metrics"]["miou"])
        out["noise"][f"{task}/finetune-seed"] = float(np.mean([np.ptp(v) for v in same.values()]))
    for protocol in ("published", "ours"):
        for arm in ("none", "CMC", "HCMoCo"):
            cross = {(r.source, r.target): m["metrics"] for r, m in measured.items() if r.group == "versatility"
                     and r.protocol == protocol and r.arm == arm and r.task == "cross-modal"}
            missing = select(measured, group="versatility", protocol=protocol, arm=arm, task="missing-modal")
            if cross:
                out["versatility"][f"{protocol}/{arm}"] = {
                    "rgb_to_depth": cross[("rgb", "depth")]["depth_miou"],
                    "rgb_to_rgb": cross[("rgb", "depth")]["rgb_miou"],  # the same head on its own modality
                    "depth_to_rgb": cross[("depth", "rgb")]["rgb_miou"],
                    "depth_to_depth": cross[("depth", "rgb")]["depth_miou"],
                    **{f"missing_{m}": missing[0]["metrics"][f"{m}_miou"] for m in ("rgb", "depth", "fused")}}
    return out


def interval(g):
    wins = f", {round(g['wins'] * g['n'])}/{g['n']}" if "wins" in g else ""
    return f"{g['mean']:+.1f} [{g['lo']:+.1f}, {g['hi']:+.1f}]{wins}"


def results_markdown(s):
    """The measured tables in the shapes of the paper's Tables 2-3 and 6-7, with the paired gains, the probes, the
    noise floor and the fine-tuning curves."""
    f = lambda x: f"{x:.1f}"  # noqa: E731
    t2 = s["table2"]
    arms = sorted({k.split("/")[1] for k in t2}, key=lambda a: (*ARMS, "HCMoCo*").index(a))
    lines = [f"| init | RGB parsing mIoU ({LOW:.0%} labels) | RGB ({HIGH:.0%}) | depth parsing mIoU ({LOW:.0%}) "
             f"| depth ({HIGH:.0%}) |", "|---|---|---|---|---|"]
    for arm in arms:
        cells = [f"{f(t2[f'{t}/{arm}']['low'])} ± {f(t2[f'{t}/{arm}']['low_sd'])} | "
                 f"{f(t2[f'{t}/{arm}']['high']) if 'high' in t2[f'{t}/{arm}'] else '–'}" for t in PARSING]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"| paired gain at {LOW:.0%} labels (mIoU) | RGB parsing: mean [95 % CI], wins | depth parsing |",
              "|---|---|---|"]
    for pair in sorted({k.split("/")[1] for k in s["gains"]}, key=lambda p: (
            "HCMoCo-scratch", "HCMoCo-CMC", "HCMoCo-MMV", "CMC-scratch", "HCMoCo*-HCMoCo").index(p)):
        lines.append(f"| {pair.replace('-', ' − ')} | " + " | ".join(interval(s["gains"][f"{t}/{pair}"])
                                                                    for t in PARSING) + " |")
    seeds = ", ".join(map(str, PRETRAIN_SEEDS))  # the tables' spelling of the pre-training seeds
    lines += ["", f"| HCMoCo − CMC at {LOW:.0%} labels, by pre-training seed | RGB parsing | depth parsing |",
              "|---|---|---|"]
    for name, label in ((f"seed{k}", f"seed {k}{' (the table above)' if k == 0 else ''}") for k in PRETRAIN_SEEDS):
        lines.append(f"| {label} | " + " | ".join(interval(s["seeds"][f"{t}/{name}"]) for t in PARSING) + " |")
    lines.append(f"| seeds {seeds} (resampled by pre-training, then by pair) | "
                 + " | ".join(interval(s["seeds"][f"{t}/all"]) for t in PARSING) + " |")
    budgets = sorted({int(k.rsplit("/", 1)[1]) for k in s["curves"]})
    lines += ["", f"| fine-tuning steps ({LOW:.0%} labels, one subset and seed) | " + " | ".join(
        f"{t} {arm}" for t in ("RGB", "depth") for arm in ("scratch", "HCMoCo")) + " |", "|---" * 5 + "|"]
    for steps in budgets:
        lines.append(f"| {steps} | " + " | ".join(f(s["curves"][f"{t}/{arm}/{steps}"]) for t in PARSING
                                                  for arm in ("scratch", "HCMoCo")) + " |")
    p = s["probes"]
    lines += ["", "| frozen linear probe (all labels) | RGB mIoU | depth mIoU |", "|---|---|---|"]
    for arm, label in (("pixels", "pixel (x, y) + input"), ("random", "random network, same init"), ("CMC", "CMC"),
                       ("MMV", "MMV"), ("full", "HCMoCo")):
        lines.append(f"| {label} | {f(p['rgb'][arm])} | {f(p['depth'][arm])} |")
    lines += ["", f"| Table 3 row (means over pre-training seeds {seeds}) | RGB probe | depth probe "
              f"| RGB parsing ({LOW:.0%}) | depth parsing ({LOW:.0%}) |", "|---|---|---|---|---|"]
    for row in LADDER:
        lines.append(f"| {LABELS[row]} | " + " | ".join(f(s["ladder"][t][row]) for t in (
            "rgb-probe", "depth-probe", *PARSING)) + " |")
        for prev in (b for a, b in STEPS if a == row):
            step = [s["ladder"][f"{t}/{row}-{prev}"] for t in ("rgb-probe", "depth-probe", *PARSING)]
            lines.append(f"| &nbsp;&nbsp; gain over the {SHORT[prev]} row | " + " | ".join(map(interval, step)) + " |")
    n = s["noise"]
    spread = lambda v: f"{f(v['spread'])} ({', '.join(map(f, v['values']))})"  # noqa: E731
    lines += ["", "| noise floor | RGB | depth |", "|---|---|---|",
              f"| probe, pre-training seeds {seeds} (range) | "
              f"{spread(n['rgb-probe'])} | {spread(n['depth-probe'])} |",
              f"| {LOW:.0%}-label parsing, fine-tuning seeds 0 and 1 (mean range) | "
              f"{f(n['rgb-parsing/finetune-seed'])} | {f(n['depth-parsing/finetune-seed'])} |"]
    for arm in ("HCMoCo", "CMC"):
        lines.append(f"| {arm}, {LOW:.0%}-label parsing, pre-training seeds {seeds} (range of "
                     "the means) | " + " | ".join(spread(n[f"{t}/pretrain-seed"][arm]) for t in PARSING) + " |")
    lines += ["", "| protocol: contrastive targets | RGB -> depth mIoU (on RGB) | depth -> RGB (on depth) | "
              "missing-modal: RGB only | depth only | both |", "|---|---|---|---|---|---|"]
    for key, v in s["versatility"].items():
        protocol, arm = key.split("/")
        lines.append(f"| {protocol}: {arm} | {f(v['rgb_to_depth'])} ({f(v['rgb_to_rgb'])}) | {f(v['depth_to_rgb'])} "
                     f"({f(v['depth_to_depth'])}) | {f(v['missing_rgb'])} | {f(v['missing_depth'])} | "
                     f"{f(v['missing_fused'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        experiments(opts)
    except CheckpointError as e:  # a stage file or a finished run in --out made with other options
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: the finished runs and stages are whole on disk
        print(f"\ninterrupted; the same command continues where it stopped (finished runs in {opts.out} are kept, an "
              "unfinished pre-training stage resumes)", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
