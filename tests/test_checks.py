"""Bounded work on what clients send: their error text, their values, the notices said."""

import time

from fl_lightning.errors import show
from fl_lightning.server.checks import MAX_LINE, Notices, error_summary, one_line


def test_failed_replies_are_summarised_by_the_clients_own_exception_line() -> None:
    reason = "Traceback...\nray.exceptions.RayTaskError: boom\nValueError: bad input\n"
    assert error_summary(reason) == "ValueError: bad input"
    assert error_summary(None) == "no reason given"
    wrapped = "<class 'ClientAppException'>:<'\nException ClientAppException occurred. Message: x"
    assert error_summary(wrapped + "\nKeyError: 'w'\n'>") == "KeyError: 'w'"


def test_megabytes_of_error_text_cost_what_a_line_costs() -> None:
    # The review's attack: "boom" and then 600 KB of "Error." on one line. A backtracking
    # pattern took 13 s on it; the summary reads a bounded head and tail, lines cut first.
    for reason in (
        "Traceback ...\nRuntimeError: boom\n" + "Error." * 100_000,
        "RuntimeError: boom\n" + "Error.\n" * 500_000,  # 3.5 MB, half a million lines
        "x" * 3_000_000,
    ):
        started = time.perf_counter()
        summary = error_summary(reason)
        assert time.perf_counter() - started < 0.5
        assert len(summary) <= MAX_LINE
    assert error_summary("Traceback ...\nRuntimeError: boom\n" + "Error." * 100_000).startswith(
        "RuntimeError: boom"
    )


def test_what_a_client_wrote_is_said_on_one_short_line() -> None:
    notices = Notices()
    notices.say("update rejected", "key\x1b[31m\n" + "x" * 10_000)
    assert notices.first is not None
    assert "\n" not in notices.first and "\x1b" not in notices.first
    assert len(notices.first) < 400
    started = time.perf_counter()
    notices.say("update rejected", "\x00" * 30_000_000)  # cut before it is cleaned
    assert time.perf_counter() - started < 0.5


def test_notices_name_each_client_and_its_first_problem() -> None:
    notices = Notices()
    for _ in range(3):
        notices.say("train reply of client 3 rejected", "its norm is 1e30", who="client 3")
    notices.say("a client failed in train", "RuntimeError: boom", who="client 1")
    notices.say("census conflict", "nodes 4, 5 both claim partition 2")  # nobody's fault
    line = notices.clients_line()
    assert line.startswith("client 3 (3x: train reply of client 3 rejected: its norm is 1e30)")
    assert "client 1 (1x: a client failed in train: RuntimeError: boom)" in line
    assert "conflict" not in line


def test_values_are_shown_short_whatever_their_size() -> None:
    assert len(show("x" * 10_000_000)) < 200
    assert len(show(b"\x00" * 10_000_000)) < 300
    assert show(10**5000).startswith("an integer of about 2**")
    assert len(one_line("a\nb" * 1_000_000)) <= MAX_LINE + 3
