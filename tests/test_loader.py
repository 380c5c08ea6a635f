"""Loading: device and dtype choice, plain errors for models that cannot fit, the context window."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from internlm_app.runtime.loader import ModelLoadError, choose_dtype, load_model
from tests.conftest import tiny_settings


def test_cpu_load_is_float32_with_fixture_window(tmp_path):
    model, tokenizer, info = load_model(tiny_settings(tmp_path))
    assert (info.device, info.dtype, info.context_window) == ("cpu", "float32", 512)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.stop_ids == [2, 1104]


def test_dtype_choice(tmp_path):
    assert choose_dtype(tiny_settings(tmp_path), "cuda") == torch.float16
    assert choose_dtype(tiny_settings(tmp_path, dtype="bfloat16"), "cuda") == torch.bfloat16
    assert choose_dtype(tiny_settings(tmp_path), "cpu") == torch.float32


def test_model_too_big_for_cpu_is_a_plain_error(tmp_path, converted_dir):
    huge = tmp_path / "huge"
    shutil.copytree(converted_dir, huge)
    index = json.loads((huge / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] = 2**50  # what a checkpoint far larger than this machine's RAM declares
    (huge / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="no CUDA GPU was found"):
        load_model(tiny_settings(tmp_path, model_path=huge))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is absent")
def test_forcing_cuda_without_gpu_says_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="INTERNLM_DEVICE=cpu"):
        load_model(tiny_settings(tmp_path, device="cuda"))


def test_quantization_needs_cuda(tmp_path):
    with pytest.raises(ModelLoadError, match="CUDA"):
        load_model(tiny_settings(tmp_path, quantization="4bit"))


def test_max_length_setting_caps_the_window(tmp_path):
    _, _, info = load_model(tiny_settings(tmp_path, max_length=128))
    assert info.context_window == 128


def test_a_corrupt_native_checkpoint_is_a_load_error_that_says_what_to_do(tmp_path, converted_dir):
    broken = tmp_path / "broken"
    shutil.copytree(converted_dir, broken)
    for shard in broken.glob("*.safetensors"):
        with open(shard, "r+b") as f:
            f.truncate(4096)
    with pytest.raises(ModelLoadError, match="download the model again"):
        load_model(tiny_settings(tmp_path, model_path=broken))


def test_rope_scaling_extends_the_window_by_its_factor_only(tmp_path):
    """A yarn ×4 model of 512 positions got the whole 32k budget of the setting; it takes 4 × 512."""
    from types import SimpleNamespace

    from internlm_app.runtime.loader import context_window

    settings = tiny_settings(tmp_path, max_length=32768)
    yarn = SimpleNamespace(max_position_embeddings=512, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    plain = SimpleNamespace(max_position_embeddings=512, rope_parameters={"rope_type": "default"})
    assert context_window(yarn, settings) == 2048 and context_window(plain, settings) == 512
    assert context_window(yarn, tiny_settings(tmp_path, max_length=1000)) == 1000
    dynamic = SimpleNamespace(max_position_embeddings=512, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert context_window(dynamic, settings) == 32768  # dynamic NTK extends as the text grows: the setting decides
