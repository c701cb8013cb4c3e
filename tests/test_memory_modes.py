"""Memory modes: block swap, offload, fp8 modes and the auto planner (CPU; the CUDA paths at the end need a GPU).

On the CPU, block swap runs its whole mechanism with synchronous CPU→CPU copies, and offload moves
components between identical devices, so both must give bit-identical results; fp8 modes are
compared with fp8 alone (bit-identical) and with the float32 model (a tolerance).
"""
import copy
import inspect
import weakref

import pytest
import torch
from tiny_lora import write_tiny_lora
from tiny_model import random_transformer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from easyanimate_core import load_pipeline, lora
from easyanimate_core.block_swap import (
    disable_block_swap,
    enable_block_swap,
    get_block_swap,
    reset_block_swap,
    suspended,
)
from easyanimate_core.errors import UnsupportedRequestError
from easyanimate_core.fp8 import quantize_to_fp8, weight_bytes
from easyanimate_core.lora import remove_loras, set_loras
from easyanimate_core.memory import (
    GiB,
    OffloadPlacement,
    estimate_working_bytes,
    plan_memory,
    transformer_sizes,
)
from easyanimate_core.models.transformer import (
    EasyAnimateTransformer3D,
    TransformerConfig,
)

GEN = dict(height=32, width=48, num_frames=5, num_inference_steps=2, seed=3)
IMAGE = torch.rand(32, 48, 3, generator=torch.Generator().manual_seed(0))
FP8_REL_TOL = 0.08  # fp8 weights + bf16 compute vs float32, final latents, relative L2 (measured 0.018)


def tensor_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------ transformer level
@pytest.fixture(scope="module")
def base():
    """4 blocks, 3 MMDiT and 1 shared (so swapped blocks differ in structure), weights scaled so blocks matter."""
    return random_transformer(num_layers=4, mmdit_layers=3)


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 16, 2, 8, 8, generator=g).to(dtype), torch.tensor([700.0, 300.0]),
            torch.randn(2, 5, 32, generator=g).to(dtype), torch.randn(2, 7, 48, generator=g).to(dtype))


def forward(model, dtype=torch.float32):
    with torch.inference_mode():
        return model(*inputs(dtype))


def snapshot(model):
    """Everything remove() must give back: tensor objects, values, dtypes, devices, shapes, hooks."""
    state = {}
    for mname, m in model.named_modules():
        for name, p in m._parameters.items():
            if p is not None:
                state[(mname, name)] = (p, p.dtype, p.device, p.shape, p.stride(), p.detach().clone())
        for name, b in m._buffers.items():
            if b is not None:
                state[(mname, name)] = (None, b.dtype, b.device, b.shape, b.stride(), b.clone())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return state, hooks


def assert_same(model, snap):
    state, hooks = snap
    now, now_hooks = snapshot(model)
    assert now.keys() == state.keys() and now_hooks == hooks
    for key, (p, *meta, value) in state.items():
        q, *now_meta, now_value = now[key]
        assert now_meta == meta and torch.equal(now_value, value), key
        if p is not None:
            assert q is p, key  # the same Parameter objects (their data are fresh copies)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_block_swap_is_bit_exact_and_prefetches_one_block_ahead(model, n):
    reference = forward(model)
    snap = snapshot(model)
    swap = enable_block_swap(model, n, "cpu")
    assert get_block_swap(model) is swap and swap.indices == tuple(range(4 - n, 4))
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, swap.materialised)))
               for i, b in enumerate(model.transformer_blocks)]
    try:
        out = forward(model)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out, reference)
    for i, materialised in seen:
        assert len(materialised) <= 2
        if i in swap.indices:
            assert i in materialised  # real weights while it runs
        if i + 1 in swap.indices:
            assert i + 1 in materialised  # the next swapped block is already being copied
    assert swap.materialised == ()  # nothing stays materialised between forwards
    assert torch.equal(forward(model), reference)  # and again (slots freed and reallocated)
    swap.remove()
    assert get_block_swap(model) is None
    assert_same(model, snap)
    assert torch.equal(forward(model), reference)


