"""``radistill build`` (teacher + scan -> student) and ``radistill memory`` (cache bytes per sequence)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from radistill.utils.console import console
from radistill.utils.errors import RadistillError


def _lengths(spec: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise RadistillError(
            f"--lengths '{spec}' is not a comma-separated list of token counts, e.g. 128,2048"
        ) from exc


def _memory_table(rows, dtype: str) -> Table:
    teacher = {r.length: r.total_bytes for r in rows if r.model.startswith("teacher")}
    table = Table(title=f"cache per sequence ({dtype}, MB = 10^6 bytes; total = KV + SSM, conv shown apart)")
    for column in ("model", "length", "KV MB", "SSM MB", "conv MB", "total MB", "teacher / this"):
        # numbers stay whole on a narrow terminal; a long model name wraps instead
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=column != "model")
    for r in rows:
        ratio = teacher.get(r.length, 0) / r.total_bytes if r.total_bytes else float("inf")
        table.add_row(r.model, str(r.length), f"{r.kv_bytes / 1e6:.2f}", f"{r.ssm_bytes / 1e6:.2f}",
                      f"{r.conv_bytes / 1e6:.2f}", f"{r.total_bytes / 1e6:.2f}", f"{ratio:.2f}x")
    return table


def register(app: typer.Typer) -> None:
    @app.command("build")
    def build(
        teacher: str = typer.Argument(..., help="HF model id or local directory of the teacher"),
        out: Path = typer.Option(..., "--out", help="directory for the student checkpoint and selection.json"),
        scan: Optional[Path] = typer.Option(None, "--scan", help="scan.json of this teacher (`radistill scan`)"),
        keep: Optional[int] = typer.Option(None, "--keep", help="keep the scan's top K heads as attention"),
        heads: Optional[str] = typer.Option(
            None, "--heads", help="keep these heads instead: L.H,L.H,... (e.g. 8.3,0.6)"
        ),
        state_size: Optional[int] = typer.Option(None, "--state-size", help="recurrent state size N [mixer default]"),
        mixer: str = typer.Option("window_recurrent", "--mixer", help="mixer of the other heads: window_recurrent "
                                  "(the teacher head over its last --window tokens + a gated DiscreteMamba2 "
                                  "recurrence that starts closed: keeps the most of the teacher, docs/distill.md), "
                                  "discrete_mamba2 (the paper's: recurrence only, the smallest state), window "
                                  "(sliding-window softmax only) or a registered one"),
        window: Optional[int] = typer.Option(None, "--window", help="tokens a window head sees (--mixer window, "
                                             "window_recurrent or --window-heads) [16]"),
        sink: Optional[int] = typer.Option(None, "--sink", help="attention sinks: every window head also sees its "
                                           "document's first S tokens (pretrained models need them) [4]"),
        window_heads: int = typer.Option(0, "--window-heads", help="also give the scan's next M heads after the "
                                         "kept ones to sliding-window heads (the rest stay --mixer)"),
        kept_mixer: Optional[str] = typer.Option(None, "--kept-mixer", help="a registered mixer in place of the "
                                                 "kept heads' softmax attention [softmax attention]"),
        calibration_data: Optional[str] = typer.Option(
            None, "--calibration-data", help="text for the calibration: a file or HF dataset id as `distill --data` "
            "takes; use the distillation data [a small built-in text]"
        ),
        calibration_tokens: Optional[int] = typer.Option(None, "--calibration-tokens",
                                                         help="tokens of --calibration-data to use [16384]"),
        half_lives: str = typer.Option("attention", "--half-lives", help="recurrent heads' initial decay: "
                                       "'attention' (from each teacher head's attention distance) or 'fixed'"),
        device: str = typer.Option("auto", help="cuda, cuda:1, cpu or auto"),
        dtype: str = typer.Option("auto", help="bf16, fp16 or fp32: compute and save in it; auto: compute in bf16 on "
                                   "GPU, fp32 on CPU, and save in the teacher checkpoint's dtype"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out directory"),
        private_kv: bool = typer.Option(False, "--private-kv", help="each kept query head gets its own copy of its "
                                        "GQA group's K/V projection and cache (the paper's choice) instead of sharing"),
    ) -> None:
        """Build the head-level hybrid student: kept heads stay attention, the rest become recurrent heads."""
        from radistill.hybrid.build import build_student, load_selection

        with console.status("building the student"):
            path = build_student(teacher, out, scan=scan, keep=keep, heads=heads, mixer=mixer, window=window,
                                 sink=sink, window_heads=window_heads, kept_mixer=kept_mixer,
                                 state_size=state_size, calibration_data=calibration_data,
                                 half_lives=half_lives, device=device,
                                 dtype=dtype, overwrite=overwrite, private_kv=private_kv,
                                 **({} if calibration_tokens is None else {"calibration_tokens": calibration_tokens}))
        record = load_selection(path)
        table = Table(title=f"{record['keep']} kept heads ({record['source']})")
        for column in ("layer", "kept heads", "KV heads cached", "mixer heads"):
            table.add_column(column, justify="right")
        for layer in record["layers"]:
            mixers = " ".join(f"{name}:{len(h)}" for name, h in layer.get("mixers", {}).items())
            table.add_row(str(layer["layer"]), ",".join(map(str, layer["kept_heads"])) or "-",
                          ",".join(map(str, layer["kv_heads_cached"])) or "-", mixers or "-")
        console.print(table)
        cached, params = record["kv_heads_cached"], record["parameters"]
        console.print(f"KV heads cached: {cached['total']} of the teacher's {cached['teacher_total']}; parameters "
                      f"{params['student'] / 1e6:.1f}M (the teacher's {params['teacher'] / 1e6:.1f}M, "
                      f"{params['student'] / params['teacher']:.2f}x); wrote {path} (README.md is its model card; "
                      "selection.json says why each head was kept)")

    @app.command("memory")
    def memory(
        model: str = typer.Argument(..., help="teacher or student directory, config.json, HF id, or a shape name "
                                               "(llama-3.2-1b, nanbeige4.1-3b)"),
        lengths: str = typer.Option("128,2048,4096", "--lengths", help="sequence lengths, comma-separated"),
        dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32"),
        keep: Optional[int] = typer.Option(None, "--keep", help="teacher config: also a student keeping K heads"),
        state_size: Optional[int] = typer.Option(None, "--state-size", help="that student's state size N"),
        baseline: Optional[list[str]] = typer.Option(
            None, "--baseline", help="layer-level hybrid to compare with: mil-P (P% attention layers), repeatable"
        ),
        mixer: str = typer.Option("window_recurrent", "--mixer", help="that student's other heads, as `build` "
                                  "makes them (window_recurrent; discrete_mamba2 for the paper's, window, ...)"),
        window: Optional[int] = typer.Option(None, "--window", help="with --mixer window or window_recurrent: its "
                                             "span in tokens [16]"),
        sink: Optional[int] = typer.Option(None, "--sink", help="with --mixer window or window_recurrent: the first "
                                           "tokens its heads also keep [4, as build]"),
        as_json: bool = typer.Option(False, "--json", help="print the rows as JSON"),
    ) -> None:
        """Cache bytes per sequence (KV, SSM state, conv state) from the config alone: student vs teacher."""
        from radistill.hybrid.memory import memory_rows

        rows = memory_rows(model, _lengths(lengths), dtype=dtype, keep=keep, state_size=state_size,
                           baselines=baseline, mixer=mixer, window=window, sink=sink)
        if as_json:
            typer.echo(json.dumps({"rows": [r.to_dict() for r in rows]}, indent=2))
        else:
            console.print(_memory_table(rows, dtype))
