"""kogcupy-repack: packed directories round-trip, and an interrupted repack leaves nothing."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from kogcupy.errors import ModelLoadError
from kogcupy.model.loader import load_model
from kogcupy.model.packing import PACK_FORMAT, PACK_FORMAT_VERSION, round_to_dtype
from kogcupy.model.weights import read_weights
from weights_tools import repack as R
from weights_tools import testing as T


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf_qwen2"))
    T.write_hf_dir(d, "qwen2", "bfloat16", seed=5)
    return d


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    T.write_tiny_gguf(p, "llama", "Q8_0", seed=6)
    return p


def _leftovers(parent):
    return [e for e in os.listdir(parent) if ".repack-" in e or ".old-" in e or ".probe-" in e]


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_repack_hf_roundtrip(hf_dir, tmp_path, dtype):
    dst = str(tmp_path / "packed")
    used = R.repack(hf_dir, dst, dtype=dtype)
    assert used == (dtype or "bfloat16")
    src, packed = load_model(hf_dir), load_model(dst)
    assert packed.config == src.config and packed.dtype == used
    assert packed.path == dst
    for k, a in src.weights.items():
        want = a if k in ("rope_cos", "rope_sin") else round_to_dtype(a, used)
        np.testing.assert_array_equal(packed.weights[k], want, err_msg=k)
    for text in ("hello world", "ünïcode ✓"):
        assert packed.tokenizer.encode(text) == src.tokenizer.encode(text)
    assert packed.tokenizer.eos_token_ids == src.tokenizer.eos_token_ids
    assert packed.tokenizer.chat_template == src.tokenizer.chat_template
    marker = json.load(open(os.path.join(dst, "kogcupy_pack.json")))
    assert (marker["format"], marker["version"], marker["dtype"]) == (
        PACK_FORMAT, PACK_FORMAT_VERSION, used)
    assert _leftovers(tmp_path) == []


def test_packed_safetensors_dtypes(hf_dir, tmp_path):
    """bf16 is stored as real BF16 (readable by torch), rope tables as F32."""
    import torch
    from safetensors.torch import load_file
    dst = str(tmp_path / "packed")
    R.repack(hf_dir, dst, dtype="bf16")
    sd = load_file(os.path.join(dst, "model.safetensors"))
    assert sd["wqkv"].dtype == torch.bfloat16 and sd["rope_cos"].dtype == torch.float32
    src = read_weights(hf_dir).weights
    np.testing.assert_array_equal(sd["w_down"].float().numpy(),
                                  round_to_dtype(src["w_down"], "bfloat16"))


def test_repack_gguf_roundtrip(gguf_file, tmp_path):
    dst = str(tmp_path / "packed")
    assert R.repack(gguf_file, dst) == "float16"
    src, packed = load_model(gguf_file), load_model(dst)
    assert packed.config == src.config
    np.testing.assert_array_equal(packed.weights["wqkv"],
                                  round_to_dtype(src.weights["wqkv"], "float16"))
    assert packed.tokenizer.encode("abc xyz") == src.tokenizer.encode("abc xyz")
    assert packed.tokenizer.eos_token_ids == src.tokenizer.eos_token_ids
    assert packed.tokenizer.has_chat_template


def test_repack_existing_dst(hf_dir, tmp_path, monkeypatch):
    dst = tmp_path / "packed"
    dst.mkdir()
    R.repack(hf_dir, str(dst), force=True)              # an empty directory: replaced
    (dst / "stale").write_text("x")
    with pytest.raises(ModelLoadError, match="already exists.*--force"):
        R.repack(hf_dir, str(dst))
    assert (dst / "stale").exists()
    R.repack(hf_dir, str(dst), force=True)              # a packed directory: replaced
    assert not (dst / "stale").exists() and (dst / "kogcupy_pack.json").exists()
    # --force never deletes other data: a directory without the marker, a file
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "ch1.txt").write_text("precious")
    (tmp_path / "notes.txt").write_text("precious")
    for d in (other, tmp_path / "notes.txt"):
        for force in (False, True):                     # said alike: --force would not help
            with pytest.raises(ModelLoadError, match="not a kogcupy packed directory|is a file") as e:
                R.repack(hf_dir, str(d), force=force)
            assert "--force" not in str(e.value)
    assert (other / "ch1.txt").read_text() == (tmp_path / "notes.txt").read_text() == "precious"
    monkeypatch.chdir(dst)                              # ".": the process's own directory
    with pytest.raises(ModelLoadError, match="current directory"):
        R.repack(hf_dir, ".", force=True)
    assert (dst / "kogcupy_pack.json").exists()
    assert _leftovers(tmp_path) == []


def test_dst_that_appears_during_the_repack_is_kept(hf_dir, tmp_path):
    """DST is checked again before the swap: what appeared there while the repack ran (another
    repack, or the user's data) is never moved aside and deleted."""
    dst = tmp_path / "packed"

    def appear(make):
        def progress(name, nbytes, total):
            if not dst.exists():
                make()
        return progress

    def user_data():
        dst.mkdir()
        (dst / "notes.txt").write_text("precious")

    for force in (False, True):
        with pytest.raises(ModelLoadError, match="appeared while the repack ran"):
            R.repack(hf_dir, str(dst), force=force, progress=appear(user_data))
        assert (dst / "notes.txt").read_text() == "precious"
        assert _leftovers(tmp_path) == []
        shutil.rmtree(dst)
    # another repack's complete directory appears: replaced only with --force
    other = tmp_path / "other"
    R.repack(hf_dir, str(other))
    with pytest.raises(ModelLoadError, match="already exists .it appeared.*--force"):
        R.repack(hf_dir, str(dst), progress=appear(lambda: shutil.copytree(other, dst)))
    R.repack(hf_dir, str(dst), force=True, progress=appear(lambda: shutil.copytree(other, dst)))
    assert (dst / "kogcupy_pack.json").exists() and _leftovers(tmp_path) == []


def test_repack_refuses_src_as_dst(hf_dir):
    with pytest.raises(ModelLoadError, match="must not be the source"):
        R.repack(hf_dir, hf_dir, force=True)
    assert os.path.isfile(os.path.join(hf_dir, "config.json"))


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
@pytest.mark.parametrize("when", ["first_tensor", "third_tensor", "marker"])
def test_interrupted_repack_leaves_nothing(hf_dir, tmp_path, monkeypatch, exc, when):
    dst = tmp_path / "packed"
    calls = {"n": 0}
    real_encode, real_dump = R._encode, json.dump

    def encode(a, dtype, name=""):
        calls["n"] += 1
        if (when == "first_tensor" and calls["n"] == 1) or (
                when == "third_tensor" and calls["n"] == 3):
            raise exc("interrupted")
        return real_encode(a, dtype, name)

    def dump(obj, f, **kw):
        if when == "marker" and isinstance(obj, dict) and obj.get("format") == PACK_FORMAT:
            raise exc("interrupted")
        return real_dump(obj, f, **kw)

    monkeypatch.setattr(R, "_encode", encode)
    monkeypatch.setattr(R.json, "dump", dump)
    with pytest.raises(exc):
        R.repack(hf_dir, str(dst))
    assert not dst.exists()
    assert os.listdir(tmp_path) == []


def test_killed_repacks_leftovers_are_removed(hf_dir, tmp_path):
    """A repack killed with no chance to clean up (SIGKILL) leaves its temporary directory;
    the next repack to that DST (given with a trailing slash or not) removes it once its
    process is gone, and says so. A running repack's, another host's, another DST's, a
    --force backup, a symlink and other names stay."""
    import socket
    import subprocess
    import sys
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    names = {f".packed.repack-{host}-{gone}-x1y2_3w4": False,
             f".packed.repack-{host}-{os.getpid()}-abcdefgh": True,
             f".packed.repack-otherhost-{gone}-abcdefgh": True,
             f".other.repack-{host}-{gone}-abcdefgh": True, ".packed.old-abcdefgh": True,
             f".packed.repack-{host}-{gone}-b.old-abcdefgh": True,
             f".packed.repack-{host}-{gone}-backup": True}
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    link = f".packed.repack-{host}-{gone}-linklink"
    (tmp_path / link).symlink_to(elsewhere)
    names.update({link: True, "elsewhere": True})
    notes = []
    R.repack(hf_dir, str(tmp_path / "packed") + "/", note=notes.append)
    assert {n: (tmp_path / n).exists() for n in names} == names
    assert notes == [f"removed {tmp_path / f'.packed.repack-{host}-{gone}-x1y2_3w4'}, left "
                     f"half-written by a repack that was killed"]
    assert sorted(os.listdir(tmp_path)) == sorted([n for n, kept in names.items() if kept] +
                                                  ["packed"])


def test_interrupted_forced_repack_keeps_old_dst(hf_dir, tmp_path, monkeypatch):
    dst = tmp_path / "packed"
    R.repack(hf_dir, str(dst))
    before = sorted(os.listdir(dst))
    real_replace = os.replace

    def replace(a, b):           # Ctrl-C once: while swapping the new directory in
        if b == str(dst) and ".repack-" in a:
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(R.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        R.repack(hf_dir, str(dst), force=True)
    monkeypatch.undo()
    assert sorted(os.listdir(dst)) == before
    assert _leftovers(tmp_path) == []
    load_model(str(dst))


def test_packed_version_mismatch(hf_dir, tmp_path):
    dst = tmp_path / "packed"
    R.repack(hf_dir, str(dst))
    marker = dst / "kogcupy_pack.json"
    m = json.loads(marker.read_text())
    marker.write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(ModelLoadError, match=r"packed format version 99 not supported "
                                             r"\(this kogcupy reads 1\); re-run kogcupy-repack"):
        load_model(str(dst))
    marker.write_text(json.dumps({**m, "format": "something-else"}))
    with pytest.raises(ModelLoadError, match="re-run kogcupy-repack"):
        load_model(str(dst))


def test_packed_shape_mismatch(hf_dir, tmp_path):
    dst = tmp_path / "packed"
    R.repack(hf_dir, str(dst))
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ModelLoadError, match="w_gate_up.*config.json implies"):
        load_model(str(dst))


def test_packed_config_or_weights_missing_are_named(hf_dir, tmp_path):
    dst = tmp_path / "packed"
    R.repack(hf_dir, str(dst))
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "n_heads"}))
    with pytest.raises(ModelLoadError, match=r"config.json: not a kogcupy packed config "
                                             r"\(no 'n_heads' key\)$"):
        load_model(str(dst))
    (dst / "config.json").write_text(json.dumps({**cfg, "extra": 1}))
    with pytest.raises(ModelLoadError, match=r"\(unknown key 'extra'\)$"):
        load_model(str(dst))
    (dst / "config.json").write_text(json.dumps(cfg))
    os.remove(dst / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"packed directory has no model.safetensors; "
                                             r"re-run kogcupy-repack"):
        load_model(str(dst))


