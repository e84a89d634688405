"""The planner's KV sizing for SmolLM2-135M equals what the engine really allocates.

The engine's cache is one tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads,
head_dim]`` in the KV dtype. Each check below takes the model's numbers from a different source
(the catalog, the GGUF file via the planner, the engine's own config) and compares bytes.
To check another model or engine path, add a case to ``CASES`` or a new ``allocate_*`` function.
"""

from __future__ import annotations

import pytest

from fleetlm.plan import kv_cache_bytes_per_token, kv_cache_num_blocks
from fleetlm.plan.memory import kv_bytes_per_token
from fleetlm.plan.model_catalog import catalog_model

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

SMOLLM2 = dict(num_layers=30, num_kv_heads=3, head_dim=64)  # config.json of SmolLM2-135M
BUDGET = 64 << 20  # 64 MiB: small enough to allocate in a test
CASES = [("bf16", torch.bfloat16, 2, 16), ("fp32", torch.float32, 4, 16), ("bf16", torch.bfloat16, 2, 32)]


def allocate_like_engine(num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                         block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The engine's layout (fleetlm/worker/model_runner.py ``initialize_kv_cache``)."""
    shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    return torch.empty(shape, dtype=dtype)


@pytest.mark.parametrize("kv_dtype,torch_dtype,nbytes,block_size", CASES)
def test_smollm2_kv_bytes_equal_allocated_tensor(kv_dtype, torch_dtype, nbytes, block_size):
    per_token = kv_cache_bytes_per_token(**SMOLLM2, dtype_bytes=nbytes)
    assert per_token == 2 * 30 * 3 * 64 * nbytes  # 23,040 B in bf16
    assert kv_bytes_per_token(catalog_model("smollm2-135m"), kv_dtype) == per_token
    blocks = kv_cache_num_blocks(BUDGET, block_size, per_token)
    cache = allocate_like_engine(**SMOLLM2, num_blocks=blocks, block_size=block_size,
                                 dtype=torch_dtype)
    assert cache.nbytes == blocks * block_size * per_token
    assert cache.nbytes <= BUDGET < cache.nbytes + block_size * per_token  # floor: no block lost


def test_gguf_spec_gives_same_kv(smollm2_spec):
    assert (smollm2_spec.num_layers, smollm2_spec.num_kv_heads, smollm2_spec.head_dim) == (30, 3, 64)
    assert kv_bytes_per_token(smollm2_spec, "bf16") == 23_040


def test_engine_model_runner_allocates_planned_bytes(smollm2_gguf):
    """The real engine: its GGUF config and its ``ModelRunner.initialize_kv_cache``."""
    loader = pytest.importorskip("fleetlm.models.loader")
    runner_mod = pytest.importorskip("fleetlm.worker.model_runner")
    from fleetlm.plan.model_load import gguf_reader

    reader = gguf_reader(smollm2_gguf)
    from fleetlm.models.gguf_moe import tensor_shapes

    cfg = loader.config_from_gguf(loader.gguf_fields(reader), tensor_shapes(reader))
    per_token = kv_cache_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 2)
    assert per_token == 23_040
    blocks = kv_cache_num_blocks(BUDGET, 16, per_token)

    model = torch.nn.Module()  # stands in for the Llama module: ModelRunner reads config + dtype
    model.config = cfg
    model.layer_range = range(cfg.num_layers)
    model.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16), requires_grad=False)
    runner = runner_mod.ModelRunner(model, block_size=16, device=torch.device("cpu"),
                                    eos_token_ids=())
    runner.initialize_kv_cache(blocks, torch.bfloat16)
    assert runner.kv_cache.nbytes == blocks * 16 * per_token


@pytest.fixture(scope="module")
def smollm2_gguf():
    from fleetlm.models.hub import resolve_model

    try:
        return resolve_model("smollm2-135m-instruct")
    except RuntimeError as e:  # offline and not cached
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="module")
def smollm2_spec(smollm2_gguf):
    from fleetlm.plan.model_load import spec_from_gguf

    return spec_from_gguf(smollm2_gguf)
