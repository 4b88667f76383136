"""The SSD NKI kernels without hardware (docs/kernels.md): layer A, the algorithm twin against the references with
every gradient; layer B, the real kernel source on the NumPy stand-in (tests/nki_standin) against the twin, with
trn1's tile limits enforced; layer C, the same comparison under ``neuronxcc.nki.simulate_kernel`` (marker
``nki_sim``; skipped where neuronxcc does not import)."""

import importlib.util
from pathlib import Path

import nki_standin
import numpy as np
import pytest
import torch

import bmojo.ops.ssd as ssd_pkg
from bmojo.configuration_bmojo import V0_OPTIONS
from bmojo.ops.ssd import ssd_ref
from bmojo.ops.ssd.nki_backend import ssd_nki, to_kernel_layout
from bmojo.ops.ssd.nki_twin import ssd_twin_bwd, ssd_twin_fwd, triangle

# core: also runs on the trn1 stack (torch 2.9), where a DLAMI's neuronxcc turns on the nki_sim cases.
pytestmark = pytest.mark.core

KERNEL_SOURCE = Path(ssd_pkg.__file__).with_name("nki.py")
TOL = {None: 5e-6, torch.bfloat16: 1.5e-2}  # max |err| / max |ref|: fp32, and bf16-rounded matmul operands


def make_inputs(batch=1, L=256, H=2, P=16, G=1, N=8, seed=0, init=True, dtype=torch.float64):
    """dt in (0.005, 0.2); A log-spaced over the heads from -0.02 (slow: a chunk decays by ~e^-0.3, so the
    carried state matters) to -4 (fast: ~e^-50)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    dt = (0.005 + 0.195 * torch.rand(batch, L, H, generator=g, dtype=torch.float64)).to(dtype)
    A = -torch.logspace(np.log10(0.02), np.log10(4.0), H, dtype=torch.float64).to(dtype)
    return dict(
        x=rn(batch, L, H, P),
        dt=dt,
        A=A,
        B=rn(batch, L, G, N),
        C=rn(batch, L, G, N),
        D=rn(H),
        initial_state=rn(batch, H, P, N) if init else None,
    )


def rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def scan_in_kernel_layout(u, a, bm, cm, s0):
    """Obvious reference for the kernels' own inputs: one step at a time, float64, differentiable."""
    state, ys = s0.transpose(-1, -2), []  # [b,H,P,N]
    for t in range(u.shape[2]):
        state = torch.exp(a[:, :, t, :, None]) * state + u[:, :, t, :, None] * bm[:, :, t, None, :]
        ys.append((state * cm[:, :, t, None, :]).sum(-1))
    return torch.stack(ys, dim=2), state.transpose(-1, -2)


def kernel_inputs(seed=0, **shape):
    inp = make_inputs(seed=seed, **shape)
    return [
        t.detach() for t in to_kernel_layout(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["initial_state"])
    ]


# ------------------------------------------------------------------------------ layer A: the twin


CASES = [dict(L=128), dict(L=384), dict(L=384, init=False), dict(L=256, H=3, P=32, N=16, G=1, batch=2)]


@pytest.mark.parametrize("mm_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-matmul"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_twin_matches_a_sequential_scan_outputs_states_and_every_gradient(shape, mm_dtype):
    u, a, bm, cm, s0 = (t.double().requires_grad_() for t in kernel_inputs(**shape))
    y_ref, s_ref = scan_in_kernel_layout(u, a, bm, cm, s0)
    g = torch.Generator().manual_seed(1)
    dy, ds = (
        torch.randn(y_ref.shape, generator=g, dtype=torch.float64),
        torch.randn(s_ref.shape, generator=g, dtype=torch.float64),
    )
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + (s_ref * ds).sum(), (u, a, bm, cm, s0))

    f32 = [t.detach().float() for t in (u, a, bm, cm, s0)]
    y, s = ssd_twin_fwd(*f32, mm_dtype=mm_dtype)
    grads = ssd_twin_bwd(*f32, dy.float(), ds.float(), mm_dtype=mm_dtype)
    tol = TOL[mm_dtype]
    errors = {"y": rel_err(y, y_ref), "state": rel_err(s, s_ref)}
    errors.update({f"d{n}": rel_err(g_, r) for n, g_, r in zip(("u", "a", "b", "c", "s0"), grads, grads_ref)})
    assert max(errors.values()) <= tol, errors
    if mm_dtype is not None:  # the rounding really happens: errors well above fp32's
        assert max(errors.values()) > 10 * TOL[None], errors


