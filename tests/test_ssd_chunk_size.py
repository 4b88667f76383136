"""``ssd_chunk_size``: the SSD scan's chunk, decoupled from the attention chunk; the model's result does not change."""

import pytest
import torch

import bmojo.ops.ssd.chunk as ssd_chunk
from bmojo import BMojoForCausalLM, preset_config
from bmojo.ops import registry

pytestmark = pytest.mark.core


def _loss_and_grads(config, ids):
    torch.manual_seed(0)
    model = BMojoForCausalLM(config).double()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_ssd_chunk_changes_the_scan_not_the_result(monkeypatch):
    ids = torch.randint(3, 64, (2, 37), generator=torch.Generator().manual_seed(1))
    base = preset_config("tiny", layers_block_type=["bmojo", "ssm"])
    logits, grads = _loss_and_grads(base, ids)

    chunks = []
    real = registry._TABLE[("ssd", "chunked")]

    def spy(x, dt, A, B, C, chunk_size=64, **kw):
        chunks.append(chunk_size)
        return real[0](x, dt, A, B, C, chunk_size, **kw)

    monkeypatch.setitem(registry._TABLE, ("ssd", "chunked"), (spy, real[1]))
    logits16, grads16 = _loss_and_grads(
        preset_config("tiny", layers_block_type=["bmojo", "ssm"], ssd_chunk_size=16), ids
    )
    assert chunks and set(chunks) == {16}, chunks  # the SSD ran with its own chunk (attention's is 4)
    torch.testing.assert_close(logits16, logits, rtol=1e-10, atol=1e-10)
    assert grads16.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads16[name], grads[name], rtol=1e-8, atol=1e-10, msg=name)


def test_default_is_the_attention_chunk():
    config = preset_config("tiny")
    assert config.ssd_chunk_size is None
    assert BMojoForCausalLM(config).model.layers[0].mixer.ssm.chunk_size == config.chunk_size


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_ssd_chunk_size_must_be_positive(bad):
    with pytest.raises(ValueError, match=f"ssd_chunk_size must be a positive integer, got {bad!r}"):
        preset_config("tiny", ssd_chunk_size=bad)


def test_ssd_chunk_module_is_the_one_dispatched():
    assert registry._TABLE[("ssd", "chunked")][0] is ssd_chunk.ssd_chunked
