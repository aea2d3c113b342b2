"""``radistill serve``: a model behind a minimal OpenAI-compatible endpoint (see :mod:`radistill.serve`)."""

from __future__ import annotations

from typing import Optional

import typer

from radistill.utils.console import console
from radistill.utils.errors import RadistillError


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: str = typer.Argument(..., help="a student directory (or any model radistill loads: HF id, local "
                                    "directory, GGUF file)"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
        port: int = typer.Option(8000, "--port", help="port to listen on (0: any free one)"),
        name: Optional[str] = typer.Option(None, "--name", help="the model name clients send [MODEL as given]"),
        device: str = typer.Option("auto", "--device", help="auto, cuda, cuda:N or cpu"),
        dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on the CPU), bf16, "
                                  "fp16 or fp32"),
        max_tokens: int = typer.Option(1024, "--max-tokens", help="the most new tokens one request may ask for "
                                       "(and a chat request's default)"),
        max_batch: int = typer.Option(16, "--max-batch", help="rows one generate() call may serve: concurrent "
                                      "requests that generate alike share a call"),
        batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", help="how long a request waits for others to "
                                            "share its call"),
        compile: bool = typer.Option(False, "--compile", help="sampled and streamed requests too on the static "
                                     "cache, whose decode step transformers compiles on CUDA (the first request of "
                                     "each batch size waits for it); greedy ones on a student take its captured "
                                     "loop either way"),
    ) -> None:
        """Serve a model at http://HOST:PORT/v1 (completions, chat completions, models)."""
        if not 0 <= port <= 65535:
            raise RadistillError(f"--port {port}: give a port in 0..65535")
        if max_tokens < 1 or max_batch < 1 or batch_wait_ms < 0:
            raise RadistillError(f"--max-tokens {max_tokens}, --max-batch {max_batch}, --batch-wait-ms "
                                 f"{batch_wait_ms}: give at least 1, 1 and 0")
        from radistill.models.access import load_model
        from radistill.serve.server import Generator, make_server

        loaded, tokenizer = load_model(model, dtype=dtype, device=device)
        generator = Generator(loaded, tokenizer, name or model, max_tokens=max_tokens, max_batch=max_batch,
                              batch_wait=batch_wait_ms / 1000, compile=compile)
        server = make_server(generator, host, port)
        bound_host, bound_port = server.server_address[:2]
        weights = next(loaded.parameters())
        console.print(f"serving '{name or model}' at http://{bound_host}:{bound_port}/v1 ({weights.device}, "
                      f"{weights.dtype}); Ctrl-C stops", soft_wrap=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            console.print("stopped")
        finally:
            server.server_close()
