"""Decoding with the whole token loop on the device: what ``generate(cache_implementation="static")`` runs for a
hybrid on CUDA when a greedy call needs nothing of transformers' own loop.

Why: transformers' generate() does ~50 small operators of host work per token outside the model (inputs, masks,
stopping checks) and reads a device value every token to decide whether to stop, so the host and the device take
turns. Measured on an H200 host (benchmarks/results/host_overhead-h200.md): 2.3-2.9 ms of host work per token
outside the forward, more than the 1B-shaped hybrid's whole decode step on the device, which caps both teacher and
hybrid at ~14% of their HBM bound through generate(). Here one decode step -- the forward, the argmax, writing
the token, the end-of-sequence bookkeeping -- is captured once as a CUDA graph (its inputs are static buffers
updated in place) and replayed per token; the host looks at the device only every ``check_every`` tokens.

The result is the token sequence transformers' greedy search produces for the same call (tests/test_graph_decode.py
compares them on CPU, where the same loop runs eagerly, and on CUDA): rows that reach an end-of-sequence token are
filled with the pad token afterwards, and the output stops at the step where the last row finished or at
``max_new_tokens``. A streamer (batch 1, as transformers allows) gets what transformers' loop hands it -- the prompt,
then each new token as it is made -- so with one the host reads each token after its replay instead of every 16.
Sampling (temperature, top-k, top-p) runs in the loop only when asked for by name (``graph_decode=True``): the draw
is captured with the step (:class:`Picker`), and has not yet run on a GPU. Anything else -- other sampling
settings, beams, logits processors, stopping criteria, scores, ``inputs_embeds`` -- goes to transformers'
generate(), as does ``generate(..., graph_decode=False)``.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from radistill.hybrid.cache import HybridCache

# Call arguments the loop honours; any other one means transformers' generate() handles the call.
ARGUMENTS = {"input_ids", "attention_mask", "generation_config", "max_new_tokens", "max_length", "do_sample",
             "num_beams", "pad_token_id", "eos_token_id", "bos_token_id", "cache_implementation", "use_cache",
             "temperature", "top_k", "top_p", "streamer"}
# Generation-config fields that may differ from transformers' defaults without changing greedy search (sampling
# parameters are unused when do_sample is False).
NEUTRAL_FIELDS = ARGUMENTS | {"transformers_version", "_from_model_config", "decoder_start_token_id",
                              "compile_config", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                              "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                              "return_dict_in_generate"}
# ... of which these must be off: the loop returns the tokens only
OUTPUTS = ("output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate")
WARMUP_STEPS = 2  # eager steps before the capture: they initialise lazily made buffers (and are real steps)
# graph_decode="compiled": the model's forward in the captured step compiled by this backend first (fullgraph, static
# shapes), so the graph replays fused kernels instead of eager ones; tests use a backend that needs no compiler
STEP_BACKEND = "inductor"
LENGTH_BUCKET = 256  # with the compiled step: cache lengths rounded up to a multiple of this


def decode_plan(model, inputs: torch.Tensor | None, kwargs: dict, requested: bool | None) -> dict | None:
    """The loop's arguments for this generate() call, or None when transformers' generate() must run it.

    ``requested``: the call's ``graph_decode`` (None: on CUDA when the call asks for the static cache; True: also on
    CPU, where the loop runs without a graph; "compiled": as True, with the model's forward compiled by
    ``STEP_BACKEND`` before the capture; False: never)."""
    if requested is False or model.training or set(kwargs) - ARGUMENTS:
        return None
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        return None
    streamer = kwargs.get("streamer")
    if streamer is not None and input_ids.shape[0] != 1:  # transformers' streamers take one row: its error
        return None
    config = GenerationConfig.from_dict((kwargs.get("generation_config") or model.generation_config).to_dict())
    config.update(**{k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "generation_config")})
    if set(config.to_diff_dict()) - NEUTRAL_FIELDS or any(getattr(config, name, False) for name in OUTPUTS):
        return None
    if (config.num_beams or 1) != 1:
        return None
    sampling = None
    if config.do_sample:
        # sampling in the loop only when asked for by name (graph_decode=True / "compiled"): its captured draw has
        # not yet been run on a GPU; and only with the warpers it reproduces (temperature, top-k, top-p)
        if requested is None or any(getattr(config, name, None) not in (None, default) for name, default in
                                    (("min_p", None), ("typical_p", 1.0), ("epsilon_cutoff", 0.0),
                                     ("eta_cutoff", 0.0), ("top_h", None))):
            return None
        sampling = {"temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p}
    if config.cache_implementation != "static" or config.use_cache is False:
        return None
    if requested is None and input_ids.device.type != "cuda":
        return None
    if model.config.sliding_window is not None or model.config._attn_implementation not in ("sdpa", "eager"):
        return None
    prompt = input_ids.shape[1]
    new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt
    if new < 1:
        return None
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask"), "max_new_tokens": new,
            "eos_token_ids": eos, "pad_token_id": pad, "compile_step": requested == "compiled", "streamer": streamer,
            "sampling": sampling}


def compiled_forward(model):
    """``model`` compiled once per model for the loop's decode step (kept beside it, not as a submodule: a compiled
    wrapper registered as a child would enter its state dict); the first steps of each new shape compile."""
    cache = model.__dict__.setdefault("_radistill_compiled_steps", {})
    if STEP_BACKEND not in cache:
        cache[STEP_BACKEND] = torch.compile(model, backend=STEP_BACKEND, fullgraph=True, dynamic=False)
    return cache[STEP_BACKEND]


def capture_graph(step, warmup: int) -> torch.cuda.CUDAGraph:
    """Run ``step()`` ``warmup`` times on a side stream (as CUDA graph capture wants: lazily made handles and buffers
    exist before it), then record one more call as a CUDA graph and return it (recording runs nothing). ``step`` must
    read and write only tensors whose addresses stay the same: the graph replays on them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


