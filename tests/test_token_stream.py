"""The host side of a monokernel launch, on a stand-in backend (no GPU): how the token stream
reads the kernel's host-mapped words, and what it does with a residual-sum overflow."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kogcupy.errors import DeviceError
from kogcupy.gpu import abi
from kogcupy.gpu.monokernel import MonokernelTokenStream

CODE = {n: c for c, n in abi.FINISH_CODES.items() if n}


class FakeBackend:
    """What MonokernelTokenStream uses of a backend: the host-mapped words as the kernel left
    them after an ended launch, and the overflow counter."""

    def __init__(self, tokens, code, overflowed=False):
        self._ctl = SimpleNamespace(u32=np.array([len(tokens), CODE[code], 0, 0], np.uint32))
        self._host_tokens = SimpleNamespace(i32=np.array(list(tokens) + [-1] * 8, np.int32))
        self._stream = SimpleNamespace(done=True)
        self.watchdog_s = 5.0
        self.over = overflowed
        self.forgot = False
        self._active = None

    def _wait_idle(self):
        pass

    def _forget_kv(self):
        self.forgot = True

    def _overflowed(self):
        return self.over


def stream(b):
    s = MonokernelTokenStream(b, 3, 0.0)
    b._active = s
    return s


def test_tokens_then_the_finish_reason():
    b = FakeBackend([5, 6, 7], "eos")
    s = stream(b)
    assert list(s) == [5, 6, 7] and s.finish_reason == "eos" and not b.forgot


def test_overflow_code_yields_no_further_token():
    # the kernel published a token with FINISH_OVERFLOW: it was made from lost values
    b = FakeBackend([5, 6], "overflow", overflowed=True)
    s = stream(b)
    with pytest.raises(DeviceError, match="residual stream"):
        next(s)
    assert s.finish_reason == "overflow" and b.forgot


@pytest.mark.parametrize("code", ["eos", "length", "cancelled"])
def test_overflow_counter_makes_any_ending_an_error(code):
    # the sampler ended on another reason first, or the overflow came in the last step
    b = FakeBackend([5, 6], code, overflowed=True)
    s = stream(b)
    got = []
    with pytest.raises(DeviceError, match="residual stream"):
        for t in s:
            got.append(t)
    assert got == [5, 6] and s.finish_reason == "overflow" and b.forgot
