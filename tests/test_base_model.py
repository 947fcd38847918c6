"""The embedded SmolLM2 conversion sets ChatML's special tokens by name, whatever transformers' GGUF reader did."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from moa_core.base_model import (
    SMOLLM2_SPECIAL_TOKENS, BaseModelError, check_special_tokens, convert_smollm2, set_special_tokens,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_smollm2(tmp_path_factory.mktemp("smollm2") / "model")


def test_converted_smollm2_ends_sequences_with_im_end_and_pads(converted):
    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tok.eos_token_id == 2
    check_special_tokens(tok, model, SMOLLM2_SPECIAL_TOKENS)  # raises if anything disagrees


def test_a_wrong_mapping_is_detected_and_set_right(converted):
    """What transformers 5.17's GGUF reader produced: `<|im_start|>` as end of sequence and no pad token."""
    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted)
    tok.eos_token, tok.pad_token = "<|im_start|>", None
    model.config.eos_token_id = model.generation_config.eos_token_id = 1
    with pytest.raises(BaseModelError, match="eos_token"):
        check_special_tokens(tok, model, SMOLLM2_SPECIAL_TOKENS)
    set_special_tokens(tok, model, SMOLLM2_SPECIAL_TOKENS)
    assert (tok.eos_token_id, tok.pad_token_id, model.generation_config.eos_token_id) == (2, 2, 2)


def test_a_token_missing_from_the_vocabulary_is_refused(converted):
    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted)
    with pytest.raises(BaseModelError, match="no '<\\|nope\\|>' token"):
        set_special_tokens(tok, model, {"eos_token": "<|nope|>"})
