"""cli.py: options from a dataclass, the cosine schedule and atomic writes."""
import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

import cli


@dataclass
class Options:
    kind: Literal["a", "b"] = "a"  # which kind; a '#' in a string below is no comment
    stage: Literal[1, 2] = 2
    steps: int | None = None  # instead of epochs
    rate: float = 0.5  # 100 % = 1
    cache: bool = True  # keep it in memory
    name: str = "x # y"


def parse(argv, defaults=True):
    parser = argparse.ArgumentParser()
    cli.add_options(parser, Options, defaults)
    return vars(parser.parse_args(argv))


def test_options_follow_the_field_types():
    assert parse([]) == dict(kind="a", stage=2, steps=None, rate=0.5, cache=True, name="x # y")
    assert parse(["--kind", "b", "--stage", "1", "--steps", "7", "--rate", "2e-3", "--no-cache"]) == dict(
        kind="b", stage=1, steps=7, rate=2e-3, cache=False, name="x # y")
    for bad in (["--kind", "c"], ["--stage", "3"], ["--steps", "x"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_without_defaults_only_the_given_options_are_parsed():
    """What lets a preset fill every option the command line leaves out."""
    assert parse([], defaults=False) == {}
    assert parse(["--steps", "3", "--cache"], defaults=False) == dict(steps=3, cache=True)


def test_help_is_each_fields_comment_and_its_default():
    """--help reads the `# comment` ending each field's line and adds the default (a preset's values when given)."""
    assert cli.field_comments(Options) == {"kind": "which kind; a '#' in a string below is no comment",
                                           "steps": "instead of epochs", "rate": "100 % = 1", "cache": "keep it in memory"}
    for defaults, shown, rate in ((True, None, "(default: 0.5)"), (False, {"rate": "0.5, paper 0.1"},
                                                                    "(default: 0.5, paper 0.1)")):
        parser = argparse.ArgumentParser()
        cli.add_options(parser, Options, defaults, shown)
        text = {a.dest: a.help % {} for a in parser._actions if a.dest != "help"}
        assert text == {"kind": "which kind; a '#' in a string below is no comment (default: a)",
                        "stage": "(default: 2)", "steps": "instead of epochs", "rate": f"100 % = 1 {rate}",
                        "cache": "keep it in memory (default: True)", "name": "(default: x # y)"}


@dataclass
class Inner:
    size: int = 3  # of the inner part
    depth: int = 2  # not an option


@dataclass
class Outer:
    name: str = "x"  # the outer's
    inner: Inner = field(default_factory=lambda: Inner(size=5))  # the inner part


def test_a_nested_dataclass_gives_the_named_fields_as_options_in_its_place():
    """The fields of a nested config that `nested` names are options under their own names, where the field stands,
    with their own comments and the outer default's values; the nested field itself is none."""
    parser = argparse.ArgumentParser()
    cli.add_options(parser, Outer, nested={"inner": ("size",)})
    assert vars(parser.parse_args([])) == dict(name="x", size=5)
    assert vars(parser.parse_args(["--size", "7"])) == dict(name="x", size=7)
    assert {a.dest: a.help for a in parser._actions if a.dest != "help"} == {
        "name": "the outer's (default: x)", "size": "of the inner part (default: 5)"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--depth", "1"])


def test_checks_name_the_option_and_its_value():
    assert cli.positive(Options(rate=0.0), ("rate",)) == [(False, "--rate must be positive, got 0.0")]
    assert cli.non_negative(Options(rate=-1.0), ("rate",)) == [(False, "--rate must be 0 or more, got -1.0")]
    assert cli.non_negative(Options(rate=0.0), ("rate",))[0][0]


def test_set_lr_sets_every_parameter_group():
    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters(), "lr": 0.5}], lr=0.1)
    cli.set_lr(optimizer, 0.02)
    assert [group["lr"] for group in optimizer.param_groups] == [0.02, 0.02]


def test_cosine_lr_warms_up_linearly_then_falls_to_zero():
    lrs = [cli.cosine_lr(1.0, step, 100, warmup=10) for step in range(100)]
    assert lrs[:3] == pytest.approx([0.1 * k * 0.5 * (1 + math.cos(math.pi * (k - 1) / 100)) for k in (1, 2, 3)])
    assert lrs[10] == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 100)))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3
    assert cli.cosine_lr(2.0, 0, 100) == 2.0  # no warm-up


def test_a_json_write_that_fails_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path):
    path = tmp_path / "metrics.json"
    cli.save_json({"miou": 1.0}, path)
    with pytest.raises(TypeError):
        cli.save_json({"miou": 2.0, "model": object()}, path)  # fails half-way through the dump
    assert json.loads(path.read_text()) == {"miou": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
