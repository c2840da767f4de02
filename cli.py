"""What the scripts (train.py, finetune.py, experiments.py) share: command-line options from a config dataclass,
checks that name the option and its value, the device, the learning-rate schedule and atomic file writes."""
import argparse
import inspect
import io
import json
import math
import os
import textwrap
import tokenize
import types
import typing
from dataclasses import MISSING, fields

import torch

# At 32 px or less the HRNet's 1/32 branch is a single cell, and BatchNorm cannot train on one value per channel,
# which a batch holding one image of a modality gives (a mixed batch with one depth image, a tiny label subset).
# Any larger size works: the stride-2 convolutions round up and the branches are fused by resizing to exact sizes.
MIN_IMAGE_SIZE = 33


def add_options(parser, config, defaults=True, shown=None, nested=None):
    """One --option per field of the dataclass `config` (underscores as dashes), of the field's type: a Literal's
    values are its choices, `T | None` reads a T, a bool is --x / --no-x. Its help is the `# comment` after the
    field in the dataclass's source, and its default: shown[name] when given (e.g. the presets' values), else the
    field's (None and "" are not shown). With defaults=False an option not given is absent from the parsed namespace, so
    that a preset can fill it. `nested` {field: names}: a field that holds a dataclass is no option itself; the
    fields `names` of its dataclass are, in its place, with their comments, defaulting to its default's values."""
    comments = field_comments(config)
    options = []  # (field, its default, its comment)
    for f in fields(config):
        if f.name in (nested or {}):
            inner = f.default_factory()
            options += [(g, getattr(inner, g.name), field_comments(type(inner)).get(g.name, "")) for g in fields(inner)
                        if g.name in nested[f.name]]
        else:
            options.append((f, f.default, comments.get(f.name, "")))
    for f, field_default, comment in options:
        name = "--" + f.name.replace("_", "-")
        kind = f.type
        if isinstance(kind, types.UnionType):  # T | None
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        default = field_default if defaults and field_default is not MISSING else argparse.SUPPRESS
        if kind is bool:
            action = parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            action = parser.add_argument(name, type=type(choices[0]), choices=choices, default=default)
        else:
            action = parser.add_argument(name, type=kind, default=default)
        value = (shown or {}).get(f.name, field_default)
        default_text = "" if value in (None, "") or value is MISSING else f"(default: {value})"
        # set after add_argument: a BooleanOptionalAction would append a default of its own
        action.help = " ".join(filter(None, (comment, default_text))).replace("%", "%%")


def field_comments(config):
    """{field: the text of the `# comment` that ends its line} in the source of the dataclass `config`, read with
    tokenize (a '#' inside a string is no comment)."""
    source = textwrap.dedent(inspect.getsource(config))
    first, comments = {}, {}  # line -> its first name; field -> comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            first.setdefault(tok.start[0], tok.string)
        elif tok.type == tokenize.COMMENT and tok.start[0] in first:
            comments[first[tok.start[0]]] = tok.string.lstrip("#").strip()
    return {f.name: comments[f.name] for f in fields(config) if f.name in comments}


def check(parser, checks):
    """parser.error (exit 2, usage and the message) at the first (ok, message) that is not ok."""
    for ok, message in checks:
        if not ok:
            parser.error(message)


def positive(cfg, names):
    """(ok, message) per option of `names`: its value in cfg is positive."""
    return [(getattr(cfg, n) > 0, f"--{n.replace('_', '-')} must be positive, got {getattr(cfg, n)}") for n in names]


def non_negative(cfg, names):
    """(ok, message) per option of `names`: its value in cfg is 0 or more."""
    return [(getattr(cfg, n) >= 0, f"--{n.replace('_', '-')} must be 0 or more, got {getattr(cfg, n)}") for n in names]


def image_size_check(size):
    """(ok, message) for --image-size: at least MIN_IMAGE_SIZE."""
    return (size >= MIN_IMAGE_SIZE,
            f"--image-size must be at least {MIN_IMAGE_SIZE}, got {size} (below, the HRNet's 1/32 branch is one cell)")


def out_check(out):
    """(ok, message) for --out: a folder that holds the results. It is made now (with its parents) and a probe file
    written in it and removed, so that a folder that cannot be made or written stops the run before any work, not
    at its first save. Check it after the other options: it creates the folder."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return False, f"--out {out}: {existing} is a file, not a folder"
    probe = os.path.join(out, f".write-test-{os.getpid()}")  # one per process: torchrun's ranks check at once
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        return False, f"--out {out}: cannot make it or write in it ({e.strerror or e})"
    return True, ""


def device_check(name):
    """(ok, message) for --device: cuda only where torch sees a GPU."""
    return (name != "cuda" or torch.cuda.is_available(),
            "--device cuda: torch sees no GPU (torch.cuda.is_available() is False); give --device cpu or auto")


def pick_device(name):
    """--device auto | cpu | cuda -> 'cuda' or 'cpu' (auto: cuda when there is a GPU)."""
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def native_bf16(device):
    """Whether `device` ('cpu' | 'cuda') computes in bf16 natively (CPU: AVX512-BF16 or AMX, through oneDNN)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def use_bf16(precision, device):
    """Whether a run of --precision auto | fp32 | bf16 on `device` computes under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def cosine_lr(base, step, total, warmup=0, floor=0.0):
    """The learning rate of `step` in [0, total]: a linear warm-up over the first `warmup` steps times a half-cosine
    from base down to floor, min(1, (step + 1) / warmup) * (floor + (base - floor) (1 + cos(pi step / total)) / 2)."""
    cosine = 0.5 * (1 + math.cos(math.pi * step / total))
    return min(1.0, (step + 1) / max(warmup, 1)) * (floor + (base - floor) * cosine)


def set_lr(optimizer, lr):
    """Every parameter group of `optimizer` at learning rate `lr`, a schedule's value for the coming step."""
    for group in optimizer.param_groups:
        group["lr"] = lr


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
