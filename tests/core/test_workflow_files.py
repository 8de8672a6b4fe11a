"""The shipped workflow files' names, which ComfyUI's template browser shows as the cards' titles
(and descriptions) and sorts by (workflows/graphs.py, FILES): readable, and in the intended order,
MoLE first, then MoA, each in figure order; each file with its card picture and API twin."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from workflows import graphs  # noqa: E402

# "NN MoLE|MoA <figure> - <title>": letters, digits, spaces and ".,()-" only: no "_" (the title shows
# it raw), nothing Windows refuses in a file name.
READABLE = re.compile(r"(?P<n>\d\d) (?P<paper>MoLE|MoA) (?P<what>[A-Za-z]+\.?(?: \d+(?:, \d+)*)?) - [A-Za-z0-9 .,()-]+")


def _figure(what: str) -> tuple:
    """'Fig. 8, 9' -> ('Fig', 8); 'quickstart' -> ('', 0): the quickstart leads its paper."""
    number = re.search(r"\d+", what)
    return (what.split(".")[0], int(number.group())) if number else ("", 0)


def order_problems(names: list[str]) -> list[str]:
    """What is wrong with these file names, given in the intended order (graphs.WORKFLOWS')."""
    unreadable = [n for n in names if not READABLE.fullmatch(n) or n != n.strip() or n.endswith(".") or "  " in n]
    if unreadable:
        return [f"{n!r} does not read as a template title" for n in unreadable]
    problems = []
    if sorted(names) != names:  # the browser's "Alphabetical" sort
        problems.append(f"sorted by name they come as {sorted(names)}")
    parts = [READABLE.fullmatch(n) for n in names]
    if [int(p["n"]) for p in parts] != list(range(1, len(names) + 1)):
        problems.append("not numbered 01, 02, ... in order")
    papers = [p["paper"] for p in parts]
    if papers != sorted(papers, key=["MoLE", "MoA"].index):
        problems.append(f"MoLE does not come before MoA: {papers}")
    for paper in ("MoLE", "MoA"):
        figures = [_figure(p["what"]) for p in parts if p["paper"] == paper]
        if figures != sorted(figures):
            problems.append(f"{paper} figures out of order: {figures}")
    return problems


def test_file_names_read_as_titles_in_the_intended_order():
    """Sorted by name (the "Alphabetical" sort of the template browser; the numbers decide it), the
    files come in graphs.WORKFLOWS' order, numbered 01.., MoLE before MoA, figures ascending, the
    MoA quickstart first among MoA."""
    names = [g.file_stem for g in graphs.all_graphs()]
    assert len(set(names)) == len(names) == len(graphs.FILES)
    assert order_problems(names) == []
    first_moa = next(n for n in names if " MoA " in n)
    assert first_moa == graphs.FILES["moa_fastcomposer_quickstart"]
    assert all(Path(f"{n}.json").stem == n for n in names)


@pytest.mark.parametrize(
    "change",
    [
        lambda names: [n.replace(" - ", "_") for n in names],  # raw file-name style
        lambda names: names[1:] + names[:1],  # numbers no longer in order
        lambda names: [n[3:] for n in names],  # unnumbered: "MoA ..." sorts before "MoLE ..."
        lambda names: [f"{i + 1:02d}{n[2:]}" for i, n in enumerate(names[7:] + names[:7])],  # MoA first
        lambda names: [f"{i + 1:02d}{n[2:]}" for i, n in enumerate(names[:8] + names[8:][::-1])],  # MoA figures
    ],
)
def test_the_order_check_fails_on_a_wrong_list(change):
    assert order_problems(change([g.file_stem for g in graphs.all_graphs()]))


@pytest.mark.parametrize("name", graphs.FILES.values())
def test_each_file_has_its_card_picture_and_api_twin(name):
    for path in (REPO / "workflows" / f"{name}.json", REPO / "workflows" / f"{name}.jpg"):
        assert path.is_file(), f"missing {path.relative_to(REPO)}"
    assert (REPO / "workflows" / "api" / f"{name}.json").is_file()


def test_no_other_files_in_the_template_folder():
    """ComfyUI lists every workflows/*.json as a template: only the named ones are there."""
    shipped = set(graphs.FILES.values())
    assert {p.stem for p in (REPO / "workflows").glob("*.json")} == shipped
    assert {p.stem for p in (REPO / "workflows").glob("*.jpg")} == shipped
    assert {p.stem for p in (REPO / "workflows" / "api").glob("*.json")} == shipped
