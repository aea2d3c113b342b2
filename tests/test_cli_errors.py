"""Usage errors and bad input through the real entry point (``radistill.cli.main``): one line on stderr, exit 2.

Every registered command is run with a missing argument, an unknown option and one bad value. The cases run in
this process (``main(args)``, stderr captured) to stay fast; a few run as a subprocess of ``python -m
radistill.cli`` to cover the real start-up, which must not import torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from radistill.cli import app, main

ROOT = Path(__file__).resolve().parents[1]


def _cases(tmp: Path) -> dict[str, dict[str, list[str]]]:
    missing = str(tmp / "missing")
    out = str(tmp / "out")
    return {
        "scan": {"missing": ["scan"], "unknown": ["scan", "m", "--out", out, "--bogus"],
                 "bad": ["scan", "m", "--out", out, "--pairs", "many"]},
        "analyze": {"missing": ["analyze", "m", "--out", out], "unknown": ["analyze", "m", "--scn", "s.json"],
                    "bad": ["analyze", "m", "--scan", f"{missing}/scan.json", "--out", out]},
        "build": {"missing": ["build"], "unknown": ["build", "t", "--out", out, "--kep", "4"],
                  "bad": ["build", "t", "--out", out, "--keep", "four"]},
        "memory": {"missing": ["memory"], "unknown": ["memory", "m", "--length", "128"],
                   "bad": ["memory", "m", "--lengths", "128,long"]},
        "distill": {"missing": ["distill", "s", "--teacher", "t"], "unknown": ["distill", "s", "--lr", "1e-4"],
                    "bad": ["distill", "s", "--teacher", "t", "--out", out, "--seq-len", "128.5"]},
        "eval": {"missing": ["eval"], "unknown": ["eval", "m", "--task", "kv"],
                 "bad": ["eval", "m", "--kv-samples", "lots"]},
        "report": {"missing": ["report"], "unknown": ["report", "r", "--html"], "bad": ["report", missing]},
        "run": {"missing": ["run"], "unknown": ["run", "r.yaml", "--resume"], "bad": ["run", f"{missing}.yaml"]},
        "demo": {"missing": ["demo", "--out"], "unknown": ["demo", "--fast"],
                 "bad": ["demo", "--out", out, "--data", f"{missing}.txt"]},
        "plan": {"missing": ["plan", "m"], "unknown": ["plan", "m", "--gpu-memory", "24GiB", "--gpu", "1"],
                 "bad": ["plan", "m", "--gpu-memory", "24GiB", "--seq-len", "long"]},
        "finetune": {"missing": ["finetune", "s"], "unknown": ["finetune", "s", "--out", out, "--lora", "8"],
                     "bad": ["finetune", "s", "--out", out, "--steps", "ten"]},
        "bridge": {"missing": ["bridge", "s", "--out", out], "unknown": ["bridge", "s", "--out", out, "--src", "x@1"],
                   "bad": ["bridge", missing, "--out", out, "--source", "chunk-ae:4"]},
        "serve": {"missing": ["serve"], "unknown": ["serve", "m", "--prot", "80"],
                  "bad": ["serve", "m", "--port", "70000"]},
    }


def _commands() -> set[str]:
    return {c.name or c.callback.__name__ for c in app.registered_commands}


def test_every_command_has_cases(tmp_path):
    assert _commands() == set(_cases(tmp_path)), "a command was added or removed: give it error cases here"


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("kind", ["missing", "unknown", "bad"])
@pytest.mark.parametrize("command", sorted(_cases(Path("/tmp"))))
def test_usage_error_is_one_line_exit_2(command, kind, tmp_path, capsys):
    args = _cases(tmp_path)[command][kind]
    code, out, err = _run(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (args, code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
    assert "Traceback" not in out + err
    assert not (tmp_path / "out").exists(), "a failed command left its output directory behind"


def test_the_message_names_the_problem(tmp_path, capsys):
    assert "'--pairs'" in _run(_cases(tmp_path)["scan"]["bad"], capsys)[2]
    assert "No such command 'scna'" in _run(["scna"], capsys)[2]
    assert "--bogus" in _run(["scan", "m", "--out", "o", "--bogus"], capsys)[2]


def test_long_messages_are_not_wrapped(tmp_path, capsys):
    """rich breaks lines at 80 columns off a terminal; an error must stay on its one line."""
    code, _, err = _run(["report", str(tmp_path / ("a-long-directory-name-" * 6))], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and len(err.strip()) > 100


def test_version(capsys):
    from radistill import __version__

    code, out, err = _run(["--version"], capsys)
    assert (code, out.strip(), err) == (0, f"radistill {__version__}", "")


def _entry_point(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "radistill.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_entry_point_usage_error_and_version():
    result = _entry_point("scan", "--bogus")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    result = _entry_point("--version")
    assert result.returncode == 0 and result.stdout.startswith("radistill "), result.stderr
    result = _entry_point("--help")
    assert result.returncode == 0 and "distill" in result.stdout


def test_cli_import_is_light():
    """`radistill --help` must not pay for torch/transformers: the command modules import them inside commands."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import sys, radistill.cli; heavy = [m for m in ('torch', 'transformers', 'numpy', 'matplotlib', "
            "'datasets', 'radistill.hybrid.modeling') if m in sys.modules]; print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import radistill.cli imported {result.stdout.strip()}"


