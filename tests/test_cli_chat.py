"""`kogcupy chat` through click's CliRunner with piped input: turns, /reset, /exit, Ctrl-C."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil

import pytest
from click.testing import CliRunner

import kogcupy.engine as E
import kogcupy.model.loader
from kogcupy.cli import cli

TINY = ["--backend", "reference", "--max-new-tokens", "6", "--context-length", "256"]


def chat(args, lines):
    return CliRunner().invoke(cli, ["chat", *args], input="".join(s + "\n" for s in lines))


def turn_stats(stderr) -> list[tuple[int, int, str]]:
    """(new, cached, finish) of each turn's stats line."""
    return [(int(a), int(b), c) for a, b, c in re.findall(
        r"\((\d+) new \+ (\d+) cached prompt tokens\), finish (\w+)", stderr)]


@pytest.fixture
def spy(monkeypatch):
    """The messages each Engine.generate call received."""
    seen = []
    real = E.Engine.generate

    def generate(self, prompt, *a, **kw):
        seen.append(copy.deepcopy(prompt))
        return real(self, prompt, *a, **kw)

    monkeypatch.setattr(E.Engine, "generate", generate)
    return seen


def test_smollm2_turns_reuse_the_prefix(smollm2, monkeypatch):
    monkeypatch.setattr(kogcupy.model.loader, "load_model",
                        lambda path=None, dtype=None, on_config=None, context_length=None: smollm2)
    r = chat(["--backend", "reference", "--max-new-tokens", "8"],
             ["What is the capital of France?", "And of Germany?", "/exit", "never read"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "Paris" in r.stdout and "Berlin" in r.stdout
    (new1, cached1, _), (new2, cached2, _) = turn_stats(r.stderr)
    assert cached1 == 0 and cached2 >= new1 + 5 and new2 < cached2


def test_command_words_do_not_reach_the_model(tiny_dirs, spy):
    r = chat(["--model", tiny_dirs["llama"], *TINY], ["/help", "/frobnicate", "The fox", "/quit",
                                                      "never read"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert len(spy) == 1 and spy[0][-1]["content"] == "The fox"
    assert "unknown command /frobnicate" in r.stderr and r.stderr.count("/reset clears") == 2
    # a command word with more after it is neither run nor sent
    r = chat(["--model", tiny_dirs["llama"], *TINY], ["/exit now", "/reset all", "The fox"])
    assert r.exit_code == 0 and len(spy) == 2 and spy[1][-1]["content"] == "The fox", r.stderr
    assert "/exit takes no arguments" in r.stderr and "/reset takes no arguments" in r.stderr
    assert "conversation cleared" not in r.stderr


def test_sampled_turns_have_seeds_of_their_own(tiny_dirs, monkeypatch):
    """Each sampled turn has a seed of its own (so the same question after /reset can get a
    new answer), derived from the session's seed, which the stats lines name: --seed (given,
    or drawn without one or with -1) with the same lines repeats the session; the first turn
    samples as `generate --seed` does."""
    gens = []
    real = E.Engine.generate

    def generate(self, *a, **kw):
        gens.append((kw["seed"], real(self, *a, **kw)))
        return gens[-1][1]
    monkeypatch.setattr(E.Engine, "generate", generate)
    args = ["--model", tiny_dirs["llama"], *TINY, "--temperature", "1.5"]
    lines = ["The fox", "/reset", "The fox", "/reset", "The fox"]
    runs = {}
    for given in ([], ["--seed", "-1"], ["--seed", "7"], ["--seed", "7"]):
        gens.clear()
        r = chat(args + given, lines)
        assert r.exit_code == 0, (r.stderr, r.exception)
        named = [int(x) for x in re.findall(r", seed (\d+)$", r.stderr, re.M)]
        used = [s for s, _ in gens]
        assert len(used) == 3 and len(set(used)) == 3 and len(set(named)) == 1, (used, named)
        assert used[0] == named[0] and [g.result.seed for _, g in gens] == used
        if given:
            assert named[0] == 7 or given == ["--seed", "-1"]
        runs.setdefault(tuple(given), []).append((used, [g.result.token_ids for _, g in gens]))
    one, two = runs[("--seed", "7")]
    assert one == two                             # the session repeats
    drawn = [runs[()][0][0][0], runs[("--seed", "-1")][0][0][0]]
    assert drawn[0] != drawn[1]


def test_reset_keeps_the_system_prompt(tiny_dirs, spy):
    r = chat(["--model", tiny_dirs["llama"], "--system", "Be brief.", *TINY],
             ["The fox", "", "Once upon a time", "/reset", "The fox"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    system = {"role": "system", "content": "Be brief."}
    assert [len(m) for m in spy] == [2, 4, 2]
    assert spy[0] == spy[2] == [system, {"role": "user", "content": "The fox"}]
    assert spy[1][2]["role"] == "assistant" and spy[1][3]["content"] == "Once upon a time"
    stats = turn_stats(r.stderr)
    assert stats[0][1] == 0 and stats[1][1] > stats[0][0]
    assert r.stderr.count(" GB/s, prefill ") == 3          # each turn's decode bandwidth
    assert stats[2][0] == 1                    # the same first turn again: all but one cached
    first = spy[1][2]["content"]               # same greedy answer before and after /reset
    assert first and r.stdout.startswith(first + "\n") and r.stdout.endswith("\n" + first + "\n")
    assert "conversation cleared" in r.stderr


@pytest.mark.parametrize("where", ["stream", "echo"])
def test_ctrl_c_stops_the_answer_and_keeps_the_session(tiny_dirs, spy, monkeypatch, where):
    """Ctrl-C inside the token stream, or while a piece is written (the stream still runs)."""
    from conftest import interrupt_at
    pieces = interrupt_at(monkeypatch, where, 2)
    r = chat(["--model", tiny_dirs["llama"], *TINY], ["The fox", "Once upon a time"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert [s[2] for s in turn_stats(r.stderr)] == ["cancelled", "length"]
    partial = spy[1][1]
    assert partial["role"] == "assistant" and partial["content"]
    assert r.stdout.startswith(partial["content"] + "\n")
    if where == "echo":                        # the piece not shown stays out of the turn
        assert len(pieces) >= 2 and partial["content"] == pieces[0]


def test_ctrl_c_at_the_prompt_keeps_the_session(tiny_dirs, spy, monkeypatch):
    """On a terminal, Ctrl-C at the >>> prompt clears the line and says how to quit (as
    Python's REPL); piped input ends at it (the next test's exit code)."""
    import builtins
    import kogcupy.cli as C
    lines = iter([KeyboardInterrupt, "The fox", EOFError])

    def scripted_input(prompt=""):
        x = next(lines)
        if isinstance(x, type):
            raise x
        return x

    monkeypatch.setattr(C, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(builtins, "input", scripted_input)
    r = CliRunner().invoke(cli, ["chat", "--model", tiny_dirs["llama"], *TINY])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "kogcupy: /exit or Ctrl-D quits" in r.stderr and len(spy) == 1
    assert r.stderr.startswith("kogcupy chat (reference, context "), r.stderr   # the greeting
    monkeypatch.setattr(C, "_stdin_is_tty", lambda: False)
    lines = iter([KeyboardInterrupt])
    r = CliRunner().invoke(cli, ["chat", "--model", tiny_dirs["llama"], *TINY])
    assert r.exit_code == 130 and r.stderr == "kogcupy: interrupted while waiting for input\n", \
        r.stderr


def test_errors_keep_the_session_or_stop_it(tiny_dirs, tmp_path):
    r = chat(["--model", tiny_dirs["llama"], "--backend", "reference", "--max-new-tokens", "2",
              "--context-length", "40"], ["word " * 50, "The fox", "word " * 25])
    assert r.exit_code == 0, (r.stderr, r.exception)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("kogcupy: error:")]
    assert len(errors) == 2 and all("context length" in e for e in errors)
    assert "/reset" not in errors[0] and "/reset starts the conversation over" in errors[1]
    assert len(turn_stats(r.stderr)) == 1      # the turn between them ran
    d = tmp_path / "plain"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = chat(["--model", str(d), "--backend", "reference"], ["hi"])
    assert r.exit_code == 2 and "needs a model with a chat template" in r.stderr
    # (generate --chat on it: the CLI's own words, no Python argument)
    r = CliRunner().invoke(cli, ["generate", "--model", str(d), "--backend", "reference",
                                 "--chat", "-n", "2", "hi"])
    assert r.exit_code == 2 and "--chat needs a model with a chat template" in r.stderr \
        and "chat=False" not in r.stderr, r.stderr
    r = CliRunner().invoke(cli, ["generate", "--model", str(d), "--backend", "reference",
                                 "-n", "2", "hi"])
    assert r.exit_code == 0, r.stderr                # (no --chat: plain text completion)
    r = chat(["--model", os.fspath(d), "--temperature", "-1"], ["hi"])
    assert r.exit_code == 2 and "temperature" in r.stderr


def test_lines_end_crlf_and_errors_name_the_line(tiny_dirs, spy, monkeypatch, capsys):
    """A "\r\n" line end is one line end; an undecodable byte (a C locale reads it as a lone
    surrogate) is an error naming the line, not the API's chat message index."""
    import io
    import sys
    from kogcupy.cli import main
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(
        io.BytesIO(b"The fox\r\ncaf\xe9\r\n"), encoding="utf-8", errors="surrogateescape"))
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", tiny_dirs["llama"], *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 0 and len(spy) == 1 and spy[0][-1]["content"] == "The fox", err
    assert "kogcupy: error: line 2 is not valid UTF-8 text: undecodable byte 0xe9 at character 3" \
        in err and "chat message" not in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_output_into_a_closed_pipe_stops_quietly(tiny_dirs, monkeypatch, capsys, command):
    """`kogcupy chat | head -c 5`: exit 141 and nothing said, as generate (click's own EPIPE
    handling exits 1)."""
    import io
    import sys
    from conftest import interrupt_at
    from kogcupy.cli import main
    interrupt_at(monkeypatch, "echo", 2, BrokenPipeError(32, "Broken pipe"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("The fox\n"))
    with pytest.raises(SystemExit) as e:
        main([command, "--model", tiny_dirs["llama"], *TINY])
    assert e.value.code == 141 and capsys.readouterr().err == ""
