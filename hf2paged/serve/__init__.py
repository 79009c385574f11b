"""`hf2paged serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, metrics with
prometheus-client) on the engine's `AsyncLLM`.

`app.build_app(AsyncLLM(...), ServerConfig(...))` makes the ASGI app; `command.serve` is the CLI
command (light to import: the CLI registers it without loading the engine).
"""
