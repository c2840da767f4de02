"""Take a pre-trained encoder out of a train.py checkpoint: the RGB or depth HRNet alone, as a plain state_dict with
the official HRNet names (no optimiser state, mappers, keypoint GCN or memory bank), for another code base.

    python export.py runs/hcmoco/stage2.pt --modality rgb --out rgb_hrnet.pth     # stage1.pt: the CMC encoder

The file is what the published HCMoCo code's transfer_ckpt.py writes and HRNet-Semantic-Segmentation's
MODEL.PRETRAINED reads: {official name: tensor}, in PyTorch's pre-1.6 format, which that code's PyTorch versions
load. Here it loads with `finetune.py --init FILE`, `train.py --backbone-init FILE` (with the --hrnet / --width
printed) and `encoders.HRNet.from_pretrained(FILE)`. The configuration is printed: the CPU preset's HRNet is
HRNet.small(width=16), not HRNet-W18; the official code builds W18 / W32 / W48 only (its stem has 64 channels,
the small one's 32).
"""
import argparse
import os
import sys

import torch

import cli
from encoders import CheckpointError, HRNet, load_checkpoint
from hcmoco import HCMoCoConfig, build_hrnet


def export_hrnet(checkpoint, modality):
    """(state_dict, HCMoCoConfig): the weights of the `modality` HRNet of a train.py checkpoint under the official
    names, every tensor of that HRNet and nothing else (checked by a strict load), and the model's config.
    CheckpointError if the file is not a train.py checkpoint or its encoder of `modality` is not an HRNet."""
    ckpt = load_checkpoint(checkpoint, "a train.py checkpoint", ("model", "config"))
    cfg = HCMoCoConfig.from_dict(ckpt["config"]["model"])
    if modality == "depth" and cfg.depth_encoder != "hrnet":
        raise CheckpointError(f"{checkpoint}: its depth encoder is {cfg.depth_encoder}, not an HRNet")
    prefix = f"encoders.{modality}."
    state = {k[len(prefix):]: v.contiguous() for k, v in ckpt["model"].items() if k.startswith(prefix)}
    build_hrnet(cfg).load_state_dict(state)
    return state, cfg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a train.py checkpoint: stage2.pt (HCMoCo) or stage1.pt (CMC)")
    parser.add_argument("--modality", choices=("rgb", "depth"), required=True)
    parser.add_argument("--out", help="the file to write (default: <modality>_hrnet.pth beside the checkpoint)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(args.checkpoint), f"{args.modality}_hrnet.pth")
    folder = os.path.dirname(os.path.abspath(out))
    cli.check(parser, [(os.path.isfile(args.checkpoint), f"{args.checkpoint}: no such file"),
                       (not os.path.exists(out), f"--out {out} exists; remove it or give another path"),
                       (os.path.isdir(folder), f"--out {out}: {folder} is not a folder")])
    try:
        state, cfg = export_hrnet(args.checkpoint, args.modality)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    cli.write_atomic(out, "wb", lambda f: torch.save(state, f, _use_new_zipfile_serialization=False))
    flags = f"--hrnet {cfg.hrnet}" + (f" --width {cfg.width}" if cfg.hrnet == "small" else "")
    print(f"wrote {out}: the {args.modality} HRNet of {args.checkpoint}, {len(state)} tensors\n"
          f"configuration: {HRNet.describe(HRNet.architecture(state))}\n"
          f"load it with: python finetune.py --init {out} ... | python train.py --backbone-init {out} {flags} ... | "
          f"encoders.HRNet.from_pretrained({out!r})")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
