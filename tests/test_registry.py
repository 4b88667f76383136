"""The op registry: one dispatch place, a per-call check, a fallback logged once."""

import logging

import pytest
import torch

from bmojo.ops import dispatch, registry, use_backend
from bmojo.ops.attention import bmojo_attention_chunked
from bmojo.ops.ssd import ssd_chunked, ssd_ref


def test_backends_choose_the_forms_and_unknown_names_are_refused():
    assert dispatch("ssd") is ssd_chunked
    with use_backend("reference"):
        assert dispatch("ssd") is ssd_ref
    assert dispatch("ssd") is ssd_chunked
    with pytest.raises(ValueError, match="unknown backend 'nki'"):
        with use_backend("nki"):
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
