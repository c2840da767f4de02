"""train.py: the CLI, stage chaining, exact resume, the NaN guard, bad roots, and a 2-process torchrun run."""
import dataclasses
import errno
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import data
import finetune
import harness
import hcmoco
import synthetic
import train
from conftest import BAD_CHECKPOINTS, REAL_SAMPLES, ROOT, write_bad_checkpoint

TINY = ["--image-size", "64", "--width", "4", "--batch-size", "4", "--synthetic-samples", "12", "--num-negatives", "8",
        "--workers", "0", "--preset", "cpu", "--log-every", "1", "--heldout", "8", "--warmup", "0"]


def run(tmp_path, *args):
    train.main([*TINY, "--out", str(tmp_path), *args])
    return tmp_path


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_help_lists_the_options_with_their_meaning_and_defaults():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    for option in ("--stage", "--preset", "--data", "--targets", "--epochs", "--steps", "--batch-size", "--lr", "--out",
                   "--resume", "--device", "--seed", "--workers"):
        assert option in out, option
    assert set(train.cli.field_comments(train.Config)) == {f.name for f in dataclasses.fields(train.Config)}
    assert set(train.MODEL_OPTIONS) <= set(train.cli.field_comments(hcmoco.HCMoCoConfig))
    words = " ".join(out.split())
    for line in ("--lr LR the peak learning rate of each stage, on a cosine to 0 (default: 0.01, paper preset 0.03)",
                 "--preset {auto,cpu,paper} the other options' defaults; auto: paper on a GPU, else cpu (default: auto)",
                 "--heldout HELDOUT held-out people the monitors embed (default: 256)"):
        assert line in words, line
    lines = out.splitlines()  # the torchrun example keeps its two lines
    k = next(i for i, line in enumerate(lines) if line.startswith("    torchrun --nproc_per_node 8 train.py"))
    assert lines[k].endswith("\\") and lines[k + 1].startswith("        --backbone-init ")


@pytest.mark.slow
def test_two_stages_chain_and_log(tmp_path, capsys, monkeypatch):
    run(tmp_path, "--stage", "1", "--steps", "3", "--global-loss", "bank")
    s1 = weights(tmp_path / "stage1.pt")
    # a vanishing learning rate leaves stage 2's weights where stage 1 left them
    monkeypatch.setattr(train.cli, "cosine_lr", lambda *a, **kw: 1e-30)
    run(tmp_path, "--stage", "2", "--steps", "3", "--global-loss", "bank")
    out = capsys.readouterr().out
    assert "reusing the finished" in out
    s2 = weights(tmp_path / "stage2.pt")
    for k in ("encoders.rgb.conv1.weight", "encoders.keypoints.input.gconv.W", "global_mappers.depth.weight"):
        torch.testing.assert_close(s2[k], s1[k])
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # a row per step, and the monitors before the first update and after the last one (step = total)
    assert [(r["stage"], r["step"]) for r in rows] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert {"loss", "global", "dense", "sparse"} <= set(rows[-2]) and "dense" not in rows[0]
    monitors = {"retrieval", "cos_rgb", "cos_depth", "cos_keypoints", "dense_acc", "dense_acc_other", "dense_acc_moved",
                "conv_norm_rgb", "conv_cos_rgb", "conv_norm_depth", "conv_cos_depth"}
    assert all(monitors <= set(rows[i]) for i in (0, 3, 4, 7)) and not monitors & set(rows[1])
    assert rows[0]["conv_cos_rgb"] == 1.0 and rows[3]["conv_cos_rgb"] < 1.0  # stage 1 moved its weights
    assert rows[4]["conv_cos_depth"] == 1.0 and rows[7]["conv_cos_depth"] == 1.0  # lr 1e-30: stage 2 did not
    # each stage ends with a line of its monitors, those of the log's last row
    for stage, r in ((1, rows[3]), (2, rows[7])):
        assert (f"stage {stage} done after 3 steps: held-out RGB -> depth top-1 {100 * r['retrieval']:.1f} % among 8 "
                f"people (chance 12.5 %), global cosine between people {r['cos_rgb']:.2f} (1 = collapsed), dense "
                f"matching {100 * r['dense_acc']:.0f} % vs {100 * r['dense_acc_other']:.0f} % with another person's "
                f"depth and {100 * r['dense_acc_moved']:.0f} % with the depth moved (pixel position alone: ~18 %)"
                ) in out.splitlines()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    ckpt = torch.load(tmp_path / "stage2.pt", weights_only=True)
    assert ckpt["done"] and ckpt["step"] == 3 and hcmoco.TARGETS["global+soft+sparse"].items() <= ckpt["config"]["model"].items()
    assert "bank.bank_depth" in ckpt["model"] and "optimizer" in ckpt
    model = hcmoco.HCMoCo.from_checkpoint(tmp_path / "stage2.pt")
    torch.testing.assert_close(model.encoders["depth"].conv1.weight, s2["encoders.depth.conv1.weight"])


