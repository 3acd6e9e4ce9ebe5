"""One writer per --out folder: a second train / eval / run is refused naming the live process; a dead one's lock is
taken over with a line saying so."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import soarbench  # noqa: F401
from soarbench.errors import UserError
from soarbench.harness.lock import LOCK_FILE, FolderLock

HOLD = """
import sys, time
from soarbench.harness.lock import FolderLock
FolderLock(sys.argv[1], command="soarbench train --out " + sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture()
def holder(tmp_path):
    """holder(folder, **env): another process holding the folder's lock; killed at the end of the test."""
    procs = []

    def start(folder: Path, **env) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, **env})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _commands(tmp_path: Path, tiny_model_dir: Path, out: Path) -> dict[str, list]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{tiny_model_dir}"\n[data]\njsonl = "{tmp_path / "d.jsonl"}"\n'
                   f'[method]\nname = "sft"\n[budget]\namount = 8\n')
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[common.model]\npath = "{tiny_model_dir}"\n[runs.sft]\nmethod = {{ name = "sft" }}\n')
    return {"train": ["train", "--config", cfg, "--out", out],
            "eval": ["eval", "--model", tiny_model_dir, "--benchmark", "shapes", "--out", out],
            "run": ["run", exp, "--out", out]}


@pytest.fixture()
def no_model_loads(monkeypatch):
    from soarbench.models.sd3 import SD3Adapter

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded in a folder another process holds")

    monkeypatch.setattr(SD3Adapter, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize("command", ["train", "eval", "run"])
def test_a_second_writer_is_refused_naming_the_live_process(tmp_path, tiny_model_dir, cli, holder, no_model_loads,
                                                             command):
    out = tmp_path / "out"
    proc = holder(out)
    code, _, err = cli(*_commands(tmp_path, tiny_model_dir, out)[command])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {out}: in use by pid {proc.pid} on {socket.gethostname()} "
                          f"(`soarbench train --out {out}`, since 20"), err
    assert err.endswith("wait for it to finish or stop it, or choose another --out")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of the holder's was touched
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid


def test_the_installed_command_is_refused_in_a_real_second_process(tmp_path, tiny_model_dir, holder):
    out = tmp_path / "out"
    proc = holder(out)
    args = _commands(tmp_path, tiny_model_dir, out)["train"]
    second = subprocess.run([sys.executable, "-m", "soarbench", *map(str, args)], capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2
    assert second.stderr.startswith(f"error: {out}: in use by pid {proc.pid} ") and "Traceback" not in second.stderr


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_line(tmp_path, tiny_model_dir, cli, no_model_loads,
                                                                  monkeypatch):
    monkeypatch.setenv("SOARBENCH_REWARD_CKPTS", str(tmp_path / "ckpts"))
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "soarbench eval",
                                             "started": "2026-01-01 00:00:00 UTC", "launch": None}))
    # missing metric weights fail right after the lock is taken: no model is needed to see the takeover
    code, _, err = cli("eval", "--model", tiny_model_dir, "--benchmark", "shapes", "--out", out, "--metrics",
                       "clipscore")
    lines = err.splitlines()
    assert code == 2 and len(lines) == 2, err
    assert lines[0] == (f"note: {out}: taking over the lock of pid {dead} on {socket.gethostname()} "
                        f"(`soarbench eval`, since 2026-01-01 00:00:00 UTC), which is no longer running")
    assert lines[1].startswith("error: metric 'clipscore': ")
    assert list(out.iterdir()) == []  # released at the end of the command


def test_the_lock_is_released_and_an_unused_new_folder_removed(tmp_path, holder):
    out = tmp_path / "new" / "out"
    lock = FolderLock(out, command="soarbench eval").acquire()
    info = json.loads((out / LOCK_FILE).read_text())
    assert (info["pid"], info["command"]) == (os.getpid(), "soarbench eval")
    with pytest.raises(UserError, match=f"in use by pid {os.getpid()} "):
        FolderLock(out).acquire()  # a second lock on the same folder, even in the same process
    lock.release()
    assert not out.exists() and (tmp_path / "new").is_dir()
    with FolderLock(out):  # free again
        (out / "summary.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def test_processes_of_one_launch_share_the_folder_but_not_with_another_launch(tmp_path, holder, monkeypatch):
    out = tmp_path / "out"
    proc = holder(out, RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    FolderLock(out).acquire().release()  # rank 1 of the holder's launch: writes beside its rank 0
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # and leaves rank 0's lock alone
    monkeypatch.setenv("MASTER_PORT", "29501")  # rank 1 of another launch
    with pytest.raises(UserError, match=f"in use by pid {proc.pid} "):
        FolderLock(out).acquire()
    monkeypatch.delenv("RANK")  # rank 0 of another launch: the flock refuses it
    with pytest.raises(UserError, match=f"in use by pid {proc.pid} "):
        FolderLock(out).acquire()


def test_a_non_main_process_ignores_a_dead_process_lock(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "launch": None}))
    monkeypatch.setenv("RANK", "1")
    FolderLock(out).acquire().release()
    assert (out / LOCK_FILE).is_file()  # rank 0 takes it over, not rank 1
