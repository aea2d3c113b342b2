"""How good is a freshly built student? Held-out perplexity and per-layer error of init variants (a diagnosis).

    python benchmarks/init_quality.py            # CPU, 1 thread, a few minutes

Teacher: examples/teacher-19m. Student: the top 8 heads of a quick scan (KV probe, 10 pairs, 8 samples, seed 0)
kept, DiscreteMamba2 (state 16) elsewhere, built with ``convert`` + ``calibrate`` exactly as ``radistill build``
does. Each variant edits that student's buffers/parameters in memory (library code is untouched) and reports:

- ppl: held-out perplexity on 16 x 256 tokens of examples/data/prose-heldout.txt.xz;
- layer err: per layer, ||student layer(h) - teacher layer(h)|| / ||teacher layer(h) - h|| on the teacher's input h
  (error relative to the layer's own update, so 1.0 = as wrong as dropping the whole attention+MLP update);
- head err: over recurrent heads, ||normalised mixer output - replaced attention head output|| / ||head output -
  its mean||, i.e. sqrt of the fraction of the head's variance left unexplained (1.0 = the mean is as good).
Also prints the calibration diagnostics (position-0 / outlier share of the statistics, per-channel correlation of the
fresh mixer output with the head it replaces). Writes benchmarks/results/init_quality.json.
"""

from __future__ import annotations

import copy
import json
import platform
import math
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radistill.eval.perplexity import read_text  # noqa: E402
from radistill.hybrid.build import convert, select_heads, student_config  # noqa: E402
from radistill.hybrid.calibrate import calibrate, calibration_batches, teacher_pass  # noqa: E402
from radistill.utils.io import write_json_atomic  # noqa: E402
from radistill.models.access import decoder_layers, hidden_input, load_model  # noqa: E402
from radistill.probes.kv import KVProbeConfig, kv_items  # noqa: E402
from radistill.scan.run import scan_model  # noqa: E402

TEACHER = ROOT / "examples" / "teacher-19m"
HELDOUT = ROOT / "examples" / "data" / "prose-heldout.txt.xz"
TRAIN = ROOT / "examples" / "data" / "prose-train.txt.xz"
KEEP, STATE, SEQS, SEQ_LEN = 8, 16, 16, 256


def first(out):
    return out[0] if isinstance(out, tuple) else out


# ---- data ---------------------------------------------------------------------------------------------------------

def windows(tokenizer, path, n, seq_len, skip=0):
    ids = tokenizer(read_text(path, (skip + n) * seq_len * 8)).input_ids
    ids = torch.tensor(ids[skip * seq_len : (skip + n) * seq_len])
    return ids.view(n, seq_len)


@torch.no_grad()
def ppl(model, ids):
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


# ---- raw activations: fresh mixer output and replaced head output on teacher inputs --------------------------------

@torch.no_grad()
def collect(student, teacher, batches):
    """Per recurrent layer: y_s [n, r, hd] (raw mixer output), y_t [n, r, hd] (teacher head output), pos [n]."""
    hd = student.config.head_dim
    blocks = [layer.self_attn for layer in student.model.layers]
    store = {i: {"s": [], "t": [], "pos": []} for i, b in enumerate(blocks) if b.recurrent is not None}

    def mixer_hook(i):
        def hook(module, args, kwargs, mask):
            y, _ = blocks[i].recurrent(hidden_input(args, kwargs), attention_mask=mask)
            real = mask.bool()
            store[i]["s"].append(y[real])
            store[i]["pos"].append(torch.arange(mask.shape[1]).expand_as(mask)[real])
        return hook

    def o_hook(i):
        def hook(module, args, mask):
            heads = args[0].view(*args[0].shape[:-1], -1, hd)[:, :, blocks[i].recurrent_heads]
            store[i]["t"].append(heads[mask.bool()])
        return hook

    teacher_pass(teacher, batches, {i: {"attn": mixer_hook(i), "o_proj": o_hook(i)} for i in store})
    return {i: {k: torch.cat(v).double() for k, v in d.items()} for i, d in store.items()}


