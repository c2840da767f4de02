"""The downstream metrics, in percent: human parsing (mIoU, mAcc, aAcc and per-class IoU from a confusion matrix;
per-image counts from which any set of test images gives its mIoU, for the experiment runner's bootstraps), 3D pose
(acc@10cm, MPJPE) and dense pose (part and uv accuracy, a GPS-style score).
"""
import torch

from schema import IGNORE, NUM_CLASSES, PART_NAMES


def confusion_matrix(pred, label, num_classes=NUM_CLASSES, ignore=IGNORE):
    """[K, K] counts, rows = ground truth, columns = prediction; `ignore` pixels are left out."""
    keep = label != ignore
    return torch.bincount(label[keep] * num_classes + pred[keep], minlength=num_classes ** 2).view(num_classes, -1)


def parsing_metrics(cm):
    """From a confusion matrix C (rows truth): IoU_k = C_kk / (sum_j C_kj + sum_i C_ik - C_kk),
    mIoU = mean_k IoU_k, mAcc = mean_k C_kk / sum_j C_kj, aAcc = sum_k C_kk / sum C, over the classes that occur
    in the ground truth; in percent."""
    cm = cm.double()
    tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    seen = gt > 0
    iou = tp / (gt + pred - tp).clamp(min=1)
    return {"miou": 100 * iou[seen].mean().item(), "macc": 100 * (tp[seen] / gt[seen]).mean().item(),
            "aacc": 100 * (tp.sum() / cm.sum()).item(),
            "iou": {PART_NAMES[k]: round(100 * iou[k].item(), 2) for k in range(len(cm)) if seen[k]}}


def segmentation_metrics(pred, label):
    """parsing_metrics of predicted part maps against the labels, both [N, H, W], and their image_counts under
    'per_image' (finetune.write_metrics saves those apart, for experiments.image_bootstrap)."""
    return dict(parsing_metrics(confusion_matrix(pred, label)), per_image=image_counts(pred, label))


def image_counts(pred, label, num_classes=NUM_CLASSES, ignore=IGNORE):
    """Per image and class: pixels of the intersection of prediction and truth, of their union, and of the truth.
    pred, label [N, H, W] -> [N, 3, K] long; summed over any set of images they give that set's IoUs."""
    classes = torch.arange(num_classes, device=pred.device).view(1, -1, 1, 1)
    counts = []
    for p, t in zip(pred.split(64), label.split(64)):
        keep = (t != ignore)[:, None]
        p, t = (p[:, None] == classes) & keep, (t[:, None] == classes) & keep  # [n, K, H, W]
        counts.append(torch.stack([(p & t).sum((2, 3)), (p | t).sum((2, 3)), t.sum((2, 3))], 1))
    return torch.cat(counts)


def miou_of_counts(counts):
    """mIoU (%) of summed image_counts [..., N, 3, K] over the classes in the truth -> [...]."""
    inter, union, truth = counts.sum(-3).unbind(-2)
    iou = inter / union.clamp(min=1)
    seen = truth > 0
    return 100 * (iou * seen).sum(-1) / seen.sum(-1)


def pose_metrics(pred, gt):
    """pred, gt [N, J, 3] metres: acc@10cm = share of joints with ||pred - gt|| < 0.1 m (ITOP's mAP),
    MPJPE = mean ||pred - gt|| in cm."""
    err = (pred - gt).norm(dim=-1)
    return {"acc10cm": 100 * (err < 0.1).float().mean().item(), "mpjpe_cm": 100 * err.mean().item()}


def densepose_metrics(part_pred, uv_pred, iuv, threshold=0.1, kappa=0.1):
    """On body pixels (iuv part > 0): part_acc = share with the right part; uv_acc = share with the right part and
    ||uv - uv*|| < threshold; GPS-style score = mean of exp(-||uv - uv*||^2 / (2 kappa^2)) with 0 for a wrong part
    (DensePose's geodesic point similarity with the uv distance standing in for the geodesic one). Percent."""
    part = iuv[:, 0].long()
    body = part > 0
    right = (part_pred == part) & body
    d = (uv_pred - iuv[:, 1:]).norm(dim=1)
    n = body.sum().clamp(min=1)
    return {"part_acc": 100 * (right.sum() / n).item(), "uv_acc": 100 * ((right & (d < threshold)).sum() / n).item(),
            "gps": 100 * ((torch.exp(-d ** 2 / (2 * kappa ** 2)) * right).sum() / n).item()}


def dense_pose_scores(pred, iuv):
    """densepose_metrics of the predicted (parts [N, H, W], uv [N, 2, H, W]) against iuv [N, 3, H, W]."""
    return densepose_metrics(*pred, iuv)
