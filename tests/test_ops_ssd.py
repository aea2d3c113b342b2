"""The recurrence's forms agree: materialised matrix, step loop, chunked scan (and fla's kernels on GPU)."""

import logging

import pytest
import torch
import torch.nn.functional as F

from radistill.ops.ssd import segsum, ssd, ssd_chunk, ssd_fla, ssd_matrix, ssd_naive, ssd_recurrent, ssd_step
from radistill.utils.errors import RadistillError

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}  # of the reference's max |value|


def make_inputs(B=2, T=37, H=3, N=5, P=4, dtype=torch.float32, device="cpu", strong_decay=False, grad=False):
    """x, log_a (<= 0, a spread from ~0 to strong decays), b, c, initial state: float64 masters cast to dtype."""
    g = torch.Generator().manual_seed(T * 1000 + N)
    log_a = -F.softplus(torch.randn(B, T, H, generator=g, dtype=torch.float64) * 2)
    if strong_decay:
        log_a = log_a * 20  # cumulative sums reach -1e4: nothing may overflow
    tensors = [
        torch.randn(B, T, H, P, generator=g, dtype=torch.float64), log_a,
        torch.randn(B, T, H, N, generator=g, dtype=torch.float64) / N**0.5,
        torch.randn(B, T, H, N, generator=g, dtype=torch.float64) / N**0.5,
        torch.randn(B, H, N, P, generator=g, dtype=torch.float64),
    ]
    return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in tensors]


def assert_close(actual, expected, dtype):
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual.to(expected.dtype) - expected).abs().max()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} vs tolerance {TOL[dtype] * scale:.3g}"


