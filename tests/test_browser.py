"""Every shipped workflow in the real ComfyUI frontend: opened as a user opens it, checked, edited, run from the page.

The page is the one each ComfyUI version of the `comfy` fixture serves (0.3.75: comfyui-frontend-package 1.32.9;
0.33.0: 1.49.6, which keeps node ids as strings), driven by Playwright in a headless Debian chromium (/usr/bin/chromium; `.ci/run` installs it, the tests skip only when it is absent). The server is
the session `comfy` fixture, which also holds tests/vhs_stub, a test stand-in for VideoHelperSuite (not
installable here) with VHS's exact node signatures and the bit of its web extension that restores its widgets.

Per workflow (workflows/*.json, found by glob), all in one browser session:
1. open the file with the Open command and the file chooser, as a user does; no dialog (a missing node type
   raises one), every node type registered in LiteGraph, every link where the file has it;
2. every node of ours shows the widget values the file holds, widget by widget in the frontend's order (the
   seed widget is followed by its "control_after_generate" widget, whose value the file stores right after
   the seed), the loader marks an official model that is not downloaded "(not downloaded)", and the page's own
   prompt (app.graphToPrompt) equals comfy-cli's converter's for the file;
3. a screenshot (focus mode, fit view, 1600x1000) into the test's tmp folder; with EASYANIMATE_UPDATE_SCREENSHOTS=1
   the 0.33 page's one also into docs/screenshots/<slug>.png and, scaled to 512 px, workflows/<name>.jpg (the
   template browser's thumbnail);
4. the widgets edited on the page to the tiny test models, 112x64, few frames and steps and the test images and
   clips instead of the example inputs (what test_workflows.shrink_for_tiny_models does to the converted
   prompt; the screenshot shows the example inputs the pack copied into input/), then queued from the page; the server
   accepts the POST /api/prompt, the run succeeds and the VHS stand-in writes the mp4 the file asks for;
5. the text each node of ours returned is shown in a box under it (web/js/easyanimate.js), which is neither
   saved in the workflow nor sent with the prompt.

What the frontend does differently from comfy-cli's converter (seen with these workflows): nothing in the
prompt once VHS's widget restoring is there — same nodes, links, and values up to number formatting (6 vs 6.0).
The converter finds the seed's control value by the input name (seed/noise_seed); the frontend adds the
control_after_generate widget for any INT input declared with control_after_generate (our sampler's seed) and
never sends it. Without VHS's web extension the frontend ignores VHS's name-keyed widgets_values and leaves
every VHS widget at its default (video = first input file, format = image/gif, no pix_fmt/crf widgets), while
the converter reads them by name: the stand-in's web/vhs_stub.js restores them as VHS does.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from comfy_media import TEST_HEIGHT, TEST_WIDTH, read_video
from comfy_server import execution_error
from conftest import REPO_ROOT
from test_workflows import WORKFLOWS, convert, load, shrink_for_tiny_models, vhs_info

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
VIEWPORT = {"width": 1600, "height": 1000}
SCALE = 2  # device pixels per CSS pixel: a fitted 3000-px-wide workflow is drawn at ~40 %, its text stays sharp
# no first-run templates dialog over the graph; full detail at any zoom (the frontend otherwise draws nodes as
# empty boxes once their text would be under 8 px); no FPS/node-count overlay in the screenshots
# and (frontend 1.49) no minimap over the lower right corner of the graph
SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 0, "Comfy.Graph.CanvasInfo": False,
            "Comfy.Minimap.Visible": False}
SCREENSHOT_DIR = REPO_ROOT / "docs" / "screenshots"
UPDATE_SCREENSHOTS = os.environ.get("EASYANIMATE_UPDATE_SCREENSHOTS") == "1"
SCREENSHOT_VERSION = "0.33"  # the page the screenshots and thumbnails show (the current ComfyUI)
THUMBNAIL_WIDTH = 512  # workflows/<name>.jpg: the template browser's card picture
NOTES_WIDGET = "easyanimate_notes"  # web/js/easyanimate.js: a node's returned text, shown under it
VHS_STUB_NODES = ("VHS_VideoCombine", "VHS_LoadVideo")
SERVER_ADDED_KEYS = {"has_intermediate_output", "is_input_list", "search_aliases"}
READY = ("() => !!(window.app?.vueAppReady && app.extensionManager?.workflow?.activeWorkflow && app.canvas"
         " && !document.querySelector('.p-blockui-mask'))")
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=(
    f"{CHROMIUM} is absent: the browser tests need Debian's chromium (apt-get install chromium; .ci/run does)"))


# ---------------------------------------------------------------------------------------------- helpers
def same(a, b) -> bool:
    """Equal, numbers compared numerically (the page sends 6 where a file holds 6.0); booleans stay booleans."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def prompt_differences(got: dict, want: dict) -> list[str]:
    """Node by node, input by input: where two API prompts differ (node titles in _meta are ignored)."""
    problems = []
    for nid in sorted(set(got) | set(want), key=str):
        if nid not in got or nid not in want:
            problems.append(f"node {nid}: only in {'the page' if nid in got else 'the reference'}")
            continue
        a, b = got[nid], want[nid]
        if a["class_type"] != b["class_type"]:
            problems.append(f"node {nid}: {a['class_type']} vs {b['class_type']}")
        for name in sorted(set(a["inputs"]) | set(b["inputs"])):
            if not same(a["inputs"].get(name, "<absent>"), b["inputs"].get(name, "<absent>")):
                problems.append(f"node {nid} ({a['class_type']}).{name}: page {a['inputs'].get(name, '<absent>')!r}"
                                f" vs reference {b['inputs'].get(name, '<absent>')!r}")
    return problems


