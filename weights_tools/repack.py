"""kogcupy-repack SRC DST: a HF directory, GGUF, packed directory or cached hub id -> a kogcupy
packed directory.

A packed directory holds the weights already in the layout the engine runs on (fused QKV,
norm gammas folded, RoPE tables), stored as bf16/fp16, so loading is one read, no transforms:

    config.json          ModelConfig.to_dict()
    kogcupy_pack.json    {"format": PACK_FORMAT, "version": PACK_FORMAT_VERSION, "dtype": ...}
    model.safetensors    packed tensors in `dtype` (rope_cos/rope_sin in float32)
    tokenizer.json, tokenizer_config.json, ...   readable by Tokenizer.from_dir

DST appears only when complete: everything is written to a temporary directory beside it
and renamed into place; any failure (or Ctrl-C) removes the temporary directory. One left by
a repack that could not clean up (SIGKILL, a power cut) is removed by the next repack to the
same DST on the same host, once the process that wrote it is gone.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time

import click
import numpy as np

from kogcupy.errors import KogError, ModelLoadError
from kogcupy.model.packing import PACK_FORMAT, PACK_FORMAT_VERSION, bf16_bits
from kogcupy.model.weights import PACK_MARKER, PACKED_WEIGHTS_FILE

# Files of a HF directory that describe its tokenizer (copied as they are).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json",
                   "added_tokens.json")
_F32_TENSORS = ("rope_cos", "rope_sin")
_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_CHUNK_ROWS_BYTES = 64 << 20          # convert/write big tensors in ~64 MB pieces


def _encode(a: np.ndarray, dtype: str, name: str = "") -> np.ndarray:
    if dtype == "bfloat16":
        return bf16_bits(a)
    if dtype == "float16":
        with np.errstate(over="raise"):
            try:
                return a.astype(np.float16)
            except FloatingPointError:
                raise ModelLoadError(f"packed tensor {name!r} overflows float16 (|x| > "
                                     f"65504); repack with --dtype bf16") from None
    return np.ascontiguousarray(a, dtype=np.float32)


def write_safetensors(path: str, tensors, dtypes: dict[str, str], progress=None) -> None:
    """Stream packed tensors into a .safetensors file, converting each to dtypes[name].

    `tensors`: a packed_weights.PackedWeights (e.g. ``Model.weights`` of a loaded model, read
    piece by piece: a layer or a row block at a time, never the model as float32) or a dict
    of float32 arrays. safetensors' own writers need every tensor's bytes in memory at once
    (and NumPy has no bfloat16), so the file is written here: header first, then each tensor
    piece by piece."""
    from kogcupy.model.packed_weights import as_packed_weights
    W = as_packed_weights(tensors)
    header, offset = {}, 0
    shapes = {name: tuple(W.shape(name)) for name in W}
    total = sum(4 * int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) * (4 if dtypes[name] == "float32" else 2)
        header[name] = {"dtype": _ST_DTYPE[dtypes[name]], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "kogcupy"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    need, free = 8 + len(raw) + offset, shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if need > free:              # (known before a byte is written: say so now, not at the end)
        raise OSError(errno.ENOSPC, f"No space left on device: the packed weights need "
                                    f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free", path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes.items():
            for key in W.pieces(name):
                a = W.get(name, key)
                flat = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
                step = max(1, _CHUNK_ROWS_BYTES // max(1, flat[0].nbytes))
                for i in range(0, flat.shape[0], step):
                    f.write(_encode(flat[i:i + step], dtypes[name], name).tobytes())
                if progress is not None:          # (a piece: a layer or a row block)
                    progress(name, 4 * a.size, total)
                del a, flat


def _check_existing(dst: str, force: bool, meanwhile: bool = False) -> bool:
    """Whether DST exists (then it may be replaced). --force replaces what a repack wrote (or an
    empty directory), never other data: so other data is said first, without suggesting
    --force. `meanwhile`: checked again just before the swap (DST appeared during the repack)."""
    if not os.path.lexists(dst):
        return False
    how = " (it appeared while the repack ran)" if meanwhile else ""
    entries = os.listdir(dst) if os.path.isdir(dst) else None
    if entries is None or (entries and PACK_MARKER not in entries):
        what = "is a file" if entries is None and os.path.isfile(dst) else \
            f"exists and is not a kogcupy packed directory (no {PACK_MARKER})"
        raise ModelLoadError(f"{dst}: {what}{how}, so it is never replaced: choose another "
                             f"destination or remove it yourself")
    if not force:
        raise ModelLoadError(f"{dst}: already exists{how} (pass --force to replace it)")
    return True


def _dst_checks(src: str, dst: str, force: bool) -> None:
    if not dst:
        raise ModelLoadError("the destination is empty: name the packed directory to write")
    rs, rd = os.path.realpath(src), os.path.realpath(dst)
    if rd == rs or rs.startswith(rd + os.sep) or rd.startswith(rs + os.sep):
        raise ModelLoadError(f"{dst}: destination must not be the source or inside/around it")
    if _check_existing(dst, force):
        cwd = os.path.realpath(os.getcwd())
        if cwd == rd or cwd.startswith(rd + os.sep):
            raise ModelLoadError(f"{dst}: is (or holds) the current directory; run the "
                                 f"repack from outside it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.exists(parent):
        raise ModelLoadError(f"{dst}: parent directory {parent} does not exist")
    if not os.path.isdir(parent):
        raise ModelLoadError(f"{dst}: {parent} is not a directory")
    # the repack writes beside DST (a temporary directory, then a rename): find out now, not
    # after loading the model, that it cannot. The machine's refusals (no permission, a
    # read-only or full disk) stay OSErrors (exit 1), named by DST
    try:
        probe = tempfile.mkdtemp(prefix=_temporary(dst, "probe"), dir=parent)
    except OSError as e:
        from kogcupy.cli import is_system_error
        if is_system_error(e):
            raise OSError(e.errno, e.strerror, dst) from None
        raise ModelLoadError(f"{dst}: cannot create a directory in {parent} "
                             f"({e.strerror or e})") from None
    try:
        os.rmdir(probe)
    except OSError:
        pass


def _write_tokenizer(src: str, fmt: str, tokenizer, tmp: str) -> None:
    if fmt == "gguf":
        tokenizer.to_json_files(tmp)
        return
    for name in TOKENIZER_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(tmp, name))
    # The packed config.json replaces the HF one the tokenizer may have read EOS ids from,
    # so record the full EOS set where Tokenizer.from_dir looks for it.
    tc_path = os.path.join(tmp, "tokenizer_config.json")
    tc = {}
    if os.path.isfile(tc_path):
        with open(tc_path, encoding="utf-8") as f:
            tc = json.load(f)
    tc["kogcupy_eos_token_ids"] = list(tokenizer.eos_token_ids)
    with open(tc_path, "w", encoding="utf-8") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)


def _temporary(dst: str, kind: str) -> str:
    """The name prefix of DST's temporaries of `kind` beside it."""
    return f".{os.path.basename(os.path.abspath(dst))}.{kind}-"


