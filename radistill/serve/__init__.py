"""``radistill serve``: a student (or any model radistill loads) behind a minimal OpenAI-compatible HTTP endpoint.

Why radistill ships its own: ``transformers serve`` loads a model by looking its architecture up as an attribute of
the ``transformers`` module (``cli/serving/model_manager.py``, transformers 5.25), so a model whose classes come
from elsewhere (a student's ``auto_map``, radistill's registered classes) cannot load there, with or without
``--trust-remote-code``; vLLM and SGLang do not run the hybrid's mixed layers (docs/hybrid.md, "Generation and
serving"). What this serves is ``model.generate()``, the path every other number in this repository measures, one
request at a time (a list of prompts is one batch): no continuous batching, no paged cache.

protocol.py: the OpenAI request fields (checked, one clear error each) and response bodies; server.py: the model
behind a lock, and the HTTP server (standard library, threads).
"""

from radistill.utils.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "radistill.serve.protocol": ("RequestError",),
    "radistill.serve.server": ("Generator", "make_server"),
})

__all__ = ["Generator", "RequestError", "make_server"]
