"""A random full-size Stable Diffusion 1.x (or 2.x) checkpoint in the original CompVis layout, as
the release files are (float16, with the buffers and EMA leftovers real files hold), and
the diffusers and transformers configurations of the same architecture."""

import json
import math
import re
import struct

import numpy as np

SEED = 20240607


# ------------------------------------------------------------------ SD 1.x configs
UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

# SD 2.x (512-base and 768-v): 64-wide heads, linear projections, OpenCLIP's text encoder
# of which diffusers keeps the first 23 layers.
UNET_CONFIG_SD2 = dict(
    UNET_CONFIG, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
)  # fmt: skip
CLIP_CONFIG_SD2 = dict(
    CLIP_CONFIG, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, hidden_act="gelu", projection_dim=512,
)  # fmt: skip

# ------------------------------------------------------------------ the CompVis key layout
def ldm_spec(sd2=False):
    """{key: shape} of an SD 1.x checkpoint, written from the CompVis module tree; with
    sd2, of an SD 2.x one: linear projections around each transformer, a 1024-wide
    context, and the OpenCLIP ViT-H/14 text encoder (all its 24 layers, as files hold)."""
    s = {}
    context = 1024 if sd2 else 768

    def lin(p, o, i, bias=True):
        s[p + ".weight"] = (o, i)
        if bias:
            s[p + ".bias"] = (o,)

    def conv(p, o, i, k=3):
        s[p + ".weight"], s[p + ".bias"] = (o, i, k, k), (o,)

    def norm(p, c):
        s[p + ".weight"], s[p + ".bias"] = (c,), (c,)

    u = "model.diffusion_model."

    def res(p, i, o):
        norm(p + ".in_layers.0", i)
        conv(p + ".in_layers.2", o, i)
        lin(p + ".emb_layers.1", o, 1280)
        norm(p + ".out_layers.0", o)
        conv(p + ".out_layers.3", o, o)
        if i != o:
            conv(p + ".skip_connection", o, i, 1)

    def st(p, c):
        norm(p + ".norm", c)
        for projection in (".proj_in", ".proj_out"):
            if sd2:
                lin(p + projection, c, c)
            else:
                conv(p + projection, c, c, 1)
        b = p + ".transformer_blocks.0."
        for a, ctx in (("attn1", c), ("attn2", context)):
            lin(b + a + ".to_q", c, c, False)
            lin(b + a + ".to_k", c, ctx, False)
            lin(b + a + ".to_v", c, ctx, False)
            lin(b + a + ".to_out.0", c, c)
        lin(b + "ff.net.0.proj", 8 * c, c)
        lin(b + "ff.net.2", c, 4 * c)
        for n in ("norm1", "norm2", "norm3"):
            norm(b + n, c)

    lin(u + "time_embed.0", 1280, 320)
    lin(u + "time_embed.2", 1280, 1280)
    conv(u + "input_blocks.0.0", 320, 4)
    hs, ch, n = [320], 320, 1
    for level, mult in enumerate((1, 2, 4, 4)):
        for _ in range(2):
            res(f"{u}input_blocks.{n}.0", ch, 320 * mult)
            ch = 320 * mult
            if level < 3:
                st(f"{u}input_blocks.{n}.1", ch)
            hs.append(ch)
            n += 1
        if level < 3:
            conv(f"{u}input_blocks.{n}.0.op", ch, ch)
            hs.append(ch)
            n += 1
    res(u + "middle_block.0", ch, ch)
    st(u + "middle_block.1", ch)
    res(u + "middle_block.2", ch, ch)
    n = 0
    for level, mult in reversed(list(enumerate((1, 2, 4, 4)))):
        for i in range(3):
            p = f"{u}output_blocks.{n}"
            res(p + ".0", ch + hs.pop(), 320 * mult)
            ch = 320 * mult
            if level < 3:
                st(p + ".1", ch)
            if level > 0 and i == 2:
                conv(p + (".2" if level < 3 else ".1") + ".conv", ch, ch)
            n += 1
    norm(u + "out.0", 320)
    conv(u + "out.2", 4, 320)

    v = "first_stage_model."

    def vres(p, i, o):
        norm(p + ".norm1", i)
        conv(p + ".conv1", o, i)
        norm(p + ".norm2", o)
        conv(p + ".conv2", o, o)
        if i != o:
            conv(p + ".nin_shortcut", o, i, 1)

    def vmid(p):
        vres(p + ".mid.block_1", 512, 512)
        vres(p + ".mid.block_2", 512, 512)
        norm(p + ".mid.attn_1.norm", 512)
        for q in ("q", "k", "v", "proj_out"):
            conv(p + ".mid.attn_1." + q, 512, 512, 1)

    conv(v + "encoder.conv_in", 128, 3)
    ch = 128
    for i, mult in enumerate((1, 2, 4, 4)):
        for j in range(2):
            vres(f"{v}encoder.down.{i}.block.{j}", ch, 128 * mult)
            ch = 128 * mult
        if i < 3:
            conv(f"{v}encoder.down.{i}.downsample.conv", ch, ch)
    vmid(v + "encoder")
    norm(v + "encoder.norm_out", 512)
    conv(v + "encoder.conv_out", 8, 512)
    conv(v + "quant_conv", 8, 8, 1)
    conv(v + "post_quant_conv", 4, 4, 1)
    conv(v + "decoder.conv_in", 512, 4)
    vmid(v + "decoder")
    for i, mult in reversed(list(enumerate((1, 2, 4, 4)))):
        for j in range(3):
            vres(f"{v}decoder.up.{i}.block.{j}", ch, 128 * mult)
            ch = 128 * mult
        if i > 0:
            conv(f"{v}decoder.up.{i}.upsample.conv", ch, ch)
    norm(v + "decoder.norm_out", 128)
    conv(v + "decoder.conv_out", 3, 128)

    if sd2:
        t = "cond_stage_model.model."
        s[t + "token_embedding.weight"], s[t + "positional_embedding"] = (49408, 1024), (77, 1024)
        for i in range(24):
            p = f"{t}transformer.resblocks.{i}."
            s[p + "attn.in_proj_weight"], s[p + "attn.in_proj_bias"] = (3072, 1024), (3072,)
            lin(p + "attn.out_proj", 1024, 1024)
            norm(p + "ln_1", 1024)
            norm(p + "ln_2", 1024)
            lin(p + "mlp.c_fc", 4096, 1024)
            lin(p + "mlp.c_proj", 1024, 4096)
        norm(t + "ln_final", 1024)
        s[t + "text_projection"], s[t + "logit_scale"] = (1024, 1024), ()
        return s
    t = "cond_stage_model.transformer.text_model."
    s[t + "embeddings.token_embedding.weight"] = (49408, 768)
    s[t + "embeddings.position_embedding.weight"] = (77, 768)
    for i in range(12):
        p = f"{t}encoder.layers.{i}."
        for q in ("q_proj", "k_proj", "v_proj", "out_proj"):
            lin(p + "self_attn." + q, 768, 768)
        norm(p + "layer_norm1", 768)
        norm(p + "layer_norm2", 768)
        lin(p + "mlp.fc1", 3072, 768)
        lin(p + "mlp.fc2", 768, 3072)
    norm(t + "final_layer_norm", 768)
    return s