def _repacks_here(dst: str) -> str:
    """The name prefix of this host's repack temporaries of DST: followed by the writer's pid,
    so that a later repack can tell whether it is still being written."""
    return f"{_temporary(dst, 'repack')}{socket.gethostname()}-"


def _remove_stale_temporaries(dst: str) -> list[str]:
    """The temporary directories beside `dst` of repacks on this host whose process is gone
    (killed before they could remove them) are removed; returns the paths removed."""
    parent = os.path.dirname(os.path.abspath(dst))
    pattern = re.escape(_repacks_here(dst)) + r"([0-9]+)-[a-z0-9_]{8}"   # (mkdtemp's 8 characters)
    try:
        names = sorted(os.listdir(parent))
    except OSError:                              # (a parent that can be written, not listed)
        return []
    removed = []
    for name in names:
        m = re.fullmatch(pattern, name)
        path = os.path.join(parent, name)
        if m is None or _process_alive(int(m.group(1))) or os.path.islink(path) \
                or not os.path.isdir(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):   # (gone; a number no pid can be)
        return False
    except PermissionError:                       # (another user's: alive)
        pass
    return True


def repack(src: str, dst: str, dtype: str | None = None, force: bool = False,
           progress=None, note=None) -> str:
    """Write the packed directory for `src` at `dst`; returns the storage dtype used.

    `progress(name, nbytes, total_nbytes)` is called after each piece (a layer or a row block)
    of a tensor is written; `note(line)` with what else the user should know (a killed
    repack's leftovers removed)."""
    from kogcupy.model.loader import load_model, normalize_dtype, resolve_model_path
    from kogcupy.model.weights import detect_format
    src, dst = resolve_model_path(os.fspath(src))[0], os.fspath(dst)   # (a cached hub id)
    dtype = normalize_dtype(dtype)
    _dst_checks(src, dst, force)
    fmt = detect_format(src)
    model = load_model(src, dtype=dtype)
    dtype = model.dtype
    parent = os.path.dirname(os.path.abspath(dst))
    for path in _remove_stale_temporaries(dst):
        if note is not None:
            note(f"removed {path}, left half-written by a repack that was killed")
    tmp = tempfile.mkdtemp(prefix=f"{_repacks_here(dst)}{os.getpid()}-", dir=parent)
    old = None
    try:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(model.config.to_dict(), f, indent=2)
        _write_tokenizer(src, fmt, model.tokenizer, tmp)
        dtypes = {k: ("float32" if k in _F32_TENSORS else dtype) for k in model.weights}
        try:
            write_safetensors(os.path.join(tmp, PACKED_WEIGHTS_FILE), model.weights, dtypes,
                              progress)
        except OSError as e:    # a full disk while writing: named by DST, not its temporary
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or \
                    not str(e.filename or tmp).startswith(tmp):
                raise           # (e.g. a source disk's read error: not DST's)
            raise OSError(e.errno, e.strerror, dst) from None
        # The marker goes last: a directory with it is complete by construction.
        with open(os.path.join(tmp, PACK_MARKER), "w", encoding="utf-8") as f:
            json.dump({"format": PACK_FORMAT, "version": PACK_FORMAT_VERSION, "dtype": dtype,
                       "source": os.path.abspath(src)}, f, indent=2)
        os.chmod(tmp, 0o755)           # mkdtemp makes it private; DST should not be
        if _check_existing(dst, force, meanwhile=True):   # --force: move it aside, then swap
            old = tempfile.mkdtemp(prefix=_temporary(dst, "old"), dir=parent)
            os.replace(dst, os.path.join(old, "x"))
        os.replace(tmp, dst)
    except BaseException:               # (DST is not replaced yet: the old one is put back)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(dst) and os.path.lexists(
                os.path.join(old, "x")):
            os.replace(os.path.join(old, "x"), dst)      # put the old DST back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        try:
            shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:      # DST is complete: only the old one's removal was cut
            e.repack_written = True
            raise
    return dtype