def test_placeholders_drop_exactly_the_swapped_bytes(model):
    before = tensor_bytes(model)
    blocks = [tensor_bytes(b) for b in model.transformer_blocks]
    swap = enable_block_swap(model, 3, "cpu")
    assert before - tensor_bytes(model) == sum(blocks[1:]) == swap.swapped_bytes
    for index in swap.indices:
        assert all(t.numel() == 0 for t in model.transformer_blocks[index].parameters())
    model.to("cpu")  # what ComfyUI's ModelPatcher does with the holder: moves (and counts) the resident part only
    assert before - tensor_bytes(model) == swap.swapped_bytes
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) == before - swap.swapped_bytes
    disable_block_swap(model)
    assert tensor_bytes(model) == before


def test_enable_twice_and_bad_counts(model):
    reference = forward(model)
    snap = snapshot(model)
    enable_block_swap(model, 1, "cpu")
    swap = enable_block_swap(model, 3, "cpu")  # replaces the first one
    assert get_block_swap(model) is swap and swap.num_blocks == 3
    assert torch.equal(forward(model), reference)
    swap.remove()
    swap.remove()  # idempotent
    assert_same(model, snap)
    for bad in (0, 5):
        with pytest.raises(UnsupportedRequestError, match="between 1 and 4"):
            enable_block_swap(model, bad, "cpu")
    assert_same(model, snap)


@pytest.mark.parametrize("where", ["pre_hook", "post_hook"])
def test_exception_inside_a_swapped_block_leaves_the_model_as_it_was(model, where):
    reference = forward(model)
    snap = snapshot(model)
    swap = enable_block_swap(model, 2, "cpu")
    swapped_bytes = tensor_bytes(model)

    def boom(*args):
        raise RuntimeError("boom")

    block = model.transformer_blocks[2]  # the first swapped block: block 3 is being prefetched when it fails
    handle = block.register_forward_pre_hook(boom) if where == "pre_hook" else block.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        forward(model)
    handle.remove()
    assert swap.materialised == ()
    assert tensor_bytes(model) == swapped_bytes  # placeholders back, nothing leaked
    assert torch.equal(forward(model), reference)
    swap.remove()
    assert_same(model, snap)


def test_keyboard_interrupt_inside_a_block_is_cleaned_up(model):
    """KeyboardInterrupt is no Exception, so always_call hooks skip it: reset() (Pipeline.denoise calls it
    on every exit) and the next forward's start clear what it left."""
    reference = forward(model)
    swap = enable_block_swap(model, 2, "cpu")
    swapped_bytes = tensor_bytes(model)

    def interrupt(*args):
        raise KeyboardInterrupt

    handle = model.transformer_blocks[3].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        forward(model)
    handle.remove()
    assert swap.materialised  # left over until someone resets
    reset_block_swap(model)
    assert swap.materialised == () and tensor_bytes(model) == swapped_bytes
    handle = model.transformer_blocks[3].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        forward(model)
    handle.remove()
    assert torch.equal(forward(model), reference)  # the next forward starts clean by itself
    assert tensor_bytes(model) == swapped_bytes
    swap.remove()


def test_block_swap_with_fp8_weights(model):
    quantize_to_fp8(model, torch.bfloat16)
    reference = forward(model, torch.bfloat16)
    snap = snapshot(model)
    before = weight_bytes(model)
    swap = enable_block_swap(model, 2, "cpu")
    assert before - weight_bytes(model) == swap.swapped_bytes  # float8 weights and float32 scales both swapped
    assert torch.equal(forward(model, torch.bfloat16), reference)
    swap.remove()
    assert_same(model, snap)


# ------------------------------------------------------------------------------------------ LoRA
@pytest.fixture
def lora_file(base, tmp_path):
    lora.clear_cache()
    yield write_tiny_lora(tmp_path / "style.safetensors", base, rank=4, seed=1, alpha=2.0)
    lora.clear_cache()


def test_lora_set_before_block_swap(model, lora_file):
    set_loras(model, [(lora_file, 0.8)])
    with_lora = forward(model)
    before = tensor_bytes(model)
    swap = enable_block_swap(model, 2, "cpu")
    assert before - tensor_bytes(model) == swap.swapped_bytes  # the LoRA factors are swapped with their block
    assert torch.equal(forward(model), with_lora)
    swap.remove()
    assert torch.equal(forward(model), with_lora)
    remove_loras(model)
    assert not torch.equal(forward(model), with_lora)


