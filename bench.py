"""Speed and memory benchmarks, printed as ratios measured side by side in one run.

    python bench.py                  # every section
    python bench.py losses encoders  # chosen sections: losses, encoders, synthetic, train
    python bench.py --run runs/hcmoco  # a finished pre-training run: its FLOP throughput, retrieval over time
                                      # and its final retrieval on 8 x 256 held-out people

Timings are wall-clock medians; CUDA runs synchronise before reading the clock. Peak memory is the device's
peak allocation on CUDA and, on CPU (Linux), the rise of a fresh process's peak resident memory during one
forward + backward of the case.
Speed goals live here, never as timed assertions in the tests.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import losses

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def timeit(fn, warmup=2, iters=10):
    """Median seconds of `fn()` over `iters` calls after `warmup` calls."""
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


# ---------------------------------------------------------------------------------------------------------- losses
# The published per-GPU scale: batch 56, 128-d embeddings, 16,384 negatives from a bank of 143,648 samples and
# 3 modalities; dense 400 points x 128 channels, both directions; sparse 16 joints x 2 representations.
BATCH, DIM, NEGATIVES, BANK, MODS = 56, 128, 16384, 143_648, ("rgb", "depth", "keypoints")
POINTS, JOINTS, REPRESENTATIONS = 400, 16, 2


def loss_inputs():
    B, N, J, M = BATCH, POINTS, JOINTS, REPRESENTATIONS  # the paper's letters for the shapes below
    g = torch.Generator().manual_seed(0)
    feats = {m: torch.randn(B, DIM, generator=g).to(DEVICE).requires_grad_() for m in MODS}
    dense = [torch.randn(B, N, DIM, generator=g).to(DEVICE).requires_grad_() for _ in range(2)]
    coords = (torch.rand(B, N, 2, generator=g) * 64).to(DEVICE)
    sparse = torch.randn(B, M, J, DIM, generator=g).to(DEVICE).requires_grad_()
    keypoints = torch.randn(B, J, DIM, generator=g).to(DEVICE).requires_grad_()
    valid = (torch.rand(B, M, J, generator=g) > 0.1).to(DEVICE)
    present = {m: torch.ones(B, dtype=torch.bool, device=DEVICE) for m in MODS}
    return feats, dense, coords, sparse, keypoints, valid, present, torch.randperm(BANK, generator=g)[:B].to(DEVICE)


def published_global(bank, feats, index, present):
    """As the published code: per sample, K + 1 bank rows (its positive first) gathered into [B, K + 1, D]."""
    B, K = len(index), bank.num_negatives
    total = []
    for b in feats:
        mem = bank.memory(b)
        for a in feats:
            if a != b:
                idx = torch.randint(bank.size, (B, K + 1), device=DEVICE)
                idx[:, 0] = index
                weight = mem[idx]  # [B, K + 1, D]
                logits = torch.bmm(weight, F.normalize(feats[a], dim=-1)[:, :, None])[..., 0] / 0.07
                total.append(F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=DEVICE)))
    bank.update({m: F.normalize(f, dim=-1) for m, f in feats.items()}, index, present)
    return sum(total)


def published_dense(f1, f2, w):
    """Two separate similarity matrices, one per direction."""
    f1, f2 = F.normalize(f1, dim=-1), F.normalize(f2, dim=-1)
    s12 = f1 @ f2.transpose(1, 2) / 0.07
    s21 = f2 @ f1.transpose(1, 2) / 0.07
    return -(w * s12.log_softmax(-1)).sum(-1).mean() - (w * s21.log_softmax(-1)).sum(-1).mean()


def published_sparse(feats, keypoints, valid):
    """The published structure (two joint-vs-keypoint cross-entropies with batched matrix products, and the
    cross-sample term with its positive-index matrix built joint by joint in a Python loop)."""
    B, M, J, D = feats.shape
    f = F.normalize(feats, dim=-1)  # [B, M, J, D]
    g = F.normalize(keypoints, dim=-1)  # [B, J, D]
    target = torch.arange(J, device=DEVICE).expand(B, J).masked_fill(~valid[:, 0], -100)
    intra = sum(F.cross_entropy(g @ f[:, m].transpose(1, 2) / 0.07, target.masked_fill(~valid[:, m], -100))
                for m in range(M))
    E = B * M * J
    cat = f.transpose(0, 1).reshape(E, D)  # all RGB joints, then all depth joints
    logp = (cat @ cat.T / 0.07).log_softmax(-1)
    pos = torch.zeros(J, E, dtype=torch.int32, device=DEVICE)
    for j in range(J):
        pos[j, j::J] = 1
    pos = pos.repeat(M * B, 1)
    pos.fill_diagonal_(0)
    n = pos.sum(-1).clamp(min=1)
    return intra - ((logp * pos).sum(-1) / n).mean()


def loss_cases():
    """name -> (fn running one forward + backward of that case)."""
    feats, dense, coords, sparse, keypoints, valid, present, index = loss_inputs()
    bank = losses.MemoryBank(BANK, DIM, MODS, NEGATIVES).to(DEVICE)
    w = losses.soft_weights(coords)

    def ours():
        return {"global": lambda: bank(feats, index, present).backward(),
                "dense": lambda: losses.bidirectional_dense_loss(*dense, w).backward(),
                "sparse": lambda: losses.sparse_structure_loss(sparse, keypoints, valid).backward()}

    def published():
        return {"global": lambda: published_global(bank, feats, index, present).backward(),
                "dense": lambda: published_dense(*dense, w).backward(),
                "sparse": lambda: published_sparse(sparse, keypoints, valid).backward()}

    return {"ours": ours(), "published": published()}


def proc_status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_mb(variant, term):
    """Peak memory of one forward + backward of a case: CUDA allocator peak, or a fresh process's peak RSS
    above its RSS after building the inputs."""
    if DEVICE.type == "cuda":
        fn = loss_cases()[variant][term]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    out = subprocess.run([sys.executable, __file__, "--peak", variant, term], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def bench_losses():
    cases = loss_cases()
    rows, totals = [], {"ours": 0.0, "published": 0.0}
    for term in ("global", "dense", "sparse"):
        t = {v: timeit(cases[v][term], warmup=1, iters=5) for v in cases}
        mem = {v: peak_memory_mb(v, term) for v in cases}
        for v in t:
            totals[v] += t[v]
        rows.append([term, f"{1000 * t['ours']:.1f}", f"{1000 * t['published']:.1f}",
                     f"{t['published'] / t['ours']:.1f}x", f"{mem['ours']:.0f}", f"{mem['published']:.0f}"])
    rows.append(["all", f"{1000 * totals['ours']:.1f}", f"{1000 * totals['published']:.1f}",
                 f"{totals['published'] / totals['ours']:.1f}x", "", ""])
    print(f"forward + backward at B={BATCH}, K={NEGATIVES}, bank={BANK}, N={POINTS}, J={JOINTS}, "
          f"M={REPRESENTATIONS}")
    table(rows, ["term", "ours ms", "published ms", "speed-up", "ours MB", "published MB"])


# -------------------------------------------------------------------------------------------------------- encoders
def samples_per_second(model, make_input, batch, bf16=False):
    x = make_input(batch)

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(*x) if isinstance(x, tuple) else model(x)
        out = out if torch.is_tensor(out) else torch.cat([o.flatten(1) for o in out], 1)
        out.float().square().mean().backward()

    return batch / timeit(step, warmup=1, iters=3 if DEVICE.type == "cpu" else 20)


def bench_encoders():
    from encoders import HRNet, PointNet2, SemGCN
    from schema import PARENTS
    image = lambda c, s: lambda b: torch.randn(b, c, s, s, device=DEVICE)  # noqa: E731
    cases = [("HRNet-W18 256x256", HRNet(18), image(3, 256), 2 if DEVICE.type == "cpu" else 56),
             ("HRNet.small 96x96 (CPU preset)", HRNet.small(), image(3, 96), 16),
             ("HRNet.small 128x128", HRNet.small(), image(3, 128), 16),
             ("PointNet2.small 4,096 points", PointNet2.small(), lambda b: torch.rand(b, 4096, 3, device=DEVICE), 4),
             ("SemGCN 16 joints", SemGCN(parents=PARENTS),
              lambda b: (torch.rand(b, 16, 2, device=DEVICE),), 256)]
    rows = []
    for name, model, make, batch in cases:
        model = model.to(DEVICE).train()
        row = [name, batch, f"{samples_per_second(model, make, batch):.1f}"]
        if DEVICE.type == "cuda" and "HRNet" in name:
            model = model.to(memory_format=torch.channels_last)
            cl = lambda b, make=make: make(b).contiguous(memory_format=torch.channels_last)  # noqa: E731
            row.append(f"{samples_per_second(model, cl, batch, bf16=True):.1f}")
        rows.append(row)
    header = ["forward + backward", "batch", f"samples/s ({DEVICE.type}, fp32)"]
    table(rows, header + (["samples/s (bf16, channels_last)"] if DEVICE.type == "cuda" else []))


# ------------------------------------------------------------------------------------------------------- synthetic
def bench_synthetic():
    import synthetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the rate of one process on one thread, as the table says
    rows = []
    for size in (128, 256):
        for domain in ("indoor", "wild"):
            ds = synthetic.SyntheticHumans(1000, size, domain=domain, with_depth=domain == "indoor")
            n = 40 if size == 128 else 15
            ds[0]
            t0 = time.perf_counter()
            for i in range(1, n + 1):
                ds[i]
            rows.append([f"{size}x{size}", domain, f"{n / (time.perf_counter() - t0):.1f}"])
    torch.set_num_threads(threads)  # the sections after this one (train) time with the threads they had
    table(rows, ["image", "domain", "samples/s (1 process, 1 thread)"])


# ----------------------------------------------------------------------------------------------------------- train
def matmul_peak(dtype, n=2048):
    """The machine's practical peak: GFLOP/s of an n x n x n matrix product in `dtype` (2 n^3 FLOPs)."""
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timeit(lambda: a @ b, warmup=2, iters=5) / 1e9