class Picker:
    """The next token from the last position's logits [B, vocab] -> [B]: the argmax, or with ``sampling``
    ({"temperature", "top_k", "top_p"}) a draw after transformers' own warpers for those settings, made as they are
    made there (float32 logits; temperature, then top-k, then top-p). The draw is argmax(p / E) with E ~ Exp(1)
    per token: a sample of p, as transformers' ``torch.multinomial`` is, but without the host read that makes
    multinomial impossible to capture in a CUDA graph (it checks the probabilities on the host). The same
    distribution, not the same stream of random numbers: a seed gives other tokens than transformers' loop."""

    def __init__(self, sampling: dict | None):
        from transformers import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                  TopPLogitsWarper)

        self.warpers = None
        if sampling is not None:
            temperature, top_k, top_p = sampling["temperature"], sampling["top_k"], sampling["top_p"]
            self.warpers = LogitsProcessorList(
                ([TemperatureLogitsWarper(temperature)] if temperature is not None and temperature != 1.0 else [])
                + ([TopKLogitsWarper(top_k)] if top_k else [])
                + ([TopPLogitsWarper(top_p)] if top_p is not None and top_p < 1.0 else []))

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """logits [B, vocab]; tokens [B, 1] the last tokens (what transformers' warpers are handed) -> [B]."""
        if self.warpers is None:
            return logits.argmax(-1)
        probs = self.warpers(tokens, logits.float()).softmax(-1)
        return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


class DecodeLoop:
    """The decode step on static buffers: ``token`` [B, 1], ``position`` [B, 1] (RoPE positions), ``mask``
    [B, max_length] (1 = a real token in that slot), ``done`` [B], ``out`` [B, new] (the generated tokens) and
    ``count`` (how many are written, 0-d; the cache slot a step writes is ``count + prompt - 1``), all updated in
    place. ``pick``: how a token is chosen (:class:`Picker`: greedy unless it samples)."""

    def __init__(self, model, cache: HybridCache, first: torch.Tensor, prompt_mask: torch.Tensor,
                 positions: torch.Tensor, new: int, eos: list[int], pad: int, forward=None, pick=None):
        batch, prompt = prompt_mask.shape
        device = first.device
        self.model, self.cache = model, cache
        self.pick = Picker(None) if pick is None else pick
        self.forward = model if forward is None else forward  # the model, or its compiled forward
        self.mask = torch.zeros(batch, cache.max_length, dtype=torch.bool, device=device)
        self.mask[:, :prompt] = prompt_mask.bool()
        self.slots = torch.arange(cache.max_length, device=device)
        self.before_first_slot = prompt - 1  # the slot of generated token n (n = count) is n + prompt - 1
        self.position = positions[:, -1:] + 1
        self.eos = torch.tensor(eos or [-1], device=device)
        self.pad = torch.tensor(pad, device=device)
        self.out = torch.full((batch, new), pad, dtype=torch.long, device=device)
        self.out[:, 0] = first
        self.count = torch.tensor(1, device=device)
        self.done = torch.isin(first, self.eos)  # with no eos the sentinel -1 matches nothing
        self.token = first[:, None].clone()
        self.sdpa = model.config._attn_implementation == "sdpa"
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def step(self) -> None:
        slot = self.count + self.before_first_slot
        self.mask.index_fill_(1, slot.view(1), True)  # the token fed now is real (finished rows feed the pad)
        visible = (self.mask & (self.slots <= slot))[:, None, None, :]  # [B, 1, 1, max_length]
        attention = visible if self.sdpa else torch.zeros(visible.shape, dtype=self.model.dtype,
                                                          device=visible.device).masked_fill(~visible, float("-inf"))
        # a prepared mask dict: kept heads get the 4D mask; the new token is never padding for the recurrent heads
        logits = self.forward(input_ids=self.token, position_ids=self.position, use_cache=True, logits_to_keep=1,
                              attention_mask={"attention": attention, "padding": None}, cache=self.cache).logits
        token = torch.where(self.done, self.pad, self.pick(logits[:, -1], self.token))
        self.out.index_copy_(1, self.count.view(1), token[:, None])
        self.done |= (token[:, None] == self.eos).any(-1)
        self.token.copy_(token[:, None])
        self.position.add_(1)
        self.count.add_(1)

    def warm_up_and_capture(self, steps: int) -> None:
        """``steps`` real steps, then ``step`` recorded as a CUDA graph that ``run`` replays."""
        self.graph = capture_graph(self.step, steps)

    def run(self) -> None:
        self.graph.replay() if self.graph is not None else self.step()


