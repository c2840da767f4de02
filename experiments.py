"""The paper's comparisons on the synthetic benchmark, with repeats and intervals; resumable (a finished pre-training
stage or a run with a metrics.json is not redone).

    python experiments.py --out runs/experiments [--quick] [--jobs 2]
    python finetune.py experiments --out runs/experiments [--quick] [--jobs 2]     # the same

Pre-training (train.py's CPU preset): one stage 1 (the CMC model), then a stage 2 per row of Table 3 from it.
Fine-tuning (finetune.py), all tested on the same 500 images:
  Table 2   scratch / CMC / HCMoCo on RGB and depth parsing; at 5 % labels every arm runs on the same 3 label
            subsets x 2 seeds, so each HCMoCo run has a scratch and a CMC twin; at 100 % labels one seed
  curves    scratch and HCMoCo at 5 % labels after 100 fine-tuning steps (the tables use 300)
  probes    frozen linear probes (rgb-probe, depth-probe) of CMC, HCMoCo, a random network with the same init
            and pixel (x, y) + input
  Table 3   the ladder of targets on depth parsing at 5 % labels (label subset 1, seed 0)
  Tables 6-7   cross-modal supervision both ways and missing-modality inference
Jobs run `--jobs` at a time, each on its share of the cores. results.json holds every run and the summary;
results.md the tables: means, and paired gains with a bootstrap 95 % interval and the win rate.
"""
import argparse
import functools
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch

import cli
import finetune
import train
from encoders import CheckpointError

ARMS = ("scratch", "CMC", "HCMoCo")  # Table 2's inits
LADDER = {"global": "global", "hard": "global+hard", "soft": "global+soft", "full": "global+soft+sparse"}  # Table 3
LOW, HIGH = 0.05, 1.0  # the label ratios
# --quick: a few steps of everything, at these sizes (a run's own step budget, the curves', stays)
QUICK_PRETRAIN = dict(steps=4, image_size=48, synthetic_samples=64, batch_size=8, heldout=8)
QUICK_FINETUNE = dict(steps=3, train_samples=16, test_samples=8, image_size=48)


@dataclass
class Options:
    out: str = "runs/experiments"  # the runs' folder: a folder per run, results.json, results.md
    quick: bool = False  # a few steps of everything (smoke test)
    jobs: int = 2  # runs at once, each on cores / jobs threads


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="experiments.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_options(parser, Options)
    opts = Options(**vars(parser.parse_args(argv)))
    cli.check(parser, [(opts.jobs >= 1, f"--jobs must be positive, got {opts.jobs}")])
    cli.check(parser, [cli.out_check(opts.out)])  # last: it makes the folder
    return opts


# ------------------------------------------------------------------------------------------------------ the runs
def experiments(opts):
    """Pre-train, fine-tune every run not yet done, then write results.json and results.md."""
    quick = opts.quick
    subsets, seeds, budgets = ((1,), (0,), (2,)) if quick else ((1, 2, 3), (0, 1), (100,))
    pre = os.path.join(opts.out, "pretrain")
    first = os.path.join(pre, "full")
    # resume: a finished stage is not trained again, a killed one continues
    base = replace(train.PRESETS["cpu"], resume=True, workers=0, **(QUICK_PRETRAIN if quick else {}))
    base = replace(base, device=cli.pick_device(base.device))
    run_jobs([("train", replace(base, stage=1, out=first))], 1, "pre-training stage 1 (the CMC model)")
    stage2 = []
    for name, targets in LADDER.items():
        out = os.path.join(pre, name)
        os.makedirs(out, exist_ok=True)
        if out != first and not os.path.exists(os.path.join(out, "stage1.pt")):
            shutil.copy(os.path.join(first, "stage1.pt"), out)
        stage2.append(("train", replace(base, stage=2, targets=targets, out=out)))
    run_jobs(stage2, opts.jobs, "pre-training stage 2, one per row of Table 3")
    inits = {"scratch": "scratch", "CMC": os.path.join(first, "stage1.pt"),
             "HCMoCo": os.path.join(pre, "full", "stage2.pt")}
    same_init = train.load_stage(inits["CMC"])["config"]["model"]["init"]
    keys, jobs = [], []

    def job(key, **kw):
        keys.append(key)
        out = os.path.join(opts.out, key)
        if not os.path.exists(os.path.join(out, "metrics.json")):
            sizes = QUICK_FINETUNE if quick else {}
            jobs.append(("finetune", finetune.Config(**{**sizes, **kw}, out=out, workers=0)))

    grid = [(s, seed) for s in subsets for seed in seeds]
    for task in ("rgb-parsing", "depth-parsing"):
        for arm in ARMS:
            for s, seed in grid:
                job(f"{task}/{arm}/low/subset{s}-seed{seed}", task=task, init=inits[arm], ratio=LOW, subset=s, seed=seed)
            job(f"{task}/{arm}/high/seed{seeds[0]}", task=task, init=inits[arm], ratio=HIGH, seed=seeds[0])
        for arm in ("scratch", "HCMoCo"):
            for steps in budgets:
                job(f"{task}/{arm}/low/subset{subsets[0]}-seed{seeds[0]}/steps{steps}", task=task, init=inits[arm],
                    ratio=LOW, subset=subsets[0], seed=seeds[0], steps=steps)
    for modality in ("rgb", "depth"):
        for arm, init in (("random", "scratch"), ("pixels", "pixels"), ("CMC", inits["CMC"]),
                          ("HCMoCo", inits["HCMoCo"])):
            job(f"probe/{modality}/{arm}", task=f"{modality}-probe", init=init, scratch_init=same_init)
    for name in ("global", "hard", "soft"):  # the first label subset only, to keep the run under 2 h
        for s in subsets[:1]:
            job(f"ablation/{name}/subset{s}-seed{seeds[0]}", task="depth-parsing",
                init=os.path.join(pre, name, "stage2.pt"), ratio=LOW, subset=s, seed=seeds[0])
    for arm, init, contrast in (("none", "scratch", "none"), ("CMC", inits["CMC"], "global"),
                                ("HCMoCo", inits["HCMoCo"], "full")):
        for source, target in (("rgb", "depth"), ("depth", "rgb")):
            job(f"cross-modal/{source}-to-{target}/{arm}/seed{seeds[0]}", task="cross-modal", init=init,
                source=source, target=target, contrast=contrast, seed=seeds[0])
        job(f"missing-modal/{arm}/seed{seeds[0]}", task="missing-modal", init=init, contrast=contrast, seed=seeds[0])
    run_jobs(jobs, opts.jobs, f"fine-tuning and probes ({len(keys) - len(jobs)} of {len(keys)} runs already done)")
    runs = {}
    for key in keys:
        with open(os.path.join(opts.out, key, "metrics.json")) as f:
            runs[key] = {k: v for k, v in json.load(f).items() if k not in ("config", "iou", "sweep")}
    main_steps = QUICK_FINETUNE["steps"] if quick else finetune.Config.steps
    summary = summarise(runs, subsets, seeds, budgets, main_steps)
    cli.save_json(dict(runs=runs, summary=summary), os.path.join(opts.out, "results.json"))
    table = results_markdown(summary)
    with open(os.path.join(opts.out, "results.md"), "w") as f:
        f.write(table)
    print(table)


