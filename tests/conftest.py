"""Shared test fixtures: where the golden references live, and how to skip without them."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("EASYANIMATE_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))
GOLDEN_MODELS = GOLDEN_DIR / "models"


def golden_path(*parts: str) -> Path:
    """Path inside the golden folder; skips the calling test (with the reason) when it is absent."""
    path = GOLDEN_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"golden reference {path} is absent: these tests need ../shared/golden beside the checkout "
            "(or EASYANIMATE_GOLDEN_DIR pointing at it)"
        )
    return path


@pytest.fixture
def golden():
    """The golden folder as a callable: golden('cases', 'a_t2v_64x112_f5_ddim')."""
    return golden_path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: a tiny random model folder of a kind ('t2v', 'inpaint', 'control'), built once per session."""
    from tiny_model import build_tiny_model

    built = {}

    def get(kind: str = "t2v"):
        if kind not in built:
            built[kind] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{kind}"), kind)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    """Factory: a loaded float32 CPU pipeline over the tiny model of a kind, loaded once per session."""
    from easyanimate_core import load_pipeline

    loaded = {}

    def get(kind: str = "t2v"):
        if kind not in loaded:
            loaded[kind] = load_pipeline(tiny_model_dir(kind))
        return loaded[kind]

    return get


TINY_MODEL_NAMES = {"t2v": "EasyAnimateV5-tiny-zh", "inpaint": "EasyAnimateV5-tiny-zh-InP",
                    "control": "EasyAnimateV5-tiny-zh-Control"}


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, tiny_model_dir):
    """A real ComfyUI server with this pack installed and the tiny models under models/EasyAnimate/."""
    from comfy_media import write_test_inputs
    from comfy_server import ComfyServer

    server = ComfyServer(tmp_path_factory.mktemp("comfyui"), REPO_ROOT).prepare()
    for kind, name in TINY_MODEL_NAMES.items():
        (server.models_dir / name).symlink_to(tiny_model_dir(kind), target_is_directory=True)
    write_test_inputs(server.input_dir)
    server.start()
    yield server
    server.stop()
