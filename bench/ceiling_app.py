"""The framework ceiling: the gateway's FastAPI/uvicorn stack (uvloop, httptools) answering 200 without Kafka.

The route reads the body and answers a small JSON document, as the gateway does, and nothing else: no
signature check, no validation, no publishing. ``python -m bench.ceiling_app PORT``.
"""

from __future__ import annotations

import sys

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from core.contract import WEBHOOK_PATH
from gateway.config import GatewaySettings
from gateway.server import uvicorn_config


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post(WEBHOOK_PATH)
    async def webhook(request: Request) -> Response:
        body = await request.body()
        return Response(orjson.dumps({"accepted": len(body)}), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    port = int(sys.argv[1])
    settings = GatewaySettings(env="dev", gateway_host="127.0.0.1", gateway_port=port)
    uvicorn.Server(uvicorn_config(create_app(), settings, lifespan="off")).run()


if __name__ == "__main__":
    main()
