"""sd3mini: Stable Diffusion 3 / 3.5 in a small, readable, exact PyTorch package.

    flow       rectified-flow math: schedules, timestep samplers, the loss, the latent format
    mmdit      the MM-DiT (SD3-medium, SD3.5-large, SD3.5-medium / MMDiT-X)
    vae        the 16-channel VAE
    text       CLIP-L, CLIP-G, T5-XXL and SD3's tokenization and conditioning
    sampling   Euler, DPM++(2M), classifier-free and skip-layer guidance
    sources    what the user names (a file, a model name, a diffusers folder, a Hub repo) -> opened sources
    loading    modules from state dicts: the official layouts, standalone text encoders, diffusers
    pipeline   SD3Pipeline: prompt -> image
"""

import sys as _sys

try:
    from .checkpoint import CheckpointError, open_state_dict
    from .flow import (LATENT_SCALE, LATENT_SHIFT, flow_matching_loss, get_sigmas, interpolate, process_in,
                       process_out, sample_t, time_shift, velocity_target)
    from .loading import load_mmdit, load_text_encoder, load_vae
    from .mmdit import MMDiT, MMDiTConfig, cropped_pos_embed, get_2d_sincos_pos_embed, timestep_embedding
    from .pipeline import SD3Pipeline
    from .sampling import make_noise, sample
    from .sources import download
    from .text import SD3TextEncoder, SD3Tokenizer, clip_tokenizer, encode_prompt
    from .vae import SDVAE, VAEConfig
except KeyboardInterrupt:   # Ctrl-C while torch is imported: under python -m (argv[0] is "-m" until the
    if _sys.argv[:1] != ["-m"]:                       # module is found) no traceback, and the usual status
        raise
    print("error: interrupted", file=_sys.stderr)
    raise SystemExit(130) from None

__version__ = "0.1.0"
