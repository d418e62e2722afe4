"""runtime/isolation.py without a node: who workers run as, what is made private, how the
cgroup file system is read and written (v2 on a fake tree: this host's cgroup v2 has no
memory controller). The real thing, with a node, is in test_task_limits.py."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from meshscale.runtime import isolation
from meshscale.runtime.isolation import (
    IsolationError,
    open_cgroups,
    parse_mountinfo,
    parse_proc_cgroup,
    resolve_worker_user,
    searchable_by,
)
from needs import is_root, require_root

MOUNTINFO = """\
24 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
30 24 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
31 24 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
32 24 0:28 /sub /mnt/with\\040space rw - cgroup2 cgroup2 rw
"""


def test_mountinfo_and_proc_cgroup_are_parsed() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [(m.point, m.fstype) for m in mounts][1:] == [
        (Path("/sys/fs/cgroup/memory"), "cgroup"), (Path("/sys/fs/cgroup/cpu,cpuacct"), "cgroup"),
        (Path("/mnt/with space"), "cgroup2")]
    assert "cpuacct" in mounts[2].options and mounts[3].root == "/sub"
    mine = parse_proc_cgroup("4:memory:/a/b\n1:cpu,cpuacct:/\n0::/sub/svc\n")
    assert mine == {"memory": "/a/b", "cpu": "/", "cpuacct": "/", "": "/sub/svc"}
    assert isolation._dir_of(mounts[3], "/sub/svc") == Path("/mnt/with space/svc")
    assert isolation._dir_of(mounts[3], "/other") is None  # not what that mount shows
    assert isolation._dir_of(mounts[1], "/") == Path("/sys/fs/cgroup/memory")


def test_an_agent_that_is_not_root_says_workers_run_as_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    user, said = resolve_worker_user("nobody")
    assert user is None and "not root" in said and "can read what the agent can" in said


@pytest.mark.skipif(not is_root(), reason="changing user needs root")
def test_the_worker_user_is_checked() -> None:
    user, said = resolve_worker_user("nobody")
    assert user is not None and user.uid != 0 and "cannot read" in said
    assert resolve_worker_user("")[0] is None
    with pytest.raises(IsolationError, match="does not exist"):
        resolve_worker_user("no-such-user-meshscale")
    with pytest.raises(IsolationError, match="is root"):
        resolve_worker_user("root")


@pytest.mark.skipif(not is_root(), reason="files of another user need root")
def test_secrets_are_made_private_or_refused(tmp_path: Path) -> None:
    user, _ = resolve_worker_user("nobody")
    assert user is not None
    bundle = tmp_path / "bundle"
    bundle.mkdir(mode=0o755)
    (bundle / "node.key").write_bytes(b"k")
    (bundle / "node.key").chmod(0o600)
    tightened: list[str] = []
    isolation._private(bundle, user, tightened)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700 and tightened == [str(bundle)]
    os.chown(bundle / "node.key", user.uid, user.gid)
    with pytest.raises(IsolationError, match="readable by the worker user"):
        isolation._private(bundle, user, [])
    # searchable_by walks every directory above.
    tmp_path.chmod(0o700)
    assert not searchable_by(bundle, user)
    assert searchable_by(Path("/usr"), user)


def fake_cgroup_dir(d: Path) -> None:
    """What the kernel puts in a new v2 cgroup directory."""
    d.mkdir(exist_ok=True)
    for name in ("cgroup.subtree_control", "cgroup.procs", "memory.max", "memory.current",
                 "memory.swap.max", "memory.oom.group", "memory.events", "cpu.max"):
        (d / name).touch()
    (d / "cgroup.controllers").write_text("cpu memory io\n")


def test_v2_parent_and_worker_cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolation, "_mkdir", fake_cgroup_dir)
    fake_cgroup_dir(tmp_path / "svc")
    mountinfo = f"32 24 0:28 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    cgs, said = open_cgroups("meshscale-n-1", mountinfo=mountinfo, proc_cgroup="0::/svc\n")
    assert cgs is not None and cgs.version == 2, said
    parent = tmp_path / "svc" / "meshscale-n-1"
    assert cgs.memory == cgs.cpu == parent and "memory and cpu" in said
    # Controllers handed down to the agent's cgroup's children, then to the workers'.
    assert (tmp_path / "svc" / "cgroup.subtree_control").read_text() == "+memory +cpu"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +cpu"
    w = cgs.worker("w1")
    assert (parent / "w1" / "memory.oom.group").read_text() == "1"
    assert (parent / "w1" / "memory.swap.max").read_text() == "0"
    w.attach(4242)
    assert (parent / "w1" / "cgroup.procs").read_text() == "4242"
    w.set_limits(300 << 20, 1.5)
    assert (parent / "w1" / "memory.max").read_text() == str(300 << 20)
    assert (parent / "w1" / "cpu.max").read_text() == "150000 100000"
    w.set_limits(None, None)
    assert (parent / "w1" / "memory.max").read_text() == "max"
    assert (parent / "w1" / "cpu.max").read_text() == "max 100000"
    # The same quota as the last task's is not written again (only the node writes it);
    # nor the same memory limit (issue #19), and a different one is.
    (parent / "w1" / "cpu.max").write_text("not written again")
    w.set_limits(200 << 20, None)
    assert (parent / "w1" / "memory.max").read_text() == str(200 << 20)
    assert (parent / "w1" / "cpu.max").read_text() == "not written again"
    (parent / "w1" / "memory.max").write_text("not written again")
    w.set_limits(200 << 20, None)
    assert (parent / "w1" / "memory.max").read_text() == "not written again"
    w.set_limits(201 << 20, None)
    assert (parent / "w1" / "memory.max").read_text() == str(201 << 20)
    w.set_limits(200 << 20, None)
    assert (parent / "w1" / "memory.max").read_text() == str(200 << 20)
    w.set_limits(None, 1.5)
    assert (parent / "w1" / "cpu.max").read_text() == "150000 100000"
    (parent / "w1" / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n")
    assert w.oom_kills() == 2
    # The control files stay open from task to task (w.files), and are read afresh.
    assert w.files
    (parent / "w1" / "memory.events").write_text("oom 3\noom_kill 3\n")
    assert w.oom_kills() == 3
    w.set_limits(1 << 40, 1.0)
    assert (parent / "w1" / "memory.max").read_text() == str(1 << 40)
    w.set_limits(7 << 20, 1.0)
    assert (parent / "w1" / "memory.max").read_text() == str(7 << 20)
    fds = list(w.files.values())
    w.close_files()  # as remove() does first (a fake cgroup's directory cannot be removed)
    assert not w.files
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed


def test_no_memory_limit_after_none_is_not_written_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task with no memory limit after a task with none costs no memory write (issue
    23: a stream operator's batches go one after another); nor does the same limit as
    the last one (issue #19: the pool rounds the usage the limit adds to up to a MiB, so
    it repeats from task to task); another limit, and none after a limit, are written."""
    monkeypatch.setattr(isolation, "_mkdir", fake_cgroup_dir)
    fake_cgroup_dir(tmp_path / "svc")
    mountinfo = f"32 24 0:28 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    cgs, said = open_cgroups("meshscale-n-1", mountinfo=mountinfo, proc_cgroup="0::/svc\n")
    assert cgs is not None, said
    w = cgs.worker("w1")
    limit = tmp_path / "svc" / "meshscale-n-1" / "w1" / "memory.max"
    w.set_limits(None, 1.0)
    assert limit.read_text() == "max"
    limit.write_text("not written again")
    w.set_limits(None, 1.0)
    assert limit.read_text() == "not written again"
    w.set_limits(100 << 20, 1.0)
    assert limit.read_text() == str(100 << 20)
    limit.write_text("not written again")
    w.set_limits(100 << 20, 1.0)
    assert limit.read_text() == "not written again"
    w.set_limits(101 << 20, 1.0)
    assert limit.read_text() == str(101 << 20)
    w.set_limits(None, 1.0)
    assert limit.read_text() == "max"
    w.close_files()


