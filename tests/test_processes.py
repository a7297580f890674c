"""Stop signals in deploy-local's process handling (fl_lightning/run/processes.py)."""

import signal
import threading

import pytest

from fl_lightning.errors import Stopped
from fl_lightning.run.processes import signals_held, stopped_by_signals


class SigtermSender:
    """A thread, started before any signal is held (as torch's or gRPC's are), that sends
    this process SIGTERM on `send()`: the kernel may deliver it to any thread."""

    def __init__(self) -> None:
        self.go, self.sent = threading.Event(), threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        self.go.wait()
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # lands in this thread
        self.sent.set()

    def send(self) -> None:
        """Send SIGTERM from the other thread; return once it has been delivered there."""
        self.go.set()
        self.sent.wait()


def test_a_held_stop_signal_waits_for_the_end_of_the_section_whichever_thread_gets_it() -> None:
    steps = []
    sender = SigtermSender()
    with pytest.raises(Stopped), stopped_by_signals():
        with signals_held():
            sender.send()
            for step in range(10_000):  # bytecodes where Python runs pending handlers
                steps.append(step)
        steps.append(-1)  # never reached: Stopped is raised on the way out
    assert len(steps) == 10_000


def test_outside_a_held_section_a_stop_signal_stops_at_once() -> None:
    steps = []
    sender = SigtermSender()
    with pytest.raises(Stopped), stopped_by_signals():
        sender.send()
        for step in range(10_000):
            steps.append(step)
    assert len(steps) < 10_000


def test_handlers_are_back_after_a_held_section() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with signals_held():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
