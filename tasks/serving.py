"""MLflow pyfunc for serving (logged as "models from code": no pickle). Rebuilds the network from
safetensors weights and applies the saved preprocessing.

Each input row is raw image bytes or a base64 string; an image file path only when the model is loaded with
model_config={"allow_paths": True} (`imgclf predict` and the gate's re-score, in-process): a served model must
never read the server's own files for a client. A row that cannot be read gets null scores and a short reason
in `error`; the other rows are scored as usual."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

NOT_PATHS = "file paths are not read by a served model"


def _is_file(text: str) -> bool:
    """Path(text).is_file(), False where the OS refuses the name (too long, NUL): a long base64 string is no path."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _as_source(value, *, allow_paths: bool = False) -> str | bytes:
    """Raw bytes, a base64 string (whitespace and a data: URI prefix tolerated), or, only with allow_paths, a
    file path -> bytes or a path for open_image. ValueError with a short reason for anything else."""
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise ValueError("empty input")
        return bytes(value)
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        raise ValueError("empty input")
    text = str(value)
    if not text.strip():
        raise ValueError("empty input")
    if allow_paths and _is_file(text):
        return text
    payload = "".join(text.split())
    if payload.startswith("data:") and ";base64," in payload:
        payload = payload.split(";base64,", 1)[1]
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        data = b""
    if not data:
        raise ValueError("neither a readable file nor base64 image data" if allow_paths
                         else f"not base64 image data ({NOT_PATHS})")
    return data


def _reason(exc: Exception) -> str:
    """A short, client-safe reason for a row that could not be read."""
    from PIL import UnidentifiedImageError

    from tasks.preprocess import ImagePolicyError

    if isinstance(exc, UnidentifiedImageError):
        text = "not an image: cannot identify image file"  # (PIL's message ends in a BytesIO repr or a path)
    elif isinstance(exc, ImagePolicyError):
        text = f"refused: {exc}"
    elif isinstance(exc, OSError):
        text = f"unreadable image: {exc}"
    else:
        text = f"unreadable image: {type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


def as_frame(model_input) -> pd.DataFrame:
    """What MLflow hands predict() (a DataFrame from `dataframe_split`; a dict of columns or a list from
    `inputs`/`instances`) as a DataFrame with one row per image."""
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):  # a column is a list (or array); a lone value is one row
        return pd.DataFrame({k: list(v) if isinstance(v, (list, tuple, pd.Series)) or getattr(v, "ndim", 0) > 0
                             else [v] for k, v in model_input.items()})
    return pd.DataFrame({"image": list(model_input)})


class ImageClassifier(PythonModel):
    """Input: a DataFrame with an `image` column (or the first column).
    Output, one row per input row: label, probability, p_<class>..., error (null when the row was scored)."""

    def load_context(self, context):
        from tasks.models import load_model
        from tasks.preprocess import Preprocess

        self.model, self.meta = load_model(Path(context.artifacts["model_dir"]))
        self.spec = Preprocess.from_dict(self.meta["preprocess"])
        self.classes = list(self.meta["classes"])
        # Opt-in, per load: reading paths is for in-process callers that name their own files.
        self.allow_paths = (context.model_config or {}).get("allow_paths") is True

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # (the DataFrame hint is one MLflow takes without inferring a schema from it; with no hint it warns on
        # every load that hints are missing)
        import numpy as np
        import torch

        from tasks.predict import predict_proba
        from tasks.preprocess import load_tensor

        frame = as_frame(model_input)
        column = "image" if "image" in frame.columns else frame.columns[0]
        tensors, errors = {}, {}
        for i, value in enumerate(frame[column].tolist()):
            try:
                source = _as_source(value, allow_paths=self.allow_paths)
            except ValueError as exc:
                errors[i] = str(exc)
                continue
            try:
                tensors[i] = load_tensor(source, self.spec)
            except Exception as exc:  # one bad row is that row's error, not the whole batch's
                errors[i] = _reason(exc)
        n = len(frame)
        labels: list[str | None] = [None] * n
        top = np.full(n, np.nan)
        probs = np.full((n, len(self.classes)), np.nan)
        if tensors:
            rows = list(tensors)
            probs[rows] = predict_proba(self.model, torch.stack([tensors[i] for i in rows]), self.spec).numpy()
            top[rows] = probs[rows].max(axis=1)
            for i, k in zip(rows, probs[rows].argmax(axis=1).tolist()):
                labels[i] = self.classes[k]
        out = pd.DataFrame({"label": labels, "probability": top,
                            **{f"p_{c}": probs[:, k] for k, c in enumerate(self.classes)},
                            "error": [errors.get(i) for i in range(n)]})
        # Nulls, not NaN: MLflow's server writes NaN into its JSON as a bare `NaN`, which JSON parsers refuse.
        return out.astype(object).where(out.notna(), None) if errors else out


mlflow.models.set_model(ImageClassifier())
