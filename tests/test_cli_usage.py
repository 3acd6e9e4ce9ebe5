"""Command-line mistakes and broken plugins: one line, a non-zero exit, no traceback."""
from __future__ import annotations

import pytest

import soarbench


def _one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("args,message,usage", [
    (["train", "--confg", "x.toml", "--out", "r"], "No such option: --confg (Possible options: --config)",
     "soarbench train [OPTIONS]"),
    (["trian"], "No such command 'trian'. Did you mean 'train'?", "soarbench [OPTIONS] COMMAND [ARGS]..."),
    (["train", "--out", "r"], "Missing option '--config'.", "soarbench train [OPTIONS]"),
    (["eval", "--model", "m", "--benchmark", "shapes", "--out", "e", "--batch-size", "many"],
     "Invalid value for '--batch-size'", "soarbench eval [OPTIONS]"),
])
def test_a_usage_error_is_one_line_with_the_usage_and_exit_2(cli, args, message, usage):
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    line = _one_line(err)
    assert line.startswith(f"error: {message}"), line
    command = "soarbench" if args[0] == "trian" else f"soarbench {args[0]}"
    assert line.endswith(f"(usage: {usage}; see '{command} --help')"), line


def test_an_option_without_its_value_is_one_line(cli):
    code, _, err = cli("train", "--config")
    assert (code, _one_line(err)) == (2, "error: Option '--config' requires an argument.")


def test_version_prints_the_package_version(cli):
    assert cli("--version") == (0, f"soarbench {soarbench.__version__}", "")
    assert soarbench.__version__ == "0.1.0"  # the same as pyproject.toml's


def test_the_installed_command_types_one_line_not_a_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "soarbench", "train", "--confg", "x"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: No such option: --confg (Possible options: --config) (usage: soarbench train [OPTIONS]; "
        "see 'soarbench train --help')"]


# ------------------------------------------------------------------------------------------------ plugins
@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    """plugin(name, source): a module on sys.path named in $SOARBENCH_PLUGINS; returns its file."""
    import sys

    def make(name: str, source: str):
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("SOARBENCH_PLUGINS", name)
        monkeypatch.delitem(sys.modules, name, raising=False)
        return path

    return make


def test_a_plugin_raising_at_import_is_one_line_naming_module_and_line(cli, plugin):
    path = plugin("sb_plugin_raises", "import os\n\nraise RuntimeError('no GPU budget configured')\n")
    code, _, err = cli("metrics", "list")
    assert code == 2
    assert _one_line(err) == (f"error: plugin 'sb_plugin_raises' (SOARBENCH_PLUGINS or the soarbench.plugins entry "
                              f"point) failed while being imported: {path}:3: RuntimeError: no GPU budget configured; "
                              f"fix the module or remove it from SOARBENCH_PLUGINS")


def test_a_plugin_with_a_syntax_error_is_one_line(cli, plugin):
    plugin("sb_plugin_syntax", "def broken(:\n    pass\n")
    code, _, err = cli("metrics", "list")
    assert code == 2
    line = _one_line(err)
    assert line.startswith("error: plugin 'sb_plugin_syntax' (SOARBENCH_PLUGINS or the soarbench.plugins entry point) "
                           "failed while being imported: SyntaxError: ")
    assert "(sb_plugin_syntax.py, line 1)" in line


def test_a_missing_plugin_module_is_one_line(cli, plugin, monkeypatch):
    monkeypatch.setenv("SOARBENCH_PLUGINS", "sb_plugin_nowhere")
    code, _, err = cli("metrics", "list")
    assert code == 2
    assert _one_line(err) == ("error: plugin 'sb_plugin_nowhere' (SOARBENCH_PLUGINS or the soarbench.plugins entry "
                              "point) could not be imported: No module named 'sb_plugin_nowhere'")


def test_env_and_version_still_run_beside_a_broken_plugin(cli, plugin):
    import json

    plugin("sb_plugin_raises_too", "raise ValueError('bad')\n")
    code, out, err = cli("env")
    assert code == 0 and "versions" in json.loads(out)
    assert _one_line(err).startswith("warning: plugin 'sb_plugin_raises_too' (SOARBENCH_PLUGINS")
    assert err.endswith("ValueError: bad; fix the module or remove it from SOARBENCH_PLUGINS")
    code, out, err = cli("--version")
    assert (code, out) == (0, f"soarbench {soarbench.__version__}") and err.startswith("warning: plugin")
