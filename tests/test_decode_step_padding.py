"""One-token decode steps give the recurrent heads no padding mask (every generated token is real), so they run none
of their padding work (the conv state's top-k and sort, masked fills, the window ring's read-back), with the same
outputs as the masked computation; a left-padded prompt is still masked wherever its new tokens include padding."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_generate import GREEDY
from test_hybrid import MIXED, chunked_logits, left_padded, make_student, make_teacher
from test_window_recurrent import build, opened, rope, small_mixer
from torch.utils._python_dispatch import TorchDispatchMode

from radistill.hybrid.modeling import refuse_inner_padding
from radistill.utils.errors import RadistillError

PADDING_WORK = ("topk", "sort")  # DiscreteMamba2's conv state: the last real inputs of a padded window


@pytest.fixture(scope="module")
def students():
    return {"discrete_mamba2": make_student(make_teacher(), MIXED),
            "window_recurrent": opened(build(make_teacher()))}  # gates open: both parts count


class PhaseOps(TorchDispatchMode):
    """aten operators by name, apart for the prefill (a forward of several tokens) and the one-token decode steps."""

    def __init__(self, model):
        super().__init__()
        self.counts = {"prefill": Counter(), "decode": Counter()}
        self.phase = None
        self.hooks = [model.register_forward_pre_hook(self._enter, with_kwargs=True),
                      model.register_forward_hook(lambda *_: setattr(self, "phase", None))]

    def _enter(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.phase = "decode" if ids.shape[1] == 1 else "prefill"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.phase is not None:
            self.counts[self.phase][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def recurrent_mixers(student):
    return [layer.self_attn.recurrent for layer in student.model.layers if layer.self_attn.recurrent is not None]


def force_padding_column(student):
    """Hooks handing every recurrent mixer an all-ones [B, T] mask where it got None: the masked computation, what
    decode steps ran before they passed None (generate's new column is always ones)."""
    def hook(_module, args, kwargs):
        if kwargs.get("attention_mask") is None:
            hidden = args[0]
            kwargs["attention_mask"] = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return args, kwargs
    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in recurrent_mixers(student)]


def run_generate(student, ids, mask, implementation, force=False):
    """(generate's output with logits, PhaseOps counts); ``force``: with force_padding_column's hooks."""
    hooks = force_padding_column(student) if force else []
    counter = PhaseOps(student.model)
    try:
        with torch.no_grad(), counter:
            out = student.generate(input_ids=ids, attention_mask=mask, cache_implementation=implementation,
                                   disable_compile=True, output_logits=True, return_dict_in_generate=True, **GREEDY)
    finally:
        counter.remove()
        for hook in hooks:
            hook.remove()
    return out, counter.counts


@pytest.mark.parametrize("implementation", [None, "static"])
@pytest.mark.parametrize("kind", ["discrete_mamba2", "window_recurrent"])
def test_decode_steps_skip_the_padding_work_with_identical_outputs(students, kind, implementation):
    """A left-padded batch through generate (growing cache: the eager forward's check of the new columns; static:
    ``create_masks_for_generate``): the decode steps dispatch no top-k and no sort, the prefill does (its padding is
    real), and tokens and logits equal, bit for bit, those of the masked computation on an all-ones column."""
    student = students[kind]
    torch.manual_seed(0)
    ids, mask, _ = left_padded(batch=2, length=10, pads=(0, 4))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args, kw: seen.append((args[0].shape[1], kw["attention_mask"])),
                                         with_kwargs=True) for m in recurrent_mixers(student)]
    try:
        out, counts = run_generate(student, ids, mask, implementation)
    finally:
        for hook in hooks:
            hook.remove()
    assert all(m is None for t, m in seen if t == 1) and any(t == 1 for t, _ in seen)
    assert all(m is not None for t, m in seen if t > 1)  # the left-padded prompt is masked
    assert all(counts["prefill"][op] > 0 for op in PADDING_WORK)
    assert all(counts["decode"][op] == 0 for op in PADDING_WORK), dict(counts["decode"])

    masked, masked_counts = run_generate(student, ids, mask, implementation, force=True)
    assert all(masked_counts["decode"][op] > 0 for op in PADDING_WORK)  # the reference did run the masking
    assert torch.equal(out.sequences, masked.sequences)
    assert len(out.logits) == GREEDY["max_new_tokens"]
    for mine, reference in zip(out.logits, masked.logits):
        assert torch.equal(mine, reference)


@pytest.mark.parametrize("kind", ["discrete_mamba2", "window_recurrent"])
def test_a_left_padded_prompt_fed_one_token_at_a_time_is_still_masked(students, kind):
    """One-token steps whose token is padding (a prompt fed token by token) keep their padding column: the eager
    forward drops it only where the new tokens are all real. Logits equal the full forward's at real positions."""
    student = students[kind]
    torch.manual_seed(1)
    ids, mask, positions = left_padded(batch=3, length=9, pads=(0, 3, 6))
    with torch.no_grad():
        full = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    stepped, _ = chunked_logits(student, ids, mask, positions, [1] * ids.shape[1])
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], rtol=1e-4, atol=1e-4)


def test_refuse_inner_padding_answers_for_the_new_columns():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert refuse_inner_padding(left) is True
    assert refuse_inner_padding(left, new_tokens=2) is False  # a decode step after a left-padded prompt
    assert refuse_inner_padding(left, new_tokens=3) is True
    trailing = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert refuse_inner_padding(trailing, new_tokens=1) is True
    assert refuse_inner_padding(torch.ones(2, 4), new_tokens=1) is False
    with pytest.raises(RadistillError, match="row 1 has padding between real tokens \\(column 2\\)"):
        refuse_inner_padding(torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]]), new_tokens=1)


def test_window_step_without_a_mask_equals_the_all_ones_mask():
    """The window ring's one-token step: no mask (no read-back of the slots) gives the same output and ring, bit
    for bit, as an all-ones mask column, after a left-padded prefill and past a full ring."""
    window = small_mixer().window
    torch.manual_seed(2)
    prompt = torch.randn(2, 5, 32, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    embeddings = rope(9)
    states = []
    for _ in range(2):
        state = window.empty_state(2, "cpu", torch.float64)
        window(prompt, mask, state, position_embeddings=tuple(x[:, :5] for x in embeddings))
        states.append(state)
    for t in range(5, 9):  # 4 steps: the ring (3 slots) wraps
        token = torch.randn(2, 1, 32, dtype=torch.float64)
        position = tuple(x[:, t : t + 1] for x in embeddings)
        plain, _ = window(token, None, states[0], position_embeddings=position)
        masked, _ = window(token, torch.ones(2, 1, dtype=torch.long), states[1], position_embeddings=position)
        assert torch.equal(plain, masked)
        assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])

