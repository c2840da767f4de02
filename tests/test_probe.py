"""probe.py: a probe reads what features linearly hold, and fits each cell's majority label. (The probe tasks run
through finetune.py: tests/test_finetune.py.)"""
import torch

import probe
from schema import NUM_CLASSES


def test_probe_reads_what_the_features_linearly_hold():
    """Features that hold the part label (one-hot plus noise) probe to a high mIoU; pure noise does not."""
    torch.manual_seed(0)
    y = torch.randint(0, NUM_CLASSES, (40, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)  # [40, 32, 32]
    small = y[:, ::4, ::4]
    onehot = torch.nn.functional.one_hot(small, NUM_CLASSES).permute(0, 3, 1, 2).float()
    informative = onehot * 3 + torch.randn(40, NUM_CLASSES, 8, 8)
    noise = torch.randn(40, NUM_CLASSES, 8, 8)
    good = probe.probe_miou(probe.fit_probe(informative[:30], y[:30], 0.1, 200, 0), informative[30:], y[30:])
    bad = probe.probe_miou(probe.fit_probe(noise[:30], y[:30], 0.1, 200, 0), noise[30:], y[30:])
    assert good["miou"] > 60 and bad["miou"] < 15


def test_cell_labels_take_the_majority_of_the_labelled_pixels():
    y = torch.tensor([[[1, 1, 2, 255], [1, 3, 2, 2], [255, 255, 4, 4], [255, 255, 4, 5]]])
    assert probe.cell_labels(y, (2, 2)).tolist() == [[[1, 2], [255, 4]]]
