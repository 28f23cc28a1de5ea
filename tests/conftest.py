import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
SHARED = TESTS.parent.parent / "shared"
TOKENIZER_DIR = SHARED / "ernie-tokenizer"
pytest_plugins = ["serve_fixtures"]  # the `ernie serve` fixtures (served_model, start_server)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"{TOKENIZER_DIR} not found: the real ERNIE tokenizer files live in ../shared beside the checkout")
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Each tiny shape written once per session: (path, transformers reference model reloaded from it)."""
    from tiny_models import load_reference, write_checkpoint

    cache = {}

    def get(shape: str):
        if shape not in cache:
            path, _ = write_checkpoint(tmp_path_factory.mktemp(shape) / "ckpt", shape)
            cache[shape] = (path, load_reference(path))
        return cache[shape]

    return get
