"""Every command line's ``--help`` (and each subcommand's) renders: help texts come from config fields, and a
stray ``%`` in one of them made argparse raise instead of printing the help."""

from __future__ import annotations

import argparse
import importlib

import pytest

ENTRY_POINTS = [
    "erasure.cli", "erasure.ddpm.cli", "erasure.ddpm.train_model", "erasure.classification.cli",
    "erasure.shapes.make_prompts", "erasure.shapes.train_judge", "erasure.shapes.train_model",
    "erasure_eval.cli", "erasure_app.main",
]


def _subcommands(argv: list[str], main) -> list[list[str]]:
    """``argv`` plus one ``argv + [name]`` per subcommand of the parser ``main`` builds (found by capturing it)."""
    seen: list[argparse.ArgumentParser] = []
    orig = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            main(argv)
    finally:
        argparse.ArgumentParser.parse_args = orig
    out = [argv]
    for parser in seen[:1]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                out += [argv + [name] for name in action.choices]
    return out


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_renders(module, capsys):
    main = importlib.import_module(module).main
    for argv in _subcommands([], main):
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--help"])
        assert exc.value.code == 0, (module, argv)
        out = capsys.readouterr().out
        assert "usage:" in out and "--help" in out, (module, argv)
