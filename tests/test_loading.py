"""Model-folder validation and weight loading: every failure names the file and what to do."""
import shutil

import pytest
import torch
from safetensors.torch import load_file as reference_load_file

from easyanimate_core import CheckpointError, ModelFolderError, load_pipeline
from easyanimate_core.loading import validate_model_dir
from easyanimate_core.safetensors_io import load_file, read_index


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A writable copy of the tiny T2V model folder."""
    return shutil.copytree(tiny_model_dir("t2v"), tmp_path / "EasyAnimateV5-tiny")


def test_missing_folder_names_it_and_shows_the_tree(tmp_path):
    missing = tmp_path / "EasyAnimateV5-12b-zh-InP"
    with pytest.raises(ModelFolderError) as err:
        load_pipeline(missing)
    message = str(err.value)
    assert str(missing) in message and "does not exist" in message
    assert "transformer/diffusion_pytorch_model.safetensors" in message  # the expected tree
    assert "hf download alibaba-pai/" in message


@pytest.mark.parametrize("relative", [
    "transformer/diffusion_pytorch_model.safetensors", "transformer/config.json", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/vocab.txt",
    "text_encoder_2/model.safetensors", "tokenizer_2/spiece.model", "scheduler/scheduler_config.json",
])
def test_missing_file_is_named(model_copy, relative):
    (model_copy / relative).unlink()
    with pytest.raises(ModelFolderError) as err:
        load_pipeline(model_copy)
    message = str(err.value)
    assert f"missing {model_copy / relative}" in message
    assert "Expected layout" in message and "scheduler/scheduler_config.json" in message


def test_missing_subfolder_is_named(model_copy):
    shutil.rmtree(model_copy / "vae")
    with pytest.raises(ModelFolderError, match=r"missing .*vae \(folder\)"):
        validate_model_dir(model_copy)


@pytest.mark.parametrize("relative", ["transformer/diffusion_pytorch_model.safetensors",
                                      "vae/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"])
def test_truncated_safetensors_is_named(model_copy, relative):
    path = model_copy / relative
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_pipeline(model_copy)
    assert str(path) in str(err.value) and "truncated" in str(err.value)
    assert "Download it again" in str(err.value) or "download the file again" in str(err.value)


def test_garbage_file_is_named(model_copy):
    path = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"\xff\x00garbage" * 40)  # HTML pages, git-lfs pointers, empty files: test_damaged_files.py
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as err:
        load_pipeline(model_copy)
    assert str(path) in str(err.value)


def test_missing_shard_of_sharded_text_encoder_is_named(model_copy):
    folder = model_copy / "text_encoder_2"
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"shared.weight": "model-00001-of-00002.safetensors", '
        '"encoder.final_layer_norm.weight": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(ModelFolderError, match="model-00002-of-00002.safetensors.*listed in model.safetensors.index.json"):
        validate_model_dir(model_copy)


def test_unknown_in_channels_is_refused(model_copy):
    config = model_copy / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"in_channels": 16', '"in_channels": 48'))
    with pytest.raises(CheckpointError, match=r"in_channels 48 is not an EasyAnimate V5 model"):
        validate_model_dir(model_copy)


def test_config_weights_disagreement_names_the_tensor(model_copy):
    config = model_copy / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"in_channels": 16', '"in_channels": 33'))
    with pytest.raises(CheckpointError, match=r"tensor 'proj.weight' has shape \[32, 16, 2, 2\], the model expects "
                                              r"\[32, 33, 2, 2\]"):
        load_pipeline(model_copy)


def test_foreign_weights_are_refused(model_copy):
    from safetensors.torch import save_file
    path = model_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({"lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32)}, str(path))
    with pytest.raises(CheckpointError, match="unexpected tensors.*not V5.1, not a LoRA") as err:
        load_pipeline(model_copy)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("kind", ["t2v", "inpaint", "control"])
def test_kind_from_in_channels(tiny_model_dir, kind):
    assert validate_model_dir(tiny_model_dir(kind)).kind == kind


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bf16", "fp32"])
def test_dtypes_load_and_generate(tiny_model_dir, dtype):
    pipe = load_pipeline(tiny_model_dir("t2v"), dtype=dtype)
    want = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype, dtype)
    assert next(pipe.transformer.parameters()).dtype == want
    vae_dtype = next(pipe.vae.parameters()).dtype
    assert vae_dtype == (torch.float32 if want == torch.float16 else want)  # fp16 VAE is upcast
    out = pipe.generate("a cat", height=32, width=32, num_frames=1, num_inference_steps=2)
    assert out.frames.dtype == torch.float32 and torch.isfinite(out.frames).all()


def test_loaded_weights_equal_the_file_and_nothing_stays_on_meta(tiny_model_dir):
    root = tiny_model_dir("inpaint")
    pipe = load_pipeline(root)
    for module, path in ((pipe.transformer, root / "transformer/diffusion_pytorch_model.safetensors"),
                         (pipe.vae, root / "vae/diffusion_pytorch_model.safetensors")):
        state = module.state_dict()
        for name, tensor in reference_load_file(str(path)).items():
            assert torch.equal(state[name], tensor), name
        assert not any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def test_streamed_reader_matches_safetensors(golden):
    for path in golden("models").rglob("*.safetensors"):
        ours, theirs = load_file(path), reference_load_file(str(path))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours), path
        assert read_index(path).total_bytes == sum(t.numel() * t.element_size() for t in theirs.values())


def test_streamed_reader_handles_scalars_bools_empty_and_float8(tmp_path):
    from safetensors.torch import save_file
    tensors = {"alpha": torch.tensor(64.0), "flags": torch.tensor([True, False]), "empty": torch.zeros(0, 3),
               "half": torch.randn(3, 4).to(torch.bfloat16), "fp8": torch.randn(4).to(torch.float8_e4m3fn)}
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    loaded = load_file(tmp_path / "odd.safetensors")
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].float(), tensor.float()), name
    assert load_file(tmp_path / "odd.safetensors", dtype=torch.float16)["half"].dtype == torch.float16
    assert load_file(tmp_path / "odd.safetensors", dtype=torch.float16)["flags"].dtype == torch.bool
