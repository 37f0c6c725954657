"""imgclf stage cores and their thin CLIs. Importing this package is cheap, switches telemetry off and makes
processes exit fast."""

import atexit
import gc
import os

# The project's own settings, not the user's: no telemetry, no update checks, no hub downloads.
for _key, _value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "GIT_PYTHON_REFRESH": "quiet",
}.items():
    os.environ.setdefault(_key, _value)

# At exit, skip collecting every object torch, Prefect, DVC, MLflow and Great Expectations allocated, one by one
# (1-3 s per process). atexit runs last-registered first, so every other handler (Prefect's server stop, MLflow's
# async logging drain) still runs before this.
atexit.register(gc.freeze)