def preset_step(cfg, stage, bf16, channels_last=False):
    """(step(), the step's FLOPs): one forward + backward + optimiser step of the preset's model on one augmented
    batch, in the stage's model configuration; FLOPs counted by torch.utils.flop_counter (matrix products and
    convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    import data
    import synthetic
    import train
    from hcmoco import HCMoCo
    people = synthetic.SyntheticHumans(cfg.batch_size, cfg.image_size, seed=5, domain="indoor")
    raw = data.collate([{k: v for k, v in people[i].items() if k in data.PRETRAIN_KEYS} for i in range(len(people))])
    batch = data.to_device(data.BatchAugment()(raw, torch.Generator().manual_seed(0)), DEVICE)
    torch.manual_seed(0)
    model = HCMoCo(train.stage_model(cfg, stage, cfg.synthetic_samples)).to(DEVICE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batch = dict(batch, rgb=batch["rgb"].contiguous(memory_format=torch.channels_last))
    optimizer = train.make_optimizer(cfg, model.parameters())  # as train.py's

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    return step, counter.get_total_flops()


def bench_train(cfg=None):
    """The preset's training step against the machine's limit: its FLOPs, its time in fp32 and bf16 (with and
    without channels_last), the resulting FLOP throughput and model-FLOP utilisation (MFU: throughput / the bf16
    matrix-product peak, or fp32's where the device has no native bf16); then where a step of the default run goes.
    `cfg` (a train.Config) replaces the device's preset. Returns the steps measured, one dict per table row (stage,
    bf16, channels_last, flops, seconds), and the parts of a stage-2 step, {part: seconds}."""
    import time as clock

    import cli
    import data
    import harness
    import train
    preset = "paper" if DEVICE.type == "cuda" else "cpu"
    cfg = cfg or replace(train.PRESETS[preset], device=DEVICE.type, synthetic_samples=4096,
                         batch_size=56 if DEVICE.type == "cuda" else train.PRESETS[preset].batch_size)
    native = cli.native_bf16(DEVICE.type)
    peak = {"fp32": matmul_peak(torch.float32), **({"bf16": matmul_peak(torch.bfloat16)} if native else {})}
    limit = peak.get("bf16", peak["fp32"])
    print(f"matrix-product peak (2048^3): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))
    print(f"preset {cfg.preset}: HRNet {cfg.model.hrnet}, {cfg.image_size} px, batch {cfg.batch_size}; MFU against "
          f"{'bf16' if native else 'fp32'} {limit:.0f} GFLOP/s")
    steps = []
    for stage in (1, 2):
        for bf16, cl in ((False, False), (False, True), (True, False), (True, True)):
            if bf16 and not native:
                continue
            step, flops = preset_step(cfg, stage, bf16, cl)
            t = timeit(step, warmup=1, iters=3 if DEVICE.type == "cpu" else 10)
            steps.append(dict(stage=stage, bf16=bf16, channels_last=cl, flops=flops, seconds=t))
    table([[s["stage"], "bf16" if s["bf16"] else "fp32", "yes" if s["channels_last"] else "no",
            f"{s['flops'] / 1e9:.1f}", f"{s['seconds']:.3f}", f"{s['flops'] / s['seconds'] / 1e9:.0f}",
            f"{100 * s['flops'] / s['seconds'] / 1e9 / limit:.0f} %"] for s in steps],
          ["stage", "precision", "channels_last", "GFLOP/step", "seconds", "GFLOP/s", "MFU"])

    # where a step of the default run goes: the parts timed on their own, the monitors and the checkpoint once per
    # eval_every / save_every steps
    bf16 = cli.use_bf16(cfg.precision, DEVICE.type)
    step, flops = preset_step(cfg, 2, bf16, channels_last=True)  # the layout train.py uses
    dataset = train.build_dataset(replace(cfg, synthetic_samples=cfg.batch_size * 4, workers=0))
    loader = train.batches(cfg, dataset, 2, 0, 4, 0, 1, DEVICE)
    t0 = clock.perf_counter()
    raw = [next(iter(loader)) for _ in range(3)][-1]
    t_load = (clock.perf_counter() - t0) / 3
    augment = data.BatchAugment()
    t_aug = timeit(lambda: augment(raw, torch.Generator().manual_seed(0)), warmup=1, iters=5)
    t_step = timeit(step, warmup=1, iters=3)
    from hcmoco import HCMoCo
    model = HCMoCo(train.stage_model(cfg, 2, 4096)).to(DEVICE)
    heldout = data.to_device(data.heldout_batch(cfg.image_size, cfg.heldout), DEVICE)
    initial = harness.conv_weights(model)
    t_mon = timeit(lambda: harness.monitors(model, heldout, initial), warmup=1, iters=2)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        state = dict(model=model.state_dict(), optimizer=torch.optim.AdamW(model.parameters()).state_dict())
        t_save = timeit(lambda: cli.save_atomic(state, f"{tmp}/x.pt"), warmup=1, iters=3)
    parts = [("batch from the cached set (loader, collate)", t_load), ("augmentation (BatchAugment)", t_aug),
             (f"model: forward, backward, AdamW ({'bf16' if bf16 else 'fp32'})", t_step),
             (f"monitors, once per {cfg.eval_every} steps", t_mon / cfg.eval_every),
             (f"checkpoint, once per {cfg.save_every} steps", t_save / cfg.save_every)]
    total = sum(t for _, t in parts)
    print(f"\na stage-2 step of the default run: {total:.3f} s, {flops / total / 1e9:.0f} GFLOP/s")
    table([[name, f"{t * 1000:.1f}", f"{100 * t / total:.0f} %"] for name, t in parts], ["part", "ms", "share"])
    return steps, dict(parts)


RETRIEVAL_GROUPS = 8


def bench_run(folder, groups=RETRIEVAL_GROUPS):
    """The whole-run FLOP throughput of a finished train.py run: every step's FLOPs (counted on its config, per
    stage) over the run's wall time from its log (the time column of each stage's last row). The config comes from
    the last stage file: its train options beside the model config the stage built, which a run written before the
    model became one field of train.Config also records. Returns (FLOPs, seconds of training, the held-out
    retrieval of each of `groups` groups of 256 people)."""
    from dataclasses import fields

    import harness
    import train
    from hcmoco import HCMoCoConfig
    final = next((p for p in (harness.stage_path(folder, s) for s in (2, 1)) if os.path.exists(p)), None)
    if final is None:
        raise SystemExit(f"error: --run: no stage1.pt or stage2.pt in {folder}")
    saved = harness.load_stage(final)["config"]
    options = {f.name for f in fields(train.Config)} - {"model", "device"}
    cfg = train.Config(**{k: v for k, v in saved["train"].items() if k in options},
                       model=HCMoCoConfig.from_dict(saved["model"]), device=DEVICE.type)
    rows = harness.read_log(folder)
    total_flops, total_time = 0.0, 0.0
    for stage in (1, 2):
        last = [r for r in rows if r["stage"] == stage]
        if not last:
            continue
        steps = train.stage_steps(cfg, stage, cfg.synthetic_samples)
        _, flops = preset_step(cfg, stage, False)
        total_flops += steps * flops
        total_time += last[-1]["time"]
    print(f"{folder}: {total_flops / 1e12:.1f} TFLOP in {total_time:.0f} s of training: "
          f"{total_flops / total_time / 1e9:.0f} GFLOP/s")
    # minutes to a model that retrieves across modalities: the monitors' held-out retrieval against the training
    # time so far (a stage's log times start at its own first step; stage 2 follows stage 1's last row)
    offset = {2: max((r["time"] for r in rows if r["stage"] == 1), default=0.0), 1: 0.0}
    seen = [r for r in rows if "retrieval" in r]
    table([[r["stage"], r["step"], f"{(offset[r['stage']] + r['time']) / 60:.1f}", f"{100 * r['retrieval']:.1f}"]
           for r in seen], ["stage", "step", "minutes of training", "held-out RGB -> depth top-1 (%)"])
    top1 = heldout_retrieval(final, cfg.image_size, groups)
    print(f"{final}: held-out RGB -> depth top-1 among 256 people, over {len(top1)} groups of 256 "
          f"({len(top1) * 256} people, the first the monitors'): {statistics.mean(top1):.1f} % "
          f"(groups {min(top1):.1f}-{max(top1):.1f} %)")
    return total_flops, total_time, top1


def heldout_retrieval(path, image_size, groups=RETRIEVAL_GROUPS, size=256):
    """The monitors' retrieval (RGB -> depth top-1 of the global embeddings among `size` held-out people) of the
    stage file at `path`, in `groups` disjoint groups of people never trained on, the first the monitors' own: each
    group's, in percent. One group of 256 has a sampling error of ~3 points at 50 %; the mean of 8, ~1."""
    import data
    from hcmoco import HCMoCo
    model = HCMoCo.from_checkpoint(path).to(DEVICE).eval()
    batch = data.to_device(data.heldout_batch(image_size, groups * size), DEVICE)
    top1 = []
    with torch.no_grad():
        for i in range(0, groups * size, size):
            g = model.embed(data.batch_rows(batch, i, i + size))["global"]
            hits = (g["rgb"] @ g["depth"].T).argmax(1) == torch.arange(size, device=DEVICE)  # [size]
            top1.append(100 * hits.float().mean().item())
    return top1