@pytest.mark.slow
def test_resume_after_ctrl_c_and_a_torn_log_line_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    run(tmp_path / "a", "--stage", "1", "--steps", "4")
    calls = {"n": 0}
    forward = hcmoco.HCMoCo.forward

    def ctrl_c_on_third_step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(self, *a, **kw)

    monkeypatch.setattr(hcmoco.HCMoCo, "forward", ctrl_c_on_third_step)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "b", "--stage", "1", "--steps", "4", "--save-every", "2")
    monkeypatch.setattr(hcmoco.HCMoCo, "forward", forward)
    assert e.value.code == 130
    assert torch.load(tmp_path / "b" / "stage1.pt", weights_only=True)["step"] == 2
    # the printed command resumes; a kill can also cut the log's last line
    command = shlex.split(capsys.readouterr().err.strip().splitlines()[-1])
    assert command[:2] == ["python", "train.py"] and command[-1] == "--resume"
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write('{"stage": 1, "step": 2, "loss": 4.')
    with pytest.warns(UserWarning, match="log.jsonl, line 3"):
        train.main(command[2:])
    a, b = weights(tmp_path / "a" / "stage1.pt"), weights(tmp_path / "b" / "stage1.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]  # 4: the monitors after the last update


def config(out):
    return json.loads((out / "config.json").read_text())


def test_a_stage_file_is_reused_only_with_the_options_that_shaped_it(tmp_path, capsys, monkeypatch):
    """Stage 1 is shaped by every option but the run's management and stage 2's own; a stage file made with other
    options is refused in one line naming them, unless --overwrite replaces it; config.json describes the stage
    files beside it."""
    a = run(tmp_path / "a", "--stage", "1", "--steps", "2")
    s1 = weights(a / "stage1.pt")
    # the experiment runner's pattern: stage 1 copied into another folder, stage 2 with other stage-2 options there
    # (and other values of the options that only manage the run)
    (tmp_path / "b").mkdir()
    shutil.copy(a / "stage1.pt", tmp_path / "b" / "stage1.pt")
    b = run(tmp_path / "b", "--stage", "2", "--steps", "2", "--targets", "global+hard", "--dense-points", "16",
            "--soft-width", "0.5", "--eval-every", "5", "--log-every", "2", "--heldout", "4")
    assert "stage 1: reusing the finished" in capsys.readouterr().out
    torch.testing.assert_close(weights(b / "stage1.pt"), s1)
    assert torch.load(b / "stage2.pt", weights_only=True)["done"] and config(b)["targets"] == "global+hard"
    files = {p: p.read_bytes() for p in (b / "stage1.pt", b / "stage2.pt", b / "config.json", b / "log.jsonl")}
    monkeypatch.setattr(train, "build_dataset", None)  # a refused run builds nothing and trains nothing
    for args, changed in ((["--targets", "global+soft"], "--targets global+hard -> global+soft"),
                          (["--targets", "global+hard", "--lr", "0.1"], "--lr 0.01 -> 0.1"),
                          (["--targets", "global+hard", "--width", "8"], "--width 4 -> 8"),
                          (["--targets", "global+hard", "--soft-width", "0.3"], "--soft-width 0.5 -> 0.3")):
        with pytest.raises(SystemExit) as e:
            run(b, "--stage", "2", "--steps", "2", "--dense-points", "16", "--soft-width", "0.5", *args)
        message = str(e.value.code)
        stage = 2 if "targets" in changed or "soft-width" in changed else 1
        assert message == (f"error: {b / f'stage{stage}.pt'} was trained with other options ({changed}): give another "
                           "--out, or --overwrite to discard it")
        assert {p: p.read_bytes() for p in files} == files
    monkeypatch.undo()
    run(b, "--stage", "2", "--steps", "2", "--targets", "global+hard", "--lr", "0.1", "--overwrite")
    assert "reusing" not in capsys.readouterr().out
    for stage in (1, 2):
        ckpt = torch.load(b / f"stage{stage}.pt", weights_only=True)
        assert ckpt["done"] and ckpt["config"]["train"]["lr"] == 0.1
    assert config(b)["lr"] == 0.1 and config(b)["model"]["dense_points"] == 48
    # a stage 1 trained again outdates the stage 2 beside it, even when this run stops at stage 1
    with pytest.raises(SystemExit, match="stage1.pt was trained with other options \\(--lr 0.1 -> 0.01\\)"):
        run(b, "--stage", "1", "--steps", "2")
    run(b, "--stage", "1", "--steps", "2", "--overwrite")
    assert not (b / "stage2.pt").exists() and config(b)["lr"] == 0.01
    torch.testing.assert_close(weights(b / "stage1.pt"), s1)  # the same options train the same weights


def test_a_stage_file_from_before_soft_width_measured_eq4_in_cells(tmp_path, capsys, monkeypatch):
    """A stage 2 file whose config has no soft_width trained Eq. 4 in cells: reused at --soft-width 1, refused at
    another width, and rebuilt with width 1."""
    out = run(tmp_path, "--stage", "2", "--steps", "2", "--soft-width", "1")
    ckpt = torch.load(out / "stage2.pt", weights_only=True)
    del ckpt["config"]["model"]["soft_width"]
    torch.save(ckpt, out / "stage2.pt")
    assert hcmoco.HCMoCo.from_checkpoint(out / "stage2.pt").cfg.soft_width == 1.0
    run(out, "--stage", "2", "--steps", "2", "--soft-width", "1")
    assert "stage 2: reusing the finished" in capsys.readouterr().out
    monkeypatch.setattr(train, "build_dataset", None)
    with pytest.raises(SystemExit, match=r"stage2.pt was trained with other options \(--soft-width 1.0 -> 0.5\)"):
        run(out, "--stage", "2", "--steps", "2", "--soft-width", "0.5")


def test_stage_2_is_the_same_whether_stage_1_trained_in_the_same_process_or_was_reused(tmp_path):
    """Stage 2's new heads and draws come from its own seed, not from the RNG state stage 1 left behind."""
    one = run(tmp_path / "one", "--stage", "2", "--steps", "2")
    two = run(tmp_path / "two", "--stage", "1", "--steps", "2")
    run(two, "--stage", "2", "--steps", "2")
    torch.testing.assert_close(weights(two / "stage1.pt"), weights(one / "stage1.pt"))
    torch.testing.assert_close(weights(two / "stage2.pt"), weights(one / "stage2.pt"), rtol=0, atol=0)


def test_each_stage_trains_its_own_epochs_and_only_its_own_shape_its_file(tmp_path, capsys, monkeypatch):
    """--stage1-epochs sets stage 1's length, --epochs stage 2's (12 people at batch 4: 3 steps an epoch); another
    --epochs leaves stage1.pt reusable and refuses stage2.pt, another --stage1-epochs refuses stage1.pt."""
    out = run(tmp_path, "--stage", "2", "--stage1-epochs", "1", "--epochs", "2")
    assert [torch.load(out / f"stage{s}.pt", weights_only=True)["step"] for s in (1, 2)] == [3, 6]
    trained = {s: max(r["step"] for r in harness.read_log(out) if r["stage"] == s and "lr" in r) for s in (1, 2)}
    assert trained == {1: 2, 2: 5}
    monkeypatch.setattr(train, "build_dataset", None)  # a refused run builds nothing and trains nothing
    for args, stage, changed in ((["--stage1-epochs", "1", "--epochs", "1"], 2, "--epochs 2 -> 1"),
                                 (["--stage1-epochs", "2", "--epochs", "2"], 1, "--stage1-epochs 1 -> 2")):
        with pytest.raises(SystemExit) as e:
            run(tmp_path, "--stage", "2", *args)
        assert str(e.value.code) == (f"error: {out / f'stage{stage}.pt'} was trained with other options ({changed}): "
                                     "give another --out, or --overwrite to discard it")
    monkeypatch.undo()
    stage1 = (out / "stage1.pt").read_bytes()
    run(tmp_path, "--stage", "2", "--stage1-epochs", "1", "--epochs", "1", "--overwrite")
    assert "stage 1: reusing the finished" in capsys.readouterr().out and (out / "stage1.pt").read_bytes() == stage1
    assert torch.load(out / "stage2.pt", weights_only=True)["step"] == 3
    # a stage file from before --stage1-epochs records only --epochs, which its run trained in both stages
    ckpt = torch.load(out / "stage1.pt", weights_only=True)
    del ckpt["config"]["train"]["stage1_epochs"]
    ckpt["config"]["train"]["epochs"] = 1
    torch.save(ckpt, out / "stage1.pt")
    run(tmp_path, "--stage", "1", "--stage1-epochs", "1", "--epochs", "1")
    assert "stage 1: reusing the finished" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="\\(--stage1-epochs 1 -> 3\\)"):
        run(tmp_path, "--stage", "1", "--epochs", "1")


