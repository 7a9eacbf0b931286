"""Tokenizer: text <-> token ids, chat templates, streaming detokenization.

One class, two sources:

- ``Tokenizer.from_dir(path)``: a HF model directory (``tokenizer.json`` through the
  ``tokenizers`` library, ``tokenizer_config.json`` for the chat template and special tokens).
- ``Tokenizer.from_gguf(reader)``: a GGUF file's ``tokenizer.ggml.*`` metadata, rebuilt as a
  ``tokenizers.Tokenizer`` (byte-level BPE: tokens, merges, token types, pre-tokenizer).

``to_json_files(dst)`` writes a GGUF-built tokenizer back out as ``tokenizer.json`` +
``tokenizer_config.json`` so it round-trips through ``from_dir`` (the repack tool uses it).

BOS: ``encode(text)`` adds BOS exactly when the model does (tokenizer_config's
``add_bos_token`` when it says so, else whatever tokenizer.json's post-processor prepends,
GGUF ``tokenizer.ggml.add_bos_token``). Chat templates usually write BOS into the text
themselves, so encode a rendered chat with ``add_bos=False`` (``encode_chat`` does).

Decoding keeps special tokens (``<|im_end|>`` decodes to its text); the engine hides EOS.
HF's ``clean_up_tokenization_spaces`` is deliberately not applied: decode is exact.
"""
from __future__ import annotations

import json
import logging
import math
import os
from datetime import datetime
from functools import cached_property

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from ..errors import InputError, ModelLoadError, UnsupportedModelError
from ..sampling_params import SamplingParams

log = logging.getLogger("kogcupy")

# Tokens that end a chat turn (or the text) in common model families; added to the EOS set
# whenever the vocabulary has them, so a chat stops at the end of the assistant's turn even
# when the checkpoint's eos_token is the end-of-text token.
CHAT_END_TOKENS = (
    "<|im_end|>",        # ChatML: SmolLM, Qwen
    "<|eot_id|>",        # Llama 3
    "<|eom_id|>",        # Llama 3.1 tool call end
    "<|endoftext|>",     # GPT-2 family, SmolLM, Qwen
    "<|end_of_text|>",   # Llama 3
    "<end_of_turn>",     # Gemma
    "<|end|>",           # Phi-3
)

# llama.cpp's GGUF token types (gguf.TokenType).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6

# Split regexes copied from the models' own tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_gpt2_pre():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


def _split_bytelevel_pre(pattern):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


# tokenizer.ggml.pre -> (pre-tokenizer factory, normalizer factory or None, BPE ignore_merges)
_GGUF_PRE = {
    "default": (_gpt2_pre, None, False),
    "gpt2": (_gpt2_pre, None, False),
    "smollm": (_digits_gpt2_pre, None, False),
    "starcoder": (_digits_gpt2_pre, None, False),
    "refact": (_digits_gpt2_pre, None, False),
    "llama-bpe": (lambda: _split_bytelevel_pre(_LLAMA3_SPLIT), None, True),
    "llama3": (lambda: _split_bytelevel_pre(_LLAMA3_SPLIT), None, True),
    "qwen2": (lambda: _split_bytelevel_pre(_QWEN2_SPLIT), normalizers.NFC, False),
    "deepseek-r1-qwen": (lambda: _split_bytelevel_pre(_QWEN2_SPLIT), normalizers.NFC, False),
}


