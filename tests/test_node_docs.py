"""Node help pages: web/docs/<NodeId>/en.md for every node, served by ComfyUI where its frontend looks for them.

ComfyUI serves a pack's WEB_DIRECTORY at /extensions/<pack folder name>/ (server.py adds a static route per
nodes.EXTENSION_WEB_DIRS entry). Both frontends (1.32.9 with ComfyUI 0.3.75, 1.49.6 with 0.33.0) ask for
/extensions/<pack>/docs/<NodeId>/<locale>.md first and fall back to /extensions/<pack>/docs/<NodeId>.md
(NodeHelpService.fetchCustomNodeHelp): the first request is the one that answers. Inputs and outputs are
written as one list item each ("- `name` — type, default/range: meaning"), which the 306 px side panel shows
whole, where 4-column tables were cut after "type".
"""
from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from comfy_server import PACK_DIR_NAME
from conftest import REPO_ROOT

DOCS_DIR = REPO_ROOT / "web" / "docs"
LOCALE = "en"


def page(name: str) -> Path:
    return DOCS_DIR / name / f"{LOCALE}.md"


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {title}\b.*?$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else ""


@pytest.fixture(scope="module")
def our_nodes(comfy) -> dict:
    """/object_info entries of this pack's nodes (category EasyAnimate)."""
    info = comfy.object_info()
    nodes = {name: entry for name, entry in info.items()
             if name.startswith("EasyAnimate") and entry.get("category", "").startswith("EasyAnimate")}
    assert len(nodes) >= 12, f"expected the pack's nodes in /object_info, got {sorted(nodes)}"
    return nodes


def input_names(entry: dict) -> list[str]:
    inputs = entry.get("input", {})
    return [name for section in ("required", "optional") for name in inputs.get(section, {})]


def fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


def test_every_node_has_a_help_page(our_nodes):
    missing = [name for name in sorted(our_nodes) if not page(name).is_file()]
    assert not missing, f"no web/docs/<id>/{LOCALE}.md for: {missing}"


def test_help_pages_are_served_by_comfyui(comfy, our_nodes):
    for name in sorted(our_nodes):
        url = f"{comfy.url}/extensions/{PACK_DIR_NAME}/docs/{name}/{LOCALE}.md"  # the page's first request
        status, body = fetch(url)
        assert status == 200, f"{url} answered {status}"
        assert body == page(name).read_bytes(), f"{url} does not serve web/docs/{name}/{LOCALE}.md"


@pytest.mark.parametrize("section", ["Inputs", "Outputs", "Typical values"])
def test_help_pages_have_the_sections(our_nodes, section):
    for name in sorted(our_nodes):
        text = page(name).read_text(encoding="utf-8")
        assert re.search(rf"^#+ {section}\b", text, re.MULTILINE), f"{name}.md has no '{section}' section"


def test_help_pages_start_with_the_display_name(our_nodes):
    for name, entry in sorted(our_nodes.items()):
        first = page(name).read_text(encoding="utf-8").splitlines()[0]
        assert first == f"# {entry['display_name']}", f"{name}.md starts with {first!r}"


def test_help_pages_mention_every_input(our_nodes):
    for name, entry in sorted(our_nodes.items()):
        text = page(name).read_text(encoding="utf-8")
        names = input_names(entry)
        assert names, f"/object_info lists no inputs for {name}"
        absent = [n for n in names if f"`{n}`" not in text]
        assert not absent, f"{name}.md does not mention the inputs {absent}"


def test_inputs_and_outputs_are_list_items_not_tables(our_nodes):
    for name, entry in sorted(our_nodes.items()):
        text = page(name).read_text(encoding="utf-8")
        assert not re.search(r"^\|", text, re.MULTILINE), f"{name}: tables are cut off in the side panel; use lists"
        inputs = section(text, "Inputs")
        for input_name in input_names(entry):
            assert re.search(rf"^- `{input_name}` — \S.*?: \S", inputs, re.MULTILINE), \
                f"{name}: no '- `{input_name}` — type, default/range: meaning' item under Inputs"
        items = re.findall(r"^- `\w+` — \S.*?: \S", section(text, "Outputs"), re.MULTILINE)
        assert len(items) == len(entry.get("output", [])), \
            f"{name}: Outputs should list each of the {len(entry.get('output', []))} outputs as '- `name` — type: meaning'"
