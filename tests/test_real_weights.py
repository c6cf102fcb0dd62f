"""sd3mini.book: the one decision behind every real-weights cell, and the shipped results the book reads."""

import pytest
import torch

from sd3mini import book


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv(book.WEIGHTS_ENV, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def one_line(capsys) -> str:
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    return out


def test_no_gpu_skips_with_one_line(no_token, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert book.real_weights_available() is False
    assert "no CUDA GPU" in one_line(capsys)


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


def test_never_raises(no_token, monkeypatch, capsys):
    def broken():
        raise RuntimeError("CUDA driver too old")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    assert book.real_weights_available() is False
    assert "CUDA driver too old" in one_line(capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert book.real_weights_available("sd4") is False
    assert "unknown model 'sd4'" in one_line(capsys)


def test_shipped_results_load_by_name():
    assert "evals" in book.load_json("toy_shipped_run.json")
    assert book.data_path("toy_recipe_samples.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="toy_eval.json"):
        book.data_path("no_such.json")
