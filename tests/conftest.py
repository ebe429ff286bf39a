import os
import sys
from pathlib import Path

# Test helpers (tiny_models.py) are imported by name.
sys.path.insert(0, str(Path(__file__).parent))

# No hub access here (and none needed): every model and tokenizer in the tests is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random tiny LLaMA (hidden 64, 2 layers) with tokenizer and calib.txt, saved once per session."""
    from tiny_models import save_random_llama

    return save_random_llama(tmp_path_factory.mktemp("tiny_llama"), hidden=64, layers=2, heads=4, intermediate=128)


@pytest.fixture(scope="session")
def real_data_dir():
    """The folder of the real Math10K files (``lowbit.data.testsets.default_data_dir()``), or skip the test."""
    from lowbit.data.testsets import default_data_dir

    d = default_data_dir()
    if d is None or not (Path(d) / "gsm8k" / "test.json").is_file():
        pytest.skip("real data not found: set LOWBIT_DATA_DIR to a folder holding gsm8k/test.json, SVAMP/test.json, "
                    "mawps/test.json, AQuA/test.json, ... (default ../shared/data beside the checkout)")
    return Path(d)
