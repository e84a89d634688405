"""Linear layers that know their tensor-parallel slice.

Each layer owns its parameters, computes through a pluggable *linear method*, and loads the
slice of a full checkpoint tensor that belongs to this TP rank (``weight_loader``). Shapes:

- ``ReplicatedLinear``            weight [out, in]            every rank the same
- ``ColumnParallelLinear``        weight [out / tp, in]       output split; no communication
- ``MergedColumnParallelLinear``  several column-parallel outputs in one matmul (gate/up)
- ``QKVParallelLinear``           q, k, v heads of this rank in one matmul; KV heads replicated
                                  when tp > num_kv_heads
- ``RowParallelLinear``           weight [out, in / tp]       input split; all-reduce after

A linear method creates the weights and applies them (``UnquantizedLinearMethod`` here; quantized
methods plug in through ``linear_method`` without touching model code).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from fleetlm.distributed.communication import (
    copy_to_tensor_model_parallel_region,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from fleetlm.distributed.parallel_state import parallel_state
from fleetlm.layers import gemv


class LinearMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: LinearBase, in_per_rank: int, out_per_rank: int, dtype: torch.dtype) -> None:
        """Register the layer's parameters (at least ``weight`` with a ``weight_loader``)."""

    @abstractmethod
    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Called once every checkpoint tensor is in (quantized methods repack or quantize here)."""
        return None


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: LinearBase, in_per_rank: int, out_per_rank: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(out_per_rank, in_per_rank, dtype=dtype), requires_grad=False)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return gemv.linear(x, layer.weight, bias, layer)  # F.linear; bf16 on the CPU: the GEMV or prepacked


def _check_divides(what: str, n: int, tp: int) -> None:
    if n % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide {what} ({n})")


class LinearBase(nn.Module):
    """``in_per_rank`` x ``out_per_rank`` of a ``input_size`` x ``output_size`` matrix."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool, dtype: torch.dtype,
                 in_per_rank: int, out_per_rank: int, linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        st = parallel_state()
        self.tp_rank, self.tp_size = st.tp_rank, st.tp_size
        self.input_size, self.output_size = input_size, output_size
        self.in_per_rank, self.out_per_rank = in_per_rank, out_per_rank  # also when no float weight is kept
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, in_per_rank, out_per_rank, dtype)
        self.bias = nn.Parameter(torch.empty(out_per_rank, dtype=dtype), requires_grad=False) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        """Copy this rank's slice of the full checkpoint tensor ``loaded`` into ``param``."""
        _copy(param.data, loaded, self._name(param))

    def _name(self, param: nn.Parameter) -> str:
        return "bias" if param is self.bias else "weight"

    def process_weights_after_loading(self) -> None:
        self.linear_method.process_weights_after_loading(self)


def process_weights_after_loading(model: nn.Module) -> None:
    """Give every module with a ``process_weights_after_loading`` hook (linear layers, quantized
    LM heads) its turn once the whole checkpoint is loaded."""
    for m in list(model.modules()):
        hook = getattr(m, "process_weights_after_loading", None)
        if hook is not None and m is not model:
            hook()


def _check_full(loaded: torch.Tensor, rows: int, cols: int | None, what: str) -> None:
    """The checkpoint tensor must have its full (unsharded) shape before a rank slices it."""
    want = (rows,) if cols is None else (rows, cols)
    if tuple(loaded.shape) != want:
        raise ValueError(f"{what} has shape {tuple(loaded.shape)}, expected {want}")


