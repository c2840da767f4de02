"""metrics.py: the parsing, pose and dense-pose metrics against hand-made cases, and the per-image counts against the
confusion matrix."""
import torch

import metrics
from schema import NUM_CLASSES


def test_parsing_metrics_from_a_hand_made_confusion_matrix():
    label = torch.tensor([0, 0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    cm = metrics.confusion_matrix(pred, label, num_classes=3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    m = metrics.parsing_metrics(cm)
    ious = [2 / 3, 1 / 3, 1 / 2]  # tp / (gt + pred - tp)
    assert abs(m["miou"] - 100 * sum(ious) / 3) < 1e-9
    assert abs(m["macc"] - 100 * (2 / 3 + 1 / 2 + 1) / 3) < 1e-9
    assert abs(m["aacc"] - 100 * 4 / 6) < 1e-9


def test_pose_metrics_on_hand_made_joints():
    gt = torch.zeros(1, 4, 3)
    pred = torch.tensor([[[0.05, 0, 0], [0, 0.099, 0], [0, 0, 0.2], [0.3, 0.4, 0]]])
    m = metrics.pose_metrics(pred, gt)
    assert m["acc10cm"] == 50.0
    assert abs(m["mpjpe_cm"] - 100 * (0.05 + 0.099 + 0.2 + 0.5) / 4) < 1e-5


def test_densepose_metrics():
    iuv = torch.zeros(1, 3, 1, 4)
    iuv[0, 0] = torch.tensor([0, 3, 3, 5])
    iuv[0, 1:, 0, 1:] = 0.5
    part_pred = torch.tensor([[[0, 3, 3, 4]]])
    uv_pred = torch.full((1, 2, 1, 4), 0.5)
    uv_pred[0, 0, 0, 2] = 0.9  # right part, uv off by 0.4
    m = metrics.densepose_metrics(part_pred, uv_pred, iuv)
    assert abs(m["part_acc"] - 200 / 3) < 1e-4 and abs(m["uv_acc"] - 100 / 3) < 1e-4
    gps = (1 + torch.exp(torch.tensor(-0.16 / 0.02)).item()) / 3 * 100
    assert abs(m["gps"] - gps) < 1e-3


def test_image_counts_add_up_to_the_confusion_matrix_miou():
    """Summed over any set of images, the per-image counts give that set's mIoU, as the confusion matrix does."""
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 6, (12, 16, 16), generator=g)
    label[0, :3] = 255
    pred = torch.where(torch.rand(12, 16, 16, generator=g) < 0.6, label.clamp(max=5), torch.randint(0, 6, (12, 16, 16)))
    counts = metrics.image_counts(pred, label)
    assert counts.shape == (12, 3, NUM_CLASSES)
    for images in (range(12), [0, 3, 3, 7]):
        images = list(images)
        want = metrics.segmentation_metrics(pred[images], label[images])["miou"]
        assert abs(metrics.miou_of_counts(counts[images]).item() - want) < 1e-4
