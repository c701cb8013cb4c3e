"""The shipped UI workflows (workflows/*.json): structure, VHS wiring, widget values, and a real run of each.

Each workflow is converted to the API format with comfy-cli's converter against the live server's
/object_info (plus VideoHelperSuite's recorded /object_info, since VHS is not installed), pointed at
the tiny models, shrunk, its VHS nodes swapped for core LoadVideo/CreateVideo/SaveVideo, and run.
"""
from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import pytest

from comfy_media import INPUT_VIDEO_FRAMES, TEST_HEIGHT, TEST_WIDTH, read_video
from comfy_server import execution_error
from conftest import TINY_LORAS, REPO_ROOT, TINY_MODEL_NAMES

WORKFLOW_DIR = REPO_ROOT / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
VHS_INFO_PATH = REPO_ROOT.parent / "shared" / "comfyui" / "object_info_vhs.json"

# task → (file, model kinds the workflow may name)
REQUIRED = {
    "text to video": ("EasyAnimate V5 - Text to Video.json", {"t2v"}),
    "image to video": ("EasyAnimate V5 - Image to Video.json", {"inpaint"}),
    "first + last frame": ("EasyAnimate V5 - First and Last Frame.json", {"inpaint"}),
    "video to video": ("EasyAnimate V5 - Video to Video.json", {"inpaint", "t2v"}),
    "region inpaint": ("EasyAnimate V5 - Region Inpaint.json", {"inpaint"}),
    "control (Canny)": ("EasyAnimate V5 - Control with Canny Edges.json", {"control"}),
    "control (pose video)": ("EasyAnimate V5 - Control with a Pose Video.json", {"control"}),
    "text to video + LoRA": ("EasyAnimate V5 - Text to Video with a LoRA.json", {"inpaint", "t2v"}),
    "text to video with a step cache": ("EasyAnimate V5 - Text to Video with a Step Cache.json", {"t2v", "inpaint"}),
    "long video (continuation)": ("EasyAnimate V5 - Long Video.json", {"inpaint"}),
    "long video from an image": ("EasyAnimate V5 - Long Video from an Image.json", {"inpaint"}),
    "long control video (windows)": ("EasyAnimate V5 - Long Control Video.json", {"control"}),
    "text to video with KSampler": ("EasyAnimate V5 - KSampler Text to Video.json", {"inpaint", "t2v"}),
    "KSampler + EasyCache": ("EasyAnimate V5 - KSampler with EasyCache.json", {"inpaint", "t2v"}),
    "long video with context windows": ("EasyAnimate V5 - KSampler Long Video with Context Windows.json",
                                        {"inpaint", "t2v"}),
}
# ComfyUI's own sampler on our MODEL (easyanimate_v5_ksampler_*): KSampler's values in those workflows
KSAMPLER_DEFAULTS = {"seed": 43, "steps": 50, "cfg": 6.0, "sampler_name": "ddim", "scheduler": "simple", "denoise": 1.0}
CONTEXT_WINDOW_NODES = {"WanContextWindowsManual", "ContextWindowsManual"}
LONG_VIDEO_FRAMES = 97  # the context-window workflow: twice the 49 trained frames (4k+1)
OFFICIAL_MODEL = re.compile(r"^EasyAnimateV5(\.1)?-(7b|12b)-zh(-InP|-Control)?$")
OFFICIAL_LORA = re.compile(r"^EasyAnimateV5-(7b|12b)-zh-InP-(HPS2\.1|MPS)\.safetensors$")
UI_ONLY_TYPES = {"Note", "MarkdownNote"}
VHS_UI_ONLY_WIDGETS = {"videopreview", "choose video to upload"}  # preview state and the upload button
SHRUNK_FRAMES, SHRUNK_STEPS = 5, 2
# long videos: 14 frames as two chunks of 9 overlapping by 4 (continue), or windows of 5 over the 9-frame clip
SHRUNK_LONG = {"total_frames": 14, "chunk_frames": 9, "overlap_frames": 4}
SHRUNK_WINDOWS = {"chunk_frames": 5, "overlap_frames": 4}
TITLE_HEIGHT = 30


def model_kind(name: str) -> str:
    """The kind an official folder name stands for: -InP → inpaint, -Control → control, else t2v."""
    if name.endswith("-InP"):
        return "inpaint"
    if name.endswith("-Control"):
        return "control"
    return "t2v"


