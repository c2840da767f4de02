"""What every notebook runs first. Importing this file (the kernel starts in notebooks/) makes the repository root
the working directory and puts it on sys.path, so that a notebook imports the project's modules and reads and
writes runs/ as the command lines do. Also the results folder the notebooks read, and the drawing they share beside
synthetic.parts_image and synthetic.draw_skeleton: depth with its holes blank, embeddings on principal axes."""
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
sys.path.insert(0, ROOT)


def experiment_results():
    """The folder of the experiments' results.json: runs/experiments (the full run) if it holds one, else
    runs/quick-experiments, where the quick experiments are run first if it holds none either."""
    results = "runs/experiments"
    if not os.path.exists(f"{results}/results.json"):
        results = "runs/quick-experiments"
        if not os.path.exists(f"{results}/results.json"):
            import experiments  # only here: importing common should not load the training code
            experiments.main(["--quick", "--out", results, "--jobs", "1"])
    return results


def run_folder(results, runs, **fields):
    """The folder of the one run in results.json's `runs` whose fields (experiments.Run's) have these values."""
    found = [r["folder"] for r in runs if all(r[k] == v for k, v in fields.items())]
    assert len(found) == 1, f"{len(found)} runs with {fields}"
    return os.path.join(results, found[0])


def show_depth(ax, depth):
    """Depth [1, H, W] in metres on a matplotlib axis, in the turbo colour map; holes (0: no measurement) blank."""
    return ax.imshow(np.ma.masked_equal(depth[0].numpy(), 0), cmap="turbo")


def principal_components(x, q):
    """x [N, D] centred and projected on its first q principal axes (torch.pca_lowrank) -> [N, q]."""
    x = x - x.mean(0)
    _, _, V = torch.pca_lowrank(x, q=q, center=False)
    return x @ V
