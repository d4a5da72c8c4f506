"""Every option of ``train``, ``evaluate`` and ``study`` passes through torchrun unchanged.

torchrun's parser (torch/distributed/run.py ``get_args_parser``) allows abbreviations and classifies every
argument after ``-m petl_surgery`` as well: an option of ours that is a prefix of one of its options stops
the launch ("ambiguous option: --log could match --log-dir, ...") or is taken for that option. Checked
against the parser of the installed torch, so that an option added later cannot clash unnoticed."""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Dict, List

import pytest
from torch.distributed.run import get_args_parser

from petl_surgery import cli

COMMANDS = ("train", "evaluate", "study")


def our_options() -> Dict[str, List[str]]:
    """Option strings per command (the top-level parser's included), the hidden deprecated ones left out."""
    parser = cli.build_parser()
    top = [s for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS for s in a.option_strings]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {
        name: top + [s for a in commands[name]._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
        for name in COMMANDS
    }


def torchrun_options() -> List[str]:
    return [s for action in get_args_parser()._actions for s in action.option_strings]


@pytest.mark.parametrize("command", COMMANDS)
def test_no_option_is_an_abbreviation_of_a_torchrun_option(command):
    theirs = torchrun_options()
    clashes = {ours: [t for t in theirs if t != ours and t.startswith(ours)] for ours in our_options()[command]
               if ours.startswith("--")}
    assert {ours: found for ours, found in clashes.items() if found} == {}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_reaches_petl_surgery_unchanged_through_torchruns_parser(command):
    for option in our_options()[command]:
        for tail in ([option, "1"], [f"{option}=1"] if option.startswith("--") else [f"{option}1"]):
            ours = [command, "MODEL", *tail]
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                try:
                    parsed = get_args_parser().parse_args(["--nproc_per_node", "2", "-m", "petl_surgery", *ours])
                except SystemExit:
                    pytest.fail(f"torchrun's parser stops at {' '.join(tail)}: {stderr.getvalue().splitlines()[-1]}")
            assert (parsed.training_script, parsed.training_script_args) == ("petl_surgery", ours)


def test_the_log_option_is_log_file_and_the_old_spelling_still_works_with_a_warning():
    parser = cli.build_parser()
    assert parser.parse_args(["train", "m", "--data", "d", "--log-file", "run.json"]).log == "run.json"
    with pytest.warns(FutureWarning, match="--log is deprecated, use --log-file"):
        assert parser.parse_args(["train", "m", "--data", "d", "--log", "old.json"]).log == "old.json"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit):
        get_args_parser().parse_args(["--nproc_per_node", "2", "-m", "petl_surgery", "train", "m", "--log", "x"])
    assert "ambiguous option: --log" in stderr.getvalue()  # why it was renamed
