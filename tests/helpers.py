"""Shared test helpers: golden files, tiny random components, a tiny T5 tokenizer, notebook cells."""

import ast
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
MANIFESTS = DATA / "manifests"


class Golden:
    """One golden file: its model state dict, and the inputs/outputs/debug tensors of each case."""

    def __init__(self, name: str):
        self.path = GOLDEN / f"{name}.safetensors"
        self.tensors = load_file(self.path)
        with safe_open(str(self.path), "pt") as f:
            self.meta = json.loads(f.metadata()["sd3mini_golden"])

    def input(self, case, name):
        return self.tensors[f"__input__.{case}.{name}"]

    def output(self, case, name):
        return self.tensors[f"__output__.{case}.{name}"]

    def debug(self, case, name):
        return self.tensors[f"__debug__.{case}.{name}"]

    @property
    def state_dict(self):
        return {k: v for k, v in self.tensors.items() if not k.startswith("__")}


def close(actual, expected, atol=1e-4):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-4, atol=atol)


def tiny_t5_tokenizer():
    """A word-level stand-in for T5's SentencePiece tokenizer with T5's special ids (pad 0, EOS 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "<pad> </s> <unk> a photo of cat dog red blue circle square the on in".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoders(seed=0, t5=True):
    """Random tiny CLIP-L (width 64), CLIP-G (width 128) and T5 (width 256) in their real classes.

    Head size 64 as in the real models, so that loaders infer the same number of heads.
    SD3's layout in miniature: pooled 64 + 128 = 192, context = [L | G] zero-padded to 256 ; T5.
    """
    from transformers import CLIPTextConfig, T5Config

    from sd3mini.text import CLIPTextEncoder, T5TextEncoder

    torch.manual_seed(seed)

    def clip(width, act, projected):
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, projection_dim=width,
                             num_hidden_layers=3, num_attention_heads=width // 64, max_position_embeddings=77,
                             hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
        return CLIPTextEncoder(cfg, projected=projected).eval().requires_grad_(False)

    encs = {"clip_l": clip(64, "quick_gelu", False), "clip_g": clip(128, "gelu", True)}
    if t5:
        cfg = T5Config(vocab_size=64, d_model=256, d_kv=64, d_ff=128, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                       is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
        encs["t5xxl"] = T5TextEncoder(cfg).eval().requires_grad_(False)
    return encs


def tiny_mmdit(seed=0):
    """A random SD3-style MM-DiT sized for ``tiny_text_encoders`` (pooled 192, context 256), max 128 px."""
    from sd3mini import MMDiT, MMDiTConfig

    torch.manual_seed(seed)
    cfg = MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=8, adm_in_channels=192,
                      context_in_dim=256)
    return MMDiT(cfg).eval().requires_grad_(False)


def tiny_pipeline(offload="none", t5=True):
    """An SD3Pipeline of a tiny random MM-DiT, the golden VAE and tiny random text encoders (CPU, fp32)."""
    from sd3mini import SD3Pipeline, SD3TextEncoder, SD3Tokenizer, load_vae

    encs = tiny_text_encoders(t5=t5)
    tokenizer = SD3Tokenizer(t5=tiny_t5_tokenizer() if t5 else None)
    text = SD3TextEncoder(encs["clip_l"], encs["clip_g"], encs.get("t5xxl"), tokenizer, context_dim=256)
    return SD3Pipeline(tiny_mmdit(), load_vae(GOLDEN / "vae.safetensors"), text, device="cpu", offload=offload)


def save_hub_layout(folder, pipe=None):
    """The Hub layout in miniature: ``model.safetensors`` (tiny MM-DiT + golden VAE) with
    ``text_encoders/{clip_l, clip_g, t5xxl_fp16}.safetensors`` beside it. Returns the model file."""
    import sd3mini
    from sd3mini.loading import save_single_file

    folder = Path(folder)
    encs = tiny_text_encoders()
    save_single_file(folder / "model.safetensors", mmdit=pipe.mmdit if pipe else tiny_mmdit(),
                     vae=pipe.vae if pipe else sd3mini.load_vae(GOLDEN / "vae.safetensors"))
    for kind, name in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5xxl_fp16")):
        sd = {k: v for k, v in encs[kind].transformer.state_dict().items() if k != "encoder.embed_tokens.weight"}
        sd3mini.checkpoint.save_state_dict(sd, folder / "text_encoders" / f"{name}.safetensors")
    return folder / "model.safetensors"


def sparse_checkpoint(path, shapes: dict, metadata: dict | None = None):
    """A full-size safetensors file whose data is a hole: a valid header, then zeros the disk never stores."""
    import math

    header, offset = {}, 0
    for key, shape in shapes.items():
        n = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if metadata is not None:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    return path


def python(source: str) -> str:
    """A notebook cell's source as plain Python (``%pip`` and other IPython syntax become calls)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def definitions(source: str) -> ast.Module:
    """The imports, function and class definitions and literal constants of a cell, nothing it computes."""
    keep = [node for node in ast.parse(python(source)).body
            if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))
            or (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant))]
    return ast.Module(body=keep, type_ignores=[])
