# Frozen copy of tasks/serving.py as registered versions logged it before 2026-12-05 (commit 554aa86): their
# own code, which imports today's tasks.* in-process. tests/test_serving.py loads models logged with it.
"""MLflow pyfunc for serving (logged as "models from code": no pickle). Rebuilds the network from
safetensors weights and applies the saved preprocessing; accepts paths, raw bytes or base64 strings."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


def _as_source(value):
    """A path, raw image bytes, or a base64 string -> something open_image accepts."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    text = str(value)
    if Path(text).is_file():
        return text
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"not a readable file path nor base64 image data: {text[:60]!r}") from None


class ImageClassifier(PythonModel):
    """Input: a DataFrame with an `image` column (or the first column). Output: label, probability, p_<class>."""

    def load_context(self, context):
        from tasks.models import load_model
        from tasks.preprocess import Preprocess

        self.model, self.meta = load_model(Path(context.artifacts["model_dir"]))
        self.spec = Preprocess.from_dict(self.meta["preprocess"])
        self.classes = list(self.meta["classes"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # (the DataFrame hint is one MLflow takes without inferring a schema from it; with no hint it warns on
        # every load that hints are missing)
        from tasks.predict import predict_sources

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"image": list(model_input)})
        column = "image" if "image" in frame.columns else frame.columns[0]
        sources = [_as_source(v) for v in frame[column].tolist()]
        return predict_sources(self.model, self.spec, self.classes, sources)


mlflow.models.set_model(ImageClassifier())
