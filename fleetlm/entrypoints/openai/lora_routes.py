"""LoRA adapters over HTTP (vLLM's routes): a request picks an adapter by its ``model`` name;
``/v1/models`` lists the adapters after the base model; ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` change them at run time when the server was started with
``--allow-runtime-lora`` (whoever holds an API key may then make the server read a directory
of its file system)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from fleetlm.entrypoints.openai.protocol import APIError


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None  # vLLM's clients send it; adapters are keyed by name


def resolve_model(state, model: str | None) -> str | None:
    """The adapter ``model`` names (None for the base model); 404 for anything else."""
    if model is None or model == state.model_name:
        return None
    if model in state.engine.loras.adapters:
        return model
    adapters = sorted(state.engine.loras.adapters)
    more = f" and the LoRA adapter(s) {', '.join(map(repr, adapters))}" if adapters else ""
    raise APIError(404, f"the model '{model}' does not exist; this server serves '{state.model_name}'{more}",
                   param="model", code="model_not_found")


def model_cards(state) -> list[dict[str, Any]]:
    base = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "fleetlm",
            "max_model_len": state.engine.max_model_len}
    return [base] + [{"id": name, "object": "model", "created": 0, "owned_by": "fleetlm", "parent": state.model_name,
                      "max_model_len": state.engine.max_model_len} for name in sorted(state.engine.loras.adapters)]


def _check_allowed(state) -> None:
    if not state.engine.loras.enabled:
        raise APIError(400, "LoRA adapters are not enabled on this server (start it with --enable-lora)",
                       code="lora_disabled")
    if not state.config.allow_runtime_lora:
        raise APIError(403, "loading and unloading LoRA adapters at run time is off (start the server with "
                       "--allow-runtime-lora)", type="permission_error", code="runtime_lora_disabled")


def install_lora_routes(app, state) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRARequest):
        _check_allowed(state)
        if req.lora_name == state.model_name:
            raise APIError(400, f"'{req.lora_name}' is the base model's name", param="lora_name")
        try:
            await state.engine.add_lora(req.lora_name, req.lora_path)
        except ValueError as e:
            raise APIError(400, str(e), param="lora_path" if "path" in str(e) or "adapter_" in str(e)
                           else "lora_name") from None
        return {"object": "lora_adapter", "lora_name": req.lora_name, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRARequest):
        _check_allowed(state)
        try:
            state.engine.remove_lora(req.lora_name)
        except ValueError as e:
            raise APIError(404, str(e), param="lora_name", code="lora_not_found") from None
        return {"object": "lora_adapter", "lora_name": req.lora_name, "status": "unloaded"}
