"""The pipes between `pagedllm serve` and the `llm` model's instances (lifeline.py), each instance with its own
copies of the descriptors, as tritonserver's stubs have them. test_faults.py checks the same through a real
server: SIGTERM, SIGKILL and two instances."""
from __future__ import annotations

import os
import threading
import time

import pytest

from pagedllm.lifeline import DRAIN_FD, LIFELINE_FD, STATUS_FD, LauncherEnd, ModelEnd


@pytest.fixture
def launcher(tmp_path):
    end = LauncherEnd(tmp_path)
    env = end.child_env(grace_s=2.5)
    instances = [ModelEnd({**env, **{k: str(os.dup(int(env[k]))) for k in (DRAIN_FD, LIFELINE_FD, STATUS_FD)}})
                 for _ in range(3)]
    end.after_start()
    yield end, instances
    end.close()


def test_nothing_happens_until_the_launcher_says_so(launcher):
    end, instances = launcher
    assert [m.poll(0.05) for m in instances] == [None, None, None]
    assert not any(m.launcher_gone for m in instances)


def test_a_drain_reaches_every_instance_once_with_the_grace_period(launcher):
    end, instances = launcher
    end.drain()
    assert [m.poll(1.0) for m in instances] == [2.5, 2.5, 2.5]
    assert [m.poll(0.05) for m in instances] == [None, None, None]  # once
    assert not any(m.launcher_gone for m in instances)
    for m in instances:
        m.report_idle()
    assert end.wait_idle(3, timeout=2)


def test_what_the_instances_say_is_counted_whatever_reads_it_first(launcher):
    """idle, finalizing and fatal lines share one pipe: reading one kind keeps the others for their reader."""
    end, instances = launcher
    instances[0].report_fatal("the engine thread died")
    for m in instances:
        m.report_idle()
        m.report_finalizing()
    assert end.wait_finalizing(3, timeout=2)  # read first, the idle and fatal lines with it
    assert end.wait_idle(3, timeout=0)
    assert end.fatal_reasons() == ["the engine thread died"] and end.fatal_reasons() == []
    assert not end.wait_finalizing(4, timeout=0.1)


def test_the_launchers_end_drains_every_instance_and_says_it_is_gone(launcher):
    end, instances = launcher
    end.close()  # what its death does to its descriptors
    assert [m.poll(1.0) for m in instances] == [2.5, 2.5, 2.5]
    for m in instances:  # the lifeline may end a moment after the drain pipe: the next polls see it
        deadline = time.monotonic() + 2
        while not m.launcher_gone and time.monotonic() < deadline:
            assert m.poll(0.1) is None
        assert m.launcher_gone


def test_the_instance_that_stops_tritonserver_waits_for_every_instance_to_drain(launcher):
    """Without the launcher, an instance stops tritonserver itself after its drain; a server shutting down
    delivers no more responses, so it must wait for the other instances' drains to be over."""
    end, instances = launcher
    assert not instances[0].wait_for_every_instance(timeout=0.3)  # 1 and 2 are still draining
    done = []
    waiter = threading.Thread(target=lambda: done.append(instances[0].wait_for_every_instance(timeout=5)))
    waiter.start()
    time.sleep(0.2)
    assert instances[1].wait_for_every_instance(timeout=0.2) is False and not done  # 2 still drains
    finished_last = instances[2].wait_for_every_instance(timeout=5)
    waiter.join()
    assert finished_last and done == [True]
    assert instances[1].wait_for_every_instance(timeout=1)  # asking again once all are done


def test_a_failure_reaches_the_launcher(launcher):
    end, instances = launcher
    instances[1].report_fatal("the engine thread died:\n  RuntimeError")
    deadline = time.monotonic() + 2
    reasons = []
    while not reasons and time.monotonic() < deadline:
        reasons = end.fatal_reasons()
    assert reasons == ["the engine thread died: RuntimeError"]


def test_without_a_launcher_the_model_does_without():
    m = ModelEnd({})
    assert m.poll(0.01) is None and not m.launcher_gone
    m.report_idle()  # nothing to write to: no error


def test_an_instance_that_stopped_watching_holds_no_other_up(launcher):
    """Its pipes could not be read: it watches them no more, keeps its status pipe, and releases the drain
    lock, so that the instance stopping tritonserver does not wait the whole timeout for it."""
    end, (first, broken, last) = launcher
    broken.stop_watching()
    assert broken.poll(0.05) is None
    end.close()  # the launcher dies
    for m in (first, last):
        assert m.poll(1.0) == 2.5
        m.poll(0.5)
        assert m.launcher_gone
    last.wait_for_every_instance(0)  # drained: its share of the lock released
    start = time.monotonic()
    assert first.wait_for_every_instance(timeout=5)
    assert time.monotonic() - start < 1