def round_frames(count: int) -> int:
    return (count - 1) // 4 * 4 + 1


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def vhs_info() -> dict:
    """VideoHelperSuite's recorded /object_info (VHS is not on PyPI, so it cannot run in the tests)."""
    if not VHS_INFO_PATH.is_file():
        raise FileNotFoundError(f"{VHS_INFO_PATH} is missing: the VHS checks need ../shared/comfyui beside the "
                                "checkout (VideoHelperSuite's /object_info)")
    return json.loads(VHS_INFO_PATH.read_text())


@pytest.fixture(scope="module")
def object_info(comfy) -> dict:
    """The live server's /object_info with VideoHelperSuite's nodes merged in (VHS is not installed there)."""
    return {**vhs_info(), **comfy.object_info()}


def convert(workflow: dict, object_info: dict) -> dict:
    try:
        from comfy_cli.workflow_to_api import convert_ui_to_api
    except ImportError as err:  # pragma: no cover - environment problem, said plainly
        raise RuntimeError("comfy-cli is needed for the workflow tests: pip install comfy-cli==1.23.0") from err
    return convert_ui_to_api(workflow, object_info)


def spec_inputs(info: dict) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def widget_order(info: dict) -> list[str]:
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    return list(order.get("required", [])) + list(order.get("optional", []))


def is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def combo_options(spec):
    kind = spec[0]
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return spec[1].get("options", []) if len(spec) > 1 and isinstance(spec[1], dict) else []
    return None


