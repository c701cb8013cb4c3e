"""BERT + mT5 prompt encoding against the original's tokenizer ids and embeddings (en, zh, over-long)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_path
from easyanimate_core.text import TextEncoders


@pytest.fixture(scope="module")
def encoders():
    return TextEncoders.from_model_dir(golden_path("models", "EasyAnimateV5-tiny-zh"), dtype=torch.float32)


@pytest.mark.filterwarnings("ignore:prompt is .* tokens long")  # long_en: checked below
@pytest.mark.parametrize("name", ["en", "zh", "long_en"])
def test_prompt_embeddings_match_original(encoders, name):
    index = json.loads(golden_path("components", "text_encoders", "index.json").read_text(encoding="utf-8"))[name]
    want = load_file(golden_path("components", "text_encoders", f"{name}.safetensors"))
    for prompt, prefix in ((index["prompt"], ""), (index["negative_prompt"], "negative_")):
        for enc, tokenizer in (("enc0", encoders.bert_tokenizer), ("enc1", encoders.t5_tokenizer)):
            assert torch.equal(encoders._tokenize(tokenizer, [prompt]), want[f"{enc}_{prefix}input_ids"])
        got = encoders.encode(prompt)
        assert got.bert.shape == (1, 77, 32) and got.t5.shape == (1, 256, 48)
        torch.testing.assert_close(got.bert, want[f"enc0_{prefix}prompt_embeds"], atol=5e-5, rtol=0)
        torch.testing.assert_close(got.t5, want[f"enc1_{prefix}prompt_embeds"], atol=1e-4, rtol=0)


def test_over_long_prompt_warns_and_truncates(encoders):
    index = json.loads(golden_path("components", "text_encoders", "index.json").read_text(encoding="utf-8"))
    with pytest.warns(UserWarning) as record:
        encoders.encode(index["long_en"]["prompt"])
    messages = [str(w.message) for w in record]
    assert any("326 BERT tokens long; only the first 77 are used" in m for m in messages)
    assert any("481 T5 tokens long; only the first 256 are used" in m for m in messages)
