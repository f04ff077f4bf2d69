"""Progress bars (issue 13 item 5): tqdm on stderr, silent under --json and when stderr is not a terminal.

``dfmpc.evaluation.Progress(total, label, enabled, stream)``: ``enabled=None`` shows the bar only on a
terminal and only after ``DELAY_SECONDS`` (a short job prints nothing); True shows it at once; False
never. The terminal is faked with a StringIO whose ``isatty()`` is True; the delay is set to 0 where a
test needs the automatic bar to appear (a negative control for "silent": the same run does print).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from dfmpc import evaluation
from dfmpc.cli import main
from dfmpc.engine.builders import resnet_cifar
from dfmpc.evaluation import Progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def small():
    g = resnet_cifar(8, seed=4)
    x = np.random.default_rng(0).normal(size=(12, 1, 28, 28)).astype(np.float32)
    return g, x, g.run(x).argmax(1)


def test_forced_bar_goes_to_stderr_with_label_and_count(small, capsys):
    g, x, y = small
    assert evaluation.accuracy(g, x, y, batch_size=5, progress=True, label="checking") == 1.0
    out, err = capsys.readouterr()
    assert out == "" and "checking" in err and "12/12" in err and "img" in err


def test_silent_when_disabled_or_not_a_terminal(small, capsys, monkeypatch):
    """progress=False: nothing even on a terminal; progress=None: nothing when stderr is not a terminal."""
    monkeypatch.setattr(evaluation, "DELAY_SECONDS", 0.0)
    g, x, y = small
    evaluation.accuracy(g, x, y, batch_size=5, progress=None)            # capsys's stderr is not a terminal
    assert capsys.readouterr() == ("", "")
    tty = FakeTerminal()
    monkeypatch.setattr("sys.stderr", tty)
    evaluation.accuracy(g, x, y, batch_size=5, progress=False)
    assert tty.getvalue() == ""
    evaluation.accuracy(g, x, y, batch_size=5, progress=None, label="auto")   # negative control: a terminal shows it
    assert "auto" in tty.getvalue() and "12/12" in tty.getvalue()


def test_automatic_bar_waits_for_the_delay():
    """enabled=None on a terminal hands tqdm the delay (short jobs print nothing); forced bars have none."""
    bar = Progress(10, "x", None, FakeTerminal())
    assert bar.enabled and bar._bar.delay == evaluation.DELAY_SECONDS >= 1.0
    bar.close()
    bar = Progress(10, "x", True, io.StringIO())
    assert bar.enabled and bar._bar.delay == 0
    bar.close()
    assert not Progress(10, "x", None, io.StringIO()).enabled


def test_interface_absolute_counts_postfix_and_close():
    """update(done) takes the absolute count; postfix is shown; close is idempotent; `with` closes on error."""
    s = io.StringIO()
    bar = Progress(6, "steps", True, s, unit="step")
    bar.update(2, postfix="loss 0.5")
    bar.update(6)
    text = s.getvalue()
    assert "6/6" in text and "loss 0.5" in text and "step" in text and bar._bar is None
    bar.close()
    bar.update(6)                                  # after close: a no-op, nothing more written
    assert s.getvalue() == text
    with pytest.raises(RuntimeError):
        with Progress(6, "boom", True, io.StringIO()) as b:
            raise RuntimeError
    assert b._bar is None


@pytest.mark.parametrize("command", [["evaluate", "resnet20", "--limit", "20"],
                                     ["compare", "resnet20", "--limit", "30", "--calibration-images", "0",
                                      "--methods", "rtn"]])
def test_cli_silent_under_json_shown_on_a_terminal(command, capsys, monkeypatch):
    """On a (fake) terminal with no delay the CLI draws bars; with --json the same run writes nothing to stderr."""
    monkeypatch.setattr(evaluation, "DELAY_SECONDS", 0.0)
    tty = FakeTerminal()
    monkeypatch.setattr("sys.stderr", tty)
    assert main(command + ["--json"]) == 0
    out, _ = capsys.readouterr()
    json.loads(out)
    assert tty.getvalue() == ""
    assert main(command) == 0
    assert ("20/20" if command[0] == "evaluate" else "30/30") in tty.getvalue()       # the bar's count


def test_docstring_examples_of_evaluation():
    """The examples of dfmpc.evaluation (Progress drawn when forced and silent off a terminal; logits, accuracy) hold."""
    import doctest
    result = doctest.testmod(evaluation, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 8
