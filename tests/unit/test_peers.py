"""Fast checks of the peer-benchmark helpers (no model is loaded)."""

import json
import os

import pytest

from fleetlm.bench import peers


def test_peer_result_rates() -> None:
    r = peers.PeerResult("x", elapsed_s=2.0, num_prompt_tokens=100, num_output_tokens=50)
    assert r.output_tok_s == 25.0
    assert r.total_tok_s == 75.0
    assert r.extra == {}
    assert peers.PeerResult("z", 0.0, 1, 1).output_tok_s == 0.0


def test_left_pad() -> None:
    ids, mask = peers._left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids == [[5, 6, 7], [0, 0, 8]]
    assert mask == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize(
    ("prompts", "lens"), [([[1]], [1, 2]), ([], []), ([[]], [3]), ([[1]], [0])]
)
def test_check_workload_rejects(prompts: list[list[int]], lens: list[int]) -> None:
    with pytest.raises(ValueError):
        peers._check_workload(prompts, lens)


def test_warmup_prompts_differ_from_workload() -> None:
    prompts = [[1000 + i for i in range(64)], [2000 + i for i in range(32)]]
    warm = peers._warmup_prompts(prompts)
    assert len(warm) == 4 and all(len(w) == 64 for w in warm)
    assert all(1000 <= t <= 2031 for w in warm for t in w)
    assert not any(w[:16] == p[:16] for w in warm for p in prompts)


def test_strip_quant_from_config(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "quantization_config": None}))
    peers._strip_quant_from_config(path)
    assert json.loads(path.read_text()) == {"model_type": "llama"}


def test_env_removed_restores(monkeypatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with peers._env_removed(("OMP_WAIT_POLICY", "NOT_SET_ANYWHERE")) as removed:
        assert "OMP_WAIT_POLICY" not in os.environ
        assert removed == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_vllm_available_is_bool() -> None:
    assert isinstance(peers.vllm_available(), bool)
