"""LoRA training: the original trainer's objective (golden train_t2v_image), files, memory options, bad input."""
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from easyanimate_core import load_pipeline
from easyanimate_core.errors import UnsupportedRequestError
from easyanimate_core.lora import set_loras, remove_loras
from easyanimate_core.training import LoraTrainer, NonFiniteLossError

CASE = ("cases", "train_t2v_image")
LOSS_ATOL = 1e-5      # golden README: loss atol 1e-5
LORA_ATOL = 1e-6      # tighter than the README's 1e-4: we measure 2.3e-7 (float64 floor of this case: 4.7e-7)


def _bf16_rounded_pipeline(golden):
    """The tiny T2V model with its transformer weights rounded to bf16, as the original trainer's loader does."""
    pipe = load_pipeline(golden("models", "EasyAnimateV5-tiny-zh"))
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return pipe


def _golden_inputs(golden):
    folder = golden(*CASE)
    # .clone(): matmuls on buffers straight from load_file can differ by 1 ulp (golden README)
    train = {k: v.clone() for k, v in load_file(folder / "train.safetensors").items()}
    steps = {k: v.clone() for k, v in load_file(folder / "lora_steps.safetensors").items()}
    init = {k.removeprefix("init/"): v for k, v in steps.items() if k.startswith("init/")}
    return folder, train, steps, init


def _run_golden_steps(trainer, train, k):
    return trainer.step(train[f"step{k}_latents"], train["prompt_embeds"], train["prompt_embeds_2"],
                        train[f"step{k}_timesteps"], train[f"step{k}_noise"])


def test_matches_original_trainer_step_by_step(golden, tmp_path):
    pipe = _bf16_rounded_pipeline(golden)
    folder, train, steps, init = _golden_inputs(golden)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    trainer = LoraTrainer(pipe, rank=4, alpha=2.0, lr=1e-3, initial_lora=init)
    worst_loss = worst_lora = 0.0
    for k in range(3):
        loss = _run_golden_steps(trainer, train, k)
        worst_loss = max(worst_loss, abs(loss - float(train[f"step{k}_loss"])))
        assert trainer.last_grad_norm == pytest.approx(float(train[f"step{k}_grad_total_norm"]), rel=1e-5)
        state = trainer.lora_state_dict()
        assert set(state) == {k.removeprefix("init/") for k in steps if k.startswith("init/")}
        for key, value in state.items():
            if key.endswith(".alpha"):
                assert float(value) == 2.0
                continue
            expected = steps[f"after_step{k + 1}/{key}"].float()
            worst_lora = max(worst_lora, float((value - expected).abs().max()))
    print(f"worst loss error {worst_loss:.3g}, worst LoRA tensor error {worst_lora:.3g}")
    assert worst_loss <= LOSS_ATOL
    assert worst_lora <= LORA_ATOL
    # The base weights were never written.
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, before[key]), key

    # The saved file: same keys, shapes and dtypes as the original's, tensors equal to after_step3.
    out = trainer.save(tmp_path / "style.safetensors", metadata={"ss_network_dim": "4"})
    ours, theirs = load_file(out), load_file(folder / "lora.safetensors")
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], atol=LORA_ATOL, rtol=0)
    assert not list(tmp_path.glob(".*tmp")), "no temporary file is left behind"
    # Loadable by our inference LoRA code: every target layer matched, no unmatched key.
    report = set_loras(pipe.transformer, [(out, 1.0)])
    try:
        assert report.targets == 34 and not report.files[0].unmatched_keys
    finally:
        remove_loras(pipe.transformer)


def test_random_init_is_seeded_and_zero_up(tiny_pipeline):
    pipe = tiny_pipeline("t2v")
    a = LoraTrainer(pipe, rank=4, alpha=4.0, seed=7).lora_state_dict()
    b = LoraTrainer(pipe, rank=4, alpha=4.0, seed=7).lora_state_dict()
    c = LoraTrainer(pipe, rank=4, alpha=4.0, seed=8).lora_state_dict()
    downs = [k for k in a if k.endswith("lora_down.weight")]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in downs)
    assert all(float(a[k].abs().max()) == 0 for k in a if k.endswith("lora_up.weight"))


def test_attention_only_targets(tiny_pipeline):
    pipe = tiny_pipeline("t2v")
    state = LoraTrainer(pipe, rank=2, alpha=2.0, targets="attention", seed=0).lora_state_dict()
    layers = {k.split(".")[0] for k in state}
    assert layers and all("_attn" in name for name in layers)
    assert all(name.endswith(("to_q", "to_k", "to_v", "to_out_0")) for name in layers)


def test_rank_larger_than_a_layer_is_refused(tiny_pipeline):
    with pytest.raises(UnsupportedRequestError, match="rank 64 is larger"):
        LoraTrainer(tiny_pipeline("t2v"), rank=64, alpha=64.0)


