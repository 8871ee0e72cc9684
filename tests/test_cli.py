"""The command line's own exit paths: a stop from outside (Ctrl-C, SIGTERM) ends with its status and one word."""
from __future__ import annotations

import pytest

import cli
from engine.stops import Terminated, stop_status


@pytest.mark.parametrize("exc, code, word", [(KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
                                             (Terminated(), 143, "terminated (SIGTERM)")])
def test_a_stop_from_outside_exits_with_its_status(monkeypatch, capsys, tmp_path, exc, code, word):
    def stopped(args):
        raise exc
    monkeypatch.setitem(cli.HANDLERS, "inspect", stopped)
    assert cli.main(["inspect", str(tmp_path / "store.h5")]) == code
    assert capsys.readouterr().err == word + "\n"
    assert stop_status(exc) == (code, word)