@click.command("repack", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(exists=False))
@click.argument("dst", type=click.Path(exists=False))
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "bfloat16", "float16"]),
              default=None, help="Storage dtype (default: the checkpoint's; fp32 -> bf16, "
                                 "GGUF -> fp16, or bf16 when its matrices are BF16).")
@click.option("--force", is_flag=True, help="Replace DST if it is a packed directory (or empty).")
def repack_command(src, dst, dtype, force):
    """Repack SRC into a kogcupy packed directory DST. SRC is what --model takes: a HF
    directory, a .gguf file (a split GGUF: its first file or its directory), a packed
    directory, or a hub id in the local HF cache."""
    # KogErrors propagate: `kogcupy repack` and `kogcupy-repack` print them as one line. An
    # interrupt or the machine's error ends both the same way (_Stopped).
    import signal
    import threading
    ctx = click.get_current_context(silent=True)
    prog = (ctx.find_root().info_name if ctx else None) or "kogcupy-repack"
    state = {"written": False}                 # set once DST is complete
    try:
        if threading.current_thread() is not threading.main_thread():
            return _repack_cli(src, dst, dtype, force, state)
        # a SIGTERM (kill, a job scheduler) cleans up as Ctrl-C does: no temporary left
        before = signal.signal(signal.SIGTERM, _terminated)
        try:
            return _repack_cli(src, dst, dtype, force, state)
        finally:
            if before is not None:             # (None: a handler not set from Python)
                signal.signal(signal.SIGTERM, before)
    except (KeyboardInterrupt, OSError) as e:
        from kogcupy.cli import is_system_error, os_error_line
        if isinstance(e, OSError) and not is_system_error(e):
            raise
        written = state["written"] or getattr(e, "repack_written", False)
        done = f"{dst} was written" if written else "nothing was written"
        if isinstance(e, OSError):
            raise _Stopped(f"{prog}: error: {os_error_line(e)}; {done}", 1) from None
        term = isinstance(e, Terminated)
        raise _Stopped(f"{prog}: {'terminated' if term else 'interrupted'}; {done}",
                       143 if term else 130) from None


