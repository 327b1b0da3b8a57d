"""The image ESD Erase Concept shows when it finishes: the loss curve (raw points faint, smoothed line bright) and,
when previews were on, the first and the last preview side by side. Pure PIL; the live chart in the browser
(web/js/esd_live_view.js) draws the same curve with the same smoothing."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

WIDTH, PLOT_HEIGHT, MARGIN = 512, 220, 36
BACKGROUND, AXIS, RAW, SMOOTH, TEXT = (24, 24, 27), (90, 90, 96), (70, 110, 160), (120, 190, 255), (220, 220, 225)


def smoothing_weight(n: int) -> float:
    """Exponential smoothing over about a thirtieth of the run (at least 1, at most 100 iterations)."""
    span = min(max(n / 30, 1.0), 100.0)
    return 1.0 - 1.0 / span


def smoothed(values: list[float]) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): early points are not pulled towards 0."""
    weight = smoothing_weight(len(values))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i) if weight > 0 else v)
    return out


def loss_plot(losses: list[float]) -> Image.Image:
    image = Image.new("RGB", (WIDTH, PLOT_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    left, top, right, bottom = MARGIN + 14, 22, WIDTH - 10, PLOT_HEIGHT - 22
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS)
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(len(losses) - 1, 1))
            return x, bottom - (bottom - top) * (v - low) / span

        for i, v in enumerate(losses):
            x, y = xy(i, v)
            draw.point((x, y), fill=RAW)
        if len(losses) > 1:
            draw.line([xy(i, v) for i, v in enumerate(smoothed(losses))], fill=SMOOTH, width=2)
        draw.text((4, top - 6), f"{high:.3g}", fill=TEXT, font=font)
        draw.text((4, bottom - 6), f"{low:.3g}", fill=TEXT, font=font)
        draw.text((right, bottom + 4), f"{len(losses)}", fill=TEXT, font=font, anchor="ra")
        draw.text((left, 4), f"loss  (final {losses[-1]:.4g}, smoothed {smoothed(losses)[-1]:.4g})", fill=TEXT,
                  font=font)
    draw.text((left, bottom + 4), "iteration", fill=TEXT, font=font)
    return image


def final_image(losses: list[float], previews: list[tuple[int, Image.Image]]) -> Image.Image:
    """The loss plot, under the first and the last preview (labelled with their iteration) when there are any."""
    plot = loss_plot(losses)
    if not previews:
        return plot
    side = (WIDTH - 3 * 8) // 2
    strip = Image.new("RGB", (WIDTH, side + 28), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=13)
    first, last = previews[0], previews[-1]
    for k, (step, preview) in enumerate([first, last]):
        x = 8 + k * (side + 8)
        strip.paste(preview.convert("RGB").resize((side, side), Image.Resampling.LANCZOS), (x, 8))
        label = "before training" if step == 0 else f"after {step} iterations"
        draw.text((x + side // 2, side + 12), label, fill=TEXT, font=font, anchor="ma")
    out = Image.new("RGB", (WIDTH, strip.height + plot.height), BACKGROUND)
    out.paste(strip, (0, 0))
    out.paste(plot, (0, strip.height))
    return out
