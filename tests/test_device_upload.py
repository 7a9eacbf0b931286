"""The GPU weight upload (DeviceModel.from_packed) on the CPU, CuPy replaced by NumPy
(weights_tools.testing.FakeCupy): every source uploads the same bits as rounding the float32
packed weights on the host, a packed directory goes straight from its file (no conversion),
and no source needs the model as float32 in host memory (issue 15)."""
from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest

from kogcupy.gpu import device_weights as D
from kogcupy.gpu import kernels
from kogcupy.errors import ModelLoadError
from kogcupy.model.loader import load_model, random_model
from kogcupy.model.packed_weights import PackedDirWeights
from kogcupy.model.random_weights import shape_config
from kogcupy.model.weights import read_safetensors_header, read_weights
from weights_tools import testing as T
from weights_tools.repack import repack

SMALL = dict(n_layers=2, vocab_size=512, hidden_size=128, intermediate_size=256, n_heads=4,
             n_kv_heads=2, head_dim=32)


@pytest.fixture
def fake_gpu(monkeypatch):
    fake = T.FakeCupy()
    monkeypatch.setattr(kernels, "_cupy", lambda: fake)
    monkeypatch.setattr(D, "_CHECK_STEP", 5000)            # several conversion chunks a part
    monkeypatch.setattr(D._Uploader, "CHUNK", 40000)        # several staging rounds a file
    return fake


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("upload")
    out = {
        "hf-bf16-llama-tied": T.random_hf_checkpoint(str(root / "a"), "smollm2-135m", **SMALL),
        "hf-fp16-qwen2": T.random_hf_checkpoint(str(root / "b"), "llama-3.1-8b", "float16",
                                                arch="qwen2", **SMALL),
        "hf-bf16-qwen3": T.random_hf_checkpoint(str(root / "c"), "qwen3-1.7b", **SMALL),
    }
    out["gguf-q8"] = str(root / "t.gguf")
    T.write_tiny_gguf(out["gguf-q8"], "llama", "Q8_0", seed=3)
    for src, dtype in (("hf-bf16-qwen3", "bf16"), ("hf-fp16-qwen2", "fp16")):
        out[f"packed-{dtype}-{src}"] = str(root / f"p-{src}")
        repack(out[src], out[f"packed-{dtype}-{src}"], dtype=dtype)
    return out


def host_rounded(cfg, eager, dtype):
    """What the upload must hold: the float32 packed weights rounded on the host."""
    out = {}
    for name, shape in D.matrix_shapes(cfg).items():
        a = eager[name]
        if name == "w_gate_up":
            a = a.reshape(cfg.n_layers, 2, cfg.intermediate_size, -1).transpose(0, 2, 1, 3)
        if name == "w_down":
            a = a.transpose(0, 2, 1)
        out[name] = D._to_bits(np.ascontiguousarray(a), dtype).reshape(shape)
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("key", ["hf-bf16-llama-tied", "hf-fp16-qwen2", "hf-bf16-qwen3",
                                 "gguf-q8", "packed-bf16-hf-bf16-qwen3",
                                 "packed-fp16-hf-fp16-qwen2", "random"])
def test_upload_matches_host_rounding(fake_gpu, sources, key, dtype):
    if key == "random":
        model = random_model(shape_config("qwen3-1.7b", **SMALL), seed=2, dtype=dtype)
        eager = model.weights
    else:
        model = load_model(sources[key])
        eager = read_weights(sources[key]).weights
    dev = D.DeviceModel.from_packed(model.config, model.weights, dtype)
    for name, want in host_rounded(model.config, eager, dtype).items():
        got = np.asarray(dev.arrays[name])
        assert got.dtype == np.uint16 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    for name in ("rope_cos", "rope_sin", "bqkv", "q_norm", "k_norm"):
        assert (name in dev.arrays) == (name in eager), name
        if name in eager:
            np.testing.assert_array_equal(np.asarray(dev.arrays[name]), eager[name], err_msg=name)


