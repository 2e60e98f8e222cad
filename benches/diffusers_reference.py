"""The reference figures for `sd-serve bench`: the same full-size architectures with random
weights, timed the same way in diffusers/PyTorch on the same machine, printed as JSON.
Attention runs through PyTorch's scaled_dot_product_attention (diffusers' AttnProcessor2_0);
on CUDA the peak of `torch.cuda.max_memory_allocated` is reported too.
`compare_diffusers.py` runs this and `sd-serve bench` back to back and prints the ratios.

    python benches/diffusers_reference.py --arch sd15 --steps 2 --unet-iters 2 [--device cuda --dtype f16]

Needs torch, diffusers and transformers (tests/fixtures/requirements.txt pins them).
"""

import argparse
import json
import pathlib
import time

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "src" / "weights" / "configs"
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def load(arch, name):
    return json.loads((CONFIGS / {"sd15": "sd15", "sdxl": "sdxl"}[arch] / f"{name}.json").read_text())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_init(module):
    # Same as sd-serve's bench: N(0, 0.02) everywhere, activations stay in range.
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module


@torch.no_grad()
def bench(arch, side, steps, iters, device, dtype):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    unet = random_init(UNet2DConditionModel.from_config(load(arch, "unet"))).to(device, dtype).eval()
    unet.set_attn_processor(AttnProcessor2_0())
    vae_cfg = load(arch, "vae")
    # diffusers' SDXL pipelines decode in f32 when the VAE says force_upcast (default true); the
    # SD 1.x/2.x pipeline never upcasts. sd-serve does the same.
    upcast = arch == "sdxl" and dtype == torch.float16 and vae_cfg.get("force_upcast", True)
    vae_dtype = torch.float32 if upcast else dtype
    vae = random_init(AutoencoderKL.from_config(vae_cfg)).to(device, vae_dtype).eval()
    vae.set_attn_processor(AttnProcessor2_0())
    encoders = [random_init(CLIPTextModel(CLIPTextConfig(**load(arch, "text_encoder")))).to(device, dtype)]
    if arch == "sdxl":
        encoders.append(random_init(CLIPTextModelWithProjection(CLIPTextConfig(**load(arch, "text_encoder_2")))).to(device, dtype))
    sched = DPMSolverMultistepScheduler.from_config(load(arch, "scheduler"))

    t0 = time.perf_counter()
    states, pooled = [], None
    for enc in encoders:
        ids = (torch.arange(2 * 77).reshape(2, 77) * 7919 % enc.config.vocab_size).to(device)
        out = enc(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2] if arch == "sdxl" else out.last_hidden_state)
        pooled = getattr(out, "text_embeds", None)
    context = torch.cat(states, dim=-1).to(dtype)
    sync(device)
    text_s = time.perf_counter() - t0
    added = None
    if arch == "sdxl":
        ids = torch.tensor([[side, side, 0, 0, side, side]] * 2, device=device, dtype=dtype)
        added = {"text_embeds": pooled.to(dtype), "time_ids": ids}

    latents = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator("cpu").manual_seed(0)).to(device, dtype)
    doubled = torch.cat([latents] * 2)
    for _ in range(2):
        unet(doubled, 500, encoder_hidden_states=context, added_cond_kwargs=added)
    sync(device)
    t0 = time.perf_counter()
    for i in range(iters):
        unet(doubled, 999 - i, encoder_hidden_states=context, added_cond_kwargs=added)
    sync(device)
    unet_sps = iters / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    sched.set_timesteps(steps)
    x = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x] * 2), t)
        pred = unet(inp, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        u, c = pred.chunk(2)
        x = sched.step(u + 7.5 * (c - u), t, x).prev_sample
    sync(device)
    denoise_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = vae.decode(x.to(vae_dtype) / vae.config.scaling_factor).sample
    decoded.float().sum().item()
    sync(device)
    vae_s = time.perf_counter() - t0
    image = decoded.clamp(-1, 1)
    t0 = time.perf_counter()
    vae.encode(image).latent_dist.mean.float().sum().item()
    sync(device)
    vae_encode_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return dict(arch=arch, width=side, height=side, dtype=str(dtype), steps=steps,
                unet_steps_per_second=unet_sps, text_encode_seconds=text_s, vae_decode_seconds=vae_s,
                vae_encode_seconds=vae_encode_s,
                end_to_end_seconds_per_image=text_s + denoise_s + vae_s,
                peak_memory_allocated_bytes=peak)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15,sdxl")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--unet-iters", type=int, default=10)
    ap.add_argument("--size", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype")
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("f32" if device.type == "cpu" else "f16")]
    results = [bench(arch, a.size or (1024 if arch == "sdxl" else 512), a.steps, a.unet_iters, device, dtype)
               for arch in a.arch.split(",")]
    print(json.dumps({"device": str(device), "torch_threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
