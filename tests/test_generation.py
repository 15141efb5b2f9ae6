"""The interleaved decode loop: KV cache == recompute, batch == rows alone, segment rules, input errors."""

import pytest
import torch

from vlatent.generation import LATENT_MARKER, LatentSegment, TextSegment
from vlatent.testing import tiny_image

from conftest import PREFIXES, PROMPTS

IMAGES = [tiny_image(0), tiny_image(1), None]


def assert_same(a, b, atol=1e-5):
    """Two Generations: same segment kinds, same tokens, latents allclose."""
    assert [type(s) for s in a.segments] == [type(s) for s in b.segments], (a.text, b.text)
    for x, y in zip(a.segments, b.segments):
        if isinstance(x, TextSegment):
            assert x.token_ids == y.token_ids
        else:
            torch.testing.assert_close(x.latents, y.latents, atol=atol, rtol=1e-4)
    assert a.finish_reason == b.finish_reason and a.num_steps == b.num_steps


@pytest.mark.parametrize("latent_steps", ["fixed", "auto", "model"])
def test_cache_matches_recompute(switching_model, latent_steps):
    kw = dict(max_new_tokens=30, prefix=PREFIXES, latent_steps=latent_steps)
    cached = switching_model.generate(IMAGES, PROMPTS, use_cache=True, **kw)
    recomputed = switching_model.generate(IMAGES, PROMPTS, use_cache=False, **kw)
    assert any(g.latent_segments for g in cached)
    for a, b in zip(cached, recomputed):
        assert_same(a, b)


@pytest.mark.parametrize("latent_steps", ["fixed", "auto", "model"])
def test_batch_with_rows_switching_modes_matches_rows_alone(switching_model, latent_steps):
    batch = switching_model.generate(IMAGES, PROMPTS, max_new_tokens=30, prefix=PREFIXES, latent_steps=latent_steps)
    # rows enter latent mode after different numbers of text steps
    steps_before_latent = set()
    for g in batch:
        n = 0
        for s in g.segments:
            if isinstance(s, LatentSegment):
                steps_before_latent.add(n)
                break
            n += len(s.token_ids)
    assert len(steps_before_latent) >= 2
    for i, row in enumerate(batch):
        alone = switching_model.generate([IMAGES[i]], [PROMPTS[i]], max_new_tokens=30, prefix=[PREFIXES[i]],
                                         latent_steps=latent_steps)[0]
        assert_same(row, alone, atol=1e-4)


def test_segment_rules(switching_model):
    k = switching_model.method.config.num_latent_tokens
    fixed = switching_model.generate(IMAGES, PROMPTS, max_new_tokens=30, prefix=PREFIXES, latent_steps="fixed")
    segs = [s for g in fixed for s in g.latent_segments]
    assert segs and all(s.k == k for s in segs[:-1])  # the last may be cut by max_new_tokens
    assert any(len(g.latent_segments) >= 2 for g in fixed), "several latent segments per answer"
    assert all(s.latents.shape[1] == switching_model.backbone.hidden_size for s in segs)
    auto = switching_model.generate(IMAGES, PROMPTS, max_new_tokens=60, prefix=PREFIXES, latent_steps="auto")
    assert all(1 <= s.k <= 2 * k for g in auto for s in g.latent_segments)
    g = fixed[1]
    assert g.text == "".join(s.text if isinstance(s, TextSegment) else LATENT_MARKER.format(k=s.k)
                             for s in g.segments)
    assert isinstance(g.segments[0], LatentSegment)  # the prefix ended in <|latent_start|>


def test_mirage_latents_are_fed_back_hidden_states(mirage_model):
    """Mirage's next latent is the previous position's final hidden state: the first latent equals the prompt's
    last hidden state."""
    g = mirage_model.generate([IMAGES[0]], ["Look."], max_new_tokens=3, prefix="<|latent_start|>")[0]
    from vlatent.generation import encode_prompts

    batch = encode_prompts(mirage_model, [[IMAGES[0]]], ["Look."], ["<|latent_start|>"])
    with torch.no_grad():
        h = mirage_model.run_language_model(mirage_model.embed_inputs(batch), batch).last_hidden_state[0, -1]
    torch.testing.assert_close(g.segments[0].latents[0], h, atol=1e-5, rtol=1e-4)


