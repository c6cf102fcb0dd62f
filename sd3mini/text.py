"""Text conditioning: CLIP-L, CLIP-G and T5-XXL, tokenized and combined the way SD3 does it.

The encoders are the ``transformers`` models (``CLIPTextModelWithProjection``, ``T5EncoderModel``),
configured from the weights' shapes. What SD3 adds is *how* their outputs are used:

    CLIP-L: penultimate hidden state (B, 77, 768), no final LayerNorm; pooled EOS state, unprojected (B, 768)
    CLIP-G: penultimate hidden state (B, 77, 1280), no final LayerNorm; pooled EOS state, projected (B, 1280)
    T5-XXL: last hidden state (B, N >= 77, 4096)

    context = [ pad_to_4096([L | G]) ; T5 ]    (B, 77 + N, 4096), normally 154 tokens
    pooled  = [ L_pooled | G_pooled ]          (B, 2048)
"""

import gzip
import json
import tempfile
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .keys import CheckpointError, num_blocks

CLIP_BOS, CLIP_EOS = 49406, 49407
CLIP_LENGTH = 77          # CLIP's position table has exactly 77 rows
T5_MIN_LENGTH = 77        # T5 is padded up to (never truncated to) 77 tokens
T5_MAX_CHARS = 226        # ... instead the prompt text is cut to 226 characters (reference behaviour)


# --------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------
# SD3's two CLIPs, told apart by their weights (the activation, quick_gelu vs gelu, is not in the file).
CLIP_SHAPES = {"clip_l": dict(name="CLIP-L", width=768, layers=12), "clip_g": dict(name="CLIP-G", width=1280, layers=32)}


def clip_shape(sd: dict) -> dict:
    """Width, layers and projection of a CLIP text encoder (Hugging Face names), and the kind they are
    (clip_l or clip_g) when the width is one of the official two; kind None for other sizes."""
    width = sd["text_model.embeddings.token_embedding.weight"].shape[1]
    layers = num_blocks(sd, "text_model.encoder.layers.")
    projection = sd["text_projection.weight"].shape[0] if "text_projection.weight" in sd else width
    kind = next((k for k, v in CLIP_SHAPES.items() if v["width"] == width), None)
    return dict(kind=kind, width=width, layers=layers, projection=projection)


