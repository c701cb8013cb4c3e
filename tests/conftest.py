"""Shared test fixtures: where the golden references live, and how to skip without them."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("EASYANIMATE_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))
GOLDEN_MODELS = GOLDEN_DIR / "models"


def golden_path(*parts: str) -> Path:
    """Path inside the golden folder; skips the calling test (with the reason) when it is absent."""
    path = GOLDEN_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"golden reference {path} is absent: these tests need ../shared/golden beside the checkout "
            "(or EASYANIMATE_GOLDEN_DIR pointing at it)"
        )
    return path


@pytest.fixture
def golden():
    """The golden folder as a callable: golden('cases', 'a_t2v_64x112_f5_ddim')."""
    return golden_path
