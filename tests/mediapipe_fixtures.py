"""The pinned MediaPipe environment for tests (export/tflite_metadata.py builds and caches it).

Outside CI a machine that cannot build it skips the MediaPipe tests, saying why; under
``CI=true`` that is a failure.
"""

from __future__ import annotations

import os

import pytest


def mediapipe_env():
    from export.tflite_metadata import MetadataError, mediapipe_python

    try:
        return mediapipe_python()
    except MetadataError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the MediaPipe environment cannot be built: {exc}")
        pytest.skip(f"no MediaPipe environment: {exc}")
