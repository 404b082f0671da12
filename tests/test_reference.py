"""The embedded reference model: dataset, checker, shipped pipeline, LoRAs, HyCa on it.

The checker is validated against the generator's own labels first; only then is it used
to judge the trained model's images."""

import os

import numpy as np
import pytest
import torch

import hyca
from diffusers import FlowMatchEulerDiscreteScheduler
from hyca.reference import CaptionTokenizer, ReferencePipeline, checker, data, load_pipeline, shipped_path
from hyca.reference import tiny_components
from hyca.reference.model import image_ids, pack, patch_of, unpack, velocity
from hyca.reference.text import caption_vocabulary

LORAS = shipped_path() / "loras"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A model this small gains nothing from intra-op threads, and on a shared, loaded CPU
    # two spinning threads slow it down many times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: everything here loads offline
    return load_pipeline()


def generate(pipe, captions, steps=20, seed=0, **kw):
    return pipe(captions, num_inference_steps=steps, seed=seed, output_type="np", **kw).images


# --- dataset -------------------------------------------------------------------------------

def test_dataset_is_deterministic_from_its_seed():
    a, caps_a, _ = data.batch(3, 64)
    b, caps_b, _ = data.batch(3, 64)
    c, _, _ = data.batch(4, 64)
    assert np.array_equal(a, b) and caps_a == caps_b
    assert not np.array_equal(a, c)
    assert a.shape == (64, data.SIZE, data.SIZE, 3) and a.dtype == np.uint8


def test_captions_name_the_labels_and_splits_respect_held_out_triples():
    _, captions, scenes = data.batch(5, 400, "all")
    for caption, c, s, z, p, b in zip(captions, scenes.colour, scenes.shape, scenes.size, scenes.position,
                                      scenes.background):
        words = caption.split()
        assert words[1:4] == [data.SIZE_NAMES[z], data.COLOUR_NAMES[c], data.SHAPES[s]]
        assert caption.split(" at the ")[1].split(" on a ")[0] == data.POSITION_NAMES[p]
        assert caption.endswith(" and ".join(data.BACKGROUND_NAMES[i] for i in data.BACKGROUNDS[b]) + " background")
    assert not data.batch(6, 2000, "train")[2].is_held_out().any()
    assert data.batch(7, 200, "heldout")[2].is_held_out().all()
    # every colour and every position still occurs in training, in other combinations
    train = data.batch(8, 2000, "train")[2]
    assert set(train.colour) == set(range(len(data.COLOUR_NAMES)))
    assert set(train.position) == set(range(len(data.POSITION_NAMES)))


def test_render_draws_the_labelled_colour_inside_the_shape_mask():
    scenes = data.scenes_from_labels("blue", "square", "large", "bottom right", ("white", "black"))
    image = data.render(scenes)[0]
    assert tuple(image[23, 23]) == data.SHAPE_COLOURS["blue"]  # nominal centre (x=23, y=23)
    assert tuple(image[2, 2]) == data.BACKGROUND_COLOURS["white"]  # top half
    assert tuple(image[30, 2]) == data.BACKGROUND_COLOURS["black"]  # bottom half
    outline = data.render(scenes, "outline")[0]
    assert tuple(outline[23, 23]) == data.BACKGROUND_COLOURS["black"]


# --- checker -------------------------------------------------------------------------------

def test_checker_agrees_with_the_generator_labels():
    images, _, scenes = data.batch(11, 400, "all")
    assert checker.adherence(images, scenes) == {"colour": 1.0, "position": 1.0, "both": 1.0, "n": 400}
    outlined = data.render(scenes, "outline")
    assert checker.adherence(outlined, scenes)["both"] == 1.0


def test_checker_measures_fill_and_saturation():
    _, _, scenes = data.batch(12, 100)
    filled = [checker.read(im) for im in data.render(scenes)]
    outline = [checker.read(im) for im in data.render(scenes, "outline")]
    pastel = [checker.read(im) for im in data.render(scenes, "pastel")]
    assert min(r.centre_filled for r in filled) == 1.0
    assert np.mean([r.centre_filled for r in outline]) < 0.1
    assert max(r.saturation for r in pastel) < min(r.saturation for r in filled)
    assert checker.read(np.full((32, 32, 3), 0.5)).colour is None  # plain gray: no shape


def test_checker_rejects_a_batch():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        checker.read(np.zeros((2, 32, 32, 3)))


# --- text ----------------------------------------------------------------------------------