def moments(y, keep=None):
    y = y if keep is None else y[keep]
    return y.mean(0), y.std(0, unbiased=False)


def set_stats(student, stats):
    """stats: {layer: (s_mean, s_std, t_mean, t_std)} -> the normaliser buffers."""
    for i, (sm, ss, tm, ts) in stats.items():
        n = student.model.layers[i].self_attn.normalizer
        n.student_mean.copy_(sm.float()); n.student_std.copy_(ss.float())
        n.teacher_mean.copy_(tm.float()); n.teacher_std.copy_(ts.float())


def stats_from(acts, keep_fn=None, scale="std"):
    """Normaliser statistics from collected activations; keep_fn(layer_acts) -> bool mask of tokens to use.
    scale="std": match the teacher's std (the library's rule); "ls": least squares, teacher_std := cov / s_std so
    that the per-channel slope is cov(s, t) / var(s) (never worse than the mean on the calibration tokens)."""
    out = {}
    for i, a in acts.items():
        keep = None if keep_fn is None else keep_fn(a)
        sm, ss = moments(a["s"], keep)
        tm, ts = moments(a["t"], keep)
        ss = ss.clamp_min(1e-6)
        if scale == "ls":
            s, t = (a["s"], a["t"]) if keep is None else (a["s"][keep], a["t"][keep])
            cov = ((s - sm) * (t - tm)).mean(0)
            ts = cov / ss
        out[i] = (sm, ss, tm, ts)
    return out


def not_outlier(a, q=0.99):
    """Tokens whose teacher and student head-output norms are both below their 99th percentile (per layer)."""
    keep = torch.ones(a["s"].shape[0], dtype=torch.bool)
    for k in ("s", "t"):
        norm = a[k].norm(dim=-1).max(-1).values  # the largest head norm at each token
        keep &= norm <= norm.quantile(q)
    return keep & (a["pos"] >= 1)


# ---- per-layer and per-head error on teacher inputs ----------------------------------------------------------------

