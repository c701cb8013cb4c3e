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


VHS_STUB_DIR_NAME = "ComfyUI-VideoHelperSuite"
TINY_MODEL_NAMES = {"t2v": "EasyAnimateV5-tiny-zh", "inpaint": "EasyAnimateV5-tiny-zh-InP",
                    "control": "EasyAnimateV5-tiny-zh-Control"}
# LoRA files in the server's models/loras/: two that fit the tiny models (one per layout), one for V5.1.
TINY_LORAS = {"kohya": "EasyAnimateV5-tiny-zh-InP-MPS.safetensors", "peft": "tiny-style-peft.safetensors",
              "v51": "EasyAnimateV5.1-style.safetensors"}


def write_test_loras(folder: Path, transformer) -> None:
    import torch
    from safetensors.torch import save_file
    from tiny_lora import write_tiny_lora

    write_tiny_lora(folder / TINY_LORAS["kohya"], transformer, rank=4, seed=1, alpha=2.0, layout="kohya")
    write_tiny_lora(folder / TINY_LORAS["peft"], transformer, rank=2, seed=2, alpha=None, layout="peft")
    save_file({"lora_unet_transformer_blocks_0_attn1_add_q_proj.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_transformer_blocks_0_attn1_add_q_proj.lora_up.weight": torch.zeros(8, 4)},
              str(folder / TINY_LORAS["v51"]))


COMFYUI_VERSIONS = ("0.3.75", "0.33")


@pytest.fixture(scope="session", params=COMFYUI_VERSIONS, ids=[f"comfyui-{v}" for v in COMFYUI_VERSIONS])
def comfy(request, tmp_path_factory, tiny_model_dir, tiny_pipeline):
    """A real ComfyUI server with this pack (and the VHS test stand-in) installed and the tiny models under
    models/EasyAnimate/: every test that uses it runs on ComfyUI 0.3.75 and on 0.33.0 (skipped, saying
    why, where 0.33 is not set up)."""
    from comfy_media import write_test_inputs
    from comfy_server import ComfyServer, comfyui_033_missing

    version = request.param
    if version == "0.33" and comfyui_033_missing():
        pytest.skip(comfyui_033_missing())
    # tests/vhs_stub: a test stand-in for VideoHelperSuite (not installable here), under VHS's folder name
    server = ComfyServer(tmp_path_factory.mktemp(f"comfyui-{version}"), REPO_ROOT, version=version,
                         extra_packs={VHS_STUB_DIR_NAME: REPO_ROOT / "tests" / "vhs_stub"}).prepare()
    for kind, name in TINY_MODEL_NAMES.items():
        (server.models_dir / name).symlink_to(tiny_model_dir(kind), target_is_directory=True)
    write_test_inputs(server.input_dir)
    write_test_loras(server.base / "models" / "loras", tiny_pipeline("t2v").transformer)
    server.start()
    yield server
    server.stop()