# ---------------------------------------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def page(comfy, tmp_path_factory):
    """One headless chromium on the ComfyUI page for the whole module, ready, in focus mode."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:  # pragma: no cover - environment problem, said plainly
        raise RuntimeError("Playwright is needed for the browser tests: .venv/bin/pip install -r requirements-test.txt"
                           " (never `playwright install`: the tests use /usr/bin/chromium)") from err
    status, answer = comfy.post("/api/settings", SETTINGS)
    assert status == 200, f"POST /api/settings: {status} {answer}"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=SCALE)
            context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
                "http://127.0.0.1") else route.abort())
            tab = context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            tab.page_errors = []
            tab.on("pageerror", lambda error: tab.page_errors.append(str(error)))
            tab.console = []
            tab.on("console", lambda message: tab.console.append(f"{message.type}: {message.text}"[:500]))
            tab.goto(comfy.url)
            tab.wait_for_function(READY, timeout=TIMEOUT_MS)
            extensions = tab.evaluate("() => app.extensions.map(e => e.name)")
            assert "EasyAnimateTests.VideoHelperSuiteStandIn" in extensions, "the VHS stand-in's web extension"
            if not tab.evaluate("() => app.extensionManager.focusMode"):
                tab.evaluate("() => app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
            tab.wait_for_function("() => app.extensionManager.focusMode === true")
            tab.shots = tmp_path_factory.mktemp("screenshots")
            yield tab
        finally:
            browser.close()


def open_workflow(page, path: Path) -> None:
    """The Open command (Workflow → Open) and its file chooser, as a user opens a file."""
    for _ in range(3):  # a dialog left open by an earlier failure would hide this workflow's
        if not page.locator(".p-dialog").count():
            break
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)
    before = page.evaluate("() => app.extensionManager.workflow.activeWorkflow?.path ?? null")
    with page.expect_file_chooser() as chooser:
        page.evaluate("() => { app.extensionManager.command.execute('Comfy.OpenWorkflow') }")
    chooser.value.set_files(str(path))
    page.wait_for_function(
        """([before, name, count]) => {
            const active = app.extensionManager.workflow.activeWorkflow;
            return active && active.path !== before && active.filename === name && app.graph._nodes.length === count
                && !document.querySelector('.p-blockui-mask');
        }""", arg=[before, path.stem, len(load(path)["nodes"])])
    page.wait_for_timeout(300)  # let the canvas settle (extensions' onConfigure, a redraw)


def read_back(page) -> dict:
    return page.evaluate("""() => ({
        nodes: app.graph._nodes.map(n => ({
            // Number(): newer frontends (ComfyUI 0.33's) hold ids as strings
            id: Number(n.id), type: n.type, registered: LiteGraph.registered_node_types[n.type] !== undefined,
            widgets: (n.widgets ?? []).map(w => [w.name, w.value]),
        })),
        links: [...(app.graph.links instanceof Map ? app.graph.links.values() : Object.values(app.graph.links))]
            .filter(l => l).map(l => [Number(l.id), Number(l.origin_id), l.origin_slot, Number(l.target_id), l.target_slot,
                                     l.type]),
        dialogs: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.slice(0, 500)),
    })""")


def screenshot_name(stem: str) -> str:
    """docs/screenshots/<slug>.png: 'EasyAnimate V5 - Text to Video' → easyanimate_v5_text_to_video."""
    return re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")


def write_thumbnail(shot: Path, workflow: Path) -> Path:
    """workflows/<name>.jpg, the screenshot scaled down for the template browser's card."""
    from PIL import Image

    target = workflow.with_suffix(".jpg")
    with Image.open(shot) as image:
        height = round(image.height * THUMBNAIL_WIDTH / image.width)
        image.convert("RGB").resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(target, "JPEG", quality=85,
                                                                                  optimize=True)
    return target


