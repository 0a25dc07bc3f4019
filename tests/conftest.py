"""Shared test settings: quiet TensorFlow, CPU only, fixed seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained ICL checkpoint of the tiny testing architecture."""
    import keras

    import model

    path = tmp_path_factory.mktemp("ckpt") / "tiny.weights.h5"
    keras.utils.set_random_seed(0)
    model.save_weights(model.build_icl_model(model.TINY), path, model.TINY)
    return path
