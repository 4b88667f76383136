"""The op registry: one dispatch place, a per-call check, a fallback logged once."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from bmojo.ops import dispatch, registry, use_backend
from bmojo.ops.attention import bmojo_attention_chunked
from bmojo.errors import BMojoError
from bmojo.ops.ssd import nki_backend, ssd_chunked, ssd_ref


def test_backends_choose_the_forms_and_unknown_names_are_refused():
    assert dispatch("ssd") is ssd_chunked
    with use_backend("reference"):
        assert dispatch("ssd") is ssd_ref
    assert dispatch("ssd") is ssd_chunked
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with use_backend("cuda"):
            pass


def test_unsupported_inputs_fall_back_to_chunked_and_log_once(monkeypatch, caplog):
    monkeypatch.setattr(registry, "_TABLE", dict(registry._TABLE))
    monkeypatch.setattr(registry, "_warned", set())
    registry.register("ssd", "fake", supports=lambda x, *a, **k: x.dtype == torch.float64)(lambda *a, **k: "fake")
    x, dt, A = torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2), torch.zeros(2)
    B = C = torch.zeros(1, 3, 1, 5)
    with use_backend("fake"), caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert dispatch("ssd")(x.double(), dt, A, B, C, 2) == "fake"
        for _ in range(2):
            y, _ = dispatch("ssd")(x, dt, A, B, C, 2)  # float32: not supported -> the chunked form
            assert y.shape == x.shape
        assert dispatch("attention") is bmojo_attention_chunked  # no implementation at all
    assert len([r for r in caplog.records if "'ssd'" in r.message]) == 1
    assert len([r for r in caplog.records if "'attention'" in r.message]) == 1


def test_nki_backend_where_it_cannot_run_fails_with_one_line(monkeypatch):
    monkeypatch.delenv("BMOJO_NKI_STANDIN", raising=False)
    if nki_backend._neuron_platform() is None:
        pytest.skip("this machine can run the NKI kernels")
    with pytest.raises(registry.BackendUnavailable) as err:
        with use_backend("nki"):
            pass
    message = str(err.value)
    assert isinstance(err.value, BMojoError) and "\n" not in message  # the CLI prints it as one line, exit 2
    assert message.startswith("backend 'nki' cannot run here: ") and nki_backend._neuron_platform() in message
    monkeypatch.setattr(registry, "_active", "nki")  # as BMOJO_BACKEND=nki at import: refused at the first call
    with pytest.raises(registry.BackendUnavailable):
        dispatch("ssd")


def test_nki_backend_runs_supported_calls_and_logs_each_fallback_reason_once(monkeypatch, caplog):
    monkeypatch.setenv("BMOJO_NKI_STANDIN", "1")  # the torch twin stands in for the kernels
    monkeypatch.setattr(registry, "_warned", set())
    calls = []
    apply = nki_backend.SSDCore.apply
    monkeypatch.setattr(nki_backend.SSDCore, "apply", lambda *a: calls.append(1) or apply(*a))

    def inputs(L, dtype=torch.float32, P=4, N=8):
        return (
            torch.randn(1, L, 2, P, dtype=dtype),
            torch.rand(1, L, 2, dtype=dtype),
            -torch.rand(2, dtype=dtype),
            torch.randn(1, L, 1, N, dtype=dtype),
            torch.randn(1, L, 1, N, dtype=dtype),
        )

    with use_backend("nki"), caplog.at_level(logging.WARNING, logger=registry.__name__):
        args = inputs(256)
        y, _ = dispatch("ssd")(*args, 128)
        assert calls == [1] and torch.allclose(y, ssd_chunked(*args, 128)[0], atol=1e-4)
        assert not caplog.records
        for case, why in (
            ((inputs(100), 128), "sequence length 100 is not a multiple of 128"),
            ((inputs(128), 64), "chunk_size 64: the kernels use 128"),
            ((inputs(128, torch.float64), 128), "dtype torch.float64: the kernels take float32 or bfloat16"),
            ((inputs(128, P=130), 128), "head dim 130 / state size 8 over 128"),
        ):
            caplog.clear()
            monkeypatch.setattr(registry, "_warned", set())
            for _ in range(2):
                y, _ = dispatch("ssd")(*case[0], case[1])
            assert calls == [1], why  # the chunked form ran
            assert [r.message for r in caplog.records] == [
                f"backend 'nki' does not support these inputs ({why}) for op 'ssd'; running the 'chunked' form"
            ]


def test_nothing_imports_neuronxcc_unless_a_kernel_runs():
    code = (
        "import sys, torch; from bmojo.ops import dispatch, use_backend; from bmojo.ops.ssd import ssd_nki; "
        "import bmojo.modeling_bmojo; print(sorted(m for m in sys.modules if m.startswith('neuronxcc')))"
    )
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src"), "BMOJO_BACKEND": "nki"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_nki_attention_verifier_names_each_refusal(monkeypatch):
    from bmojo.ops.attention import supports_attention_nki
    from bmojo.ops.selection.common import EideticMemory

    monkeypatch.setenv("BMOJO_NKI_STANDIN", "1")

    def call(L=256, W=128, chunk=128, D=16, M=8, fading=True, memory=True, key_mask=None, dtype=torch.float32):
        q = torch.zeros(1, L, 2, D, dtype=dtype)
        mem = EideticMemory(
            torch.zeros(1, L // chunk, M, 2, D),
            torch.zeros(1, L // chunk, M, 2, D),
            torch.zeros(1, L // chunk, M, dtype=torch.long),
            torch.zeros(1, L // chunk, M),
        )
        return supports_attention_nki(
            q,
            q,
            q,
            W,
            chunk,
            q if fading else None,
            q if fading else None,
            q,
            mem if memory else None,
            key_mask=key_mask,
        )

    assert call() is True
    assert call(key_mask=torch.ones(1, 256, dtype=torch.bool)) == "a key padding mask (the kernels take none)"
    assert (
        call(memory=False)
        == call(fading=False)
        == ("no fading keys or no eidetic memory (the kernels score all three key sets)")
    )
    assert call(chunk=64) == "chunk_size 64: the kernels use 128"
    assert call(W=192) == "sequence length 256 / window 192 not a positive multiple of 128"
    assert call(M=129) == "head dim 16 / memory size 129 over 128"
    assert call(dtype=torch.float64) == "dtype torch.float64: the kernels take float32 or bfloat16"
    monkeypatch.delenv("BMOJO_NKI_STANDIN")
    if nki_backend._neuron_platform() is not None:
        assert call() == nki_backend._neuron_platform()
