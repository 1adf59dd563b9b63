"""Stable Diffusion 1.x (and 2.x) checkpoints into KerasCV's four models: `--base-model PATH`.

A single `.safetensors` file in the original CompVis layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.text_model.*`; float16, bfloat16
or float32, with or without EMA weights, such as `v1-5-pruned-emaonly.safetensors`), or
a diffusers folder (`unet/`, `vae/` and `text_encoder/` holding `*.safetensors`), whose
keys are first renamed to the CompVis ones ("LDM keys"). Nothing is downloaded; `.ckpt`
pickles are refused, as loading one runs code from the file.

`load_base_model(path, stable_diffusion)` pairs every variable of the four KerasCV
models with a CompVis key by walking the KerasCV layers in the order the CompVis module
tree builds them, never by Keras's variable names, which come from global counters;
every variable must be paired exactly once. The whole file is checked from its
safetensors header (every key, shape and dtype) before any model is built, against
`sd1x_weights.json` (the keys and shapes that pairing finds, which a test keeps true),
and again before any weight is written, so a wrong file (a LoRA, an incomplete or
reshaped checkpoint) ends in one sentence, costing neither time nor memory. Convolution
kernels go from OIHW to HWIO, dense kernels are transposed, and the VAE attention's
1x1 convolutions may be stored as linear layers (diffusers). `position_ids`,
`model_ema.*`, `first_stage_model.loss.*` and the noise-schedule buffers are not
weights of these models.

SD 2.x files load into KerasCV's V2 classes (`TextEncoderV2`, `DiffusionModelV2`; the
family comes from the text encoder's width): OpenCLIP's text encoder
(`cond_stage_model.model.*`) is read as the CLIP keys above, its first 23 layers, each
fused `in_proj` split into query, key and value (`open_clip_as_clip_keys`). Checked
against diffusers on a random SD 2.x checkpoint in `tests/test_sd2x_oracle.py`: the
text encoding, the VAE, the UNet's prediction, the decoder, and the trainer's loss and
gradient, with the noise (512-base) or the velocity (768-v) as target. What else
differs for SD 2.x, and which of the two a file is, `sd2x.py` says. `check_base_model`
checks a file against `sd1x_weights.json` or `sd2x_weights.json`, by its family.

Checked against diffusers and transformers on the same random SD 1.x checkpoint
(`tests/test_diffusers_oracle.py`): the text encoding, the VAE posterior mean, the
UNet's noise prediction, the decoded image, and the trainer's loss and placeholder
gradient agree within 2e-5, 2e-4, 2e-3, 1e-4, 1e-4 and 2e-3 of the largest reference
value (the test prints what it measured). The tolerances leave room for KerasCV's own
arithmetic, which differs from the original in two places: its GEGLU uses the tanh
approximation of GELU, and its GroupNorm epsilon is 1e-5 where the original VAE's is
1e-6.
"""

import glob
import hashlib
import json
import os
import re
import struct

import numpy as np
import safetensors

from textual_inversion_extras.keras_internals import input_layer, output_layer
from textual_inversion_extras.errors import UserError

BASE_MODEL = "KerasCV StableDiffusion v1.4 (CLIP ViT-L/14 text encoder)"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
TEXT_LAYERS_V2 = 23  # of OpenCLIP ViT-H/14's 24: SD 2.x is guided by the penultimate