SECTIONS = {"losses": bench_losses, "encoders": bench_encoders, "synthetic": bench_synthetic, "train": bench_train}


def print_peak_rss(variant, term):
    """Print the rise of this process's peak resident memory (MB) during one forward + backward of a loss case:
    peak_memory_mb's child on CPU (Linux: /proc/self)."""
    fn = loss_cases()[variant][term]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
    before = proc_status_kb("VmRSS")
    fn()
    print((proc_status_kb("VmHWM") - before) / 1024)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--run", metavar="FOLDER",
                        help="also a finished train.py run: its FLOP throughput and held-out retrieval over time")
    parser.add_argument("--peak", nargs=2, metavar=("VARIANT", "TERM"),
                        help="only print the peak resident memory (MB) of one forward + backward of a loss case, "
                             "VARIANT ours or published, TERM global, dense or sparse: how the losses section "
                             "measures memory on CPU (Linux), one fresh process per case")
    args = parser.parse_args()
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    if args.peak:
        variant, term = args.peak
        if variant not in ("ours", "published") or term not in ("global", "dense", "sparse"):
            parser.error(f"--peak {variant} {term}: VARIANT is ours or published, TERM global, dense or sparse")
        print_peak_rss(variant, term)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'CPU only'}")
    for name in args.sections or ([] if args.run else SECTIONS):
        print(f"\n== {name} ==")
        SECTIONS[name]()
    if args.run:
        print(f"\n== run {args.run} ==")
        bench_run(args.run)


if __name__ == "__main__":
    main()