def test_tokenizer_pads_and_names_unknown_words():
    tok = CaptionTokenizer(caption_vocabulary(), 16)
    ids = tok(["a small red circle", ""])
    assert ids.shape == (2, 16) and (ids[1] == 0).all() and (ids[0, 4:] == 0).all()
    assert [tok.vocabulary[i] for i in ids[0, :4]] == ["a", "small", "red", "circle"]
    with pytest.raises(ValueError, match=r"\['dragon'\]"):
        tok(["a small red dragon"])


# --- the shipped pipeline ------------------------------------------------------------------

def test_shipped_pipeline_loads_offline_and_is_deterministic(pipe):
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    size = sum(f.stat().st_size for f in shipped_path().rglob("*.safetensors"))
    assert size < 20e6
    caption = ["a large green diamond at the center on a gray background"]
    a = generate(pipe, caption * 2, seed=3)
    b = generate(pipe, caption * 2, seed=3)
    c = generate(pipe, caption * 2, seed=4)
    assert a.shape == (2, 32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    pil = pipe(caption[0], num_inference_steps=4, seed=3).images
    assert len(pil) == 1 and pil[0].size == (32, 32)
    assert pipe(caption, num_inference_steps=4, seed=3, output_type="pt").images.shape == (1, 3, 32, 32)


def test_generated_held_out_captions_follow_colour_and_position(pipe):
    scenes = data.sample_scenes(np.random.default_rng(99), 6, "heldout")
    result = checker.adherence(generate(pipe, scenes.captions(), steps=25, seed=1), scenes)
    # The benchmark measures the rate on hundreds of captions; here a few fixed ones.
    assert result["colour"] >= 0.9 and result["position"] >= 0.8, result


def test_guidance_combines_the_caption_and_empty_caption_branches(pipe):
    # One Euler step from sigma 1 to 0 is x - v; v must be v_empty + g (v_caption - v_empty).
    caption = ["a small yellow triangle at the top right on a black background"]
    patch = patch_of(pipe.transformer)
    latents = pack(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), patch)
    out = pipe(caption, num_inference_steps=1, guidance_scale=3.0, latents=latents, output_type="pt").images
    with torch.no_grad():
        v_caption = velocity(pipe.transformer, latents, torch.ones(1), *pipe.text_encoder.encode(caption), 32, 32)
        v_empty = velocity(pipe.transformer, latents, torch.ones(1), *pipe.text_encoder.encode([""]), 32, 32)
    expected = (unpack(latents - (v_empty + 3.0 * (v_caption - v_empty)), patch, 32, 32).clamp(-1, 1) + 1) / 2
    assert torch.allclose(out, expected, atol=1e-5)
    plain = pipe(caption, num_inference_steps=1, latents=latents, output_type="pt").images
    assert not torch.allclose(plain, out, atol=1e-3)


def test_bad_arguments_are_explained(pipe, tmp_path):
    with pytest.raises(ValueError, match="output_type"):
        pipe("a small red circle", output_type="latent")
    with pytest.raises(ValueError, match="dragon"):
        pipe("a red dragon")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_pipeline(tmp_path)


def test_tiny_components_round_trip_through_from_pretrained(tmp_path):
    tiny = tiny_components()
    tiny.save_pretrained(tmp_path)
    again = ReferencePipeline.from_pretrained(tmp_path, local_files_only=True)
    again.set_progress_bar_config(disable=True)
    caption = ["a small red circle at the top left on a white background"]
    for name in ("transformer", "text_encoder"):
        saved, loaded = getattr(tiny, name).state_dict(), getattr(again, name).state_dict()
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # same weights; outputs agree up to float summation order (not bit-exact after reload)
    np.testing.assert_allclose(generate(tiny, caption, steps=3), generate(again, caption, steps=3), atol=1e-5)


# --- LoRAs ---------------------------------------------------------------------------------

def test_loras_restyle_as_intended_switch_and_unload_exactly(pipe):
    scenes = data.sample_scenes(np.random.default_rng(5), 8, "train")
    run = lambda: generate(pipe, scenes.captions(), steps=12)  # noqa: E731
    base = run()
    pipe.load_lora_weights(LORAS, weight_name="outline.safetensors", adapter_name="outline")
    pipe.load_lora_weights(LORAS, weight_name="pastel.safetensors", adapter_name="pastel")
    try:
        pipe.set_adapters(["outline"], [1.0])
        outline = run()
        pipe.set_adapters(["pastel"], [1.0])
        pastel = run()
    finally:
        pipe.unload_lora_weights()
    # outline: the centre of the shape turns background-coloured, the colour stays. The
    # LoRA is short-trained: its outlines are ragged, so the centres empty only partly
    # (on the generator's own outline images centre_filled is ~0).
    filled = np.mean([checker.read(im).centre_filled for im in base])
    hollow = np.mean([checker.read(im).centre_filled for im in outline])
    assert filled > 0.8 and hollow < 0.6 * filled, (filled, hollow)
    assert checker.adherence(outline, scenes)["colour"] >= 0.75
    # pastel: the shapes lose saturation
    sat = lambda images: np.mean([checker.saturation(im) for im in images])  # noqa: E731
    assert sat(pastel) < 0.7 * sat(base), (sat(pastel), sat(base))
    assert np.array_equal(run(), base)


