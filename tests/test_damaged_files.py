"""Damaged or mixed-up model folders (core): every file the loader reads is checked for what it really is,
tokenizers are checked at load time, text-encoder weights load strictly, and single files / pickle-only
folders are explained."""
import shutil

import pytest
from safetensors.torch import save_file

from easyanimate_core import CheckpointError, ModelFolderError, load_pipeline
from easyanimate_core.file_checks import describe_damage
from easyanimate_core.loading import download_hint, official_model_for, validate_model_dir
from easyanimate_core.lora import set_loras

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 3087152\n")
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Access denied</body></html>\n"
DAMAGES = {"lfs": (LFS_POINTER, "git-lfs pointer", "git lfs pull"), "html": (HTML_PAGE, "HTML page", "again"),
           "empty": (b"", "empty (0 bytes)", "again")}
# Every file the loader reads from a model folder (the tiny model has each of them).
READ_FILES = [
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "tokenizer/vocab.txt",
    "tokenizer/tokenizer_config.json", "tokenizer_2/spiece.model", "tokenizer_2/tokenizer_config.json",
    "scheduler/scheduler_config.json",
]
# Read when present (the published folders have them; the tiny model, saved by transformers 5, does not).
OPTIONAL_READ_FILES = ["tokenizer/special_tokens_map.json", "tokenizer_2/special_tokens_map.json",
                       "tokenizer/added_tokens.json"]


@pytest.fixture(scope="module")
def shared_copy(tiny_model_dir, tmp_path_factory):
    """One writable copy of the tiny T2V folder for checks that restore what they damage."""
    return shutil.copytree(tiny_model_dir("t2v"), tmp_path_factory.mktemp("damaged") / "EasyAnimateV5-7b-zh")


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir("t2v"), tmp_path / "EasyAnimateV5-tiny")


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("relative", READ_FILES + OPTIONAL_READ_FILES)
def test_every_read_file_that_is_a_pointer_a_page_or_empty_is_named(shared_copy, relative, damage):
    path = shared_copy / relative
    if relative in READ_FILES and not path.exists():
        pytest.fail(f"the tiny model lacks {relative}; the list of read files is out of date")
    content, what, fix = DAMAGES[damage]
    original = path.read_bytes() if path.exists() else None
    path.write_bytes(content)
    try:
        with pytest.raises(CheckpointError) as err:
            validate_model_dir(shared_copy)
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_bytes(original)
    message = str(err.value)
    assert str(path) in message and what in message and fix in message, message


def test_lfs_pointer_spiece_model_no_longer_gives_package_advice(model_copy):
    """The reported case: a clone without git-lfs. The message names the file and git lfs, not packages."""
    (model_copy / "tokenizer_2" / "spiece.model").write_bytes(LFS_POINTER)
    with pytest.raises(CheckpointError) as err:
        load_pipeline(model_copy)
    message = str(err.value)
    assert "tokenizer_2/spiece.model is a git-lfs pointer" in message and "git lfs pull" in message
    assert "pip install" not in message and "tiktoken" not in message


def test_sniffing_leaves_real_files_alone(tiny_model_dir):
    for path in tiny_model_dir("t2v").rglob("*"):
        if path.is_file():
            assert describe_damage(path) is None, path


def test_damaged_spiece_model_is_named_without_wrong_package_advice(model_copy):
    path = model_copy / "tokenizer_2" / "spiece.model"
    path.write_bytes(bytes(range(256)) * 3)
    with pytest.raises(CheckpointError) as err:
        load_pipeline(model_copy)
    message = str(err.value)
    assert str(path) in message and "could not be read as a sentencepiece model" in message
    assert "tiktoken" not in message and "Download it again" in message


