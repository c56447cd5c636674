"""A sweep's stop file as a job's loop sees it (mlstm.training.stopping): read after every step, so a job stops
after the step during which its sweep was asked to stop. The real sweeps are in tests/test_sweep_stop.py."""

from __future__ import annotations

import signal

import pytest

from mlstm.training.stopping import GracefulStop, SweepStop, read_stop_file, write_stop_file


@pytest.fixture
def stop_file(tmp_path):
    path = tmp_path / "sweep.stop"
    SweepStop.join(path)  # as a worker does before each job
    yield path
    SweepStop.join(None)


def test_the_loop_sees_the_sweeps_stop_file_at_its_next_step(stop_file):
    stop = GracefulStop(announce=False)  # not entered: no handlers, no watch thread, only the loop's own check
    assert not stop.poll() and not stop.poll()
    write_stop_file(stop_file, signal.SIGINT, "job #0 stopped")
    assert stop.poll() and stop.signum == signal.SIGINT  # as that signal would have asked


def test_the_first_request_wins(stop_file):
    write_stop_file(stop_file, signal.SIGINT, "job #0 stopped")
    write_stop_file(stop_file, signal.SIGTERM, "job #1 exited with status 2")
    assert read_stop_file(stop_file) == (signal.SIGINT, "job #0 stopped")
    stop = GracefulStop(announce=False)
    assert stop.poll() and stop.signum == signal.SIGINT


def test_outside_a_sweep_nothing_is_read(tmp_path):
    SweepStop.join(None)
    write_stop_file(tmp_path / "sweep.stop", signal.SIGTERM, "another launch")
    assert not GracefulStop(announce=False).poll()