def test_repack_main(hf_dir, tmp_path, capsys):
    dst = str(tmp_path / "packed")
    with pytest.raises(SystemExit) as e:
        R.main([hf_dir, dst, "--dtype", "fp16"])
    assert e.value.code == 0
    assert json.load(open(os.path.join(dst, "kogcupy_pack.json")))["dtype"] == "float16"
    done = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"wrote {re.escape(dst)} \(float16, [\d.,]+ MiB in [\d.]+ s\)", done), done
    with pytest.raises(SystemExit) as e:
        R.main([hf_dir, dst])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kogcupy-repack: error: ") and "already exists" in err
    with pytest.raises(SystemExit) as e:
        R.main([str(tmp_path / "missing"), str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()


def test_repack_fp16_overflow(tmp_path):
    """A bf16/fp32 checkpoint whose folded weights exceed fp16's range cannot go to fp16."""
    import test_bad_input as B
    tensors = B.small_tensors()
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e6
    src = B.write_small_hf(tmp_path / "src", tensors=tensors, dtype=np.float32, tokenizer=True)
    with pytest.raises(ModelLoadError, match="'w_down' overflows float16.*--dtype bf16"):
        R.repack(src, str(tmp_path / "packed"), dtype="fp16")
    assert sorted(os.listdir(tmp_path)) == ["src"]
    R.repack(src, str(tmp_path / "packed"), dtype="bf16")


def test_cli_system_error_is_one_line(hf_dir, tmp_path, monkeypatch, capsys):
    def full(*a, **kw):
        raise OSError(28, "No space left on device")      # (a write names no file)

    dst = str(tmp_path / "packed")
    monkeypatch.setattr(R, "write_safetensors", full)
    with pytest.raises(SystemExit) as e:
        R.main([hf_dir, dst])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.strip().endswith(f"error: {dst}: No space left on device; nothing was written")
    assert os.listdir(tmp_path) == []
    # the size the packed weights need is known first: a disk without it is said at once
    monkeypatch.undo()
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(R.shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 4096, 4096))
    with pytest.raises(SystemExit) as e:
        R.main([hf_dir, dst])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "writing" not in err, err
    assert re.search(rf"error: {re.escape(dst)}: No space left on device: the packed weights need "
                     r"0\.\d\d GiB, 0\.00 GiB are free; nothing was written", err), err
    assert os.listdir(tmp_path) == []


def test_cli_progress_in_a_log(hf_dir, tmp_path, capsys):
    """stderr not a terminal (nohup, CI): a line each tenth of the bytes, ending at 100 %, a
    piece (a layer) at a time, not one step a tensor kind."""
    sizes = []
    R.repack(hf_dir, str(tmp_path / "a"), progress=lambda name, n, total: sizes.append((n, total)))
    assert sum(n for n, _ in sizes) == sizes[0][1] and max(n for n, _ in sizes) < sizes[0][1] / 4
    with pytest.raises(SystemExit) as e:
        R.main([hf_dir, str(tmp_path / "b")])
    assert e.value.code == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("writing")]
    pcts = [int(re.match(r"writing: (\d+)% \(\w+\)$", ln).group(1)) for ln in lines]
    assert pcts == sorted(set(pcts)) and pcts[-1] == 100 and len(pcts) >= 4, lines


