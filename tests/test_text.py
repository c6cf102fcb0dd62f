"""SD3's tokenization rules with the real CLIP BPE, and how the 154 x 4096 context is assembled."""

import pytest
import torch
from helpers import tiny_t5_tokenizer, tiny_text_encoders

from sd3mini.text import CLIP_EOS, SD3TextEncoder, SD3Tokenizer, clip_tokenizer, encode_prompt


@pytest.fixture(scope="module")
def tok():
    return SD3Tokenizer(t5=tiny_t5_tokenizer())


def test_real_clip_bpe():
    clip = clip_tokenizer()
    assert len(clip) == 49408
    # well-known ids of OpenAI's CLIP vocabulary
    assert clip("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip("A Photo  OF a CAT!")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 256, 49407]


def test_clip_layout_and_padding(tok):
    t = tok(["a photo of a cat"])
    assert t["l"].shape == t["g"].shape == (1, 77)
    words = [320, 1125, 539, 320, 2368]
    assert t["l"][0].tolist() == [49406, *words, 49407] + [49407] * 70      # CLIP-L pads with end-of-text
    assert t["g"][0].tolist() == [49406, *words, 49407] + [0] * 70          # CLIP-G pads with 0
    assert torch.equal(tok("a photo of a cat")["l"], t["l"])              # one string or a list
    empty = tok([""])
    assert empty["l"][0, :3].tolist() == [49406, 49407, 49407] and empty["g"][0, :3].tolist() == [49406, 49407, 0]


def test_long_prompt_is_truncated_at_a_word_with_a_warning(tok):
    prompt = " ".join(["cat"] * 80)
    with pytest.warns(UserWarning, match="truncated; dropped: 'cat cat cat cat cat'"):
        ids = tok.clip_ids(prompt, pad_id=0)
    assert len(ids) == 77 and ids[:2] == [49406, 2368] and ids[-1] == CLIP_EOS
    # a word that does not fit moves (and is dropped) whole: 74 single-token words + a 3-token word
    words = ["cat"] * 74 + ["supercalifrag"]
    n = len(clip_tokenizer()("supercalifrag", add_special_tokens=False)["input_ids"])
    assert 1 < n < 8
    with pytest.warns(UserWarning):
        ids = tok.clip_ids(" ".join(words), pad_id=0)
    assert ids[75] == CLIP_EOS and ids[76] == 0


def test_no_warning_when_it_fits(tok, recwarn):
    tok.clip_ids(" ".join(["cat"] * 75), pad_id=0)
    assert not [w for w in recwarn if "truncated" in str(w.message)]


def test_t5_rules(tok):
    ids = tok.t5_ids("a photo of a cat")
    assert ids[:6] == [3, 4, 5, 3, 6, 1]                                    # tokens, then EOS = 1
    assert len(ids) == 77 and set(ids[6:]) == {0}                           # padded with 0 up to 77
    long = tok.t5_ids(" ".join(["a"] * 100))                                # 199 characters, 100 tokens
    assert len(long) == 101 and long[-1] == 1                               # more than 77: never truncated
    with pytest.warns(UserWarning, match="226 characters"):
        cut = tok.t5_ids(" ".join(["dog"] * 100))                           # 399 characters
    assert cut[:57] == [7] * 56 + [2] and cut[57] == 1                      # 56 x "dog ", then "do" (unknown)
    with pytest.warns(UserWarning, match="truncated") as caught:            # CLIP drops 25 of the 100 words
        batch = tok(["a cat", " ".join(["a"] * 100)])
    assert len(caught) == 1                                                 # once per prompt, not per CLIP
    assert batch["t5"].shape == (2, 101)                                    # rows padded to the longest


def test_encode_prompt_layout(tok):
    encs = tiny_text_encoders()
    tokens = tok(["a photo of a cat", "a red circle"])
    context, pooled = encode_prompt(tokens, encs["clip_l"], encs["clip_g"], encs["t5xxl"], context_dim=256)
    assert context.shape == (2, 154, 256) and pooled.shape == (2, 64 + 128)
    with torch.no_grad():
        l_hidden, l_pooled = encs["clip_l"](tokens["l"])
        g_hidden, g_pooled = encs["clip_g"](tokens["g"])
        t5_hidden, _ = encs["t5xxl"](tokens["t5"])
    assert torch.equal(context[:, :77, :64], l_hidden) and torch.equal(context[:, :77, 64:192], g_hidden)
    assert torch.equal(context[:, :77, 192:], torch.zeros(2, 77, 64))      # zero-padded to the T5 width
    assert torch.equal(context[:, 77:], t5_hidden)
    assert torch.equal(pooled, torch.cat([l_pooled, g_pooled], dim=-1))


def test_no_t5_mode():
    encs = tiny_text_encoders(t5=False)
    text = SD3TextEncoder(encs["clip_l"], encs["clip_g"], None, SD3Tokenizer(), context_dim=256)
    context, pooled = text.encode(["a photo of a cat"])
    assert context.shape == (1, 154, 256)
    assert torch.equal(context[:, 77:], torch.zeros(1, 77, 256))
    with pytest.raises(ValueError, match="T5 tokenizer"):
        SD3TextEncoder(encs["clip_l"], encs["clip_g"], tiny_text_encoders()["t5xxl"], SD3Tokenizer())


def test_penultimate_layer_without_final_norm():
    """hidden = the output of layer n-2, before final_layer_norm; pooled = final-normed state at the EOS."""
    enc = tiny_text_encoders()["clip_l"]
    tokens = SD3Tokenizer().__call__(["a photo of a cat"])["l"]
    with torch.no_grad():
        out = enc.transformer.text_model(input_ids=tokens, output_hidden_states=True)
        hidden, pooled = enc(tokens)
    assert len(out.hidden_states) == 3 + 1                                  # embeddings + 3 layers
    assert torch.equal(hidden, out.hidden_states[2])
    assert torch.equal(pooled, out.last_hidden_state[0, 6][None])          # position of the first EOS
