"""Train the tiny VAE that chapter 3 opens up: SD3's own ``SDVAE`` at toy size, on the shapes world.

    OMP_NUM_THREADS=1 python experiments/train_toy_vae.py            # ~6 min on one core

32 x 32 x 3 images -> 16 x 16 x 4 latents (one downsampling, 32 base channels, 0.66 M parameters),
trained as SD3's VAE family is: an L1 reconstruction loss plus a tiny KL term, so the posterior's
sigma stays small (chapter 3 shows it). Writes ``sd3mini/assets/toy_vae.safetensors`` (float16) with
its recipe and its held-out reconstruction PSNR in the metadata.
"""

import argparse
import json
from pathlib import Path

import torch

from sd3mini.checkpoint import save_state_dict
from sd3mini.toy import data
from sd3mini.vae import SDVAE, VAEConfig, sample_latent

CONFIG = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, in_channels=3, z_channels=4)
OUT = Path(__file__).parents[1] / "sd3mini" / "assets" / "toy_vae.safetensors"


def train(steps: int, batch: int = 32, kl: float = 1e-6, lr: float = 1e-3, seed: int = 0) -> SDVAE:
    torch.manual_seed(seed)
    vae = SDVAE(CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    for step in range(steps):
        images, _, _ = data.batch(10_000_000 + step, batch)             # (B, 3, 32, 32) in [-1, 1]
        moments = vae.encoder(images)                                    # (B, 8, 16, 16): [mean | logvar]
        mean, logvar = moments.chunk(2, dim=1)
        recon = vae.decode(sample_latent(moments, torch.randn_like(mean)))
        kl_term = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        loss = (recon - images).abs().mean() + kl * kl_term
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: L1 {loss.item():.4f}", flush=True)
    return vae.eval().requires_grad_(False)


def psnr(vae: SDVAE) -> float:
    """Reconstruction PSNR (dB, images in [-1, 1]) of the posterior means on 200 held-out scenes."""
    images, _, _ = data.batch(777, 200, dropout=False)
    with torch.no_grad():
        recon = vae.decode(vae.encoder(images).chunk(2, dim=1)[0]).clamp(-1, 1)
    return 10 * torch.log10(4 / ((recon - images) ** 2).mean()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.set_num_threads(1)
    vae = train(args.steps)
    quality = round(psnr(vae), 2)
    meta = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in CONFIG.__dict__.items()},
            "steps": args.steps, "batch": 32, "kl": 1e-6, "lr": 1e-3, "seed": 0, "psnr_db": quality,
            "command": "OMP_NUM_THREADS=1 python experiments/train_toy_vae.py"}
    sd = {k: v.half() for k, v in vae.state_dict().items()}
    save_state_dict(sd, args.out, metadata={"sd3mini_toy_vae": json.dumps(meta)})
    print(f"wrote {args.out}: {sum(v.numel() for v in sd.values()):,} parameters, PSNR {quality} dB")


if __name__ == "__main__":
    main()