def _batch(pipe, seed=0, frames=1, height=4, width=6):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, frames, height, width, generator=g)
    bert = torch.randn(1, 77, 32, generator=g)
    t5 = torch.randn(1, 256, 48, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    return latents, bert, t5, torch.tensor([500]), noise


def test_gradient_checkpointing_and_block_swap_give_the_same_step(tiny_pipeline):
    from easyanimate_core.block_swap import disable_block_swap, enable_block_swap

    pipe = tiny_pipeline("t2v")
    batch = _batch(pipe, frames=2)
    results = []
    for checkpointing, swap in ((False, 0), (True, 0), (True, 1)):
        if swap:
            enable_block_swap(pipe.transformer, swap, "cpu")
        try:
            trainer = LoraTrainer(pipe, rank=4, alpha=4.0, seed=3, gradient_checkpointing=checkpointing)
            losses = [trainer.step(*batch) for _ in range(2)]
        finally:
            disable_block_swap(pipe.transformer)
        results.append((losses, trainer.lora_state_dict()))
    base_losses, base_state = results[0]
    for losses, state in results[1:]:
        assert losses == pytest.approx(base_losses, abs=1e-6)
        for key in base_state:
            torch.testing.assert_close(state[key], base_state[key], atol=1e-6, rtol=0)


def test_nan_loss_stops_without_updating(tiny_pipeline):
    pipe = tiny_pipeline("t2v")
    trainer = LoraTrainer(pipe, rank=2, alpha=2.0, seed=0)
    trainer.step(*_batch(pipe))
    before = trainer.lora_state_dict()
    latents, bert, t5, t, noise = _batch(pipe, seed=1)
    latents[0, 0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match="Lower the learning rate"):
        trainer.step(latents, bert, t5, t, noise)
    after = trainer.lora_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.global_step == 1


def test_inpaint_channels_are_checked(tiny_pipeline):
    pipe = tiny_pipeline("t2v")
    latents, bert, t5, t, noise = _batch(pipe)
    with pytest.raises(UnsupportedRequestError, match="input channels"):
        LoraTrainer(pipe, rank=2, alpha=2.0).step(latents, bert, t5, t, noise,
                                                 inpaint_latents=torch.zeros(1, 17, 1, 4, 6))


# ------------------------------------------------------------------ dataset, cache, whole runs
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from easyanimate_core.training.cache import (CacheMismatchError, PipelineEncoders, build_cache,  # noqa: E402
                                             training_text_embeds)
from easyanimate_core.training.dataset import DatasetError, DatasetSettings, scan_folder  # noqa: E402
from easyanimate_core.training.loop import TrainConfig, state_path, train_lora  # noqa: E402

SMALL = DatasetSettings(resolution=64, max_frames=1, image_resolution=64)


def write_style_images(folder: Path, n: int = 4, seed: int = 0, captions: bool = True, size=(48, 80)):
    """Synthetic images sharing a strong orange cast, with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.random((size[0], size[1], 3)) * 0.3
        img = np.clip(base + np.array([0.7, 0.35, 0.05]), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img_{i}.png")
        if captions:
            (folder / f"img_{i}.txt").write_text(f"an orange picture number {i}", encoding="utf-8")
    return folder


def test_dataset_bad_input(tmp_path):
    with pytest.raises(DatasetError, match="holds no images"):
        scan_folder(tmp_path)
    write_style_images(tmp_path / "nocap", n=2, captions=False)
    with pytest.raises(DatasetError, match="no caption file: img_0.png, img_1.png"):
        scan_folder(tmp_path / "nocap")
    items = scan_folder(tmp_path / "nocap", missing_captions="filename")
    assert [i.caption for i in items] == ["img 0", "img 1"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "broken" / "bad.txt").write_text("x")
    from easyanimate_core.training.dataset import read_media

    with pytest.raises(DatasetError, match="cannot read training file .*bad.png"):
        read_media(scan_folder(tmp_path / "broken")[0], 1)


def test_json_list_and_buckets(tmp_path):
    write_style_images(tmp_path, n=1, captions=False, size=(64, 112))
    (tmp_path / "meta.json").write_text('[{"file_path": "img_0.png", "text": "a sun", "type": "image"}]')
    items = scan_folder(tmp_path / "meta.json")
    assert items[0].caption == "a sun" and items[0].kind == "image"
    # The golden case's bucket: a 64x112 image at sample size 96 trains at 64x112.
    assert DatasetSettings(resolution=96, max_frames=1, image_resolution=96).bucket(64, 112, 1) == (64, 112)
    # Token budget: a 49-frame video at 512 gets the 512 bucket, an image the image resolution (1024).
    settings = DatasetSettings()
    assert settings.bucket(512, 512, 49) == (512, 512)
    assert settings.bucket(512, 512, 1) == (1024, 1024)


def test_training_tokenisation_has_no_special_tokens(golden, tiny_pipeline):
    pipe = load_pipeline(golden("models", "EasyAnimateV5-tiny-zh"))
    train = load_file(golden(*CASE) / "train.safetensors")
    caption = "A red sun over the blue sea at night, high quality picture."
    bert, t5 = training_text_embeds(pipe.text_encoders, caption)
    torch.testing.assert_close(bert, train["prompt_embeds"], atol=1e-5, rtol=0)
    torch.testing.assert_close(t5, train["prompt_embeds_2"], atol=1e-5, rtol=0)


def test_cache_is_reused_and_refuses_another_model(tmp_path, tiny_pipeline, tiny_model_dir):
    pipe = tiny_pipeline("t2v")
    data = write_style_images(tmp_path / "data", n=2)
    items = scan_folder(data)
    encoders = PipelineEncoders(pipe)
    cache = data / ".easyanimate_cache"
    first = build_cache(encoders, items, SMALL, cache)
    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 2 and first[0].latent_shape == (1, 16, 1, 6, 10)
    stamps = [p.stat().st_mtime_ns for p in entries]
    again = build_cache(encoders, items, SMALL, cache)
    assert [p.stat().st_mtime_ns for p in entries] == stamps  # re-used, not rewritten
    assert torch.equal(again[1].mean, first[1].mean)
    (data / "img_1.txt").write_text("a changed caption")
    build_cache(encoders, scan_folder(data), SMALL, cache)
    assert entries[1].stat().st_mtime_ns != stamps[1] and entries[0].stat().st_mtime_ns == stamps[0]
    with pytest.raises(CacheMismatchError, match="other settings"):
        build_cache(encoders, items, DatasetSettings(resolution=32, max_frames=1, image_resolution=32), cache)
    inp = PipelineEncoders(tiny_pipeline("inpaint"))
    with pytest.raises(CacheMismatchError, match="a t2v model"):
        build_cache(inp, items, SMALL, cache)
    inp_samples = build_cache(inp, items, SMALL, cache, rebuild=True)
    assert inp_samples[0].blank_mean is not None


def _run(pipe, samples, empty, out, steps, **kw):
    config = TrainConfig(steps=steps, rank=4, alpha=4.0, lr=1e-3, seed=5, save_every=kw.pop("save_every", 0), **kw)
    return train_lora(pipe, samples, empty, config, out, base_model="tiny", log_csv=out.with_suffix(".csv"))


def test_run_saves_metadata_log_and_resumes_exactly(tmp_path, tiny_pipeline):
    pipe = tiny_pipeline("t2v")
    data = write_style_images(tmp_path / "data", n=3)
    encoders = PipelineEncoders(pipe)
    samples = build_cache(encoders, scan_folder(data), SMALL, data / ".easyanimate_cache")
    empty = encoders.encode_text("")
    straight = _run(pipe, samples, empty, tmp_path / "a.safetensors", 4)
    assert straight.steps_done == 4 and len(straight.losses) == 4
    rows = (tmp_path / "a.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,grad_norm,seconds" and len(rows) == 5

    _run(pipe, samples, empty, tmp_path / "b.safetensors", 2)
    config = TrainConfig(steps=4, rank=4, alpha=4.0, lr=1e-3, seed=5)
    resumed = train_lora(pipe, samples, empty, config, tmp_path / "b.safetensors", resume=True,
                         log_csv=tmp_path / "b.csv")
    assert resumed.losses == pytest.approx(straight.losses, abs=0)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "b.csv").read_text().splitlines()) == 5

    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "4" and meta["ss_num_train_images"] == "3"
    assert meta["ss_resolution"] == "48x80x1" and meta["ss_sd_model_name"] == "tiny"


def test_interrupt_saves_progress_and_nan_keeps_last_save(tmp_path, tiny_pipeline):
    pipe = tiny_pipeline("t2v")
    data = write_style_images(tmp_path / "data", n=2)
    encoders = PipelineEncoders(pipe)
    samples = build_cache(encoders, scan_folder(data), SMALL)
    empty = encoders.encode_text("")
    out = tmp_path / "c.safetensors"

    def cancel_at_3(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(pipe, samples, empty, TrainConfig(steps=10, rank=4, alpha=4.0, save_every=2), out,
                   callback=cancel_at_3)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_steps"] == "3"
    assert state_path(out).is_file()

    saved = out.read_bytes()
    samples[1].mean[..., 0] = math.nan
    with pytest.raises(NonFiniteLossError):
        train_lora(pipe, samples, empty, TrainConfig(steps=50, rank=4, alpha=4.0, save_every=1000), out)
    assert out.read_bytes() == saved  # the last good save is untouched
    assert not list(tmp_path.glob(".*tmp"))


def test_full_disk_leaves_no_half_written_file(tmp_path, monkeypatch, tiny_pipeline):
    import errno

    from easyanimate_core.training import files

    out = tmp_path / "d.safetensors"
    out.write_bytes(b"previous")

    def no_space(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "save_file", no_space)
    trainer = LoraTrainer(tiny_pipeline("t2v"), rank=2, alpha=2.0)
    with pytest.raises(files.SaveError, match="the disk is full"):
        trainer.save(out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_cli_train_lora_then_resume(tmp_path, tiny_model_dir, capsys):
    from easyanimate_core.__main__ import main

    data = write_style_images(tmp_path / "data", n=2)
    out = tmp_path / "cli.safetensors"
    common = ["train-lora", "--model", str(tiny_model_dir("t2v")), "--data", str(data), "--out", str(out),
              "--rank", "4", "--lr", "1e-3", "--resolution", "64", "--frames", "1", "--save-every", "2"]
    assert main(common + ["--steps", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(common + ["--steps", "3", "--resume", "--fp8", "--swap-blocks", "1"]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_steps"] == "3" and f.metadata()["ss_network_alpha"] == "4"
    assert len((tmp_path / "cli.csv").read_text().splitlines()) == 4
    assert main(common + ["--steps", "2", "--rank", "64"]) == 2
    assert "rank 64 is larger" in capsys.readouterr().err
    assert main(["train-lora", "--model", str(tiny_model_dir("t2v")), "--data", str(tmp_path / "empty"),
                 "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_planner_fits_12b_on_24gb_and_7b_on_16gb():
    from easyanimate_core.memory import GB
    from easyanimate_core.training.planner import (TRANSFORMER_7B, TRANSFORMER_12B, TrainingOptions,
                                                   estimate_training, lora_parameter_count, plan_training)

    assert lora_parameter_count(TRANSFORMER_12B, 32) == 228_820_992
    plan = plan_training(TRANSFORMER_12B, 24 * GB, height=512, width=512, frames=49, rank=32)
    assert plan.chosen is not None and plan.chosen.peak <= plan.budget and plan.chosen.options.fp8
    assert "choose: fp8" in plan.describe()
    plan7 = plan_training(TRANSFORMER_7B, 16 * GB, rank=32)
    assert plan7.chosen is not None and plan7.chosen.peak <= plan7.budget
    kw = dict(height=512, width=512, frames=49, rank=32)
    plain = estimate_training(TRANSFORMER_12B, TrainingOptions(), **kw).peak
    ckpt = estimate_training(TRANSFORMER_12B, TrainingOptions(gradient_checkpointing=True), **kw).peak
    fp8 = estimate_training(TRANSFORMER_12B, TrainingOptions(True, True), **kw).peak
    swap = estimate_training(TRANSFORMER_12B, TrainingOptions(True, True, 20), **kw).peak
    assert plain > ckpt > fp8 > swap


def test_full_fine_tune_trains_every_weight_and_saves_a_loadable_transformer(tmp_path, tiny_model_dir):
    from easyanimate_core.loading import load_weights_into, validate_model_dir
    from easyanimate_core.models.transformer import EasyAnimateTransformer3D
    from easyanimate_core.training import FullTrainer

    pipe = load_pipeline(tiny_model_dir("t2v"))  # a private copy: full training changes the model
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    trainer = FullTrainer(pipe, lr=1e-3)
    batch = _batch(pipe, frames=1)
    losses = [trainer.step(*batch) for _ in range(5)]
    assert losses[-1] < losses[0]
    changed = [k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    out = trainer.save(tmp_path / "diffusion_pytorch_model.safetensors", metadata={"steps": "5"})
    trainer.finish()
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    files = validate_model_dir(tiny_model_dir("t2v"))
    with torch.device("meta"):
        fresh = EasyAnimateTransformer3D.from_config_dict(files.transformer_config)
    fresh = load_weights_into(fresh, (out,), dtype=torch.float32)
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_cli_full_fine_tune_writes_a_loadable_model_folder(tmp_path, tiny_model_dir):
    from easyanimate_core.__main__ import main

    data = write_style_images(tmp_path / "data", n=2)
    out = tmp_path / "trained_model"
    assert main(["train-lora", "--full", "--model", str(tiny_model_dir("t2v")), "--data", str(data), "--out", str(out),
                 "--steps", "3", "--lr", "1e-3", "--resolution", "64", "--frames", "1"]) == 0
    trained = load_pipeline(out)
    base = load_pipeline(tiny_model_dir("t2v"))
    assert not torch.equal(trained.transformer.proj_out.weight, base.transformer.proj_out.weight)
    assert torch.equal(trained.vae.state_dict()["decoder.conv_out.weight"], base.vae.state_dict()["decoder.conv_out.weight"])
    assert (out / "train_log.csv").is_file()
