"""train.py: the CLI, stage chaining, exact resume, the NaN guard, bad roots, and a 2-process torchrun run."""
import errno
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import hcmoco
import train
from conftest import BAD_CHECKPOINTS, write_bad_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "64", "--width", "4", "--batch-size", "4", "--synthetic-samples", "12", "--num-negatives", "8",
        "--workers", "0", "--preset", "cpu", "--log-every", "1", "--heldout", "8", "--warmup", "0"]


def run(tmp_path, *args):
    train.main([*TINY, "--out", str(tmp_path), *args])
    return tmp_path


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    for option in ("--stage", "--preset", "--data", "--targets", "--epochs", "--steps", "--batch-size", "--lr", "--out",
                   "--resume", "--device", "--seed", "--workers"):
        assert option in out, option


@pytest.mark.slow
def test_two_stages_chain_and_log(tmp_path, capsys):
    run(tmp_path, "--stage", "1", "--steps", "3", "--global-loss", "bank")
    s1 = weights(tmp_path / "stage1.pt")
    # a vanishing learning rate leaves stage 2's weights where stage 1 left them
    run(tmp_path, "--stage", "2", "--steps", "2", "--lr", "1e-30", "--global-loss", "bank")
    assert "reusing the finished" in capsys.readouterr().out
    s2 = weights(tmp_path / "stage2.pt")
    for k in ("encoders.rgb.conv1.weight", "encoders.keypoints.input.gconv.W", "global_mappers.depth.weight"):
        torch.testing.assert_close(s2[k], s1[k])
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # a row per step, and the monitors before the first update and after the last one (step = total)
    assert [(r["stage"], r["step"]) for r in rows] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2)]
    assert {"loss", "global", "dense", "sparse"} <= set(rows[-2]) and "dense" not in rows[0]
    monitors = {"retrieval", "cos_rgb", "cos_depth", "cos_keypoints", "dense_acc", "dense_acc_other",
                "conv_norm_rgb", "conv_cos_rgb", "conv_norm_depth", "conv_cos_depth"}
    assert all(monitors <= set(rows[i]) for i in (0, 3, 4, 6)) and not monitors & set(rows[1])
    assert rows[0]["conv_cos_rgb"] == 1.0 and rows[3]["conv_cos_rgb"] < 1.0  # stage 1 moved its weights
    assert rows[4]["conv_cos_depth"] == 1.0 and rows[6]["conv_cos_depth"] == 1.0  # lr 1e-30: stage 2 did not
    assert (tmp_path / "loss.png").stat().st_size > 1000
    ckpt = torch.load(tmp_path / "stage2.pt", weights_only=True)
    assert ckpt["done"] and ckpt["step"] == 2 and hcmoco.TARGETS["global+soft+sparse"].items() <= ckpt["config"]["model"].items()
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


def test_a_torn_log_line_is_dropped_with_a_warning(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"stage": 1, "step": 0, "loss": 5.0}\n\n{"stage": 1, "step": 1, "lo')
    with pytest.warns(UserWarning, match="log.jsonl, line 3: not a whole JSON row"):
        assert train.read_log(str(tmp_path)) == [{"stage": 1, "step": 0, "loss": 5.0}]


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


def test_an_out_that_is_a_file_or_under_one_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "run_stage", None)  # nothing may start
    file = tmp_path / "file"
    file.write_text("keep")
    for out in (file, file / "run"):
        with pytest.raises(SystemExit) as e:
            run(out, "--steps", "1")
        assert e.value.code == 2 and f"error: --out {out}: {file} is a file" in capsys.readouterr().err
    assert file.read_text() == "keep"


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "train.py",
           *TINY, "--stage", "1", "--steps", "2", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["stage1.pt"]
    assert torch.load(tmp_path / "stage1.pt", weights_only=True)["step"] == 2


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    """loss.png and the contact sheet are drawn without pyplot: a notebook that calls train.main keeps showing its
    own figures inline afterwards."""
    import matplotlib

    import synthetic
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        (tmp_path / "log.jsonl").write_text('{"stage": 1, "step": 0, "loss": 5.0, "global": 5.0}\n')
        train.plot_log(str(tmp_path))
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
    fig = train.plot_log(str(tmp_path))
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
    assert "%" in by_title["dense match: RGB pixel finds its depth cell"].get_ylabel()
    assert by_title["total loss (Eq. 1)"].get_ylabel() == "nats"
    # stage 1 alone: no boundary, and no panels for the terms it does not train
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    fig = train.plot_log(str(tmp_path))
    assert len(fig.axes) == 7 and all(ax.get_lines() and ax.get_xlabel() == "training step" for ax in fig.axes)


def test_paper_preset_has_the_published_resolution_and_augmentation():
    cfg = train.parse_args(["--preset", "paper", "--device", "cpu", "--synthetic-samples", "8"])
    assert (cfg.image_size, cfg.hrnet, cfg.batch_size, cfg.dense_points) == (320, "w18", 224, 400)
    assert [p.transform.recipe for p in train.build_dataset(cfg).datasets] == ["ntu", "mpii"]
    cpu = train.parse_args(["--preset", "cpu", "--device", "cpu", "--synthetic-samples", "8"])
    assert [p.transform.recipe for p in train.build_dataset(cpu).datasets] == ["cpu", "cpu"]


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


def test_monitors_tell_content_from_position():
    """Held-out retrieval, embedding collapse and the dense positional control, on embeddings made to order: a
    code of pixel position alone matches as well across people as within one; a code of content does not."""
    B, D, h, w = 8, 32, 6, 6
    batch = {"index": torch.arange(B), "mask": torch.ones(B, 24, 24, dtype=torch.bool),
             "depth": torch.ones(B, 1, 24, 24), "present": {m: torch.ones(B, dtype=torch.bool) for m in hcmoco.MODALITIES}}
    g = torch.nn.functional.normalize(torch.randn(B, D), dim=-1)
    position = torch.nn.functional.normalize(torch.randn(D, h, w), dim=0).expand(B, D, h, w)  # the same in everyone
    content = torch.nn.functional.normalize(torch.randn(B, D, h, w), dim=1)  # shared by both modalities of a person
    pos = train.monitors(CodeModel(g, g, position, position), batch, {})
    assert pos["retrieval"] == 1.0 and pos["dense_acc"] == 1.0 and pos["dense_acc_other"] == 1.0
    assert abs(pos["cos_rgb"] - float((g @ g.T).sum() - B) / (B * (B - 1))) < 1e-4
    con = train.monitors(CodeModel(g, g.roll(1, 0), content, content), batch, {})
    assert con["retrieval"] == 0.0 and con["dense_acc"] == 1.0 and con["dense_acc_other"] < 0.2
    collapsed = train.monitors(CodeModel(g[:1].expand(B, D), g, content, content), batch, {})
    assert collapsed["cos_rgb"] > 0.999
