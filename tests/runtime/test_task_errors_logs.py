"""A task's exception and its output, on real node processes (2 nodes): a remote
exception is raised as its own type (and ``TaskError``) when it can be unpickled here,
with the node, the task id and a traceback that names the user's file and line, and as
``TaskError`` otherwise; what a task prints is kept per task, bounded, returned by
``Future.logs()`` and ``meshscale logs``, and never reaches the node's JSON log."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_mesh import host_like_dir, wait_for

from meshscale.cli import main as cli_main
from meshscale.client.tasks import TaskError, TaskMesh
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with host_like_dir("meshscale-err-") as directory, LocalMesh(directory, 2) as m:
        yield m


class QuotaExceeded(RuntimeError):
    """A user's own exception type, with an attribute of its own."""

    def __init__(self, message: str, limit: int = 0) -> None:
        super().__init__(message)
        self.limit = limit


class Picky(Exception):
    """Cannot be unpickled: its ``__init__`` wants two arguments, its ``args`` has one."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"picky {a}/{b}")


class HoldsALock(Exception):
    """Cannot even be pickled on the node (an attribute is a lock)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def parse(text: str) -> int:
    return int(text)  # raises ValueError


def over_quota(limit: int) -> None:
    raise QuotaExceeded(f"over the quota of {limit}", limit=limit)


def picky() -> None:
    raise Picky(1, 2)


def locked() -> None:
    raise HoldsALock("with a lock")


def leave() -> None:
    sys.exit(3)


MARK = "printed-by-a-task-7f3a"


def chatty(n: int) -> int:
    print(f"{MARK} stdout {n}")
    print(f"{MARK} stderr {n}", file=sys.stderr)
    return n


def chatty_then_fail() -> None:
    print(f"{MARK} before failing")
    raise KeyError("after printing")


