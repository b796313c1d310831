"""ExportConfig: no field without an effect, backend limits refused when the config is built, the
recipes' programs unchanged and stored configs of older versions still readable. No exports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from et_transformers import ExportConfig, InvalidConfigError
from et_transformers.config import AUTO, RECIPES, XNNPACK_GROUP_MULTIPLE, recipe, recipe_name
from et_transformers.export.quantize import _linear_plan

#: What an older version stored for a float program: the then-defaults, which had no effect.
OLD_FP32_MANIFEST = {
    "max_seq_len": 128, "dtype": "float32", "backend": "xnnpack", "qlinear": None, "qlinear_group_size": 32,
    "qhead": "same", "qlinear_8bit": [], "qembedding": None, "qembedding_group_size": None,
    "kv_cache_dtype": None, "logits": "last",
}


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"qlinear_group_size": 32}, r"qlinear_group_size=32 has no effect.*qlinear=None.*Leave it out"),
        ({"qlinear": "8da8w", "qlinear_group_size": 64}, r"qlinear_group_size=64 has no effect.*'8da8w'.*per output"),
        ({"qhead": "8da8w", "qlinear_group_size": 128}, r"qlinear_group_size=128 has no effect.*head '8da8w'"),
        ({"qhead": "same"}, r"qhead='same' has no effect with qlinear=None.*qhead='8da8w'"),
        ({"qembedding_group_size": 32}, r"qembedding_group_size=32 has no effect with qembedding=None.*'8w'"),
    ],
)
def test_a_field_without_effect_raises_naming_it_why_and_the_fix(fields, fragment):
    with pytest.raises(InvalidConfigError, match=fragment):
        ExportConfig(**fields)


def test_defaults_resolve_to_the_schemes_default():
    assert ExportConfig().qlinear_group_size is None and ExportConfig().qhead is None  # nothing quantized
    four = ExportConfig(qlinear="8da4w")
    assert (four.qlinear_group_size, four.qhead, four.head_scheme) == (32, "same", "8da4w")
    assert ExportConfig(qlinear="8da8w").qlinear_group_size is None  # 8-bit: per channel
    assert ExportConfig(backend="portable", qlinear="4w").qlinear_group_size is None  # portable: per channel
    head_only = ExportConfig(qhead="8da4w")
    assert head_only.qlinear_group_size == 32 and head_only.linear_group_size(head_only.qlinear) is None
    mixed = ExportConfig(qlinear="8da8w", qhead="8da4w")  # groups for the 4-bit head only
    assert mixed.linear_group_size("8da8w") is None and mixed.linear_group_size("8da4w") == 32
    assert ExportConfig(qlinear="8da4w", qhead="8da4w") == four  # one spelling, one cache key


def test_explicit_values_that_match_what_is_built_are_accepted():
    assert ExportConfig(qlinear_group_size=None, qhead=None, qembedding_group_size=None) == ExportConfig()
    assert ExportConfig(qlinear="8da4w", qlinear_group_size=None).qlinear_group_size is None  # channelwise 4-bit
    assert ExportConfig(qlinear="8da4w", qlinear_group_size=AUTO) == ExportConfig(qlinear="8da4w")


def test_replace_resolves_the_defaults_again():
    assert ExportConfig().replace(qlinear="8da4w").qlinear_group_size == 32
    assert ExportConfig(qlinear="8da4w").replace(qlinear=None) == ExportConfig()
    with pytest.raises(InvalidConfigError, match="qlinear_group_size=64 has no effect"):
        ExportConfig(qlinear="8da4w", qlinear_group_size=64).replace(qlinear=None)  # an explicit value stays


@pytest.mark.parametrize(
    "fields",
    [
        {"qlinear": "8da4w", "qlinear_group_size": 16},
        {"qlinear": "8da4w", "qlinear_group_size": 1},
        {"qhead": "8da4w", "qlinear_group_size": 16},
        {"qlinear": "8da8w", "qhead": "8da4w", "qlinear_group_size": 8},
    ],
)
def test_group_sizes_xnnpack_cannot_delegate_are_refused_when_the_config_is_built(fields):
    with pytest.raises(InvalidConfigError, match=r"cannot run on backend='xnnpack'.*multiples of 32"):
        ExportConfig(**fields)
    assert ExportConfig(**{**fields, "qlinear_group_size": 64}).qlinear_group_size == 64


def test_the_xnnpack_rule_is_the_one_in_the_installed_executorch():
    spec = importlib.util.find_spec("executorch")
    visitor = Path(spec.submodule_search_locations[0]) / "backends" / "xnnpack" / "operators" / "node_visitor.py"
    source = visitor.read_text()
    assert f"quant_params.group_size % {XNNPACK_GROUP_MULTIPLE} == 0" in source
    assert "Only 4b group quantization is supported" in source  # why 8-bit layers are per channel


def test_portable_refuses_groups():
    with pytest.raises(InvalidConfigError, match=r"qlinear_group_size=64 cannot run on backend='portable'"):
        ExportConfig(backend="portable", qlinear="4w", qlinear_group_size=64)


#: Per recipe, how each kind of layer was quantized before the defaults became AUTO:
#: (q_proj, down_proj, head) as (scheme, group size), and the embedding scheme.
RECIPE_PLANS = {
    "xnnpack-fp32": ((None, None), (None, None), (None, None), None),
    "xnnpack-8da8w": (("8da8w", None), ("8da8w", None), ("8da8w", None), "8w"),
    "xnnpack-8da4w": (("8da4w", 32), ("8da8w", None), ("8da8w", None), "8w"),
    "xnnpack-8da4w-kv8": (("8da4w", 32), ("8da8w", None), ("8da8w", None), "8w"),
    "xnnpack-8da4w-pure": (("8da4w", 32), ("8da4w", 32), ("8da4w", 32), "8w"),
    "xnnpack-q4_0": (("q4_0", None), ("q4_0", None), ("q4_0", None), "8w"),  # q4_0 has its fixed block of 32
    "xnnpack-q4_0-head8": (("q4_0", None), ("q4_0", None), ("8da8w", None), "8w"),
    "xnnpack-8da4w-own": (("8da4w_own", None), ("8da4w_own", None), ("8da4w_own", None), "8w"),  # fixed groups of 32
    "portable-fp32": ((None, None), (None, None), (None, None), None),
    "openvino-fp32": ((None, None), (None, None), (None, None), None),
    "openvino-4w": (("4w", 128), ("4w", 128), ("8w", None), "8w"),  # what NNCF is asked for (export/openvino.py)
    "vulkan-fp32": ((None, None), (None, None), (None, None), None),
    "vulkan-4w": (("4w", 32), ("4w", 32), ("4w", 32), "4w"),  # Vulkan's linear_q4gsw and embedding_q4gsw
    "coreml-fp16": ((None, None), (None, None), (None, None), None),
    "coreml-4w": (("4w", 32), ("4w", 32), ("4w", 32), "4w"),  # ExecuTorch's Core ML b4w: blocks of 32
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_the_same_program_and_keeps_its_name(name):
    cfg = recipe(name, max_seq_len=256)
    head = "lm_head"
    plan = tuple(_linear_plan(layer, head, cfg) for layer in ("model.layers.0.self_attn.q_proj",
                                                               "model.layers.0.mlp.down_proj", head))
    assert (*plan, cfg.qembedding) == RECIPE_PLANS[name]
    assert recipe_name(cfg) == name
    assert recipe_name(ExportConfig.from_dict(cfg.to_dict())) == name


def test_a_manifest_written_by_an_older_version_still_loads():
    cfg = ExportConfig.from_dict(OLD_FP32_MANIFEST)
    assert cfg == ExportConfig(max_seq_len=128, verify_tokens=1)  # its program returns the last row only
    assert recipe_name(cfg) == "xnnpack-fp32"
    old_pure = {**OLD_FP32_MANIFEST, "qlinear": "8da4w", "qembedding": "8w"}
    assert recipe_name(ExportConfig.from_dict(old_pure)) == "xnnpack-8da4w-pure"


def test_from_dict_still_refuses_invalid_values_and_unknown_keys():
    with pytest.raises(InvalidConfigError, match="qlinear_group_size=48"):
        ExportConfig.from_dict({**OLD_FP32_MANIFEST, "qlinear": "8da4w", "qlinear_group_size": 48})
    with pytest.raises(InvalidConfigError, match="unknown ExportConfig field"):
        ExportConfig.from_dict({**OLD_FP32_MANIFEST, "qlinear_groupsize": 32})


def test_the_default_recipe_uses_our_kernels_only_where_they_run(monkeypatch):
    from et_transformers import config, kernels

    monkeypatch.setattr(kernels, "available", lambda: True)
    assert config.default_recipe() == "xnnpack-q4_0" and recipe("xnnpack-q4_0").uses_own_kernels
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert config.default_recipe() == "xnnpack-8da4w" and not recipe("xnnpack-8da4w").uses_own_kernels
