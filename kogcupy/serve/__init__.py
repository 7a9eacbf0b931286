"""`kogcupy serve`: an OpenAI-compatible HTTP server over one Engine (batch 1, FIFO queue).

Needs the ``serve`` extra (``pip install "kogcupy[serve]"``: fastapi, uvicorn, pydantic,
prometheus-client). ``create_app(engine, ...)`` returns the ASGI app; ``run_server(app, ...)``
serves it with uvicorn.
"""
from __future__ import annotations

try:
    from .app import create_app, default_model_name, run_server
except ImportError as e:  # pragma: no cover - depends on the installed extras
    _missing = e.name or str(e)
    raise ImportError(f"kogcupy serve needs the 'serve' extra ({_missing} is missing): "
                      f'pip install "kogcupy[serve]"') from e

__all__ = ["create_app", "default_model_name", "run_server"]
