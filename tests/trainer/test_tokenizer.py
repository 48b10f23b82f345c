"""Tokenizer: trained with rustbpe, saved and reloaded as a tiktoken encoding, lossless on Unicode."""

import pytest

from trainer.tokenizer import (BOS, SPECIAL_TOKENS, encode_docs, load_token_bytes, load_tokenizer,
                               save_tokenizer, train_tokenizer)
from trainer_testlib import corpus_docs

TRICKY = [
    "naïve café — “quotes” ‘single’ … ©®™",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🙂 family 👩‍👩‍👧 flags 🇫🇷🇯🇵 skin 👍🏽",
    "combining e\u0301 a\u0308 Zalgo Z\u0336\u0335a\u0337",
    "RTL עברית ועוד العربية والمزيد",
    "controls \x00 \x07 tabs\tand\r\nCRLF\u2028LS \ufeffBOM",
    "math ∀x∈ℝ: x² ≥ 0, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, surrogates-free 𐍈",
    "digits 1234567890 and code: def f(x): return x**2  # ok",
]


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    enc = train_tokenizer(corpus_docs() + TRICKY[:2], vocab_size=300)
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(enc, folder)
    return enc, folder


def test_vocab_layout_and_specials(enc):
    enc, _ = enc
    assert enc.n_vocab == 300
    bos = enc.encode(BOS, allowed_special="all")
    assert bos == [300 - len(SPECIAL_TOKENS)]
    assert max(enc.encode_ordinary(" ".join(corpus_docs()[:20]))) < 300 - len(SPECIAL_TOKENS)


@pytest.mark.parametrize("text", TRICKY)
def test_unicode_round_trip_after_reload(enc, text):
    original, folder = enc
    loaded = load_tokenizer(folder)
    ids = loaded.encode_ordinary(text)
    assert ids == original.encode_ordinary(text)
    assert loaded.decode(ids) == text
    # BPB's denominator: the byte lengths of the tokens add up to the UTF-8 length of the text
    token_bytes = load_token_bytes(folder)
    assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_table(enc):
    enc, folder = enc
    table = load_token_bytes(folder)
    assert table.shape == (300,)
    assert (table[-len(SPECIAL_TOKENS):] == 0).all()  # special tokens carry no text
    assert (table[:256] == 1).all() and (table[256:-len(SPECIAL_TOKENS)] >= 2).all()


def test_encode_docs_prefixes_bos(enc):
    enc, _ = enc
    docs = encode_docs(enc, ["abc", "日本"], threads=2)
    bos = enc._special_tokens[BOS]
    assert [d[0] for d in docs] == [bos, bos]
    assert enc.decode(docs[1][1:]) == "日本"


def test_too_small_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


def test_too_little_text_for_the_vocab_is_a_clear_error():
    """BPE that runs out of pairs would leave fewer ids than vocab_size and break every table later."""
    with pytest.raises(ValueError, match=r"too small for a 1024-token vocabulary: BPE ran out of pairs to merge at"):
        train_tokenizer(["def f(x):\n    return x + 1\n"] * 3, vocab_size=1024)
