"""Execute the notebooks in place, so that the repository stores them with their outputs (what a reader sees on a
code-hosting site without running anything):

    python notebooks/refresh.py                      # all six
    python notebooks/refresh.py 02_sample_level      # some

Notebooks 03-06 read the full experiment run, runs/experiments/results.json (`python experiments.py`); without it
they would store the numbers of a `--quick` smoke run, so they are refused then. Progress bars are off (they would
fill the stored output), the repository's absolute path becomes '.', and the cells' execution timestamps go.
"""
import argparse
import os
import sys

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(NOTEBOOKS)
READS_EXPERIMENTS = ("03", "04", "05", "06")  # the notebooks that read runs/experiments


def strip(nb):
    """The machine out of an executed notebook: ROOT in any text output becomes '.', execution timestamps go."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = out["text"].replace(ROOT, ".")
            for kind, value in out.get("data", {}).items():
                if kind.startswith("text/") and isinstance(value, str):
                    out["data"][kind] = value.replace(ROOT, ".")
    return nb


def main(argv=None):
    names = sorted(n[:-len(".ipynb")] for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"notebooks to execute (default: all): {names}")
    args = parser.parse_args(argv)
    chosen = args.names or names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"no notebook {', '.join(unknown)} in {NOTEBOOKS} (there are {', '.join(names)})")
    full = os.path.join(ROOT, "runs", "experiments", "results.json")
    if not os.path.exists(full) and any(n.startswith(READS_EXPERIMENTS) for n in chosen):
        parser.error(f"{full} not found: run `python experiments.py` first (notebooks 03-06 show its results)")
    os.environ["TQDM_DISABLE"] = "1"  # the kernel inherits it
    for name in chosen:
        path = os.path.join(NOTEBOOKS, f"{name}.ipynb")
        nb = nbformat.read(path, as_version=4)
        print(f"executing {name} ...", flush=True)
        NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
        nbformat.write(strip(nb), path)
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1:])