# --- data problems surface before any model is loaded, and leave nothing behind ------------------------------
def _bad_data(tmp: Path) -> dict[str, tuple[Path, str]]:
    binary = tmp / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    empty = tmp / "empty.txt"
    empty.write_text("")
    broken_xz = tmp / "broken.txt.xz"
    broken_xz.write_bytes(b"not xz at all")
    held_out = tmp / "one-doc.txt"  # its only document is held out for perplexity
    held_out.write_text("a single document")
    bad_jsonl = tmp / "rows.jsonl"
    bad_jsonl.write_text('{"content": "no text field"}\n')
    return {"binary": (binary, "not UTF-8"), "empty": (empty, "is empty"), "xz": (broken_xz, "not UTF-8"),
            "held-out": (held_out, "no training documents"), "jsonl": (bad_jsonl, "'text'"),
            "missing": (tmp / "missing.txt", "does not exist")}


@pytest.mark.parametrize("case", ["binary", "empty", "xz", "held-out", "jsonl", "missing"])
def test_distill_checks_data_before_loading_models(case, tmp_path, capsys):
    data, words = _bad_data(tmp_path)[case]
    out = tmp_path / "run"
    # neither model exists: reaching a model load would fail with another message
    code, _, err = _run(["distill", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                         "--data", str(data), "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert "Traceback" not in err
    assert not out.exists(), "a run that failed on its data left files behind"


# --- a model without attention heads -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_scan_of_a_non_attention_model_says_it_is_unsupported(kind, tmp_path, capsys):
    import transformers

    if kind == "mamba":
        config = transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2)
        model = transformers.MambaForCausalLM(config)
    else:
        config = transformers.Mamba2Config(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2,
                                           num_heads=4, head_dim=8, n_groups=1, expand=2)
        model = transformers.Mamba2ForCausalLM(config)
    model.save_pretrained(tmp_path / "model")
    capsys.readouterr()  # the progress bar of saving
    code, _, err = _run(["scan", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"'{kind}'" in err and "not supported" in err and "Llama" in err, err
    assert not (tmp_path / "out").exists()


# --- one option name, one meaning ----------------------------------------------------------------------------------
def _visible_options() -> dict[str, set[str]]:
    """{command: its option names shown in --help}."""
    import typer

    group = typer.main.get_command(app)
    return {name: {opt for p in command.params if not getattr(p, "hidden", False) for opt in p.opts}
            for name, command in group.commands.items()}


def test_option_names_have_one_meaning():
    options = _visible_options()
    assert not [c for c, opts in options.items() if "--batch-size" in opts], "--batch-size meant three things"
    assert {c for c, opts in options.items() if "--micro-batch" in opts} == {"distill", "plan", "finetune"}
    assert "--rows-per-forward" in options["scan"] and "--eval-batch" in options["eval"] | options["plan"]
    for command in ("finetune", "plan"):  # the same LoRA flags wherever LoRA is set
        assert {"--lora-rank", "--lora-targets"} <= options[command]
    assert not {"--rank", "--targets", "--alpha", "--dropout"} & options["finetune"]


def test_old_spellings_still_work_with_a_note(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("radistill.distill.run.run_distill", lambda student, teacher, recipe, *a, **k: seen.append(
        recipe.stage(2).batch_size))
    args = ["distill", "s", "--teacher", "t", "--out", str(tmp_path / "run")]
    assert _run([*args, "--micro-batch", "3"], capsys)[0] == 0
    code, _, err = _run([*args, "--batch-size", "5"], capsys)
    assert code == 0 and seen == [3, 5] and "--batch-size is now --micro-batch" in err
    code, _, err = _run([*args, "--batch-size", "3", "--micro-batch", "4"], capsys)
    assert code == 2 and "give one of them" in err and seen == [3, 5]


@pytest.mark.parametrize("area", ["distill", "eval", "finetune", "hybrid", "memplan", "report", "scan"])
def test_lazy_package_exports_resolve(area):
    """Each area package exports its names lazily (so the CLI stays light); every one must still import."""
    import importlib
    import inspect

    package = importlib.import_module(f"radistill.{area}")
    for name in package.__all__:  # a name shadowed by a submodule of the same name would come back a module
        assert not inspect.ismodule(getattr(package, name)), f"radistill.{area}.{name}"
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError):
        getattr(package, "no_such_name")
