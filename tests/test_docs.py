"""What the documents state holds: docs/own-dataset.md's code runs as written (its blocks executed in order, in a
fresh folder); the README's BibTeX and CITATION.cff cite the same paper under the licence in LICENSE; the code
parses as the oldest Python the README names."""
import ast
import inspect
import json
import re

import numpy as np
import pytest
import torch
import yaml

import synthetic
from conftest import ROOT


def python_blocks(doc):
    return re.findall(r"^```python\n(.*?)^```", (ROOT / doc).read_text(), flags=re.S | re.M)


@pytest.mark.slow
def test_own_dataset_page_pretrains_on_the_folder_it_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks("docs/own-dataset.md")
    assert len(blocks) == 3
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/own-dataset.md", "exec"), namespace)
    # the class reads back what was written: metres, the mask, the keypoints, depth only where it was written
    people, mine = synthetic.SyntheticHumans(16, image_size=96, seed=0), namespace["MyPeople"]("my_people")
    assert len(mine) == 16
    with_depth, without = mine[0], mine[1]
    torch.testing.assert_close(with_depth["depth"], people[0]["depth"], atol=6e-4, rtol=0)  # rounded to 1 mm
    assert torch.equal(with_depth["mask"], people[0]["mask"]) and with_depth["present"]["depth"]
    torch.testing.assert_close(with_depth["keypoints"], people[0]["keypoints"])
    assert torch.equal(without["keypoints_visible"], people[1]["keypoints_visible"])
    assert "depth" not in without and not without["present"]["depth"]
    assert np.abs(with_depth["rgb"].numpy() - people[0]["rgb"].numpy()).mean() < 0.05  # JPEG
    # both stages trained on these 16 people: one memory-bank row each, not the synthetic preset's 4,096
    for stage in (1, 2):
        ckpt = torch.load(tmp_path / "runs" / "my_people" / f"stage{stage}.pt", weights_only=True)
        assert ckpt["done"] and ckpt["step"] == 2 and ckpt["config"]["model"]["bank_size"] == 16
    rows = [json.loads(line) for line in (tmp_path / "runs" / "my_people" / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r) and rows[-2]["dense"] > 0  # depth was mixed in


def test_readme_bibtex_and_citation_file_cite_the_same_paper_under_the_mit_licence():
    readme = (ROOT / "README.md").read_text()
    bib = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?$", re.search(r"```bibtex\n(.*?)```", readme, re.S).group(1), re.M))
    paper = yaml.safe_load((ROOT / "CITATION.cff").read_text())["preferred-citation"]
    assert bib["title"] == paper["title"] and bib["booktitle"] == paper["collection-title"]
    assert bib["author"] == " and ".join(f"{a['family-names']}, {a['given-names']}" for a in paper["authors"])
    assert bib["pages"] == f"{paper['start']}--{paper['end']}" and bib["year"] == str(paper["year"])
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["license"] == "MIT"


def test_the_code_parses_as_the_oldest_python_the_readme_names():
    oldest = re.search(r"Python (3\.\d+) or newer", (ROOT / "README.md").read_text()).group(1)
    for path in [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("notebooks/*.py")]:
        ast.parse(path.read_text(), str(path), feature_version=tuple(map(int, oldest.split("."))))


def test_the_fast_part_the_readme_names_runs_no_notebook():
    """`python -m pytest -q -m "not slow"` leaves out every test that executes a notebook."""
    import test_notebooks
    tests = [f for name, f in vars(test_notebooks).items() if name.startswith("test_") and callable(f)]
    executing = [f for f in tests if "NotebookClient(" in inspect.getsource(f)]
    assert executing and all("slow" in {m.name for m in getattr(f, "pytestmark", [])} for f in executing)
    assert '-m "not slow"' in (ROOT / "README.md").read_text()
