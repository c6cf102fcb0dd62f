"""sd3mini.book: the one decision behind every real-weights cell, the helpers those cells take their device,
dtype, memory, files and photo from, and the shipped results the book reads."""

import builtins
import sys
import types

import pytest
import torch

from sd3mini import book


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", book.WEIGHTS_ENV, book.DEVICE_ENV, book.PHOTO_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)   # not in Colab
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def one_line(capsys) -> str:
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    return out


def test_no_gpu_skips_with_one_line(no_token, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert book.real_weights_available() is False
    line = one_line(capsys)
    assert "no CUDA GPU" in line and len(line) <= 88 + 1        # the line every CPU-recorded chapter stores
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert book.real_weights_available() is False               # on Colab: where to switch the GPU on
    assert "Runtime > Change runtime type > T4 GPU" in one_line(capsys)


def test_gpu_without_token_or_files_says_how_to_log_in(no_token, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert book.real_weights_available("sd3.5_medium") is False
    line = one_line(capsys)
    assert "huggingface.co/stabilityai/stable-diffusion-3.5-medium" in line and "notebook_login()" in line


def test_a_token_or_complete_local_files_say_yes(no_token, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert book.real_weights_available() is True
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv(book.WEIGHTS_ENV, str(tmp_path))
    assert book.real_weights_available() is False
    line = one_line(capsys)
    assert "lacks" in line and "sd3_medium.safetensors" in line and "t5xxl_fp16.safetensors" in line
    for relative in ("sd3_medium.safetensors", "text_encoders/clip_l.safetensors",
                     "text_encoders/clip_g.safetensors", "text_encoders/t5xxl_fp16.safetensors"):
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    assert book.real_weights_available() is True
    files = book.real_weights("sd3_medium", text_encoders=("clip_l",))
    assert files == {"model": tmp_path / "sd3_medium.safetensors",
                     "clip_l": tmp_path / "text_encoders" / "clip_l.safetensors"}


def test_a_cell_that_reads_only_the_model_needs_only_the_model_file(no_token, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(book.WEIGHTS_ENV, str(tmp_path))
    (tmp_path / "sd3_medium.safetensors").write_bytes(b"")
    assert book.real_weights_available(text_encoders=()) is True         # chapters 3 and 9
    assert book.real_weights_available() is False                         # chapters 10 and 14 read all
    assert "text_encoders/clip_l.safetensors" in one_line(capsys)


def test_never_raises(no_token, monkeypatch, capsys):
    def broken():
        raise RuntimeError("CUDA driver too old")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    assert book.real_weights_available() is False
    assert "CUDA driver too old" in one_line(capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert book.real_weights_available("sd4") is False
    assert "unknown model 'sd4'" in one_line(capsys)


def hub_files(folder, model="sd3_medium"):
    """Empty files named as in the Hub repository: enough for the checks, which only look."""
    for relative in (book.HUB_MODELS[model][1], *book.HUB_TEXT_ENCODERS.values()):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(b"")


def fake_colab(monkeypatch, get):
    """A stand-in for Colab's ``google.colab.userdata`` whose ``get`` is the given function; prompting
    for anything (input(), a login widget) fails the test."""
    userdata = types.ModuleType("google.colab.userdata")
    userdata.get = get
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)

    def never(*args, **kwargs):
        raise AssertionError("real_weights_available() prompted")

    import huggingface_hub

    monkeypatch.setattr(builtins, "input", never)
    monkeypatch.setattr(huggingface_hub, "notebook_login", never)
    monkeypatch.setattr(huggingface_hub, "login", never)


class NotebookAccessError(Exception):        # what Colab raises when the notebook may not read the secret
    pass


def test_a_token_in_colab_secrets_says_yes_and_every_error_says_no(no_token, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []

    def secret(value):
        def get(key):
            asked.append(key)
            if isinstance(value, BaseException):
                raise value
            return value
        return get

    fake_colab(monkeypatch, secret("hf_from_secrets"))
    assert book.real_weights_available() is True and asked == ["HF_TOKEN"]
    for broken in ("", "   ", None, NotebookAccessError("HF_TOKEN"), RuntimeError("no frontend"), TimeoutError()):
        fake_colab(monkeypatch, secret(broken))
        assert book.real_weights_available() is False, broken
        line = one_line(capsys)
        assert "notebook_login()" in line and "secret HF_TOKEN" in line
    colab = types.ModuleType("google.colab")                   # an old google.colab without userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.delitem(sys.modules, "google.colab.userdata")
    assert book.real_weights_available() is False
    one_line(capsys)


def test_colab_secrets_are_read_only_in_colab_and_only_when_needed(no_token, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []
    fake_colab(monkeypatch, lambda key: asked.append(key) or "hf_x")
    monkeypatch.setenv("HF_TOKEN", "hf_env")                    # a token in the environment: no need to ask
    assert book.real_weights_available() is True and asked == []
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delitem(sys.modules, "google.colab")            # not in Colab: never imported, never asked
    assert book.real_weights_available() is False and asked == []
    line = one_line(capsys)
    assert "secret HF_TOKEN" in line and "notebook_login()" in line


def test_the_cpu_override_runs_on_local_files_only(no_token, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(book.DEVICE_ENV, "cpu")
    assert book.real_weights_device() == torch.device("cpu")
    monkeypatch.setenv("HF_TOKEN", "hf_x")                       # a token is not enough on the CPU
    assert book.real_weights_available() is False
    line = one_line(capsys)
    assert "local files only" in line and book.WEIGHTS_ENV in line
    monkeypatch.setenv(book.WEIGHTS_ENV, str(tmp_path))
    hub_files(tmp_path)
    assert book.real_weights_available() is True
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(book.DEVICE_ENV, "tpu")                   # a mistyped override: a line, no exception
    assert book.real_weights_available() is False
    assert "SD3MINI_BOOK_DEVICE='tpu'" in one_line(capsys)
    monkeypatch.delenv(book.DEVICE_ENV)                          # unset: a reader's GPU, which is absent here
    assert book.real_weights_device() == torch.device("cuda")
    assert book.real_weights_available() is False and "no CUDA GPU" in one_line(capsys)


def test_dtype_follows_the_device(no_token, monkeypatch):
    monkeypatch.setenv(book.DEVICE_ENV, "cpu")
    assert book.real_weights_dtype() == torch.float32 and book.real_weights_dtype(precise=True) == torch.float32
    monkeypatch.setenv(book.DEVICE_ENV, "cuda")
    # torch says bf16 is supported on a T4 too (emulated, slow): the capability decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    for capability, dtype in (((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), torch.float16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert book.real_weights_dtype() == dtype
        assert book.real_weights_dtype(precise=True) == torch.float32


def test_memory_helpers_call_cuda_on_a_gpu_and_report_the_host_on_the_cpu(no_token, monkeypatch):
    import os

    monkeypatch.setenv(book.DEVICE_ENV, "cuda:1")
    calls = []
    props = types.SimpleNamespace(name="Tesla T4", total_memory=15_828_320_256)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: calls.append(("props", d)) or props)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("peak", d)) or 123)
    assert book.device_memory() == ("Tesla T4", 15_828_320_256)
    book.reset_peak_memory()
    assert book.peak_memory() == 123
    gpu = torch.device("cuda:1")
    assert calls == [("props", gpu), ("reset", gpu), ("peak", gpu)]

    monkeypatch.setenv(book.DEVICE_ENV, "cpu")
    calls.clear()
    name, total = book.device_memory()
    assert name == "CPU (host RAM)" and total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    book.reset_peak_memory()
    before = book.peak_memory()
    big = torch.ones(64 * 2**20, dtype=torch.uint8)              # 64 MiB touched: the peak cannot fall
    assert 10 * 2**20 < before <= book.peak_memory() <= total and calls == []
    del big


def test_the_photo_and_the_tokenizer_can_be_local(no_token, monkeypatch, tmp_path):
    from PIL import Image

    from helpers import tiny_t5_tokenizer

    Image.new("L", (30, 20), 128).save(tmp_path / "photo.png")
    monkeypatch.setenv(book.PHOTO_ENV, str(tmp_path / "photo.png"))
    photo = book.example_photo()
    assert photo.mode == "RGB" and photo.size == (30, 20)
    tiny_t5_tokenizer().save_pretrained(tmp_path / "tokenizer_3")
    monkeypatch.setenv(book.WEIGHTS_ENV, str(tmp_path))
    tokenizer = book.real_tokenizer()
    assert tokenizer.t5_ids("a photo of a cat")[:6] == [3, 4, 5, 3, 6, 1]
    assert tokenizer("a cat")["l"].shape == (1, 77)


def test_shipped_results_load_by_name():
    assert "evals" in book.load_json("toy_shipped_run.json")
    assert book.data_path("toy_recipe_samples.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="toy_eval.json"):
        book.data_path("no_such.json")


@pytest.mark.parametrize("capability,dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                              ((9, 0), torch.bfloat16)], ids=["t4", "a100", "h100"])
def test_the_default_dtype_follows_the_compute_capability(capability, dtype, monkeypatch):
    """A T4 gets float16 although recent torch's is_bf16_supported() says yes there (bf16 is emulated)."""
    from sd3mini.pipeline import default_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype("cuda") == dtype
    monkeypatch.setenv("SD3MINI_BOOK_DEVICE", "cuda")
    assert book.real_weights_dtype() == dtype and book.real_weights_dtype(precise=True) == torch.float32
    assert default_dtype("cpu") == torch.float32
