"""The seed-style churn service, kept only as the benchmark's point of comparison: FastAPI, the Feast SDK's
`get_online_features` and the MLflow pyfunc of the same registered model, in one process.

It is what the project started from, written the usual way: nothing here is tuned, and nothing here is served.
Run: `python -m bench.seed_rest_service --port 8000` (settings from the `STREAMFLOW_*` environment).
"""

from __future__ import annotations

import argparse

import mlflow
import pandas as pd
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from streamflow.feature_repo.definitions import FEATURE_NAMES, FEATURE_SERVICE_NAME, JOIN_KEY
from streamflow.feature_repo.store import open_store
from streamflow.settings import Settings, load_settings


class PredictBody(BaseModel):
    user_id: str


class BatchBody(BaseModel):
    user_ids: list[str]


def create_app(settings: Settings) -> FastAPI:
    """The REST app over the settings' feature store and registry."""
    store = open_store(settings)
    service = store.get_feature_service(FEATURE_SERVICE_NAME)
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model(settings.model_uri)
    app = FastAPI(title="seed churn service")

    def score(user_ids: list[str]) -> list[dict[str, object]]:
        frame = store.get_online_features(
            features=service, entity_rows=[{JOIN_KEY: u} for u in user_ids]
        ).to_df()
        known = frame[list(FEATURE_NAMES)].notna().all(axis=1)
        if not known.any():
            raise HTTPException(status_code=404, detail="unknown user")
        labels = pd.Series(0, index=frame.index)
        labels[known] = model.predict(frame.loc[known, list(FEATURE_NAMES)])
        return [
            {"user_id": u, "churn": bool(label) if ok else None}
            for u, label, ok in zip(user_ids, labels, known, strict=True)
        ]

    @app.post("/predict")
    def predict(body: PredictBody) -> dict[str, object]:
        return score([body.user_id])[0]

    @app.post("/batch_predict")
    def batch_predict(body: BatchBody) -> list[dict[str, object]]:
        return score(body.user_ids)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(load_settings()), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