def run_jobs(jobs, n, what):
    """Run ('train' | 'finetune', Config) jobs, n at a time in fresh processes that share the cores (their
    progress bars off when n > 1); a line saying `what` they are, and a [k/N] line per finished job."""
    threads = max(1, (os.cpu_count() or 1) // n)
    print(f"{what}: {len(jobs)} job(s), {min(n, len(jobs))} at a time", flush=True)
    if n == 1:
        for k, (kind, cfg) in enumerate(jobs, 1):
            run_job((kind, cfg), threads, quiet=False)
            print(f"[{k}/{len(jobs)}] {kind} {cfg.out}", flush=True)
        return
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        for k, (kind, cfg) in enumerate(pool.imap_unordered(functools.partial(run_job, threads=threads, quiet=True),
                                                            jobs), 1):
            print(f"[{k}/{len(jobs)}] {kind} {cfg.out}", flush=True)


def run_job(job, threads, quiet):
    """One job in this process, on `threads` threads: train.pretrain of a train.Config or finetune.run of a
    finetune.Config."""
    kind, cfg = job
    torch.set_num_threads(threads)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    if kind == "train":
        train.pretrain(cfg)
    else:
        finetune.run(cfg)
    return job


# ------------------------------------------------------------------------------------------------------ the tables
def paired_gain(a, b, resamples=10_000, seed=0):
    """Mean of the paired differences a - b, its bootstrap 95 % interval (percentiles of the means of
    `resamples` resamples of the pairs) and the win rate (share of pairs with a > b)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    means = np.random.default_rng(seed).choice(d, size=(resamples, len(d))).mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return dict(mean=float(d.mean()), lo=float(lo), hi=float(hi), wins=float((d > 0).mean()), n=len(d))


def summarise(runs, subsets, seeds, budgets, main_steps):
    """The tables' numbers from the runs: means over repeats, and paired gains at 5 % labels (main_steps: the
    fine-tuning budget of the main runs)."""
    low = [f"subset{s}-seed{seed}" for s in subsets for seed in seeds]
    one = f"subset{subsets[0]}-seed{seeds[0]}"  # the curves' run
    out = {"table2": {}, "gains": {}, "curves": {}, "probes": {}, "ladder": {}, "versatility": {}}
    for task in ("rgb-parsing", "depth-parsing"):
        miou = {arm: [runs[f"{task}/{arm}/low/{k}"]["miou"] for k in low] for arm in ARMS}
        for arm in ARMS:
            out["table2"][f"{task}/{arm}"] = {"low": float(np.mean(miou[arm])), "low_sd": float(np.std(miou[arm])),
                                              "high": runs[f"{task}/{arm}/high/seed{seeds[0]}"]["miou"]}
        for a, b in (("HCMoCo", "scratch"), ("HCMoCo", "CMC"), ("CMC", "scratch")):
            out["gains"][f"{task}/{a}-{b}"] = paired_gain(miou[a], miou[b])
        for arm in ("scratch", "HCMoCo"):
            for steps in budgets:
                out["curves"][f"{task}/{arm}/{steps}"] = runs[f"{task}/{arm}/low/{one}/steps{steps}"]["miou"]
            out["curves"][f"{task}/{arm}/{main_steps}"] = runs[f"{task}/{arm}/low/{one}"]["miou"]
    for key, r in runs.items():
        if key.startswith("probe/"):
            out["probes"][key[len("probe/"):]] = r["miou"]
    for name in ("global", "hard", "soft"):
        out["ladder"][name] = runs[f"ablation/{name}/{one}"]["miou"]
    out["ladder"]["full"] = runs[f"depth-parsing/HCMoCo/low/{one}"]["miou"]
    for arm in ("none", "CMC", "HCMoCo"):
        mm = runs[f"missing-modal/{arm}/seed{seeds[0]}"]
        out["versatility"][arm] = {"rgb_to_depth": runs[f"cross-modal/rgb-to-depth/{arm}/seed{seeds[0]}"]["depth_miou"],
                                   "depth_to_rgb": runs[f"cross-modal/depth-to-rgb/{arm}/seed{seeds[0]}"]["rgb_miou"],
                                   **{f"missing_{m}": mm[f"{m}_miou"] for m in ("rgb", "depth", "fused")}}
    return out


def results_markdown(s):
    """The measured tables in the shapes of the paper's Tables 2-3 and 6-7, with the paired gains, the probes and
    the fine-tuning curves."""
    f = lambda x: f"{x:.1f}"  # noqa: E731
    t2 = s["table2"]
    lines = [f"| init | RGB parsing mIoU ({LOW:.0%} labels) | RGB ({HIGH:.0%}) | depth parsing mIoU ({LOW:.0%}) "
             f"| depth ({HIGH:.0%}) |", "|---|---|---|---|---|"]
    for arm in ARMS:
        cells = [f"{f(t2[f'{t}/{arm}']['low'])} ± {f(t2[f'{t}/{arm}']['low_sd'])} | {f(t2[f'{t}/{arm}']['high'])}"
                 for t in ("rgb-parsing", "depth-parsing")]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"| paired gain at {LOW:.0%} labels (mIoU) | RGB parsing: mean [95 % CI], wins | depth parsing |",
              "|---|---|---|"]
    for pair in ("HCMoCo-scratch", "HCMoCo-CMC", "CMC-scratch"):
        cells = [s["gains"][f"{t}/{pair}"] for t in ("rgb-parsing", "depth-parsing")]
        lines.append(f"| {pair.replace('-', ' − ')} | " + " | ".join(
            f"{g['mean']:+.1f} [{g['lo']:+.1f}, {g['hi']:+.1f}], {round(g['wins'] * g['n'])}/{g['n']}" for g in cells)
            + " |")
    budgets = sorted({int(k.rsplit("/", 1)[1]) for k in s["curves"]})
    lines += ["", f"| fine-tuning steps ({LOW:.0%} labels) | " + " | ".join(
        f"{t} {arm}" for t in ("RGB", "depth") for arm in ("scratch", "HCMoCo")) + " |", "|---" * 5 + "|"]
    for steps in budgets:
        lines.append(f"| {steps} | " + " | ".join(f(s["curves"][f"{t}/{arm}/{steps}"]) for t in ("rgb-parsing",
                     "depth-parsing") for arm in ("scratch", "HCMoCo")) + " |")
    p = s["probes"]
    lines += ["", "| frozen linear probe (all labels) | RGB mIoU | depth mIoU |", "|---|---|---|"]
    for arm, label in (("pixels", "pixel (x, y) + input"), ("random", "random network, same init"), ("CMC", "CMC"),
                       ("HCMoCo", "HCMoCo")):
        lines.append(f"| {label} | {f(p[f'rgb/{arm}'])} | {f(p[f'depth/{arm}'])} |")
    lines += ["", f"| Table 3 row (targets) | depth parsing mIoU ({LOW:.0%} labels) |", "|---|---|"]
    for name, label in (("global", "sample-level (CMC)"), ("hard", "+ dense, hard (InfoNCE)"),
                        ("soft", "+ dense, soft"), ("full", "+ sparse (HCMoCo)")):
        lines.append(f"| {label} | {f(s['ladder'][name])} |")
    lines += ["", "| contrastive targets | RGB -> depth mIoU | depth -> RGB mIoU | missing-modal: RGB only | depth only "
              "| both |", "|---|---|---|---|---|---|"]
    for arm, v in s["versatility"].items():
        lines.append(f"| {arm} | {f(v['rgb_to_depth'])} | {f(v['depth_to_rgb'])} | {f(v['missing_rgb'])} | "
                     f"{f(v['missing_depth'])} | {f(v['missing_fused'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        experiments(opts)
    except CheckpointError as e:  # a stage file in --out
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: the finished runs and stages are whole on disk
        print(f"\ninterrupted; the same command continues where it stopped (finished runs in {opts.out} are kept, an "
              "unfinished pre-training stage resumes)", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
