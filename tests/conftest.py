"""Shared fixtures: the real student checkpoint, prepared once into the model cache."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def student_model() -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint (prepared on first use, then reused)."""
    from persd_online.models import prepare_model

    return prepare_model()
