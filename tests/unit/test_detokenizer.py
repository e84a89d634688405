import pytest

from fleetlm.engine.detokenizer import IncrementalDetokenizer
from fleetlm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(model_path):
    import gguf

    from fleetlm.models.loader import gguf_fields
    from fleetlm.models.tokenizer import tokenizer_from_gguf_fields

    return tokenizer_from_gguf_fields(gguf_fields(gguf.GGUFReader(str(model_path))))


@pytest.mark.parametrize("text", ["héllo wörld — 日本語のテキスト 🎉🚀 done", "plain ascii\n\twith tabs", "<|im_end|> special"])
def test_streamed_pieces_equal_full_decode_and_never_break_characters(tok, text):
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, SamplingParams())
    pieces = [d.add_tokens([t]) for t in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == tok.decode(ids) == d.text
    primed = IncrementalDetokenizer(tok, SamplingParams(), prompt_ids=tok.encode("Prompt text: "))
    assert "".join([primed.add_tokens([t]) for t in ids] + [primed.flush()]) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_spanning_tokens_is_trimmed(tok):
    text = "alpha beta gamma delta"
    d = IncrementalDetokenizer(tok, SamplingParams(stop=["ma del"]))
    stopped = False
    for t in tok.encode(text):
        delta = d.add_tokens([t])
        if d.check_stop(len(delta)):
            stopped = True
            break
    assert stopped and d.text == "alpha beta gam" and d.stop_reason == "ma del"


def test_tokenizer_matches_transformers_gguf_tokenizer(tok, model_path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    for s in ["Hello world 12345", "  spaces\n\nnewlines", "Ünïcödé 日本語 🎉", "def f(x):\n    return x**2", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False)
