"""The store on a real small disk: a tmpfs filled to the last byte, then remounted read-only. It runs in a private
mount namespace (`unshare --mount`, as root: this project's machines and CI), so nothing is mounted outside it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.conftest import FIXTURE_DIR

ROOT = FIXTURE_DIR.parents[2]

SCRIPT = r"""
import json, os, subprocess, sys
from internlm_app.store.db import ConversationStore
from internlm_app.store.errors import StoreFault

disk = sys.argv[1]
os.makedirs(disk, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", disk], check=True)
db, out = os.path.join(disk, "c.db"), {}


def attempt(write):
    try:
        write()
        return "ok"
    except StoreFault as fault:
        return fault.kind


store = ConversationStore(db)
cid = store.create_conversation("", title="kept")
store.add_message(cid, "user", "hello")
store.add_message(cid, "assistant", "hi there")
def fill(name):  # take every free byte of the disk
    with open(os.path.join(disk, name), "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 512)
        except OSError as exc:
            return exc.strerror


out["filler_error"] = fill("filler")
out["full_write"] = attempt(lambda: store.add_message(cid, "user", "a short message on a full disk"))
out["full_read"] = [m.content for m in store.get_conversation(cid).messages]
store.close()
os.remove(os.path.join(disk, "filler"))
ConversationStore(db).close()  # a clean close: no -wal or -shm file is left
fill("filler")
store = ConversationStore(db)  # a start on a full disk: SQLite cannot even make its -shm file
out["start_full_read"] = [m.content for m in store.get_conversation(cid).messages]
out["start_full_write"] = attempt(lambda: store.add_message(cid, "user", "again"))
store.close()
os.remove(os.path.join(disk, "filler"))
store = ConversationStore(db)
out["freed_write"] = attempt(lambda: store.add_message(cid, "user", "after freeing space"))
store.close()
subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
store = ConversationStore(db)  # a WAL database on read-only media, its -shm file gone with the last close
out["ro_read"] = [m.content for m in store.get_conversation(cid).messages]
out["ro_write"] = attempt(lambda: store.add_message(cid, "user", "on a read-only disk"))
out["ro_rename"] = attempt(lambda: store.rename(cid, "renamed"))
store.close()
print(json.dumps(out))
"""


def test_a_real_full_disk_and_a_real_read_only_mount(tmp_path):
    unshare = shutil.which("unshare")
    assert unshare, "util-linux's unshare is needed (Debian: util-linux)"
    command = [unshare, "--mount", "--propagation", "private", sys.executable, "-c", SCRIPT, str(tmp_path / "disk")]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["filler_error"] == "No space left on device"
    assert out["full_write"] == "full"  # SQLite's own SQLITE_FULL, for a message of a few bytes
    assert out["full_read"] == ["hello", "hi there"]  # reading goes on, nothing half-written
    assert out["start_full_read"] == ["hello", "hi there"] and out["start_full_write"] == "full"
    assert out["freed_write"] == "ok"
    assert out["ro_read"] == ["hello", "hi there", "after freeing space"]  # readable on read-only media
    assert out["ro_write"] == out["ro_rename"] == "read_only"


def test_a_real_full_disk_while_converting_is_one_line_and_leaves_nothing(tmp_path):
    script = (
        "import subprocess, sys; from internlm_app import cli\n"
        "subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=400k', 'tmpfs', sys.argv[1]], check=True)\n"
        "code = cli.main(['convert', sys.argv[2], sys.argv[1] + '/out'])\n"
        "import os; print(sorted(os.listdir(sys.argv[1]))); sys.exit(code)"
    )
    disk = tmp_path / "disk"
    disk.mkdir()
    command = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        sys.executable,
        "-c",
        script,
        str(disk),
        str(FIXTURE_DIR),
    ]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "No space left on device" in line and "free space" in line
    assert result.stdout.strip().splitlines()[-1] == "[]"  # the converted checkpoint is 0.9 MB: nothing is left