def value_problem(name: str, spec, value) -> str | None:
    """Why `value` is not a valid value of the widget `spec`, or None."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    kind = spec[0] if not isinstance(spec[0], list) else "COMBO"
    if kind == "COMBO":
        choices = combo_options(spec)
        return None if value in choices else f"{name}={value!r} is not one of {choices}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name}={value!r} is not a number"
        if kind == "INT" and value != int(value):
            return f"{name}={value!r} is not an integer"
        low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
        if not low <= value <= high:
            return f"{name}={value!r} is outside [{low}, {high}]"
        step = options.get("step")
        if kind == "INT" and step and step > 1 and (value - options.get("min", 0)) % step:
            return f"{name}={value!r} is not min {options.get('min', 0)} + a multiple of step {step}"
        return None
    return f"{name}: unknown widget type {kind!r}"


def notes_text(workflow: dict) -> str:
    return " ".join(str(n["widgets_values"][0]) for n in workflow["nodes"] if n["type"] in UI_ONLY_TYPES)


def links_by_id(workflow: dict) -> dict:
    return {link[0]: link for link in workflow["links"]}


def nodes_of(workflow: dict, node_type: str) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] == node_type]


# ---------------------------------------------------------------------------------------------- the set
def test_the_shipped_workflows_cover_every_task():
    assert WORKFLOWS, f"no workflows in {WORKFLOW_DIR}"
    names = {p.name for p in WORKFLOWS}
    missing = {task: f for task, (f, _) in REQUIRED.items() if f not in names}
    assert not missing, f"workflows missing: {missing}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_a_well_formed_ui_graph(path):
    """UI format as the frontend saves it: consistent links, topological order, no overlapping nodes, a note."""
    wf = load(path)
    assert wf.get("version") == 0.4 and {"last_node_id", "last_link_id", "nodes", "links", "groups", "config",
                                         "extra"} <= set(wf)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
    links = links_by_id(wf)
    assert len(links) == len(wf["links"]) and (not links or wf["last_link_id"] >= max(links))
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "properties", "widgets_values"} <= set(node)
        if node["type"] not in UI_ONLY_TYPES:
            assert node["properties"].get("Node name for S&R") == node["type"]
        for slot, entry in enumerate(node.get("inputs", [])):
            if entry.get("link") is not None:
                link = links[entry["link"]]
                assert (link[3], link[4]) == (node["id"], slot), f"link {link} does not end at {node['type']}"
                assert link[5] == entry["type"]
        for slot, entry in enumerate(node.get("outputs", [])):
            for link_id in entry.get("links") or []:
                link = links[link_id]
                assert (link[1], link[2]) == (node["id"], slot) and link[5] == entry["type"]
    for link_id, src, src_slot, dst, dst_slot, _ in wf["links"]:
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[src]["order"] < nodes[dst]["order"], f"order: node {src} must run before node {dst}"
    # readable: no two nodes (title bar included) overlap
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in wf["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2], f"nodes {a[0]} and {b[0]} overlap"
    notes = [n for n in wf["nodes"] if n["type"] in UI_ONLY_TYPES and str(n["widgets_values"][0]).strip()]
    assert notes, f"{path.name} has no Note explaining it"


# ---------------------------------------------------------------------------------------------- VHS nodes
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_vhs_nodes_match_videohelpersuite(path):
    """Every VHS_* node against VideoHelperSuite's real /object_info: sockets, widget names, count and values."""
    wf, info = load(path), vhs_info()
    links = links_by_id(wf)
    nodes = {n["id"]: n for n in wf["nodes"]}
    vhs_nodes = [n for n in wf["nodes"] if n["type"].startswith("VHS_")]
    combines = nodes_of(wf, "VHS_VideoCombine")
    assert combines, f"{path.name} does not end in VHS_VideoCombine"
    for node in vhs_nodes:
        where = f"{path.name} node {node['id']} ({node['type']})"
        assert node["type"] in info, f"{where}: no such VideoHelperSuite node"
        schema = info[node["type"]]
        inputs = spec_inputs(schema)
        linked = set()
        for entry in node.get("inputs", []):
            assert entry["name"] in inputs, f"{where}: VHS has no input {entry['name']!r}"
            spec = inputs[entry["name"]]
            if entry.get("widget") is None:
                assert entry["type"] == spec[0], f"{where}: input {entry['name']} is {spec[0]}, not {entry['type']}"
            if entry.get("link") is not None:
                link = links[entry["link"]]
                src = nodes[link[1]]
                assert link[5] == spec[0], f"{where}: {entry['name']} gets a {link[5]} link, VHS wants {spec[0]}"
                assert src["outputs"][link[2]]["type"] == spec[0]
                linked.add(entry["name"])
        for slot, entry in enumerate(node.get("outputs", [])):
            assert (entry["name"], entry["type"]) == (schema["output_name"][slot], schema["output"][slot]), \
                f"{where}: output {slot} is {schema['output_name'][slot]}/{schema['output'][slot]}"
        for name, spec in inputs.items():
            if name in schema["input"].get("required", {}) and not is_widget(spec):
                assert name in linked, f"{where}: required input {name} is not connected"

        values = node["widgets_values"]
        assert isinstance(values, dict), f"{where}: VHS saves widgets_values as an object keyed by widget name"
        expected = {name: spec for name, spec in inputs.items() if is_widget(spec) and name not in linked}
        for name, spec in list(expected.items()):
            formats = spec[1].get("formats") if len(spec) > 1 and isinstance(spec[1], dict) else None
            chosen = formats.get(values.get(name)) if formats else None
            if isinstance(chosen, list):  # format-specific widgets (VHS_VideoCombine: pix_fmt, crf, ...)
                for extra in chosen:
                    expected[extra[0]] = extra[1:]
        given = set(values) - VHS_UI_ONLY_WIDGETS
        assert given == set(expected), \
            f"{where}: widgets {sorted(given)} != VHS's {sorted(expected)} for this format"
        problems = []
        for name, spec in expected.items():
            if node["type"] == "VHS_LoadVideo" and name == "video":
                # the combo lists the recording machine's input files: any video file name is fine
                if not re.search(r"\.(mp4|webm|mkv|mov|gif|avi)$", str(values[name])):
                    problems.append(f"video={values[name]!r} is not a video file name")
                continue
            problem = value_problem(name, spec, values[name])
            if problem:
                problems.append(problem)
        assert not problems, f"{where}: {problems}"
    for node in combines:
        values = node["widgets_values"]
        assert (values["frame_rate"], values["format"]) == (8, "video/h264-mp4"), \
            f"{path.name}: VHS_VideoCombine should write 8 fps video/h264-mp4 as the official workflows do"


