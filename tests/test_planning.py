"""planning: an allow-list of GenerationConfig fields; a user's refused field raises, a model's warns once."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch
from transformers import GenerationConfig

from et_transformers import ETModelForCausalLM
from et_transformers.generation_fields import refused_fields

#: The settings transformers accepts that generate() used to ignore silently (issue 13).
IGNORED_BEFORE = {
    "dola_layers": "high",
    "token_healing": True,
    "force_words_ids": [[5, 6]],
    "constraints": [[5, 6]],  # transformers 5 keeps the field; its Constraint classes are gone
    "low_memory": True,
    "prefill_chunk_size": 16,
    "cache_implementation": "static",
    "diversity_penalty": 0.5,
}


@pytest.fixture()
def et(tiny_llama_et, monkeypatch):
    """The shared model, with its program forbidden to run: refusals happen before it does."""
    saved = copy.deepcopy(tiny_llama_et.generation_config)

    def forbidden(*args, **kwargs):
        raise AssertionError("the program must not run for a refused option")

    monkeypatch.setattr(tiny_llama_et.program, "forward", forbidden)
    yield tiny_llama_et
    tiny_llama_et.generation_config = saved


@pytest.mark.parametrize("name", sorted(IGNORED_BEFORE))
def test_a_refused_keyword_raises_naming_it(et, name):
    value = IGNORED_BEFORE[name]
    with pytest.raises(ValueError, match=rf"does not support {name}={value!r}".replace("[", r"\[")):
        et.generate(torch.tensor([[5, 9]]), max_new_tokens=2, **{name: value})


@pytest.mark.parametrize("name", sorted(IGNORED_BEFORE))
def test_a_refused_field_in_a_passed_generation_config_raises(et, name):
    config = GenerationConfig(max_new_tokens=2)
    setattr(config, name, IGNORED_BEFORE[name])
    with pytest.raises(ValueError, match=name):
        et.generate(torch.tensor([[5, 9]]), generation_config=config)


def test_defaults_and_bookkeeping_fields_are_not_refused():
    config = GenerationConfig(num_beams=1, diversity_penalty=0.0, use_cache=True, max_new_tokens=3, top_k=50)
    config._from_model_config = True
    assert refused_fields(config) == {}
    assert refused_fields(GenerationConfig(custom_entry=1)) == {"custom_entry": 1}


def _folder_with_generation_config(tiny_llama_export, tmp_path, fields: dict):
    folder = shutil.copytree(tiny_llama_export.output_dir, tmp_path / "model")
    (folder / "generation_config.json").write_text(json.dumps(fields))
    return folder


SMOLLM2_LIKE = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                "transformers_version": "4.42.3"}


def test_a_smollm2_like_generation_config_loads_without_a_warning(tiny_llama_export, tmp_path, caplog):
    folder = _folder_with_generation_config(tiny_llama_export, tmp_path, SMOLLM2_LIKE)
    with caplog.at_level(logging.WARNING, logger="et_transformers"):
        model = ETModelForCausalLM.from_pretrained(folder, warmup=False)
        model.generate(torch.tensor([[5, 9]]), max_new_tokens=2)
    assert caplog.records == []
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 2)


def test_a_models_own_unsupported_field_warns_once_and_is_reset(tiny_llama_export, tmp_path, caplog):
    fields = {**SMOLLM2_LIKE, "cache_implementation": "static", "dola_layers": "low"}
    folder = _folder_with_generation_config(tiny_llama_export, tmp_path, fields)
    with caplog.at_level(logging.WARNING, logger="et_transformers"):
        model = ETModelForCausalLM.from_pretrained(folder, warmup=False)
        out = model.generate(torch.tensor([[5, 9]]), max_new_tokens=3, eos_token_id=None)
        model.generate(torch.tensor([[5, 9]]), max_new_tokens=3)
    (record,) = caplog.records
    assert "cache_implementation='static'" in record.getMessage() and "dola_layers='low'" in record.getMessage()
    assert model.generation_config.cache_implementation is None and model.generation_config.dola_layers is None
    assert out.shape == (1, 5)