def screenshot(page, workflow: Path, version: str) -> Path:
    page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
    page.wait_for_timeout(600)  # the fit view animates (0.35 s) on frontend 1.49
    shot = page.shots / f"{screenshot_name(workflow.stem)}.png"
    page.screenshot(path=str(shot))
    if UPDATE_SCREENSHOTS and version == SCREENSHOT_VERSION:
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT_DIR / shot.name)
        write_thumbnail(shot, workflow)
    return shot


def set_widget(page, node_id: int, name: str, value) -> None:
    """Edit a widget on the page as a user does: the new value, then the widget's callback."""
    found = page.evaluate("""([id, name, value]) => {
        const node = app.graph._nodes.find(n => String(n.id) === String(id));
        const widget = node?.widgets?.find(w => w.name === name);
        if (!widget) return false;
        widget.value = value;
        widget.callback?.(widget.value, app.canvas, node);
        node.setDirtyCanvas?.(true, true);
        return true;
    }""", [node_id, name, value])
    assert found, f"node {node_id} has no widget {name!r} on the page"


def queue_from_page(page, comfy) -> tuple[dict, dict]:
    """Queue with the page's own Queue action; (the prompt it sent, the server's answer). queuePrompt returns
    false even when the server accepts, so the answer is read from the POST /api/prompt response."""
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as response:
        page.evaluate("() => { app.queuePrompt(0, 1) }")
    sent = response.value.request.post_data_json
    assert response.value.status == 200, \
        f"the server refused the page's prompt ({response.value.status}): {response.value.text()[:4000]}"
    return sent, response.value.json()


# ---------------------------------------------------------------------------------------------- tests
def test_vhs_stand_in_declares_videohelpersuites_exact_signatures(comfy):
    """tests/vhs_stub shows VideoHelperSuite's recorded /object_info for its two nodes (the video list aside)."""
    live, recorded = comfy.object_info(), vhs_info()
    for name in VHS_STUB_NODES:
        got, want = copy.deepcopy(live[name]), copy.deepcopy(recorded[name])
        assert got["input"]["required"]["video" if name == "VHS_LoadVideo" else "images"]
        if name == "VHS_LoadVideo":  # the combo lists the video files in input/, on each machine its own
            assert {"clip.mp4", "pose.mp4"} <= set(got["input"]["required"]["video"][0])
            got["input"]["required"]["video"] = want["input"]["required"]["video"] = "<input files>"
        for entry in (got, want):
            entry.pop("description")
        # keys a newer ComfyUI (0.33) adds to every node's /object_info, absent from VHS's recording
        added = set(got) - set(want)
        assert added <= SERVER_ADDED_KEYS, f"{name}: /object_info has keys VideoHelperSuite's has not: {added}"
        for key in added:
            got.pop(key)
        assert got == want, f"{name}: the stand-in's /object_info differs from VideoHelperSuite's"


