"""What a run says goes through logging: --log-level, quiet ranks, and the
metrics mirrored to TensorBoard."""
import logging
import os

import pytest

from freeadv_fast import messages, train

TINY = ["digits", "--cpu", "--method", "natural", "--epochs", "2", "--eval-every", "1", "--eval-samples", "32",
        "--final-eval-steps", "1", "--final-eval-samples", "32", "--log-every", "2", "--train-subset", "256"]


@pytest.fixture(autouse=True)
def default_level(monkeypatch):
    monkeypatch.delenv("FREEADV_LOG_LEVEL", raising=False)
    yield
    # --log-level writes the variable for the workers: later tests in this process must not inherit it
    os.environ.pop("FREEADV_LOG_LEVEL", None)
    messages.set_level("info")


def test_tensorboard_gets_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert train.main(TINY + ["--tensorboard", "--out", str(tmp_path / "run")]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "train/lr", "eval/clean_top1", "eval/pgd-10"} <= tags, tags
    assert [e.step for e in events.Scalars("eval/clean_top1")] == sorted(e.step for e in events.Scalars("eval/clean_top1"))


def test_log_level_warning_keeps_errors_only(tmp_path, capsys):
    assert train.main(TINY + ["--log-level", "warning", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "configuration" not in err and "final evaluation" not in err
    assert train.main(["digits", "--log-level", "warning", "--epsilon", "2", "--out", str(tmp_path / "x")]) == 2
    assert "epsilon must be between 0 and 1" in capsys.readouterr().err


def test_ranks_other_than_0_say_warnings_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    messages.info("an info line")
    messages.warning("a warning line")
    err = capsys.readouterr().err
    assert "an info line" not in err and "a warning line" in err
    monkeypatch.setenv("RANK", "0")
    messages.info("an info line")
    assert "an info line" in capsys.readouterr().err


def test_the_logger_is_stdlib_logging():
    assert logging.getLogger("freeadv_fast") is messages.logger


def test_an_unknown_log_level_in_the_environment_is_said(monkeypatch, capsys):
    from freeadv_fast.cli import use_log_level
    monkeypatch.setenv("FREEADV_LOG_LEVEL", "bogus")  # was info without a word
    use_log_level(None)
    assert "FREEADV_LOG_LEVEL='bogus' is not one of debug, info, warning, error: using info" in capsys.readouterr().err
    assert messages.logger.level == logging.INFO
    monkeypatch.setenv("FREEADV_LOG_LEVEL", "WARNING")
    use_log_level(None)
    assert capsys.readouterr().err == "" and messages.logger.level == logging.WARNING
