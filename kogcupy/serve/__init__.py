"""`kogcupy serve`: an OpenAI-compatible HTTP server over one Engine (batch 1, FIFO queue).

Needs the ``serve`` extra (``pip install ".[serve]"`` in the source checkout: fastapi,
uvicorn, pydantic, prometheus-client). ``create_app(engine, ...)`` returns the ASGI app;
``run_server(app, ...)`` serves it with uvicorn.
"""
from __future__ import annotations

try:
    from .app import create_app, default_model_name, run_server
except ImportError as e:  # pragma: no cover - depends on the installed extras
    _missing = e.name or str(e)
    raise ImportError(f"kogcupy serve needs the 'serve' extra ({_missing} is missing): "
                      f'pip install ".[serve]" in the kogcupy source checkout (or: pip '
                      f'install fastapi uvicorn pydantic prometheus-client)') from e

__all__ = ["create_app", "default_model_name", "run_server"]