def test_an_unfinished_stage_is_continued_only_on_request_and_only_with_its_options(tmp_path, capsys, monkeypatch):
    out = run(tmp_path / "out", "--stage", "1", "--steps", "2")
    ckpt = torch.load(out / "stage1.pt", weights_only=True)
    torch.save(dict(ckpt, done=False, step=1), out / "stage1.pt")  # as a kill after step 1 leaves it
    before = (out / "stage1.pt").read_bytes(), (out / "log.jsonl").read_bytes()
    monkeypatch.setattr(train, "build_dataset", None)  # a refused run builds nothing and trains nothing
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--steps", "2")
    assert str(e.value.code) == (f"error: {out / 'stage1.pt'} is unfinished (step 1): continue it with --resume, or "
                                 "train it again with --overwrite")
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--steps", "2", "--resume", "--lr", "0.1", "--batch-size", "2")
    assert str(e.value.code) == (f"error: {out / 'stage1.pt'} was trained with other options (--batch-size 4 -> 2, "
                                 "--lr 0.01 -> 0.1): give the same options to continue it, or give another --out, "
                                 "or --overwrite to discard it")
    assert ((out / "stage1.pt").read_bytes(), (out / "log.jsonl").read_bytes()) == before
    capsys.readouterr()
    for args, message in ((["--resume"], f"error: --resume: nothing to resume in {tmp_path / 'typo'} (no stage file)"),
                          (["--resume", "--overwrite"], "error: --resume continues the stage files in --out")):
        with pytest.raises(SystemExit) as e:
            run(tmp_path / "typo", "--stage", "1", "--steps", "2", *args)
        assert e.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.undo()
    run(out, "--stage", "1", "--steps", "2", "--resume")
    assert torch.load(out / "stage1.pt", weights_only=True)["done"]