def flood(n_bytes: int) -> int:
    line = "x" * 99
    for _ in range(n_bytes // 100):
        print(line)
    return n_bytes


def test_a_remote_value_error_is_caught_as_value_error(client: TaskMesh,
                                                       mesh: LocalMesh) -> None:
    fut = client.submit(parse, "not a number")
    try:
        fut.result(timeout=120)
    except ValueError as e:
        err: BaseException = e
    else:
        raise AssertionError("no ValueError")
    assert isinstance(err, TaskError)
    assert err.task_id == fut.task_id and err.kind == "raised"
    assert err.node in {n.name for n in mesh.nodes}
    assert "invalid literal for int()" in str(err)
    # The traceback names this file and the line that raised, not <dynamic-code>.
    line = inspect.getsourcelines(parse)[1] + 1
    assert f'File "{__file__}", line {line}, in parse' in err.traceback
    assert "<dynamic-code>" not in err.traceback
    assert "worker_main" not in err.traceback  # the node's own frames are left out
    assert fut.exception(timeout=10) is not None


def test_a_user_exception_type_keeps_its_attributes(client: TaskMesh) -> None:
    with pytest.raises(QuotaExceeded) as ei:
        client.submit(over_quota, 5).result(timeout=120)
    err = ei.value
    assert isinstance(err, RuntimeError) and isinstance(err, TaskError)
    assert err.limit == 5 and err.args == ("over the quota of 5",)
    assert "over the quota of 5" in str(err)
    line = inspect.getsourcelines(over_quota)[1] + 1
    assert f'File "{__file__}", line {line}, in over_quota' in err.traceback


@pytest.mark.parametrize(("fn", "text"), [(picky, "Picky: picky 1/2"),
                                          (locked, "HoldsALock: with a lock"),
                                          (leave, "SystemExit: 3")])
def test_an_exception_that_cannot_be_raised_here_is_a_task_error(
        client: TaskMesh, fn: object, text: str) -> None:
    fut = client.submit(fn)
    with pytest.raises(TaskError) as ei:
        fut.result(timeout=120)
    err = ei.value
    assert type(err) is TaskError  # not the remote type: it cannot be made here
    assert err.kind == "raised" and err.task_id == fut.task_id
    assert text in str(err)
    assert f"in {fn.__name__}" in err.traceback  # type: ignore[attr-defined]


def _node_log_lines(mesh: LocalMesh) -> list[str]:
    lines = []
    for node in mesh.nodes:
        assert node.log_path is not None
        lines += node.log_path.read_text().splitlines()
    return lines


def test_print_output_is_kept_per_task_and_not_in_the_node_log(client: TaskMesh,
                                                               mesh: LocalMesh) -> None:
    futs = [client.submit(chatty, i) for i in range(3)]
    assert [f.result(timeout=120) for f in futs] == [0, 1, 2]
    for i, f in enumerate(futs):
        logs = f.logs()
        assert logs == f"{MARK} stdout {i}\n--- stderr ---\n{MARK} stderr {i}\n"
    failed = client.submit(chatty_then_fail)
    with pytest.raises(KeyError):
        failed.result(timeout=120)
    assert failed.logs() == f"{MARK} before failing\n"
    lines = _node_log_lines(mesh)
    assert lines
    assert not [ln for ln in lines if MARK in ln]
    for ln in lines:
        json.loads(ln)  # every line of the node's log is JSON


def test_output_beyond_the_bound_is_cut_and_the_cut_is_said(client: TaskMesh) -> None:
    fut = client.submit(flood, 200_000)
    assert fut.result(timeout=120) == 200_000
    logs = fut.logs()
    assert logs.startswith("x" * 99 + "\n")
    assert len(logs) < 64 * 1024 + 512
    assert "output truncated" in logs and "task_log_bytes=65536" in logs
    dropped = 200_000 - 64 * 1024
    assert f"{dropped} more bytes not kept" in logs


def test_logs_cli(client: TaskMesh, mesh: LocalMesh, capsys: pytest.CaptureFixture[str]) -> None:
    fut = client.submit(chatty, 9)
    assert fut.result(timeout=120) == 9
    where = ["--node", mesh.nodes[1].address, "--bundle", str(mesh.bundle_path)]
    capsys.readouterr()

    def shown() -> str:
        code = cli_main(["logs", fut.task_id, *where])
        out = capsys.readouterr().out
        return out if code == 0 else ""

    # Asked of the other node: it reads the task's record from the KV (written as the
    # task ended, so perhaps a moment after the result arrived here).
    wait_for(lambda: MARK in shown(), 60, "the record with the task's output")
    assert cli_main(["logs", fut.task_id, *where]) == 0
    assert capsys.readouterr().out == f"{MARK} stdout 9\n--- stderr ---\n{MARK} stderr 9\n"
    assert cli_main(["logs", "no-such-task", *where]) == 1
    assert "unknown task no-such-task" in capsys.readouterr().err


def prints_and_waits(path: str) -> str:
    print("step 1", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    print("step 2")
    print("a warning", file=sys.stderr)
    return "ok"


def test_logs_follow_a_running_task(client: TaskMesh, mesh: LocalMesh) -> None:
    shared = Path(tempfile.mkdtemp(prefix="meshscale-follow-"))
    shared.chmod(0o755)  # the worker user looks for the file
    go = shared / "go"
    try:
        fut = client.submit(prints_and_waits, str(go))
        # Seen while it runs: through its owner, from the node that runs it.
        wait_for(lambda: fut.logs() == "step 1\n", 60, "the first line of a running task")
        assert not fut.done()
        follow = subprocess.Popen(
            [sys.executable, "-m", "meshscale.cli", "logs", "--follow", fut.task_id,
             "--node", mesh.nodes[1].address, "--bundle", str(mesh.bundle_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert follow.stdout is not None
            assert follow.stdout.readline() == "step 1\n"  # before the task can go on
            assert not fut.done()
            go.touch()
            out, err = follow.communicate(timeout=60)
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
        assert follow.returncode == 0, err
        assert out == "step 2\n" and err == "a warning\n"
        assert fut.result(timeout=60) == "ok"
        assert fut.logs() == "step 1\nstep 2\n--- stderr ---\na warning\n"
    finally:
        shutil.rmtree(shared, ignore_errors=True)