def test_lora_set_and_changed_while_block_swap_is_on(model, lora_file):
    base_out = forward(model)
    reference = copy.deepcopy(model)
    set_loras(reference, [(lora_file, 0.8)])
    with_lora = forward(reference)
    snap = snapshot(model)

    swap = enable_block_swap(model, 2, "cpu")
    swapped = swap.swapped_bytes
    set_loras(model, [(lora_file, 0.8)])  # suspends the swap itself while attaching
    assert swap.swapped_bytes > swapped  # the new factors went to the swapped store too
    assert all(t.numel() == 0 for i in swap.indices for t in model.transformer_blocks[i].buffers())
    assert torch.equal(forward(model), with_lora)
    set_loras(model, [])
    assert swap.swapped_bytes == swapped
    with suspended(model):  # an explicit suspension around it still works (nested)
        set_loras(model, [(lora_file, 0.8)])
    assert torch.equal(forward(model), with_lora)
    set_loras(model, [])
    assert torch.equal(forward(model), base_out)
    swap.remove()
    assert_same(model, snap)


def test_lora_removed_without_suspending_is_tolerated(model, lora_file):
    base_out = forward(model)
    set_loras(model, [(lora_file, 0.8)])
    swap = enable_block_swap(model, 2, "cpu")
    remove_loras(model)  # deletes the swapped blocks' factor placeholders: their stored copies are dropped
    assert torch.equal(forward(model), base_out)
    swap.remove()
    assert torch.equal(forward(model), base_out)
    assert not any(hasattr(m, "lora_down") for m in model.modules())


def test_weights_replaced_behind_block_swap_is_a_clear_error(model):
    swap = enable_block_swap(model, 1, "cpu")
    linear = model.transformer_blocks[3].ff.net[2]
    linear.weight.data = torch.zeros(linear.out_features, linear.in_features)
    with pytest.raises(Exception, match="given new data while swapped out"):
        forward(model)
    linear.weight.data = torch.empty(0)
    swap.remove()


# ------------------------------------------------------------------------------------------ pipelines
@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    """Reference results of the plain (resident float32) pipeline, per kind, and of fp8 alone."""
    results = {}

    def get(kind, fp8=False):
        if (kind, fp8) not in results:
            pipe = load_pipeline(tiny_model_dir(kind), fp8=fp8)
            results[kind, fp8] = run(pipe, kind)
        return results[kind, fp8]

    return get


def run(pipe, kind):
    extra = {"start_image": IMAGE} if kind == "inpaint" else {}
    return pipe.generate("a cat", **GEN, **extra)


@pytest.mark.parametrize("kind", ["t2v", "inpaint"])
@pytest.mark.parametrize("memory,swap_blocks", [("gpu", None), ("offload", None), ("block_swap", 1),
                                                ("block_swap", 2), ("auto", None)])
def test_modes_equal_the_plain_pipeline(tiny_model_dir, plain, kind, memory, swap_blocks):
    pipe = load_pipeline(tiny_model_dir(kind), memory=memory, swap_blocks=swap_blocks)
    assert pipe.memory_plan.offload == (memory in ("offload", "block_swap"))
    assert pipe.memory_plan.swap_blocks == (swap_blocks or 0)
    assert (get_block_swap(pipe.transformer) is not None) == bool(swap_blocks)
    out, want = run(pipe, kind), plain(kind)
    assert torch.equal(out.latents, want.latents) and torch.equal(out.frames, want.frames)


@pytest.mark.parametrize("memory,swap_blocks", [("fp8", None), ("fp8_block_swap", 1), ("fp8_block_swap", 2)])
def test_fp8_modes_equal_fp8_and_stay_close_to_float32(tiny_model_dir, plain, memory, swap_blocks):
    pipe = load_pipeline(tiny_model_dir("t2v"), memory=memory, swap_blocks=swap_blocks)
    assert pipe.memory_plan.fp8 and pipe.memory_plan.offload
    out = run(pipe, "t2v")
    fp8_alone = plain("t2v", fp8=True)
    assert torch.equal(out.latents, fp8_alone.latents) and torch.equal(out.frames, fp8_alone.frames)
    err = rel_err(out.latents, plain("t2v").latents)
    print(f"{memory}: final latents relative L2 error vs float32 {err:.4f}")
    assert err < FP8_REL_TOL