class _Stopped(click.ClickException):
    """A repack ended by Ctrl-C, SIGTERM or the machine's error (a full disk): one line,
    the same under `kogcupy repack` and `kogcupy-repack`; exit 130, 143 or 1."""

    def __init__(self, line: str, exit_code: int):
        super().__init__(line)
        self.exit_code = exit_code

    def show(self, file=None):
        click.echo(self.message, err=True)


def _repack_cli(src, dst, dtype, force, state):
    from kogcupy.model.loader import resolve_model_path
    from kogcupy.model.weights import detect_format
    local = resolve_model_path(src)[0]        # (a hub id: its snapshot in the local cache)
    _dst_checks(local, dst, force)
    detect_format(local)
    bar = None

    tty, done, said = sys.stderr.isatty(), 0, 0

    def progress(name, nbytes, total):
        nonlocal bar, done, said
        if not tty:                  # a log (nohup, CI): a line each tenth
            done += nbytes
            if done * 10 // total > said:
                said = done * 10 // total
                click.echo(f"writing: {10 * said}% ({name})", err=True)
            return
        if bar is None:
            bar = click.progressbar(length=total, label="writing", file=sys.stderr,
                                    item_show_func=lambda n: n)
            bar.__enter__()
        bar.update(nbytes, current_item=name)

    click.echo(f"loading {src}", err=True)
    t0 = time.perf_counter()
    try:
        used = repack(local, dst, dtype, force, progress=progress,      # (resolved once)
                      note=lambda line: click.echo(line, err=True))
        state["written"] = True
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
    click.echo(f"wrote {dst} ({used}, {size / 2**20:,.1f} MiB in {time.perf_counter() - t0:.1f} s)",
               err=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM during a repack: unwinds (and cleans up) as Ctrl-C does."""


def _terminated(signum, frame):
    raise Terminated


def main(argv=None) -> None:
    """`kogcupy-repack`: user errors are one line and exit 2; Ctrl-C exits 130, SIGTERM 143;
    the system's errors (a full disk) are one line and exit 1."""
    prog = "kogcupy-repack"
    try:
        repack_command.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:              # one line, as `kogcupy` prints them
        from kogcupy.cli import usage_line
        click.echo(f"{prog}: error: {usage_line(e, prog)}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KogError as e:
        click.echo(f"{prog}: error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort) as e:
        if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated):   # (click: Abort)
            click.echo(f"{prog}: terminated; nothing was written", err=True)
            sys.exit(143)                      # 128 + SIGTERM, as a shell reports it
        click.echo(f"{prog}: interrupted; nothing was written", err=True)
        sys.exit(130)
    except OSError as e:
        from kogcupy.cli import is_system_error, os_error_line
        if not is_system_error(e):
            raise
        click.echo(f"{prog}: error: {os_error_line(e)}; nothing was written", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
