"""The pinned MediaPipe environment for tests (export/tflite_metadata.py builds and caches it).

Outside CI a machine that cannot build it skips the MediaPipe tests, saying why; under
``CI=true`` that is a failure.
"""

from __future__ import annotations

from ci import unavailable


def mediapipe_env():
    from export.tflite_metadata import MetadataError, mediapipe_python

    try:
        return mediapipe_python()
    except MetadataError as exc:
        unavailable(f"the MediaPipe environment cannot be built: {exc}")
