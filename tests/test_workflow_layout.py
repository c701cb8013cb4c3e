"""Every workflows/*.json as the page shows it: a readable title, a thumbnail, and a layout that reads at fit view.

Checked on the files (no browser), so every workflow added later is held to the same rules:
- title: ComfyUI's template browser (frontend 1.32.9 and 1.49.6 alike) lists a pack's workflows/*.json by file
  name and shows that name as the card's title (custom templates carry no other title), so the file name is the
  title: "EasyAnimate V5 - <Task>";
- thumbnail: the card's picture is /api/workflow_templates/<pack>/<name>.jpg, i.e. workflows/<name>.jpg (written
  from the browser test's screenshot by EASYANIMATE_UPDATE_SCREENSHOTS=1);
- layout: two rows (a horizontal line between them crosses no node; the loaders above, the samplers and outputs
  below), no saved view (the page then fits the graph), and at fit view on a 1600x1000 window a zoom above the
  frontend's text threshold: fitToBounds zooms to 0.75 x min(width / bounds width, height / bounds height), and
  below about 0.57 LiteGraph draws nodes without their text (14 px text under its 8 px minimum).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO_ROOT

WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
WINDOW = (1600, 1000)
FIT_ZOOM = 0.75  # LGraphCanvas.ds.fitToBounds' default, used by the page's fit view
TEXT_THRESHOLD = 0.57  # 8 px minimum font size / 14 px node text
TITLE_HEIGHT = 30
TITLE = re.compile(r"^EasyAnimate V5 - [A-Z0-9][\w ,()+&'-]*$")
SAMPLERS_AND_OUTPUTS = re.compile(r"Sampler|VideoCombine|SaveVideo|SaveImage|SaveAnimated|PreviewImage|VAEDecode")
THUMBNAIL_WIDTH = (256, 800)


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def boxes(workflow: dict) -> list[tuple[dict, float, float, float, float]]:
    """(node, left, top, right, bottom) with the title bar, as the canvas draws it."""
    return [(n, n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in workflow["nodes"]]


def fit_zoom(workflow: dict, window=WINDOW) -> float:
    b = boxes(workflow)
    width = max(r for *_, r, _ in b) - min(left for _, left, *_ in b)
    height = max(bottom for *_, bottom in b) - min(top for _, _, top, *_ in b)
    return FIT_ZOOM * min(window[0] / max(width, 300), window[1] / max(height, 300))


def row_split(workflow: dict) -> float | None:
    """A y that no node crosses, splitting the graph in an upper and a lower row (the widest gap), or None."""
    spans = sorted((top, bottom) for _, _, top, _, bottom in boxes(workflow))
    best, reach = None, spans[0][1]
    for top, bottom in spans[1:]:
        if top > reach and (best is None or top - reach > best[1] - best[0]):
            best = (reach, top)
        reach = max(reach, bottom)
    return None if best is None else (best[0] + best[1]) / 2


def test_there_are_workflows():
    assert WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_file_name_is_a_readable_title(path):
    assert TITLE.match(path.stem), (f"{path.name}: the template browser shows the file name as the title; name it "
                                    "'EasyAnimate V5 - <Task>.json' (words and spaces, e.g. 'EasyAnimate V5 - Text "
                                    "to Video.json')")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_has_a_thumbnail(path):
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), (f"no {thumbnail.name}: run the browser test with EASYANIMATE_UPDATE_SCREENSHOTS=1 "
                                 "(it writes docs/screenshots/ and the thumbnails)")
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and THUMBNAIL_WIDTH[0] <= image.width <= THUMBNAIL_WIDTH[1]
        assert 1.3 < image.width / image.height < 2.0
    assert thumbnail.stat().st_size < 150_000


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_layout_reads_at_fit_view_in_two_rows(path):
    workflow = load(path)
    view = workflow.get("extra", {}).get("ds")
    assert view is None, f"{path.name} stores a view ({view}): save none, so the page fits the graph on opening"
    zoom = fit_zoom(workflow)
    assert zoom > TEXT_THRESHOLD + 0.03, (f"{path.name}: fit view on {WINDOW[0]}x{WINDOW[1]} zooms to {zoom:.2f}, "
                                          f"where the text is not drawn (below ~{TEXT_THRESHOLD}): make it narrower "
                                          "(about 1700 wide, 1150 high at most)")
    split = row_split(workflow)
    assert split is not None, f"{path.name}: lay the nodes out in two rows (no horizontal gap between nodes)"
    for node, _, top, _, bottom in boxes(workflow):
        if "Loader" in node["type"]:
            assert bottom < split, f"{path.name}: {node['type']} belongs in the upper row (inputs)"
        elif SAMPLERS_AND_OUTPUTS.search(node["type"]):
            assert top > split, f"{path.name}: {node['type']} belongs in the lower row (sampling and output)"