@torch.no_grad()
def layer_errors(student, teacher, ids):
    mask = torch.ones_like(ids)
    ins, outs, heads = {}, {}, {}
    hd = student.config.head_dim
    handles = []
    for i, layer in enumerate(decoder_layers(teacher)):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: ins.__setitem__(i, hidden_input(a, k)),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, first(o))))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: heads.__setitem__(i, a[0].view(*a[0].shape[:-1], -1, hd))))
    teacher(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    for h in handles:
        h.remove()
    layer_err, head_err = [], []
    for i, layer in enumerate(student.model.layers):
        block, got = layer.self_attn, {}
        h = None
        if block.normalizer is not None:
            h = block.normalizer.register_forward_hook(lambda m, a, o: got.__setitem__("y", o))
        kwargs = student.model.layer_kwargs(ins[i], attention_mask=mask)
        out = first(layer(ins[i], **kwargs))
        if h is not None:
            h.remove()
            yt = heads[i][:, :, block.recurrent_heads].double()
            centred = yt - yt.mean((0, 1))
            head_err.append(float((got["y"].double() - yt).norm() / centred.norm()))
        else:
            head_err.append(None)
        update = outs[i] - ins[i]
        layer_err.append(float((out - outs[i]).norm() / update.norm()))
    return layer_err, head_err


# ---- variants -------------------------------------------------------------------------------------------------------

class TokenLayerNorm:
    """Replace the static affine by a per-token LayerNorm over each head's channels, then the teacher's affine."""

    def __init__(self, student):
        self.handles = []
        for layer in student.model.layers:
            n = layer.self_attn.normalizer
            if n is not None:
                self.handles.append(n.register_forward_hook(self.hook))

    @staticmethod
    def hook(module, args, out):
        y = args[0].float()
        y = torch.nn.functional.layer_norm(y, y.shape[-1:])
        return (y * module.teacher_std + module.teacher_mean).to(args[0].dtype)

    def remove(self):
        for h in self.handles:
            h.remove()


def set_half_lives(student, lo, hi):
    for layer in student.model.layers:
        mixer = layer.self_attn.recurrent
        if mixer is not None:
            H = mixer.num_heads
            position = (torch.arange(H, dtype=torch.float64) + 0.5) / H
            mixer.set_half_lives(lo * (hi / lo) ** position)


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.time()
    teacher, tok = load_model(str(TEACHER), dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    teacher.eval()
    items = kv_items(tok, KVProbeConfig(pairs=10, samples=8, seed=0))
    scan = scan_model(teacher, tok, "teacher-19m", items=items, probe={"kind": "kv"})
    heads = [(h.layer, h.head) for h in scan.top(KEEP)]
    selection = select_heads(teacher, heads=heads)
    kept = selection.kept_per_layer(teacher.config.num_hidden_layers)
    # the reference point: the first release's start (half-lives 8-1024, built-in text), what the rows vary
    config = student_config(teacher, kept, "discrete_mamba2",
                            {"state_size": STATE, "min_half_life": 8.0, "max_half_life": 1024.0})
    base = convert(teacher, config).eval()
    cal_batches = calibration_batches(tok)
    calibrate(base, teacher, cal_batches, half_lives="fixed")
    print(f"kept heads {heads}; setup {time.time() - t0:.0f}s", flush=True)

    held = windows(tok, HELDOUT, SEQS, SEQ_LEN)
    train_batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)}
                     for w in windows(tok, TRAIN, 16, SEQ_LEN).split(8)]
    teacher_ppl = ppl(teacher, held)

    # -- diagnostics of the calibration statistics --------------------------------------------------------------
    acts = collect(base, teacher, cal_batches)
    diag = {"calibration_tokens": int(next(iter(acts.values()))["pos"].numel())}
    share0, share_out, corr, ratio = [], [], [], []
    for i, a in acts.items():
        for k in ("s", "t"):
            sq = (a[k] ** 2).sum((1, 2))  # per-token energy over the layer's recurrent heads
            if k == "s":
                share0.append(float(sq[a["pos"] == 0].sum() / sq.sum()))
                top = sq.topk(max(1, sq.numel() // 100)).values
                share_out.append(float(top.sum() / sq.sum()))
        keep = a["pos"] >= 1
        s, t = a["s"][keep], a["t"][keep]
        sc, tc = s - s.mean(0), t - t.mean(0)
        rho = (sc * tc).mean(0) / (sc.std(0, unbiased=False) * tc.std(0, unbiased=False)).clamp_min(1e-12)
        corr.append(float(rho.mean()))
        ratio.append(float(a["s"][a["pos"] == 0].norm(dim=-1).mean() / a["s"][keep].norm(dim=-1).mean()))
    t_share0 = []
    for i, a in acts.items():
        sq = (a["t"] ** 2).sum((1, 2))
        t_share0.append(float(sq[a["pos"] == 0].sum() / sq.sum()))
    diag.update({
        "position0_token_share": float((next(iter(acts.values()))["pos"] == 0).double().mean()),
        "student_energy_share_position0_per_layer": share0,
        "teacher_energy_share_position0_per_layer": t_share0,
        "student_energy_share_top1pct_tokens_per_layer": share_out,
        "student_norm_pos0_over_rest_per_layer": ratio,
        "mean_channel_corr_student_teacher_per_layer": corr,
    })
    train_acts = collect(base, teacher, train_batches)
    tr_corr = []
    for a in train_acts.values():
        keep = a["pos"] >= 1
        sc, tc = a["s"][keep] - a["s"][keep].mean(0), a["t"][keep] - a["t"][keep].mean(0)
        tr_corr.append(float(((sc * tc).mean(0) / (sc.std(0, unbiased=False) * tc.std(0, unbiased=False))
                              .clamp_min(1e-12)).mean()))
    diag["mean_channel_corr_on_prose_per_layer"] = tr_corr
    print(json.dumps(diag, indent=1), flush=True)

    # -- variants -----------------------------------------------------------------------------------------------
    def zero(s):
        set_stats(s, {i: (sm, ss, tm * 0, ts * 0) for i, (sm, ss, tm, ts) in stats_from(acts).items()})

    def mean_only(s):
        set_stats(s, {i: (sm, ss, tm, ts * 0) for i, (sm, ss, tm, ts) in stats_from(acts).items()})

    def pos_ge(k):
        return lambda s: set_stats(s, stats_from(acts, lambda a: a["pos"] >= k))

    def half_lives(lo, hi, data="builtin", scale="std"):
        def apply(s):
            set_half_lives(s, lo, hi)
            a = collect(s, teacher, cal_batches if data == "builtin" else train_batches)
            set_stats(s, stats_from(a, lambda x: x["pos"] >= 1, scale=scale))
        return apply

    def library(half_lives):  # what `radistill build --calibration-data prose-train` does now
        def apply(s):
            calibrate(s, teacher, train_batches, half_lives=half_lives)
        return apply

    def token_ln(s):
        set_stats(s, stats_from(acts, lambda a: a["pos"] >= 1))
        return TokenLayerNorm(s)

    variants = [
        ("first release (8-1024, builtin)", None),
        ("recurrent outputs zeroed", zero),
        ("teacher_std -> 0 (mean output)", mean_only),
        ("teacher_std -> 0, mean from prose-train", lambda s: set_stats(s, {
            i: (sm, ss, tm, ts * 0) for i, (sm, ss, tm, ts) in stats_from(train_acts).items()})),
        ("stats on positions >= 1", pos_ge(1)),
        ("stats on positions >= 8", pos_ge(8)),
        ("stats pos >= 1, no top-1% norm tokens", lambda s: set_stats(s, stats_from(acts, not_outlier))),
        ("stats on prose-train, pos >= 1", lambda s: set_stats(
            s, stats_from(train_acts, lambda a: a["pos"] >= 1))),
        ("least-squares slope, pos >= 1", lambda s: set_stats(
            s, stats_from(acts, lambda a: a["pos"] >= 1, scale="ls"))),
        ("least-squares slope, prose-train", lambda s: set_stats(
            s, stats_from(train_acts, lambda a: a["pos"] >= 1, scale="ls"))),
        ("half-lives 1-16, stats pos >= 1", half_lives(1, 16)),
        ("half-lives 1-16, stats on prose-train", half_lives(1, 16, "train")),
        ("half-lives 1-16, least-squares, prose", half_lives(1, 16, "train", "ls")),
        ("half-lives 64-4096, stats pos >= 1", half_lives(64, 4096)),
        ("per-token LayerNorm + teacher affine", token_ln),
        ("build now: half-lives from attention, prose", library("attention")),
    ]
    rows = []
    print(f"\nteacher ppl {teacher_ppl:.2f}")
    print(f"{'variant':42s} {'ppl':>9s} {'mean layer err':>14s} {'mean head err':>13s}  layer err per layer")
    for name, edit in variants:
        s = copy.deepcopy(base)
        extra = edit(s) if edit is not None else None
        p = ppl(s, held)
        le, he = layer_errors(s, teacher, held[:8])
        if extra is not None:
            extra.remove()
        hv = [x for x in he if x is not None]
        row = {"variant": name, "ppl": p, "layer_err": le, "head_err": he,
               "mean_layer_err": sum(le) / len(le), "mean_head_err": sum(hv) / len(hv)}
        rows.append(row)
        print(f"{name:42s} {p:9.1f} {row['mean_layer_err']:14.3f} {row['mean_head_err']:13.3f}  "
              + " ".join(f"{x:.2f}" for x in le), flush=True)
    result = {"teacher": str(TEACHER.relative_to(ROOT)), "kept_heads": heads, "state_size": STATE,
              "heldout": f"{SEQS} x {SEQ_LEN} tokens", "teacher_ppl": teacher_ppl, "diagnostics": diag,
              "rows": rows, "seconds": time.time() - t0,
              "device": f"cpu ({platform.processor() or platform.machine()}), 1 thread",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    out = ROOT / "benchmarks" / "results" / "init_quality.json"
    write_json_atomic(out, result)
    print(f"\nwrote {out.relative_to(ROOT)} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
