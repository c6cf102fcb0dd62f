"""Loading: round trips through every supported layout, and clear errors for the wrong files."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import GOLDEN, Golden, tiny_text_encoders
from safetensors.torch import load_file, save_file

import sd3mini
from sd3mini import CheckpointError
from sd3mini.convert import save_diffusers
from sd3mini.loading import save_single_file


@pytest.fixture(scope="module")
def models():
    """The golden SD3.5-medium-style MM-DiT (qk-norm + dual attention), the golden VAE, tiny text encoders."""
    return dict(mmdit=sd3mini.load_mmdit(GOLDEN / "mmdit_sd35m.safetensors"),
                vae=sd3mini.load_vae(GOLDEN / "vae.safetensors"), **tiny_text_encoders())


@pytest.fixture(scope="module")
def inputs():
    g = Golden("mmdit_sd35m")
    return dict(x=g.input("forward", "x"), t=g.input("forward", "t"), y=g.input("forward", "y"),
                context=g.input("forward", "context"))


def mmdit_out(model, inputs):
    with torch.no_grad():
        return model(inputs["x"].to(next(model.parameters()).dtype), inputs["t"],
                     y=inputs["y"].to(next(model.parameters()).dtype),
                     context=inputs["context"].to(next(model.parameters()).dtype)).float()


def outputs(models, inputs, loaded):
    """Every component's output on fixed inputs, for equality checks after a round trip."""
    tokens = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(0))
    t5_tokens = torch.randint(0, 64, (1, 77), generator=torch.Generator().manual_seed(1))
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    out = {"mmdit": mmdit_out(loaded["mmdit"], inputs)}
    with torch.no_grad():
        if "vae" in loaded:
            out["vae"] = loaded["vae"].decode(z.to(next(loaded["vae"].parameters()).dtype)).float()
        for kind in ("clip_l", "clip_g"):
            if kind in loaded:
                out[kind] = torch.cat([t.float().flatten() for t in loaded[kind](tokens)])
        if "t5xxl" in loaded:
            out["t5xxl"] = loaded["t5xxl"](t5_tokens)[0].float()
    return out


def test_single_file_round_trip(models, inputs, tmp_path):
    path = tmp_path / "model.safetensors"
    save_single_file(path, **{k: models[k] for k in ("mmdit", "vae")}, clip_l=models["clip_l"],
                     clip_g=models["clip_g"], t5xxl=models["t5xxl"])
    keys = load_file(path).keys()
    assert any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.") for k in keys)
    assert "text_encoders.t5xxl.transformer.shared.weight" in keys
    loaded = dict(mmdit=sd3mini.load_mmdit(path), vae=sd3mini.load_vae(path),
                  clip_l=sd3mini.load_text_encoder(path, "clip_l"),
                  clip_g=sd3mini.load_text_encoder(path, "clip_g"),
                  t5xxl=sd3mini.load_text_encoder(path, "t5xxl"))
    expected, got = outputs(models, inputs, models), outputs(models, inputs, loaded)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


def test_mmdit_without_prefix(models, inputs, tmp_path):
    path = tmp_path / "mmdit.safetensors"
    save_single_file(path, mmdit=models["mmdit"], prefix=False)
    assert all(not k.startswith("model.") for k in load_file(path))
    assert torch.equal(mmdit_out(sd3mini.load_mmdit(path), inputs), mmdit_out(models["mmdit"], inputs))
    # and a state dict, with and without the prefix
    sd = models["mmdit"].state_dict()
    prefixed = {"model.diffusion_model." + k: v for k, v in sd.items()}
    for src in (sd, prefixed):
        assert torch.equal(mmdit_out(sd3mini.load_mmdit(src), inputs), mmdit_out(models["mmdit"], inputs))


def test_fp16_file(models, inputs, tmp_path):
    path = tmp_path / "fp16.safetensors"
    save_single_file(path, mmdit=models["mmdit"], vae=models["vae"], dtype=torch.float16)
    assert {v.dtype for v in load_file(path).values()} == {torch.float16}
    as_stored = sd3mini.load_mmdit(path)
    assert next(as_stored.parameters()).dtype == torch.float16            # dtype=None keeps the file's dtype
    upcast = sd3mini.load_mmdit(path, dtype=torch.float32)
    reference = sd3mini.MMDiT(models["mmdit"].config)
    reference.load_state_dict({k: v.half().float() for k, v in models["mmdit"].state_dict().items()})
    assert torch.equal(mmdit_out(upcast, inputs), mmdit_out(reference, inputs))
    # float16 compute on the CPU agrees with float32 to float16 precision
    torch.testing.assert_close(mmdit_out(as_stored, inputs), mmdit_out(upcast, inputs), atol=2e-2, rtol=2e-2)


