"""The service's log handler writes exactly what logging.basicConfig's would, in batches
on an event loop and at once elsewhere or for warnings."""

from __future__ import annotations

import asyncio
import io
import logging
import threading

from digitalme.loglines import LineFormatter, LineHandler

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _record(created: float, level: int = logging.INFO, msg: str = "a line") -> logging.LogRecord:
    record = logging.LogRecord("digitalme.test", level, __file__, 1, msg, None, None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def test_the_formatter_writes_what_logging_does() -> None:
    ours, theirs = LineFormatter(FORMAT), logging.Formatter(FORMAT)
    for created in (
        1_700_000_000.0,
        1_700_000_000.999,
        1_700_000_001.5,
        1_700_000_001.25,
        1_699_999_999.001,
        1_700_086_400.0,
    ):
        record = _record(created)
        assert ours.format(record) == theirs.format(record)
    assert ours.formatTime(_record(5.5), "%H") == theirs.formatTime(_record(5.5), "%H")


def _handler() -> tuple[LineHandler, io.StringIO]:
    stream = io.StringIO()
    handler = LineHandler(stream)
    handler.setFormatter(LineFormatter("%(levelname)s %(message)s"))
    return handler, stream


def test_outside_a_loop_each_line_is_written_at_once() -> None:
    handler, stream = _handler()
    handler.handle(_record(1.0, msg="one"))
    assert stream.getvalue() == "INFO one\n"


async def test_on_a_loop_lines_are_written_after_the_turn_in_order() -> None:
    handler, stream = _handler()
    handler.handle(_record(1.0, msg="one"))
    handler.handle(_record(1.0, msg="two"))
    assert stream.getvalue() == ""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert stream.getvalue() == "INFO one\nINFO two\n"
    handler.handle(_record(1.0, msg="three"))
    handler.handle(_record(1.0, logging.WARNING, msg="careful"))  # at once, after three
    assert stream.getvalue().endswith("INFO three\nWARNING careful\n")
    # A thread without a loop writes at once, with what the loop had not written yet.
    handler.handle(_record(1.0, msg="four"))
    thread = threading.Thread(target=handler.handle, args=(_record(1.0, msg="five"),))
    thread.start()
    thread.join()
    assert stream.getvalue().endswith("INFO four\nINFO five\n")
    handler.handle(_record(1.0, msg="six"))
    handler.flush()  # logging.shutdown at exit
    assert stream.getvalue().endswith("INFO six\n")


def test_a_line_left_by_a_finished_loop_does_not_hold_up_later_ones() -> None:
    handler, stream = _handler()

    async def log_and_stop() -> None:
        handler.handle(_record(1.0, msg="last on the loop"))

    loop = asyncio.new_event_loop()
    loop.run_until_complete(log_and_stop())
    loop.close()  # the scheduled write may never run
    handler.handle(_record(1.0, msg="after"))
    assert stream.getvalue().endswith("INFO last on the loop\nINFO after\n")
