"""speculative_config: vLLM's spelling, every bad value a ValueError naming it; n-gram lookup."""

from __future__ import annotations

import numpy as np
import pytest

from fleetlm.config import EngineArgs
from fleetlm.spec_decode.config import SpeculativeConfig
from fleetlm.spec_decode.ngram import ngram_lookup


@pytest.mark.parametrize("raw,match", [
    ({"method": "nope", "num_speculative_tokens": 2}, "method 'nope' is not supported"),
    ({"num_speculative_tokens": 2}, "method None is not supported"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "colour": 1}, "unknown key.*colour"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "unknown key.*model"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs model"),
    ({"method": "self_spec", "num_speculative_tokens": 2}, "needs num_draft_layers"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
     "prompt_lookup_min must be <="),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ({"method": "ngram", "num_speculative_tokens": 2, "adaptive": "yes"}, "adaptive must be true or false"),
    ("ngram", "must be a JSON object"),
])
def test_bad_config_is_a_value_error_naming_it(raw, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.from_dict(raw)


def test_engine_args_parse_and_check_it():
    args = EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert args.speculative_config == SpeculativeConfig("ngram", 3)
    # what the engine-core process receives: every field, serialised and parsed again
    import msgspec

    again = msgspec.msgpack.decode(msgspec.msgpack.encode(args), type=EngineArgs)
    assert again.speculative_config == args.speculative_config
    with pytest.raises(ValueError, match="unknown key"):
        EngineArgs.from_kwargs("m", speculative_config={"method": "ngram", "num_speculative_tokens": 3, "k": 1})
    with pytest.raises(ValueError, match="one rank"):
        EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 3}, tensor_parallel_size=2)


def test_draft_tokenizer_must_match(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models

    from fleetlm.models.tokenizer import Tokenizer
    from fleetlm.spec_decode.draft_model import check_same_tokenizer

    a = Tokenizer(HFTok(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>")), bos_token_id=None,
                  eos_token_id=None, add_bos=False, chat_template=None)
    b = Tokenizer(HFTok(models.WordLevel({"a": 0, "c": 1, "<unk>": 2}, unk_token="<unk>")), bos_token_id=None,
                  eos_token_id=None, add_bos=False, chat_template=None)
    check_same_tokenizer(a, a)
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_same_tokenizer(a, b)


def test_ngram_lookup():
    t = np.array([1, 2, 3, 4, 5, 9, 1, 2, 3], dtype=np.int64)
    assert ngram_lookup(t, 1, 3, 2) == [4, 5]  # "1 2 3" seen before, followed by 4 5
    assert ngram_lookup(t, 1, 3, 10) == [4, 5, 9, 1, 2, 3]
    assert ngram_lookup(np.array([7, 8, 7, 9, 7]), 1, 2, 2) == [9, 7]  # latest match of "7"
    assert ngram_lookup(np.array([1, 2, 3]), 1, 3, 2) == []
    assert ngram_lookup(np.array([5, 6, 5, 6]), 3, 3, 2) == []  # shorter matches than min are not used
    assert ngram_lookup(np.array([4]), 1, 3, 2) == []