class CLIPTextEncoder(nn.Module):
    """tokens (B, 77) -> (hidden (B, 77, W) from the penultimate layer, pooled (B, W or proj)).

    ``projected``: multiply the pooled vector by ``text_projection`` (CLIP-G in SD3, not CLIP-L).
    """

    def __init__(self, config, projected: bool):
        super().__init__()
        from transformers import CLIPTextModelWithProjection   # heavy to import: only when first used

        self.projected = projected
        self.transformer = CLIPTextModelWithProjection(config)

    def forward(self, tokens: torch.Tensor):
        tokens = tokens.to(self.transformer.text_projection.weight.device)
        out = self.transformer.text_model(input_ids=tokens, output_hidden_states=True)
        hidden = out.hidden_states[-2]                      # layer n-2 output, before the final LayerNorm
        # Pool at the first end-of-text token: it has the largest id (argmax), as in the reference.
        eos = tokens.argmax(dim=-1)
        pooled = out.last_hidden_state[torch.arange(tokens.shape[0], device=tokens.device), eos]
        if self.projected:
            pooled = self.transformer.text_projection(pooled)
        return hidden, pooled

    @staticmethod
    def config_from_state_dict(sd, kind: str, num_heads: int | None = None):
        """The ``CLIPTextConfig`` of a CLIP state dict (Hugging Face names), from its shapes and ``kind``."""
        from transformers import CLIPTextConfig   # heavy to import: only when first used

        shape = clip_shape(sd)
        width = shape["width"]
        return CLIPTextConfig(
            vocab_size=sd["text_model.embeddings.token_embedding.weight"].shape[0], hidden_size=width,
            projection_dim=shape["projection"], num_hidden_layers=shape["layers"],
            intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_attention_heads=num_heads or max(1, width // 64),
            max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
            hidden_act="quick_gelu" if kind == "clip_l" else "gelu",   # OpenAI CLIP-L vs OpenCLIP bigG
            layer_norm_eps=1e-5, bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=1,
        )

    def init_non_persistent(self):
        """Fill the buffers a checkpoint does not hold (after building on the meta device)."""
        emb = self.transformer.text_model.embeddings
        device = emb.position_embedding.weight.device
        emb.position_ids = torch.arange(emb.position_embedding.num_embeddings, device=device).expand(1, -1)


class Float32Linear(nn.Linear):
    """A linear layer that keeps its weights in their own (16-bit) dtype but computes
    and returns float32: T5's feed-forward output ``wo`` under float16, whose outputs
    pass 65,504.

    float16 weights are exact in float32, so the result is the one a float32 copy of the
    layer gives, without keeping that copy: in T5-XXL 24 layers of 4096 x 10240, 2.0 GB
    less than float32 weights. The float32 weight exists only while the layer runs
    (168 MB for T5-XXL's).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class T5TextEncoder(nn.Module):
    """tokens (B, N) -> (hidden (B, N, 4096) after the final RMS LayerNorm, None).

    No attention mask: as in the reference, the padding tokens are attended to.
    ``float32_wo``: the feed-forward output layers compute in float32 (Float32Linear).
    """

    def __init__(self, config, float32_wo: bool = False):
        super().__init__()
        from transformers import T5EncoderModel   # heavy to import: only when first used

        self.transformer = T5EncoderModel(config)
        if float32_wo:
            for block in self.transformer.encoder.block:
                ff = block.layer[-1].DenseReluDense
                w = ff.wo.weight
                ff.wo = Float32Linear(w.shape[1], w.shape[0], bias=False,
                                      device=w.device)

    def forward(self, tokens: torch.Tensor):
        tokens = tokens.to(self.transformer.shared.weight.device)
        return self.transformer(input_ids=tokens).last_hidden_state, None

    @staticmethod
    def config_from_state_dict(sd, num_heads: int | None = None):
        """The ``T5Config`` of a T5 encoder state dict (Hugging Face names), from its shapes."""
        from transformers import T5Config   # heavy to import: only when first used

        emb = sd["shared.weight"] if "shared.weight" in sd else sd["encoder.embed_tokens.weight"]
        vocab, d_model = emb.shape
        attn = "encoder.block.0.layer.0.SelfAttention."
        buckets, bias_heads = sd[attn + "relative_attention_bias.weight"].shape
        heads = num_heads or bias_heads
        return T5Config(
            vocab_size=vocab, d_model=d_model, d_kv=sd[attn + "q.weight"].shape[0] // heads,
            d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
            num_layers=num_blocks(sd, "encoder.block."),
            num_heads=heads, relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
            is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
        )


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The real CLIP BPE tokenizer (49,408 tokens), built offline from the file shipped with sd3mini.

    ``sd3mini/assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merge list (MIT licence). The
    vocabulary is rebuilt from it exactly as OpenAI's ``SimpleTokenizer`` does; the result is the
    tokenizer of ``openai/clip-vit-large-patch14``, which SD3 uses for both CLIP-L and CLIP-G.
    """
    from transformers import CLIPTokenizer   # heavy to import: only when first used

    with resources.files("sd3mini").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").open("rb") as f:
        merges = gzip.decompress(f.read()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        Path(d, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(d, trust_remote_code=False)


def load_tokenizer(folder, kind: str = "auto"):
    """A tokenizer from a local folder, never running code from it.

    transformers runs a folder's own Python when its ``tokenizer_config.json`` or ``config.json`` has an
    ``auto_map`` (after asking on stdin); sd3mini refuses such a folder before transformers reads it,
    and passes ``trust_remote_code=False`` as well. ``kind``: "clip" (CLIPTokenizer) or "auto".
    """
    from transformers import AutoTokenizer, CLIPTokenizer   # heavy: only when a folder is read

    folder = Path(folder)
    for name in ("tokenizer_config.json", "config.json"):
        try:
            config = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and "auto_map" in config:
            raise CheckpointError(f"{folder / name} asks to run Python code from its folder (auto_map); "
                                  "sd3mini never runs code from a weights or tokenizer folder")
    loader = CLIPTokenizer if kind == "clip" else AutoTokenizer
    return loader.from_pretrained(folder, trust_remote_code=False)


def _words(tokenizer, text: str) -> list[list[int]]:
    """Token ids of each space-separated word, without BOS/EOS (the reference tokenizes word by word)."""
    return [tokenizer(w, add_special_tokens=False)["input_ids"] for w in text.replace("\n", " ").split(" ") if w]


class SD3Tokenizer:
    """SD3's tokenization rules (``sd3_infer.SD3Tokenizer``).

    CLIP (both L and G): ``[BOS] + tokens + [EOS] + pad`` to 77. Words are packed whole into the 75
    free places; the first word that does not fit ends the prompt (a word of 8+ tokens is split
    instead), and a warning names what was dropped. CLIP-L pads with EOS (49407), CLIP-G with 0.
    T5: the text is cut to 226 characters, ``tokens + [EOS]``, padded with 0 up to at least 77.

    Prompt-weight syntax such as ``(word:1.3)`` is not parsed: the reference strips its parentheses
    and then ignores the weights; sd3mini keeps the text as written.
    """

    def __init__(self, clip=None, t5=None):
        self.clip = clip if clip is not None else clip_tokenizer()
        self.t5 = t5

    def clip_ids(self, text: str, pad_id: int) -> list[int]:
        return self._pad_clip(self._clip_words(text), pad_id)

    def _clip_words(self, text: str, name: str = "prompt") -> list[int]:
        """The prompt's tokens that fit in CLIP's 75 free places (warns about the rest, calling it ``name``)."""
        ids: list[int] = []
        words = _words(self.clip, text)
        for n, word in enumerate(words):
            if len(ids) + len(word) <= CLIP_LENGTH - 2:
                ids += word
                continue
            if len(word) >= 8:                        # a very long word is split to fill the chunk
                ids += word[: CLIP_LENGTH - 2 - len(ids)]
            dropped = self.clip.decode([t for w in words[n:] for t in w])
            warnings.warn(f"{name} is longer than CLIP's 77 tokens and was truncated; dropped: {dropped!r}",
                          stacklevel=4)
            break
        return ids

    @staticmethod
    def _pad_clip(ids: list[int], pad_id: int) -> list[int]:
        return [CLIP_BOS] + ids + [CLIP_EOS] + [pad_id] * (CLIP_LENGTH - 2 - len(ids))

    def t5_ids(self, text: str, name: str = "prompt") -> list[int]:
        if len(text) > T5_MAX_CHARS:
            warnings.warn(f"{name} is longer than {T5_MAX_CHARS} characters; T5 sees only the first "
                          f"{T5_MAX_CHARS}", stacklevel=3)
            text = text[:T5_MAX_CHARS]
        ids = [t for w in _words(self.t5, text) for t in w] + [self.t5.eos_token_id]
        return ids + [self.t5.pad_token_id] * max(0, T5_MIN_LENGTH - len(ids))

    def __call__(self, prompts: str | list[str], names: list[str] | None = None) -> dict[str, torch.Tensor | None]:
        """-> {"l": (B, 77), "g": (B, 77), "t5": (B, N) or None}; T5 rows are padded to the longest.
        ``names``: what each text is, for warnings ("prompt", "negative prompt"; default "prompt")."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        names = names or ["prompt"] * len(prompts)
        clip = [self._clip_words(p, name) for p, name in zip(prompts, names)]
        tokens = {
            "l": torch.tensor([self._pad_clip(ids, pad_id=CLIP_EOS) for ids in clip]),
            "g": torch.tensor([self._pad_clip(ids, pad_id=0) for ids in clip]),
            "t5": None,
        }
        if self.t5 is not None:
            rows = [self.t5_ids(p, name) for p, name in zip(prompts, names)]
            n = max(map(len, rows))
            tokens["t5"] = torch.tensor([r + [self.t5.pad_token_id] * (n - len(r)) for r in rows])
        return tokens


# --------------------------------------------------------------------------------------------------
# SD3's conditioning
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompt(tokens: dict, clip_l: nn.Module, clip_g: nn.Module, t5: nn.Module | None = None,
                  context_dim: int = 4096):
    """Tokens from ``SD3Tokenizer`` -> (context (B, 77 + N, 4096), pooled (B, 2048)), in float32.

    Without T5 ("no-T5 mode") the T5 part is 77 rows of zeros: the context keeps its usual 154 tokens
    and the MM-DiT sees what it saw in training when T5 was dropped. (ComfyUI instead returns only the
    77 CLIP rows; diffusers appends 256 zero rows.)
    """
    l_hidden, l_pooled = clip_l(tokens["l"])
    g_hidden, g_pooled = clip_g(tokens["g"])
    lg = torch.cat([l_hidden.float(), g_hidden.float()], dim=-1)          # (B, 77, 2048)
    lg = F.pad(lg, (0, context_dim - lg.shape[-1]))                       # zero-pad channels -> 4096
    if t5 is not None:
        t5_hidden = t5(tokens["t5"])[0].float().to(lg.device)
    else:
        t5_hidden = lg.new_zeros(lg.shape[0], T5_MIN_LENGTH, context_dim)
    context = torch.cat([lg, t5_hidden], dim=1)
    pooled = torch.cat([l_pooled.float(), g_pooled.float()], dim=-1)
    return context, pooled


class SD3TextEncoder(nn.Module):
    """CLIP-L + CLIP-G (+ T5-XXL, or None for the no-T5 mode) and their tokenizer.

    ``encode(prompts) -> (context (B, 77 + N, 4096), pooled (B, 2048))``; the interface the pipeline
    expects of any text encoder (the embedded tiny model has its own).
    """

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module, t5: nn.Module | None = None,
                 tokenizer: SD3Tokenizer | None = None, context_dim: int = 4096):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizer = tokenizer or SD3Tokenizer()
        self.context_dim = context_dim
        if t5 is not None and self.tokenizer.t5 is None:
            raise ValueError("a T5 encoder needs a T5 tokenizer: SD3Tokenizer(t5=...)")

    def encode(self, prompts: str | list[str], names: list[str] | None = None):
        """``names``: what each text is, for the tokenizer's warnings (default "prompt")."""
        return encode_prompt(self.tokenizer(prompts, names), self.clip_l, self.clip_g, self.t5, self.context_dim)