def test_pipeline_set_loras_with_block_swap(tiny_model_dir, tmp_path):
    path = write_tiny_lora(tmp_path / "tiny.safetensors", load_pipeline(tiny_model_dir("t2v")).transformer,
                           rank=4, seed=5, alpha=2.0)
    plain_pipe = load_pipeline(tiny_model_dir("t2v"))
    plain_pipe.set_loras([(path, 0.7)])
    want = run(plain_pipe, "t2v")
    pipe = load_pipeline(tiny_model_dir("t2v"), memory="block_swap", swap_blocks=2)
    pipe.set_loras([(path, 0.7)])  # after enabling: goes through block_swap.suspended
    assert torch.equal(run(pipe, "t2v").latents, want.latents)
    pipe.set_loras([])
    assert torch.equal(run(pipe, "t2v").latents, run(load_pipeline(tiny_model_dir("t2v")), "t2v").latents)


class Recorder:
    """Wraps each component's .to() and records (role, event) in order, with what the placement had active."""

    def __init__(self, pipe):
        self.events = []
        self.pipe = pipe
        for role, component in (("text", pipe.text_encoders), ("transformer", pipe.transformer), ("vae", pipe.vae)):
            self._wrap(role, component)
        pipe.transformer.register_forward_pre_hook(lambda m, a: self.events.append(("forward", self.active())))
        decode = pipe.vae.decode
        pipe.vae.decode = lambda z: (self.events.append(("decode", self.active())), decode(z))[1]
        pieces = pipe.vae.decode_pieces  # what vae_io.decode_latents calls: one causal chunk at a time
        pipe.vae.decode_pieces = lambda z: (self.events.append(("decode", self.active())), pieces(z))[1]
        encode = pipe.vae.encode
        pipe.vae.encode = lambda x: (self.events.append(("encode", self.active())), encode(x))[1]

    def active(self):
        return tuple(sorted(role for role, depth in self.pipe.placement.active.items() if depth))

    def _wrap(self, role, component):
        to = component.to

        def recorded(device, *args, **kwargs):
            self.events.append((role, "on" if self.active() and role in self.active() else "off"))
            return to(device, *args, **kwargs)

        component.to = recorded


def test_offload_moves_each_component_only_for_its_stage(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir("inpaint"), memory="offload")
    assert isinstance(pipe.placement, OffloadPlacement)
    rec = Recorder(pipe)
    run(pipe, "inpaint")
    events = rec.events
    # prepare encodes the start image, then the two prompts are encoded, then denoising, then decoding
    assert events[:3] == [("vae", "on"), ("encode", ("vae",)), ("vae", "off")]
    assert events[3:7] == [("text", "on"), ("text", "off")] * 2  # the prompt, then the negative prompt
    forwards = [e for e in events if e[0] == "forward"]
    assert len(forwards) == 2 and all(active == ("transformer",) for _, active in forwards)
    t = [i for i, e in enumerate(events) if e[0] == "transformer"]
    assert [events[i][1] for i in t] == ["on", "off"] and t[0] < events.index(forwards[0]) < t[1]
    assert events[-3:] == [("vae", "on"), ("decode", ("vae",)), ("vae", "off")]
    assert rec.active() == ()
    # cached prompts: the text encoders are not moved again
    rec.events.clear()
    run(pipe, "inpaint")
    assert not any(e[0] == "text" for e in rec.events)


def test_offload_moves_back_on_errors(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir("t2v"), memory="block_swap", swap_blocks=1)
    rec = Recorder(pipe)

    def cancel(info):
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        pipe.generate("a cat", **GEN, callback=cancel)
    assert [e for e in rec.events if e[0] == "transformer"] == [("transformer", "on"), ("transformer", "off")]
    assert rec.active() == () and get_block_swap(pipe.transformer).materialised == ()

    def interrupt(*args):
        raise KeyboardInterrupt

    handle = pipe.transformer.transformer_blocks[1].register_forward_pre_hook(interrupt)  # inside the swapped block
    with pytest.raises(KeyboardInterrupt):
        pipe.generate("a cat", **GEN)
    handle.remove()
    assert rec.active() == () and get_block_swap(pipe.transformer).materialised == ()


