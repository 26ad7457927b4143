"""Worker processes fed through pipes: results in order and to whoever asked, a task's error raised where its result
is asked for, and a worker that dies or cannot start reported at once rather than waited for.

The tasks are the standard library's, so the workers import nothing of the tests.
"""

from __future__ import annotations

import math
import operator
import os
import signal
import threading
import time

import psutil
import pytest

from lightning_fhe.he.workers import WorkerDied, WorkerProcesses


@pytest.fixture(scope="module")
def workers():
    with WorkerProcesses(2) as processes:
        yield processes


def test_tasks_spread_over_the_workers_and_their_results_come_back_in_order(workers):
    tickets = [workers.submit(os.getpid) for _ in range(6)]
    pids = [ticket.result() for ticket in tickets]
    assert pids[0] != pids[1]  # the second finds the first worker busy (or answered: then it is the other's turn)
    assert set(pids) == set(workers.pids) and len(set(pids)) == 2 and os.getpid() not in pids
    assert [workers.submit(math.factorial, n).result() for n in range(6)] == [1, 1, 2, 6, 24, 120]


def test_a_busy_worker_gets_no_task_while_another_is_idle(workers):
    busy = workers.submit(time.sleep, 1.0, to=0)
    assert [workers.submit(os.getpid).result() for _ in range(5)] == [workers.pids[1]] * 5
    assert busy.result() is None
    assert {workers.submit(os.getpid, to=k).result() for k in (0, 1)} == set(workers.pids)


def test_a_result_asked_for_late_is_kept_for_whoever_asks(workers):
    first, second = workers.submit(math.factorial, 5, to=0), workers.submit(math.factorial, 6, to=1)
    third = workers.submit(math.factorial, 7, to=0)  # its answer comes after the first's, on the same pipe
    assert third.result() == 5040
    assert (second.result(), first.result()) == (720, 120)


def test_a_tasks_error_is_raised_where_its_result_is_asked_for_and_the_worker_goes_on(workers):
    failing = workers.submit(operator.truediv, 1, 0)
    after = workers.submit(operator.truediv, 1, 4)
    with pytest.raises(ZeroDivisionError):
        failing.result()
    assert after.result() == 0.25


def test_a_forgotten_result_is_dropped_not_handed_to_the_next_task():
    with WorkerProcesses(1) as one:
        forgotten = one.submit(math.factorial, 10)
        forgotten.forget()
        assert one.submit(math.factorial, 3).result() == 6
        late = one.submit(math.factorial, 4)
        one.submit(math.factorial, 5).result()  # reads the earlier answer on its way
        late.forget()  # after its result arrived
        assert not forgotten.worker.arrived and not forgotten.worker.forgotten  # nothing left behind


def test_threads_waiting_on_the_same_worker_each_get_their_own_result(workers):
    results: dict[int, int] = {}
    tickets = {n: workers.submit(math.factorial, n) for n in range(20, 40)}

    def wait(numbers):
        for n in numbers:
            results[n] = tickets[n].result()

    threads = [threading.Thread(target=wait, args=(list(tickets)[k::3][::-1],)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {n: math.factorial(n) for n in tickets}


def test_a_killed_worker_fails_its_task_and_the_next_one_sent_to_it_at_once():
    with WorkerProcesses(2) as processes:
        held = processes.submit(time.sleep, 60, to=0)
        other = processes.submit(math.factorial, 3, to=1)
        os.kill(processes.pids[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDied, match=f"{processes.pids[0]} died while it held a task"):
            held.result()
        assert time.monotonic() - start < 10
        assert other.result() == 6  # the other worker is unharmed
        with pytest.raises(WorkerDied):  # refused on sending, or on reading the answer
            processes.submit(math.factorial, 3, to=0).result()


def test_workers_that_cannot_start_are_reported_and_none_is_left_running(capfd):
    before = set(psutil.Process().children())
    with pytest.raises(WorkerDied, match="ended before it started"):
        WorkerProcesses(2, operator.truediv, (1, 0))
    assert "ZeroDivisionError" in capfd.readouterr().err  # the worker's own error, for whoever reads the log
    assert not [p for p in set(psutil.Process().children()) - before if p.is_running() and p.status() != "zombie"]


def test_closing_ends_the_workers_and_refuses_new_tasks():
    processes = WorkerProcesses(2)
    workers = [psutil.Process(pid) for pid in processes.pids]
    processes.submit(time.sleep, 0.2)
    processes.close()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    with pytest.raises(RuntimeError, match="closed"):
        processes.submit(os.getpid)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        WorkerProcesses(0)
