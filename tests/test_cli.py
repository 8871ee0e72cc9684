"""The command line's own behaviour: a stop from outside (Ctrl-C, SIGTERM) ends with its status and one word;
the engine's commands start numpy with one OpenBLAS thread."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from engine.stops import Terminated, stop_status

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("exc, code, word", [(KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
                                             (Terminated(), 143, "terminated (SIGTERM)")])
def test_a_stop_from_outside_exits_with_its_status(monkeypatch, capsys, tmp_path, exc, code, word):
    def stopped(args):
        raise exc
    monkeypatch.setitem(cli.HANDLERS, "inspect", stopped)
    assert cli.main(["inspect", str(tmp_path / "store.h5")]) == code
    assert capsys.readouterr().err == word + "\n"
    assert stop_status(exc) == (code, word)


@pytest.mark.parametrize("command, user_value, expected", [
    (["inspect", "missing.h5"], None, "1"),               # the engine's commands: one OpenBLAS thread
    (["inspect", "missing.h5"], "3", "3"),                # unless the user chose a number
    (["train", "--config", "missing.yaml"], None, None),  # torch's commands keep the defaults
])
def test_engine_commands_start_numpy_with_one_blas_thread(tmp_path, command, user_value, expected):
    # a fresh interpreter (the variable only counts when set before numpy is first imported), in tmp_path
    script = ("import os, sys, cli\n"
              f"try:\n    cli.main({command!r})\nexcept SystemExit:\n    pass\n"
              "print('numpy' in sys.modules, os.environ.get('OPENBLAS_NUM_THREADS'))\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if user_value is not None:
        env["OPENBLAS_NUM_THREADS"] = user_value
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    loaded, value = out.stdout.split()[-2:]
    assert value == str(expected), out.stdout + out.stderr
    if command[0] == "inspect":
        assert loaded == "True"                       # numpy came after the setting, in the same process
