"""What every downstream run shares: fine-tuning (finetune.py), the frozen probes (probe.py) and the versatility runs
(versatility.py). A Task names the input, head, loss and metric, and holds the labelled people it trains and tests
on, the loop that trains a head and the test pass; its kind (finetune.FinetuneTask, probe.ProbeTask,
versatility.VersatilityTask) says what a run of it does. Also here: the words --init takes (Start), the backbone an
init gives, and the scratch model.

Data: synthetic by default, a labelled training set and a test set, each rendered from its own seed and disjoint from
the pre-training samples; a label ratio keeps a uniformly spaced subset of the training set, as the paper does. A
task with real labelled sets reads the first whose root is given instead.
"""
import enum
import functools
import os
from dataclasses import asdict, replace
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import cli
import data
import synthetic
from encoders import CheckpointError, HRNet, load_checkpoint
from hcmoco import HCMoCoConfig, build_hrnet, depth_input, hrnet_prefixes

KEYS = ("rgb", "depth", "mask", "keypoints", "keypoints_visible", "parts", "iuv", "joints3d", "intrinsics", "present",
        "index")  # what a labelled synthetic item carries
TRAIN_SEED, TEST_SEED = 100, 200
# A scratch model is the one train.py's CPU preset starts from: a memory bank of one entry per pre-training sample
# (its synthetic_samples) drawing its num_negatives, its HRNets' bn_momentum; written out here so that the
# downstream runs do not import the training script
SCRATCH_MODEL = HCMoCoConfig(bank_size=4096, num_negatives=256, bn_momentum=0.1)


# --------------------------------------------------------------------------------------------------------- inits
class Start(enum.Enum):
    """The words --init takes besides a file (a train.py stage file, a fine-tuned model.pt, an HRNet state_dict)."""

    SCRATCH = "scratch"  # an untrained network of scratch_config
    PIXELS = "pixels"  # no network: the probes' control, pixel (x, y) and the input (probe.pixel_features)


def scratch_config(cfg):
    """The model configuration of a scratch init: SCRATCH_MODEL with the --scratch-init HRNet init."""
    return replace(SCRATCH_MODEL, init=cfg.scratch_init)


def backbone_input(batch, modality):
    """What the HRNet of `modality` reads: RGB, or depth through the person mask (hcmoco.depth_input)."""
    return batch["rgb"] if modality == "rgb" else depth_input(batch["depth"], batch["mask"][:, None])


def load_backbone(init, modality, default_cfg):
    """(backbone, report). Start.SCRATCH: a fresh HRNet of `default_cfg`; a file: the HRNet of `modality` that it
    holds, copied by HRNet.load_state (which refuses a file that does not fill it): a train.py checkpoint's
    encoders.<modality> in an HRNet of the checkpoint's config; a fine-tuned model.pt's backbone or an external
    HRNet state_dict (ImageNet weights, export.py's file) in an HRNet of the file's own configuration
    (HRNet.from_pretrained), `default_cfg.init` for what it lacks."""
    if init is Start.SCRATCH:
        return build_hrnet(default_cfg), {}
    ckpt = load_checkpoint(init, "a train.py checkpoint, a finetune.py model.pt or an HRNet state_dict")
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(config, dict) and "model" in config:  # a train.py stage file
        arch = HCMoCoConfig.from_dict(config["model"])
        if modality == "depth" and arch.depth_encoder != "hrnet":
            raise CheckpointError(f"{init}: its depth encoder is a {arch.depth_encoder}, not an HRNet")
        net = build_hrnet(arch)
        return net, net.load_state(ckpt, init, hrnet_prefixes(modality))
    return HRNet.from_pretrained(init, default_cfg.init, hrnet_prefixes(modality), ckpt, build_hrnet(default_cfg),
                                 default_cfg.bn_momentum)


# ---------------------------------------------------------------------------------------------------------- data
def subset_indices(n, ratio, subset=0):
    """round(ratio * n) indices (at least one): subset 0 is uniformly spaced, round(linspace(0, n - 1, k)), as the
    paper takes its label ratios; subset s > 0 is a sorted uniform random draw seeded by s, for repeated runs."""
    k = max(1, round(ratio * n))
    if subset == 0:
        return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int)).tolist()
    return sorted(np.random.default_rng(subset).choice(n, size=k, replace=False).tolist())


@functools.lru_cache(maxsize=4)
def labelled_people(n, image_size, seed):
    """n labelled synthetic people, rendered once per process: the experiment runner's many runs share them."""
    return data.Cached(synthetic.SyntheticHumans(n, image_size, seed=seed, domain="indoor"), KEYS)