def test_cli_sigterm_cleans_up_and_restores_the_handler(hf_dir, tmp_path, monkeypatch, capsys):
    import signal

    def killed(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(R, "write_safetensors", killed)
    with pytest.raises(SystemExit) as e:
        R.main([hf_dir, str(tmp_path / "packed")])
    assert e.value.code == 143 and "terminated; nothing was written" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_destination_checked_before_loading(hf_dir, tmp_path, monkeypatch, capsys):
    """An empty DST, a parent that is a file, a parent where no directory can be made: one
    line, exit 2, before the model loads (the loader here would fail the test); the machine's
    refusal (no permission) exits 1, as its other errors do."""
    import tempfile
    monkeypatch.setattr(R, "repack", lambda *a, **kw: pytest.fail("loaded before the checks"))
    (tmp_path / "afile").write_text("x")
    real_mkdtemp = tempfile.mkdtemp

    def refusing(*a, dir=None, **kw):
        if dir is not None and os.path.basename(dir) == "ro":
            raise PermissionError(13, "Permission denied")
        if dir is not None and os.path.basename(dir) == "odd":
            raise FileNotFoundError(2, "No such file or directory")      # (e.g. under /proc)
        return real_mkdtemp(*a, dir=dir, **kw)

    (tmp_path / "ro").mkdir()
    (tmp_path / "odd").mkdir()
    monkeypatch.setattr(tempfile, "mkdtemp", refusing)
    for dst, code, said in [("", 2, "the destination is empty"),
                            (str(tmp_path / "afile" / "out"), 2, "afile is not a directory"),
                            (str(tmp_path / "odd" / "out"), 2, "cannot create a directory in"),
                            (str(tmp_path / "ro" / "out"), 1,
                             f"{tmp_path / 'ro' / 'out'}: Permission denied; nothing was written")]:
        with pytest.raises(SystemExit) as e:
            R.main([hf_dir, dst])
        err = capsys.readouterr().err
        assert e.value.code == code and said in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["afile", "odd", "ro"] and _leftovers(tmp_path / "ro") == []


def test_kogcupy_repack_stops_as_kogcupy_repack_does(hf_dir, tmp_path, monkeypatch, capsys):
    """`kogcupy repack` ends a SIGTERM the way `kogcupy-repack` does: exit 143, saying that
    nothing was written."""
    import signal
    from kogcupy.cli import main

    monkeypatch.setattr(R, "write_safetensors", lambda *a, **kw: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as e:
        main(["repack", hf_dir, str(tmp_path / "packed")])
    err = capsys.readouterr().err
    assert e.value.code == 143 and err.strip().endswith("kogcupy: terminated; nothing was written"), err
    assert os.listdir(tmp_path) == []


def test_stopped_after_dst_is_complete_says_so(hf_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C while a --force repack removes the old directory (DST already replaced): the
    line says DST was written, not that nothing was; Ctrl-C before: nothing was written."""
    from kogcupy.cli import main
    dst = tmp_path / "packed"
    R.repack(hf_dir, str(dst))
    real_rmtree = R.shutil.rmtree

    def interrupted(path, *a, **kw):
        if ".old-" in os.path.basename(path):
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(R.shutil, "rmtree", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["repack", hf_dir, str(dst), "--force"])
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.strip().endswith(f"kogcupy: interrupted; {dst} was written"), err
    load_model(str(dst))
    monkeypatch.undo()
    monkeypatch.setattr(R, "write_safetensors", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        main(["repack", hf_dir, str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.strip().endswith("kogcupy: interrupted; nothing was written"), err