def short_hash(path, chunk=1 << 20):
    """First 10 hex of sha256(size, first MB, last MB): fast even on 4 GB."""
    if os.path.isdir(path):  # a diffusers folder: the files load_base_model reads
        paths = [
            f
            for sub in ("unet", "vae", "text_encoder")
            for f in component_files(os.path.join(path, sub))
        ]
    else:
        paths = [path]
    h = hashlib.sha256()
    for p in paths:
        size = os.path.getsize(p)
        h.update(str(size).encode())
        with open(p, "rb") as f:
            h.update(f.read(chunk))
            f.seek(max(0, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:10]


def safetensors_header(path):
    """{key: (dtype, shape, (begin, end))} from a safetensors header; checks the file is complete."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise UserError(
                f"{path} is not a valid .safetensors file (damaged or not safetensors); re-download or re-convert it."
            )
        try:
            meta = json.loads(f.read(n))
        except ValueError:
            raise UserError(
                f"{path} has a damaged safetensors header; re-download or re-convert it."
            ) from None
    meta.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in meta.values()), default=0)
    if size != 8 + n + end:
        raise UserError(
            f"{path} is truncated or damaged ({size} bytes instead of {8 + n + end}); re-download it."
        )
    return {
        k: (
            v["dtype"],
            tuple(v["shape"]),
            (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]),
        )
        for k, v in meta.items()
    }


def read_tensor(path, key, dtype, shape, span, part=None):
    """One tensor as float32 numpy, read with safetensors; BF16 (numpy lacks it) is widened by hand.
    The file is opened per tensor so its memory map (page cache in RSS) never grows to the whole file.
    part: (first, last row, the stored shape) where the weight is rows of a stored tensor
    (OpenCLIP's fused query, key and value projections).
    """
    if part:
        first, last, stored_shape = part
        return read_tensor(path, key, dtype, stored_shape, span)[first:last]
    if dtype == "BF16":
        raw = np.fromfile(path, np.uint16, (span[1] - span[0]) // 2, offset=span[0])
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    with safetensors.safe_open(path, framework="np") as f:
        return f.get_tensor(key).astype(np.float32)


OPEN_CLIP = "cond_stage_model.model."
OPEN_CLIP_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                   "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}  # fmt: skip


def open_clip_as_clip_keys(src):
    """SD 2.x's OpenCLIP text encoder (`cond_stage_model.model.*`) under the CLIP keys of
    SD 1.x, as KerasCV's TextEncoderV2 takes it: its first 23 of 24 layers (SD 2.x takes
    the penultimate layer's output, then the final norm), each fused `in_proj` split into
    the query, key and value rows. The projection to CLIP's joint space is not used."""
    out = {k: v for k, v in src.items() if not k.startswith(OPEN_CLIP)}
    fixed = {"token_embedding.weight": "embeddings.token_embedding.weight",
             "positional_embedding": "embeddings.position_embedding.weight",
             "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}  # fmt: skip
    for name, clip_name in fixed.items():
        if OPEN_CLIP + name in src:
            out[CLIP + clip_name] = src[OPEN_CLIP + name]
    for k, v in src.items():
        m = re.fullmatch(re.escape(OPEN_CLIP) + r"transformer\.resblocks\.(\d+)\.(.*)", k)
        if not m or int(m[1]) >= TEXT_LAYERS_V2:
            continue
        layer, rest = f"{CLIP}encoder.layers.{m[1]}.", m[2]
        fused = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
        if fused:
            width = v[3][0] // 3
            for i, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                part = (i * width, (i + 1) * width, v[3])
                out[f"{layer}self_attn.{projection}.{fused[1]}"] = v[:3] + ((width,) + v[3][1:], v[4], part)
            continue
        for name, clip_name in OPEN_CLIP_NAMES.items():
            if rest.startswith(name + "."):
                out[layer + clip_name + rest[len(name) :]] = v
    return out


def component_files(folder):
    """The *.safetensors of one diffusers component; prefer the plain variant over .fp16 etc."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    plain = [f for f in files if re.fullmatch(r"[\w-]+\.safetensors", os.path.basename(f))]
    return plain or files


def compvis_unet_key(k, up_has_attn):
    # fmt: off
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    # fmt: on
    for a, b in fixed.items():
        if k.startswith(a + "."):
            return b + k[len(a) :]
    m = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", k
    )
    if m:
        side, b, kind, r, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if kind == "resnets":
            name, rest = rest.split(".", 1)
            rest = resnet.get(name, name) + "." + rest
        if side == "down":  # input_blocks.0 is conv_in; each level has 2 blocks + a downsampler
            if kind == "downsamplers":  # downsamplers.0.conv.* -> input_blocks.N.0.op.*
                return f"input_blocks.{3 * b + 3}.0.op." + rest.split(".", 1)[1]
            return f"input_blocks.{3 * b + r + 1}.{0 if kind == 'resnets' else 1}.{rest}"
        i = 3 * b + (2 if kind == "upsamplers" else r)
        sub = {"resnets": "0", "attentions": "1", "upsamplers": "2" if up_has_attn[b] else "1"}[
            kind
        ]
        return f"output_blocks.{i}.{sub}.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        rest = m[3]
        if m[1] == "resnets":
            name, rest = rest.split(".", 1)
            rest = resnet.get(name, name) + "." + rest
        return f"middle_block.{2 * int(m[2]) if m[1] == 'resnets' else 1}.{rest}"
    return "unmapped." + k


def compvis_vae_key(k, n_up):
    # fmt: off
    attn = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k",
            "to_v": "v", "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
    # fmt: on
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    k = k.replace(".conv_shortcut.", ".nin_shortcut.")
    k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", k)
    m = re.fullmatch(r"(.*)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", k)
    if m:
        return f"{m[1]}.mid.attn_1.{attn.get(m[2], m[2])}.{m[3]}"
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(
        r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k
    )
    # diffusers counts decoder up blocks from the bottom, CompVis from the top
    k = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.",
        lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.",
        k,
    )
    k = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.",
        k,
    )
    return k


def read_diffusers_folder(folder):
    """{ldm_key: (file, file_key, dtype, shape, span)} for a diffusers folder (header only, no data read)."""
    parts = {}
    for sub in ("unet", "vae", "text_encoder"):
        files = component_files(os.path.join(folder, sub))
        if not files:
            raise UserError(
                f"{folder} has no {sub}/*.safetensors; give a diffusers SD 1.x or 2.x folder or a single .safetensors checkpoint."
            )
        parts[sub] = {k: (f, k) + v for f in files for k, v in safetensors_header(f).items()}
    if os.path.isdir(os.path.join(folder, "text_encoder_2")) or any(
        k.startswith("add_embedding.") for k in parts["unet"]
    ):
        raise UserError(
            f"{folder} is an SDXL model, but only SD 1.x and 2.x checkpoints (e.g. stable-diffusion-v1-5) are supported."
        )
    up_has_attn = {
        int(m[1]): True
        for k in parts["unet"]
        if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    up_has_attn = {b: up_has_attn.get(b, False) for b in range(16)}
    n_up = len({k.split(".")[2] for k in parts["vae"] if k.startswith("decoder.up_blocks.")})
    out = {}
    for k, v in parts["unet"].items():
        out[UNET + compvis_unet_key(k, up_has_attn)] = v
    for k, v in parts["vae"].items():
        out[VAE + compvis_vae_key(k, n_up)] = v
    for k, v in parts["text_encoder"].items():
        out[
            "cond_stage_model.transformer."
            + (k if k.startswith("text_model.") else "text_model." + k)
        ] = v
    return out


def read_source(path):
    """{ldm_key: (file, file_key, dtype, shape, span)} for a single file or a diffusers folder."""
    if not os.path.exists(path):
        raise UserError(
            f"{path} does not exist; give an SD 1.x or 2.x .safetensors file or a diffusers folder."
        )
    if os.path.isdir(path):
        return read_diffusers_folder(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if path.lower().endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl")) or magic in (
        b"PK",
        b"\x80\x02",
        b"\x80\x04",
    ):
        raise UserError(
            f"{path} is a PyTorch pickle, which can run code when loaded, so use the model's .safetensors "
            'release or, only if you trust its source, convert it once with python -c "import torch, '
            "safetensors.torch as s; d=torch.load('in.ckpt', map_location='cpu', weights_only=False); "
            "d=d.get('state_dict', d); s.save_file({k: v.clone().contiguous() for k, v in d.items() "
            "if torch.is_tensor(v)}, 'out.safetensors')\" and pass out.safetensors."
        )
    src = {k: (path, k) + v for k, v in safetensors_header(path).items()}
    if any(k.startswith(OPEN_CLIP) for k in src):
        return open_clip_as_clip_keys(src)
    old = "cond_stage_model.transformer.embeddings."  # pre-4.x transformers layout lacks "text_model."
    if old + "token_embedding.weight" in src:
        src = {
            (
                CLIP + k[len("cond_stage_model.transformer.") :]
                if k.startswith("cond_stage_model.transformer.")
                else k
            ): v
            for k, v in src.items()
        }
    return src


def layers_back_to_the_input(layer):
    """`layer` and the layers before it, input to output, following each layer's first
    input backwards (x in ResBlock([x, t_emb]), Concatenate([x, skip]))."""
    path = []
    while type(layer).__name__ != "InputLayer":
        path.append(layer)
        layer = input_layer(layer, 0)
    return path[::-1]


def main_path_layers(model):
    """The layers on the main path of a functional model, input to output."""
    return layers_back_to_the_input(output_layer(model))


def unet_plan():
    """(LDM prefix, KerasCV class) along the UNet main path, in CompVis order; None = no weights."""
    plan, i = [("input_blocks.0.0", "PaddedConv2D")], 1
    for level in range(4):
        for _ in range(2):
            plan.append((f"input_blocks.{i}.0", "ResBlock"))
            if level < 3:
                plan.append((f"input_blocks.{i}.1", "SpatialTransformer"))
            i += 1
        if level < 3:
            plan.append((f"input_blocks.{i}.0.op", "PaddedConv2D"))
            i += 1
    plan += [
        ("middle_block.0", "ResBlock"),
        ("middle_block.1", "SpatialTransformer"),
        ("middle_block.2", "ResBlock"),
    ]
    for j in range(12):
        plan += [(None, "Concatenate"), (f"output_blocks.{j}.0", "ResBlock")]
        if j >= 3:
            plan.append((f"output_blocks.{j}.1", "SpatialTransformer"))
        if j % 3 == 2 and j < 11:  # upsampler is sub-module 1 after a plain ResBlock, else 2
            plan.append((f"output_blocks.{j}.{1 if j < 3 else 2}", "Upsample"))
    return plan + [("out.0", "GroupNormalization"), (None, "Activation"), ("out.2", "PaddedConv2D")]


def vae_plans():
    enc, dec = [("encoder.conv_in", "PaddedConv2D")], []
    for i in range(4):
        enc += [(f"encoder.down.{i}.block.{j}", "ResnetBlock") for j in range(2)]
        if i < 3:
            enc.append((f"encoder.down.{i}.downsample.conv", "PaddedConv2D"))
    mid = [
        ("mid.block_1", "ResnetBlock"),
        ("mid.attn_1", "AttentionBlock"),
        ("mid.block_2", "ResnetBlock"),
    ]
    enc += [("encoder." + p, c) for p, c in mid]
    enc += [
        ("encoder.norm_out", "GroupNormalization"),
        (None, "Activation"),
        ("encoder.conv_out", "PaddedConv2D"),
        ("quant_conv", "PaddedConv2D"),
        (None, "Lambda"),
    ]  # Lambda: mean * 0.18215
    dec = [
        (None, "Rescaling"),
        ("post_quant_conv", "PaddedConv2D"),
        ("decoder.conv_in", "PaddedConv2D"),
    ]
    dec += [("decoder." + p, c) for p, c in mid]
    for i in (3, 2, 1, 0):
        dec += [(f"decoder.up.{i}.block.{j}", "ResnetBlock") for j in range(3)]
        if i > 0:
            dec += [(None, "UpSampling2D"), (f"decoder.up.{i}.upsample.conv", "PaddedConv2D")]
    dec += [
        ("decoder.norm_out", "GroupNormalization"),
        (None, "Activation"),
        ("decoder.conv_out", "PaddedConv2D"),
    ]
    return enc, dec


def variables_and_keys(layer, p):
    """(variable, LDM key, kind) for one KerasCV layer under LDM prefix p.
    kind: 'conv' OIHW->HWIO, 'dense' (out,in)->(in,out), 'same' (bias, norm gamma/beta, embeddings).
    """
    name = type(layer).__name__
    if name == "PaddedConv2D":
        return [
            (layer.conv2d.kernel, p + ".weight", "conv"),
            (layer.conv2d.bias, p + ".bias", "same"),
        ]
    if name == "Dense":
        return [(layer.kernel, p + ".weight", "dense")] + (
            [(layer.bias, p + ".bias", "same")] if layer.use_bias else []
        )
    if name in ("GroupNormalization", "LayerNormalization"):
        return [(layer.gamma, p + ".weight", "same"), (layer.beta, p + ".bias", "same")]
    if name == "Embedding":
        return [(layer.embeddings, p + ".weight", "same")]
    subs = {  # attribute -> LDM sub-module, per KerasCV block class
        "ResBlock": [
            ("entry_flow.0", "in_layers.0"),
            ("entry_flow.2", "in_layers.2"),
            ("embedding_flow.1", "emb_layers.1"),
            ("exit_flow.0", "out_layers.0"),
            ("exit_flow.2", "out_layers.3"),
            ("residual_projection", "skip_connection"),
        ],
        "ResnetBlock": [
            ("norm1", "norm1"),
            ("conv1", "conv1"),
            ("norm2", "norm2"),
            ("conv2", "conv2"),
            ("residual_projection", "nin_shortcut"),
        ],
        "AttentionBlock": [
            ("norm", "norm"),
            ("q", "q"),
            ("k", "k"),
            ("v", "v"),
            ("proj_out", "proj_out"),
        ],
        "SpatialTransformer": [
            ("norm", "norm"),
            ("proj1", "proj_in"),
            ("proj2", "proj_out"),
            ("transformer_block", "transformer_blocks.0"),
        ],
        "BasicTransformerBlock": [
            ("norm1", "norm1"),
            ("attn1", "attn1"),
            ("norm2", "norm2"),
            ("attn2", "attn2"),
            ("norm3", "norm3"),
            ("geglu.dense", "ff.net.0.proj"),
            ("dense", "ff.net.2"),
        ],
        # to_q/k/v have no bias; out_proj is the original to_out.0 (Linear, then Dropout)
        "CrossAttention": [
            ("to_q", "to_q"),
            ("to_k", "to_k"),
            ("to_v", "to_v"),
            ("out_proj", "to_out.0"),
        ],
        "Upsample": [("conv", "conv")],
        "CLIPEmbedding": [
            ("token_embedding", "token_embedding"),
            ("position_embedding", "position_embedding"),
        ],
        "CLIPEncoderLayer": [
            ("layer_norm1", "layer_norm1"),
            ("clip_attn", "self_attn"),
            ("layer_norm2", "layer_norm2"),
            ("fc1", "mlp.fc1"),
            ("fc2", "mlp.fc2"),
        ],
        "CLIPAttention": [(a, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj")],
    }[name]
    out = []
    for attr, sub in subs:
        obj = layer
        for a in attr.split("."):
            obj = obj[int(a)] if a.isdigit() else getattr(obj, a)
        if hasattr(obj, "weights"):  # residual_projection is a lambda when shapes already match
            out += variables_and_keys(obj, f"{p}.{sub}")
    return out


def walk_plan(layers, plan, prefix, what):
    names = [type(l).__name__ for l in layers]
    if names != [c for _, c in plan]:
        raise RuntimeError(f"KerasCV {what} does not have the expected structure: {names}")
    return [t for l, (p, _) in zip(layers, plan) if p for t in variables_and_keys(l, prefix + p)]


def build_plan(sd):
    """[(variable, LDM key, kind)] covering every variable of the four models exactly once."""
    te, ie, dm, de = sd.text_encoder, sd.image_encoder, sd.diffusion_model, sd.decoder
    layers = {768: 12, 1024: TEXT_LAYERS_V2}[te.output_shape[-1]]  # SD 1.x, SD 2.x
    te_plan = [("embeddings", "CLIPEmbedding")] + [
        (f"encoder.layers.{i}", "CLIPEncoderLayer") for i in range(layers)
    ]
    plan = walk_plan(
        main_path_layers(te),
        te_plan + [("final_layer_norm", "LayerNormalization")],
        CLIP,
        "TextEncoder",
    )
    enc, dec = vae_plans()
    plan += walk_plan(ie.layers, enc, VAE, "ImageEncoder") + walk_plan(
        de.layers, dec, VAE, "Decoder"
    )
    chain = main_path_layers(dm)
    plan += walk_plan(chain, unet_plan(), UNET, "DiffusionModel")
    # time embedding MLP: walk back from the first ResBlock's second input (t_emb)
    time_mlp = layers_back_to_the_input(input_layer(chain[1], 1))
    plan += walk_plan(
        time_mlp,
        [("time_embed.0", "Dense"), (None, "Activation"), ("time_embed.2", "Dense")],
        UNET,
        "time MLP",
    )
    ids = [id(v) for v, _, _ in plan]
    every = [v for m in (te, ie, dm, de) for v in m.weights]
    if len(set(ids)) != len(ids) or set(ids) != {id(v) for v in every}:
        raise RuntimeError(f"mapping covers {len(set(ids))} of {len(every)} KerasCV variables")
    return plan


def expected_shape(var, kind):
    s = tuple(var.shape)
    if kind == "conv":  # Keras HWIO <- torch OIHW
        return (s[3], s[2], s[0], s[1])
    return (s[1], s[0]) if kind == "dense" else s


EXAMPLE = {"SD 1.x": "v1-5-pruned-emaonly.safetensors", "SD 2.x": "v2-1_512-ema-pruned.safetensors"}


def check_model_family(src, path, family="SD 1.x"):
    """Refuses SDXL and inpainting files, and SD 1.x and 2.x ones where the other is
    needed, from their header alone."""
    shape = lambda k: src[k][3] if k in src else None
    if any(k.startswith(("conditioner.", UNET + "label_emb.")) for k in src):
        raise UserError(
            f"{path} is an SDXL checkpoint, but only SD 1.x and 2.x checkpoints (e.g. {EXAMPLE[family]}) are supported."
        )
    known, sd2 = header_family(src)
    if sd2 and family != "SD 2.x":
        raise UserError(
            f"{path} is an SD 2.x checkpoint (1024-wide text encoder), but only {family} checkpoints (e.g. {EXAMPLE[family]}) are supported."
        )
    if known and not sd2 and family == "SD 2.x":
        raise UserError(
            f"{path} is an SD 1.x checkpoint (768-wide text encoder), but an SD 2.x checkpoint (e.g. {EXAMPLE[family]}) is needed here."
        )
    conv_in = shape(UNET + "input_blocks.0.0.weight")
    if conv_in and len(conv_in) == 4 and conv_in[1] != 4:
        raise UserError(
            f"{path} has a {conv_in[1]}-channel UNet input (an inpainting or other special model); use a plain {family} text-to-image checkpoint."
        )


def header_family(src):
    """(whether the header tells, whether it is SD 2.x): from the width of the text
    encoder's rows or of the UNet's cross-attention keys, 1024 for SD 2.x, 768 for SD 1.x."""
    shape = lambda k: src[k][3] if k in src else None
    k_shape = shape(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    tok = shape(CLIP + "embeddings.token_embedding.weight")
    sd2 = bool((k_shape and k_shape[1] == 1024) or (tok and tok[1] == 1024))
    return bool(k_shape or tok), sd2


def model_family(stable_diffusion):
    """"SD 2.x" where the text encoder is 1024 wide (KerasCV's TextEncoderV2), else "SD 1.x"."""
    width = stable_diffusion.text_encoder.output_shape[-1]
    return "SD 2.x" if width == 1024 else "SD 1.x"


WEIGHTS_FILES = {
    family: os.path.join(os.path.dirname(__file__), name)
    for family, name in [("SD 1.x", "sd1x_weights.json"), ("SD 2.x", "sd2x_weights.json")]
}


def expected_weights(plan):
    """{LDM key: (kind, shape in the file)} of the weights the models of `plan` take."""
    return {k: (kind, expected_shape(var, kind)) for var, k, kind in plan}


def family_weights(family):
    """`expected_weights` of KerasCV's four models of `family` ("SD 1.x" or "SD 2.x"),
    read from its WEIGHTS_FILES instead of building the models."""
    with open(WEIGHTS_FILES[family]) as f:
        return {k: (kind, tuple(shape)) for k, (kind, shape) in json.load(f).items()}


def check_base_model(path):
    """Refuses, from the header alone, a file or folder that is not a whole SD 1.x or
    SD 2.x model; returns which of the two it is."""
    src = read_source(path)
    family = "SD 2.x" if header_family(src)[1] else "SD 1.x"
    validate(src, family_weights(family), path, family)
    return family


def validate(src, expected, path, family="SD 1.x"):
    """Raises UserError unless `src` holds every `expected` weight with the right shape."""
    check_model_family(src, path, family)
    missing = [k for k in expected if k not in src]
    if len(missing) == len(expected):
        raise UserError(
            f"{path} holds no {family} model weights (is it a LoRA, an embedding or a VAE alone?); give a full {family} checkpoint."
        )
    if missing:
        raise UserError(
            f"{path} is not a complete {family} checkpoint: {len(missing)} of {len(expected)} weights are missing (e.g. {missing[0]})."
        )
    for k, (kind, want) in expected.items():
        got = src[k][3]
        ok = got == want or (
            kind == "conv" and want[2:] == (1, 1) and got == want[:2]
        )  # 1x1 conv stored as Linear
        if src[k][2] not in ("F16", "F32", "F64", "BF16"):
            raise UserError(
                f"{path} is not an {family} checkpoint: {k} is stored as {src[k][2]} where a float type is needed."
            )
        if not ok:
            raise UserError(
                f"{path} is not an {family} checkpoint: {k} has shape {list(got)} where {list(want)} is needed."
            )


def load_base_model(path, stable_diffusion):
    """Sets every weight of the four KerasCV SD 1.x or 2.x models from path; returns {'hash', 'format'}.

    stable_diffusion: object with .text_encoder, .image_encoder, .diffusion_model, .decoder
    (built at any resolution; text encoder with the plain 49408-token vocabulary).
    Not loaded: position_ids, model_ema.*, first_stage_model.loss.*, noise-schedule buffers.
    """
    path = os.fspath(path)
    src = read_source(path)
    plan = build_plan(stable_diffusion)
    family = model_family(stable_diffusion)
    validate(src, expected_weights(plan), path, family)  # nothing is assigned before this passes
    for var, k, kind in plan:
        w = read_tensor(*src[k])
        if kind == "conv":
            w = np.transpose(w.reshape(w.shape + (1, 1)) if w.ndim == 2 else w, (2, 3, 1, 0))
        elif kind == "dense":
            w = w.T
        var.assign(np.ascontiguousarray(w))  # cast to the variable's dtype
    return {
        "hash": short_hash(path),
        "format": "diffusers" if os.path.isdir(path) else "safetensors",
    }


def base_model_name(base_model):
    """How the embedding's metadata names the model it was trained on."""
    if not base_model:
        return BASE_MODEL
    name = os.path.basename(os.path.normpath(base_model))
    return f"{name} (short sha256 {short_hash(base_model)})"