def _timesteps_seen(pipe, **call):
    """The timestep the transformer receives at each step of ``pipe(**call)``."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(float(kwargs["timestep"][0])), with_kwargs=True)
    try:
        pipe("a small red circle", output_type="pt", seed=0, **call)
    finally:
        handle.remove()
    return seen


def test_custom_sigmas_go_to_the_scheduler_as_in_diffusers(pipe):
    # diffusers' retrieve_timesteps: scheduler.set_timesteps(sigmas=...), the step count their length
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.1]
    own = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    own.set_timesteps(sigmas=sigmas)
    expected = (own.timesteps / 1000).tolist()
    assert len(expected) == 5 and _timesteps_seen(pipe, sigmas=sigmas, num_inference_steps=50) == \
        pytest.approx(expected, abs=1e-6)
    # the scheduler's own 8-step sigmas given explicitly: the same image as num_inference_steps=8
    own.set_timesteps(8)
    default = own.sigmas[:-1].tolist()
    caption = ["a large blue square at the center on a white background"]
    assert np.array_equal(generate(pipe, caption, steps=8, seed=2),
                          pipe(caption, sigmas=default, seed=2, output_type="np").images)
    hyca.enable(pipe, "taylor-2", interval=3, warmup=2)  # HyCa counts the call's steps from its sigmas
    try:
        pipe(caption, sigmas=sigmas, num_inference_steps=50, seed=2, output_type="np")
        stats = hyca.stats(pipe)[0]
    finally:
        hyca.disable(pipe)
    assert (stats.computed, stats.forecast) == (3, 2)  # steps 0, 1 (warm-up) and 4 (1 + N, the last of 5)


def test_a_generator_list_gives_each_image_its_own_noise(pipe):
    captions = ["a large red circle at the center on a white background",
                "a small blue square at the top left on a black and white background"]
    batch = pipe(captions, num_inference_steps=6, output_type="np",
                 generator=[torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]).images
    for caption, seed, image in zip(captions, (11, 12), batch):
        alone = pipe([caption], num_inference_steps=6, output_type="np",
                     generator=torch.Generator().manual_seed(seed)).images[0]
        np.testing.assert_allclose(image, alone, atol=1e-5)  # batched matmuls may round differently
    one = pipe(captions, num_inference_steps=6, output_type="np", generator=torch.Generator().manual_seed(11)).images
    assert not np.allclose(one[1], batch[1], atol=1e-2)  # one generator draws the whole batch's noise
    with pytest.raises(ValueError, match="list of generators of length 3"):
        pipe(captions, num_inference_steps=2, output_type="np", generator=[torch.Generator() for _ in range(3)])


# --- HyCa on the reference model ------------------------------------------------------------

def test_hyca_schedules_the_reference_pipeline_and_disable_is_exact(pipe):
    caption = ["a large red square at the bottom left on a white and gray background"]
    base = generate(pipe, caption, steps=12)
    hyca.enable(pipe, "taylor-2", interval=3, warmup=2)
    try:
        fast = generate(pipe, caption, steps=12)
        again = generate(pipe, caption, steps=12)
        stats = hyca.stats(pipe)[0]
    finally:
        hyca.disable(pipe)
    # steps 0, 1 (warm-up), 4, 7, 10 and the last one
    assert (stats.computed, stats.forecast) == (6, 6)
    assert np.array_equal(fast, again)  # the pipeline reset HyCa's state between calls
    assert not np.array_equal(fast, base)
    assert checker.read(fast[0]).colour == checker.read(base[0]).colour
    assert np.array_equal(generate(pipe, caption, steps=12), base)


def test_pixel_packing_matches_the_rope_positions():
    images = torch.randn(2, 3, 32, 32)
    tokens = pack(images, 4)
    assert tokens.shape == (2, 64, 48) and torch.equal(unpack(tokens, 4, 32, 32), images)
    ids = image_ids(32, 32, 4)
    k = 19  # token 19 holds the 4x4 patch at (row, column) = ids[k, 1:], channel-major
    row, col = int(ids[k, 1]), int(ids[k, 2])
    assert torch.equal(tokens[:, k].reshape(2, 3, 4, 4), images[:, :, 4 * row: 4 * row + 4, 4 * col: 4 * col + 4])