@pytest.mark.parametrize("vocab, fragment", [
    ("\n\n", "lists no tokens"),
    (None, "has no unknown-word token '[UNK]'"),
])
def test_unusable_vocab_is_refused_at_load_time(model_copy, vocab, fragment):
    path = model_copy / "tokenizer" / "vocab.txt"
    if vocab is None:  # the real vocabulary without its [UNK] line: loads, then fails on the first unknown word
        vocab = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if line != "[UNK]") + "\n"
    path.write_text(vocab, encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        load_pipeline(model_copy)
    assert str(path) in str(err.value) and fragment in str(err.value) and "Download it again" in str(err.value)


def test_bert_weights_in_text_encoder_2_are_refused_naming_the_file(model_copy):
    """transformers would load them 'successfully' with every T5 weight random: silent garbage."""
    target = model_copy / "text_encoder_2" / "model.safetensors"
    shutil.copy(model_copy / "text_encoder" / "model.safetensors", target)
    with pytest.raises(CheckpointError) as err:
        load_pipeline(model_copy)
    message = str(err.value)
    assert str(target) in message and "missing tensors" in message and "unexpected tensors" in message
    assert "look like BERT weights" in message and "random weights" in message


def test_missing_encoder_tensor_is_refused(model_copy):
    from safetensors.torch import load_file

    path = model_copy / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    dropped = "encoder.layer.0.attention.self.query.weight"
    del state[dropped]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{path}.*1 missing tensors, e.g. \['{dropped}'\]"):
        load_pipeline(model_copy)


def test_swapped_text_encoder_folders_are_named(model_copy):
    (model_copy / "text_encoder").rename(model_copy / "swap")
    (model_copy / "text_encoder_2").rename(model_copy / "text_encoder")
    (model_copy / "swap").rename(model_copy / "text_encoder_2")
    with pytest.raises(CheckpointError, match=r"text_encoder/config.json describes a 't5' model.*mixed up"):
        load_pipeline(model_copy)


def test_single_file_checkpoint_says_unsupported_and_shows_the_layout(tmp_path):
    single = tmp_path / "EasyAnimateV5-7b-zh-InP.safetensors"
    save_file({"x": __import__("torch").zeros(1)}, str(single))
    with pytest.raises(ModelFolderError) as err:
        load_pipeline(single)
    message = str(err.value)
    assert "single-file checkpoints are not supported" in message
    assert "transformer/diffusion_pytorch_model.safetensors" in message and "tokenizer_2/spiece.model" in message
    assert "alibaba-pai/EasyAnimateV5-7b-zh-InP" in message


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_weights_are_never_loaded_and_the_message_says_why(model_copy, pickle_name):
    folder = model_copy / "text_encoder_2"
    (folder / "model.safetensors").rename(folder / pickle_name)
    with pytest.raises(CheckpointError) as err:
        load_pipeline(model_copy)
    message = str(err.value)
    assert f"{folder} holds only pickle weights ({pickle_name})" in message
    assert "never loaded, for safety" in message and "safetensors versions" in message
    assert "incomplete" not in message


def test_pickle_lora_says_why_before_anything_else(tiny_pipeline, tmp_path):
    lora = tmp_path / "style.pt"
    lora.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError) as err:
        set_loras(tiny_pipeline("t2v").transformer, [(lora, 0.7)])
    message = str(err.value)
    assert message.startswith(f"LoRA {lora} is a pickle file") and "never loaded, for safety" in message
    assert "corrupt" not in message


@pytest.mark.parametrize("asked, official", [
    ("EasyAnimateV5-7b-zh-InP", "EasyAnimateV5-7b-zh-InP"), ("easyanimatev5-7b-zh", "EasyAnimateV5-7b-zh"),
    ("alibaba-pai/EasyAnimateV5-12b-zh-Control", "EasyAnimateV5-12b-zh-Control"),
    ("EasyAnimateV5-7b-zh-InP-copy", "EasyAnimateV5-7b-zh-InP"), ("my-model", None),
])
def test_download_hint_names_the_model_asked_for(tmp_path, asked, official):
    assert official_model_for(asked) == official
    hint = download_hint(tmp_path / asked.rsplit("/", 1)[-1])
    if official:
        assert f"alibaba-pai/{official} --local-dir" in hint
    else:
        assert "alibaba-pai/<model>" in hint and "EasyAnimateV5-12b-zh-InP --local-dir" not in hint


def test_cli_check_finds_damaged_tokenizers_and_pointers(model_copy):
    from test_cli import run_cli

    vocab = model_copy / "tokenizer" / "vocab.txt"
    vocab.write_text("\n".join(line for line in vocab.read_text(encoding="utf-8").splitlines() if line != "[UNK]"),
                     encoding="utf-8")
    result = run_cli("check", "--model", model_copy)
    assert result.returncode == 2 and "has no unknown-word token '[UNK]'" in result.stderr, result.stderr
    (model_copy / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(LFS_POINTER)
    result = run_cli("check", "--model", model_copy)
    assert result.returncode == 2 and "is a git-lfs pointer" in result.stderr, result.stderr