@torch.no_grad()
def loop_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                  eos_token_ids: list[int], pad_token_id: int, check_every: int = 16,
                  compile_step: bool = False, streamer=None, sampling: dict | None = None) -> torch.Tensor:
    """``input_ids`` [B, T] (left padding allowed) -> [B, T + n] with n <= ``max_new_tokens`` new tokens, as
    transformers' greedy search (or sampling) returns them; the decode step replays as a CUDA graph on CUDA. ``compile_step``:
    the step's forward compiled (``STEP_BACKEND``) before the capture; the prefill stays eager. ``streamer``
    (transformers' ``BaseStreamer``): ``put`` the prompt, then each new token [B] as it is made, ``end`` at the end,
    as transformers' loop calls it (an exception it raises stops the generation, as there). ``sampling``
    ({"temperature", "top_k", "top_p"}): each token drawn (:class:`Picker`) instead of the argmax."""
    from radistill.hybrid.modeling import refuse_inner_padding

    if streamer is not None:
        streamer.put(input_ids.cpu())
        check_every = 1  # each token goes out as soon as it is made

    batch, prompt = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    refuse_inner_padding(torch.cat([mask, mask.new_ones(batch, 1)], -1))  # generated tokens follow the prompt
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # transformers' rule for left padding
    length = prompt + max_new_tokens
    if compile_step:  # the compiled step's shapes include the cache's length: buckets of 256, so that prompts of
        length = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET  # other lengths reuse one compilation (slots masked)
    cache = HybridCache(model.config, max_length=length)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=1).logits
    pick = Picker(sampling)
    loop = DecodeLoop(model, cache, pick(logits[:, -1], input_ids[:, -1:]), mask, positions, max_new_tokens,
                      eos_token_ids, pad_token_id, forward=compiled_forward(model) if compile_step else None, pick=pick)
    steps = max_new_tokens - 1
    taken = 0

    def hand_out(i: int) -> bool:
        """Generated token i to the streamer (one row); whether it ends the generation."""
        streamer.put(loop.out[:, i].cpu())
        return bool(eos_token_ids) and bool(torch.isin(loop.out[:, i], loop.eos).all())

    finished = streamer is not None and hand_out(0)
    if input_ids.is_cuda and steps > WARMUP_STEPS and not finished:
        loop.warm_up_and_capture(WARMUP_STEPS)  # WARMUP_STEPS real steps, then the capture
        taken = WARMUP_STEPS
        # the warm-up's tokens, up to an end token (any() stops at it: the steps after it made padding)
        finished = streamer is not None and any(hand_out(i) for i in range(1, taken + 1))
    while taken < steps and not finished:
        burst = min(check_every, steps - taken)
        for _ in range(burst):
            loop.run()
        if streamer is not None:  # burst is 1
            hand_out(taken + 1)
        taken += burst
        finished = bool(eos_token_ids) and bool(loop.done.all())  # the one host read per burst
    if streamer is not None:
        streamer.end()
    generated = loop.out[:, : taken + 1]
    if eos_token_ids:
        # transformers stops at the step where the last row finished: cut the burst's extra (pad-only) columns
        hit = torch.isin(generated, loop.eos)
        ends = torch.where(hit.any(-1), hit.int().argmax(-1) + 1, generated.shape[1])
        generated = generated[:, : int(ends.max())]
    return torch.cat([input_ids, generated], dim=-1)