def loader(dataset, cfg, train_mode, steps=None, camera_frame=False):
    """Train: `steps` batches of seeded augmentations (data.StepBatches), without rotations and flips for labels in
    the camera frame (they would change the camera geometry); test: one pass without augmentation."""
    transform = data.PairedTransform(cfg.image_size, train=train_mode, rotate=0 if camera_frame else 30,
                                     flip=0 if camera_frame else 0.5)
    ds = data.Transformed(dataset, transform)
    if train_mode:
        batches = data.StepBatches(len(dataset), min(cfg.batch_size, len(dataset)), cfg.seed, 0, steps)
        return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=cfg.workers,
                                           collate_fn=data.collate)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                       collate_fn=data.collate)


def save_finetuned(model, metrics, cfg):
    """cfg.out/model.pt (the weights and the run's config, for finetune.load_finetuned); returns the metrics."""
    os.makedirs(cfg.out, exist_ok=True)
    cli.save_atomic(dict(model=model.state_dict(), config=asdict(cfg)), os.path.join(cfg.out, "model.pt"))
    return metrics


# ---------------------------------------------------------------------------------------------------------- task
class Task(NamedTuple):
    """A --task: the input its head reads, the head, the loss that trains it and the metric that tests it."""

    modality: str | None  # the backbone's input; the versatility tasks take theirs from --source / --target
    head: Callable | None  # input channels -> head module, called as head(map, batch); probes fit a probe.Probe
    loss: Callable | None  # (head output, batch) -> (loss, prediction)
    metric: Callable  # (predictions, labels) over the test set -> metrics
    label: str  # the batch key the metric reads
    camera_frame: bool = False  # 3D labels in the camera frame: trained without rotations and flips, which move it
    real: tuple = ()  # real labelled sets it reads instead of synthetic people: the first whose root is given

    def datasets(self, cfg):
        """(train, test): the first of the task's real sets whose root is given, else synthetic people."""
        for option, reader in self.real:
            root = getattr(cfg, option)
            if root:
                try:
                    sets = reader(root, "train"), reader(root, "test")
                except (OSError, ValueError) as e:  # a missing split list, a malformed line
                    raise SystemExit(f"error: --{option.replace('_', '-')} {root}: {' '.join(str(e).split())}") from e
                if not all(len(s) for s in sets):
                    raise SystemExit(f"error: --{option.replace('_', '-')} {root}: a split lists no image")
                return sets
        return (labelled_people(cfg.train_samples, cfg.image_size, TRAIN_SEED),
                labelled_people(cfg.test_samples, cfg.image_size, TEST_SEED))

    def labelled_split(self, cfg):
        """(the labelled training images at --ratio, --subset; the test set)."""
        train_set, test_set = self.datasets(cfg)
        return torch.utils.data.Subset(train_set, subset_indices(len(train_set), cfg.ratio, cfg.subset)), test_set

    def fit(self, model, labelled, cfg, device, loss_of):
        """cfg.steps AdamW steps on loss_of(batch) over augmented batches of the labelled set, the learning rate on
        a cosine from cfg.lr to 0."""
        # AdamW rather than SGD: its step does not scale with the gradient, which under BatchNorm is ~1/||w|| and so
        # differs a hundredfold between a scratch backbone (official init, std 0.001) and a pre-trained one (README)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        model.train()
        batches = loader(labelled, cfg, True, cfg.steps, self.camera_frame)
        bar = tqdm(batches, total=cfg.steps, desc=cfg.task, dynamic_ncols=True)
        for step, batch in enumerate(bar):
            cli.set_lr(optimizer, cli.cosine_lr(cfg.lr, step, cfg.steps))
            loss = loss_of(data.to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=round(loss.item(), 4))

    @torch.no_grad()
    def predict(self, model, test_set, cfg, device, *args):
        """(predictions, the labels the metric reads) over the test set, one pass without augmentation, on the CPU;
        `args` follow the batch into the model (a versatility.Versatile's modalities)."""
        preds, labels = [], []
        for batch in loader(test_set, cfg, False):
            batch = data.to_device(batch, device)
            pred = model(batch, *args)[1]
            preds.append(tuple(p.cpu() for p in pred) if isinstance(pred, tuple) else pred.cpu())
            labels.append(batch[self.label].cpu())
        return ((tuple(map(torch.cat, zip(*preds))) if isinstance(preds[0], tuple) else torch.cat(preds)),
                torch.cat(labels))

    def evaluate(self, model, test_set, cfg, device):
        """The task's metric on the test set."""
        model.eval()
        return self.metric(*self.predict(model, test_set, cfg, device))