def test_denoise_matches_the_straightforward_loop(tiny_pipeline):
    """The loop without per-step host syncs gives bit-identical latents and the same callback timesteps."""
    from easyanimate_core.text import PromptEmbeds

    pipe = tiny_pipeline("t2v")
    for sampler in ("DDIM", "Euler", "DPM++"):
        cond = pipe.prepare(**{**GEN, "num_inference_steps": 3}, sampler=sampler)
        pos, neg = pipe.encode_prompt("a cat"), pipe.encode_prompt("")
        seen = []
        got = pipe.denoise(cond, pos, neg, 6.0, callback=seen.append)

        cond = pipe.prepare(**{**GEN, "num_inference_steps": 3}, sampler=sampler)
        scheduler, latents = cond.scheduler, cond.latents
        text = PromptEmbeds.cat([neg, pos])
        kwargs = {"generator": cond.generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        if "eta" in inspect.signature(scheduler.step).parameters:
            kwargs["eta"] = 0.0
        with torch.inference_mode():
            for t in cond.timesteps:
                model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                pred = pipe.transformer(model_in, t.expand(2).float(), text.bert, text.t5).float()
                uncond, c = pred.chunk(2)
                latents = scheduler.step(uncond + 6.0 * (c - uncond), t, latents, **kwargs).prev_sample
        assert torch.equal(got, latents), sampler
        assert [s.timestep for s in seen] == [float(t) for t in cond.timesteps]
        assert all(isinstance(s.timestep, float) for s in seen)


# ------------------------------------------------------------------------------------------ planner
def test_planner_logic_with_made_up_sizes():
    sizes = dict(component_bytes={"transformer": 100, "transformer_fp8": 50, "text": 20, "vae": 10},
                 transformer_block_bytes=10, num_blocks=10, transformer_block_bytes_fp8=[5] * 10,
                 activation_estimate_bytes={"transformer": 10, "vae": 10, "vae_tiled": 4, "text": 5},
                 reserve_bytes=0)

    def auto(free):
        return plan_memory("auto", free_bytes=free, total_bytes=1000, **sizes)

    assert auto(140).mode == "gpu" and auto(140).peak_bytes == 140 and not auto(140).offload
    assert auto(139).mode == "offload" and auto(110).mode == "offload" and auto(110).peak_bytes == 110
    p = auto(109)
    assert (p.mode, p.offload, p.fp8, p.swap_blocks) == ("fp8", True, True, 0) and p.peak_bytes == 60
    assert auto(60).mode == "fp8"
    # fp8 + n swapped: 50 - 5n + 5 * min(2, n) (two slots) + 10 working: 60, 60, 55, 50, 45 ... for n = 1, 2, 3 ...
    for free, n in ((59, 3), (55, 3), (50, 4), (30, 8)):
        p = auto(free)
        assert (p.mode, p.swap_blocks, p.fits) == ("fp8_block_swap", n, True), free
        assert plan_memory("fp8_block_swap", swap_blocks=n - 1, free_bytes=free, total_bytes=1000, **sizes).fits is False
    p = auto(24)  # the transformer fits with every block swapped (20), the text encoders (25) do not
    assert p.fits is False and "text encoders alone" in p.reason
    sizes["activation_estimate_bytes"].update(text=1, vae=20)
    p = auto(25)  # text 21 fits; the VAE (10 + 20) fits only tiled (10 + 4); the transformer with 9 blocks swapped
    assert (p.swap_blocks, p.vae_tiling, p.fits, p.peak_bytes) == (9, True, True, 25)
    sizes["component_bytes"]["text"] = 5
    p = auto(19)  # everything but the transformer fits; it needs 20 with every block swapped
    assert not p.fits and p.swap_blocks == 10 and "lower the resolution" in p.reason


def test_explicit_modes_and_errors():
    sizes = dict(free_bytes=60, total_bytes=1000, reserve_bytes=0,
                 component_bytes={"transformer": 100, "transformer_fp8": 50, "text": 20, "vae": 10},
                 transformer_block_bytes=[10] * 10, activation_estimate_bytes=5)
    for mode, offload, fp8 in (("gpu", False, False), ("offload", True, False), ("fp8", True, True)):
        p = plan_memory(mode, **sizes)
        assert (p.mode, p.offload, p.fp8, p.swap_blocks, p.requested) == (mode, offload, fp8, 0, mode)
    assert plan_memory("block_swap", swap_blocks=3, **sizes).swap_blocks == 3
    p = plan_memory("block_swap", **sizes)  # the fewest that fit: 100 - 10n + 20 + 5 <= 60
    assert (p.swap_blocks, p.fits, p.fp8) == (7, True, False)
    assert plan_memory("fp8_block_swap", **sizes).swap_blocks == 1  # 50 - 5 + 5 + 5 <= 60
    assert plan_memory("offload").peak_bytes is None  # without sizes: as requested, no estimate
    with pytest.raises(UnsupportedRequestError, match="unknown memory mode 'fast'"):
        plan_memory("fast")
    with pytest.raises(UnsupportedRequestError, match="swap_blocks needs memory mode block_swap"):
        plan_memory("offload", swap_blocks=2)
    with pytest.raises(UnsupportedRequestError, match="between 1 and 10"):
        plan_memory("block_swap", swap_blocks=11, **sizes)
    with pytest.raises(UnsupportedRequestError, match="give swap_blocks"):
        plan_memory("block_swap", device_type="cpu")
    p = plan_memory("auto", device_type="cpu")
    assert p.mode == "gpu" and "CPU" in p.describe() and "\n" not in p.describe()


@pytest.fixture(scope="module")
def sizes_12b():
    """The published 12B InP model's byte sizes in bf16, computed from shapes (meta tensors, nothing allocated)."""
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    from easyanimate_core.models.vae import MagvitVAE

    cfg = TransformerConfig(in_channels=33)
    total, blocks = transformer_sizes(cfg, torch.bfloat16)
    total8, blocks8 = transformer_sizes(cfg, torch.bfloat16, fp8=True)
    with torch.device("meta"):
        # text_encoder: HunyuanDiT's bilingual BERT (hidden 1024, 24 layers); text_encoder_2: the mT5-XL encoder
        bert = BertModel(BertConfig(vocab_size=47020, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096, max_position_embeddings=512))
        t5 = T5EncoderModel(T5Config(vocab_size=250112, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                                     num_heads=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
        vae = MagvitVAE()  # its defaults are the published V5 VAE (246,478,803 parameters)
    text = sum(p.numel() for m in (bert, t5) for p in m.parameters()) * 2
    return dict(component_bytes={"transformer": total, "transformer_fp8": total8, "text": text,
                                 "vae": sum(p.numel() for p in vae.parameters()) * 2},
                transformer_block_bytes=blocks, transformer_block_bytes_fp8=blocks8)


def test_12b_sizes_from_shapes(sizes_12b):
    c = sizes_12b["component_bytes"]
    assert c["transformer"] == 23_595_384_960  # 11,797,692,480 parameters × 2: the published file's size
    assert len(sizes_12b["transformer_block_bytes"]) == 48
    assert sizes_12b["transformer_block_bytes"][0] == 245_471_744 * 2
    assert 0.50 < c["transformer_fp8"] / c["transformer"] < 0.51  # 1-byte block Linears, float32 row scales
    assert 3.9e9 < c["text"] < 4.2e9 and 0.45e9 < c["vae"] < 0.55e9


@pytest.mark.parametrize("gib,size,mode", [
    (80, (384, 672, 49), "gpu"), (80, (768, 1344, 49), "gpu"),
    (40, (384, 672, 49), "gpu"),
    (32, (384, 672, 49), "offload"),
    (24, (384, 672, 49), "fp8"), (24, (768, 1344, 25), "fp8"),   # published: 24 GB runs 768x1344x25 with qfloat8
    (16, (384, 672, 49), "fp8"),                                 # published: 16 GB runs 384x672 only with qfloat8
    (16, (768, 1344, 49), "fp8_block_swap"),
])
def test_auto_plans_for_real_12b_sizes(sizes_12b, gib, size, mode):
    work = estimate_working_bytes(*size)
    kwargs = dict(free_bytes=gib * GiB - GiB // 2, total_bytes=gib * GiB, activation_estimate_bytes=work, **sizes_12b)
    plan = plan_memory("auto", **kwargs)
    print(f"{gib} GiB {size}: {plan.describe()}")
    assert plan.mode == mode and plan.fits
    if mode == "fp8_block_swap":
        n = plan.swap_blocks
        assert 1 < n < 48 and plan.vae_tiling  # the untiled VAE needs ~21 GB at 768x1344
        assert not plan_memory("fp8_block_swap", swap_blocks=n - 1, **kwargs).fits


# ------------------------------------------------------------------------------------------ working memory
class LivePeak(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still referenced (how the formulas were derived)."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _track(self, t):
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformer_working_estimate_bounds_the_measured_peak(dtype):
    heads, head_dim = 4, 64
    cfg = TransformerConfig(num_attention_heads=heads, attention_head_dim=head_dim, num_layers=2, mmdit_layers=2,
                            time_embed_dim=64, text_embed_dim=32, text_embed_dim_t5=48)
    model = EasyAnimateTransformer3D(cfg).to(dtype).eval()
    height, width, frames = 128, 224, 17
    x = torch.randn(2, 16, 5, height // 8, width // 8, dtype=dtype)
    args = (x, torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32, dtype=dtype), torch.randn(2, 256, 48, dtype=dtype))
    with torch.inference_mode():
        model(*args)  # RoPE tables cached, as in every step after the first
        counter = LivePeak()
        with counter:
            model(*args)
    hidden = heads * head_dim
    estimate = estimate_working_bytes(height, width, frames, dtype=dtype, hidden=hidden,
                                      largest_linear=hidden * 4 * hidden)["transformer"]
    print(f"{dtype}: measured {counter.peak / 1e6:.1f} MB, estimate {estimate / 1e6:.1f} MB")
    assert counter.peak <= estimate <= 1.6 * counter.peak


def test_vae_working_estimate_bounds_the_measured_peak():
    """The real V5 VAE structure (128/256/512/512 channels: MagvitVAE's defaults) decoding a small video, in bf16."""
    from easyanimate_core.models.vae import MagvitVAE

    with torch.device("meta"):
        vae = MagvitVAE().to(torch.bfloat16)
    vae = vae.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.02)
    counter = LivePeak()
    with torch.inference_mode(), counter:
        vae.decode(torch.randn(1, 16, 2, 8, 8, dtype=torch.bfloat16))  # what runs on the device
    estimate = estimate_working_bytes(64, 64, 5)["vae"]
    print(f"VAE decode 64x64x5: measured {counter.peak / 1e6:.1f} MB, estimate {estimate / 1e6:.1f} MB")
    assert counter.peak <= estimate <= 1.5 * counter.peak


# ------------------------------------------------------------------------------------------ CUDA only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_block_swap_is_bit_exact_and_frees_gpu_memory(base):
    model = copy.deepcopy(base).to("cuda", torch.bfloat16)
    args = [a.to("cuda") for a in inputs(torch.bfloat16)]
    with torch.inference_mode():
        reference = model(*args)
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    swap = enable_block_swap(model, 3, "cuda")
    assert resident - torch.cuda.memory_allocated() >= swap.swapped_bytes
    assert all(swap._packed[index].buffer.is_pinned() for index in swap.indices)
    for _ in range(3):
        with torch.inference_mode():
            out = model(*args)
        assert torch.equal(out, reference) and swap.materialised == ()
    swap.remove()
    with torch.inference_mode():
        assert torch.equal(model(*args), reference)
    assert all(p.device.type == "cuda" and not p.is_pinned() for p in model.parameters())


@cuda
def test_cuda_offload_and_block_swap_pipelines_match(tiny_model_dir):
    plain = load_pipeline(tiny_model_dir("inpaint"), device="cuda", dtype="bf16")
    want = run(plain, "inpaint")
    for memory, n in (("offload", None), ("block_swap", 1), ("fp8_block_swap", 2)):
        pipe = load_pipeline(tiny_model_dir("inpaint"), device="cuda", dtype="bf16", memory=memory, swap_blocks=n)
        out = run(pipe, "inpaint")
        for module in (pipe.transformer, pipe.vae, pipe.text_encoders.bert, pipe.text_encoders.t5):
            assert all(p.device.type == "cpu" for p in module.parameters())  # back on the CPU between stages
        if memory.startswith("fp8"):
            assert rel_err(out.latents, want.latents) < FP8_REL_TOL
        else:
            assert torch.equal(out.latents, want.latents)


@cuda
def test_cuda_denoise_steps_do_not_synchronise(tiny_model_dir):
    """After the first step (the timesteps are read once), no step may wait for the GPU (DDIM)."""
    pipe = load_pipeline(tiny_model_dir("t2v"), device="cuda", dtype="bf16", memory="block_swap", swap_blocks=1)
    steps = {**GEN, "num_inference_steps": 4}
    pipe.generate("a cat", **steps)  # warm: RoPE tables, kernels, prompt cache
    cond = pipe.prepare(**steps, sampler="DDIM")
    pos, neg = pipe.encode_prompt("a cat"), pipe.encode_prompt("")

    def strict_from_step_one(info):
        if info.step == 1:
            torch.cuda.set_sync_debug_mode("error")

    try:
        pipe.denoise(cond, pos, neg, 6.0, callback=strict_from_step_one)
    finally:
        torch.cuda.set_sync_debug_mode("default")
