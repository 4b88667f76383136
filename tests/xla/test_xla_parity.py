"""The same model on XLA (CPU backend) and in eager CPU mode computes the same numbers (fp32)."""

import copy

import pytest

pytestmark = pytest.mark.xla  # needs torch-xla: run by the XLA tier (scripts/test.sh)

torch_xla = pytest.importorskip("torch_xla")

import torch  # noqa: E402

from bmojo import xla_audit as xa  # noqa: E402
from bmojo import BMojoForCausalLM  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(3)
    cpu = BMojoForCausalLM(xa.audit_config())
    return cpu, xa.to_xla(copy.deepcopy(cpu))


@pytest.fixture(scope="module")
def ids():
    return xa.random_ids(torch.Generator().manual_seed(4), xa.audit_config().vocab_size)


def _on_cpu(t):
    return t.detach().cpu()


def test_forward_loss_and_gradients_match_cpu(models, ids):
    cpu, xla = models
    expect = cpu.train()(ids, labels=ids)
    expect.loss.backward()
    got = xla.train()(ids.to(xa.device()), labels=ids.to(xa.device()))
    got.loss.backward()
    torch_xla.sync()
    torch.testing.assert_close(_on_cpu(got.logits), expect.logits.detach(), **TOL)
    for name in ("loss", "lm_loss", "innovation_loss"):
        torch.testing.assert_close(_on_cpu(getattr(got, name)), getattr(expect, name).detach(), **TOL, msg=name)
    grads = dict(xla.named_parameters())
    for name, p in cpu.named_parameters():
        torch.testing.assert_close(_on_cpu(grads[name].grad), p.grad, **TOL, msg=f"gradient of {name}")


def test_decode_logits_match_cpu(models, ids):
    """Prefill, then teacher-forced single-token steps across chunk boundaries and memory merges."""
    cpu, xla = models
    cpu.eval(), xla.eval()
    with torch.no_grad():
        cpu_out = cpu(ids[:, : xa.PREFILL], use_cache=True)
        xla_out = xla(ids[:, : xa.PREFILL].to(xa.device()), use_cache=True)
        torch_xla.sync()  # the prefill graph alone, as in real decoding (then each step is the one decode graph)
        torch.testing.assert_close(_on_cpu(xla_out.logits), cpu_out.logits, **TOL, msg="prefill")
        cpu_cache, xla_cache = cpu_out.cache, xla_out.cache
        for t in range(xa.PREFILL, ids.shape[1]):
            expect = cpu(ids[:, t : t + 1], cache=cpu_cache).logits
            got = xla(ids[:, t : t + 1].to(xa.device()), cache=xla_cache).logits
            torch_xla.sync()
            torch.testing.assert_close(_on_cpu(got), expect, **TOL, msg=f"decode step at position {t}")
        torch.testing.assert_close(_on_cpu(xla_cache.positions), cpu_cache.positions)


def test_left_padded_prefill_and_decode_match_cpu(models, ids):
    """A left-padded batch (as ``generate`` builds it): real positions of the prefill, then decode steps."""
    cpu, xla = models
    cpu.eval(), xla.eval()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    split = xa.LENGTH - 6
    with torch.no_grad():
        cpu_out = cpu(ids[:, :split], attention_mask=mask[:, :split], use_cache=True)
        xla_out = xla(ids[:, :split].to(xa.device()), attention_mask=mask[:, :split].to(xa.device()), use_cache=True)
        torch_xla.sync()
        real = mask[:, :split].bool()
        torch.testing.assert_close(_on_cpu(xla_out.logits)[real], cpu_out.logits[real], **TOL, msg="prefill")
        cpu_cache, xla_cache = cpu_out.cache, xla_out.cache
        for t in range(split, xa.LENGTH):
            expect = cpu(ids[:, t : t + 1], cache=cpu_cache).logits
            got = xla(ids[:, t : t + 1].to(xa.device()), cache=xla_cache).logits
            torch_xla.sync()
            torch.testing.assert_close(_on_cpu(got), expect, **TOL, msg=f"decode step at position {t}")


def test_random_scores_memory_and_logits_match_cpu():
    """``selection_score="random"`` hashes (layer, position, token id) with 31-bit-masked integer ops: on XLA the
    scores are the CPU's bit for bit, and a left-padded prefill then decode steps keep the CPU's memory (exact slot
    positions) and logits."""
    from bmojo.layers.eidetic import random_score

    g = torch.Generator().manual_seed(5)
    positions, token_ids = torch.arange(512)[None], torch.randint(0, 50_000, (3, 512), generator=g)
    got = random_score(1, positions.to(xa.device()), token_ids.to(xa.device()))
    torch.testing.assert_close(_on_cpu(got), random_score(1, positions, token_ids), rtol=0, atol=0)
    torch.manual_seed(3)
    cpu = BMojoForCausalLM(xa.audit_config(selection_score="random", memory_size=2)).eval()
    xla = xa.to_xla(copy.deepcopy(cpu)).eval()
    ids = xa.random_ids(g, cpu.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    split = xa.LENGTH - 4
    with torch.no_grad():
        cpu_cache = cpu(ids[:, :split], attention_mask=mask[:, :split], use_cache=True).cache
        xla_cache = xla(ids[:, :split].to(xa.device()), attention_mask=mask[:, :split].to(xa.device()),
                        use_cache=True).cache  # fmt: skip
        torch_xla.sync()
        for t in range(split, xa.LENGTH):
            expect = cpu(ids[:, t : t + 1], cache=cpu_cache).logits
            got = xla(ids[:, t : t + 1].to(xa.device()), cache=xla_cache).logits
            torch_xla.sync()
            torch.testing.assert_close(_on_cpu(got), expect, **TOL, msg=f"decode step at position {t}")
    want, have = cpu_cache.layers[0].eidetic, xla_cache.layers[0].eidetic
    assert torch.equal(_on_cpu(have.mem_pos), want.mem_pos) and torch.equal(_on_cpu(have.mem_score), want.mem_score)