def test_packed_dir_goes_straight_from_the_file(fake_gpu, sources, monkeypatch):
    src = sources["packed-bf16-hf-bf16-qwen3"]
    model = load_model(src)
    assert isinstance(model.weights, PackedDirWeights)
    copies = []
    real_file = D._Uploader.file

    def spy(self, r, dev):
        copies.append(r.nbytes)
        return real_file(self, r, dev)
    real_get = PackedDirWeights.get

    def no_host_conversion(self, name, key):
        assert name not in D.matrix_shapes(model.config), f"{name} converted on the host"
        return real_get(self, name, key)
    monkeypatch.setattr(D._Uploader, "file", spy)
    monkeypatch.setattr(PackedDirWeights, "get", no_host_conversion)
    D.DeviceModel.from_packed(model.config, model.weights, "bfloat16")
    # wqkv, wo, w_down, lm_head, embed whole; w_gate_up a layer at a time (reordered there)
    assert len(copies) == 5 + model.config.n_layers
    assert sum(copies) == sum(2 * int(np.prod(s)) for s in D.matrix_shapes(model.config).values())


def test_no_float32_copy_of_the_model(fake_gpu, tmp_path):
    d = T.random_hf_checkpoint(str(tmp_path / "hf"), "smollm2-135m",
                               **{**SMALL, "n_layers": 32, "intermediate_size": 512})
    model = load_model(d)
    cfg = model.config
    f32_model = 4 * sum(int(np.prod(s)) for s in D.matrix_shapes(cfg).values())
    largest = 4 * cfg.vocab_size * cfg.hidden_size
    tracemalloc.start()
    dev = D.DeviceModel.from_packed(cfg, model.weights, "bfloat16")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    on_device = sum(np.asarray(a).nbytes for a in dev.arrays.values())   # host memory here
    staging = 2 * D._Uploader.CHUNK                                      # the pinned buffers
    # the "device" arrays + one tensor's conversion temporaries (GPU memory on a GPU); a
    # float32 copy of the model would add f32_model (2x on_device)
    extra = peak - on_device - staging
    assert extra < 12 * largest + (1 << 20), (peak, on_device, largest)
    assert extra < f32_model / 8, (peak, on_device, f32_model)


def _poke_bf16(path, tensor, value_bits):
    t = read_safetensors_header(os.path.join(path, "model.safetensors"))[tensor]
    with open(t.file, "r+b") as f:
        f.seek(t.start + 2 * 7)
        f.write(np.uint16(value_bits).tobytes())


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_non_finite_and_float16_overflow_are_load_errors(fake_gpu, tmp_path):
    d = T.random_hf_checkpoint(str(tmp_path / "hf"), "smollm2-135m", **SMALL)
    _poke_bf16(d, "model.layers.1.mlp.down_proj.weight", 0x7FC0)          # NaN
    with pytest.raises(ModelLoadError, match="'w_down'.*layer 1.*NaN or infinite"):
        D.DeviceModel.from_packed(load_model(d).config, load_model(d).weights, "bfloat16")
    _poke_bf16(d, "model.layers.1.mlp.down_proj.weight", 0x4900)          # 2**19: fine in bf16
    m = load_model(d)
    D.DeviceModel.from_packed(m.config, m.weights, "bfloat16")
    with pytest.raises(ModelLoadError, match="overflow float16: use --dtype bfloat16"):
        D.DeviceModel.from_packed(m.config, m.weights, "float16")
    packed = str(tmp_path / "packed")
    _poke_bf16(d, "model.layers.1.mlp.down_proj.weight", 0x3F80)
    repack(d, packed, dtype="bf16")
    _poke_bf16(packed, "w_down", 0xFF80)                                   # -inf in the file
    m = load_model(packed)
    with pytest.raises(ModelLoadError, match="'w_down' \\(layer 0\\).*NaN or infinite"):
        D.DeviceModel.from_packed(m.config, m.weights, "bfloat16")


@pytest.mark.parametrize("key", ["hf-bf16-llama-tied", "hf-fp16-qwen2", "hf-bf16-qwen3",
                                 "gguf-q8", "packed-bf16-hf-bf16-qwen3"])
def test_lazy_weights_equal_the_eager_ones(sources, key):
    lazy, eager = load_model(sources[key]).weights, read_weights(sources[key]).weights
    assert set(lazy) == set(eager)
    for name in eager:
        assert lazy.shape(name) == eager[name].shape
        np.testing.assert_array_equal(lazy[name], eager[name], err_msg=name)
        for key_ in lazy.pieces(name)[:2]:
            np.testing.assert_array_equal(lazy.get(name, key_), eager[name][key_], err_msg=name)