def test_diffusers_folder_round_trip(models, inputs, tmp_path):
    save_diffusers(tmp_path, mmdit=models["mmdit"], vae=models["vae"], clip_l=models["clip_l"],
                   clip_g=models["clip_g"], t5=models["t5xxl"])
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert "transformer_blocks.0.attn2.to_q.weight" in load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    loaded = dict(mmdit=sd3mini.load_mmdit(tmp_path / "transformer"), vae=sd3mini.load_vae(tmp_path / "vae"),
                  clip_l=sd3mini.load_text_encoder(tmp_path / "text_encoder", "clip_l"),
                  clip_g=sd3mini.load_text_encoder(tmp_path / "text_encoder_2", "clip_g"),
                  t5xxl=sd3mini.load_text_encoder(tmp_path / "text_encoder_3", "t5xxl"))
    assert loaded["mmdit"].config == models["mmdit"].config
    expected, got = outputs(models, inputs, models), outputs(models, inputs, loaded)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    # a diffusers weights file passed directly, and a sharded folder
    file = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    assert torch.equal(mmdit_out(sd3mini.load_mmdit(file), inputs), expected["mmdit"])
    sd = load_file(file)
    keys = sorted(sd)
    shards = tmp_path / "sharded"
    shards.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, shards / name)
        weight_map.update({k: name for k in part})
    (shards / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(mmdit_out(sd3mini.load_mmdit(shards), inputs), expected["mmdit"])


def test_loads_on_meta_then_assigns(models, tmp_path):
    """No parameter is left on the meta device, and the loaded tensors are in the target dtype."""
    path = tmp_path / "m.safetensors"
    save_single_file(path, mmdit=models["mmdit"], vae=models["vae"], t5xxl=models["t5xxl"])
    for model in (sd3mini.load_mmdit(path, dtype=torch.bfloat16), sd3mini.load_vae(path, dtype=torch.bfloat16)):
        assert all(t.device.type == "cpu" and t.dtype == torch.bfloat16
                   for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())
    t5 = sd3mini.load_text_encoder(path, "t5xxl", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in t5.parameters())  # wo too (fp32 math)
    clip = sd3mini.load_text_encoder(Golden("clip_l").state_dict, "clip_l", num_heads=2)
    assert not any(b.is_meta for b in clip.buffers())                 # position_ids filled in


def test_t5_embedding_under_either_name(models, tmp_path):
    sd = {k: v for k, v in models["t5xxl"].transformer.state_dict().items() if k != "shared.weight"}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "t5.safetensors")  # reference naming
    tokens = torch.randint(0, 64, (1, 77))
    with torch.no_grad():
        a = sd3mini.load_text_encoder(tmp_path / "t5.safetensors", "t5xxl")(tokens)[0]
        b = models["t5xxl"](tokens)[0]
    assert torch.equal(a, b)


def test_clip_l_without_projection_loads(models, tmp_path):
    sd = {k: v for k, v in models["clip_l"].transformer.state_dict().items() if k != "text_projection.weight"}
    save_file(sd, tmp_path / "clip_l.safetensors")
    tokens = torch.randint(0, 49406, (1, 77))
    with torch.no_grad():
        a = sd3mini.load_text_encoder(tmp_path / "clip_l.safetensors", "clip_l")(tokens)
        b = models["clip_l"](tokens)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])      # CLIP-L's pooled is unprojected anyway


# --- errors ---------------------------------------------------------------------------------------
def test_missing_keys_are_named(models, tmp_path):
    sd = {"model.diffusion_model." + k: v for k, v in models["mmdit"].state_dict().items()}
    del sd["model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight"]
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"missing joint_blocks\.1\.x_block\.mlp\.fc2\.weight"):
        sd3mini.load_mmdit(tmp_path / "broken.safetensors")


def test_sdxl_unet_is_recognised(tmp_path):
    fake = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}
    save_file(fake, tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match="SDXL UNet"):
        sd3mini.load_mmdit(tmp_path / "sdxl.safetensors")


def test_wrong_component_is_recognised():
    with pytest.raises(CheckpointError, match="LDM-layout VAE"):
        sd3mini.load_mmdit(GOLDEN / "vae.safetensors")
    with pytest.raises(CheckpointError, match="SD3 MMDiT"):
        sd3mini.load_vae(GOLDEN / "mmdit_sd3.safetensors")
    with pytest.raises(CheckpointError, match="CLIP text encoder"):
        sd3mini.load_text_encoder(GOLDEN / "clip_l.safetensors", "t5xxl")
    with pytest.raises(ValueError, match="kind must be one of"):
        sd3mini.load_text_encoder(GOLDEN / "clip_l.safetensors", "clip_x")


