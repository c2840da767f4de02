"""finetune.py: metrics against hand-made cases, the label-ratio subset, checkpoint loading, every head trains,
and cross-modal training never touches the target modality's labelled images."""
import json
import os
import subprocess
import sys

import pytest
import torch

import experiments
import finetune
import synthetic
import train
from conftest import BAD_CHECKPOINTS, ROOT, write_bad_checkpoint

TINY = ["--steps", "3", "--train-samples", "8", "--test-samples", "4", "--image-size", "40", "--batch-size", "4",
        "--workers", "0"]


def test_parsing_metrics_from_a_hand_made_confusion_matrix():
    label = torch.tensor([0, 0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    cm = finetune.confusion_matrix(pred, label, num_classes=3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    m = finetune.parsing_metrics(cm)
    ious = [2 / 3, 1 / 3, 1 / 2]  # tp / (gt + pred - tp)
    assert abs(m["miou"] - 100 * sum(ious) / 3) < 1e-9
    assert abs(m["macc"] - 100 * (2 / 3 + 1 / 2 + 1) / 3) < 1e-9
    assert abs(m["aacc"] - 100 * 4 / 6) < 1e-9


def test_pose_metrics_on_hand_made_joints():
    gt = torch.zeros(1, 4, 3)
    pred = torch.tensor([[[0.05, 0, 0], [0, 0.099, 0], [0, 0, 0.2], [0.3, 0.4, 0]]])
    m = finetune.pose_metrics(pred, gt)
    assert m["acc10cm"] == 50.0
    assert abs(m["mpjpe_cm"] - 100 * (0.05 + 0.099 + 0.2 + 0.5) / 4) < 1e-5


def test_densepose_metrics():
    iuv = torch.zeros(1, 3, 1, 4)
    iuv[0, 0] = torch.tensor([0, 3, 3, 5])
    iuv[0, 1:, 0, 1:] = 0.5
    part_pred = torch.tensor([[[0, 3, 3, 4]]])
    uv_pred = torch.full((1, 2, 1, 4), 0.5)
    uv_pred[0, 0, 0, 2] = 0.9  # right part, uv off by 0.4
    m = finetune.densepose_metrics(part_pred, uv_pred, iuv)
    assert abs(m["part_acc"] - 200 / 3) < 1e-4 and abs(m["uv_acc"] - 100 / 3) < 1e-4
    gps = (1 + torch.exp(torch.tensor(-0.16 / 0.02)).item()) / 3 * 100
    assert abs(m["gps"] - gps) < 1e-3


@pytest.mark.parametrize("ratio,expected", [(1.0, list(range(10))), (0.2, [0, 9]), (0.5, [0, 2, 4, 7, 9]),
                                            (0.01, [0])])
def test_ratio_keeps_a_uniformly_spaced_subset(ratio, expected):
    assert finetune.subset_indices(10, ratio) == expected


@pytest.mark.parametrize("task", ["rgb-parsing", "depth-parsing", "depth-pose", "dense-pose"])
def test_each_head_trains_and_reports_its_metrics(task, tmp_path):
    m = finetune.main(["--task", task, "--out", str(tmp_path), *TINY])
    keys = {"rgb-parsing": {"miou", "macc", "aacc", "iou"}, "depth-parsing": {"miou", "macc", "aacc", "iou"},
            "depth-pose": {"acc10cm", "mpjpe_cm"}, "dense-pose": {"part_acc", "uv_acc", "gps"}}[task]
    assert keys <= set(m) and m["train_images"] == 8
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert all(abs(saved[k] - m[k]) < 1e-9 for k in keys if k != "iou")
    # the saved model reproduces the metrics
    model, cfg = finetune.load_finetuned(tmp_path)
    again = finetune.evaluate(model, finetune.datasets(cfg)[1], cfg, torch.device("cpu"))
    assert all(abs(again[k] - m[k]) < 1e-6 for k in keys if k != "iou")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    train.main(["--stage", "1", "--steps", "1", "--image-size", "40", "--width", "4", "--batch-size", "4",
                "--synthetic-samples", "12", "--num-negatives", "8", "--workers", "0", "--preset", "cpu",
                "--out", str(out)])
    return out / "stage1.pt"


def test_loading_a_checkpoint_fills_the_backbone(checkpoint, capsys):
    net, report = finetune.load_backbone(str(checkpoint), "depth", finetune.HCMoCoConfig())
    state = torch.load(checkpoint, weights_only=True)["model"]
    torch.testing.assert_close(net.stage4[0].branches[3][0].conv1.weight,
                               state["encoders.depth.stage4.0.branches.3.0.conv1.weight"])
    assert report == {"missing": [], "unexpected": []} and net.out_channels[0] == 4
    assert "loaded" in capsys.readouterr().out
    # an external state_dict with a missing tensor is reported
    partial = {k[len("encoders.rgb."):]: v for k, v in state.items() if k.startswith("encoders.rgb.")}
    partial.pop("conv1.weight")
    path = checkpoint.parent / "external.pth"
    torch.save(partial, path)
    net, report = finetune.load_backbone(str(path), "rgb", finetune.HCMoCoConfig(width=4))
    assert report["missing"] == ["conv1.weight"]


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
@pytest.mark.parametrize("task", ["rgb-parsing", "cross-modal", "depth-probe"])
def test_an_init_that_is_not_a_checkpoint_is_one_line_and_runs_no_code(tmp_path, task, kind):
    bad = tmp_path / "init.pt"
    ran = write_bad_checkpoint(bad, kind)
    with pytest.raises(SystemExit) as e:
        finetune.main(["--task", task, "--init", str(bad), "--out", str(tmp_path / "out"), *TINY])
    message = str(e.value.code)
    assert message.startswith(f"error: {bad}: not a train.py checkpoint") and "\n" not in message
    assert not ran.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--lr", "-1"], ["--steps", "0"], ["--image-size", "32"],
                                  ["--train-samples", "0"], ["--test-samples", "-1"], ["--weight-decay", "-0.1"],
                                  ["--task", "rgb-probe", "--train-samples", "1"], ["--out", "{file}"],
                                  ["--out", "{file}/run"]])
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


def test_experiments_check_their_options(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("keep")
    monkeypatch.setattr(experiments, "run_jobs", None)  # nothing may start
    for args in (["--jobs", "0"], ["--out", str(tmp_path / "file")]):
        with pytest.raises(SystemExit) as e:
            finetune.main(["experiments", "--quick", "--out", str(tmp_path / "out"), *args])
        assert e.value.code == 2 and f"error: {args[0]} " in capsys.readouterr().err


def test_the_cli_reports_a_corrupt_init_without_a_traceback(tmp_path):
    bad = tmp_path / "init.pt"
    write_bad_checkpoint(bad, "garbage")
    result = subprocess.run([sys.executable, "finetune.py", "--init", str(bad), "--out", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {bad}: not a train.py checkpoint or an HRNet state_dict "
                                                  "(not a PyTorch file of tensors and plain containers)"]


@pytest.mark.slow
@pytest.mark.parametrize("source,target", [("rgb", "depth"), ("depth", "rgb")])
def test_cross_modal_never_reads_target_labelled_images(checkpoint, tmp_path, monkeypatch, source, target):
    """Every labelled batch the head trains on carries no target images: present False and zero-filled by collate."""
    seen = []
    forward = finetune.Versatile.forward

    def spy(self, batch, modalities):
        if self.training:
            seen.append((batch["present"][target].any().item(), batch[target].abs().sum().item(), modalities))
        return forward(self, batch, modalities)

    monkeypatch.setattr(finetune.Versatile, "forward", spy)
    m = finetune.main(["--task", "cross-modal", "--source", source, "--target", target, "--init", str(checkpoint),
                       "--out", str(tmp_path), *TINY])
    assert f"{target}_miou" in m and len(seen) == 3
    assert all(s == (False, 0.0, [source]) for s in seen)
    # without the LabelledView the labelled target images would reach the head: the check above can fail
    seen.clear()
    monkeypatch.setattr(finetune, "LabelledView", lambda ds, keep: ds)
    finetune.main(["--task", "cross-modal", "--source", source, "--target", target, "--init", str(checkpoint),
                   "--out", str(tmp_path / "m"), *TINY])
    assert all(s[0] and s[1] > 0 for s in seen)


def test_labelled_view_drops_other_modalities():
    s = synthetic.SyntheticHumans(1, 32)
    view = finetune.LabelledView(s, keep=["depth"])[0]
    assert "rgb" not in view and not view["present"]["rgb"] and "depth" in view and "parts" in view


def test_random_label_subsets_are_distinct_repeatable_and_of_the_right_size():
    a, b = finetune.subset_indices(400, 0.05, 1), finetune.subset_indices(400, 0.05, 2)
    assert len(a) == len(set(a)) == 20 and a == sorted(a) and a == finetune.subset_indices(400, 0.05, 1) and a != b


def test_paired_gain_mean_interval_and_wins():
    g = experiments.paired_gain([5.0, 6.0, 7.0, 4.0], [4.0, 4.0, 4.0, 5.0])
    assert g["mean"] == 1.25 and g["wins"] == 0.75 and g["n"] == 4
    assert -1.0 <= g["lo"] < g["mean"] < g["hi"] <= 3.0  # within the smallest and largest difference
    same = experiments.paired_gain([1.0, 2.0], [1.0, 2.0])
    assert same["lo"] == same["hi"] == same["mean"] == 0.0 and same["wins"] == 0.0


def test_probe_reads_what_the_features_linearly_hold():
    """Features that hold the part label (one-hot plus noise) probe to a high mIoU; pure noise does not."""
    torch.manual_seed(0)
    y = torch.randint(0, finetune.NUM_CLASSES, (40, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)  # [40, 32, 32]
    small = y[:, ::4, ::4]
    onehot = torch.nn.functional.one_hot(small, finetune.NUM_CLASSES).permute(0, 3, 1, 2).float()
    informative = onehot * 3 + torch.randn(40, finetune.NUM_CLASSES, 8, 8)
    noise = torch.randn(40, finetune.NUM_CLASSES, 8, 8)
    good = finetune.probe_miou(finetune.fit_probe(informative[:30], y[:30], 0.1, 200, 0), informative[30:], y[30:])
    bad = finetune.probe_miou(finetune.fit_probe(noise[:30], y[:30], 0.1, 200, 0), noise[30:], y[30:])
    assert good["miou"] > 60 and bad["miou"] < 15


def test_probe_task_and_its_pixel_control(tmp_path):
    for init in ("scratch", "pixels"):
        m = finetune.main(["--task", "depth-probe", "--init", init, "--out", str(tmp_path / init), *TINY])
        assert 0 <= m["miou"] <= 100 and float(m["lr"]) in finetune.PROBE_LRS and len(m["sweep"]) == len(finetune.PROBE_LRS)
    with pytest.raises(SystemExit):
        finetune.parse_args(["--task", "rgb-parsing", "--init", "pixels"])