NON_WEIGHTS = {  # present in real files, must be ignored by the loader
    "cond_stage_model.transformer.text_model.embeddings.position_ids": ("I64", (1, 77)),
    "betas": ("F32", (1000,)),
    "alphas_cumprod": ("F32", (1000,)),
    "alphas_cumprod_prev": ("F32", (1000,)),
    "sqrt_alphas_cumprod": ("F32", (1000,)),
    "posterior_variance": ("F32", (1000,)),
    "model_ema.decay": ("F32", ()),
    "model_ema.num_updates": ("I32", ()),
    "model_ema.diffusion_modelinput_blocks00weight": ("F16", (320, 4, 3, 3)),
    "model_ema.diffusion_modelout2bias": ("F16", (4,)),
    "first_stage_model.loss.logvar": ("F32", ()),
}
NP = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "I32": np.int32, "BF16": np.uint16}


# ------------------------------------------------------------------ a streaming safetensors writer
def write_safetensors(path, entries, sparse=False, cut=0):
    """entries: {key: (dtype, shape, fill)} with fill(key) -> array, or None for sparse files.
    sparse=True writes only the header and extends the file (zeros): header-level fakes.
    cut: bytes removed from the end (a truncated file)."""
    header, off = {}, 0
    for k, (dt, shape, _) in entries.items():
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(NP[dt]).itemsize
        header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if sparse:
            f.truncate(8 + len(raw) + off - cut)
            return
        for k, (dt, shape, fill) in entries.items():
            a = np.ascontiguousarray(fill(k), dtype=NP[dt]).reshape(shape)
            f.write(a.tobytes())
    if cut:
        with open(path, "r+b") as f:
            f.truncate(8 + len(raw) + off - cut)


def random_weight(key, shape, rng):
    """1/sqrt(fan_in) weights, gamma ~ 1, small biases: activations stay O(1)."""
    if len(shape) >= 2:
        return rng.standard_normal(shape, np.float32) / math.sqrt(np.prod(shape[1:]))
    if re.search(
        r"norm[\w.]*\.weight$|layer_norm\d\.weight$|norm_out\.weight$|out\.0\.weight$|"
        r"(in|out)_layers\.0\.weight$|ln_\w+\.weight$",
        key,
    ):
        return 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
    return 0.05 * rng.standard_normal(shape, np.float32)


def fill_non_weight(key):
    dt, shape = NON_WEIGHTS[key]
    if key.endswith("position_ids"):
        return np.arange(77)[None]
    return np.full(shape, 0.5)


def write_random_checkpoint(path, sd2=False):
    """Writes the checkpoint, 1.1 billion float16 weights (2.1 GB), at `path`; with sd2,
    an SD 2.x one, 1.3 billion (2.6 GB)."""
    rng = np.random.default_rng(SEED)
    entries = {
        k: ("F16", s, lambda k, s=s: random_weight(k, s, rng)) for k, s in ldm_spec(sd2).items()
    }
    non_weights = {k: v for k, v in NON_WEIGHTS.items() if not (sd2 and "text_model" in k)}
    entries.update({k: (dt, s, fill_non_weight) for k, (dt, s) in non_weights.items()})
    write_safetensors(path, entries)
