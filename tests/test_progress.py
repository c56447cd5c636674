"""The progress bar in a log file: plain lines, no carriage-return redraws (a 300-step run once wrote 202 redraws)."""

import io

from mlstm.training.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drive(stream, steps: int = 300) -> str:
    bar = progress_bar(steps, 0, enabled=True, stream=stream)
    for step in range(1, steps + 1):
        if step % 10 == 0:  # as the trainer does at each training record
            bar.set_postfix(bpc=f"{5 - step / 100:.3f}", refresh=False)
        bar.update(1)
    bar.close()
    return stream.getvalue()


def test_a_log_file_gets_plain_lines_without_carriage_returns():
    text = drive(io.StringIO())
    lines = text.splitlines()
    assert "\r" not in text
    assert 1 <= len(lines) <= 3  # the start and the end (a line a minute at most in between)
    assert lines[-1].startswith("train: 300/300 steps") and "bpc=2.000" in lines[-1]


def test_a_terminal_keeps_the_redrawn_bar():
    assert "\r" in drive(Terminal())
