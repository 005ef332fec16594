import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session", autouse=True)
def shared_data_cache(tmp_path_factory):
    """One default-corpus build for the whole session (children inherit the variable)."""
    if "PRETRAIN_DATA_CACHE" not in os.environ:
        os.environ["PRETRAIN_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield os.environ["PRETRAIN_DATA_CACHE"]
