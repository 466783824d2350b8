"""Distributed batch scoring: a registered ``smolora`` model as a Spark UDF on a local two-core Spark session.

``mlflow.pyfunc.spark_udf`` hands each Arrow batch to the pyfunc as a DataFrame whose columns are named by
the model signature (here the single ``prompt`` column) and takes the first output column
(``generated_text``) as the string result, so a Spark job and a plain ``predict`` call must agree (greedy).
"""

from __future__ import annotations

import sys

import mlflow
import pandas as pd
import pytest
from conftest import TINY_TRAINING

from smolora_mlflow import SmoLoRA, SmoloraConfig

pytestmark = [
    pytest.mark.slow,
    # pyspark 4 warns on every pandas-UDF call that it is not yet certified on pandas 3; the test is the check.
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
]

pyspark = pytest.importorskip("pyspark", reason="pyspark is in the dev extra: pip install -e '.[dev]'")


PROMPTS = ["The food was", "Our waiter", "I would come back because", "Great", "The dessert", "Service was"]
PARAMS = {"max_new_tokens": 8}
NAME = "spark-reviews"


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as mp:
        # Python workers must run this interpreter (it has torch and the package); no UI, loopback only.
        mp.setenv("PYSPARK_PYTHON", sys.executable)
        mp.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
        session = (
            SparkSession.builder.master("local[2]")
            .appName("smolora-spark-udf")
            .config("spark.ui.enabled", "false")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.sql.shuffle.partitions", "2")
            .config("spark.sql.execution.arrow.maxRecordsPerBatch", "2")  # several batches per partition
            .getOrCreate()
        )
        session.sparkContext.setLogLevel("ERROR")
        yield session
        session.stop()


@pytest.fixture(scope="module")
def registered(tmp_path_factory, smolora_cache):
    """A tiny trained model, logged with the smolora flavor, registered and moved to Production.

    Module-scoped (one training for the file), so it brings its own SQLite store instead of the
    per-test ``tracking_uri`` fixture.
    """
    from smolora_mlflow import registry, workflow

    root = tmp_path_factory.mktemp("spark-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mp.setenv("SMOLORA_PROGRESS", "0")
        mp.chdir(root)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            lora = SmoLoRA(config=SmoloraConfig(**TINY_TRAINING, output_dir=str(root / "out"), experiment_name="spark"))
            lora.train()
            info = workflow.log_trained_model(lora, registered_model_name=NAME,
                                              pip_requirements=["torch", "transformers", "safetensors"])
            registry.transition(NAME, info.registered_model_version, "Production")
            expected = mlflow.pyfunc.load_model(f"models:/{NAME}@production").predict(
                pd.DataFrame({"prompt": PROMPTS}), params=PARAMS)["generated_text"].tolist()
            yield info, expected
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


def _score(spark, model_uri: str) -> list[str]:
    from pyspark.sql import functions as F

    frame = pd.DataFrame({"id": range(len(PROMPTS)), "prompt": PROMPTS})
    df = spark.createDataFrame(frame).repartition(2)
    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="string", env_manager="local", params=PARAMS)
    scored = df.select("id", "prompt", udf(F.col("prompt")).alias("generated_text")).toPandas().sort_values("id")
    assert scored["prompt"].tolist() == PROMPTS
    return scored["generated_text"].tolist()


def test_spark_udf_scores_a_registered_model_like_pyfunc_predict(spark, registered):
    info, expected = registered
    assert all(isinstance(t, str) and t for t in expected)
    assert _score(spark, f"models:/{NAME}@production") == expected
    assert _score(spark, info.model_uri) == expected  # models:/<model_id>, the logged model itself


def test_spark_udf_scores_the_training_runs_model_uri(spark, registered):
    info, expected = registered
    client = mlflow.MlflowClient()
    assert client.get_logged_model(info.model_id).experiment_id == client.get_run(info.run_id).info.experiment_id
    assert _score(spark, f"runs:/{info.run_id}/model") == expected
