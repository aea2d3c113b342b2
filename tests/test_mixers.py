"""The DiscreteMamba2 mixer: its init from attention, cached decoding, padding, and the mixer registry."""

import math

import pytest
import torch

from radistill.hybrid.mixers import MIXERS, DiscreteMamba2, RecurrentMixer, get_mixer
from radistill.hybrid.mixers.discrete_mamba2 import Z_OPEN, score_factors
from radistill.utils.errors import RadistillError

HIDDEN, HEADS, HEAD_DIM = 32, 4, 16


def attention_weights(kv_heads=HEADS, bias=False, dtype=torch.float64):
    """q/k/v weights [heads, head_dim, hidden] as the builder passes them (GQA: K/V rows repeated per query head)."""
    g = torch.Generator().manual_seed(7)
    group = HEADS // kv_heads
    q = torch.randn(HEADS, HEAD_DIM, HIDDEN, generator=g, dtype=dtype) / HIDDEN**0.5
    k, v = (torch.randn(kv_heads, HEAD_DIM, HIDDEN, generator=g, dtype=dtype).repeat_interleave(group, 0) / HIDDEN**0.5
            for _ in range(2))
    biases = [torch.randn(HEADS, HEAD_DIM, generator=g, dtype=dtype) if bias else None for _ in range(3)]
    return (q, k, v), biases


def trained_like(mixer):
    """Perturb every parameter off its init (a mixer mid-training: selective decay, gate, conv, D, biases)."""
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mixer


def make_mixer(state_size=8, dtype=torch.float64, **settings):
    (q, k, v), _ = attention_weights(dtype=dtype)
    return trained_like(DiscreteMamba2.from_attention(HIDDEN, q, k, v, state_size=state_size, **settings))


def test_registry():
    assert MIXERS["discrete_mamba2"] is DiscreteMamba2 and get_mixer("discrete_mamba2") is DiscreteMamba2
    assert issubclass(DiscreteMamba2, RecurrentMixer)
    with pytest.raises(RadistillError, match="unknown mixer 'mamba9'.*discrete_mamba2"):
        get_mixer("mamba9")


@pytest.mark.parametrize("settings", [{"state_size": 0}, {"conv_width": 0}, {"backend": "cuda"},
                                      {"min_half_life": 10.0, "max_half_life": 5.0}])
def test_bad_settings(settings):
    with pytest.raises(RadistillError):
        DiscreteMamba2(HIDDEN, HEADS, HEAD_DIM, **settings)


def test_from_attention_checks_shapes():
    (q, k, v), _ = attention_weights()
    with pytest.raises(RadistillError, match="k_weight"):
        DiscreteMamba2.from_attention(HIDDEN, q, k[:2], v)
    with pytest.raises(RadistillError, match="hidden_size"):
        DiscreteMamba2.from_attention(HIDDEN + 1, q, k, v)
    with pytest.raises(RadistillError, match="q_bias"):
        DiscreteMamba2.from_attention(HIDDEN, q, k, v, q_bias=torch.zeros(HEADS))


@pytest.mark.parametrize(("kv_heads", "state_size"), [(4, 16), (2, 16), (1, 8), (2, 24), (4, 8)])
def test_from_attention_shapes_and_rows(kv_heads, state_size):
    (q, k, v), _ = attention_weights(kv_heads=kv_heads, dtype=torch.float32)
    m = DiscreteMamba2.from_attention(HIDDEN, q, k, v, state_size=state_size)
    N, P = state_size, HEAD_DIM
    assert m.in_proj.weight.shape == (HEADS * (2 * P + 2 * N + 1), HIDDEN) and m.in_proj.weight.dtype == torch.float32
    assert m.conv1d.weight.shape == (HEADS * (P + 2 * N), 1, 4)
    w = m.in_proj.weight.view(-1, HIDDEN)
    torch.testing.assert_close(w[m._rows("x")], v.reshape(-1, HIDDEN))
    if N >= P:
        b_rows = w[m._rows("b")].view(HEADS, N, HIDDEN)
        torch.testing.assert_close(b_rows[:, :P], k)
        assert not b_rows[:, P:].any()
        torch.testing.assert_close(w[m._rows("c")].view(HEADS, N, HIDDEN)[:, :P], q / math.sqrt(P))
    y, _ = m(torch.randn(2, 7, HIDDEN))
    assert y.shape == (2, 7, HEADS, HEAD_DIM)


