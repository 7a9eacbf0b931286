"""The `kogcupy` command through click's CliRunner: generate, stdin, env, and user errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import kogcupy.model
from kogcupy.cli import cli


def invoke(args, input=None):
    return CliRunner().invoke(cli, args, input=input)


def assert_user_error(r, match: str | None = None):
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kogcupy: error:"), r.stderr
    assert "Traceback" not in r.output
    if match:
        assert match in lines[0], lines[0]


@pytest.fixture
def cached_default_model(smollm2, monkeypatch):
    """load_model(None) served from the session fixture (the real load is tested once)."""
    real = kogcupy.model.load_model
    monkeypatch.setattr(kogcupy.model, "load_model",
                        lambda path=None, dtype=None: smollm2 if path is None else real(path, dtype))


def test_generate_embedded_model(smollm2):
    r = invoke(["generate", "What is the capital of France?", "--max-new-tokens", "8",
                "--backend", "reference"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "Paris" in r.stdout
    stats = r.stderr.strip().splitlines()[-1]
    assert stats.startswith("kogcupy: ") and "tok/s" in stats and "GB/s" in stats
    assert "backend reference" in stats and "finish" in stats and "prefill" in stats


def test_generate_stdin_prompt_and_options(cached_default_model):
    r = invoke(["generate", "--max-new-tokens", "6", "--no-chat", "--temperature", "0.8",
                "--top-k", "20", "--top-p", "0.9", "--min-p", "0.02", "--seed", "3",
                "--repetition-penalty", "1.1"], input="The capital of France is\n")
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "6 tokens" in r.stderr and "finish length" in r.stderr
    again = invoke(["generate", "--max-new-tokens", "6", "--no-chat", "--temperature", "0.8",
                    "--top-k", "20", "--top-p", "0.9", "--min-p", "0.02", "--seed", "3",
                    "--repetition-penalty", "1.1"], input="The capital of France is\n")
    assert again.stdout == r.stdout


def test_generate_stop_string(cached_default_model):
    r = invoke(["generate", "What is the capital of France?", "--max-new-tokens", "20",
                "--stop", "Paris", "--stop", "zzz"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "Paris" not in r.stdout and "finish stop" in r.stderr


def test_env():
    r = invoke(["env"])
    assert r.exit_code == 0, r.exception
    for key in ("python:", "numpy:", "cupy:", "gpus:", "backend:"):
        assert key in r.stdout
    assert "(auto)" in r.stdout


@pytest.mark.parametrize("args, match", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-k", "-3"], "top_k"),
    (["--min-p", "1.5"], "min_p"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--model", "/nonexistent/model/dir"], "/nonexistent/model/dir"),
])
def test_bad_arguments_are_one_line_errors(args, match):
    assert_user_error(invoke(["generate", "hello", *args]), match)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny_models import build_tokenizer
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64)
                    ).save_pretrained(str(tmp_path), safe_serialization=True)
    build_tokenizer(str(tmp_path))
    assert_user_error(invoke(["generate", "hello", "--model", str(tmp_path)]), "gpt2")


def test_prompt_longer_than_context(tiny_dirs):
    r = invoke(["generate", "word " * 50, "--model", tiny_dirs["llama"], "--context-length", "16",
                "--no-chat"])
    assert_user_error(r, "context length")


def test_monokernel_without_gpu(tiny_dirs, monkeypatch):
    import kogcupy.engine as E
    monkeypatch.setattr(E, "gpu_info", lambda: (False, "cupy sees no GPU"))
    r = invoke(["generate", "hi", "--model", tiny_dirs["llama"], "--backend", "monokernel"])
    assert_user_error(r, "reference")


def test_gpus_option_errors(tiny_dirs, monkeypatch):
    import kogcupy.engine as E
    r = invoke(["generate", "hi", "--model", tiny_dirs["llama"], "--backend", "reference",
                "--gpus", "2"])
    assert_user_error(r, "reference backend runs on the CPU")
    monkeypatch.setattr(E, "gpu_info", lambda: (True, "1 GPU(s)"))   # checked before the GPU
    r = invoke(["generate", "hi", "--model", tiny_dirs["llama"], "--backend", "monokernel",
                "--gpus", "3"])
    assert_user_error(r, "does not divide the model's 4 attention heads")
    r = invoke(["generate", "hi", "--model", tiny_dirs["llama"], "--backend", "monokernel",
                "--gpus", "2"])                                       # this machine has none
    assert_user_error(r)
    assert "needs 2 GPUs" in r.stderr or "CuPy is not usable" in r.stderr, r.stderr
    r = invoke(["generate", "hi", "--model", tiny_dirs["llama"], "--backend", "monokernel",
                "--gpus", "0"])
    assert_user_error(r, "gpus")


def test_tiny_model_generate_and_usage_error(tiny_dirs):
    r = invoke(["generate", "Once upon a time", "--model", tiny_dirs["qwen3"],
                "--max-new-tokens", "5", "--no-chat", "--backend", "reference"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "5 tokens" in r.stderr
    r = invoke(["generate", "hi", "--no-such-option"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_keyboard_interrupt_keeps_output(tiny_dirs, monkeypatch):
    import kogcupy.engine as E
    real_next = E.Generation._next_piece
    calls = {"n": 0}

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(E.Generation, "_next_piece", interrupting)
    r = invoke(["generate", "Once upon a time", "--model", tiny_dirs["llama"],
                "--max-new-tokens", "50", "--no-chat"])
    assert r.exit_code == 130, (r.stderr, r.exception)
    assert r.stdout.strip() and "finish cancelled" in r.stderr


def test_main_entry_point_exit_codes(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    run = lambda *a: subprocess.run([sys.executable, "-c", "from kogcupy.cli import main; main()",
                                     *a], capture_output=True, text=True, env=env, timeout=120)
    r = run("generate", "hi", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.startswith("kogcupy: error:"), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("generate", "hi", "--bogus")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "generate" in r.stdout
