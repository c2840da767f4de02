"""What the scripts (train.py, finetune.py, experiments.py) share: command-line options from a config dataclass,
checks that name the option and its value, the device, the learning-rate schedule and atomic file writes."""
import argparse
import json
import math
import os
import types
import typing
from dataclasses import MISSING, fields

import torch

# At 32 px or less the HRNet's 1/32 branch is a single cell, and BatchNorm cannot train on one value per channel,
# which a batch holding one image of a modality gives (a mixed batch with one depth image, a tiny label subset).
# Any larger size works: the stride-2 convolutions round up and the branches are fused by resizing to exact sizes.
MIN_IMAGE_SIZE = 33


def add_options(parser, config, defaults=True):
    """One --option per field of the dataclass `config` (underscores as dashes), of the field's type: a Literal's
    values are its choices, `T | None` reads a T, a bool is --x / --no-x. With defaults=False an option not given
    is absent from the parsed namespace, so that a preset can fill it."""
    for f in fields(config):
        name = "--" + f.name.replace("_", "-")
        kind = f.type
        if isinstance(kind, types.UnionType):  # T | None
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        default = f.default if defaults and f.default is not MISSING else argparse.SUPPRESS
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            parser.add_argument(name, type=type(choices[0]), choices=choices, default=default)
        else:
            parser.add_argument(name, type=kind, default=default)


def check(parser, checks):
    """parser.error (exit 2, usage and the message) at the first (ok, message) that is not ok."""
    for ok, message in checks:
        if not ok:
            parser.error(message)


def positive(cfg, names):
    """(ok, message) per option of `names`: its value in cfg is positive."""
    return [(getattr(cfg, n) > 0, f"--{n.replace('_', '-')} must be positive, got {getattr(cfg, n)}") for n in names]


def image_size_check(size):
    """(ok, message) for --image-size: at least MIN_IMAGE_SIZE."""
    return (size >= MIN_IMAGE_SIZE,
            f"--image-size must be at least {MIN_IMAGE_SIZE}, got {size} (below, the HRNet's 1/32 branch is one cell)")


def out_check(out):
    """(ok, message) for --out: a folder that exists or can be made, and written; found now, not at the first save."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return False, f"--out {out}: {existing} is a file, not a folder"
    return os.access(existing, os.W_OK | os.X_OK), f"--out {out}: {existing} is not writable"


def pick_device(name):
    """--device auto | cpu | cuda -> 'cuda' or 'cpu' (auto: cuda when there is a GPU)."""
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def cosine_lr(base, step, total, warmup=0, floor=0.0):
    """The learning rate of `step` in [0, total]: a linear warm-up over the first `warmup` steps times a half-cosine
    from base down to floor, min(1, (step + 1) / warmup) * (floor + (base - floor) (1 + cos(pi step / total)) / 2)."""
    cosine = 0.5 * (1 + math.cos(math.pi * step / total))
    return min(1.0, (step + 1) / max(warmup, 1)) * (floor + (base - floor) * cosine)


def save_atomic(obj, path):
    """torch.save through a temporary file and a rename: a kill, a Ctrl-C or a failed write leaves the previous
    checkpoint whole and no partial file. A failed write (disk full, no permission) stops the run."""
    write_atomic(path, "wb", lambda f: torch.save(obj, f))


def save_json(obj, path):
    """obj as indented JSON at `path`, written as save_atomic writes: a reader never sees half a file (the
    experiment runner takes a run with a metrics.json as done)."""
    write_atomic(path, "w", lambda f: json.dump(obj, f, indent=1))


def write_atomic(path, mode, write):
    """write(file) into path.tmp, flushed to the disk, then renamed over `path`; on any failure the temporary file
    is removed, and an OSError stops the run saying whether a previous file is kept."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:  # a file object: a full disk raises OSError, not a RuntimeError of torch's writer
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            kept = "the previous one is kept" if os.path.exists(path) else "there is no previous one"
            raise SystemExit(f"error: could not write {path} ({e.strerror or e}); {kept}") from e
        raise
