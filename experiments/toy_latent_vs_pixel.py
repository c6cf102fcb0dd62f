"""Pixel space or latent space for the tiny SD3, at equal CPU time?

    python experiments/toy_latent_vs_pixel.py --minutes 14 --vae-minutes 3 --threads 1 --out runs/latent
    python experiments/toy_latent_vs_pixel.py --minutes 14 --vae-minutes 3 --threads 1 --t-shift 3 --out runs/latent_s3
    # compared with: train-toy --p-pair 0 --t-shift S --cfg-scale 4 --eval-every 500 (same captions, seeds, sampler)

SD3 denoises VAE latents. At 32 x 32 the question is whether a tiny VAE pays for itself: the latent
MM-DiT sees the same number of tokens (16 x 16 x 4 latents in patches of 2 = 64 tokens, like 32 x 32 x 3
pixels in patches of 4), but the VAE must be trained first and encodes every batch, and its
reconstructions cap the quality. This script trains a tiny ``SDVAE`` (the real module, small config) for
``--vae-minutes``, measures the latents' scale/shift, trains the same MM-DiT + text encoder as
``train-toy`` on latents for the rest of the budget, and judges it on the same captions and seeds as the
pixel run (``train-toy --eval-every``). Results go to ``OUT/result.json``.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from sd3mini.flow import flow_matching_loss, interpolate, process_in, process_out, sample_t, time_shift
from sd3mini.mmdit import MMDiT
from sd3mini.sampling import make_noise, sample
from sd3mini.toy import data
from sd3mini.toy.judge import eval_captions_subset, score
from sd3mini.toy.model import ToySD3, toy_mmdit_config
from sd3mini.toy.recipe import Recipe
from sd3mini.vae import SDVAE, VAEConfig, sample_latent

VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, in_channels=3, z_channels=4)   # 32x32x3 -> 16x16x4


def train_vae(minutes: float, batch: int = 32, kl: float = 1e-6):
    torch.manual_seed(0)
    vae = SDVAE(VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    start, step = time.time(), 0
    while (time.time() - start) / 60 < minutes:
        images, _, _ = data.batch(10_000_000 + step, batch)
        moments = vae.encoder(images)
        mean, logvar = moments.chunk(2, dim=1)
        z = sample_latent(moments, torch.randn_like(mean))
        recon = vae.decode(z)
        kl_term = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        loss = (recon - images).abs().mean() + kl * kl_term
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    vae.eval().requires_grad_(False)
    images, captions, _ = data.batch(777, 200, dropout=False)
    with torch.no_grad():
        z = vae.encoder(images).chunk(2, dim=1)[0]
        recon = vae.decode(z).clamp(-1, 1)
    psnr = 10 * torch.log10(4 / ((recon - images) ** 2).mean()).item()
    return vae, {"vae_steps": step, "vae_params": sum(p.numel() for p in vae.parameters()), "psnr_db": round(psnr, 2),
                 "recon_judge": score(recon, captions)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--vae-minutes", type=float, default=5)
    p.add_argument("--out", default="runs/latent")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--p-pair", type=float, default=0.0, help="as the pixel run it is compared with")
    p.add_argument("--t-shift", type=float, default=1.0, help="time shift in training and sampling, as the pixel run")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance of the evaluation, as the pixel run's")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    vae, result = train_vae(args.vae_minutes)
    with torch.no_grad():
        z = vae.encoder(data.batch(999, 1024)[0]).chunk(2, dim=1)[0]
    scale, shift = 1 / z.std().item(), z.mean().item()
    result |= {"latent_scale": scale, "latent_shift": shift}

    r = Recipe(p_pair=args.p_pair, t_shift=args.t_shift, cfg_scale=args.cfg_scale)
    torch.manual_seed(r.seed)
    model = ToySD3(r)
    model.mmdit = MMDiT(toy_mmdit_config(r.width, r.depth, patch=2, text_width=r.text_width, image_size=16,
                                         channels=VAE.z_channels)).initialize_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in model.parameters()]
    step = 0
    while (time.time() - t0) / 60 < args.minutes:
        images, captions, _ = data.batch((r.seed * 1_000_003) * 10_000_019 + step, r.batch, p_pair=r.p_pair)
        captions = ["" if (step * 7 + i) % 10 == 0 else c for i, c in enumerate(captions)]
        with torch.no_grad():
            x0 = process_in(sample_latent(vae.encoder(images), torch.randn(r.batch, VAE.z_channels, 16, 16)), scale, shift)
        noise, t = torch.randn_like(x0), time_shift(sample_t(r.batch, r.t_sampler), r.t_shift)
        v = model(interpolate(x0, noise, t), t, model.text.tokenize(captions))
        loss = flow_matching_loss(v, x0, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        for g in opt.param_groups:
            g["lr"] = r.lr * min(1.0, (step + 1) / r.warmup)
        opt.step()
        decay = min(r.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p, 1 - decay)
        step += 1
    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            p.copy_(e)
    captions = eval_captions_subset(60)
    with torch.no_grad():
        cond = model.text(model.text.tokenize(captions))
        uncond = model.text(model.text.tokenize([""] * len(captions)))
        noise = make_noise(0, (VAE.z_channels, 16, 16), batch=len(captions))
        z = sample(model.mmdit, noise, cond, uncond, steps=20, shift=r.t_shift, cfg_scale=r.cfg_scale, progress=False)
        images = vae.decode(process_out(z, scale, shift)).clamp(-1, 1)
    result |= {"t_shift": r.t_shift, "p_pair": r.p_pair, "vae_minutes": args.vae_minutes, "dit_steps": step, "minutes": round((time.time() - t0) / 60, 2), "eval": score(images, captions),
               "dit_params": sum(p.numel() for p in model.parameters())}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
