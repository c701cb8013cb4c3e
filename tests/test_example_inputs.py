"""Example inputs ship with the workflows: every file a workflow loads is in example_inputs/, small and valid,
and install.py and the pack's import (in a real ComfyUI) copy them into ComfyUI's input/ folder."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from example_inputs import EXAMPLE_INPUTS, FOLDER, copy_missing
from test_packaging import run_install_script

WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
MEDIA = re.compile(r"\.(png|jpe?g|webp|gif|bmp|tiff?|mp4|webm|mkv|mov|avi|wav|mp3|flac|ogg)$", re.IGNORECASE)
MAX_BYTES = 100_000


def loaded_files(workflow: dict) -> set[str]:
    """Every file name a node's widgets name (positional or VHS's name-keyed values); Notes aside."""
    names = set()
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        values = node.get("widgets_values") or []
        for value in values.values() if isinstance(values, dict) else values:
            if isinstance(value, str) and MEDIA.search(value):
                names.add(value)
    return names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_file_a_workflow_loads_ships_with_the_pack(path):
    names = loaded_files(json.loads(path.read_text(encoding="utf-8")))
    missing = sorted(n for n in names if n not in EXAMPLE_INPUTS or not (FOLDER / n).is_file())
    assert not missing, (f"{path.name} loads {missing}, which do not ship in example_inputs/: use one of "
                         f"{', '.join(EXAMPLE_INPUTS)} (see README, 'Example inputs') or add the file there")


def test_the_example_inputs_are_small_and_valid():
    import imageio.v2 as imageio

    for name in EXAMPLE_INPUTS:
        path = FOLDER / name
        assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size} bytes"
        if name.endswith(".png"):
            image = np.asarray(Image.open(path).convert("RGB"))
            assert image.shape == (256, 448, 3) and image.std() > 10, name
        else:
            with imageio.get_reader(path) as reader:
                frames = [np.asarray(f) for f in reader]
            assert len(frames) == 49 and frames[0].shape == (256, 448, 3) and frames[0].std() > 10, name
            changed = max((np.abs(f.astype(int) - frames[0].astype(int)).max(-1) > 40).mean() for f in frames)
            assert changed > 0.005, f"{name} does not move"
    mask = np.asarray(Image.open(FOLDER / "mask.png"))[..., 0]
    assert set(np.unique(mask)) == {0, 255} and 0.05 < (mask == 255).mean() < 0.5  # white = regenerate


def test_copy_missing_never_overwrites_a_users_file(tmp_path):
    (tmp_path / "mask.png").write_bytes(b"mine")
    assert copy_missing(tmp_path) == [n for n in EXAMPLE_INPUTS if n != "mask.png"]
    assert (tmp_path / "mask.png").read_bytes() == b"mine"
    assert (tmp_path / "start_frame.png").read_bytes() == (FOLDER / "start_frame.png").read_bytes()
    assert copy_missing(tmp_path) == []


def test_install_script_copies_them_into_comfyui_input(tmp_path):
    result = run_install_script(tmp_path)
    inputs = tmp_path / "ComfyUI" / "input"
    assert sorted(p.name for p in inputs.iterdir()) == sorted(EXAMPLE_INPUTS)
    assert "copied" in result.stdout


def test_comfyui_has_them_in_input_after_loading_the_pack(comfy):
    """The pack's import copied them (the fixture only wrote its own test clips there; the browser test may since
    have put tiny clips under the same names, so the log says what was copied)."""
    copied = [line for line in comfy.log().splitlines() if "EasyAnimate: copied the example inputs" in line]
    assert copied and all(name in copied[0] for name in EXAMPLE_INPUTS), comfy.log()[-3000:]
    assert all((comfy.input_dir / name).is_file() for name in EXAMPLE_INPUTS)
    listed = comfy.get("/object_info/LoadImage")["LoadImage"]["input"]["required"]["image"][0]
    assert {"start_frame.png", "end_frame.png", "mask.png"} <= set(listed)