def test_ctrl_c_before_the_first_checkpoint_does_not_offer_a_resume(tmp_path, monkeypatch, capsys):
    """--resume would find nothing to continue: the printed command starts the run again instead."""
    def ctrl_c(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(hcmoco.HCMoCo, "forward", ctrl_c)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--stage", "1", "--steps", "4")
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and lines[-2] == "interrupted before the first checkpoint: nothing to continue; start " \
                                                "again with"
    assert shlex.split(lines[-1])[:2] == ["python", "train.py"] and "--resume" not in lines[-1]


def test_a_torn_log_line_is_dropped_with_a_warning(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"stage": 1, "step": 0, "loss": 5.0}\n\n{"stage": 1, "step": 1, "lo')
    with pytest.warns(UserWarning, match="log.jsonl, line 3: not a whole JSON row"):
        assert harness.read_log(str(tmp_path)) == [{"stage": 1, "step": 0, "loss": 5.0}]


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["ctrl-c", "disk full"])
def test_a_save_cut_short_keeps_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch, capsys, failure):
    path, save, before = tmp_path / "stage1.pt", torch.save, []

    def second_save_fails(obj, f, *a, **kw):
        if not path.exists():
            return save(obj, f, *a, **kw)
        before.append(path.read_bytes())
        (f if hasattr(f, "write") else open(f, "wb")).write(b"half a checkpoint")
        raise KeyboardInterrupt() if failure == "ctrl-c" else OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", second_save_fails)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--stage", "1", "--steps", "6", "--save-every", "2")
    monkeypatch.setattr(torch, "save", save)
    assert path.read_bytes() == before[0] and torch.load(path, weights_only=True)["step"] == 2
    assert not list(tmp_path.glob("*.tmp"))
    if failure == "ctrl-c":
        assert e.value.code == 130 and capsys.readouterr().err.strip().endswith("--resume")
    else:
        assert e.value.code == f"error: could not write {path} (No space left on device); the previous one is kept"


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = hcmoco.HCMoCo.forward

    def nan_on_fourth_step(self, *a, **kw):
        calls["n"] += 1
        loss, terms = forward(self, *a, **kw)
        return (loss * float("nan"), terms) if calls["n"] == 4 else (loss, terms)

    monkeypatch.setattr(hcmoco.HCMoCo, "forward", nan_on_fourth_step)
    with pytest.raises(SystemExit, match="non-finite loss at step 3.*stage1.pt"):
        run(tmp_path, "--stage", "1", "--steps", "6", "--save-every", "2")
    ckpt = torch.load(tmp_path / "stage1.pt", weights_only=True)
    assert ckpt["step"] == 2 and not ckpt["done"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_missing_dataset_root_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "HCMoCo", None)  # no model may be built before the error
    with pytest.raises(SystemExit, match=re.escape(str(tmp_path / "nowhere"))):
        run(tmp_path, "--data", "ntu+mpii", "--ntu-root", str(tmp_path / "nowhere"), "--mpii-root", str(tmp_path))


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_a_stage_file_that_is_not_a_checkpoint_is_one_line_and_runs_no_code(tmp_path, monkeypatch, kind):
    bad = tmp_path / "stage1.pt"
    ran = write_bad_checkpoint(bad, kind)
    before = bad.read_bytes()
    monkeypatch.setattr(train, "run_stage", None)  # the file is read before any training
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--stage", "2", "--steps", "1", "--resume")
    message = str(e.value.code)
    assert message.startswith(f"error: {bad}: not a train.py checkpoint (") and "\n" not in message
    assert not ran.exists() and bad.read_bytes() == before


def test_a_backbone_init_that_is_not_a_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "hrnet.pth"
    write_bad_checkpoint(bad, "truncated")
    with pytest.raises(SystemExit, match=f"^error: {re.escape(str(bad))}: not an HRNet state_dict \\(.*\\)$"):
        run(tmp_path / "out", "--stage", "1", "--steps", "1", "--backbone-init", str(bad))
    assert not (tmp_path / "out" / "stage1.pt").exists()


@pytest.mark.parametrize("args", [["--batch-size", "-4"], ["--lr", "-1"], ["--epochs", "-1"], ["--steps", "-2"],
                                  ["--image-size", "17"], ["--image-size", "32"], ["--synthetic-samples", "1"],
                                  ["--heldout", "1"], ["--save-every", "0"], ["--workers", "-1"]])
def test_bad_values_are_usage_errors_naming_the_option_and_value(tmp_path, capsys, monkeypatch, args):
    monkeypatch.setattr(train, "run_stage", None)  # nothing may start
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "out", "--steps", "1", *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {args[0]} must be " in err and f"got {args[1]}" in err
    assert not (tmp_path / "out").exists()


