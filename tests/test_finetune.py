"""finetune.py and what its runs share (transfer.py, probe.py, versatility.py): the label-ratio subset, checkpoint
loading, every head trains, the probe tasks, cross-modal training never touches the target modality's labelled
images; and experiments.py's grid, gains and command line."""
import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import experiments
import finetune
import hcmoco
import metrics
import probe
import synthetic
import train
import transfer
import versatility
from conftest import BAD_CHECKPOINTS, ROOT, write_bad_checkpoint, write_itop

TINY = ["--steps", "3", "--train-samples", "8", "--test-samples", "4", "--image-size", "40", "--batch-size", "4",
        "--workers", "0"]


@pytest.mark.parametrize("ratio,expected", [(1.0, list(range(10))), (0.2, [0, 9]), (0.5, [0, 2, 4, 7, 9]),
                                            (0.01, [0])])
def test_ratio_keeps_a_uniformly_spaced_subset(ratio, expected):
    assert transfer.subset_indices(10, ratio) == expected


@pytest.mark.parametrize("task", ["rgb-parsing", "depth-parsing", "depth-pose", "dense-pose"])
def test_each_head_trains_and_reports_its_metrics(task, tmp_path, capsys):
    m = finetune.main(["--task", task, "--out", str(tmp_path), *TINY])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{task} from scratch on cpu; the resolved config (also in {tmp_path / 'metrics.json'} at the end):"
    assert f"task={task} init=scratch" in out[1]
    labels = {"rgb-parsing": f"mIoU {m.get('miou', 0):.2f} %, mAcc", "depth-parsing": f"mIoU {m.get('miou', 0):.2f} %",
              "depth-pose": f"acc@10cm {m.get('acc10cm', 0):.2f} %, MPJPE {m.get('mpjpe_cm', 0):.2f} cm",
              "dense-pose": f"part accuracy {m.get('part_acc', 0):.2f} %, uv accuracy"}[task]
    assert out[-1].startswith(f"{task} from scratch: {labels}") and out[-1].endswith(
        f", labelled training images 8; wrote {tmp_path / 'metrics.json'}, model.pt")
    keys = {"rgb-parsing": {"miou", "macc", "aacc", "iou"}, "depth-parsing": {"miou", "macc", "aacc", "iou"},
            "depth-pose": {"acc10cm", "mpjpe_cm"}, "dense-pose": {"part_acc", "uv_acc", "gps"}}[task]
    assert keys <= set(m) and m["train_images"] == 8
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert all(abs(saved[k] - m[k]) < 1e-9 for k in keys if k != "iou")
    # the saved model reproduces the metrics
    model, cfg = finetune.load_finetuned(tmp_path)
    task = finetune.TASKS[cfg.task]
    again = task.evaluate(model, task.datasets(cfg)[1], cfg, torch.device("cpu"))
    assert all(abs(again[k] - m[k]) < 1e-6 for k in keys if k != "iou")


def test_depth_pose_on_itop_files(tmp_path):
    """--itop-root: depth-pose trains on ITOP's train split and tests on its test split, ITOP's 15 joints."""
    write_itop(tmp_path / "itop", "train", 6, seed=0)
    write_itop(tmp_path / "itop", "test", 4, seed=1)
    m = finetune.main(["--task", "depth-pose", "--itop-root", str(tmp_path / "itop"), "--out", str(tmp_path / "run"),
                       *TINY])
    assert {"acc10cm", "mpjpe_cm"} <= set(m) and m["train_images"] == 5
    model, cfg = finetune.load_finetuned(tmp_path / "run")
    assert model.head.joints == 15 and cfg.itop_root == str(tmp_path / "itop")
    for args, message in ((["--task", "rgb-parsing"], "--itop-root: --task rgb-parsing does not read it"),
                          (["--task", "depth-pose", "--itop-root", str(tmp_path / "none")], "not a folder")):
        argv = [*args, "--out", str(tmp_path / "x")] + (["--itop-root", str(tmp_path / "itop")] if "--itop-root"
                                                        not in args else [])
        result = subprocess.run([sys.executable, "finetune.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    train.main(["--stage", "1", "--steps", "1", "--image-size", "40", "--width", "4", "--batch-size", "4",
                "--synthetic-samples", "12", "--num-negatives", "8", "--workers", "0", "--preset", "cpu",
                "--out", str(out)])
    return out / "stage1.pt"


def test_loading_a_checkpoint_fills_the_backbone(checkpoint, capsys):
    net, report = transfer.load_backbone(str(checkpoint), "depth", hcmoco.HCMoCoConfig())
    state = torch.load(checkpoint, weights_only=True)["model"]
    torch.testing.assert_close(net.stage4[0].branches[3][0].conv1.weight,
                               state["encoders.depth.stage4.0.branches.3.0.conv1.weight"])
    assert report == {"missing": [], "unexpected": [], "mismatched": []} and net.out_channels[0] == 4
    assert "loaded" in capsys.readouterr().out
    # an external state_dict with a missing tensor is reported
    partial = {k[len("encoders.rgb."):]: v for k, v in state.items() if k.startswith("encoders.rgb.")}
    partial.pop("conv1.weight")
    path = checkpoint.parent / "external.pth"
    torch.save(partial, path)
    net, report = transfer.load_backbone(str(path), "rgb", hcmoco.HCMoCoConfig(width=4))
    assert report["missing"] == ["conv1.weight"]