def test_truncated_download(tmp_path):
    data = (GOLDEN / "mmdit_sd3.safetensors").read_bytes()
    (tmp_path / "part.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        sd3mini.load_mmdit(tmp_path / "part.safetensors")


def test_pickle_is_refused(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="pickle"):
        sd3mini.load_mmdit(tmp_path / "model.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        sd3mini.load_mmdit(tmp_path / "junk.safetensors")


def test_unknown_keys_warn_once(models, tmp_path):
    sd = {"model.diffusion_model." + k: v for k, v in models["mmdit"].state_dict().items()}
    sd["model.diffusion_model.register_tokens"] = torch.zeros(1, 4)
    sd["model.diffusion_model.extra.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "extra.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd3mini.load_mmdit(tmp_path / "extra.safetensors")
    messages = [str(w.message) for w in caught if "unknown keys" in str(w.message)]
    assert len(messages) == 1 and "2 unknown keys" in messages[0]


@pytest.mark.parametrize("error", ["GatedRepoError", "HfHubHTTPError"])
def test_gated_repo_message(monkeypatch, error):
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import errors

    def refuse(repo, filename, **kwargs):   # what the Hub answers without an accepted licence
        response = SimpleNamespace(status_code=401, headers={}, request=None)
        raise getattr(errors, error)("401 Client Error: access to model is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(PermissionError, match="HF_TOKEN") as e:
        sd3mini.download("sd3_medium")
    assert "accept the licence on https://huggingface.co/stabilityai/stable-diffusion-3-medium" in str(e.value)
    with pytest.raises(ValueError, match="unknown model"):
        sd3mini.download("sd4")


def test_t5_float16_overflow_is_avoided(models, tmp_path):
    """T5's feed-forward output can exceed float16's 65504 (real T5-XXL does): sd3mini keeps that layer in
    float32; a plain .half() loses the values (transformers clamps them) and the output is wrong."""
    t5 = tiny_text_encoders()["t5xxl"]
    with torch.no_grad():
        for block in t5.transformer.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(40000.0)
    save_single_file(tmp_path / "t5.safetensors", t5xxl=t5)
    tokens = torch.randint(0, 64, (1, 77), generator=torch.Generator().manual_seed(0))
    peak = {}
    t5.transformer.encoder.block[0].layer[1].DenseReluDense.wo.register_forward_hook(
        lambda m, a, out: peak.update(wo=out.abs().max().item()))   # (a hook must return None)
    with torch.no_grad():
        reference = t5(tokens)[0]
        ours = sd3mini.load_text_encoder(tmp_path / "t5.safetensors", "t5xxl", dtype=torch.float16)(tokens)[0]
        naive = sd3mini.load_text_encoder(tmp_path / "t5.safetensors", "t5xxl").half()(tokens)[0]
    assert peak["wo"] > 65504                                    # the overflow is real in this test
    assert ours.dtype == torch.float16 and ours.isfinite().all()
    assert (ours.float() - reference).abs().max() < 0.05
    assert (naive.float() - reference).abs().max() > 1.0


def test_t5_float16_wo_computes_in_float32_from_float16_weights(models, tmp_path):
    """T5's wo under float16 keeps float16 weights (T5-XXL: 2.0 GB less than float32
    copies) and gives exactly what float32 copies of those weights give."""
    path = tmp_path / "t5.safetensors"
    save_single_file(path, t5xxl=models["t5xxl"], dtype=torch.float16)
    t5 = sd3mini.load_text_encoder(path, "t5xxl", dtype=torch.float16)
    as_before = sd3mini.load_text_encoder(path, "t5xxl", dtype=torch.float16)
    blocks = zip(t5.transformer.encoder.block, as_before.transformer.encoder.block)
    for new, old in blocks:
        ff = old.layer[-1].DenseReluDense   # the way before: float32 weight copies
        wo = torch.nn.Linear(ff.wo.in_features, ff.wo.out_features, bias=False)
        ff.wo = wo.requires_grad_(False)
        ff.wo.weight.copy_(new.layer[-1].DenseReluDense.wo.weight.float())
    assert {p.dtype for p in t5.parameters()} == {torch.float16}
    tokens = torch.randint(0, 64, (2, 77), generator=torch.Generator().manual_seed(0))
    seen = {}
    wo = t5.transformer.encoder.block[0].layer[-1].DenseReluDense.wo
    wo.register_forward_hook(lambda m, a, out: seen.update(dtype=out.dtype))
    with torch.no_grad():
        assert torch.equal(t5(tokens)[0], as_before(tokens)[0])
    assert seen["dtype"] == torch.float32


def test_loading_reads_each_tensor_once_into_aligned_memory(models, tmp_path,
                                                            monkeypatch):
    """A tensor read from a file is the model's parameter itself when the dtypes match
    (no second copy), owns its memory (not a view into a file map), and is 64-byte
    aligned."""
    import sd3mini.checkpoint as checkpoint

    path = tmp_path / "m.safetensors"
    save_single_file(path, mmdit=models["mmdit"], dtype=torch.float16)
    read = []
    real_read = checkpoint._read
    monkeypatch.setattr(checkpoint, "_read",
                        lambda *a: read.append(real_read(*a)) or read[-1])
    model = sd3mini.load_mmdit(path, dtype=torch.float16)
    floats = [b for b in model.buffers() if b.is_floating_point()]
    tensors = list(model.parameters()) + floats
    assert len(read) == len(model.state_dict())
    assert {t.data_ptr() for t in tensors} <= {t.data_ptr() for t in read}
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in read)
    assert all(t.data_ptr() % 64 == 0 for t in read)


@pytest.mark.skipif(not Path("/proc/self/status").exists(),
                    reason="reads Linux's /proc/self/status")
def test_loaded_tensors_are_not_file_backed_memory(tmp_path):
    """Tensors read from a file do not keep the file's pages in this process's RSS.
    Through a memory map they did: loading T5-XXL (9.5 GB) to a GPU held 9.5 GB of host
    RSS."""
    def rss_file():
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"RssFile:\s+(\d+)", status).group(1)) * 1024

    torch.manual_seed(0)
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.randn(4096, 4096).half() for i in range(4)}, path)
    before = rss_file()
    tensors = {k: v.load() for k, v in sd3mini.open_state_dict(path).items()}
    assert sum(t.float().sum() for t in tensors.values()).isfinite()  # touch every page
    assert rss_file() - before < 16 * 2**20        # 128 MiB of tensors read, not mapped


