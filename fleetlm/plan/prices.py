"""Hourly prices per GPU that ``fleetlm plan --fleet`` costs fleets with (USD, on demand).

Reference rates, not quotes: the middle of the "specialty GPU cloud" on-demand range of a
May 2026 survey of providers (mercatus-ai.com/blog/cloud-gpu-pricing: A100 80GB $1.10-1.50,
H100 SXM $2.50-3.50, H200 SXM $3.50-4.50 per GPU-hour; hyperscalers charge more, long-tail
providers less). Parts without a surveyed rate have none: pass ``--gpu-price NAME=USD``.
"""

from __future__ import annotations

from fleetlm.plan.errors import PlanError

GPU_HOURLY_USD: dict[str, float] = {"a100-80g": 1.30, "h100-sxm": 3.00, "h200": 4.00}
PRICE_SOURCE = "specialty-cloud on-demand mid-range, May 2026 survey (mercatus-ai.com/blog/cloud-gpu-pricing)"


def parse_prices(items: list[str] | None) -> dict[str, float]:
    """``["h100-sxm=2.5"]`` -> ``{"h100-sxm": 2.5}``."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = float("nan")
        if not sep or not name.strip() or not price > 0:
            raise PlanError(f"--gpu-price {item!r} must be NAME=USD_PER_GPU_HOUR with a price > 0")
        out[name.strip().lower()] = price
    return out


def gpu_price(hardware: str, overrides: dict[str, float]) -> float:
    if hardware in overrides:
        return overrides[hardware]
    if hardware in GPU_HOURLY_USD:
        return GPU_HOURLY_USD[hardware]
    raise PlanError(f"no hourly price for {hardware!r} in the catalog (known: "
                    f"{', '.join(f'{k} ${v:.2f}' for k, v in GPU_HOURLY_USD.items())}); "
                    f"pass --gpu-price {hardware}=USD")
