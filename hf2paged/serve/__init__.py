"""`hf2paged serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the engine's
`AsyncLLM`. `build_app(llm, ServerConfig(...))` makes the ASGI app; `command.serve` is the
CLI command."""

from hf2paged.serve.app import ServerConfig, build_app

__all__ = ["ServerConfig", "build_app"]