def test_no_cgroup_is_a_statement_not_an_error(tmp_path: Path) -> None:
    cgs, said = open_cgroups("meshscale-n-1", mountinfo="", proc_cgroup="0::/\n")
    assert cgs is None and said.startswith("no usable cgroup")
    # A v1 hierarchy that cannot be written, by root either: its mount point is a file.
    (tmp_path / "not-a-dir").write_text("")
    mountinfo = f"30 24 0:26 / {tmp_path / 'not-a-dir'} rw - cgroup cgroup rw,memory\n"
    cgs, said = open_cgroups("meshscale-n-1", mountinfo=mountinfo, proc_cgroup="4:memory:/\n")
    assert cgs is None and "v1 memory" in said


def test_v1_worker_cgroup_on_this_host_if_writable() -> None:
    require_root("writing cgroups")
    cgs, said = open_cgroups("meshscale-test-isolation")
    if cgs is None:
        pytest.fail(f"root and no usable cgroup: {said}", pytrace=False)
    try:
        w = cgs.worker("w1")
        w.set_limits(64 << 20, 0.5)
        assert w.memory is not None and w.cpu is not None
        limit_file = "memory.max" if cgs.version == 2 else "memory.limit_in_bytes"
        assert int((w.memory / limit_file).read_text()) == 64 << 20
        w.set_limits(None, 1.0)  # up again: v1 memsw first
        quota = "cpu.max" if cgs.version == 2 else "cpu.cfs_quota_us"
        assert (w.cpu / quota).read_text().split()[0] == "100000"
        w.set_limits(None, 1.0)  # the same quota: not written again
        w.set_limits(None, 0.25)
        assert (w.cpu / quota).read_text().split()[0] == "25000"
        assert w.remove()
    finally:
        cgs.close()
    assert cgs.memory is not None and not cgs.memory.exists()


