"""Run a test in a forked child process (what pytest-forked does, in 40 lines).

Why: executing the Associated Token Account program in solders' LiteSVM leaves the process in a
state where Ray's `create_actor` later aborts the whole interpreter (std::bad_alloc in the C++ core
worker; reproduced with a plain LiteSVM and a trivial actor). Payments tests that run LiteSVM
therefore fork, so the pytest process stays fit for the integration tests of every package.
"""

import json
import os
from pathlib import Path

import pytest
from _pytest.runner import runtestprotocol


def run_forked(item: pytest.Item) -> bool:
    """The pytest_runtest_protocol body: setup/call/teardown in a child, reports relayed here."""
    hook = item.ihook
    hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            reports = runtestprotocol(item, log=False)
            data = [item.config.hook.pytest_report_to_serializable(config=item.config, report=r) for r in reports]
            with os.fdopen(write_fd, "w") as out:
                json.dump(data, out)
        except BaseException:  # noqa: BLE001 - the parent reports the missing result
            code = 1
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as src:
        raw = src.read()
    _, status = os.waitpid(pid, 0)
    if not raw:
        raise RuntimeError(f"forked test {item.nodeid} died (wait status {status})")
    for data in json.loads(raw):
        report = item.config.hook.pytest_report_from_serializable(config=item.config, data=data)
        hook.pytest_runtest_logreport(report=report)
    hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def is_under(item: pytest.Item, directory: Path) -> bool:
    return directory in Path(str(item.path)).resolve().parents