def outputs_and_grads(fn, inputs, seed=1):
    """fn's (y, final_state) and the gradients of a random linear loss of both w.r.t. every input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y, final = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)).sum()
    loss = loss + (final.double() * torch.randn(final.shape, generator=g, dtype=torch.float64).to(y.device)).sum()
    loss.backward()
    return [y, final] + [t.grad for t in inputs]


def test_segsum_and_matrix_match_definition():
    x, log_a, b, c, _ = make_inputs(B=1, T=6, H=2, N=3, P=2, dtype=torch.float64)
    M = ssd_matrix(log_a, b, c)
    for t in range(6):
        for s in range(6):
            want = torch.exp(log_a[0, s + 1 : t + 1].sum(0)) * (c[0, t] * b[0, s]).sum(-1) * (s <= t)
            torch.testing.assert_close(M[0, :, t, s], want, rtol=1e-12, atol=1e-12)
    assert torch.isneginf(segsum(log_a[0, :, 0])).sum() == 15  # strictly above the diagonal


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("T", "chunk"), [(1, 4), (5, 4), (37, 8), (37, 16), (64, 64), (70, 32)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_equals_loop_and_matrix_outputs_and_grads(dtype, T, chunk, with_state):
    x, log_a, b, c, h0 = make_inputs(T=T, dtype=dtype)

    inputs = [x, log_a, b, c] + ([h0] if with_state else [])
    reference = outputs_and_grads(ssd_naive, inputs)
    for fn in (ssd_recurrent, lambda *t: ssd_chunk(*t, chunk_size=chunk)):
        for actual, expected in zip(outputs_and_grads(fn, inputs), reference):
            assert_close(actual, expected, dtype)


def test_chunk_bf16_against_fp32_oracle():
    x, log_a, b, c, h0 = make_inputs(B=2, T=100, H=4, N=8, P=16, dtype=torch.bfloat16)
    wide = [t.float() for t in (x, log_a, b, c, h0)]
    got = outputs_and_grads(lambda *t: ssd_chunk(*t, chunk_size=32), [x, log_a, b, c, h0])
    want = outputs_and_grads(ssd_naive, wide)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for actual, expected in zip(got, want):
        assert_close(actual, expected, torch.bfloat16)


def test_strong_decay_is_stable():
    x, log_a, b, c, h0 = make_inputs(T=300, dtype=torch.float32, strong_decay=True)
    assert log_a.sum(1).min() < -1000
    got = outputs_and_grads(lambda *t: ssd_chunk(*t, chunk_size=64), [x, log_a, b, c, h0])
    want = outputs_and_grads(ssd_naive, [t.double() for t in (x, log_a, b, c, h0)])
    for actual, expected in zip(got, want):
        assert torch.isfinite(actual).all()
        assert_close(actual, expected, torch.float32)


def test_chunk_compiles_as_one_graph():
    """torch.compile traces the scan, forward and backward, without graph breaks (aot_eager: no C++ toolchain)."""
    compiled = torch.compile(ssd_chunk, fullgraph=True, backend="aot_eager")
    inputs = make_inputs(T=50, dtype=torch.float32)
    got = outputs_and_grads(lambda *t: compiled(*t, chunk_size=16), inputs)
    for actual, expected in zip(got, outputs_and_grads(ssd_naive, inputs)):
        assert_close(actual, expected, torch.float32)


def mamba_style_oracle(X, A, B, C, block_len, initial_states):
    """An independent oracle in mamba_ssm's ssd_minimal conventions (X [b,l,h,p], A [b,l,h] log-decays,
    B/C [b,l,h,n], state [b,h,p,n]): block-diagonal part, per-block states, state passing, state-to-output."""
    b_, l, h, p = X.shape
    cb = l // block_len
    X, B, C = (t.reshape(b_, cb, block_len, h, -1) for t in (X, B, C))
    A = A.reshape(b_, cb, block_len, h).permute(0, 3, 1, 2)  # b h c l
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    states = torch.cat([initial_states[:, None], states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, new_states[:, :-1], torch.exp(A_cumsum))
    return (Y_diag + Y_off).reshape(b_, l, h, p), new_states[:, -1]


def test_matches_mamba_style_oracle():
    x, log_a, b, c, h0 = make_inputs(T=48, dtype=torch.float64)
    y, final = ssd_chunk(x, log_a, b, c, h0, chunk_size=8)
    y_m, final_m = mamba_style_oracle(x, log_a, b, c, 16, h0.transpose(-1, -2))
    torch.testing.assert_close(y, y_m)
    torch.testing.assert_close(final, final_m.transpose(-1, -2))


def test_step_continues_a_prefix():
    x, log_a, b, c, h0 = make_inputs(T=9, dtype=torch.float64)
    y_all, final_all = ssd_naive(x, log_a, b, c, h0)
    _, h = ssd_chunk(x[:, :8], log_a[:, :8], b[:, :8], c[:, :8], h0, chunk_size=4)
    y_last, h = ssd_step(x[:, 8], log_a[:, 8], b[:, 8], c[:, 8], h)
    torch.testing.assert_close(y_last, y_all[:, 8])
    torch.testing.assert_close(h, final_all)


def test_dispatch_on_cpu():
    x, log_a, b, c, h0 = make_inputs(T=20, dtype=torch.float64)
    y_ref, f_ref = ssd_naive(x, log_a, b, c, h0)
    for backend in ("auto", "torch"):
        y, f = ssd(x, log_a, b, c, h0, backend=backend, chunk_size=8)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(f, f_ref)
    y1, f1 = ssd(x[:, :1], log_a[:, :1], b[:, :1], c[:, :1])  # one token: the step form, from a zero state
    torch.testing.assert_close(y1, ssd_naive(x[:, :1], log_a[:, :1], b[:, :1], c[:, :1])[0])
    with pytest.raises(RadistillError, match="one of auto, torch, fla"):
        ssd(x, log_a, b, c, backend="triton")
    with pytest.raises(RadistillError, match="CUDA"):
        ssd(x, log_a, b, c, backend="fla")


@pytest.mark.parametrize("installed, backward_ok, backend, needs_grad, want", [
    (True, True, "auto", True, "fla"), (True, False, "auto", False, "fla"), (True, False, "auto", True, "torch"),
    (True, False, "fla", True, "fla-recurrent"), (False, True, "auto", True, "torch"), (True, True, "torch", True, "torch"),
])
def test_backend_plan_is_one_constant_inside_compiled_code(monkeypatch, installed, backward_ok, backend, needs_grad,
                                                           want):
    """``plan`` (what a CUDA call of ``ssd`` runs) traces as a constant: a compiled layer keeps one graph however
    the checks and the fallback log line behind it go (fullgraph raises on any break). Decided on the CPU as for a GPU."""
    import radistill.ops.ssd as ops

    monkeypatch.setattr(ops, "fla_installed", lambda: installed)
    monkeypatch.setattr(ops, "chunk_backward_ok", lambda device: backward_ok)
    cuda = torch.device("cuda")
    assert ops.plan(backend, cuda, needs_grad) == want

    def choose(x):
        return x + len(ops.plan(backend, cuda, needs_grad))

    torch._dynamo.reset()  # the answer is baked into the graph: a graph of another case must not be reused
    assert torch.compile(choose, fullgraph=True, backend="eager")(torch.zeros(1)).item() == len(want)


# ---- GPU: fla's kernels and the compiled scan against the PyTorch path (bf16 tolerances) -------------------------


def gpu_inputs(N):
    return make_inputs(B=2, T=300, H=4, N=N, P=64, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("N", [8, 64])
@pytest.mark.parametrize("recurrent", [False, True])
def test_fla_matches_torch_forward_and_backward(N, recurrent):
    pytest.importorskip("fla")
    from radistill.ops.ssd.fla import chunk_backward_ok

    inputs = gpu_inputs(N)
    want = outputs_and_grads(ssd_naive, [t.float() for t in inputs])
    if not recurrent and not chunk_backward_ok(inputs[0].device):
        with torch.no_grad():
            got = ssd_fla(*inputs)
        want = want[:2]
    else:
        got = outputs_and_grads(lambda *t: ssd_fla(*t, recurrent=recurrent), inputs)
    for actual, expected in zip(got, want):
        assert_close(actual, expected, torch.bfloat16)


@pytest.mark.gpu
def test_compiled_chunk_and_auto_dispatch_on_gpu(caplog):
    inputs = gpu_inputs(16)
    want = outputs_and_grads(ssd_naive, [t.float() for t in inputs])
    with caplog.at_level(logging.WARNING, logger="radistill.ops.ssd"):
        for _ in range(2):
            got = outputs_and_grads(lambda *t: ssd(*t, backend="auto"), inputs)
            for actual, expected in zip(got, want):
                assert_close(actual, expected, torch.bfloat16)
    assert len(caplog.records) <= 1  # at most one fallback message, however often it falls back
    # inside a compiled layer: where training takes the PyTorch scan (Hopper, Triton < 3.7.1), one graph, dispatch
    # included (fla's own kernels are not ours to make traceable); under no_grad (fla's chunked kernel) the values
    torch._dynamo.reset()
    from radistill.ops.ssd import plan

    if plan("auto", inputs[0].device, True) == "torch":
        whole = torch.compile(lambda *t: ssd(*t, backend="auto"), fullgraph=True)
        for actual, expected in zip(outputs_and_grads(whole, inputs), want):
            assert_close(actual, expected, torch.bfloat16)
    with torch.no_grad():
        assert_close(torch.compile(lambda *t: ssd(*t, backend="auto"))(*inputs)[0], want[0], torch.bfloat16)


def test_wide_is_promotion_with_float32():
    from radistill.ops.ssd.naive import wide

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool):
        assert wide(dtype) == torch.promote_types(dtype, torch.float32), dtype


def test_torch_below_threshold_sends_short_auto_calls_to_the_torch_scan(monkeypatch):
    """RADISTILL_SSD_TORCH_BELOW: with backend "auto", calls shorter than it skip fla's kernels for the chunked
    PyTorch scan; longer calls and an explicit "fla" keep fla; unset keeps fla; a bad value is a clear error.
    fla is stood in for by a recorder (plan decided as on a GPU with fla)."""
    import radistill.ops.ssd as ops

    calls = []

    def fake_fla(x, *args, **kwargs):
        calls.append(x.shape[1])
        return ssd_chunk(x, *args[:4])

    monkeypatch.setattr(ops, "plan", lambda backend, device, needs_grad: "fla")
    monkeypatch.setattr(ops, "ssd_fla", fake_fla)
    x, log_a, b, c, _ = make_inputs(T=12)
    reference = ssd_naive(x, log_a, b, c)[0]
    monkeypatch.delenv(ops.TORCH_BELOW_ENV, raising=False)
    ops.ssd(x, log_a, b, c)
    assert calls == [12]
    monkeypatch.setenv(ops.TORCH_BELOW_ENV, "13")
    y, _ = ops.ssd(x, log_a, b, c)
    assert calls == [12]  # the torch path served it
    torch.testing.assert_close(y, reference)
    ops.ssd(x, log_a, b, c, backend="fla")
    monkeypatch.setenv(ops.TORCH_BELOW_ENV, "12")
    ops.ssd(x, log_a, b, c)
    assert calls == [12, 12, 12]
    monkeypatch.setenv(ops.TORCH_BELOW_ENV, "many")
    with pytest.raises(RadistillError, match="RADISTILL_SSD_TORCH_BELOW='many' is not a token count"):
        ops.ssd(x, log_a, b, c)
    # inside compiled code the threshold is one constant: no graph break (fullgraph raises on any)
    monkeypatch.setenv(ops.TORCH_BELOW_ENV, "7")
    torch._dynamo.reset()
    assert torch.compile(lambda t: t + ops.torch_below(), fullgraph=True, backend="eager")(torch.zeros(1)).item() == 7
