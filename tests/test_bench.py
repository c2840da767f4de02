"""bench.py: the train section and --run read the configuration they are given and count what a step computes."""
from dataclasses import replace

import pytest

import bench
import cli
import harness
import train


@pytest.mark.slow
def test_train_section_counts_a_step_the_same_in_every_precision_and_layout(capsys):
    cpu = train.PRESETS["cpu"]
    cfg = replace(cpu, device="cpu", batch_size=4, synthetic_samples=16, heldout=8, model=replace(cpu.model, width=4))
    steps, parts = bench.bench_train(cfg)
    native = cli.native_bf16("cpu")
    assert [(s["stage"], s["bf16"], s["channels_last"]) for s in steps] == [
        (stage, bf16, cl) for stage in (1, 2) for bf16 in (False, True) for cl in (False, True) if native or not bf16]
    flops = {stage: {s["flops"] for s in steps if s["stage"] == stage} for stage in (1, 2)}
    # FLOPs follow from the shapes alone: neither the precision nor the memory layout changes them
    assert len(flops[1]) == len(flops[2]) == 1
    # stage 2 adds the keypoint encoder and the dense maps that stage 1 skips
    assert min(flops[2]) > min(flops[1]) > 0
    assert all(s["seconds"] > 0 for s in steps) and all(t > 0 for t in parts.values()) and len(parts) == 5
    out = capsys.readouterr().out
    assert f"preset cpu: HRNet {cpu.model.hrnet}, {cfg.image_size} px, batch 4" in out
    assert "a stage-2 step of the default run" in out


@pytest.mark.slow
def test_a_runs_throughput_counts_its_steps_on_its_own_config_and_its_first_retrieval_group_is_the_monitors(tmp_path):
    """bench.py --run rebuilds the run's config from its stage file: the FLOPs are each stage's steps times the FLOPs
    of a step of the model the run trained (here 4 channels wide, not the preset's), over the training time its log
    records; its first group of held-out people is the monitors' own, so it reads what the run's last monitor read."""
    args = ["--image-size", "40", "--width", "4", "--batch-size", "4", "--synthetic-samples", "12", "--workers", "0",
            "--preset", "cpu", "--heldout", "256", "--stage", "2", "--steps", "2", "--out", str(tmp_path)]
    train.main(args)
    flops, seconds, top1 = bench.bench_run(str(tmp_path), groups=2)
    cfg = train.parse_args(args)
    assert cfg.model.width == 4
    want = sum(train.stage_steps(cfg, stage, cfg.synthetic_samples) * bench.preset_step(cfg, stage, False)[1]
               for stage in (1, 2))
    assert flops == want
    rows = harness.read_log(str(tmp_path))
    assert seconds == pytest.approx(sum(max(r["time"] for r in rows if r["stage"] == s) for s in (1, 2)))
    monitor = [r for r in rows if "retrieval" in r][-1]
    assert monitor["stage"] == 2 and len(top1) == 2
    assert top1[0] == pytest.approx(100 * monitor["retrieval"], abs=0.01)  # the log keeps 4 decimals
