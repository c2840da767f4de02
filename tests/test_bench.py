"""bench.py: the train section runs on the preset's current configuration and counts what a step computes."""
from dataclasses import replace

import pytest

import bench
import cli
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
