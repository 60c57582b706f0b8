"""The command line's reporting discipline, in process: one line per warning and error, hints in the command line's
spelling, the shared model options on every command that loads a model."""
from __future__ import annotations

import warnings

import pytest

from glip_data.report import EXIT_FAILURE, EXIT_USAGE, cli_spelling, run_command
from glip_train.cli import build_parser


def _subparser(name):
    return build_parser()._subparsers._group_actions[0].choices[name]


def test_library_warnings_reach_the_user_as_one_line(capsys):
    def work():
        warnings.warn("first line\n  second line", UserWarning)
        warnings.warn("an API detail", DeprecationWarning)  # for developers: not shown
        warnings.warn("an API detail", FutureWarning)
        return 0

    assert run_command("glip detect", work) == 0
    assert capsys.readouterr().err == "glip detect: warning: first line; second line\n"


def test_errors_are_one_line_with_the_right_exit_code(capsys, monkeypatch):
    monkeypatch.delenv("GLIP_DEBUG", raising=False)

    def bad_input():
        raise FileNotFoundError("x.json: no such file (pass on_bad_image='skip' to go on)")

    def broken():
        raise KeyError("boom")

    assert run_command("glip eval", bad_input, parser=_subparser("eval")) == EXIT_USAGE
    assert capsys.readouterr().err == "glip eval: error: x.json: no such file (pass --on-bad-image skip to go on)\n"
    assert run_command("glip eval", broken) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("glip eval: failed: internal error (KeyError): 'boom'") and len(err.splitlines()) == 1


def test_hints_use_the_spelling_of_the_command_line():
    message = "refuses it (pass trust_pickle=True only for files you trust); pass on_bad_image='skip' to go on"
    assert cli_spelling(message) == ("refuses it (pass --trust-pickle only for files you trust); pass "
                                     "--on-bad-image skip to go on")
    # a command without the option keeps the Python spelling rather than suggest a flag it does not have
    assert cli_spelling(message, _subparser("train")) == message
    assert "pass --trust-pickle only" in cli_spelling(message, _subparser("pseudo-label"))


@pytest.mark.parametrize("command", ["detect", "ground", "eval", "pseudo-label", "export"])
def test_every_command_that_loads_a_model_has_the_same_model_options(command):
    options = {s for a in _subparser(command)._actions for s in a.option_strings}
    assert {"--weights", "--adapter", "--use-ema", "--trust-pickle"} <= options
    assert ("--device" in options) == (command != "export")  # an export is traced on the CPU
    help_text = _subparser(command).format_help()
    assert "'default'" in help_text and "$GLIP_WEIGHTS" in help_text and "exit codes: 0 success" in help_text