def test_init_takes_a_fine_tuned_model_and_its_backbone_goes_on(checkpoint, tmp_path):
    """A fine-tuned model.pt is a checkpoint the project writes: as --init its backbone is the starting point,
    architecture and all; cross-modal, which needs the whole pre-trained model, says so in one line."""
    first = tmp_path / "first"
    finetune.main(["--task", "depth-parsing", "--init", str(checkpoint), "--out", str(first), *TINY])
    tuned = torch.load(first / "model.pt", weights_only=True)["model"]
    net, report = transfer.load_backbone(str(first / "model.pt"), "depth", transfer.scratch_config(finetune.Config()))
    assert net.out_channels[0] == 4 and report["missing"] == [] and report["unexpected"] == []
    # fine-tuning's BatchNorm momentum, as for a scratch backbone, not the HRNet's published default
    assert {m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {transfer.SCRATCH_MODEL.bn_momentum}
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, tuned[f"backbone.{k}"], msg=k)
    m = finetune.main(["--task", "rgb-parsing", "--init", str(first / "model.pt"), "--out", str(tmp_path / "again"),
                       *TINY])
    assert "miou" in m
    with pytest.raises(SystemExit) as e:
        finetune.main(["--task", "cross-modal", "--init", str(first / "model.pt"), "--out", str(tmp_path / "x"), *TINY])
    assert str(e.value.code) == (f"error: {first / 'model.pt'}: not a train.py checkpoint (no model config): "
                                 "cross-modal starts from the whole pre-trained model of a stage file")


@pytest.mark.parametrize("state", ["foreign", "prefixed"])
def test_an_init_that_does_not_fill_the_backbone_is_one_line(checkpoint, tmp_path, state, capsys):
    """Matched by name or not at all: a file whose keys do not match (BatchNorm step counts aside) is refused before
    any training, naming a key it has and one the HRNet expects. (A file of another HRNet configuration builds
    that HRNet: tests/test_export.py.)"""
    rgb = {k[len("encoders.rgb."):]: v for k, v in torch.load(checkpoint, weights_only=True)["model"].items()
           if k.startswith("encoders.rgb.")}
    path = tmp_path / "init.pth"
    torch.save({"foreign": {"foo": torch.ones(3)}, "prefixed": {f"net.{k}": v for k, v in rgb.items()}}[state], path)
    with pytest.raises(SystemExit) as e:
        finetune.main(["--task", "rgb-parsing", "--init", str(path), "--out", str(tmp_path / "out"), *TINY])
    message = str(e.value.code)
    expected = {"foreign": "the file has 'foo', the HRNet expects 'conv1.weight'",
                "prefixed": "the file has 'net.conv1.weight', the HRNet expects 'conv1.weight'"}[state]
    assert message.startswith(f"error: {path}: ") and expected in message and "prefix" in message
    assert "\n" not in message and "tensors loaded" not in capsys.readouterr().out
    assert not any((tmp_path / "out").iterdir())  # --out is made before any work; nothing in it


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
@pytest.mark.parametrize("task", ["rgb-parsing", "cross-modal", "depth-probe"])
def test_an_init_that_is_not_a_checkpoint_is_one_line_and_runs_no_code(tmp_path, task, kind):
    bad = tmp_path / "init.pt"
    ran = write_bad_checkpoint(bad, kind)
    with pytest.raises(SystemExit) as e:
        finetune.main(["--task", task, "--init", str(bad), "--out", str(tmp_path / "out"), *TINY])
    message = str(e.value.code)
    assert message.startswith(f"error: {bad}: not a train.py checkpoint") and "\n" not in message
    assert not ran.exists() and not any((tmp_path / "out").iterdir())  # --out is made before any work; nothing in it


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--lr", "-1"], ["--steps", "0"], ["--image-size", "32"],
                                  ["--train-samples", "0"], ["--test-samples", "-1"], ["--weight-decay", "-0.1"],
                                  ["--task", "rgb-probe", "--train-samples", "1"], ["--out", "{file}"],
                                  ["--out", "{file}/run"], ["--out", "/proc/hcmoco-out"]])
def test_bad_values_are_usage_errors_naming_the_option(tmp_path, capsys, monkeypatch, args):
    file = tmp_path / "file"
    file.write_text("keep")
    args = [a.format(file=file) for a in args]
    monkeypatch.setattr(finetune, "run", None)  # nothing may start
    with pytest.raises(SystemExit) as e:
        finetune.main([*TINY, "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    option = next(a for a in reversed(args) if a.startswith("--"))
    assert e.value.code == 2 and f"error: {option} " in err and file.read_text() == "keep"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout,message", [
    (None, "--ntu-parsing-root {root}: not a folder"),
    ({}, "error: --ntu-parsing-root {root}: {root}/train.txt not found; expected layout: <root>/{{split}}.txt"),
    ({"train.txt": "a.png b.png\n", "test.txt": ""}, "error: --ntu-parsing-root {root}: {root}/train.txt:1: expected 3 "
                                                      "paths, got 2"),
    ({"train.txt": "", "test.txt": ""}, "error: --ntu-parsing-root {root}: a split lists no image")])