def test_a_crashed_nodes_cgroups_are_cleared_at_start() -> None:
    require_root("writing cgroups")
    first, said = open_cgroups("meshscale-test-stale")
    if first is None:
        pytest.fail(f"root and no usable cgroup: {said}", pytrace=False)
    w = first.worker("w1")
    left = subprocess.Popen(["sleep", "60"])  # a worker the dead node left behind
    try:
        w.attach(left.pid)
        # The node "crashed": nothing closed. The next start clears what it left.
        second, _ = open_cgroups("meshscale-test-stale")
        assert second is not None
        assert left.wait(timeout=10) == -signal.SIGKILL
        assert all(not d.exists() for d in w.dirs())
        second.close()
        assert second.memory is None or not second.memory.exists()
    finally:
        left.kill()
        left.wait()


def test_empty_parents_of_nodes_gone_for_good_are_swept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base"
    for name in ("meshscale-old-1", "meshscale-busy-2", "meshscale-new-3", "other"):
        (base / name / "w1").mkdir(parents=True)
        (base / name / "cgroup.procs").write_text("")
        (base / name / "w1" / "cgroup.procs").write_text("")
    (base / "meshscale-busy-2" / "w1" / "cgroup.procs").write_text("4242\n")
    old = time.time() - 2 * isolation.STALE_AFTER_S
    for name in ("meshscale-old-1", "meshscale-busy-2", "other"):
        os.utime(base / name, (old, old))
    # Plain directories stand in for cgroups: rmdir of one with files fails, so only the
    # choice is checked here, by what was attempted.
    cleared: list[str] = []
    monkeypatch.setattr(isolation, "_clear_children",
                        lambda d, version=None: cleared.append(d.name))
    removed: list[Path] = []
    monkeypatch.setattr(isolation, "_remove", removed.append)
    isolation._sweep_stale(base, "meshscale-me-0")
    assert cleared == ["meshscale-old-1"]
    assert removed == [isolation._temp_work_dir("meshscale-old-1")]


def test_a_live_nodes_parent_is_not_swept_while_it_has_no_workers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node on standby has stopped its workers (``runtime/capacity.py``): its parent is
    empty and old, yet the node is alive and will start workers in it again when it
    wakes. It holds its parent's lock; a node starting meanwhile must leave the parent
    (and its temp work dir) alone. Once the lock is gone (the node crashed), it goes."""
    base = tmp_path / "base"
    for name in ("meshscale-asleep-1", "meshscale-crashed-2"):
        (base / name / "w1").mkdir(parents=True)
        (base / name / "cgroup.procs").write_text("")
        (base / name / "w1" / "cgroup.procs").write_text("")
        old = time.time() - 2 * isolation.STALE_AFTER_S
        os.utime(base / name, (old, old))
    cleared: list[str] = []
    monkeypatch.setattr(isolation, "_clear_children",
                        lambda d, version=None: cleared.append(d.name))
    monkeypatch.setattr(isolation, "_remove", lambda p: None)
    fd = isolation._hold(base / "meshscale-asleep-1")
    try:
        isolation._sweep_stale(base, "meshscale-me-0")
        assert cleared == ["meshscale-crashed-2"]
    finally:
        os.close(fd)
    # Plain directories stand in for cgroups (rmdir of one with files fails): the next
    # sweep tries both again, the unlocked one too.
    isolation._sweep_stale(base, "meshscale-me-0")
    assert sorted(cleared[1:]) == ["meshscale-asleep-1", "meshscale-crashed-2"]