# ---------------------------------------------------------------------------------------------- our nodes
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_easyanimate_widget_values_convert_to_values_our_nodes_accept(path, object_info):
    wf = load(path)
    for node in wf["nodes"]:
        if node["type"] not in UI_ONLY_TYPES:
            assert node["type"] in object_info, f"{path.name}: unknown node type {node['type']}"
    # every link joins an output and an input of the same type, as the schemas declare them
    nodes = {n["id"]: n for n in wf["nodes"]}
    for _, src, src_slot, dst, dst_slot, link_type in wf["links"]:
        src_info, dst_node = object_info[nodes[src]["type"]], nodes[dst]
        assert src_info["output"][src_slot] == link_type, f"{path.name}: link type {link_type} from {src}"
        name = dst_node["inputs"][dst_slot]["name"]
        assert spec_inputs(object_info[dst_node["type"]])[name][0] == link_type, f"{path.name}: {dst}.{name}"

    api = convert(wf, object_info)
    ours = {nid: n for nid, n in api.items() if n["class_type"].startswith("EasyAnimate")}
    assert ours
    problems = []
    for nid, node in ours.items():
        info = object_info[node["class_type"]]
        inputs = spec_inputs(info)
        where = f"node {nid} ({node['class_type']})"
        # the positional widgets_values hold exactly one value per widget (+ the seed's control value)
        ui_node = next(n for n in wf["nodes"] if str(n["id"]) == nid)
        socket_names = {e["name"] for e in ui_node.get("inputs", []) if e.get("widget") is None}
        widgets = [name for name in widget_order(info) if is_widget(inputs[name]) and name not in socket_names]
        controls = sum(1 for name in widgets if len(inputs[name]) > 1
                       and inputs[name][1].get("control_after_generate"))
        if len(ui_node["widgets_values"]) != len(widgets) + controls:
            problems.append(f"{where}: {len(ui_node['widgets_values'])} widget values for widgets {widgets}"
                            f" (+{controls} control)")
        unknown = set(node["inputs"]) - set(inputs)
        if unknown:
            problems.append(f"{where}: inputs our node does not have: {sorted(unknown)}")
        for name in info["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{where}: required input {name} missing")
        for name, value in node["inputs"].items():
            spec = inputs.get(name)
            if spec is None or isinstance(value, list):  # a link
                continue
            if node["class_type"] == "EasyAnimateModelLoader" and name == "model_name":
                if not OFFICIAL_MODEL.match(value):
                    problems.append(f"{where}: model_name {value!r} is not an official EasyAnimate V5 folder")
                continue
            if node["class_type"] == "EasyAnimateLoraLoader" and name == "lora_name":
                if not OFFICIAL_LORA.match(value):
                    problems.append(f"{where}: lora_name {value!r} is not an official EasyAnimate V5 reward LoRA")
                continue
            problem = value_problem(name, spec, value)
            if problem:
                problems.append(f"{where}: {problem}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)

    # defaults of the official V5 workflows
    default_negative = object_info["EasyAnimateTextEncode"]["input"]["required"]["negative_prompt"][1]["default"]
    by_type = {}
    for node in ours.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    for long in by_type.get("EasyAnimateLongVideoSampler", []):
        got = (long["seed"], long["steps"], long["cfg"], long["sampler_name"], long["chunk_frames"])
        assert got == (43, 50, 6.0, "DDIM", 49), f"{path.name}: long sampler {got}, not 43/50/6/DDIM/chunk 49"
    for sampler in by_type.get("EasyAnimateSampler", []):
        got = (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["sampler_name"])
        assert got == (43, 50, 6.0, "DDIM"), f"{path.name}: sampler (seed, steps, cfg, sampler) {got}, not 43/50/6/DDIM"
        source = api[sampler["latent_image"][0]]["class_type"]
        assert sampler["denoise"] == (0.7 if source == "EasyAnimateVAEEncode" else 1.0), f"denoise with {source}"
    for ksampler in [n["inputs"] for n in api.values() if n["class_type"] == "KSampler"]:
        got = {name: ksampler[name] for name in KSAMPLER_DEFAULTS}
        assert got == KSAMPLER_DEFAULTS, f"{path.name}: KSampler {got}, not {KSAMPLER_DEFAULTS}"
    for lora in by_type.get("EasyAnimateLoraLoader", []):
        assert lora["strength"] == 0.7, f"{path.name}: LoRA strength {lora['strength']}, not the suggested 0.7"
        assert lora["lora_name"] in notes_text(wf), f"{path.name}: the note does not say where to get the LoRA"
    texts = by_type.get("EasyAnimateTextEncode", []) + by_type.get("EasyAnimateTextEncodeConditioning", [])
    assert texts, f"{path.name}: no EasyAnimate text encoder"
    for text in texts:
        assert text["prompt"].strip(), f"{path.name}: empty prompt"
        assert text["negative_prompt"] == default_negative, f"{path.name}: negative prompt is not the node default"
    length = LONG_VIDEO_FRAMES if any(n["class_type"] in CONTEXT_WINDOW_NODES for n in api.values()) else 49
    for latent in by_type.get("EasyAnimateEmptyLatent", []):
        assert (latent["width"], latent["height"], latent["length"]) == (672, 384, length), f"{path.name}: {latent}"
    for i2v in by_type.get("EasyAnimateImageToVideo", []):
        assert (i2v["length"], i2v["size"]) == (49, "bucket 512"), f"{path.name}: {i2v}"
    loaders = by_type["EasyAnimateModelLoader"]
    required = {f: kinds for f, kinds in REQUIRED.values()}
    if path.name in required:
        kinds = {model_kind(loader["model_name"]) for loader in loaders}
        assert kinds <= required[path.name], f"{path.name} names a {kinds} model, wants {required[path.name]}"
    notes = " ".join(str(n["widgets_values"][0]) for n in wf["nodes"] if n["type"] in UI_ONLY_TYPES)
    for loader in loaders:
        name = loader["model_name"]
        assert name in notes and f"hf download alibaba-pai/{name}" in notes, \
            f"{path.name}: the note does not say where to get {name}"


# ---------------------------------------------------------------------------------------------- running them
def swap_vhs_for_core(api: dict, stem: str) -> list[str]:
    """VHS_LoadVideo → LoadVideo + GetVideoComponents; VHS_VideoCombine → CreateVideo + SaveVideo.

    Returns the SaveVideo node ids. Runs in place on the API prompt."""
    saves = []
    for nid, node in list(api.items()):
        if node["class_type"] == "VHS_LoadVideo":
            frames_id = f"{nid}0"
            assert frames_id not in api
            video = str(node["inputs"]["video"])
            api[nid] = {"class_type": "LoadVideo", "inputs": {"file": "pose.mp4" if "pose" in video else "clip.mp4"}}
            api[frames_id] = {"class_type": "GetVideoComponents", "inputs": {"video": [nid, 0]}}
            for other_id, other in api.items():
                for name, value in other["inputs"].items():
                    if isinstance(value, list) and len(value) == 2 and value[0] == nid and other_id != frames_id:
                        assert value[1] == 0, f"{other_id}.{name} uses VHS_LoadVideo output {value[1]}: not swapped"
                        other["inputs"][name] = [frames_id, 0]
        elif node["class_type"] == "VHS_VideoCombine":
            save_id = f"{nid}0"
            assert save_id not in api
            api[nid] = {"class_type": "CreateVideo",
                        "inputs": {"images": node["inputs"]["images"], "fps": float(node["inputs"]["frame_rate"])}}
            api[save_id] = {"class_type": "SaveVideo",
                            "inputs": {"video": [nid, 0], "filename_prefix": f"workflows/{stem}_{nid}",
                                       "format": "mp4", "codec": "h264"}}
            saves.append(save_id)
    assert not [n for n in api.values() if n["class_type"].startswith("VHS_")]
    return saves


def shrink_for_tiny_models(api: dict) -> int:
    """Tiny models, 112x64, few frames and steps, test inputs. Returns the frame count the output must have."""
    consumers = {}
    for node in api.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                consumers.setdefault(value[0], set()).add(name)
    expected = SHRUNK_FRAMES
    for nid, node in api.items():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "EasyAnimateModelLoader":
            inputs["model_name"] = TINY_MODEL_NAMES[model_kind(inputs["model_name"])]
        elif kind == "EasyAnimateEmptyLatent":
            inputs.update(width=TEST_WIDTH, height=TEST_HEIGHT, length=SHRUNK_FRAMES)
        elif kind == "EasyAnimateImageToVideo":
            inputs.update(length=SHRUNK_FRAMES, size="explicit", width=TEST_WIDTH, height=TEST_HEIGHT)
        elif kind in ("EasyAnimateVideoInpaint", "EasyAnimateControlVideo"):
            inputs.update(size="explicit", width=TEST_WIDTH, height=TEST_HEIGHT)
            expected = round_frames(INPUT_VIDEO_FRAMES)  # the 10-frame clip: the nodes use its first 9
        elif kind == "EasyAnimateVAEEncode":
            inputs["size"] = "input"  # the clip is already 112x64
            expected = round_frames(INPUT_VIDEO_FRAMES)
        elif kind in ("EasyAnimateSampler", "KSampler"):
            inputs["steps"] = SHRUNK_STEPS
        elif kind == "EasyAnimateLongVideoSampler":
            inputs.update(steps=SHRUNK_STEPS, size="explicit", width=TEST_WIDTH, height=TEST_HEIGHT)
            if inputs["mode"] == "windows":  # over the 10-frame clip: its first 9 frames, two windows
                inputs.update(SHRUNK_WINDOWS)
                expected = round_frames(INPUT_VIDEO_FRAMES)
            else:
                inputs.update(SHRUNK_LONG)
                expected = SHRUNK_LONG["total_frames"]
        elif kind in CONTEXT_WINDOW_NODES:  # windows of 1 latent frame over the 2 of the shrunk video
            inputs.update(context_length=1, context_overlap=0)
        elif kind == "EasyAnimateLoraLoader":
            inputs["lora_name"] = TINY_LORAS["kohya"]
        elif kind == "EasyAnimateTrainingDataset":
            inputs.update(resolution=64, image_resolution=64, max_frames=1)
        elif kind == "EasyAnimateTrainLoRA":
            inputs.update(steps=2, save_every=0)
        elif kind == "LoadImage":
            inputs["image"] = "end.png" if "end_image" in consumers.get(nid, ()) else "start.png"
        elif kind == "LoadImageMask":
            inputs["image"] = "start.png"  # its red channel: a gradient plus a white square to regenerate
    return expected


def run_workflow(comfy, object_info, path: Path, model_kind_override: str | None = None, label: str = "") -> None:
    """Convert, swap VHS for core nodes, shrink, run to success; check every saved mp4 and print the wall time."""
    api = convert(load(path), object_info)
    original = copy.deepcopy(api)
    for nid, node in api.items():  # what VHS itself would receive: every required input, no preview state
        if node["class_type"].startswith("VHS_"):
            required = object_info[node["class_type"]]["input"]["required"]
            assert set(required) <= set(node["inputs"]) and "videopreview" not in node["inputs"], \
                f"{path.name}: converted {node['class_type']} {nid} lacks {set(required) - set(node['inputs'])}"
    saves = swap_vhs_for_core(api, path.stem + label)
    expected_frames = shrink_for_tiny_models(api)
    assert saves, f"{path.name}: nothing saves a video"
    if model_kind_override:
        for node in api.values():
            if node["class_type"] == "EasyAnimateModelLoader":
                node["inputs"]["model_name"] = TINY_MODEL_NAMES[model_kind_override]

    started = time.perf_counter()
    entry = comfy.run(api, timeout=300)
    seconds = time.perf_counter() - started
    error = execution_error(entry)
    assert error is None and entry["status"]["status_str"] == "success", (
        f"{path.name} failed:\n{json.dumps(error, indent=1)[:4000]}\n--- converted prompt:\n"
        f"{json.dumps(original, indent=1, ensure_ascii=False)[:3000]}\n--- server log:\n{comfy.log_tail()}")

    for save_id in saves:
        items = entry["outputs"][save_id]["images"]
        assert len(items) == 1
        video = comfy.output_dir / items[0]["subfolder"] / items[0]["filename"]
        frames, size, fps = read_video(video)
        print(f"\n[workflow] {path.name}{label}: {seconds:.2f} s wall, {video.name}: {frames} frames, "
              f"{size[0]}x{size[1]}, {fps:g} fps")
        assert (frames, size, fps) == (expected_frames, (TEST_WIDTH, TEST_HEIGHT), 8.0), \
            f"{path.name}: {video} holds {frames} frames {size} at {fps} fps, not {expected_frames} 112x64 at 8"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_on_the_tiny_models(path, comfy, object_info):
    run_workflow(comfy, object_info, path)


def test_video_to_video_workflow_also_runs_on_a_t2v_model(comfy, object_info):
    """Its note says the text-to-video model works too (video to video is T2V or InP)."""
    run_workflow(comfy, object_info, WORKFLOW_DIR / REQUIRED["video to video"][0], "t2v", label="_t2v_model")