def test_a_missing_or_malformed_dataset_root_is_one_line(tmp_path, capsys, layout, message):
    root = tmp_path / "ntu"
    if layout is not None:
        root.mkdir()
        for name, text in layout.items():
            (root / name).write_text(text)
    message = message.format(root=root)
    with pytest.raises(SystemExit) as e:
        finetune.main(["--task", "depth-parsing", "--ntu-parsing-root", str(root), "--out", str(tmp_path / "o"), *TINY])
    if layout is None:
        assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err
    else:
        assert str(e.value.code).startswith(message) and "\n" not in str(e.value.code)


def test_device_cuda_without_a_gpu_and_ctrl_c_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        finetune.main(["--device", "cuda", "--out", str(tmp_path / "gpu"), *TINY])
    assert e.value.code == 2 and "error: --device cuda: torch sees no GPU" in capsys.readouterr().err

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(transfer.Task, "fit", ctrl_c)
    with pytest.raises(SystemExit) as e:
        finetune.main(["--out", str(tmp_path / "out"), *TINY])
    assert e.value.code == 130 and not (tmp_path / "out" / "metrics.json").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted: nothing of this run is saved")
    monkeypatch.setattr(experiments, "experiments", ctrl_c)
    with pytest.raises(SystemExit) as e:
        experiments.main(["--out", str(tmp_path / "exp")])
    assert e.value.code == 130 and "the same command continues where it stopped" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--task", "rgb-parsing", "--source", "depth"], "--source: only --task cross-modal reads it"),
    (["--task", "missing-modal", "--target", "rgb"], "--target: only --task cross-modal reads it"),
    (["--task", "rgb-probe", "--lr", "0.1"], "--lr: the probes choose their learning rate among"),
    (["--task", "depth-probe", "--weight-decay", "0"], "--weight-decay: the probes do not read it"),
    (["--task", "depth-parsing", "--contrast", "full"], "--contrast: only --task cross-modal and missing-modal"),
    (["--task", "depth-parsing", "--init", "{ckpt}", "--scratch-init", "official"],
     "--scratch-init: only --init scratch reads it"),
    (["--task", "depth-parsing", "--h36m-root", "{root}"], "--h36m-root: --task depth-parsing does not read it "
                                                           "(--task rgb-parsing does)"),
    (["--task", "depth-pose", "--ntu-parsing-root", "{root}"], "--ntu-parsing-root: --task depth-pose does not read")])
