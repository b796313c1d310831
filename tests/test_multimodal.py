"""Image-text-to-text programs: tiny random LLaVA, SmolVLM, Idefics3 and Gemma 3 built in code.

Golden tests: the float32 program, given the same image tensor, generates exactly the tokens of
transformers' eager ``generate()``, and ExecuTorch's C++ ``MultimodalRunner`` the same text as our
``generate()``. Then the bad inputs (each a ``ValueError`` before the program runs), the saved
folder (processor included) and the quantized recipe.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from et_transformers import ETModelForCausalLM, ETModelForImageTextToText
from et_transformers.errors import ProgramError, UnsupportedModelError

FAMILIES = ("llava", "smolvlm", "idefics3", "gemma3")
NEW = 12


@pytest.fixture(scope="session")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {kind: tiny.make_vlm_dir(kind, root / kind) for kind in FAMILIES}


@pytest.fixture(scope="session")
def vlm_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vlm-cache")


@pytest.fixture(scope="session")
def vlm_models(vlm_dirs, vlm_cache):
    """The fp32 program of each family (``verify_tokens=4``: prompt lookup can verify drafts)."""
    return {
        kind: ETModelForImageTextToText.from_pretrained(
            folder, recipe="xnnpack-fp32", max_seq_len=128, verify_tokens=4, cache_dir=vlm_cache
        )
        for kind, folder in vlm_dirs.items()
    }


def _eager(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).eval()


@pytest.mark.parametrize("kind", FAMILIES)
def test_fp32_program_generates_transformers_tokens(kind, vlm_dirs, vlm_models):
    folder, model = vlm_dirs[kind], vlm_models[kind]
    inputs = tiny.vlm_inputs(kind, folder)
    with torch.no_grad():
        expected = _eager(folder).generate(**inputs, max_new_tokens=NEW, do_sample=False)
    got = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    assert got.tolist() == expected.tolist()
    assert set(model.program.method_names) >= {"vision_encoder", "token_embedding", "text_decoder"}
    assert model.program.image_shape == (1, 3, tiny.IMAGE_SIDE, tiny.IMAGE_SIDE)
    assert model.program.tokens_per_image == tiny.VLM_TOKENS_PER_IMAGE[kind]
    positions, features = model.image_features(inputs["input_ids"], inputs["pixel_values"])
    assert features.abs().mean() > 0.01  # the image reaches the decoder (not a zero projection)
    other = dict(inputs, pixel_values=-inputs["pixel_values"])
    with torch.no_grad():
        expected = _eager(folder).generate(**other, max_new_tokens=NEW, do_sample=False)
    assert model.generate(**other, max_new_tokens=NEW, do_sample=False).tolist() == expected.tolist()


def test_the_image_decides_the_answer(vlm_dirs, vlm_models):
    """Another image gives other tokens (so the features reach the decoder), the same ones eager does."""
    folder, model = vlm_dirs["llava"], vlm_models["llava"]
    first, second = (tiny.vlm_inputs("llava", folder, seed=s) for s in (0, 1))
    eager = _eager(folder)
    outs = []
    for inputs in (first, second):
        with torch.no_grad():
            expected = eager.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        got = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        assert got.tolist() == expected.tolist()
        outs.append(got[0, -NEW:].tolist())
    assert outs[0] != outs[1]


def test_stream_and_prompt_lookup_give_the_same_tokens(vlm_dirs, vlm_models):
    model = vlm_models["llava"]
    inputs = tiny.vlm_inputs("llava", vlm_dirs["llava"])
    plain = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)[0, -NEW:].tolist()
    looked_up = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, prompt_lookup_num_tokens=3)
    assert looked_up[0, -NEW:].tolist() == plain
    records = list(model.stream_generate(**inputs, max_new_tokens=NEW, do_sample=False))
    assert [r.token for r in records] == plain
    assert records[-1].finish_reason == "length"
    # A text-only prompt runs on the same program, no image involved.
    text = model.generate(inputs["input_ids"][:, -5:], max_new_tokens=4, do_sample=False)
    assert text.shape == (1, 9)


@pytest.mark.parametrize("kind", FAMILIES)
def test_cpp_multimodal_runner_generates_the_same_text(kind, vlm_dirs, vlm_models):
    from executorch.extension.llm.runner import (
        GenerationConfig, MultimodalRunner, make_image_input, make_token_input,
    )

    model = vlm_models[kind]
    inputs = tiny.vlm_inputs(kind, vlm_dirs[kind])
    ids = inputs["input_ids"][0].tolist()
    got = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    image = model.image_token_id
    first, last = ids.index(image), len(ids) - 1 - ids[::-1].index(image)
    pixels = inputs["pixel_values"].reshape(model.program.image_shape)
    runner_inputs = ([make_token_input(ids[:first])] if first else []) + [
        make_image_input(pixels), make_token_input(ids[last + 1:])
    ]
    runner = MultimodalRunner(str(model.pte_path), str(model.pte_path.parent / "tokenizer.json"))
    pieces: list[str] = []
    runner.generate(runner_inputs, GenerationConfig(max_new_tokens=NEW, temperature=0.0, echo=False), pieces.append)
    assert "".join(pieces) == model.tokenizer.decode(got[0, len(ids):])


# -- bad input: a clear ValueError before the program runs ----------------------------------------


def _unchanged(model):
    """Context: the block must raise before the program runs (its execution counter stays)."""
    class _Check:
        def __enter__(self):
            self.before = model.program.executions

        def __exit__(self, *exc):
            assert model.program.executions == self.before
            return False

    return _Check()


def test_bad_image_inputs_raise_before_running(vlm_dirs, vlm_models):
    model = vlm_models["llava"]
    inputs = tiny.vlm_inputs("llava", vlm_dirs["llava"])
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    image = model.image_token_id
    text_ids = ids[:, ids[0] != image]
    cases = [
        (dict(input_ids=ids), "no pixel_values"),
        (dict(input_ids=text_ids, pixel_values=pixels), "no image token"),
        (dict(input_ids=ids, pixel_values=pixels[:, :, :16, :16]), "takes [3, 32, 32]"),
        (dict(input_ids=ids, pixel_values=torch.cat([pixels, pixels])), "give 32 features"),
        (dict(input_ids=ids.repeat(2, 1), pixel_values=pixels), "one prompt at a time"),
        (dict(input_ids=ids, pixel_values=pixels.to(torch.uint8)), "float tensor"),
        (dict(input_ids=ids, pixel_values=pixels, images=[object()]), "takes no PIL images"),
    ]
    for kwargs, message in cases:
        with _unchanged(model), pytest.raises(ValueError, match=message.replace("[", r"\[")):
            model.generate(**kwargs, max_new_tokens=2)
    many = torch.cat([ids[:, :16]] * 9 + [ids[:, 16:]], dim=1)  # 9 images of 16 tokens in a context of 128
    with _unchanged(model), pytest.raises(ValueError, match="9 image.*context holds 128"):
        model.generate(many, pixel_values=torch.cat([pixels] * 9), max_new_tokens=2)


def test_text_models_refuse_images_and_each_class_names_the_other(tiny_llama_et, tiny_llama_dir, vlm_dirs, vlm_models):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="text-only model.*ETModelForImageTextToText"):
        tiny_llama_et.generate(ids, pixel_values=torch.zeros(1, 3, 32, 32), max_new_tokens=2)
    with pytest.raises(UnsupportedModelError, match="ETModelForImageTextToText"):
        ETModelForCausalLM.from_pretrained(vlm_dirs["llava"], recipe="xnnpack-fp32", max_seq_len=64)
    with pytest.raises(UnsupportedModelError, match="text-only.*ETModelForCausalLM"):
        ETModelForImageTextToText.from_pretrained(tiny_llama_dir, recipe="xnnpack-fp32", max_seq_len=64)
    with pytest.raises(ProgramError, match="image-text-to-text program.*ETModelForImageTextToText"):
        ETModelForCausalLM.from_pte(vlm_models["llava"].pte_path)


def test_saved_folder_loads_without_export_and_carries_the_processor(vlm_dirs, vlm_models, tmp_path):
    from transformers import AutoProcessor

    model = vlm_models["llava"]
    saved = model.save_pretrained(tmp_path / "saved")
    for name in ("processor_config.json", "tokenizer.json", "manifest.json"):
        assert (saved / name).is_file(), name
    again = ETModelForImageTextToText.from_pretrained(saved)
    assert again.stats.export_time is None
    processor = AutoProcessor.from_pretrained(saved)
    inputs = dict(processor(images=tiny.random_image(3), text="<image>Rome is", return_tensors="pt"))
    assert again.generate(**inputs, max_new_tokens=6).tolist() == model.generate(**inputs, max_new_tokens=6).tolist()
    assert again.processor is not None
    card = (saved / "README.md").read_text()
    assert "ETModelForImageTextToText.from_pretrained" in card and "MultimodalRunner" in card
    assert "ETModelForCausalLM" not in card


def test_quantized_recipe_quantizes_the_vision_encoder(vlm_dirs, vlm_cache):
    model = ETModelForImageTextToText.from_pretrained(
        vlm_dirs["smolvlm"], recipe="xnnpack-8da4w", max_seq_len=64, cache_dir=vlm_cache
    )
    report = model.manifest.program["quantization"]
    assert report["vision"]["scheme"] == "8da8w" and report["vision"]["linear"]["grouped"] > 0
    inputs = tiny.vlm_inputs("smolvlm", vlm_dirs["smolvlm"])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("kind", ("llava", "idefics3"))
def test_chat_with_images_reuses_the_cache_and_matches_stateless_generate(kind, vlm_dirs, vlm_models, tmp_path):
    from et_transformers import ChatSession

    model = vlm_models[kind]
    path = tmp_path / "photo.png"
    tiny.random_image(5).save(path)
    session = ChatSession(model, max_new_tokens=6, do_sample=False)
    first = session.send("What is this?", images=[path])
    second = session.send("And this one?", images=[tiny.random_image(6)])
    assert session.stats.extra["cached_tokens"] > 0  # the first turn (its image included) was not read again
    third = session.send("Thanks")
    assert len(session.images) == 2
    # Stateless: the whole conversation through the processor and generate().
    ids, pixels = session.render_with_images(session.messages[:-1], session.images)
    out = model.generate(torch.tensor([ids]), **pixels, max_new_tokens=6, do_sample=False)
    assert model.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True) == third
    assert first and second is not None
    text_only = ChatSession(vlm_models[kind])
    with pytest.raises(ValueError, match="cannot read the image"):
        text_only.send("hi", images=[tmp_path / "missing.png"])


def test_cli_generate_with_an_image_chat_with_image_and_inspect(vlm_dirs, vlm_models, tmp_path):
    from conftest import run_cli

    model = vlm_models["llava"]
    folder = model.pte_path.parent
    path = tmp_path / "photo.png"
    tiny.random_image(7).save(path)
    greedy = ("--max-new-tokens", "6")
    proc = run_cli("generate", folder, "Paris is", "--image", path, *greedy)
    assert proc.returncode == 0, proc.stderr
    inputs = model.prepare_inputs("Paris is", [tiny.random_image(7).convert("RGB")], chat=False)
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert proc.stdout.strip() == model.tokenizer.decode(expected[0, inputs["input_ids"].shape[1]:],
                                                          skip_special_tokens=True).strip()
    chat = run_cli("chat", folder, *greedy, input=f"/image {path}\nWhat is this?\nAnd now?\n")
    assert chat.returncode == 0, chat.stderr
    assert "goes with your next message" in chat.stderr
    inspected = run_cli("inspect", folder)
    assert inspected.returncode == 0, inspected.stderr
    for method in ("vision_encoder", "token_embedding", "text_decoder"):
        assert method in inspected.stdout
    refused = run_cli("generate", folder, "hi", "--image", tmp_path / "none.png", *greedy)
    assert refused.returncode != 0 and "cannot read the image" in refused.stderr


def test_prompt_cache_reuses_a_prefix_only_while_its_images_are_the_same(vlm_dirs, vlm_models):
    from et_transformers.prompt_cache import PromptCache

    model = vlm_models["llava"]
    cache = PromptCache(model)
    inputs = [tiny.vlm_inputs("llava", vlm_dirs["llava"], seed=s) for s in (0, 1)]
    ids = inputs[0]["input_ids"][0].tolist()
    assert ids == inputs[1]["input_ids"][0].tolist()  # the same placeholders, other pixels
    features = [model.image_features(x["input_ids"], x["pixel_values"]) for x in inputs]
    first_image = int(features[0][0][0])
    cache.generate(ids, image_features=features[0], max_new_tokens=3, do_sample=False)
    assert cache.matched(ids, features[0]) == len(ids) - 1
    assert cache.matched(ids, features[1]) == first_image  # the other image is read again
    new, cached, _ = cache.generate(ids, image_features=features[1], max_new_tokens=NEW, do_sample=False)
    assert cached == first_image
    plain = model.generate(inputs[1]["input_ids"], pixel_values=inputs[1]["pixel_values"], max_new_tokens=NEW,
                           do_sample=False)
    assert new == plain[0, len(ids):].tolist()


def test_server_chat_completion_with_an_image(vlm_dirs, vlm_models, tiny_llama_et):
    pytest.importorskip("uvicorn")
    import base64
    import io

    import openai

    from et_transformers.serving import create_app, running

    model = vlm_models["llava"]
    buffer = io.BytesIO()
    tiny.random_image(9).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Paris is"}]
    with running(create_app([model], model_id="vlm")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": content}],
                                               max_tokens=6, temperature=0)
        again = client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": content}],
                                               max_tokens=6, temperature=0)
        with pytest.raises(openai.BadRequestError, match="data:image"):
            client.chat.completions.create(model="vlm", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Paris is"}]}]
    inputs = model.prepare_inputs(messages, [tiny.random_image(9).convert("RGB")])
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    text = model.tokenizer.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.choices[0].message.content == text == again.choices[0].message.content
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]
    with running(create_app([tiny_llama_et], model_id="text")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="text-only"):
            client.chat.completions.create(model="text", messages=[{"role": "user", "content": content}], max_tokens=2)
