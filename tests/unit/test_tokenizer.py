from tessera.tokenizer import build_clip_tokenizer


def test_tokenizer_real_clip_ids():
    tok = build_clip_tokenizer()
    assert len(tok) == 49_408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tokenizer_small_vocab_keeps_clip_ids_and_specials():
    tok = build_clip_tokenizer(1000)
    assert len(tok) == 1000
    ids = tok("a cat").input_ids
    assert ids[0] == 998 and ids[-1] == 999 and max(ids) < 1000