def test_low_rank_init_is_the_best_rank_n_score():
    (q, k, _), _ = attention_weights(dtype=torch.float64)
    c, b = score_factors(q, k, 8)
    full = q.transpose(1, 2) @ k
    err = torch.linalg.matrix_norm(full - c.transpose(1, 2) @ b)
    tail = torch.linalg.svdvals(full)[:, 8:].pow(2).sum(-1).sqrt()  # Eckart-Young: the smallest possible error
    torch.testing.assert_close(err, tail)
    assert c.shape == b.shape == (HEADS, 8, HIDDEN)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("state_size", [HEAD_DIM, HEAD_DIM + 8])
def test_init_is_exactly_causal_linear_attention(bias, state_size):
    """Decay forced to 1, gate 1 and D 0 (the init's own): y_t = sum_{s<=t} (q_t·k_s / sqrt(d)) v_s, exactly."""
    (q, k, v), (qb, kb, vb) = attention_weights(kv_heads=2, bias=bias)
    m = DiscreteMamba2.from_attention(HIDDEN, q, k, v, qb, kb, vb, state_size=state_size)
    with torch.no_grad():
        m.in_proj.bias[m._rows("a")] = -1e4  # softplus(-1e4) = 0: a_t = 1
    u = torch.randn(2, 11, HIDDEN, dtype=torch.float64)

    def heads(w, bias_):
        return torch.einsum("btd,hpd->bthp", u, w) + (0 if bias_ is None else bias_)

    qs, ks, vs = heads(q, qb) / math.sqrt(HEAD_DIM), heads(k, kb), heads(v, vb)
    scores = torch.einsum("bthp,bshp->bhts", qs, ks).tril()
    want = torch.einsum("bhts,bshp->bthp", scores, vs)
    y, _ = m(u)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


def test_init_gate_decay_and_state_bytes():
    m = DiscreteMamba2(HIDDEN, HEADS, HEAD_DIM, state_size=8, min_half_life=4.0, max_half_life=256.0)
    assert abs(torch.nn.functional.silu(torch.tensor(Z_OPEN, dtype=torch.float64)).item() - 1) < 1e-15
    assert m.in_proj.weight[m._rows("z")].abs().max() == 0 and m.in_proj.weight[m._rows("a")].abs().max() == 0
    a = torch.exp(-torch.nn.functional.softplus(m.in_proj.bias[m._rows("a")].double()))
    half_lives = math.log(0.5) / torch.log(a)
    torch.testing.assert_close(half_lives, torch.tensor([4 * 64 ** ((h + 0.5) / HEADS) for h in range(HEADS)],
                                                        dtype=torch.float64), rtol=1e-5, atol=0)
    state = m.empty_state(3, "cpu", torch.bfloat16)
    assert state["ssm"].shape == (3, HEADS, 8, HEAD_DIM) and state["conv"].shape == (3, HEADS * (HEAD_DIM + 16), 3)
    # the SSM state is held at float32 (no re-rounding per decoded token), the conv window in the model's dtype
    assert state["ssm"].dtype == torch.float32 and state["conv"].dtype == torch.bfloat16
    sizes = DiscreteMamba2.state_bytes(HEADS, HEAD_DIM, 2, **m.settings)  # the paper's convention: all at bf16
    assert sizes == {k: t[0].numel() * 2 for k, t in state.items()}


@pytest.mark.parametrize("splits", [[1], [2, 3], [6], [9]])
def test_prefill_then_steps_equals_full_forward(splits):
    m = make_mixer()
    u = torch.randn(2, 12, HIDDEN, dtype=torch.float64)
    y_full, none = m(u)
    assert none is None
    state = m.empty_state(2, "cpu", torch.float64)
    pieces, start = [], 0
    for end in [*splits, *range(splits[-1] + 1, 13)]:  # prefill chunks, then one token at a time
        y, returned = m(u[:, start:end], state=state)
        assert returned is state
        pieces.append(y)
        start = end
    torch.testing.assert_close(torch.cat(pieces, 1), y_full)