class Tokenizer:
    """Token ids <-> text for one model; see the module docstring."""

    def __init__(self, tk: _HFTokenizer, *, bos_token_id: int | None, eos_token_ids,
                 add_bos: bool, chat_template: str | None, source: str = "",
                 special_tokens: dict[str, str] | None = None,
                 sampling_defaults: dict | None = None):
        self._tk = tk                                       # tokenizers.Tokenizer
        self.bos_token_id = bos_token_id
        self.add_bos = bool(add_bos) and bos_token_id is not None   # what the model does by default
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))  # ordered, unique
        self.chat_template = chat_template or None
        self.source = source
        # The model's recommended sampling (generation_config.json: temperature, top_p, top_k,
        # min_p, repetition_penalty), which the server applies where a request sets none
        self.sampling_defaults = dict(sampling_defaults or {})
        # Template variables (bos_token, eos_token, unk_token, pad_token) as strings.
        self.special_tokens = dict(special_tokens or {})
        if bos_token_id is not None:
            self.special_tokens.setdefault("bos_token", self.id_to_token(bos_token_id) or "")
        if self.eos_token_ids:
            self.special_tokens.setdefault("eos_token", self.id_to_token(self.eos_token_ids[0]) or "")

    # ------------------------------------------------------------------ basic API

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    @cached_property
    def takes_tools(self) -> bool:
        """Whether the chat template reads a ``tools`` variable (tool definitions; parsed once)."""
        if not self.chat_template:
            return False
        try:
            import jinja2.meta
            return "tools" in jinja2.meta.find_undeclared_variables(_jinja_env().parse(self.chat_template))
        except Exception:  # noqa: BLE001 -- a template jinja cannot parse takes no tools
            return False

    @property
    def renders_tool_calls(self) -> bool:
        """Whether the chat template reads an assistant message's ``tool_calls`` (one that does
        not would drop the calls of a conversation's history without a word)."""
        return bool(self.chat_template) and "tool_calls" in self.chat_template

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tk

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``add_bos=None`` does what the model does."""
        if add_bos is None:
            add_bos = self.add_bos
        if not isinstance(text, str):           # (encode_batch would read a list as a pair)
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        # encode_batch, not encode: it releases the GIL, so a long prompt tokenizing in a
        # server's worker thread does not stall the event loop (and the streams it serves)
        ids = self._tk.encode_batch([text], add_special_tokens=False)[0].ids
        if add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(int(token_id))

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def check_template_variables(self, variables) -> dict:
        """Extra chat-template variables (HF's ``apply_chat_template(**kwargs)``): a dict of
        names other than the ones rendering sets (TEMPLATE_OWN_VARIABLES, the special tokens)."""
        if variables is None:
            return {}
        if not isinstance(variables, dict):
            raise InputError(f"template variables must be a dict, got {type(variables).__name__}")
        own = (*TEMPLATE_OWN_VARIABLES, *self.special_tokens)
        for k in variables:
            if not (isinstance(k, str) and k.isidentifier()):
                raise InputError(f"template variable {ascii(k)[:40]} cannot be set: a variable's "
                                 f"name is an identifier (letters, digits, _)")
            if k in own:
                hint = " (send it as the request's own field)" if k == "add_generation_prompt" else ""
                raise InputError(f"template variable {ascii(k)[:40]} cannot be set: kogcupy sets "
                                 f"it{hint}; the names it sets are {', '.join(own)}")
        return dict(variables)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list | None = None, variables: dict | None = None,
                    continue_final_message: bool = False) -> str:
        """The chat template applied to ``messages`` (HF ``apply_chat_template(tokenize=False)``);
        ``variables``: more for the template (check_template_variables).
        ``continue_final_message``: the rendering ends with the last message's text (usually
        an assistant's, which the model continues: no end-of-turn after it)."""
        if continue_final_message:
            return self._render_continued(messages, tools, variables)
        if self.chat_template is None:
            raise InputError(f"{self.source or 'this model'}: the model has no chat template; "
                             "pass the prompt as plain text (--no-chat)")
        import jinja2
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise InputError("chat messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        template = self._compiled_template
        env = {**self.check_template_variables(variables), **self.special_tokens,
               "messages": list(messages), "add_generation_prompt": add_generation_prompt}
        if tools is not None:
            env["tools"] = tools
        try:
            return template.render(env)
        except jinja2.exceptions.TemplateError as e:
            raise InputError(f"{self.source or 'model'}: the chat template rejected the messages: {e}") from None
        # a message field of a type the template cannot use
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
            raise InputError(f"{self.source or 'model'}: the chat template cannot render the "
                             f"messages ({type(e).__name__}: {e})") from None

    def _render_continued(self, messages, tools, variables) -> str:
        """The rendering cut where the last message's text ends: a marker is appended to the
        text and the rendering cut at it (HF's way: a text that also occurs in the template's
        own markup, e.g. "<", is never mistaken for it); where the template trimmed the text,
        whitespace before the cut goes too."""
        last = messages[-1] if isinstance(messages, (list, tuple)) and messages else None
        if not isinstance(last, dict) or not isinstance(last.get("content"), str):
            raise InputError("continue_final_message needs a last message with text content "
                             "to continue")
        marker = f"kogcupy-continue-{os.urandom(6).hex()} "
        marked = list(messages[:-1]) + [{**last, "content": last["content"] + marker}]
        text = self.render_chat(marked, add_generation_prompt=False, tools=tools,
                                variables=variables)
        at = text.rfind(marker.rstrip())
        head = text[:at]
        if at < 0 or not head.rstrip().endswith(last["content"].strip()):
            raise InputError("continue_final_message: the chat template does not write the "
                             "last message's text as given, so it cannot be continued")
        return head if text.startswith(marker, at) else head.rstrip()

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (BOS only where the template writes it)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)

    @cached_property
    def _compiled_template(self):
        import jinja2
        try:
            return _jinja_env().from_string(self.chat_template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ModelLoadError(f"{self.source or 'model'}: invalid chat template "
                                 f"(line {e.lineno}): {e.message}") from None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """A HF model directory: tokenizer.json (+ tokenizer_config.json, generation_config.json, config.json)."""
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise ModelLoadError(f"{path}: no tokenizer.json (kogcupy needs the fast-tokenizer file; "
                                 "save it with tokenizer.save_pretrained() or copy it from the model repo)")
        try:
            tk = _HFTokenizer.from_file(tj)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ModelLoadError(f"{tj}: cannot be read by the tokenizers library: {e}") from None
        tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        # Older repos name their special tokens only in special_tokens_map.json.
        for k, v in _read_json(os.path.join(path, "special_tokens_map.json")).items():
            tcfg.setdefault(k, v)
        gcfg = _read_json(os.path.join(path, "generation_config.json"))
        mcfg = _read_json(os.path.join(path, "config.json"))

        def tok_id(entry):
            content = _token_content(entry)
            return None if content is None else tk.token_to_id(content)

        special = {k: _token_content(tcfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        special = {k: v for k, v in special.items() if v is not None}

        bos = tok_id(tcfg.get("bos_token"))
        if bos is None:
            bos = _first_int(gcfg.get("bos_token_id"), mcfg.get("bos_token_id"))
        prefix = _post_processor_prefix(tk)
        if bos is None and prefix:
            bos = prefix[0]
        if isinstance(tcfg.get("add_bos_token"), bool):
            add_bos = tcfg["add_bos_token"]
        else:
            add_bos = bos is not None and prefix[:1] == [bos]

        eos = []
        for entry in (tok_id(tcfg.get("eos_token")), gcfg.get("eos_token_id"), mcfg.get("eos_token_id"),
                      tcfg.get("kogcupy_eos_token_ids")):
            eos.extend(_int_list(entry))
        eos.extend(_chat_end_ids(tk))

        return cls(tk, bos_token_id=bos, eos_token_ids=eos, add_bos=add_bos,
                   chat_template=_dir_chat_template(path, tcfg), source=path, special_tokens=special,
                   sampling_defaults=_sampling_defaults(gcfg, os.path.join(path, "generation_config.json")))

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        """A GGUF file's tokenizer (``reader`` is a ``gguf.GGUFReader``): byte-level BPE ("gpt2") or
        SentencePiece BPE ("llama", e.g. Llama 2, Mistral, TinyLlama), tokenized as llama.cpp does."""
        source = str(getattr(getattr(reader, "data", None), "filename", None) or "GGUF file")

        def field(name, default=None):
            f = reader.fields.get(name)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind is None:
            raise ModelLoadError(f"{source}: no tokenizer in the GGUF metadata (tokenizer.ggml.model missing)")
        if kind not in ("gpt2", "llama"):
            raise UnsupportedModelError(f"{source}: GGUF tokenizer model {kind!r} is not supported (kogcupy reads "
                                        "byte-level BPE 'gpt2' and SentencePiece BPE 'llama'); "
                                        "use the model's HF directory")
        tokens = field("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(f"{source}: tokenizer.ggml.tokens is missing")
        types = field("tokenizer.ggml.token_type") or [_TT_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ModelLoadError(f"{source}: tokenizer.ggml.tokens and token_type differ in length")
        if kind == "gpt2":
            tk = _gguf_bytelevel_bpe(source, tokens, field("tokenizer.ggml.merges", []),
                                     field("tokenizer.ggml.pre", "default"))
        else:
            tk = _gguf_sentencepiece_bpe(source, tokens, types, field("tokenizer.ggml.scores"),
                                         field("tokenizer.ggml.merges"), field("tokenizer.ggml.unknown_token_id"),
                                         field("tokenizer.ggml.add_space_prefix", True))
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i, t in enumerate(types) if t in (_TT_CONTROL, _TT_UNKNOWN)])
        tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                       for i, t in enumerate(types) if t == _TT_USER_DEFINED])

        bos = field("tokenizer.ggml.bos_token_id")
        # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
        add_bos = bool(field("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
        if add_bos:
            # tokenizer.json alone then encodes like the model (and to_json_files round-trips).
            b = tokens[bos]
            tk.post_processor = processors.TemplateProcessing(
                single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, bos)])
        eos = [field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        eos = [i for i in eos if i is not None] + _chat_end_ids(tk)
        special = {}
        for k in ("bos", "eos", "unknown", "padding"):
            i = field(f"tokenizer.ggml.{k}_token_id")
            if i is not None and 0 <= i < len(tokens):
                special[{"unknown": "unk", "padding": "pad"}.get(k, k) + "_token"] = tokens[i]
        return cls(tk, bos_token_id=bos, eos_token_ids=eos, add_bos=add_bos,
                   chat_template=field("tokenizer.chat_template"), source=source, special_tokens=special)

    def to_json_files(self, dst_dir) -> None:
        """Write tokenizer.json + tokenizer_config.json into ``dst_dir`` (readable by ``from_dir``)."""
        dst_dir = os.fspath(dst_dir)
        os.makedirs(dst_dir, exist_ok=True)
        self._tk.save(os.path.join(dst_dir, "tokenizer.json"))
        cfg = {
            "add_bos_token": self.add_bos,
            "bos_token": self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None,
            "eos_token": self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
            # The full EOS set (GGUF eot/eom ids have no standard tokenizer_config key).
            "kogcupy_eos_token_ids": list(self.eos_token_ids),
        }
        for k in ("unk_token", "pad_token"):
            if k in self.special_tokens:
                cfg[k] = self.special_tokens[k]
        with open(os.path.join(dst_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
            f.write("\n")

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, add_bos={self.add_bos}, "
                f"eos={self.eos_token_ids}, chat_template={self.has_chat_template})")


class StreamDecoder:
    """Incremental detokenization that only ever emits complete characters.

    ``push(id)`` returns the new text (often ""), ``flush()`` whatever is left. The pieces
    concatenate to ``decode(all ids)``. Only a short window of ids is decoded per push: the
    ids since the last point where the text ended on a whole character, plus the ids of the
    previous such stretch as left context (some decoders, e.g. SentencePiece's, treat the
    first token of a decode differently), so the cost per token does not grow with the length
    of the generation.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tk = tokenizer._tk
        self._skip = skip_special_tokens
        self._ids: list[int] = []   # window: context ids [0, read) + pending ids [read, len)
        self._read = 0
        self._context_len = 0       # len(decode(self._ids[:self._read]))
        self._emitted = 0           # chars of the pending text already returned

    def _decode(self, ids):
        return self._tk.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        complete = not text.endswith("\ufffd")
        # A trailing U+FFFD is an incomplete byte sequence (or, rarely, a real U+FFFD that is
        # then emitted one push later): hold it back.
        stable = text if complete else text.rstrip("\ufffd")
        start = self._context_len + self._emitted
        piece = stable[start:] if len(stable) > start else ""
        self._emitted += len(piece)
        if complete:
            # Slide: the pending ids become the context for the next stretch.
            self._ids = self._ids[self._read:]
            self._read = len(self._ids)
            self._context_len = len(self._decode(self._ids))
            self._emitted = 0
        return piece

    def flush(self) -> str:
        text = self._decode(self._ids)
        start = self._context_len + self._emitted
        piece = text[start:] if len(text) > start else ""
        self._ids, self._read, self._context_len, self._emitted = [], 0, 0, 0
        return piece


# ---------------------------------------------------------------------- GGUF vocabularies


def _gguf_bytelevel_bpe(source, tokens, merges, pre) -> _HFTokenizer:
    if pre not in _GGUF_PRE:
        raise UnsupportedModelError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported "
                                    f"(known: {', '.join(sorted(_GGUF_PRE))}); use the model's HF directory")
    make_pre, make_norm, ignore_merges = _GGUF_PRE[pre]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False))
    if make_norm is not None:
        tk.normalizer = make_norm()
    tk.pre_tokenizer = make_pre()
    tk.decoder = decoders.ByteLevel()
    return tk


def _gguf_sentencepiece_bpe(source, tokens, types, scores, merges, unk_id, add_space_prefix) -> _HFTokenizer:
    """SentencePiece BPE as llama.cpp runs it: spaces become U+2581, one is prepended to each
    stretch of text (llama.cpp does so after every special token too), merges go best score
    first, unknown bytes fall back to the <0xNN> tokens."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        if scores is None or len(scores) != len(tokens):
            raise ModelLoadError(f"{source}: SentencePiece vocabulary without tokenizer.ggml.scores")
        skip = {t for t, ty in zip(tokens, types) if ty != _TT_NORMAL}
        pairs = _merges_from_scores(vocab, {t: s for t, s in zip(tokens, scores) if t not in skip}, skip)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tk = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)
    return tk


def _merges_from_scores(vocab: dict, scores: dict, skip: set) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a piece into two
    pieces, best-scoring merged piece first (transformers' ``generate_merges``)."""
    merges = []
    for piece, score in scores.items():
        local = []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                local.append((left, right, score))
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


# ---------------------------------------------------------------------- helpers


# what rendering sets (beside the special tokens): never a caller's template variable
TEMPLATE_OWN_VARIABLES = ("messages", "tools", "add_generation_prompt", "raise_exception",
                          "strftime_now")


def _jinja_env():
    """A jinja2 environment configured like transformers' ``apply_chat_template``."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


_SAMPLING_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
                    "repetition_penalty": float}


def _sampling_defaults(gcfg: dict, source: str) -> dict:
    """The sampling fields a generation_config.json sets (as vLLM's server reads them; do_sample
    is not consulted). A value that is not a number, or that the sampler would refuse, is left
    out with a warning: the model still loads and requests keep their own defaults."""
    out = {}
    for name, kind in _SAMPLING_FIELDS.items():
        v = gcfg.get(name)
        if v is None:
            continue
        what = "a whole number below 2^31" if kind is int else "a finite number below 2^31"
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or abs(v) >= 2**31
                or not math.isfinite(v) or (kind is int and v != int(v))):
            log.warning("%s: %s %.40r is not %s; not used as a default", source, name, v, what)
            continue
        try:
            SamplingParams(**{name: kind(v)})
        except (InputError, OverflowError) as e:
            log.warning("%s: %s; not used as a default", source, e)
            continue
        out[name] = kind(v)
    return out


def _read_json(path) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_content(entry) -> str | None:
    """tokenizer_config special tokens are a string or an AddedToken dict."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _int_list(entry) -> list[int]:
    if isinstance(entry, bool):
        return []
    if isinstance(entry, int):
        return [entry]
    if isinstance(entry, (list, tuple)):
        return [i for i in entry if isinstance(i, int) and not isinstance(i, bool)]
    return []


def _first_int(*entries) -> int | None:
    for e in entries:
        ids = _int_list(e)
        if ids:
            return ids[0]
    return None


def _chat_end_ids(tk: _HFTokenizer) -> list[int]:
    return [i for i in (tk.token_to_id(t) for t in CHAT_END_TOKENS) if i is not None]


def _post_processor_prefix(tk: _HFTokenizer) -> list[int]:
    """The ids tokenizer.json's post-processor puts in front of a single sequence."""
    plain = tk.encode("a", add_special_tokens=False).ids
    full = tk.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k]
    return []


def _dir_chat_template(path: str, tcfg: dict) -> str | None:
    tmpl = tcfg.get("chat_template")
    if isinstance(tmpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    if isinstance(tmpl, str) and tmpl:
        return tmpl
    # transformers >= 4.43 saves the template in its own file.
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read() or None
    tmpl = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
    return tmpl if isinstance(tmpl, str) and tmpl else None