def test_sampling_is_reproducible_with_a_generator(mirage_model):
    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        return [g.text for g in mirage_model.generate(IMAGES, PROMPTS, max_new_tokens=12, do_sample=True,
                                                      temperature=0.8, top_p=0.9, generator=gen)]

    assert sample(1) == sample(1)


def test_text_method_generates_without_latents(tiny_base):
    from vlatent.model import LatentVLM

    model = LatentVLM.from_pretrained(tiny_base, method="text")
    gens = model.generate(IMAGES, PROMPTS, max_new_tokens=8)
    assert all(not g.latent_segments for g in gens)
    with pytest.raises(ValueError, match="no latent tokens"):
        model.generate(IMAGES[:1], PROMPTS[:1], prefix="<|latent_start|>")


@pytest.mark.parametrize("images, prompts, kwargs, match", [
    ([42], ["q"], {}, r"images\[0\] must be a PIL.Image"),
    ([[tiny_image(0), "nope.png"]], ["q"], {}, "does not exist"),
    ([None, None], ["q"], {}, "one entry per prompt: got 2 for 1 prompts"),
    ([None], [3], {}, "prompts must be"),
    ([None], ["q"], {"latent_steps": "sometimes"}, "latent_steps"),
    ([None], ["q"], {"max_new_tokens": 0}, "max_new_tokens"),
    ([None], ["q"], {"prefix": ["a", "b"]}, "prefix must be"),
])
def test_bad_input_is_named(mirage_model, images, prompts, kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        mirage_model.generate(images, prompts, **kwargs)


def test_chat_messages_render_as_the_template_does(mirage_model):
    """A system prompt and earlier turns reach the model as the processor's own chat template renders them; a one-turn
    conversation is the plain string prompt."""
    from vlatent.generation import encode_prompts

    history = [{"role": "system", "content": "You solve mazes."},
               {"role": "user", "content": [{"type": "text", "text": "Hi."}]},
               {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which way first?"}]}]
    template = [dict(m, content=[{"type": "text", "text": m["content"]}]) if isinstance(m["content"], str) else m
                for m in history]
    proc = mirage_model.processor
    text = proc.apply_chat_template(template, tokenize=False, add_generation_prompt=True)
    expected = proc(text=[text], images=[[IMAGES[0]]], add_special_tokens=False)["input_ids"][0]
    ids = encode_prompts(mirage_model, [[IMAGES[0]]], [history], [""])["input_ids"][0].tolist()
    assert ids == list(expected)
    assert "You solve mazes." in text and text.index("Hello.") < text.index("Which way first?")
    one_turn = mirage_model.generate(IMAGES[0], [{"role": "user", "content": "Which way first?"}], max_new_tokens=6)
    string = mirage_model.generate(IMAGES[0], "Which way first?", max_new_tokens=6)
    assert one_turn[0].segments[0].token_ids == string[0].segments[0].token_ids


def test_chat_messages_place_images_where_marked(mirage_model):
    """With an image item in the second user turn, the image tokens sit after the first turn's text."""
    from vlatent.generation import encode_prompts

    messages = [{"role": "user", "content": "First a question."}, {"role": "assistant", "content": "Ok."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Now look."}]}]
    ids = encode_prompts(mirage_model, [[IMAGES[0]]], [messages], [""])["input_ids"][0].tolist()
    tok = mirage_model.tokenizer
    image_pos = ids.index(tok.convert_tokens_to_ids("<|image_pad|>"))
    assert tok.decode(ids[:image_pos]).count("<|im_start|>user") == 2  # the image is in the second user turn


@pytest.mark.parametrize("prompts, kwargs, error, match", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], {}, ValueError,
     "last message must be the user's"),
    ([{"role": "tool", "content": "q"}], {}, ValueError, r"message 0: needs role system, user or assistant"),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]}], {},
     ValueError, r"prompts\[0\]: the messages mark 2 image\(s\), the row has 1"),
    ([{"role": "user", "content": [{"type": "video"}]}], {}, ValueError, "content must be a string or a list"),
    ("q", {"num_beams": 4}, TypeError, "does not support num_beams: .*one sequence per prompt"),
    ("q", {"top_k": 5, "repetition_penalty": 1.1}, TypeError, "does not support repetition_penalty, top_k"),
])
def test_bad_chat_messages_and_generation_options_are_refused(mirage_model, prompts, kwargs, error, match):
    with pytest.raises(error, match=match):
        mirage_model.generate(IMAGES[0], prompts, max_new_tokens=4, **kwargs)
