"""The oracle's reference outputs from diffusers and transformers (PyTorch, CPU), for
tests/test_diffusers_oracle.py and, with --sd2, tests/test_sd2x_oracle.py: the text
encoding, the VAE posterior's mean, the UNet's prediction, the decoded image, and the
textual-inversion step of diffusers' examples/textual_inversion (its loss, the
placeholder row's gradient and its vector after the example's AdamW update; for SD 2.x
also the loss and gradient of a v-prediction model), on the random SD 1.x (or 2.x)
checkpoint. It also writes that checkpoint as a diffusers folder
(float16).

It runs in a process of its own (`python tests/diffusers_reference.py CHECKPOINT INPUTS
FOLDER OUTPUT [--sd2]`), so that the 8 GB PyTorch holds at its peak, and what its allocator keeps
afterwards, never add to the test process's memory."""

import gc
import os
import sys
import types

import numpy as np

from sd1x_checkpoint import (
    CLIP_CONFIG, CLIP_CONFIG_SD2, UNET_CONFIG, UNET_CONFIG_SD2, VAE_CONFIG, write_safetensors,
)  # fmt: skip

NEW_TOKEN = 49408  # the row diffusers appends for the placeholder: the 49,409th
TIMESTEP_UNET, TIMESTEP_STEP = 421, 613
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.004  # the oracle's trainer's, and build_trainer's


def reference_outputs(ckpt, inputs, folder, sd2=False):
    """`inputs` holds the oracle's arrays (prompt_ids, step_ids, cat_id, image, latents,
    context, eps, noise); `folder` (a pathlib.Path) receives the diffusers folder. With
    sd2 the checkpoint is an SD 2.x one, its OpenCLIP text encoder converted by diffusers'
    own `convert_open_clip_checkpoint` (the first 23 layers)."""
    clip_config, unet_config = (CLIP_CONFIG_SD2, UNET_CONFIG_SD2) if sd2 else (CLIP_CONFIG, UNET_CONFIG)
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    sd = load_file(ckpt)

    def save(sub, name, state):
        os.makedirs(folder / sub, exist_ok=True)
        state = {k: v.detach().to(torch.float16).contiguous().numpy() for k, v in state.items()}
        write_safetensors(
            str(folder / sub / name),
            {k: ("F16", v.shape, lambda k, v=v: v) for k, v in state.items()},
        )

    def build(cls, config, state):
        with torch.device("meta"):
            model = cls(**config)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        return model.eval()

    out = {}
    if sd2:  # the converter reads only the text encoder's configuration
        config_only = types.SimpleNamespace(config=CLIPTextConfig(**clip_config))
        text_sd = sfu.convert_open_clip_checkpoint(config_only, sd)
    else:
        text_sd = sfu.convert_ldm_clip_checkpoint(sd)
    text_sd = {k: v for k, v in text_sd.items() if "position_ids" not in k}
    vae_sd = sfu.convert_ldm_vae_checkpoint(sd, VAE_CONFIG)
    unet_sd = sfu.convert_ldm_unet_checkpoint(sd, unet_config)
    del sd
    te = CLIPTextModel(CLIPTextConfig(**clip_config))
    if not any(
        k.startswith("text_model.") for k in te.state_dict()
    ):  # transformers 5 dropped the wrapper
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    save(
        "text_encoder", "model.safetensors", text_sd
    )  # in the installed transformers' own key names
    save("vae", "diffusion_pytorch_model.safetensors", vae_sd)
    save("unet", "diffusion_pytorch_model.safetensors", unet_sd)
    te.load_state_dict({k: v.float() for k, v in text_sd.items()}, strict=True)
    te.eval()
    vae = build(AutoencoderKL, VAE_CONFIG, vae_sd)
    del text_sd, vae_sd
    unet = build(UNet2DConditionModel, unet_config, unet_sd)
    del unet_sd
    gc.collect()
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()

    with torch.no_grad():
        ids = torch.from_numpy(inputs["prompt_ids"]).long()
        out["text"] = te(ids)[0].numpy()
        post = vae.encode(nchw(inputs["image"])).latent_dist
        out["vae_mean"] = nhwc(post.mean)
        out["decoded"] = nhwc(vae.decode(nchw(inputs["latents"]) / 0.18215).sample)
        out["unet"] = nhwc(
            unet(nchw(inputs["latents"]), TIMESTEP_UNET, torch.from_numpy(inputs["context"])).sample
        )

    # the textual-inversion step as in diffusers examples/textual_inversion
    te.resize_token_embeddings(NEW_TOKEN + 1)
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        emb[NEW_TOKEN] = emb[inputs["cat_id"]]
    for p in list(te.parameters()) + list(unet.parameters()) + list(vae.parameters()):
        p.requires_grad_(False)
    emb.requires_grad_(True)
    sched = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    with torch.no_grad():
        post = vae.encode(nchw(inputs["image"])).latent_dist
        latents = (
            post.mean + post.std * nchw(inputs["eps"])
        ) * 0.18215  # = latent_dist.sample() with eps
    noise = nchw(inputs["noise"])
    t = torch.tensor([TIMESTEP_STEP])
    noisy = sched.add_noise(latents, noise, t)
    hidden = te(torch.from_numpy(inputs["step_ids"]).long())[0]
    pred = unet(noisy, t, hidden).sample
    if sd2:  # a 768-v model's loss: the velocity as the target (diffusers' get_velocity)
        velocity = sched.get_velocity(latents, noise, t)
        loss_v = torch.nn.functional.mse_loss(pred.float(), velocity.float(), reduction="mean")
        out["loss_v"] = float(loss_v.detach())
        out["grad_v"] = torch.autograd.grad(loss_v, emb, retain_graph=True)[0][NEW_TOKEN].numpy()
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
    loss.backward()
    out["loss"] = float(loss.detach())
    out["grad"] = emb.grad[NEW_TOKEN].numpy().copy()
    # The example's update: AdamW on the embedding matrix, every row but the new one put
    # back; here with the script's learning rate, weight decay and epsilon.
    before = emb.detach().clone()
    optimizer = torch.optim.AdamW([emb], lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, eps=1e-8)
    optimizer.step()
    with torch.no_grad():
        emb[:NEW_TOKEN] = before[:NEW_TOKEN]
    out["vector_after_step"] = emb[NEW_TOKEN].detach().numpy().copy()
    del te, vae, unet, emb, pred, hidden, loss, post
    gc.collect()
    return out


if __name__ == "__main__":
    import pathlib

    checkpoint, inputs_file, diffusers_folder, output_file = sys.argv[1:5]
    with np.load(inputs_file) as saved:
        arrays = {name: saved[name] for name in saved.files}
    arrays["cat_id"] = int(arrays["cat_id"])
    assert sys.argv[5:] in ([], ["--sd2"]), sys.argv[5:]
    sd2 = sys.argv[5:] == ["--sd2"]
    outputs = reference_outputs(checkpoint, arrays, pathlib.Path(diffusers_folder), sd2)
    np.savez(output_file, **outputs)
