"""export.py: a pre-trained HRNet out of a train.py checkpoint as a plain state_dict with the official names, and
back in through HRNet.from_pretrained, finetune.py --init and train.py --backbone-init, every tensor matched."""
import re

import pytest
import torch

import export
import train
import transfer
from encoders import CheckpointError, HRNet
from hcmoco import HCMoCo, HCMoCoConfig

TINY = ["--image-size", "40", "--width", "4", "--batch-size", "4", "--synthetic-samples", "12", "--num-negatives", "8",
        "--workers", "0", "--preset", "cpu", "--heldout", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    train.main([*TINY, "--stage", "1", "--steps", "2", "--out", str(out)])
    return out / "stage1.pt"


@pytest.mark.parametrize("modality", ["rgb", "depth"])
def test_an_exported_encoder_round_trips_with_every_tensor_and_equal_outputs(checkpoint, tmp_path, capsys, modality):
    out = tmp_path / f"{modality}.pth"
    export.main([str(checkpoint), "--modality", modality, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "configuration: HRNet.small(width=4), not HRNet-W18" in printed and "--hrnet small --width 4" in printed
    assert not out.read_bytes().startswith(b"PK")  # PyTorch's pre-1.6 format, which the official code's versions read
    state = torch.load(out, weights_only=True)
    assert state.keys() == HRNet.small(width=4).state_dict().keys()  # the official names, nothing but the HRNet
    net, report = HRNet.from_pretrained(out)
    assert report == {"missing": [], "unexpected": [], "mismatched": []} and net.out_channels == [4, 8, 16, 32]
    trained = HCMoCo.from_checkpoint(checkpoint).encoders[modality].eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        for a, b in zip(net.eval()(x), trained(x)):
            assert torch.equal(a, b)


def test_init_and_backbone_init_load_an_export_whole_and_refuse_another_configuration(checkpoint, tmp_path, capsys):
    out = tmp_path / "rgb_hrnet.pth"
    export.main([str(checkpoint), "--modality", "rgb", "--out", str(out)])
    # finetune.py --init: the file's own configuration, not the CPU preset's width 16
    net, report = transfer.load_backbone(str(out), "rgb", HCMoCoConfig())
    assert report == {"missing": [], "unexpected": [], "mismatched": []} and net.out_channels[0] == 4
    # train.py --backbone-init with the printed flags: every tensor into both HRNets
    capsys.readouterr()
    train.main([*TINY, "--stage", "1", "--steps", "1", "--lr", "1e-30", "--backbone-init", str(out),
                "--out", str(tmp_path / "again")])
    printed = capsys.readouterr().out
    for m in ("rgb", "depth"):
        assert f"{m} HRNet from {out}: 0 missing, 0 unexpected, 0 mismatched" in printed
    # another width: one line naming both configurations, before any training
    with pytest.raises(SystemExit, match=r"^error: .*rgb_hrnet.pth: holds an HRNet.small\(width=4\).*this network is "
                                         r"an HRNet.small\(width=8\)"):
        train.main([*TINY, "--width", "8", "--stage", "1", "--steps", "1", "--backbone-init", str(out),
                    "--out", str(tmp_path / "other")])
    assert not (tmp_path / "other" / "stage1.pt").exists()


def test_architecture_is_read_from_the_tensors_and_named():
    assert HRNet.architecture(HRNet.small(in_channels=1, width=8).state_dict()) == dict(width=8, in_channels=1,
                                                                                        **HRNet.SMALL)
    w18 = HRNet.architecture(HRNet(18).state_dict())
    assert w18 == dict(width=18, in_channels=3, **HRNet.PUBLISHED)
    assert HRNet.describe(w18).startswith("HRNetV2-W18, the published configuration (widths 18-36-72-144, stem 64")
    odd = HRNet(width=4, stem_channels=8, stem_blocks=2, blocks=3, modules=(2, 1, 1))
    assert HRNet.architecture(odd.state_dict()) == dict(width=4, in_channels=3, stem_channels=8, stem_blocks=2,
                                                        blocks=3, modules=(2, 1, 1))
    with pytest.raises(ValueError, match="no stage2.0.branches.0.0.conv1.weight"):
        HRNet.architecture({"conv2.weight": torch.zeros(8, 8, 3, 3)})


def test_export_mistakes_are_one_line(checkpoint, tmp_path, capsys):
    taken = tmp_path / "taken.pth"
    taken.write_bytes(b"keep")
    for args, message in ((["--out", str(taken)], f"--out {taken} exists"),
                          (["--out", str(tmp_path / "no" / "x.pth")], "is not a folder")):
        with pytest.raises(SystemExit) as e:
            export.main([str(checkpoint), "--modality", "rgb", *args])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert taken.read_bytes() == b"keep"
    pointnet = tmp_path / "pointnet.pt"
    torch.save({"model": {}, "config": {"model": {"depth_encoder": "pointnet"}}}, pointnet)
    with pytest.raises(SystemExit, match=re.escape(f"error: {pointnet}: its depth encoder is pointnet, not an HRNet")):
        export.main([str(pointnet), "--modality", "depth", "--out", str(tmp_path / "d.pth")])
    with pytest.raises(CheckpointError, match="not a train.py checkpoint"):
        export.export_hrnet(str(taken), "rgb")
