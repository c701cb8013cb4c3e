"""Train the small *trained* EasyAnimate V5 test model on CPU: moving coloured shapes that follow their prompt.

Random tiny models have no smooth denoising trajectory, so anything measured on them about sample quality
(step caching, long-video seams, LoRA style) means nothing. This script builds a model folder in the
original layout that `load_pipeline` loads, trained toward samples that show the prompted shape, colour and motion
(how far the committed one gets: tests/assets/trained_tiny/README.md):

1. data: a few hundred 9-frame 64x64 clips of one shape (square/circle/triangle) in one colour moving slowly in
   one direction on a dark background, captioned "a red circle moving left" and so on;
2. VAE: the tiny MagViT VAE (the V5 architecture, narrower than the golden's) trained as a plain
   autoencoder on those clips (MSE through the posterior means, weighted on the shape), because a random VAE
   decodes nothing recognisable; its `scaling_factor` is then set to 1 / std of the latents, as the published
   VAEs do (optionally the decoder alone is fine-tuned further, the encoder frozen so the latents do not move);
3. transformer (on the posterior means, what `.mode()` gives at inference): the tiny V5 MMDiT (4 heads x 16,
   4 MMDiT layers) trained with the V5 objective (v-prediction on the zero-terminal-SNR DDIM schedule of
   scheduler_config.json), with 10 % empty-prompt dropout so classifier-free guidance works, and the golden
   tiny BERT/T5 fine-tuned with it (frozen, they barely tell the captions apart); EMA weights are saved;
4. a check: 8 prompts x 2 seeds are generated with the real pipeline; the colour and the direction of motion
   of each sample are read off its pixels, and its nearest training clip in latent space is found, and both
   are compared with the prompt (written to training.json).

Each training stage runs for a wall-clock budget (the machine is shared: one thread by default).

    .venv/bin/python benchmarks/train_test_model.py --out tests/assets/trained_tiny
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tiny_model import MODEL_INDEX, SCHEDULER_CONFIG, transformer_config, vae_config  # noqa: E402

GOLDEN_TEXT = REPO.parent / "shared" / "golden" / "models" / "EasyAnimateV5-tiny-zh"
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1), "white": (0.95, 0.95, 0.95)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (0.08, 0.08, 0.1)
SIZE, FRAMES = 64, 9
SPEED = (1.0, 1.6)  # pixels per frame: slow enough that the 4 frames one latent holds stay alike


def caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


EVALUATION_PROMPTS = tuple(caption(c, s, d) for c, s, d in (
    ("red", "circle", "left"), ("blue", "square", "right"), ("green", "triangle", "up"), ("yellow", "circle", "down"),
    ("white", "square", "left"), ("red", "square", "down"), ("blue", "triangle", "left"),
    ("green", "circle", "right")))


# ---------------------------------------------------------------------------------------------- data
def shape_mask(shape: str, cx: float, cy: float, r: float) -> torch.Tensor:
    """Anti-aliased [SIZE,SIZE] coverage of one shape centred at (cx, cy) with half-size r (pixels)."""
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        dist = torch.sqrt(dx ** 2 + dy ** 2) - r
    elif shape == "square":
        dist = torch.maximum(dx.abs(), dy.abs()) - r
    else:  # upward triangle: inside the three half-planes
        edge1 = dy - r * 0.8
        edge2 = (-dy * 0.5 - dx * 0.866) - r * 0.4
        edge3 = (-dy * 0.5 + dx * 0.866) - r * 0.4
        dist = torch.maximum(edge1, torch.maximum(edge2, edge3)) * 1.1
    return (0.5 - dist).clamp(0, 1)


def make_clip(colour: str, shape: str, direction: str, g: torch.Generator) -> torch.Tensor:
    """[3, FRAMES, SIZE, SIZE] in [-1, 1]: the shape crossing part of the frame in `direction`."""
    r = 7 + 4 * torch.rand((), generator=g).item()
    speed = SPEED[0] + (SPEED[1] - SPEED[0]) * torch.rand((), generator=g).item()
    travel = speed * (FRAMES - 1)
    ux, uy = DIRECTIONS[direction]
    lo, hi = r + 2, SIZE - r - 2

    def start(u):  # leave room for the travel along the moving axis, anywhere across it
        if u > 0:
            return lo + (hi - travel - lo) * torch.rand((), generator=g).item()
        if u < 0:
            return lo + travel + (hi - travel - lo) * torch.rand((), generator=g).item()
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    x0, y0 = start(ux), start(uy)
    bg = torch.tensor(BACKGROUND)[:, None, None]
    fg = torch.tensor(COLOURS[colour])[:, None, None]
    frames = []
    for f in range(FRAMES):
        m = shape_mask(shape, x0 + ux * speed * f, y0 + uy * speed * f, r)
        frames.append(bg * (1 - m) + fg * m)
    return torch.stack(frames, dim=1) * 2 - 1


def make_dataset(count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    combos = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    clips, captions = [], []
    for i in range(count):
        c, s, d = combos[i % len(combos)]
        clips.append(make_clip(c, s, d, g))
        captions.append(caption(c, s, d))
    return torch.stack(clips), captions


# ---------------------------------------------------------------------------------------------- configs
def small_vae_config() -> dict:
    cfg = vae_config()
    cfg.update(ch=8, block_out_channels=[8, 16, 24, 24], norm_num_groups=4)
    return cfg


def small_transformer_config() -> dict:
    cfg = transformer_config("t2v", num_layers=4, mmdit_layers=4)
    cfg.update(num_attention_heads=4, time_embed_dim=64, sample_height=SIZE // 8, sample_width=SIZE // 8)
    return cfg


# ---------------------------------------------------------------------------------------------- training
def lr_at(fraction: float, peak: float, warmup: float = 0.03) -> float:
    if fraction < warmup:
        return peak * fraction / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (fraction - warmup) / (1 - warmup)))))


def foreground_weight(x: torch.Tensor, weight: float = 4.0) -> torch.Tensor:
    """Per-pixel loss weight: `weight` on the shape, 1 on the background.

    The shape covers about 6 % of a frame, so a plain MSE is nearly minimised by the dark background alone and
    the shape's colour is the last thing a briefly trained autoencoder learns; weighting the shape pulls it first.
    """
    background = torch.tensor(BACKGROUND, dtype=x.dtype).view(1, 3, 1, 1, 1) * 2 - 1
    on_shape = ((x - background).abs().sum(1, keepdim=True) > 0.2).to(x.dtype)
    return 1 + (weight - 1) * on_shape


def train_vae(vae, clips: torch.Tensor, minutes: float, batch: int, log, lr: float = 1e-3) -> int:
    """Train encoder + decoder as a plain autoencoder on the posterior means (what inference uses: `.mode()`).

    No sampling noise: with only minutes of CPU, a freshly initialised posterior's unit noise drowns the
    signal and the decoder learns a blurry average. A tiny penalty on the means keeps their scale bounded
    (the scaling factor normalises it afterwards). Random 5-frame windows (1 + 4: the first-frame and the
    4-frame chunk of the causal VAE) halve the cost of 9-frame clips.
    """
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    vae.train()
    start, step, running = time.time(), 0, None
    while (elapsed := time.time() - start) < minutes * 60:
        for group in opt.param_groups:
            group["lr"] = lr_at(elapsed / (minutes * 60), lr)
        idx = torch.randint(len(clips), (batch,), generator=g)
        first = int(torch.randint(0, FRAMES - 4, (1,), generator=g))
        x = clips[idx][:, :, first:first + 5]
        mean = vae.encode(x).mean
        squared = (vae.decode(mean) - x).square()
        mse = squared.mean()
        loss = (squared * foreground_weight(x)).mean() + 1e-5 * mean.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        running = mse.item() if running is None else 0.95 * running + 0.05 * mse.item()
        if step % 100 == 0:
            log(f"vae step {step} {elapsed:.0f}s mse {running:.5f} (PSNR {10 * math.log10(4 / max(running, 1e-10)):.1f} dB)")
    vae.eval()
    return step


def train_decoder(vae, clips: torch.Tensor, means: torch.Tensor, minutes: float, batch: int, log) -> int:
    """Fine-tune the decoder alone on the posterior means (what sampling produces); the latents stay the same."""
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    vae.decoder.train()
    start, step = time.time(), 0
    while (elapsed := time.time() - start) < minutes * 60:
        for group in opt.param_groups:
            group["lr"] = lr_at(elapsed / (minutes * 60), 5e-4)
        idx = torch.randint(len(clips), (batch,), generator=g)
        squared = (vae.decode(means[idx]) - clips[idx]).square()
        mse = squared.mean()
        opt.zero_grad(set_to_none=True)
        (squared * foreground_weight(clips[idx])).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log(f"decoder step {step} {elapsed:.0f}s mse {mse.item():.5f} (PSNR {10 * math.log10(4 / mse.item()):.1f} dB)")
    vae.eval()
    return step


class CaptionEncoder(torch.nn.Module):
    """The two text encoders over the pre-tokenised captions (index -> BERT and T5 states), trainable.

    The golden tiny BERT/T5 are random: frozen, their states of "a red circle" and "a blue circle" differ by
    only ~10 %, too little for minutes of CPU training to make the transformer follow the colour. Fine-tuned
    together with the transformer (and saved into the folder), they learn to tell the captions apart.
    """

    def __init__(self, text, captions: list[str]):
        super().__init__()
        self.bert, self.t5 = text.bert, text.t5
        self.register_buffer("bert_ids", text._tokenize(text.bert_tokenizer, captions), persistent=False)
        self.register_buffer("t5_ids", text._tokenize(text.t5_tokenizer, captions), persistent=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.bert(input_ids=self.bert_ids[ids]).last_hidden_state,
                self.t5(input_ids=self.t5_ids[ids]).last_hidden_state)


def train_transformer(model, latents, text_ids, captions: CaptionEncoder, empty, minutes: float, batch: int,
                      log, train_text: bool = True) -> tuple[int, torch.nn.Module, CaptionEncoder]:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    alphas = sched.alphas_cumprod.float()
    captions.eval()  # no dropout in the text encoders, trained or not
    captions.requires_grad_(train_text)
    ema, ema_captions = copy.deepcopy(model).eval(), copy.deepcopy(captions).eval()
    ema.requires_grad_(False)
    ema_captions.requires_grad_(False)
    params = list(model.parameters()) + (list(captions.parameters()) if train_text else [])
    ema_params = list(ema.parameters()) + (list(ema_captions.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(2)
    model.train()
    start, step, running = time.time(), 0, None
    while (elapsed := time.time() - start) < minutes * 60:
        for group in opt.param_groups:
            group["lr"] = lr_at(elapsed / (minutes * 60), 5e-4)
        idx = torch.randint(len(latents), (batch,), generator=g)
        x0 = latents[idx]
        t = torch.randint(0, 1000, (batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        ids = text_ids[idx].clone()
        ids[torch.rand(batch, generator=g) < 0.1] = empty
        with torch.set_grad_enabled(train_text):
            bert, t5 = captions(ids)
        pred = model(noisy, t.float(), bert, t5)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema_params, params):
                pe.lerp_(pm, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"transformer step {step} {elapsed:.0f}s loss {running:.4f}")
    model.eval()
    return step, ema, ema_captions


# ---------------------------------------------------------------------------------------------- checks
def measure_clip(frames: torch.Tensor) -> tuple[str, str, float]:
    """(colour, direction, motion in px) read off generated frames [F,H,W,3] in 0..1."""
    bg = torch.tensor(BACKGROUND)
    fg_mask = (frames - bg).abs().sum(-1) > 0.35  # [F,H,W]
    pixels = frames[fg_mask]
    if len(pixels) == 0:
        return "none", "none", 0.0
    mean = pixels.mean(0)
    colour = min(COLOURS, key=lambda c: float((torch.tensor(COLOURS[c]) - mean).square().sum()))
    ys, xs = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")

    def centroid(f):
        w = fg_mask[f].float()
        return (float((xs * w).sum() / w.sum().clamp(min=1)), float((ys * w).sum() / w.sum().clamp(min=1)))

    (xa, ya), (xb, yb) = centroid(0), centroid(len(frames) - 1)
    dx, dy = xb - xa, yb - ya
    direction = max(DIRECTIONS, key=lambda d: DIRECTIONS[d][0] * dx + DIRECTIONS[d][1] * dy)
    return colour, direction, math.hypot(dx, dy)


def check_samples(model_dir: Path, log, clips: torch.Tensor, captions: list) -> dict:
    """Generate a few prompts with the real pipeline and check them twice:
    - in pixels: the colour and motion direction read off the decoded frames (needs a VAE that reconstructs);
    - in latents: the caption of the nearest training clip (L2 between the generated latents and the VAE's
      encodings of the training clips), which does not depend on the decoder's quality.
    """
    from easyanimate_core import load_pipeline

    pipe = load_pipeline(model_dir)
    with torch.no_grad():
        train_latents = torch.cat([pipe.vae.encode(clips[i:i + 8]).mean for i in range(0, len(clips), 8)])
    train_latents = (train_latents * pipe.vae.scaling_factor).flatten(1)
    prompts = EVALUATION_PROMPTS
    rows, grid = [], []
    for i, (seed, prompt) in enumerate((seed + i, p) for seed in (100, 200) for i, p in enumerate(prompts)):
        out = pipe.generate(prompt, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=25,
                            guidance_scale=6.0, seed=seed)
        colour, direction, motion = measure_clip(out.frames)
        nearest = captions[int((train_latents - out.latents.flatten(1)).norm(dim=1).argmin())].split()
        want = prompt.split()
        rows.append({"prompt": prompt, "pixels": {"colour": colour, "direction": direction,
                                                  "motion_px": round(motion, 1)},
                     "nearest_training_clip": " ".join(nearest),
                     "colour_ok": nearest[1] == want[1], "shape_ok": nearest[2] == want[2],
                     "direction_ok": nearest[-1] == want[-1], "pixel_colour_ok": colour == want[1],
                     "pixel_direction_ok": direction == want[-1]})
        log(f"sample '{prompt}': nearest training clip '{' '.join(nearest)}'; pixels: colour {colour}, "
            f"direction {direction} ({motion:.1f} px)")
        if i < len(prompts):  # the first seed's samples: frames 0,2,4,6,8 side by side
            grid.append(torch.cat(list(out.frames[::2]), dim=1))
    image = (torch.cat(grid, dim=0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    from PIL import Image

    Image.fromarray(image).save(model_dir / "samples.png")
    n = len(rows)
    return {"samples": rows, "colour_accuracy": sum(r["colour_ok"] for r in rows) / n,
            "shape_accuracy": sum(r["shape_ok"] for r in rows) / n,
            "direction_accuracy": sum(r["direction_ok"] for r in rows) / n,
            "pixel_colour_accuracy": sum(r["pixel_colour_ok"] for r in rows) / n,
            "pixel_direction_accuracy": sum(r["pixel_direction_ok"] for r in rows) / n}


# ---------------------------------------------------------------------------------------------- saving
def save_module(module: torch.nn.Module, folder: Path, config: dict, dtype: torch.dtype) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "assets" / "trained_tiny")
    parser.add_argument("--clips", type=int, default=360)
    parser.add_argument("--vae-minutes", type=float, default=25.0)
    parser.add_argument("--decoder-minutes", type=float, default=0.0)
    parser.add_argument("--transformer-minutes", type=float, default=32.0)
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="reuse the VAE of this model folder (skips the autoencoder stage; the decoder is still "
                             "fine-tuned)")
    parser.add_argument("--transformer-from", type=Path, default=None,
                        help="start the transformer (and text encoders) from this trained model folder")
    parser.add_argument("--freeze-text-encoders", action="store_true",
                        help="keep the golden tiny BERT/T5 as they are (they then barely tell the captions apart)")
    parser.add_argument("--vae-batch", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", type=Path, default=None,
                        help="only re-run the sample check on this trained model folder (updates training.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate is not None:
        clips, captions = make_dataset(args.clips, args.seed)
        report = check_samples(args.evaluate, print, clips, captions)
        path = args.evaluate / "training.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.update(report)
        path.write_text(json.dumps(data, indent=2))
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}))
        return 0
    torch.manual_seed(args.seed)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    from easyanimate_core.models.transformer import EasyAnimateTransformer3D
    from easyanimate_core.models.vae import MagvitVAE
    from easyanimate_core.text import TextEncoders

    out: Path = args.out
    for option, source in (("--vae-from", args.vae_from), ("--transformer-from", args.transformer_from)):
        if source is not None and source.resolve() == out.resolve():
            parser.error(f"{option} must be another folder than --out (--out is emptied first)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        shutil.copytree(GOLDEN_TEXT / sub, out / sub)
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))

    t0 = time.time()
    clips, captions = make_dataset(args.clips, args.seed)
    log(f"dataset: {len(clips)} clips {tuple(clips.shape[1:])}, {len(set(captions))} captions "
        f"({time.time() - t0:.0f}s)")

    if args.vae_from is not None:
        from easyanimate_core.loading import load_weights_into

        vae_cfg = json.loads((args.vae_from / "vae" / "config.json").read_text())
        vae = load_weights_into(MagvitVAE.from_config_dict(vae_cfg),
                                (args.vae_from / "vae" / "diffusion_pytorch_model.safetensors",), dtype=torch.float32)
        for p in vae.parameters():
            p.requires_grad_(True)
        source = args.vae_from / "training.json"
        earlier = json.loads(source.read_text()) if source.is_file() else {}
        vae_steps, t_vae = earlier.get("vae_steps", 0), float(earlier.get("vae_seconds", 0))
        source_log = args.vae_from / "training_log.txt"
        if source_log.is_file():  # keep the VAE stage's record in this folder's log
            log_lines.extend(line for line in source_log.read_text().splitlines() if line.startswith("vae"))
        log(f"vae: reused from {args.vae_from} ({vae_steps} steps in {t_vae:.0f}s there)")
    else:
        vae_cfg = small_vae_config()
        vae = MagvitVAE.from_config_dict(vae_cfg)
        t_vae = time.time()
        vae_steps = train_vae(vae, clips, args.vae_minutes, args.vae_batch, log)
        t_vae = time.time() - t_vae
    vae.eval()
    with torch.no_grad():
        mean = torch.cat([vae.encode(clips[i:i + 8]).mean for i in range(0, len(clips), 8)])
    for p in vae.encoder.parameters():
        p.requires_grad_(False)
    t_dec = time.time()
    decoder_steps = 0 if args.decoder_minutes <= 0 else train_decoder(vae, clips, mean, args.decoder_minutes, args.vae_batch, log)
    t_dec = time.time() - t_dec
    with torch.no_grad():
        recon = torch.cat([vae.decode(mean[i:i + 8]) for i in range(0, 32, 8)])
        psnr = 10 * math.log10(4 / F.mse_loss(recon, clips[:len(recon)]).item())
    scaling = round(1.0 / float(mean.std()), 4)
    vae_cfg["scaling_factor"] = scaling
    log(f"vae: {vae_steps} autoencoder steps in {t_vae:.0f}s + {decoder_steps} decoder steps in {t_dec:.0f}s, "
        f"reconstruction PSNR {psnr:.1f} dB (posterior means), latent std {float(mean.std()):.3f} -> "
        f"scaling_factor {scaling}")
    save_module(vae, out / "vae", vae_cfg, torch.float16)

    text = TextEncoders.from_model_dir(out, dtype=torch.float32)
    unique = sorted(set(captions)) + [""]
    caption_encoder = CaptionEncoder(text, unique)
    text_ids = torch.tensor([unique.index(c) for c in captions])

    tr_cfg = small_transformer_config()
    model = EasyAnimateTransformer3D.from_config_dict(tr_cfg)
    if args.transformer_from is not None:  # warm start: its transformer and text encoders
        from easyanimate_core.loading import load_weights_into

        load_weights_into(model, (args.transformer_from / "transformer" / "diffusion_pytorch_model.safetensors",),
                          dtype=torch.float32)
        model.requires_grad_(True)
        warm = TextEncoders.from_model_dir(args.transformer_from, dtype=torch.float32)
        caption_encoder.bert.load_state_dict(warm.bert.state_dict())
        caption_encoder.t5.load_state_dict(warm.t5.state_dict())
        log(f"transformer and text encoders: warm start from {args.transformer_from}")
    log(f"transformer: {sum(p.numel() for p in model.parameters())} parameters; text encoders "
        f"{'fine-tuned with it' if not args.freeze_text_encoders else 'frozen'}")
    t_tr = time.time()
    steps, ema, ema_captions = train_transformer(model, mean * scaling, text_ids, caption_encoder, len(unique) - 1,
                                                 args.transformer_minutes, args.batch, log,
                                                 train_text=not args.freeze_text_encoders)
    t_tr = time.time() - t_tr
    log(f"transformer: {steps} steps of batch {args.batch} in {t_tr:.0f}s")
    save_module(ema, out / "transformer", tr_cfg, torch.float16)
    if not args.freeze_text_encoders:
        ema_captions.bert.save_pretrained(out / "text_encoder", safe_serialization=True)
        ema_captions.t5.save_pretrained(out / "text_encoder_2", safe_serialization=True)

    report = check_samples(out, log, clips, captions)
    log(f"samples (nearest training clip): colour {report['colour_accuracy']:.0%}, shape "
        f"{report['shape_accuracy']:.0%}, direction {report['direction_accuracy']:.0%}; read off the decoded pixels: "
        f"colour {report['pixel_colour_accuracy']:.0%}, direction {report['pixel_direction_accuracy']:.0%}")
    report.update(vae_steps=vae_steps, vae_seconds=round(t_vae), decoder_steps=decoder_steps,
                  decoder_seconds=round(t_dec), vae_psnr_db=round(psnr, 1),
                  transformer_steps=steps, transformer_seconds=round(t_tr), batch=args.batch,
                  clips=len(clips), threads=args.threads, scaling_factor=scaling)
    (out / "training.json").write_text(json.dumps(report, indent=2))
    (out / "training_log.txt").write_text("\n".join(log_lines) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"model folder {out}: {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