def test_header_length_ending_in_0x80_is_not_a_pickle(tmp_path):
    """A valid file whose 8-byte header length starts with byte 0x80 (a pickle's first byte) must load."""
    from safetensors.torch import save_file

    for n in range(1, 400):
        path = tmp_path / "m.safetensors"
        save_file({f"w{i}": torch.zeros(1) for i in range(n)}, path)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length with low byte 0x80 found")
    from sd3mini.checkpoint import open_state_dict

    assert len(open_state_dict(path)) == n


def test_num_blocks_counts_the_largest_index():
    from sd3mini.keys import num_blocks

    keys = {"joint_blocks.0.a": 0, "joint_blocks.11.b": 0, "joint_blocks.2.c": 0, "x_embedder.proj.weight": 0}
    assert num_blocks(keys, "joint_blocks.") == 12
    assert num_blocks(keys, "model.diffusion_model.joint_blocks.") == 0
    assert num_blocks({"a.b.3.x": 0}, "a.b.") == 4   # the prefix is literal: "a.b." is not "aXb."
    assert num_blocks({"aXb.3.x": 0}, "a.b.") == 0


@pytest.mark.parametrize("preset", ["sd3_medium", "sd3_5_large", "sd3_5_medium"])
def test_config_inference_reads_both_layouts(preset):
    """One rule per config field: the official keys and the diffusers keys give the same config."""
    from sd3mini import convert

    config = getattr(sd3mini.MMDiTConfig, preset)()
    with torch.device("meta"):
        sd, vae_sd = sd3mini.MMDiT(config).state_dict(), sd3mini.SDVAE().state_dict()
    assert sd3mini.MMDiTConfig.from_state_dict(sd) == config
    assert sd3mini.MMDiTConfig.from_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()}) == config
    diffusers_sd = convert.mmdit_to_diffusers(sd, config)
    assert sd3mini.MMDiTConfig.from_state_dict(diffusers_sd, convert._MMDIT_CONFIG_KEYS) == config
    assert convert.mmdit_from_diffusers(diffusers_sd).keys() == sd.keys()
    assert sd3mini.VAEConfig.from_state_dict({"first_stage_model." + k: v for k, v in vae_sd.items()}) == sd3mini.VAEConfig()
    diffusers_vae = convert.vae_to_diffusers(vae_sd, sd3mini.VAEConfig())
    assert sd3mini.VAEConfig.from_state_dict(diffusers_vae, convert._VAE_CONFIG_KEYS) == sd3mini.VAEConfig()
    with pytest.raises(KeyError, match="not an MMDiT state dict: 'x_embedder.proj.weight' is missing"):
        sd3mini.MMDiTConfig.from_state_dict(vae_sd)
