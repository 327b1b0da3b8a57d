"""The live training view's pure parts: the message batcher's rate bound and the final loss image.
(The view inside the real host: tests/host/test_live_view.py; in a real browser: tests/host/test_browser.py.)"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nodes.loss_plot import final_image, smoothed, smoothing_weight
from nodes.message_batcher import MIN_INTERVAL, MessageBatcher


class FakeLoop:
    """A clock and call_later, run by hand: advance(dt) fires the timers that fall due."""

    def __init__(self):
        self.now, self.timers = 0.0, []

    def call_later(self, delay, callback):
        timer = Timer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def advance(self, dt):
        end = self.now + dt
        while due := sorted((t for t in self.timers if not t.cancelled and t.when <= end), key=lambda t: t.when):
            self.now = due[0].when
            self.timers.remove(due[0])
            due[0].callback()
        self.now = end


class Timer:
    def __init__(self, when, callback):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self):
        self.cancelled = True


def message(step, phase="training"):
    return {"phase": phase, "step": step, "points": [[step, 1.0 / step]] if step else []}


def run(iterations, seconds_per_iteration):
    loop, sent = FakeLoop(), []
    batcher = MessageBatcher(lambda m: sent.append((loop.now, m)), lambda: loop.now, loop.call_later)
    batcher.post(message(0, "loading"))
    for step in range(1, iterations + 1):
        loop.advance(seconds_per_iteration)
        batcher.post(message(step))
    loop.advance(0.01)
    batcher.post(message(0, "done") | {"step": iterations})
    return sent


@pytest.mark.parametrize("seconds_per_iteration", [0.0005, 0.013, 0.1, 0.7])
def test_at_most_ten_messages_a_second_and_every_point_once(seconds_per_iteration):
    sent = run(2000, seconds_per_iteration)
    times = [t for t, _ in sent]
    # consecutive messages are MIN_INTERVAL apart, except the terminal one, sent at once
    assert all(b - a >= MIN_INTERVAL - 1e-9 for a, b in zip(times[:-2], times[1:-1]))
    assert len(sent) <= (times[-1] - times[0]) / MIN_INTERVAL + 2
    points = [p[0] for _, m in sent for p in m["points"]]
    assert points == list(range(1, 2001))  # nothing lost, nothing twice, in order
    assert sent[0][1]["phase"] == "loading" and sent[-1][1]["phase"] == "done"
    if seconds_per_iteration >= MIN_INTERVAL:
        assert len(sent) == 2002  # slow iterations: every one is sent as it comes


def test_fast_iterations_are_batched():
    sent = run(2000, 0.0005)  # 2000 it/s for 1 s
    assert len(sent) <= 13
    assert max(len(m["points"]) for _, m in sent) >= 150


def test_the_newest_state_is_not_held_back():
    """A phase change right after a message is held, and sent when the interval is up, without another post."""
    loop, sent = FakeLoop(), []
    batcher = MessageBatcher(lambda m: sent.append((loop.now, m)), lambda: loop.now, loop.call_later)
    batcher.post(message(0, "loading"))
    loop.advance(0.02)
    batcher.post(message(0, "encoding"))
    assert [m["phase"] for _, m in sent] == ["loading"]
    loop.advance(5.0)  # a long phase: no further posts
    assert [(round(t, 3), m["phase"]) for t, m in sent] == [(0.0, "loading"), (0.1, "encoding")]


def test_smoothing_is_debiased_and_follows_the_values():
    assert smoothed([5.0] * 50) == pytest.approx([5.0] * 50)  # not pulled towards 0 at the start
    steps = smoothed([1.0] * 100 + [0.0] * 100)
    assert steps[99] == pytest.approx(1.0) and 0.0 < steps[120] < 1.0 and steps[-1] < 0.01
    assert smoothing_weight(30) == 0.0 and smoothing_weight(3000) == pytest.approx(0.99)
    assert smoothing_weight(10 ** 6) == pytest.approx(0.99)  # at most a 100-iteration span


def test_final_image_shows_the_plot_under_the_first_and_last_preview():
    losses = [1.0 / (1 + i) for i in range(200)]
    plot = final_image(losses, [])
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    both = final_image(losses, [(0, red), (100, Image.new("RGB", (64, 64))), (200, blue)])
    assert both.width == plot.width and both.height > plot.height + 200
    left, right = both.getpixel((both.width // 4, 100)), both.getpixel((3 * both.width // 4, 100))
    assert left == (255, 0, 0) and right == (0, 0, 255)  # before training | after the last iteration
    assert both.crop((0, both.height - plot.height, both.width, both.height)).tobytes() == plot.tobytes()
    assert (np.asarray(plot) == (120, 190, 255)).all(axis=2).sum() > 300  # the smoothed line is drawn
