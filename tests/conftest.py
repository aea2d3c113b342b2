import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEACHER_19M = SHARED / "fixtures" / "teacher-19m"
CORPUS = SHARED / "fixtures" / "corpus" / "prose-train.txt.xz"

requires_shared = pytest.mark.skipif(not TEACHER_19M.exists(), reason="../shared fixtures are absent")
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "shared" in item.keywords and not TEACHER_19M.exists():
            item.add_marker(pytest.mark.skip(reason="../shared fixtures are absent"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo_after_compiling():
    """After a test that compiled, dynamo's caches are emptied: tests compile the same code objects (the hybrid's
    forward, its mixers) for other models, and in one pytest-xdist worker those add up to dynamo's recompile limit
    (8 per code object), past which a fullgraph compile fails -- in whichever test the worker's order reaches it."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    yield
    if counters["stats"]["unique_graphs"] != before:
        torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test process: the test models are tiny, pytest-xdist runs one process per core,
    and OpenMP's spinning threads make tiny models many times slower on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    """The distillation tests' character tokenizer (``distill_helpers.char_tokenizer``), one per test module."""
    from distill_helpers import char_tokenizer

    return char_tokenizer()


@pytest.fixture
def corpus_docs(tmp_path) -> tuple[Path, list[str]]:
    """A .txt corpus of 50 short documents in ``tmp_path`` (``distill_helpers.write_corpus``) and the documents."""
    from distill_helpers import write_corpus

    path = tmp_path / "corpus.txt"
    return path, write_corpus(path, docs=50)


@pytest.fixture
def corpus(corpus_docs) -> Path:
    """The path of :func:`corpus_docs`."""
    return corpus_docs[0]


@pytest.fixture(scope="session")
def teacher_19m_path() -> Path:
    if not TEACHER_19M.exists():
        pytest.skip("../shared fixtures are absent")
    return TEACHER_19M


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="module")
def flush_denormals():
    """Tiny random models produce denormal floats, which are ~30x slower on x86 CPUs (modules opt in)."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
