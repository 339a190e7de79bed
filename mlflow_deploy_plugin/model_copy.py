"""The local copy of a model version's artifacts: fetched once, then every load reads it.

Kept apart from :mod:`.serving.model_slot` (which loads models, importing MLflow's pyfunc) so the
CLI can fetch a copy while the deployment's first worker is still importing (see
``engines/local/engine.py``): the worker then finds it and never opens the registry itself.

The process that makes a copy also runs MLflow's environment checks on it (the model's requirements
and Python version against this environment, logged as warnings): see :func:`warn_environment_mismatches`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model version could not be fetched, loaded or smoke-tested."""


class _NotAModel(Exception):
    """The artifacts of a version hold no ``MLmodel``: no flavor can load them, however often fetched.

    Said right after the download, not by a worker's load seconds later: an empty or wrong source
    (a registered folder that holds no logged model) fails a switch at once, and nothing is cached
    for the next attempt to trip on.
    """

    def __init__(self, model_uri: str, staging: Path) -> None:
        found = sorted(p.name for p in staging.iterdir())
        what = f"{len(found)} entries ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''})" if found else \
            "nothing"
        super().__init__(f"{model_uri} is not an MLflow model: its artifacts hold no MLmodel file (fetched: {what}); "
                         "register a version whose source is the folder of a logged model")


def ensure_local_copy(model_uri: str, cache_dir: Path,
                      on_made: Callable[[str, Path], None] | None = None) -> Path:
    """Download the model's artifacts once; later loads (restarts, workers) read the local copy.

    Several processes may race here (the CLI's prefetch, workers): each downloads into its own temp
    folder and the first rename wins, so a half-written copy is never visible. ``on_made(model_uri,
    path)`` is called when this call made the copy; by default MLflow's environment checks run on it
    here (:func:`warn_environment_mismatches`).
    """
    if (cache_dir / "MLmodel").exists():
        return cache_dir
    _refuse_damaged_copy(model_uri, cache_dir)
    import mlflow.artifacts

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".{cache_dir.name}."))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(staging))
        if not (staging / "MLmodel").exists():
            raise _NotAModel(model_uri, staging)
        _make_private(staging)
        try:
            os.rename(staging, cache_dir)
        except OSError:
            if not (cache_dir / "MLmodel").exists():
                raise
    except _NotAModel as exc:
        raise ModelLoadError(str(exc)) from None
    except Exception as exc:
        raise ModelLoadError(f"Could not download {model_uri}: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (on_made or warn_environment_mismatches)(model_uri, cache_dir)
    return cache_dir


def warn_environment_mismatches(model_uri: str, path: Path) -> None:
    """Log, as MLflow's ``pyfunc.load_model`` would, where this Python environment differs from the
    one the model was logged in: its pip requirements not installed or of other versions, another
    Python version.

    Run once per copy, by the process that made it (the CLI or the agent, beside a start or a switch
    on a core the workers do not need; a worker only when it had to fetch the copy itself), on the
    interpreter and packages the workers run: workers load with ``suppress_warnings=True`` instead,
    because the requirements check lists the files of every installed distribution (~0.4 s of CPU),
    which sat on every worker's path to its first answer. A warning never fails a copy.
    """
    try:
        from mlflow.models import Model
        from mlflow.pyfunc import (
            _get_pip_requirements_from_model_path,
            _warn_potentially_incompatible_py_version_if_necessary,
        )
        from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

        warn_dependency_requirement_mismatches(_get_pip_requirements_from_model_path(str(path)))
        pyfunc_conf = Model.load(str(path / "MLmodel")).flavors.get("python_function")
        if pyfunc_conf is not None:
            _warn_potentially_incompatible_py_version_if_necessary(pyfunc_conf.get("python_version"))
    except Exception as exc:  # MLflow's private helpers moved, or an unreadable MLmodel: the load says
        _logger.debug("Environment checks of %s skipped: %s: %s", model_uri, type(exc).__name__, exc)


def _refuse_damaged_copy(model_uri: str, cache_dir: Path) -> None:
    """Raise ModelLoadError at once when something that is not a whole copy holds the copy's place.

    A copy only ever appears whole (the rename above), so a file there, or a folder with entries
    but no ``MLmodel``, was damaged or put there by someone else. A rename can replace neither, so
    fetching again would only fail after the whole download: say so now, and how to recover, before
    the caller (the switch of an update, a worker) spends anything on it.
    """
    try:
        entries = os.listdir(cache_dir)
    except FileNotFoundError:
        return  # not fetched yet
    except OSError as exc:  # NotADirectoryError: a file where the folder belongs
        raise ModelLoadError(f"The local copy of {model_uri} at {cache_dir} is damaged ({type(exc).__name__}: "
                             f"{exc}); delete it to fetch the version again") from exc
    if entries:
        raise ModelLoadError(f"The local copy of {model_uri} at {cache_dir} is damaged (no MLmodel among its "
                             f"{len(entries)} entries); delete it to fetch the version again")


def _make_private(root: Path) -> None:
    """Folders 0700, files 0600: copies keep their source's mode bits, whatever the umask."""
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o700)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o600)