@pytest.mark.parametrize("init", [True, False])
def test_wrapper_matches_ssd_ref_on_every_input_gradient(monkeypatch, init):
    monkeypatch.setenv("BMOJO_NKI_STANDIN", "1")
    ref_in = {
        k: (v.requires_grad_() if v is not None else None) for k, v in make_inputs(L=384, H=4, G=2, init=init).items()
    }
    got_in = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in ref_in.items()}
    y_ref, s_ref = ssd_ref(**ref_in)
    y, s = ssd_nki(**got_in)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape and s.shape == s_ref.shape
    g = torch.Generator().manual_seed(2)
    dy, ds = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (y_ref, s_ref))
    names = [k for k, v in ref_in.items() if v is not None]
    g_ref = torch.autograd.grad((y_ref * dy).sum() + (s_ref * ds).sum(), [ref_in[k] for k in names])
    g_got = torch.autograd.grad((y * dy.float()).sum() + (s * ds.float()).sum(), [got_in[k] for k in names])
    errors = {"y": rel_err(y, y_ref), "state": rel_err(s, s_ref)}
    errors.update({f"d{k}": rel_err(a, b) for k, a, b in zip(names, g_got, g_ref)})
    assert max(errors.values()) <= 5 * TOL[None], errors


def test_zero_inputs_after_a_state_only_decay_it():
    """First-chunk and state-only paths: u = 0 leaves y = C exp(cs) S0 and S_final = exp(sum a) S0."""
    u, a, bm, cm, s0 = kernel_inputs(L=256)
    y, s = ssd_twin_fwd(torch.zeros_like(u).float(), a.float(), bm.float(), cm.float(), s0.float())
    y_ref, s_ref = scan_in_kernel_layout(torch.zeros_like(u), a, bm, cm, s0)
    assert rel_err(y, y_ref) <= TOL[None] and rel_err(s, s_ref) <= TOL[None]
    assert torch.allclose(s, (torch.exp(a.sum(2, keepdim=True)) * s0).float(), rtol=1e-4, atol=1e-30)


# ------------------------------------------------------------------------------ layers B and C: the kernel source


def _simulator():
    if importlib.util.find_spec("neuronxcc") is None:
        pytest.skip("neuronxcc does not import: the real NKI simulator ships only in the Neuron pip repository")
    from neuronxcc import nki

    import bmojo.ops.ssd.nki as kernels

    return kernels, nki.simulate_kernel


@pytest.fixture(params=["standin", pytest.param("simulator", marks=pytest.mark.nki_sim)])
def kernels(request):
    """(kernel module, simulate_kernel) on the stand-in (CI) or the real Beta-1 simulator (opt-in)."""
    if request.param == "simulator":
        return _simulator()
    return nki_standin.load_kernel_module(KERNEL_SOURCE), nki_standin.simulate_kernel


def _run(kernels, inputs, dy=None, ds=None):
    module, simulate = kernels
    arrays = [t.float().numpy() for t in inputs] + [triangle().numpy()]
    nb, nh = inputs[0].shape[:2]
    fwd = simulate(module.ssd_fwd_kernel[nb, nh], *arrays)
    if dy is None:
        return fwd, None
    bwd = simulate(module.ssd_bwd_kernel[nb, nh], *arrays, dy.numpy(), ds.numpy())
    return fwd, bwd


