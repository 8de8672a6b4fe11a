"""The template browser's card pictures: a title card per workflow, readable at card size (the
paper, the figure, what it shows, and whether it runs on downloadable weights or needs training
first), instead of a screenshot of the graph, whose text is unreadable at that size."""

from __future__ import annotations

from pathlib import Path

from .builder import Graph

SIZE = 512  # square: the browser fits the picture into the card's square thumbnail
PAPER_COLOURS = {"MoLE": (0, 110, 120), "MoA": (96, 64, 160)}
READY, TRAIN = (46, 140, 70), (200, 110, 20)
FONTS = Path("/usr/share/fonts/truetype/dejavu")


def _font(size: int, bold: bool = True):
    from PIL import ImageFont

    path = FONTS / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    return ImageFont.truetype(str(path), size) if path.is_file() else ImageFont.load_default(size)


def card_lines(g: Graph) -> tuple[str, str, str, str]:
    """(paper, figure, subject, status) of a workflow, from its file name "NN Paper Figure - subject
    (base, ...)" and its files."""
    number_paper_figure, subject = g.file_stem.split(" - ", 1)
    _, paper, figure = number_paper_figure.split(" ", 2)
    subject = subject.split(" (")[0]
    base = "SDXL" if g.base == "SDXL" else "SD1.5"
    if g.trained_files:
        status = f"{base} - train first"
    elif paper == "MoA":
        status = f"{base} - FastComposer weights"
    else:
        status = f"{base} - released weights"
    return paper, figure.replace("quickstart", "Quick start"), subject, status


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if lines[-1] and draw.textlength(line, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = line
    return lines


def write_card(g: Graph, jpg: Path) -> None:
    from PIL import Image, ImageDraw

    paper, figure, subject, status = card_lines(g)
    image = Image.new("RGB", (SIZE, SIZE), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, SIZE, 150), fill=PAPER_COLOURS[paper])
    draw.text((32, 24), paper, font=_font(64), fill="white")
    draw.text((32, 100), figure, font=_font(34, bold=False), fill="white")
    y = 185
    for line in _wrap(draw, subject, _font(50), SIZE - 64)[:3]:
        draw.text((32, y), line, font=_font(50), fill=(30, 30, 30))
        y += 64
    colour = TRAIN if "train" in status else READY
    draw.rounded_rectangle((24, SIZE - 92, SIZE - 24, SIZE - 28), radius=14, fill=colour)
    size = 30
    while draw.textlength(status, font=_font(size)) > SIZE - 80:
        size -= 1
    draw.text((SIZE // 2, SIZE - 60), status, font=_font(size), fill="white", anchor="mm")
    image.save(jpg, quality=90)
