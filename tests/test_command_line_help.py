"""`--help` explains every flag with its default, for the script and for its tools."""

import pytest

import textual_inversion as ti
from conftest import import_tool

PARSERS = {
    "textual_inversion.py": ti.build_parser,
    "tools/generate.py": import_tool("generate").build_parser,
    "tools/evaluate.py": import_tool("evaluate").build_parser,
}


@pytest.mark.parametrize("script", PARSERS)
def test_every_flag_has_help_that_gives_its_default(script):
    parser = PARSERS[script]()
    flags = [action for action in parser._actions if action.dest != "help"]
    assert flags
    for action in flags:
        help_text = parser._get_formatter()._expand_help(action) if action.help else ""
        assert help_text, f"{script} {action.option_strings[0]} has no help"
        if action.required:
            assert "(required)" in help_text, (script, action.option_strings, help_text)
        else:
            assert "(default:" in help_text, (script, action.option_strings, help_text)
            assert "None" not in help_text, (script, action.option_strings, help_text)


def test_help_shows_the_tutorial_defaults_and_names_both_tools(capsys):
    with pytest.raises(SystemExit):
        ti.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: <my-funny-cat-token>)" in help_text
    assert "(default: cat)" in help_text
    assert "(default: 50)" in help_text and "(default: 0.0001)" in help_text
    assert "tools/generate.py" in help_text and "tools/evaluate.py" in help_text