def _cols(param: nn.Parameter) -> int | None:
    return None if param.dim() == 1 else param.shape[1]


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{what} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, dtype: torch.dtype,
                 linear_method: LinearMethod | None = None) -> None:
        super().__init__(input_size, output_size, bias=bias, dtype=dtype, in_per_rank=input_size,
                         out_per_rank=output_size, linear_method=linear_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Y = X A with A split by columns (our rows of ``weight``); ``gather_output`` concatenates."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, dtype: torch.dtype,
                 gather_output: bool = False, linear_method: LinearMethod | None = None) -> None:
        tp = parallel_state().tp_size
        _check_divides("the output size of a column-parallel linear layer", output_size, tp)
        super().__init__(input_size, output_size, bias=bias, dtype=dtype, in_per_rank=input_size,
                         out_per_rank=output_size // tp, linear_method=linear_method)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        rows = param.shape[0]
        _check_full(loaded, self.output_size, _cols(param), self._name(param))
        _copy(param.data, loaded.narrow(0, self.tp_rank * rows, rows), self._name(param))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_method.apply(self, copy_to_tensor_model_parallel_region(x), self.bias)
        return tensor_model_parallel_all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices side by side (gate and up): shard ``i`` of the
    checkpoint is ``output_sizes[i]`` rows, of which this rank holds ``1/tp``."""

    def __init__(self, input_size: int, output_sizes: list[int], *, bias: bool = False, dtype: torch.dtype,
                 linear_method: LinearMethod | None = None) -> None:
        tp = parallel_state().tp_size
        for n in output_sizes:
            _check_divides("an output of a merged column-parallel layer", n, tp)
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias, dtype=dtype, linear_method=linear_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if shard_id is None:
            raise ValueError("a merged linear layer loads one shard at a time (shard_id required)")
        tp, i = self.tp_size, int(shard_id)
        _check_full(loaded, self.output_sizes[i], _cols(param), f"{self._name(param)} shard {i}")
        size = self.output_sizes[i] // tp
        offset = sum(self.output_sizes[:i]) // tp
        dst = param.data.narrow(0, offset, size)
        _copy(dst, loaded.narrow(0, self.tp_rank * size, size), f"{self._name(param)} shard {i}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections of this rank's heads. With ``tp > num_kv_heads`` every rank holds
    one KV head, each shared by ``tp / num_kv_heads`` consecutive ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, *, bias: bool = False,
                 dtype: torch.dtype, linear_method: LinearMethod | None = None) -> None:
        tp = parallel_state().tp_size
        check_heads_divisible(num_heads, num_kv_heads, tp)
        self.head_dim = head_dim
        self.total_heads, self.total_kv_heads = num_heads, num_kv_heads
        self.num_heads = num_heads // tp
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, dtype=dtype,
                            in_per_rank=hidden_size, out_per_rank=out, linear_method=linear_method)
        self.gather_output = False

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        d, hq, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        total = {"q": self.total_heads, "k": self.total_kv_heads, "v": self.total_kv_heads}.get(shard_id)
        if total is not None:
            _check_full(loaded, total * d, _cols(param), f"{self._name(param)} shard {shard_id}")
        if shard_id == "q":
            dst, start, n = (0, self.tp_rank * hq, hq)
        elif shard_id in ("k", "v"):
            first_kv = self.tp_rank // self.kv_replicas * hkv
            dst, start, n = ((hq if shard_id == "k" else hq + hkv), first_kv, hkv)
        else:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        _copy(param.data.narrow(0, dst * d, n * d), loaded.narrow(0, start * d, n * d),
              f"{self._name(param)} shard {shard_id}")


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """KV heads one TP rank holds: ``num_kv_heads / tp``, at least one (replicated past that)."""
    return max(1, num_kv_heads // tp)


def check_heads_divisible(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """The head split rules: ``tp`` divides the query heads, and either divides the KV heads or
    is a multiple of them (then KV heads are replicated)."""
    if num_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the model's {num_heads} attention heads")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {tp} neither divides nor is a multiple of the model's "
                         f"{num_kv_heads} KV heads")


class RowParallelLinear(LinearBase):
    """Y = X A with A split by rows (our columns of ``weight``) and X already split the same way;
    the partial products are summed over the TP group, then the bias is added once."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, dtype: torch.dtype,
                 reduce_results: bool = True, linear_method: LinearMethod | None = None) -> None:
        tp = parallel_state().tp_size
        _check_divides("the input size of a row-parallel linear layer", input_size, tp)
        super().__init__(input_size, output_size, bias=bias, dtype=dtype, in_per_rank=input_size // tp,
                         out_per_rank=output_size, linear_method=linear_method)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if param is self.bias:
            return _copy(param.data, loaded, "bias")
        cols = param.shape[1]  # weights, or per-group scales of a quantized method: this rank's columns
        _check_full(loaded, self.output_size, cols * self.tp_size, "weight")
        _copy(param.data, loaded.narrow(1, self.tp_rank * cols, cols), "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_method.apply(self, x, None)
        if self.reduce_results:
            y = tensor_model_parallel_all_reduce(y)
        return y if self.bias is None else y + self.bias