def test_left_padding_leaves_state_and_outputs_unchanged():
    m = make_mixer()
    u = torch.randn(2, 10, HIDDEN, dtype=torch.float64)
    lengths = [10, 2]  # row 1 is 8 pads then 2 tokens: fewer real tokens than the conv window
    padded = u.clone()
    padded[1, :8] = torch.randn(8, HIDDEN, dtype=torch.float64) * 100  # garbage under the padding
    mask = torch.tensor([[1] * 10, [0] * 8 + [1] * 2])
    state = m.empty_state(2, "cpu", torch.float64)
    y, _ = m(padded, mask, state)
    assert y[1, :8].abs().max() == 0
    steps = torch.randn(2, 3, HIDDEN, dtype=torch.float64)
    y_steps = [m(steps[:, i : i + 1], torch.cat([mask, torch.ones(2, i + 1, dtype=mask.dtype)], 1), state)[0]
               for i in range(3)]  # mask covering past + new, as generate() passes it
    for row, n in enumerate(lengths):
        alone = m.empty_state(1, "cpu", torch.float64)
        y_alone, _ = m(u[row : row + 1, 10 - n :], state=alone)
        torch.testing.assert_close(y[row : row + 1, 10 - n :], y_alone)
        for i in range(3):
            torch.testing.assert_close(y_steps[i][row : row + 1], m(steps[row : row + 1, i : i + 1], state=alone)[0])
        for key in state:
            torch.testing.assert_close(state[key][row : row + 1], alone[key])


def test_masked_step_keeps_the_state():
    m = make_mixer()
    state = m.empty_state(2, "cpu", torch.float64)
    m(torch.randn(2, 5, HIDDEN, dtype=torch.float64), state=state)
    before = {k: t.clone() for k, t in state.items()}
    m(torch.randn(2, 1, HIDDEN, dtype=torch.float64), torch.tensor([[1], [0]]), state)
    for key in state:
        torch.testing.assert_close(state[key][1], before[key][1])
        assert not torch.equal(state[key][0], before[key][0])


def test_mixing_matrix_is_the_forward_before_gate_and_skip():
    m = make_mixer()
    with torch.no_grad():  # gate exactly open (silu(z) = 1 everywhere is not reachable otherwise) and no skip
        m.in_proj.weight[m._rows("z")] = 0.0
        m.in_proj.bias[m._rows("z")] = Z_OPEN
        m.D.zero_()
    u = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    mask = torch.tensor([[1] * 9, [0] * 3 + [1] * 6])
    M = m.mixing_matrix(u, mask)
    x, *_ = m._project(u, mask, None)
    torch.testing.assert_close(torch.einsum("bhts,bshp->bthp", M, x), m(u, mask)[0], rtol=1e-12, atol=1e-12)
    assert M[1, :, :3].abs().max() == 0 and M[1, :, :, :3].abs().max() == 0