def test_vhs_stand_in_loads_and_writes_frames(comfy):
    """Load Video's frame options and size, then Video Combine as a ping-pong gif, through the server's API."""
    import imageio.v2 as imageio

    prompt = {
        "1": {"class_type": "VHS_LoadVideo", "inputs": {
            "video": "clip.mp4", "force_rate": 0, "custom_width": 56, "custom_height": 0, "frame_load_cap": 4,
            "skip_first_frames": 1, "select_every_nth": 2, "format": "None"}},
        "2": {"class_type": "VHS_VideoCombine", "inputs": {
            "images": ["1", 0], "frame_rate": 4, "loop_count": 0, "filename_prefix": "vhs_stub/check",
            "format": "image/gif", "pingpong": True, "save_output": True}},
    }
    entry = comfy.run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "success", json.dumps(execution_error(entry), indent=1)
    (item,) = entry["outputs"]["2"]["gifs"]
    assert (item["format"], item["type"], item["subfolder"]) == ("image/gif", "output", "vhs_stub")
    frames = imageio.mimread(comfy.output_dir / item["subfolder"] / item["filename"])
    # frames 1, 3, 5, 7 of the 10-frame clip, then back through 5 and 3; 112x64 scaled to 56 wide
    assert len(frames) == 6 and frames[0].shape[:2] == (TEST_HEIGHT // 2, TEST_WIDTH // 2)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_and_runs_in_the_real_frontend(path, page, comfy):
    started = time.perf_counter()
    workflow = load(path)
    open_workflow(page, path)
    seen = read_back(page)

    # 1. nothing missing: no dialog, every type registered, the same nodes and links
    assert not seen["dialogs"], \
        f"{path.name}: the page shows a dialog: {seen['dialogs']}\npage errors: {page.page_errors[-5:]}"
    unregistered = sorted({n["type"] for n in seen["nodes"] if not n["registered"]})
    assert not unregistered, \
        f"{path.name}: node types unknown to the frontend: {unregistered}\npage errors: {page.page_errors[-5:]}"
    assert sorted((n["id"], n["type"]) for n in seen["nodes"]) == sorted((n["id"], n["type"]) for n in
                                                                          workflow["nodes"])
    assert sorted(map(tuple, seen["links"])) == sorted(map(tuple, workflow["links"])), f"{path.name}: links differ"

    # 2. the file's values on our nodes, widget by widget in the frontend's order
    page_nodes = {n["id"]: n for n in seen["nodes"]}
    problems = []
    for node in workflow["nodes"]:
        if not node["type"].startswith("EasyAnimate"):
            continue
        widgets = page_nodes[node["id"]]["widgets"]
        names = [name for name, _ in widgets]
        if len(widgets) != len(node["widgets_values"]):
            problems.append(f"node {node['id']} ({node['type']}): the page has widgets {names}, the file "
                            f"{len(node['widgets_values'])} values {node['widgets_values']}")
            continue
        for (name, value), expected in zip(widgets, node["widgets_values"]):
            if not same(value, expected):
                problems.append(f"node {node['id']} ({node['type']}).{name}: page {value!r}, file {expected!r}")
    for node in workflow["nodes"]:  # VHS's name-keyed values, restored by the stand-in's web extension
        if node["type"] in VHS_STUB_NODES:
            for name, value in page_nodes[node["id"]]["widgets"]:
                if name in node["widgets_values"] and not same(value, node["widgets_values"][name]):
                    problems.append(f"node {node['id']} ({node['type']}).{name}: page {value!r}, file "
                                    f"{node['widgets_values'][name]!r}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)

    # ... the loader marks an official model that is not downloaded (the test server has only the tiny models)
    page.wait_for_function("""() => app.graph._nodes.filter(n => n.type === 'EasyAnimateModelLoader')
        .every(n => n.widgets.find(w => w.name === 'model_name').options.getOptionLabel)""", timeout=10_000)
    labels = page.evaluate("""() => app.graph._nodes.filter(n => n.type === 'EasyAnimateModelLoader').map(n => {
        const widget = n.widgets.find(w => w.name === 'model_name');
        return [widget.value, widget.options.getOptionLabel?.(widget.value) ?? null];
    })""")
    assert labels and all(label == f"{value} (not downloaded)" for value, label in labels), labels

    # ... and the page's own prompt is the converter's
    page_prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    converted = convert(workflow, comfy.object_info())
    differences = prompt_differences(page_prompt, converted)
    assert not differences, f"{path.name}: app.graphToPrompt() vs comfy-cli's converter:\n" + "\n".join(differences)

    # 3. what a user sees
    screenshot(page, path, comfy.version)

    # 4. edit to the tiny models on the page, queue from the page, run
    shrunk = copy.deepcopy(page_prompt)
    expected_frames = shrink_for_tiny_models(shrunk)
    for nid, node in shrunk.items():
        kind = node["class_type"]
        if kind == "VHS_LoadVideo":  # the example video (49 frames at 448x256) → the 10-frame 112x64 test clip
            node["inputs"]["video"] = "pose.mp4" if "pose" in node["inputs"]["video"] else "clip.mp4"
        elif kind not in ("LoadImage", "LoadImageMask") and not kind.startswith("EasyAnimate"):
            shrunk[nid] = copy.deepcopy(page_prompt[nid])
            continue
        for name, value in node["inputs"].items():
            if not same(value, page_prompt[nid]["inputs"][name]):
                set_widget(page, int(nid), name, value)
    sent, answer = queue_from_page(page, comfy)
    assert not answer.get("node_errors") and answer.get("prompt_id"), f"{path.name}: {answer}"
    differences = prompt_differences(sent["prompt"], shrunk)
    assert not differences, f"{path.name}: the queued prompt is not the edited workflow:\n" + "\n".join(differences)

    entry = comfy.wait(answer["prompt_id"], timeout=300)
    error = execution_error(entry)
    assert error is None and entry["status"]["status_str"] == "success", (
        f"{path.name} failed from the page:\n{json.dumps(error, indent=1)[:4000]}\n--- server log:\n"
        f"{comfy.log_tail()}")
    combines = [n for n in workflow["nodes"] if n["type"] == "VHS_VideoCombine"]
    assert combines
    for node in combines:
        items = entry["outputs"][str(node["id"])]["gifs"]
        assert len(items) == 1 and items[0]["format"] == "video/h264-mp4" and items[0]["type"] == "output"
        video = comfy.output_dir / items[0]["subfolder"] / items[0]["filename"]
        prefix = node["widgets_values"]["filename_prefix"]
        assert f"{items[0]['subfolder']}/{items[0]['filename']}".startswith(prefix + "_") and video.suffix == ".mp4"
        frames, size, fps = read_video(video)
        assert (frames, size, fps) == (expected_frames, (TEST_WIDTH, TEST_HEIGHT), 8.0), \
            f"{path.name}: {video} holds {frames} frames {size} at {fps} fps, not {expected_frames} 112x64 at 8"

    # 5. the text our nodes returned is shown under them (web/js/easyanimate.js), never saved nor sent
    check_notes_under_nodes(page, path, entry)
    print(f"\n[browser] {path.name}: {time.perf_counter() - started:.1f} s, {video.name}: {frames} frames")


def check_notes_under_nodes(page, path: Path, entry: dict) -> None:
    returned = {nid: out["text"] for nid, out in entry["outputs"].items() if out.get("text")}
    if not returned:
        # Nothing to show: in the KSampler workflows our nodes that return notes (loader, To ComfyUI Model) are
        # cached from the workflow before (ComfyUI reruns no node whose inputs are unchanged), and the others
        # (Text Encode (Conditioning), VAE Decode) return none. The other workflows check the notes.
        assert any(node["class_type"].startswith("EasyAnimate") for node in entry["prompt"][2].values())
        return
    try:
        page.wait_for_function("""([ids, name]) => ids.every(id => app.graph._nodes.find(n => String(n.id) === id)
            ?.widgets?.some(w => w.name === name && w.element?.value))""", arg=[list(returned), NOTES_WIDGET],
            timeout=20_000)
    except Exception as error:
        state = page.evaluate("""(ids) => ({extensions: app.extensions.map(e => e.name).filter(n => /EasyAnimate/.test(n)),
            widgets: ids.map(id => [id, (app.graph._nodes.find(n => String(n.id) === id)?.widgets ?? []).map(w => w.name)])})""",
            list(returned))
        raise AssertionError(f"{path.name}: the notes of nodes {sorted(returned)} are not shown under them: {state}\n"
                             f"page errors: {page.page_errors[-5:]}\nconsole: {page.console[-10:]}") from error
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
    shown = page.evaluate("""([ids, name]) => Object.fromEntries(ids.map(id => {
        const node = app.graph._nodes.find(n => String(n.id) === id);
        const widget = node.widgets.find(w => w.name === name);
        const box = widget.element.getBoundingClientRect();
        const style = getComputedStyle(widget.element);
        return [id, {text: widget.element.value, width: box.width, height: box.height,
                     visible: style.display !== 'none' && style.visibility !== 'hidden' && Number(style.opacity) > 0,
                     saved: node.serialize().widgets_values?.length ?? 0, widgets: node.widgets.length}];
    }))""", [list(returned), NOTES_WIDGET])
    for nid, text in returned.items():
        got = shown[nid]
        assert got["text"] == "\n".join(text), f"{path.name} node {nid}: shows {got['text']!r}, returned {text!r}"
        assert got["visible"] and got["width"] > 50 and got["height"] > 20, f"{path.name} node {nid}: {got}"
        assert got["saved"] < got["widgets"], f"{path.name} node {nid}: the notes box is saved in the workflow"
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert not [nid for nid, node in prompt.items() if NOTES_WIDGET in node["inputs"]], "the notes box is sent"
    if UPDATE_SCREENSHOTS:
        page.screenshot(path=str(page.shots / f"{screenshot_name(path.stem)}_notes.png"))
