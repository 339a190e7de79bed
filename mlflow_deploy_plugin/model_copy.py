"""The local copy of a model version's artifacts: fetched once, then every load reads it.

Kept apart from :mod:`.serving.model_slot` (which loads models, importing MLflow's pyfunc) so the
CLI can fetch a copy while the deployment's first worker is still importing (see
``engines/local/engine.py``): the worker then finds it and never opens the registry itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class ModelLoadError(RuntimeError):
    """The model version could not be fetched, loaded or smoke-tested."""


def ensure_local_copy(model_uri: str, cache_dir: Path) -> Path:
    """Download the model's artifacts once; later loads (restarts, workers) read the local copy.

    Several processes may race here (the CLI's prefetch, workers): each downloads into its own temp
    folder and the first rename wins, so a half-written copy is never visible.
    """
    if (cache_dir / "MLmodel").exists():
        return cache_dir
    import mlflow.artifacts

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".{cache_dir.name}."))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(staging))
        _make_private(staging)
        try:
            os.rename(staging, cache_dir)
        except OSError:
            if not (cache_dir / "MLmodel").exists():
                raise
    except Exception as exc:
        raise ModelLoadError(f"Could not download {model_uri}: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache_dir


def _make_private(root: Path) -> None:
    """Folders 0700, files 0600: copies keep their source's mode bits, whatever the umask."""
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o700)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o600)