def test_gradients_reach_every_parameter_and_bf16_runs():
    m = make_mixer(dtype=torch.float32)
    y, _ = m(torch.randn(2, 20, HIDDEN))
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    m16 = make_mixer(dtype=torch.float32)
    u = torch.randn(2, 20, HIDDEN)
    y32, _ = m16(u)
    y16, _ = m16.to(torch.bfloat16)(u.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() <= 5e-2 * y32.abs().max()


@pytest.mark.gpu
def test_mixer_on_gpu_backends_agree_and_decode():
    """On CUDA: the auto backend (fla's forward where installed) equals the PyTorch scan; prefill + steps = full."""
    m = make_mixer(dtype=torch.float32).cuda()
    u = torch.randn(2, 200, HIDDEN, device="cuda")
    with torch.no_grad():
        m.backend = "torch"
        y_torch, _ = m(u)
        m.backend = "auto"
        y_auto, _ = m(u)
        state = m.empty_state(2, "cuda", torch.float32)
        y_pre, _ = m(u[:, :150], state=state)
        y_steps = [m(u[:, t : t + 1], state=state)[0] for t in range(150, 200)]
    scale = y_torch.abs().max()
    assert (y_auto - y_torch).abs().max() <= 1e-2 * scale
    assert (torch.cat([y_pre, *y_steps], 1) - y_torch).abs().max() <= 1e-2 * scale


@pytest.mark.parametrize("length", [1, 9])
def test_token_major_causal_conv_equals_conv1d_values_and_gradients(length):
    """The mixer's conv (shifted multiply-adds on [B, T, C]) against nn.Conv1d's op on the [B, C, T] layout."""
    from radistill.hybrid.mixers.discrete_mamba2 import causal_conv

    g = torch.Generator().manual_seed(3)
    C, W = 6, 4
    window = torch.randn(2, W - 1 + length, C, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C, W, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    got = causal_conv(window, weight, bias)
    want = torch.nn.functional.conv1d(window.transpose(1, 2), weight.unsqueeze(1), bias, groups=C).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    probe = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got * probe).sum(), (window, weight, bias))
    wants = torch.autograd.grad((want * probe).sum(), (window, weight, bias))
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_aligned_in_proj_width_takes_one_product(monkeypatch):
    """An in_proj width that is a multiple of 8 (8 heads x 41 rows) needs no split: the prefill runs in_proj whole
    (split_linear is not called) and still equals one-token steps; a misaligned width (3 heads) does call it."""
    from radistill.hybrid.mixers import discrete_mamba2

    calls = []
    split = discrete_mamba2.split_linear
    monkeypatch.setattr(discrete_mamba2, "split_linear", lambda *a: calls.append(1) or split(*a))
    g = torch.Generator().manual_seed(6)
    for heads, splits in ((8, 0), (3, 1)):
        calls.clear()
        mixer = DiscreteMamba2(HIDDEN, num_heads=heads, head_dim=16, state_size=4).double()
        assert (mixer.in_proj.out_features % 8 == 0) == (heads == 8)
        with torch.no_grad():
            for p in mixer.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
            u = torch.randn(2, 5, HIDDEN, generator=g, dtype=torch.float64)
            full, _ = mixer(u)
            assert len(calls) == splits
            state = mixer.empty_state(2, "cpu", torch.float64)
            steps = torch.cat([mixer(u[:, t : t + 1], state=state)[0] for t in range(5)], dim=1)
        torch.testing.assert_close(full, steps, rtol=1e-10, atol=1e-10)


def test_in_proj_split_equals_one_product_and_the_prefill_uses_it():
    """split_linear (x/b/c/z rows, then the decay rows: keeps the big product's width aligned) against in_proj
    itself, values and gradients; and a multi-token forward against one-token steps, which use in_proj whole."""
    from radistill.hybrid.mixers.discrete_mamba2 import split_linear

    g = torch.Generator().manual_seed(5)
    mixer = DiscreteMamba2(HIDDEN, num_heads=3, head_dim=16, state_size=4).double()  # 3 heads: 3 * 41 = 123 rows
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    rows = mixer.conv_channels + mixer.sizes["z"]
    u = torch.randn(2, 7, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True)
    head, tail = split_linear(u, mixer.in_proj, rows)
    want = mixer.in_proj(u)
    torch.testing.assert_close(torch.cat([head, tail], -1), want, rtol=1e-12, atol=1e-12)
    assert tail.shape[-1] == mixer.num_heads
    probe = torch.randn(want.shape, generator=g, dtype=torch.float64)
    params = (u, mixer.in_proj.weight, mixer.in_proj.bias)
    grads = torch.autograd.grad((torch.cat([head, tail], -1) * probe).sum(), params)
    wants = torch.autograd.grad((want * probe).sum(), params)
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        full, _ = mixer(u)
        state = mixer.empty_state(2, "cpu", torch.float64)
        steps = torch.cat([mixer(u[:, t : t + 1], state=state)[0] for t in range(7)], dim=1)
    torch.testing.assert_close(full, steps, rtol=1e-10, atol=1e-10)