@pytest.mark.parametrize(
    "shape",
    [dict(L=128), dict(L=384, H=3, batch=2), dict(L=2048, P=64, N=128, init=False)],
    ids=["one-chunk", "three-chunks-grid-2x3", "preset-L2048-P64-N128-zero-state"],
)
def test_kernel_source_equals_the_twin(kernels, shape):
    inputs = [t.float() for t in kernel_inputs(**shape)]
    g = torch.Generator().manual_seed(3)
    y_t, s_t = ssd_twin_fwd(*inputs)
    dy, ds = torch.randn(y_t.shape, generator=g), torch.randn(s_t.shape, generator=g)
    twin = (y_t, s_t, *ssd_twin_bwd(*inputs, dy, ds))
    fwd, bwd = _run(kernels, inputs, dy, ds)
    for name, got, want in zip(("y", "state", "du", "da", "db", "dc", "ds0"), (*fwd, *bwd), twin):
        assert got.shape == tuple(want.shape), name
        assert rel_err(torch.from_numpy(np.asarray(got)), want) <= 1e-5, name


def test_standin_enforces_trn1_limits_on_the_kernel():
    standin = (nki_standin.load_kernel_module(KERNEL_SOURCE), nki_standin.simulate_kernel)
    with pytest.raises(nki_standin.LimitError, match="partition dim"):  # the state [N, P] on 160 partitions
        _run(standin, kernel_inputs(L=128, N=160))
    inputs = kernel_inputs(L=128, P=160)  # the forward fits (P is a free dim there); the backward transposes u
    with pytest.raises(nki_standin.LimitError, match="nc_transpose"):
        _run(standin, inputs, torch.zeros_like(inputs[0]).float(), torch.zeros_like(inputs[4]).float())


def test_standin_rules_each_fail_where_trn1_would():
    nl, nisa = nki_standin.language, nki_standin.isa
    sb = lambda *s: nl.ones(s, nl.float32, buffer=nl.sbuf)
    with pytest.raises(nki_standin.LimitError, match="M=129"):
        nisa.nc_matmul(sb(128, 129), sb(128, 4))
    with pytest.raises(nki_standin.LimitError, match="2-D SBUF tile"):  # operands straight from HBM
        nisa.nc_matmul(nki_standin.Tile(np.ones((4, 4), np.float32), "hbm"), sb(4, 4))
    with pytest.raises(nki_standin.LimitError, match="partition dim"):
        sb(129, 4)
    with pytest.raises(nki_standin.LimitError, match="N=513"):
        nisa.nc_matmul(sb(128, 4), sb(128, 513))
    with pytest.raises(nki_standin.LimitError, match="SBUF tile"):
        nisa.nc_matmul(nisa.nc_transpose(sb(4, 4)), sb(4, 4))
    with pytest.raises(nki_standin.LimitError, match="one 2048-byte bank"):
        nl.zeros((128, 513), nl.float32, buffer=nl.psum)
    banks = [nl.zeros((128, 512), nl.float32, buffer=nl.psum) for _ in range(8)]
    with pytest.raises(nki_standin.LimitError, match="9 PSUM banks"):
        banks.append(nl.zeros((128, 1), nl.float32, buffer=nl.psum))
    del banks
    with pytest.raises(nki_standin.LimitError, match="SBUF bytes"):
        [sb(128, 16 * 1024) for _ in range(4)]
    with pytest.raises(nki_standin.LimitError, match="copy PSUM"):
        nl.store(nki_standin.Tile(np.zeros((4, 4), np.float32), "hbm"), nisa.nc_transpose(sb(4, 4)))
    with pytest.raises(nki_standin.LimitError, match="partition dim"):
        nisa.tensor_reduce(np.add, sb(4, 4), axis=0)


# ---------------------------------------------------------------------- neuron/check_nki.py (hardware checklist)


