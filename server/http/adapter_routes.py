"""Adapter management routes: load, unload and list while serving (plus vLLM's aliases)."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from quiver.server.engine.public import AsyncEngine, check_name, resolve_path
from quiver.server.http import openapi as doc
from quiver.server.http.responses import AdapterInfo, AdapterList, AdapterUnloaded, json_body
from quiver.server.http.tenants import access_of

# 400: a bad name or path; 404: no such folder; 409: the name is taken; 422: the folder is not a usable adapter
LOAD_ERRORS = (400, 401, 404, 409, 422)
# 404: no such adapter; 409: requests are using it
UNLOAD_ERRORS = (401, 404, 409)


class LoadAdapter(BaseModel):
    name: str
    path: str


class VllmLoadLora(BaseModel):
    lora_name: str
    lora_path: str


class VllmUnloadLora(BaseModel):
    lora_name: str


def add_adapter_routes(app: FastAPI, engine: AsyncEngine, root: Path) -> None:
    """Paths are resolved inside `root`; reading happens off the engine loop, registration between steps."""
    root = root.resolve()

    def public(info: dict) -> AdapterInfo:
        """An adapter's info without the server's paths: its folder relative to the root, or its name."""
        info = dict(info)
        path = Path(info.pop("path"))
        info["source"] = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
        return AdapterInfo(**info)

    async def load(name: str, path: str) -> AdapterInfo:
        check_name(name)
        return public(await engine.load_adapter(name, str(resolve_path(path, root))))

    @app.post("/v1/adapters", responses=doc.responses(*LOAD_ERRORS, ok=doc.ok(AdapterInfo)))
    async def add_adapter(req: LoadAdapter):
        return json_body(await load(req.name, req.path))

    @app.delete("/v1/adapters/{name}", responses=doc.responses(*UNLOAD_ERRORS, ok=doc.ok(AdapterUnloaded)))
    async def remove_adapter(name: str):
        await engine.unload_adapter(name)
        return json_body(AdapterUnloaded(name=name, unloaded=True))

    @app.get("/v1/adapters", responses=doc.responses(401, ok=doc.ok(AdapterList)))
    async def list_adapters(request: Request):
        """The adapters the (admin) key may use."""
        access = access_of(request)
        return json_body(AdapterList(object="list", base_quantization=engine.quantization,
                                     data=[public(info) for info in await engine.list_adapters()
                                           if access.may_use(info["name"])]))

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
              responses=doc.responses(*LOAD_ERRORS, ok=doc.ok(text=True)))
    async def vllm_load(req: VllmLoadLora):
        await load(req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
              responses=doc.responses(400, *UNLOAD_ERRORS, ok=doc.ok(text=True)))
    async def vllm_unload(req: VllmUnloadLora):
        await engine.unload_adapter(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