def test_an_option_the_task_would_ignore_is_a_usage_error(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(finetune, "run", None)  # nothing may start
    (tmp_path / "ckpt.pt").write_bytes(b"")
    args = [a.format(ckpt=tmp_path / "ckpt.pt", root=tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        finetune.main([*args, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err


def test_help_gives_each_option_its_meaning_and_its_default():
    out = subprocess.run([sys.executable, "finetune.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    words = " ".join(out.split())
    assert set(finetune.cli.field_comments(finetune.Config)) == {f.name for f in dataclasses.fields(finetune.Config)}
    for line in ("--train-samples TRAIN_SAMPLES labelled synthetic training people, before --ratio (default: 400)",
                 "--test-samples TEST_SAMPLES the fixed held-out test set (TEST_SEED) (default: 500)",
                 "--out OUT the run's folder (default: runs/finetune/<task>/<init>)"):
        assert line in words, line
    assert "train 100" not in words and "test 200" not in words  # the seeds, once read as the sizes


def test_the_readme_fine_tuning_commands_write_to_folders_of_their_own():
    """By default a run writes into a folder named after its task and init: the README's commands one after the
    other do not overwrite each other's model.pt and metrics.json."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    commands = [line.split("#")[0].split()[2:] for line in readme.splitlines()
                if line.startswith("python finetune.py --task")]
    parser = argparse.ArgumentParser()
    finetune.cli.add_options(parser, finetune.Config, defaults=False)
    outs = [finetune.default_out(finetune.Config(**vars(parser.parse_args(c)))) for c in commands]
    assert len(commands) >= 6 and len(set(outs)) == len(outs)
    assert all(o.startswith(os.path.join("runs", "finetune", c[1], "")) or c[1] == "cross-modal" for o, c in
               zip(outs, commands))


def test_experiments_check_their_options(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("keep")
    monkeypatch.setattr(experiments, "run_jobs", None)  # nothing may start
    for args in (["--jobs", "0"], ["--out", str(tmp_path / "file")], ["--out", "/proc/hcmoco-out"]):
        with pytest.raises(SystemExit) as e:
            experiments.main(["--quick", "--out", str(tmp_path / "out"), *args])
        assert e.value.code == 2 and f"error: {args[0]} " in capsys.readouterr().err


def test_the_experiment_runner_shows_its_progress(monkeypatch, capsys):
    monkeypatch.setattr(experiments, "run_job", lambda job, threads: job)
    jobs = [("finetune", finetune.Config(out="a")), ("finetune", finetune.Config(out="b"))]
    experiments.run_jobs(jobs, 1, "fine-tuning")
    assert capsys.readouterr().out.splitlines() == ["fine-tuning: 2 job(s), 1 at a time", "[1/2] finetune a",
                                                    "[2/2] finetune b"]


def test_the_runner_takes_a_finished_run_as_done_only_if_it_ran_the_options_asked_for(tmp_path):
    """A run folder without metrics.json is to run; one whose metrics.json holds the same options is done, however it
    was run (folder, loader processes, device) and whatever the options its task does not read; one of other
    options stops the runner with one line naming the file and the option, rather than putting another
    experiment's number in the tables."""
    cfg = finetune.Config(task="depth-parsing", init="a/stage1.pt", ratio=0.05, subset=2, out=str(tmp_path / "run"),
                          workers=0)
    assert not experiments.finished(cfg)
    os.makedirs(cfg.out)

    def measured(**changes):
        config = dict(dataclasses.asdict(cfg), **changes)
        (tmp_path / "run" / "metrics.json").write_text(json.dumps(dict(miou=20.0, config=config)))

    measured(out="elsewhere", workers=2, device="cpu")
    assert experiments.finished(cfg)
    measured(lr=0.5, init="b/stage1.pt")
    with pytest.raises(experiments.CheckpointError) as e:
        experiments.finished(cfg)
    assert str(tmp_path / "run" / "metrics.json") in str(e.value) and f"--lr 0.5 -> {cfg.lr}" in str(e.value)
    assert "--init b/stage1.pt -> a/stage1.pt" in str(e.value) and "\n" not in str(e.value)
    cfg = dataclasses.replace(cfg, task="depth-probe")  # a probe chooses its own rate: --lr is not its option
    measured(lr=0.5, source="depth", target="rgb")
    assert experiments.finished(cfg)
    measured(lr=0.5, train_samples=200)
    with pytest.raises(experiments.CheckpointError, match="--train-samples 200 -> 400"):
        experiments.finished(cfg)


@pytest.mark.parametrize("quick", [True, False])
def test_the_sample_level_baselines_pretrain_one_stage_for_as_many_steps_as_hcmocos_two(tmp_path, monkeypatch, quick):
    """CMC and MMV are each one stage 1 of their sample-level objective (the preset's Eq. 2, MMV's in its place),
    otherwise with HCMoCo's options but the baselines' own peak rate, for the steps of HCMoCo's stage 1 and stage 2
    together; each stage file, in a folder of its own, is its arm's init. CMC runs again with each noise seed."""
    jobs = []
    monkeypatch.setattr(experiments, "run_jobs", lambda batch, n, what: jobs.extend(batch))
    for seed in experiments.PRETRAIN_SEEDS:  # each seed's stage 1, copied into its other rows' folders, never read
        folder = tmp_path / "pretrain" / experiments.seeded("full", seed)
        folder.mkdir(parents=True)
        (folder / "stage1.pt").write_bytes(f"stage 1 of seed {seed}".encode())
    first = tmp_path / "pretrain" / "full"
    ckpts = experiments.pretraining(experiments.Options(out=str(tmp_path), quick=quick), quick=quick)
    configs = [cfg for kind, cfg in jobs if kind == "train"]
    hcmoco, full = (next(c for c in configs if c.out == str(first) and c.stage == stage) for stage in (1, 2))
    cmc, mmv = (next(c for c in configs if c.out.endswith(os.path.join("pretrain", arm))) for arm in ("cmc", "mmv"))
    assert cmc.stage == mmv.stage == 1
    assert (cmc.model.global_loss, mmv.model.global_loss) == (hcmoco.model.global_loss, "mmv")
    assert dataclasses.replace(mmv, model=cmc.model, out=cmc.out) == cmc
    n = cmc.synthetic_samples
    assert train.stage_steps(cmc, 1, n) == train.stage_steps(hcmoco, 1, n) + train.stage_steps(full, 2, n)
    assert cmc.lr == experiments.BASELINE_LR != hcmoco.lr
    assert dataclasses.replace(cmc, stage1_epochs=hcmoco.stage1_epochs, steps=hcmoco.steps, lr=hcmoco.lr,
                               out=hcmoco.out) == hcmoco
    assert (ckpts["CMC"], ckpts["MMV"]) == (os.path.join(cmc.out, "stage1.pt"), os.path.join(mmv.out, "stage1.pt"))
    for seed in experiments.NOISE_SEEDS:  # CMC again with each noise seed, as HCMoCo's full pre-training
        again = next(c for c in configs if c.out.endswith(os.path.join("pretrain", f"cmc-seed{seed}")))
        assert again.seed == seed and dataclasses.replace(again, seed=cmc.seed, out=cmc.out) == cmc
        assert ckpts[f"CMC-seed{seed}"] == os.path.join(again.out, "stage1.pt")
    # every Table 3 row again from each seed: stage 2 of its own targets and seed, after that seed's stage 1
    for seed in experiments.PRETRAIN_SEEDS:
        for row, targets in experiments.LADDER.items():
            name = experiments.seeded(row, seed)
            again = next(c for c in configs if c.out.endswith(os.path.join("pretrain", name)) and c.stage == 2)
            assert dataclasses.replace(again, seed=0, out=full.out, targets=full.targets) == full
            assert (again.seed, again.targets, ckpts[name]) == (seed, targets, os.path.join(again.out, "stage2.pt"))
            assert (tmp_path / "pretrain" / name / "stage1.pt").read_text() == f"stage 1 of seed {seed}"
    assert len(configs) == len(experiments.PRETRAIN_SEEDS) * (1 + len(experiments.LADDER) + 1) + 1  # + CMC, + MMV


def runner_checkpoints(checkpoint):
    """experiments.pretraining's checkpoint names, each a stand-in path but CMC's (the grid reads its init)."""
    return {name: str(checkpoint) if name == "CMC" else f"{name}.pt"
            for name in ("MMV", "HCMoCo", *(experiments.seeded(n, seed) for n in ("CMC", *experiments.LADDER)
                                            for seed in experiments.PRETRAIN_SEEDS))}


def test_the_experiment_grid_pairs_every_arm_and_runs_ours_star_from_the_given_weights(checkpoint):
    """Every arm of a comparison runs on the same label subsets and seeds (its gains are paired); each run has a
    folder of its own; the published versatility protocol starts every arm from the CMC checkpoint, the arms
    differing only in their contrastive targets; the MMV baseline runs on the same pairs from its own stage file;
    with --backbone-init weights, Ours* (HCMoCo pre-trained from them) joins Table 2 on the same pairs, and without
    them it is absent."""
    ckpts = runner_checkpoints(checkpoint)
    runs = experiments.grid(dict(ckpts, imagenet="imagenet.pt"), quick=False)
    assert len({r.folder for r in runs}) == len(runs)

    def pairs(**fields):
        return sorted((r.subset, r.seed) for r in runs if all(getattr(r, k) == v for k, v in fields.items()))

    for task in experiments.PARSING:
        scratch = pairs(group="table2", task=task, arm="scratch", ratio=experiments.LOW)
        assert len(scratch) == 6
        for arm in ("CMC", "MMV", "HCMoCo", "HCMoCo*"):
            assert pairs(group="table2", task=task, arm=arm, ratio=experiments.LOW) == scratch
        for row in ("global", "hard", "soft"):  # from each pre-training seed
            for arm in (experiments.seeded(row, seed) for seed in experiments.PRETRAIN_SEEDS):
                assert pairs(group="ladder", task=task, arm=arm) == scratch
                assert {c["init"] for r, c in runs.items() if r.group == "ladder" and r.arm == arm} == {f"{arm}.pt"}
    assert {c["init"] for r, c in runs.items() if r.arm == "HCMoCo*"} == {"imagenet.pt"}
    assert {c["init"] for r, c in runs.items() if r.arm == "MMV"} == {"MMV.pt"}  # its Table 2 runs and its probes
    for seed in experiments.NOISE_SEEDS:  # HCMoCo and CMC from the other pre-training seeds, on Table 2's pairs
        for arm, init in (("HCMoCo", f"full-seed{seed}.pt"), ("CMC", f"CMC-seed{seed}.pt")):
            for task in experiments.PARSING:
                assert pairs(group="noise", task=task, arm=f"{arm}-seed{seed}") == scratch
            assert {c["init"] for r, c in runs.items() if r.group == "noise" and r.arm == f"{arm}-seed{seed}"} == {init}
    published = {(r.task, r.arm, r.source): c for r, c in runs.items()
                 if r.group == "versatility" and r.protocol == "published"}
    assert len(published) == 9 and {c["init"] for c in published.values()} == {str(checkpoint)}
    assert {(arm, c["contrast"]) for (_, arm, _), c in published.items()} == {("none", "none"), ("CMC", "global"),
                                                                           ("HCMoCo", "full")}
    assert not any(r.arm == "HCMoCo*" for r in experiments.grid(ckpts, quick=False))


def test_the_cli_reports_a_corrupt_init_without_a_traceback(tmp_path):
    bad = tmp_path / "init.pt"
    write_bad_checkpoint(bad, "garbage")
    result = subprocess.run([sys.executable, "finetune.py", "--init", str(bad), "--out", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {bad}: not a train.py checkpoint, a finetune.py model.pt or an "
                                                  "HRNet state_dict (not a PyTorch file of tensors and plain containers)"]


@pytest.mark.slow
@pytest.mark.parametrize("source,target", [("rgb", "depth"), ("depth", "rgb")])
def test_cross_modal_never_reads_target_labelled_images(checkpoint, tmp_path, monkeypatch, source, target):
    """Every labelled batch the head trains on carries no target images: present False and zero-filled by collate."""
    seen = []
    forward = versatility.Versatile.forward

    def spy(self, batch, modalities):
        if self.training:
            seen.append((batch["present"][target].any().item(), batch[target].abs().sum().item(), modalities))
        return forward(self, batch, modalities)

    monkeypatch.setattr(versatility.Versatile, "forward", spy)
    m = finetune.main(["--task", "cross-modal", "--source", source, "--target", target, "--init", str(checkpoint),
                       "--out", str(tmp_path), *TINY])
    assert f"{target}_miou" in m and len(seen) == 3
    assert all(s == (False, 0.0, [source]) for s in seen)
    # without the LabelledView the labelled target images would reach the head: the check above can fail
    seen.clear()
    monkeypatch.setattr(versatility, "LabelledView", lambda ds, keep: ds)
    finetune.main(["--task", "cross-modal", "--source", source, "--target", target, "--init", str(checkpoint),
                   "--out", str(tmp_path / "m"), *TINY])
    assert all(s[0] and s[1] > 0 for s in seen)


def test_labelled_view_drops_other_modalities():
    s = synthetic.SyntheticHumans(1, 32)
    view = versatility.LabelledView(s, keep=["depth"])[0]
    assert "rgb" not in view and not view["present"]["rgb"] and "depth" in view and "parts" in view


def test_random_label_subsets_are_distinct_repeatable_and_of_the_right_size():
    a, b = transfer.subset_indices(400, 0.05, 1), transfer.subset_indices(400, 0.05, 2)
    assert len(a) == len(set(a)) == 20 and a == sorted(a) and a == transfer.subset_indices(400, 0.05, 1) and a != b


def test_paired_gain_mean_interval_and_wins():
    g = experiments.paired_gain([5.0, 6.0, 7.0, 4.0], [4.0, 4.0, 4.0, 5.0])
    assert g["mean"] == 1.25 and g["wins"] == 0.75 and g["n"] == 4
    assert -1.0 <= g["lo"] < g["mean"] < g["hi"] <= 3.0  # within the smallest and largest difference
    same = experiments.paired_gain([1.0, 2.0], [1.0, 2.0])
    assert same["lo"] == same["hi"] == same["mean"] == 0.0 and same["wins"] == 0.0
    assert experiments.paired_gain([[5.0, 6.0, 7.0, 4.0]], [[4.0, 4.0, 4.0, 5.0]]) == g  # one pre-training: as [P]


def test_paired_gain_over_pre_trainings_holds_their_spread():
    """Pairs from three pre-trainings whose gains differ (1, 2, 6) but are equal within each: a one-level bootstrap
    over the 12 pairs is narrower than the spread between pre-trainings; resampling the pre-trainings first gives
    an interval that reaches the smallest and the largest (each drawn three times in 1 / 27 > 2.5 % of resamples)."""
    b = np.zeros((3, 4))
    a = b + np.array([[1.0], [2.0], [6.0]])
    g = experiments.paired_gain(a, b)
    assert g["mean"] == pytest.approx(3.0) and g["n"] == 12 and g["wins"] == 1.0
    assert (g["lo"], g["hi"]) == (1.0, 6.0)
    flat = experiments.paired_gain(a.ravel(), b.ravel())
    assert g["lo"] < flat["lo"] and flat["hi"] < g["hi"]


def test_probe_task_and_its_pixel_control(tmp_path, capsys, monkeypatch):
    """Both probes sweep the learning rates and report like every run. The control probes what it stands for,
    each cell's pixel position and depth input (its mean over the cell's 4 x 4 pixels) and nothing of a backbone;
    the scratch probe reads the backbone's merged 1/4 map. (Their scores are not compared: at this size neither
    probe reliably beats the other.)"""
    probed, real = {}, probe.probe_inputs

    def spy(features, dataset, cfg, device):  # keeps each init's last (features [N, C, h, w], labels): the test set's
        probed[cfg.init] = real(features, dataset, cfg, device)
        return probed[cfg.init]

    monkeypatch.setattr(probe, "probe_inputs", spy)
    for init in ("scratch", "pixels"):
        m = finetune.main(["--task", "depth-probe", "--init", init, "--out", str(tmp_path / init), *TINY])
        assert 0 <= m["miou"] <= 100 and float(m["lr"]) in probe.PROBE_LRS and len(m["sweep"]) == len(probe.PROBE_LRS)
        out = capsys.readouterr().out.splitlines()
        assert [line.split(" ")[0] for line in out if line.startswith("[")] == ["[1/7]", "[2/7]", "[3/7]", "[4/7]",
                                                                              "[5/7]", "[6/7]", "[7/7]"]
        assert out[-1].startswith(f"depth-probe from {init}: mIoU {m['miou']:.2f} %") and "probe lr" in out[-1]
        assert out[-1].endswith(f"wrote {tmp_path / init / 'metrics.json'}")  # a probe saves no model
    cfg = finetune.parse_args(["--task", "depth-probe", "--init", "pixels", *TINY])
    test_set = finetune.TASKS[cfg.task].labelled_split(cfg)[1]
    batch = data.collate([data.PairedTransform(cfg.image_size, train=False)(test_set[i]) for i in range(len(test_set))])
    n, size, cells = len(test_set), cfg.image_size, cfg.image_size // 4
    depth = hcmoco.depth_input(batch["depth"], batch["mask"][:, None])[:, 0]  # [n, H, W]
    centres = (4 * torch.arange(cells) + 1.5) / (size - 1)  # a cell's mean pixel position, [0, 1] over the image
    want = torch.stack([centres.expand(n, cells, cells), centres[:, None].expand(n, cells, cells),
                        depth.view(n, cells, 4, cells, 4).mean((2, 4))], 1)  # [n, 3, h, w]: x, y, depth
    torch.testing.assert_close(probed["pixels"][0], want)
    backbone = hcmoco.build_hrnet(transfer.scratch_config(cfg))
    assert probed["scratch"][0].shape == (n, sum(backbone.out_channels), cells, cells)
    with pytest.raises(SystemExit):
        finetune.parse_args(["--task", "rgb-parsing", "--init", "pixels"])


def test_image_bootstrap_interval_of_a_miou_difference():
    """Two runs on the same 40 images: the interval brackets the mIoU difference, is 0 for identical runs and lies
    above 0 when one run is right on more pixels of every image."""
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 5, (40, 8, 8), generator=g)
    noise = torch.randint(0, 5, (40, 8, 8), generator=g)
    coin = torch.rand(40, 8, 8, generator=g)
    good, bad = torch.where(coin < 0.8, label, noise), torch.where(coin < 0.5, label, noise)
    a, b = metrics.image_counts(good, label), metrics.image_counts(bad, label)
    d = experiments.image_bootstrap(a, b)
    want = metrics.segmentation_metrics(good, label)["miou"] - metrics.segmentation_metrics(bad, label)["miou"]
    assert abs(d["mean"] - want) < 1e-4 and 0 < d["lo"] < d["mean"] < d["hi"] and d["n"] == 40
    same = experiments.image_bootstrap(a, a)
    assert same["lo"] == same["hi"] == same["mean"] == 0.0
    assert experiments.image_bootstrap(a[None], b[None]) == pytest.approx(d)  # one pre-training: as [N, 3, K]


def test_image_bootstrap_over_pre_trainings_holds_their_spread():
    """Three pre-trainings whose probes differ from their controls by 1, 2 and 6 mIoU on every image alike: no
    image resample moves a difference, so a one-level interval would be a point; resampling the pre-trainings
    first reaches the smallest and the largest (each drawn three times in 1 / 27 > 2.5 % of resamples)."""
    def counts(q):  # 4 images, 2 classes, each IoU q: [4, 3, 2] (intersection, union, truth)
        return torch.tensor([[100 * q, 100 * q], [100.0, 100.0], [80.0, 60.0]], dtype=torch.float64).expand(4, 3, 2)

    a = torch.stack([counts(0.5 + gain / 100) for gain in (1.0, 2.0, 6.0)])  # [3, 4, 3, 2]
    b = torch.stack([counts(0.5)] * 3)
    g = experiments.image_bootstrap(a, b)
    assert (g["mean"], g["lo"], g["hi"], g["n"]) == pytest.approx((3.0, 1.0, 6.0, 4))
    assert experiments.image_bootstrap(a[2], b[2])["lo"] == pytest.approx(6.0)


def test_the_tables_pair_every_comparison_by_label_subset_and_seed(checkpoint):
    """summarise and results_markdown on made-up metrics for the whole grid. Each run's mIoU is its arm's offset
    plus a level its (label subset, seed) pair shares with every arm: paired, every gain is the offsets' difference
    with an interval of width 0 and every pair won; paired wrongly, the levels would spread it. HCMoCo − CMC from
    pre-trainings whose gains differ by seed has an interval over all seeds that spans them. The probes' steps
    are image bootstraps of their per-image counts, the noise floor the spreads of the seeds, and the versatility
    table reads each head on the modality it is tested on."""
    ckpts = runner_checkpoints(checkpoint)
    runs = experiments.grid(ckpts, quick=False)
    # each pre-training seed moves every Table 3 row alike (by -1 and +1; the probes by -0.05 and +0.02): its
    # steps are the same from every seed, and the ladder pairs rows of one seed only
    rows = {"global": 14.5, "hard": 15.0, "soft": 15.25}
    offset = {"scratch": 10.0, "CMC": 13.0, "MMV": 14.0, "HCMoCo": 16.0, "HCMoCo-seed1": 15.0, "CMC-seed1": 13.5,
              "HCMoCo-seed2": 17.0, "CMC-seed2": 12.0, **{experiments.seeded(row, seed): v + shift for row, v in
                                                           rows.items() for seed, shift in ((0, 0), (1, -1), (2, 1))}}
    iou = {"random": 0.2, "pixels": 0.1, "CMC": 0.3, "MMV": 0.35,
           **{experiments.seeded(row, seed): v + shift for row, v in {"global": 0.4, "hard": 0.5, "soft": 0.45,
                                                                      "full": 0.6}.items()
              for seed, shift in ((0, 0), (1, -0.05), (2, 0.02))}}

    def level(run):  # shared by every arm on the same label subset and seed; different between pairs
        return 3.0 * run.subset + 0.5 * run.seed + (1.0 if run.task == "depth-parsing" else 0.0)

    def counts(q):  # 5 images, 2 classes, each IoU q: [5, 3, 2] (intersection, union, truth)
        return torch.tensor([[100 * q, 100 * q], [100.0, 100.0], [80.0, 60.0]]).expand(5, 3, 2)

    def made_up(run):
        if run.group == "probe":
            return dict(metrics=dict(miou=100 * iou[run.arm]), counts=dict(per_image=counts(iou[run.arm])))
        if run.group == "versatility":
            k = {"none": 0.0, "CMC": 10.0, "HCMoCo": 20.0}[run.arm] + (100.0 if run.protocol == "ours" else 0.0)
            if run.task == "cross-modal":  # the trained-on modality scores 1 more than the tested one
                return dict(metrics={f"{run.target}_miou": k + (1 if run.source == "rgb" else 3),
                                     f"{run.source}_miou": k + (2 if run.source == "rgb" else 4)}, counts=None)
            return dict(metrics=dict(rgb_miou=k + 5, depth_miou=k + 6, fused_miou=k + 7), counts=None)
        if run.group == "curve":
            return dict(metrics=dict(miou=offset[run.arm] + level(run) - 5.0), counts=None)
        high = run.ratio == experiments.HIGH
        return dict(metrics=dict(miou=offset[run.arm] + (100.0 if high else level(run))), counts=None)

    s = experiments.summarise({run: made_up(run) for run in runs}, main_steps=300)
    levels = [level(r) for r in runs if r.group == "table2" and r.task == "rgb-parsing" and r.arm == "scratch"
              and r.ratio == experiments.LOW]
    assert len(levels) == 6 and len(set(levels)) == 6
    for task, extra in (("rgb-parsing", 0.0), ("depth-parsing", 1.0)):
        for a, b in (("HCMoCo", "scratch"), ("HCMoCo", "CMC"), ("HCMoCo", "MMV"), ("CMC", "scratch")):
            g = s["gains"][f"{task}/{a}-{b}"]
            assert g["mean"] == pytest.approx(offset[a] - offset[b]) and g["n"] == 6 and g["wins"] == 1.0
            assert g["lo"] == pytest.approx(g["mean"]) and g["hi"] == pytest.approx(g["mean"])
        row = s["table2"][f"{task}/HCMoCo"]
        assert row["low"] == pytest.approx(16.0 + sum(levels) / 6 + extra) and row["high"] == 116.0
        assert row["low_sd"] == pytest.approx(float(torch.tensor(levels).std(correction=0)))
        for row, prev in experiments.STEPS:
            g = s["ladder"][f"{task}/{row}-{prev}"]
            want = offset["HCMoCo" if row == "full" else row] - offset[prev]
            assert (g["mean"], g["lo"], g["hi"], g["n"]) == pytest.approx((want, want, want, 18))
        assert s["ladder"][task]["soft"] == pytest.approx(15.25 + sum(levels) / 6 + extra)  # over the seeds
        assert s["curves"][f"{task}/scratch/100"] == pytest.approx(10.0 + 3.0 + extra - 5.0)  # subset 1, seed 0
        assert s["noise"][f"{task}/finetune-seed"] == pytest.approx(0.5)
        for seed, want in ((0, 3.0), (1, 1.5), (2, 5.0)):  # each seed's pair of pre-trainings on its own
            g = s["seeds"][f"{task}/seed{seed}"]
            assert (g["mean"], g["lo"], g["hi"], g["n"]) == pytest.approx((want, want, want, 6))
        g = s["seeds"][f"{task}/all"]
        assert (g["mean"], g["lo"], g["hi"], g["n"]) == pytest.approx((9.5 / 3, 1.5, 5.0, 18))
        spread = s["noise"][f"{task}/pretrain-seed"]
        assert spread["HCMoCo"]["spread"] == pytest.approx(2.0) and spread["CMC"]["spread"] == pytest.approx(1.5)
    for modality in ("rgb", "depth"):
        for row, prev in experiments.STEPS:
            g = s["ladder"][f"{modality}-probe/{row}-{prev}"]
            want = 100 * (iou[row] - iou[prev])
            assert (g["mean"], g["lo"], g["hi"]) == pytest.approx((want, want, want)) and g["n"] == 5
        assert s["ladder"][f"{modality}-probe"]["soft"] == pytest.approx(44.0)  # 45, 40, 47 from the three seeds
        assert s["noise"][f"{modality}-probe"]["values"] == pytest.approx([60.0, 55.0, 62.0])
        assert s["noise"][f"{modality}-probe"]["spread"] == pytest.approx(7.0)
    assert s["versatility"]["published/HCMoCo"] == dict(rgb_to_depth=21, rgb_to_rgb=22, depth_to_rgb=23,
                                                        depth_to_depth=24, missing_rgb=25, missing_depth=26,
                                                        missing_fused=27)
    assert set(s["versatility"]) == {"published/none", "published/CMC", "published/HCMoCo", "ours/none",
                                     "ours/HCMoCo"}
    md = experiments.results_markdown(s)
    assert "| HCMoCo − scratch | +6.0 [+6.0, +6.0], 6/6 | +6.0 [+6.0, +6.0], 6/6 |" in md
    assert "| HCMoCo | 60.0 | 60.0 |" in md and "| random network, same init | 20.0 | 20.0 |" in md
    soft_over_hard = ("| &nbsp;&nbsp; gain over the hard row | -5.0 [-5.0, -5.0] | -5.0 [-5.0, -5.0] | "
                      "+0.2 [+0.2, +0.2], 18/18")
    assert soft_over_hard in md and "| + dense, soft | 44.0 | 44.0 | 21.5 | 22.5 |" in md
    assert "| seeds 0, 1, 2 (resampled by pre-training, then by pair) | +3.2 [+1.5, +5.0], 18/18 |" in md
    assert "| published: HCMoCo | 21.0 (22.0) | 23.0 (24.0) | 25.0 | 26.0 | 27.0 |" in md
