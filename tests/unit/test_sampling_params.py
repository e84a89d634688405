import pytest

from fleetlm.sampling_params import SamplingParams


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("max_tokens", 0), ("min_tokens", -1), ("logprobs", 21), ("prompt_logprobs", -1), ("n", 0),
    ("stop", [""]), ("stop_token_ids", [-1]),
])
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=5)


def test_normalisation_and_fan_out_seeds():
    sp = SamplingParams(stop="x", top_k=-1, n=3, seed=7)
    assert sp.stop == ("x",) and sp.top_k == 0
    assert [sp.for_sample(i).seed for i in range(3)] == [7, 8, 9]
    assert sp.for_sample(1).n == 1