def test_device_cuda_without_a_gpu_is_a_usage_error_before_a_preset_is_chosen(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "replace", None)  # no preset may be chosen for it
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--device", "cuda", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "error: --device cuda: torch sees no GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--mpii-root", "m"], "--mpii-root: --data synthetic does not read it"),
    (["--data", "ntu+mpii", "--ntu-root", "n", "--mpii-root", "m", "--coco-root", "c"],
     "--coco-root: --data ntu+mpii does not read it"),
    (["--mpii-split", "valid"], "--mpii-split: --data synthetic does not read MPII")])
def test_a_dataset_root_the_data_does_not_read_is_a_usage_error(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        train.parse_args([*args, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err


def test_a_run_that_trains_other_than_its_options_suggest_is_warned_of(tmp_path, capsys):
    run(tmp_path, "--stage", "1", "--steps", "1", "--warmup", "5", "--synthetic-samples", "4", "--batch-size", "8")
    out = capsys.readouterr().out
    assert "warning: a stage has 1 steps, fewer than --warmup 5: the learning rate never leaves the warm-up" in out
    assert "warning: 4 pre-training samples, fewer than --batch-size 8: a batch holds people more than once" in out


def test_an_out_that_is_a_file_or_under_one_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "run_stage", None)  # nothing may start
    file = tmp_path / "file"
    file.write_text("keep")
    for out in (file, file / "run"):
        with pytest.raises(SystemExit) as e:
            run(out, "--steps", "1")
        assert e.value.code == 2 and f"error: --out {out}: {file} is a file" in capsys.readouterr().err
    assert file.read_text() == "keep"
    # a folder that cannot be made (root may write to /proc, but not make folders there): found before any work
    with pytest.raises(SystemExit) as e:
        run("/proc/hcmoco-out", "--steps", "1")
    assert e.value.code == 2 and ("error: --out /proc/hcmoco-out: cannot make it or write in it (" in
                                  capsys.readouterr().err)


@pytest.mark.slow
def test_torchrun_two_processes_gloo_trains_both_stages_without_warnings(tmp_path):
    """Stage 2 starts from the stage1.pt that rank 0 has just written, on every rank; no rank prints a deprecation
    warning or leaves a collective unwaited."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "train.py",
           "--stage", "2", "--steps", "2", "--synthetic-samples", "16", "--batch-size", "8", "--heldout", "4",
           "--workers", "0", "--image-size", "48", "--width", "4", "--preset", "cpu", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not re.search("FutureWarning|deprecated|unwaited", result.stderr), result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["stage1.pt", "stage2.pt"]
    for stage in (1, 2):
        ckpt = torch.load(tmp_path / f"stage{stage}.pt", weights_only=True)
        assert ckpt["done"] and ckpt["step"] == 2


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    """loss.png and the contact sheet are drawn without pyplot: a notebook that calls train.main keeps showing its
    own figures inline afterwards."""
    import matplotlib

    import synthetic
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        (tmp_path / "log.jsonl").write_text('{"stage": 1, "step": 0, "loss": 5.0, "global": 5.0}\n')
        harness.plot_log(str(tmp_path))
        synthetic.contact_sheet(synthetic.SyntheticHumans(2, 48), 2, str(tmp_path / "sheet.png"))
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "sheet.png").stat().st_size > 1000
    finally:
        matplotlib.use(before)


def test_loss_plot_labels_its_axes_and_the_stage_boundary_and_has_no_empty_panel(tmp_path):
    """loss.png of a two-stage log: a panel per logged series, each with a title and labelled axes, retrieval and
    the dense match in percent, stage 2 drawn after stage 1's last step behind a dashed line that each x axis names."""
    monitors = dict(retrieval=0.25, cos_rgb=0.9, cos_depth=0.8, cos_keypoints=0.7, dense_acc=0.5, dense_acc_other=0.2,
                    conv_cos_rgb=1.0, conv_cos_depth=1.0, conv_norm_rgb=9.0, conv_norm_depth=9.1)
    rows = [{"stage": 1, "step": 0, "loss": 5.0, "global": 5.0, **monitors},
            {"stage": 1, "step": 1, "loss": 4.0, "global": 4.0},
            {"stage": 1, "step": 2, **monitors},  # the monitors after the last update
            {"stage": 2, "step": 0, "loss": 9.0, "global": 4.0, "dense": 3.0, "sparse": 2.0, **monitors},
            {"stage": 2, "step": 1, **monitors, "retrieval": 0.5}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = harness.plot_log(str(tmp_path))
    assert len(fig.axes) == 9 and (tmp_path / "loss.png").stat().st_size > 1000
    for ax in fig.axes:
        assert ax.get_lines() and ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
        assert ax.get_xlabel() == "training step; stage 2 from step 3 (dashed)"
        assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [3]
    by_title = {ax.get_title(): ax for ax in fig.axes}
    retrieval = by_title["held-out retrieval, top-1"]
    assert "%" in retrieval.get_ylabel()
    assert list(retrieval.get_lines()[0].get_xdata()) == [0, 2, 3, 4]  # stage 2 counted on from stage 1's 3 steps
    assert list(retrieval.get_lines()[0].get_ydata()) == [25.0, 25.0, 25.0, 50.0]
    assert "%" in by_title["dense match: RGB cell finds its depth cell"].get_ylabel()
    assert by_title["total loss (Eq. 1)"].get_ylabel() == "nats"
    # stage 1 alone: no boundary, and no panels for the terms it does not train
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    fig = harness.plot_log(str(tmp_path))
    assert len(fig.axes) == 7 and all(ax.get_lines() and ax.get_xlabel() == "training step" for ax in fig.axes)


def test_paper_preset_has_the_published_resolution_and_augmentation():
    cfg = train.parse_args(["--preset", "paper", "--device", "cpu", "--synthetic-samples", "8"])
    assert (cfg.image_size, cfg.model.hrnet, cfg.batch_size, cfg.model.dense_points) == (320, "w18", 224, 400)
    assert cfg.model.keypoint_graph == "published"
    assert train.PRESETS["cpu"].model.keypoint_graph == "masked"
    assert [p.transform.recipe for p in train.build_dataset(cfg).datasets] == ["ntu", "mpii"]
    assert cfg.model.lambda_sparse == 1.0 and cfg.augment == "published"
    # Eq. 4 in the published grid's cells; the CPU preset's 16 x 16 grid at 64 px has cells 5 times as large
    assert (cfg.model.soft_width, train.PRESETS["cpu"].model.soft_width) == (1.0, 0.2)
    # the CPU preset augments whole batches in the training loop (data.BatchAugment): its items come untransformed
    cpu = train.parse_args(["--preset", "cpu", "--device", "cpu", "--synthetic-samples", "8"])
    assert cpu.augment == "batch" and not any(isinstance(p, data.Transformed) for p in train.build_dataset(cpu).datasets)


@pytest.mark.parametrize("source", ["synthetic+mpii", "mpii"])
def test_pretraining_on_the_real_mpii_samples(tmp_path, source):
    """--data synthetic+mpii (real MPII without depth, mixed by masking with synthetic people) and --data mpii run
    on the real MPII files that ship; they hold annot/valid.json only, so --mpii-split valid."""
    mpii = ["--data", source, "--mpii-root", str(REAL_SAMPLES / "mpii"), "--mpii-split", "valid"]
    with pytest.raises(SystemExit, match="train.json"):  # the published split by default
        run(tmp_path / "default", *mpii[:4], "--stage", "1", "--steps", "1")
    run(tmp_path, *mpii, "--stage", "2", "--steps", "2", "--lambda-dense", "0")
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows if "loss" in r] == [1, 1, 2, 2]
    assert all(math.isfinite(r["loss"]) and r["global"] > 0 for r in rows if "loss" in r)
    assert json.loads((tmp_path / "config.json").read_text())["mpii_split"] == "valid"


def test_the_mmv_baseline_is_a_sample_level_loss_of_both_stages(monkeypatch):
    cfg = train.parse_args(["--global-loss", "mmv", "--device", "cpu"])
    built = []  # the model config of each stage, as train.build_model gives it to HCMoCo
    monkeypatch.setattr(train, "HCMoCo", lambda model_cfg: built.append(model_cfg) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(harness, "load_stage", lambda *a: {"model": torch.nn.Linear(1, 1).state_dict()})
    for stage in (1, 2):
        train.build_model(cfg, stage, 8, torch.device("cpu"), print)
    assert built[0].global_loss == built[1].global_loss == "mmv"


def test_batchnorm_momentum_is_the_published_one_but_in_the_cpu_preset():
    """The paper preset's HRNets average their BatchNorm statistics with momentum 0.01, as published; the CPU
    preset keeps 0.1 (measured: README), and so do checkpoints saved before the option and fine-tuning's scratch."""
    def momenta(cfg):
        return {m.momentum for m in hcmoco.build_hrnet(replace(cfg, hrnet="small", width=4)).modules()
                if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta(train.PRESETS["paper"].model) == {0.01}
    assert momenta(train.PRESETS["cpu"].model) == {0.1}
    assert hcmoco.HCMoCoConfig().bn_momentum == 0.01 and hcmoco.HCMoCoConfig.from_dict({}).bn_momentum == 0.1
    assert momenta(finetune.scratch_config(finetune.Config())) == {0.1}


def test_the_paper_schedule_is_per_epoch_down_to_a_thousandth_of_the_lr(tmp_path):
    """As published (learning/base_trainer.py, --cosine): constant within an epoch; epoch e = 1..E at
    lr_min + (lr - lr_min) (1 + cos(pi e / E)) / 2, lr_min = lr x 1e-3, so the last epoch runs at lr_min."""
    assert (train.PRESETS["paper"].lr_schedule, train.PRESETS["cpu"].lr_schedule) == ("epoch", "step")
    cfg, E, per_epoch = train.PRESETS["paper"], 100, 7
    lrs = [train.learning_rate(cfg, step, E * per_epoch, per_epoch) for step in range(E * per_epoch)]
    for e in range(1, E + 1):
        expected = 3e-5 + (0.03 - 3e-5) * (1 + math.cos(math.pi * e / E)) / 2
        assert lrs[(e - 1) * per_epoch:e * per_epoch] == pytest.approx([expected] * per_epoch)
    assert lrs[-1] == pytest.approx(3e-5)
    run(tmp_path, "--stage", "1", "--stage1-epochs", "2", "--lr", "0.01", "--lr-schedule", "epoch")  # 3 steps an epoch
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([(0.01 + 1e-5) / 2] * 3 + [1e-5] * 3)


def test_backbone_init_loads_an_official_checkpoint_into_both_hrnets(tmp_path, capsys):
    """--backbone-init: an official-format HRNet state_dict ('module.'-prefixed, one tensor of another shape) goes
    into the RGB and the depth HRNet before stage 1, with a report of what matched."""
    from encoders import HRNet
    torch.manual_seed(3)
    official = HRNet.small(width=4)
    for p in official.parameters():
        p.data.normal_()
    state = {"module." + k: v for k, v in official.state_dict().items()}
    state["module.conv1.weight"] = torch.randn(32, 1, 3, 3)  # e.g. a 1-channel stem: skipped and reported
    path = tmp_path / "hrnetv2_small_official.pth"
    torch.save({"state_dict": state}, path)
    run(tmp_path / "out", "--stage", "1", "--steps", "1", "--lr", "1e-30", "--backbone-init", str(path))
    out = capsys.readouterr().out
    assert "rgb HRNet from" in out and "depth HRNet from" in out and "1 mismatched" in out
    s1 = weights(tmp_path / "out" / "stage1.pt")
    for m in ("rgb", "depth"):
        torch.testing.assert_close(s1[f"encoders.{m}.stage4.0.branches.3.0.conv2.weight"],
                                   official.stage4[0].branches[3][0].conv2.weight)
        assert not torch.equal(s1[f"encoders.{m}.conv1.weight"], official.conv1.weight)
    with pytest.raises(SystemExit):
        train.parse_args(["--backbone-init", str(tmp_path / "missing.pth")])


def test_backbone_init_takes_a_stage_file_and_refuses_a_file_that_does_not_fill_the_hrnets(tmp_path):
    """A stage file gives each HRNet its own modality's encoder; a file matching nothing is one line, not a run from
    random weights."""
    a = run(tmp_path / "a", "--stage", "1", "--steps", "1")
    s1 = weights(a / "stage1.pt")
    run(tmp_path / "b", "--stage", "1", "--steps", "1", "--lr", "1e-30", "--backbone-init", str(a / "stage1.pt"))
    b = weights(tmp_path / "b" / "stage1.pt")
    for m in ("rgb", "depth"):
        for k in ("conv1.weight", "stage4.0.branches.3.0.conv2.weight"):
            torch.testing.assert_close(b[f"encoders.{m}.{k}"], s1[f"encoders.{m}.{k}"])
    assert not torch.equal(s1["encoders.rgb.conv1.weight"], s1["encoders.depth.conv1.weight"])
    torch.save({"foo": torch.ones(3)}, tmp_path / "foo.pth")
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "c", "--stage", "1", "--steps", "1", "--backbone-init", str(tmp_path / "foo.pth"))
    assert re.fullmatch(f"error: {re.escape(str(tmp_path / 'foo.pth'))}: 0 of the HRNet's \\d+ weight tensors match .*"
                        "the file has 'foo', the HRNet expects 'conv1.weight'.*prefix.*", str(e.value.code))
    assert not (tmp_path / "c" / "stage1.pt").exists()


class CodeModel(torch.nn.Module):
    """A stand-in for HCMoCo whose embeddings are given: what the monitors should read from them is known."""

    def __init__(self, global_rgb, global_depth, dense_rgb, dense_depth):
        super().__init__()
        self.g, self.d = (global_rgb, global_depth), (dense_rgb, dense_depth)
        self.encoders = {}

    def embed(self, batch):
        rows = batch["index"]
        return {"global": {"rgb": self.g[0][rows], "depth": self.g[1][rows], "keypoints": self.g[0][rows]},
                "dense": {"rgb": self.d[0][rows], "depth": self.d[1][rows]}}

    def dense_embed(self, batch, modality):  # the moved view: these codes do not follow the image
        return self.d[1][: len(batch["depth"])]


class PixelCodeModel(CodeModel):
    """Dense embeddings looked up per pixel in a random table and averaged over each 4 x 4 cell: by the pixel's own
    position, or by the content it shows (the depth image holds each source pixel's index, so a moved depth image
    shows where its pixels came from)."""

    def __init__(self, g, table, follows):
        super().__init__(g, g, None, None)
        self.table, self.follows = table, follows

    def code(self, depth):
        B, _, H, W = depth.shape
        own = torch.arange(1, H * W + 1).view(1, H, W).expand(B, H, W)
        index = depth[:, 0].long() if self.follows == "content" else own
        return torch.nn.functional.avg_pool2d(self.table[index].permute(0, 3, 1, 2), 4)  # [B, D, H/4, W/4]

    def embed(self, batch):
        dense = self.code(batch["depth"])
        return {"global": {m: self.g[0] for m in ("rgb", "depth", "keypoints")}, "dense": {"rgb": dense, "depth": dense}}

    def dense_embed(self, batch, modality):
        return self.code(batch["depth"])


def test_monitors_tell_content_from_position():
    """Held-out retrieval, embedding collapse and the dense positional control, on embeddings made to order: a
    code of pixel position alone matches as well across people as within one; a code of content does not."""
    B, D, h, w = 8, 32, 6, 6
    batch = {"index": torch.arange(B), "mask": torch.ones(B, 24, 24, dtype=torch.bool),
             "depth": torch.ones(B, 1, 24, 24), "present": {m: torch.ones(B, dtype=torch.bool) for m in hcmoco.MODALITIES}}
    g = torch.nn.functional.normalize(torch.randn(B, D), dim=-1)
    position = torch.nn.functional.normalize(torch.randn(D, h, w), dim=0).expand(B, D, h, w)  # the same in everyone
    content = torch.nn.functional.normalize(torch.randn(B, D, h, w), dim=1)  # shared by both modalities of a person
    pos = harness.monitors(CodeModel(g, g, position, position), batch, {})
    assert pos["retrieval"] == 1.0 and pos["dense_acc"] == 1.0 and pos["dense_acc_other"] == 1.0
    assert abs(pos["cos_rgb"] - float((g @ g.T).sum() - B) / (B * (B - 1))) < 1e-4
    con = harness.monitors(CodeModel(g, g.roll(1, 0), content, content), batch, {})
    assert con["retrieval"] == 0.0 and con["dense_acc"] == 1.0 and con["dense_acc_other"] < 0.2
    collapsed = harness.monitors(CodeModel(g[:1].expand(B, D), g, content, content), batch, {})
    assert collapsed["cos_rgb"] > 0.999


def test_the_moved_view_tells_a_body_code_from_a_position_code():
    """dense_acc_moved: with the depth image moved, embeddings that follow what a pixel shows still find their cell;
    a code of pixel position, which matches perfectly when nothing moves, does not."""
    B, D, H = 8, 64, 48
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    batch = {"index": torch.arange(B), "mask": torch.ones(B, H, H, dtype=torch.bool),
             "depth": (1 + ys * H + xs).float()[None, None].expand(B, 1, H, H),
             "present": {m: torch.ones(B, dtype=torch.bool) for m in hcmoco.MODALITIES}}
    table = torch.nn.functional.normalize(torch.randn(H * H + 1, D), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(B, D), dim=-1)
    content = harness.monitors(PixelCodeModel(g, table, "content"), batch, {})
    position = harness.monitors(PixelCodeModel(g, table, "position"), batch, {})
    assert content["dense_acc"] == position["dense_acc"] == 1.0
    assert content["dense_acc_moved"] > 0.8 and position["dense_acc_moved"] < 0.3


def test_precision_auto_is_bf16_where_the_device_has_it(monkeypatch):
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(train.cli, "native_bf16", lambda device, native=native: native)
        assert train.parse_args(["--preset", "cpu"]).precision == want
        assert train.parse_args(["--preset", "cpu", "--precision", "fp32"]).precision == "fp32"


def test_bf16_asked_for_on_a_cpu_without_it_is_noted(tmp_path, capsys, monkeypatch):
    """Emulated bf16 is several times slower than fp32 (a 2-core AVX2 CPU: 6.8 s against 1.0 s a stage-2 step of
    the CPU preset): asking for it there trains, but says so; auto and fp32 say nothing."""
    for native, precision, noted in ((False, "bf16", True), (True, "bf16", False), (False, "auto", False)):
        monkeypatch.setattr(train.cli, "native_bf16", lambda device, native=native: native)
        run(tmp_path / f"{native}{precision}", "--stage", "1", "--steps", "1", "--precision", precision)
        assert ("note: --precision bf16 on a CPU without native bf16" in capsys.readouterr().out) == noted


def test_a_bf16_run_keeps_float32_weights_and_learns_the_same_terms(tmp_path):
    """bf16 autocast on the CPU: the losses stay finite and close to the fp32 run's at the first step (the losses
    upcast their inputs), the weights and the saved checkpoint stay float32."""
    for precision in ("fp32", "bf16"):
        run(tmp_path / precision, "--stage", "1", "--steps", "2", "--precision", precision)
    rows = {p: [json.loads(line) for line in (tmp_path / p / "log.jsonl").read_text().splitlines()] for p in ("fp32", "bf16")}
    first = {p: rows[p][0]["loss"] for p in rows}
    assert abs(first["bf16"] - first["fp32"]) < 0.05 * first["fp32"]
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "bf16" / "stage1.pt").values() if v.is_floating_point())


@pytest.mark.parametrize("transformed,size", [(True, 32), (False, 48)])
def test_a_given_dataset_that_batch_augmentation_would_spoil_is_refused(tmp_path, transformed, size):
    """--augment batch augments raw items at the training size in the loop: an item already augmented and
    normalised (it would be augmented twice) or of another size is refused before any training, naming the way out."""
    people = synthetic.SyntheticHumans(4, size, seed=0)
    part = data.Transformed(people, data.PairedTransform(size)) if transformed else people
    cfg = train.Config(out=str(tmp_path / "run"), image_size=32, steps=1, batch_size=4, heldout=4, workers=0)
    with pytest.raises(ValueError, match="augment='published'"):
        train.pretrain(cfg, dataset=data.MixedDataset([part]))
    assert not (tmp_path / "run").exists()
