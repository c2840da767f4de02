"""HCMoCo's versatility (Sec. 3.5, supp. 1.6-1.7): a head on the dense embeddings of a whole pre-trained model,
trained while the contrastive targets keep training on unlabelled pairs alongside it.

    python finetune.py --task cross-modal   --source rgb --target depth --init runs/hcmoco/stage2.pt
    python finetune.py --task missing-modal --init runs/hcmoco/stage2.pt

cross-modal: the head trains on the source modality's labelled images and is tested on the target modality, whose
labelled images it never sees (cross-modality supervision). missing-modal: the head trains on the max-pooled RGB and
depth embeddings and is tested on each alone and on both (missing-modality inference).
"""
import functools
from dataclasses import replace

import torch
import torch.nn as nn

import data
from encoders import CheckpointError, load_checkpoint
from hcmoco import TARGETS, HCMoCo, HCMoCoConfig
from transfer import Start, Task, save_finetuned, scratch_config

# --contrast's rows of Table 3; 'auto' keeps the checkpoint's own ('none' for scratch)
CONTRAST = {"global": TARGETS["global"], "full": TARGETS["global+soft+sparse"]}


def contrast_model(cfg):
    """(HCMoCo, whether its targets keep training) of a versatility task: the model of --init (scratch: the scratch
    config) with the targets of --contrast (CONTRAST), then the checkpoint's weights."""
    contrast = "none" if cfg.contrast == "auto" and cfg.start is Start.SCRATCH else cfg.contrast
    if cfg.start is Start.SCRATCH:
        model_cfg, state = scratch_config(cfg), None
    else:
        ckpt = load_checkpoint(cfg.init, "a train.py checkpoint", ("model", "config"))
        if not (isinstance(ckpt["config"], dict) and "model" in ckpt["config"]):  # e.g. a fine-tuned model.pt
            raise CheckpointError(f"{cfg.init}: not a train.py checkpoint (no model config): {cfg.task} starts from "
                                  "the whole pre-trained model of a stage file")
        model_cfg, state = HCMoCoConfig.from_dict(ckpt["config"]["model"]), ckpt["model"]
    model = HCMoCo(replace(model_cfg, **CONTRAST.get(contrast, {})))
    if state is not None:
        model.load_state_dict(state)
    return model, contrast != "none"


class Versatile(nn.Module):
    """A full HCMoCo model plus the task's head on its dense embeddings (cross-modal, missing-modal)."""

    def __init__(self, cfg, task):
        super().__init__()
        self.hcmoco, self.contrast = contrast_model(cfg)
        self.task = task
        self.head = task.head(self.hcmoco.cfg.embed_dim)

    def embed(self, batch, modalities):
        """Dense embeddings of the given modalities, max-pooled when there are two."""
        maps = [self.hcmoco.dense_embed(batch, m) for m in modalities]
        return maps[0] if len(maps) == 1 else torch.maximum(*maps)

    def forward(self, batch, modalities):
        """-> (loss, predictions) of the head on the embeddings of `modalities`."""
        return self.task.loss(self.head(self.embed(batch, modalities), batch), batch)


def views(cfg):
    """(the modalities a versatility task's head trains on, {test name: the modalities it is tested on}). A cross-modal
    head is tested on the target modality and, for reference, on its own: the transfer keeps that much of it."""
    if cfg.task == "cross-modal":
        return [cfg.source], {cfg.target: [cfg.target], cfg.source: [cfg.source]}
    return ["rgb", "depth"], {"rgb": ["rgb"], "depth": ["depth"], "fused": ["rgb", "depth"]}


class LabelledView(torch.utils.data.Dataset):
    """Items with only the `keep` input modalities (and the labels): the others are removed before anything
    reads them, so a cross-modal run cannot train on the target modality's labelled images."""

    def __init__(self, dataset, keep):
        self.dataset, self.keep = dataset, set(keep)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        s = dict(self.dataset[key])
        for m in ("rgb", "depth"):
            if m not in self.keep:
                s.pop(m, None)
                s["present"] = dict(s["present"], **{m: False})
        return s


@functools.lru_cache(maxsize=2)
def unlabelled_pairs(image_size, n):
    """The pre-training set (data.pretraining_set as the CPU preset builds it: n samples rendered once into memory),
    built once per process: the unlabelled pairs the versatility tasks keep training the contrastive targets on.
    Rendered in this process (workers=0): the experiment runner's jobs are pool workers, which cannot start a pool
    of their own."""
    return data.pretraining_set("synthetic", image_size, synthetic_samples=n, cache=True)


def train_loader_unlabelled(pairs, cfg):
    """Unlabelled paired batches (unlabelled_pairs, augmented) for the contrastive targets of the versatility
    tasks, one per fine-tuning step."""
    batches = data.StepBatches(len(pairs), cfg.batch_size, cfg.seed + 1, 0, cfg.steps)
    return torch.utils.data.DataLoader(pairs, batch_sampler=batches, num_workers=0, collate_fn=data.collate)


class VersatilityTask(Task):
    """A head on a full HCMoCo model's dense embeddings (Versatile): cross-modal or missing-modal."""

    def model(self, cfg):
        return Versatile(cfg, self)

    def run(self, cfg, device):
        """The head trains on the labelled subset's views (views) while, with --contrast, the contrastive targets
        keep training on unlabelled pairs, a batch of each per step."""
        model = self.model(cfg).to(device)  # reads --init before any data is rendered
        train_set, test_set = self.labelled_split(cfg)
        sources = views(cfg)[0]
        labelled = LabelledView(train_set, keep=sources)
        # the unlabelled pairs are the pre-training set, whose ids the checkpoint's memory bank is indexed by
        unlabelled = iter(train_loader_unlabelled(unlabelled_pairs(cfg.image_size, model.hcmoco.cfg.bank_size), cfg))

        def loss(batch):
            head, _ = model(batch, sources)
            if not model.contrast:
                return head
            contrastive, _ = model.hcmoco(data.to_device(next(unlabelled), device))
            return head + contrastive

        self.fit(model, labelled, cfg, device, loss)
        return save_finetuned(model, dict(self.evaluate(model, test_set, cfg, device), train_images=len(train_set)),
                              cfg)

    def evaluate(self, model, test_set, cfg, device):
        """The task's metric on each of its test views (views), prefixed with the view's name, without the per-class
        table."""
        model.eval()
        return {f"{name}_{k}": v for name, modalities in views(cfg)[1].items()
                for k, v in self.metric(*self.predict(model, test_set, cfg, device, modalities)).items() if k != "iou"}
