"""The runner's progress display off a terminal: plain lines with the full stage name, at sensible moments."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from mopd.execution.progress import PlainProgress, format_elapsed, stage_progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=80), out


def test_a_non_terminal_console_gets_plain_lines_and_a_terminal_gets_bars():
    console, _ = plain_console()
    assert isinstance(stage_progress(console), PlainProgress)
    assert isinstance(stage_progress(Console(file=io.StringIO(), force_terminal=True)), Progress)


def test_plain_lines_keep_the_full_stage_name_and_the_metrics_past_80_columns():
    console, out = plain_console()
    clock = Clock()
    name = "teacher_reversal_with_a_rather_long_stage_name"
    with PlainProgress(console, clock=clock) as progress:
        task = progress.add_task(name, total=1000, info="")
        clock.now = 3725.0
        progress.update(task, completed=1000, info="loss=0.123 reward=0.875 rkl=0.042")
    (line,) = out.getvalue().splitlines()
    assert line == f"{name}  step 1000/1000 (100%)  1:02:05  loss=0.123 reward=0.875 rkl=0.042"
    assert len(line) > 80


def test_lines_come_each_tenth_of_a_stage_and_at_its_end_not_every_step():
    console, out = plain_console()
    clock = Clock()
    with PlainProgress(console, interval=1e9, clock=clock) as progress:
        task = progress.add_task("student", total=1000, info="")
        for step in range(1, 1001):
            clock.now = step * 0.001
            progress.update(task, completed=step, info=f"loss={1 / step:.3f}")
    steps = [line.split()[2] for line in out.getvalue().splitlines()]
    # the first step, then once per new tenth (100, 200, ...), the last one exactly once
    assert steps == ["1/1000", *(f"{k}/1000" for k in range(100, 1001, 100))]


def test_a_slow_stage_prints_every_interval_seconds():
    console, out = plain_console()
    clock = Clock()
    with PlainProgress(console, interval=30.0, clock=clock) as progress:
        task = progress.add_task("base", total=10_000, info="")
        for step in range(1, 51):  # 50 steps of 2 s: far below a tenth of the stage
            clock.now = 2.0 * step
            progress.update(task, completed=step, info="")
    steps = [int(line.split()[2].split("/")[0]) for line in out.getvalue().splitlines()]
    assert steps == [1, 16, 31, 46]  # 2 s, 32 s, 62 s, 92 s


def test_a_skipped_stage_is_one_line_with_its_markup_as_text():
    console, out = plain_console()
    with PlainProgress(console) as progress:
        task = progress.add_task("sft", total=50, info="")
        progress.update(task, completed=50, info="[dim]finished earlier (same identity): skipped")
        progress.update(task, completed=50)  # the runner's closing update prints nothing more
    assert out.getvalue().splitlines() == ["sft  step 50/50 (100%)  0:00:00  finished earlier (same identity): skipped"]


def test_the_console_is_the_one_given_so_warnings_go_between_the_lines():
    console, out = plain_console()
    with stage_progress(console) as progress:
        progress.console.print("warning: x")
    assert progress.console is console and out.getvalue() == "warning: x\n"


def test_elapsed_time_format():
    assert [format_elapsed(s) for s in (0, 59.9, 61, 3600 * 12 + 5)] == ["0:00:00", "0:00:59", "0:01:01", "12:00:05"]


def test_it_is_a_drop_in_for_the_runners_bars(tmp_path, monkeypatch):
    """The runner's own calls (add_task, update with `completed` and `info`, `.console`) on a real small run."""
    import mopd.execution.runner as runner
    from mopd.recipe.load import load_recipe

    (tmp_path / "r.yaml").write_text(
        "name: plain\ndomains: [addition]\neval: {size: 4, max_new_tokens: 4}\nstages:\n"
        "  a_stage_name_longer_than_the_bars_column:\n    kind: pretrain\n"
        "    model: {hidden_size: 16, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 16}\n"
        "    steps: 20\n    batch_size: 4\n"
        "  sft: {kind: sft, init: a_stage_name_longer_than_the_bars_column, steps: 2, batch_size: 4}\n")
    console, out = plain_console()
    runner.run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "run", console)
    lines = [line for line in out.getvalue().splitlines() if "step " in line]
    first = [line for line in lines if line.startswith("a_stage_name_longer_than_the_bars_column  step ")]
    # step 1, each tenth (2, 4, ..., 20): the end once
    assert [line.split()[2] for line in first] == ["1/20", *(f"{k}/20" for k in range(2, 21, 2))]
    assert "loss=" in first[-1] and "━" not in out.getvalue()
    assert [line.split()[2] for line in lines if line.startswith("sft  step ")] == ["1/2", "2/2"]
