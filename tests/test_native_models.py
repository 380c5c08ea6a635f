"""Native Hugging Face chat models (chat template, AutoTokenizer) load and chat through the same engine."""

from __future__ import annotations

import torch

from internlm_app.backends.engine import ChatEngine
from internlm_app.chat_types import ReplyEvents
from internlm_app.runtime.tokenizer import HFChatTokenizer
from internlm_app.sampling import SamplingParams
from tests.conftest import tiny_settings
from tests.hf_tiny import build_model


def test_native_chat_model_loads_and_replies(tmp_path):
    model_dir = build_model(tmp_path / "qwen2-tiny")
    engine = ChatEngine.load(tiny_settings(tmp_path, model_path=model_dir))
    assert isinstance(engine.tokenizer, HFChatTokenizer)
    assert type(engine.model).__name__ == "Qwen2ForCausalLM"
    assert engine.info.context_window == 256  # the model's positions cap the context budget
    assert not (tmp_path / "cache" / "converted").exists()  # native checkpoints are used as they are

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello <|im_end|>"}]
    ids = engine.prepare(messages, 16).ids
    assert ids.count(1) == 3 and ids.count(2) == 2  # typed <|im_end|> stays text: only the template's control tokens
    events = ReplyEvents()
    text = "".join(engine.stream_reply(messages, SamplingParams.greedy_params(16), events=events))
    expected = engine.model.generate(
        input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=[0, 2]
    )[0, len(ids) :].tolist()
    assert events.stats.completion_tokens == len(expected)
    assert text == engine.tokenizer.decode(expected)
