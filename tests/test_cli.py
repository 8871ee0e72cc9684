"""The command line's own behaviour: a stop from outside (Ctrl-C, SIGTERM) ends with its status and one word;
the engine's commands start numpy with one OpenBLAS thread; run as a script, a command imports its modules
with the garbage collector off; a command whose output is no longer read ends quietly."""
from __future__ import annotations

import gc
import json
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


def test_a_script_run_imports_its_command_without_the_collector_then_collects_the_rest(monkeypatch, tmp_path):
    # cli.py run as a script sets the flag and turns the collector off; a command's module then imports with
    # it off, and the command runs with it on and the imported objects frozen out of its collections
    (tmp_path / "gc_probe_command.py").write_text(
        "import gc\nSEEN = {'at_import': gc.isenabled()}\n"
        "def run():\n    SEEN['at_run'] = gc.isenabled()\n    SEEN['frozen'] = gc.get_freeze_count()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "_GC_OFF_FOR_IMPORTS", True)
    frozen_before = gc.get_freeze_count()
    gc.disable()
    try:
        assert cli._call("gc_probe_command", "run") == 0
    finally:
        gc.unfreeze()
        gc.enable()
    seen = sys.modules["gc_probe_command"].SEEN
    assert seen["at_import"] is False and seen["at_run"] is True
    assert seen["frozen"] > frozen_before
    assert cli._GC_OFF_FOR_IMPORTS is False                  # once per process


def test_calling_main_in_a_process_leaves_its_collector_alone(tmp_path):
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    assert cli.main(["inspect", "--data", "phantom", "--json"]) == 0
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_the_script_turns_the_collector_off_until_the_command_is_imported(tmp_path):
    # cli.py as __main__ in a fresh interpreter, its command's module a stand-in that reports the collector
    script = ("import gc, importlib, runpy, sys, types\n"
              "def describe(*a, **k):\n"
              "    print('run', gc.isenabled(), gc.get_freeze_count() > 0, flush=True)\n"
              "def stand_in(name):\n"
              "    print('import', gc.isenabled(), flush=True)\n"
              "    return types.SimpleNamespace(describe=describe)\n"
              "importlib.import_module = stand_in\n"
              "sys.argv = ['cli.py', 'inspect', '--data', 'phantom']\n"
              f"runpy.run_path({str(ROOT / 'cli.py')!r}, run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.split("\n")[:2] == ["import False", "run True True"], \
        out.stdout + out.stderr


def _script_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest.mark.parametrize("command", [["inspect", "--data", "phantom:2"],
                                     ["inspect", "--data", "phantom:2", "--json"]])
def test_a_closed_output_ends_the_command_quietly(tmp_path, command):
    # `cli.py inspect ... | head`: the reader is gone before the command writes; no error line, no traceback,
    # the status a shell gives a tool that SIGPIPE ended
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *command], cwd=tmp_path, env=_script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == cli.EXIT_OUTPUT_CLOSED == 141
    assert err == ""


def test_a_broken_pipe_of_the_commands_own_keeps_its_error_line(monkeypatch, capsys, tmp_path):
    # the output is still read (captured here): a broken pipe from the work itself is an error like any other
    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setitem(cli.HANDLERS, "inspect", broken)
    assert cli.main(["inspect", str(tmp_path / "store.h5")]) == 1
    assert capsys.readouterr().err == "inspect: Broken pipe (errno 32)\n"


def test_closed_outputs_tells_a_pipe_without_reader_from_one_with(monkeypatch, tmp_path):
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as out, open(tmp_path / "err.txt", "w") as err:
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        assert cli.closed_outputs() == []
        os.close(read_end)
        assert cli.closed_outputs() == [out]


def test_a_preprocess_whose_output_is_closed_completes_its_store(tmp_path):
    # `cli.py preprocess ... 2>&1 | head`: the reader is gone from the start; the store is built and marked
    # complete, and the command's own status (0) stands
    store = tmp_path / "s.h5"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "preprocess", "--input", "phantom:2",
                               "--threads", "2", "--out", str(store)], cwd=tmp_path, env=_script_env(),
                              stdout=write_end, stderr=write_end, timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == 0
    report = subprocess.run([sys.executable, str(ROOT / "cli.py"), "inspect", str(store), "--json", "--quick"],
                            cwd=tmp_path, env=_script_env(), capture_output=True, text=True, timeout=120)
    info = json.loads(report.stdout)
    assert info["complete"] is True and info["slices"] == 78, report.stdout + report.stderr


def test_version_names_the_project_its_code_and_its_libraries(capsys):
    from engine.runinfo import source_digest
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    own, libs = capsys.readouterr().out.splitlines()
    assert own.startswith("slic-alpnet ") and own.endswith(f", sources {source_digest()})") and "(git " in own
    assert libs.startswith("python ") and ", torch " in libs and ", numba " in libs and ", h5py " in libs