def _check_nki(capsys, monkeypatch, *argv, **env):
    """Run neuron/check_nki.py in this process: (exit status, stdout)."""
    script = Path(__file__).resolve().parents[1] / "neuron" / "check_nki.py"
    spec = importlib.util.spec_from_file_location("check_nki", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    status = module.main(list(argv))
    return status, capsys.readouterr().out


def test_check_nki_budget_counts_the_kernel_source_work(capsys, monkeypatch):
    status, out = _check_nki(capsys, monkeypatch, "budget", "--heads", "2", "--length", "256")
    assert status == 0
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["forward", "backward"]
    # fwd per chunk: 2*128^3 (cumsum broadcast) is the largest single product, so the count is at least that
    assert float(lines[0].split()[1]) * 1e9 >= 2 * 2 * 2 * 128**3


def test_check_nki_op_compares_the_backend_with_the_chunked_path(capsys, monkeypatch):
    status, out = _check_nki(
        capsys,
        monkeypatch,
        "op",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--heads",
        "2",
        "--length",
        "256",
        "--repeat",
        "1",
        "--head-dim",
        "16",
        "--state",
        "16",
        BMOJO_NKI_STANDIN="1",
    )
    assert status == 0, out
    assert "check_nki: OK" in out and "dinitial_state" in out
    status, out = _check_nki(
        capsys, monkeypatch, "op", "--device", "cpu", "--length", "200", "--repeat", "1", BMOJO_NKI_STANDIN="1"
    )
    assert status == 1
    assert "refuses these inputs: sequence length 200 is not a multiple of 128" in out


def test_check_nki_attn_op_compares_the_backend_with_the_chunked_path(capsys, monkeypatch):
    status, out = _check_nki(
        capsys,
        monkeypatch,
        "attn-op",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--heads",
        "2",
        "--length",
        "256",
        "--head-dim",
        "16",
        "--window",
        "128",
        "--memory",
        "8",
        "--repeat",
        "1",
        BMOJO_NKI_STANDIN="1",
    )
    assert status == 0, out
    assert "check_nki: OK" in out and "dmemory.v" in out


def test_model_through_the_nki_backend_matches_the_chunked_model(monkeypatch):
    """The layer wiring: every SSM mixer and the B'MOJO layer's joint attention of a model with chunk 128 run the
    backend, with the same loss and parameter gradients as the chunked forms."""
    from bmojo import BMojoForCausalLM, preset_config
    from bmojo.ops import use_backend
    from bmojo.ops.attention import nki_backend as attention_backend
    from bmojo.ops.ssd import nki_backend

    monkeypatch.setenv("BMOJO_NKI_STANDIN", "1")
    calls = []
    apply = nki_backend.SSDCore.apply
    monkeypatch.setattr(nki_backend.SSDCore, "apply", lambda *a: calls.append(1) or apply(*a))
    attention_calls = []
    attention_apply = attention_backend.AttentionNKI.apply
    monkeypatch.setattr(
        attention_backend.AttentionNKI, "apply", lambda *a: attention_calls.append(1) or attention_apply(*a)
    )
    torch.manual_seed(0)
    # The original design (v0): the NKI attention kernel lacks the key-set biases and the self fading key that the
    # defaults turn on, and declines them (checked at the end)
    config = preset_config(
        "tiny", chunk_size=128, window_size=128, memory_size=8, num_hidden_layers=2, layers_block_type=["bmojo", "ssm"],
        **V0_OPTIONS,
    )
    model = BMojoForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (1, 256))

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = loss_and_grads()
    with use_backend("nki"):
        got_loss, got = loss_and_grads()
    assert len(calls) == 2  # both layers' SSM mixers
    assert len(attention_calls) == 1  # the B'MOJO layer (fading keys and eidetic memory on)
    assert torch.allclose(got_loss, want_loss, rtol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-4, name
    # With the defaults the B'MOJO layer's attention declines the NKI kernel (runs the chunked form), the SSMs do not
    del calls[:], attention_calls[:]
    torch.manual_seed(0)
    model = BMojoForCausalLM(preset_config(
        "tiny", chunk_size=128, window_size=128, memory_size=8, num_hidden_layers=2, layers_block_type=["bmojo", "ssm"]
    ))
    with use_backend("nki"):
        loss_and_grads()
    assert len(calls) == 2 and attention_calls == []
