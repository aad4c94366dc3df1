"""`genlab vlm generate` flags and images: bad values are GenlabErrors naming the flag; transparency,
image modes, the context cap and one line per answer."""

import numpy as np
import pytest
import torch
from PIL import Image

import genlab.vlm.generation
from genlab.cli import main
from genlab.errors import ConfigError, FileFormatError, GenlabError
from genlab.vlm.cli import GenerateArgs, generate_cmd
from genlab.vlm.processor import PaliGemmaProcessor, to_rgb
from tests.vlm.test_damaged_files import make_tiny_folder

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = make_tiny_folder(tmp_path_factory.mktemp("gen"))
    Image.new("RGB", (40, 30), (10, 200, 30)).save(d / "img.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(d / "transparent.png")  # red, fully transparent
    (d / "text.png").write_text("not an image")
    (d / "dir.png").mkdir()
    data = (d / "img.png").read_bytes()
    (d / "trunc.png").write_bytes(data[: len(data) // 2])
    return d


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """The same model with a 300-position context."""
    d = make_tiny_folder(tmp_path_factory.mktemp("ctx"), max_position_embeddings=300)
    Image.new("RGB", (32, 32)).save(d / "x.png")
    return d


def args(folder, **kw) -> GenerateArgs:
    kw.setdefault("image", (str(folder / "img.png"),))
    return GenerateArgs(model=str(folder), **{"max_new_tokens": 2, "device": "cpu", **kw})


def record_generate(monkeypatch) -> list[dict]:
    """Wrap genlab.vlm.generation.generate to record what the command passes it."""
    calls, real = [], genlab.vlm.generation.generate

    def spy(model, input_ids, attention_mask, pixel_values, **kw):
        calls.append({"input_ids": input_ids, "pixel_values": pixel_values, **kw})
        return real(model, input_ids, attention_mask, pixel_values, **kw)

    monkeypatch.setattr(genlab.vlm.generation, "generate", spy)
    return calls


@pytest.mark.parametrize("kw, needle", [
    (dict(max_new_tokens=-1), "--max-new-tokens must be >= 0, got -1"),
    (dict(threads=-2), "--threads must be >= 0"),
    (dict(do_sample=True, temperature=0.0), "--temperature: temperature must be > 0"),
    (dict(do_sample=True, temperature=-1.0), "--temperature: "),
    (dict(do_sample=True, top_p=1.5), "--top-p: top_p must be in (0, 1]"),
    (dict(do_sample=True, top_p=0.0), "--top-p: "),
    (dict(top_p=-0.1), "--top-p: "),
    (dict(do_sample=True, top_k=-1), "--top-k: top_k must be an integer >= 0"),
    (dict(device="tpu"), "--device tpu: must be auto, cpu, cuda, cuda:N or mps"),
    (dict(device="cuda:99"), "--device cuda:99: "),
    (dict(image=()), "--image: give at least one image file"),
    (dict(prompt=("a", "b")), "--prompt: give one prompt, or one per image (1), not 2"),
    (dict(prompt=("what is <image>?",)), "--prompt: prompts must not contain '<image>'"),
])
def test_bad_flags_name_the_flag(folder, kw, needle):
    with pytest.raises(ConfigError) as info:
        generate_cmd(args(folder, **kw))
    assert needle in str(info.value), str(info.value)


def test_temperature_is_ignored_when_greedy(folder, capsys):
    assert len(generate_cmd(args(folder, temperature=0.0))) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_clear_line(folder, capsys):
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        generate_cmd(args(folder, device="cuda"))
    assert main(["vlm", "generate", "--model", str(folder), "--image", str(folder / "img.png"),
                 "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genlab: error: --device cuda:")


@pytest.mark.parametrize("name, kind, needle", [
    ("nope.png", ConfigError, "no such file"),
    ("dir.png", ConfigError, "is a folder, not an image file"),
    ("text.png", FileFormatError, "cannot read it as an image"),
    ("trunc.png", FileFormatError, "cannot read it as an image"),
])
def test_bad_images_name_the_image(folder, name, kind, needle):
    with pytest.raises(kind) as info:
        generate_cmd(args(folder, image=(str(folder / name),)))
    assert str(info.value).startswith(f"--image {folder / name}: {needle}"), str(info.value)


def test_transparency_is_white_through_the_command_and_the_processor(folder, monkeypatch, capsys):
    """V20: a fully transparent (255, 0, 0, 0) image is white, [1, 1, 1], on both paths."""
    calls = record_generate(monkeypatch)
    generate_cmd(args(folder, image=(str(folder / "transparent.png"),)))
    cli_pixels = calls[0]["pixel_values"]  # (1, 3, 32, 32)
    assert torch.equal(cli_pixels, torch.ones_like(cli_pixels))
    proc = PaliGemmaProcessor.from_pretrained(folder)
    api_pixels = proc(Image.open(folder / "transparent.png"), "caption en")["pixel_values"]
    assert torch.equal(api_pixels, cli_pixels)


def _mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (12, 10, 4), dtype=np.uint8), "RGBA")
    p_transparent = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    p_transparent.info["transparency"] = 3  # palette entry 3 is see-through
    l_transparent = rgba.convert("L")
    l_transparent.info["transparency"] = int(np.asarray(l_transparent)[0, 0])
    return {
        "RGBA": rgba, "LA": rgba.convert("LA"), "P+transparency": p_transparent, "L+transparency": l_transparent,
        "P": rgba.convert("RGB").convert("P"), "L": rgba.convert("L"), "CMYK": rgba.convert("RGB").convert("CMYK"),
        "1": rgba.convert("1"), "RGB": rgba.convert("RGB"), "YCbCr": rgba.convert("RGB").convert("YCbCr"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_image_modes_match_transformers_and_the_command(folder, tmp_path, monkeypatch, mode, capsys):
    """Each mode becomes the RGB transformers' convert_to_rgb gives (transparency over white), and
    the command (which reads the file) gives the model what the processor gives the Python API."""
    from transformers.image_transforms import convert_to_rgb

    image = _mode_images()[mode]
    np.testing.assert_array_equal(to_rgb(image), convert_to_rgb(image, return_numpy=True))
    path = tmp_path / ("x.png" if mode != "CMYK" and mode != "YCbCr" else "x.jpg")
    image.save(path, **({"transparency": image.info["transparency"]} if "transparency" in image.info else {}))
    calls = record_generate(monkeypatch)
    generate_cmd(args(folder, image=(str(path),)))
    proc = PaliGemmaProcessor.from_pretrained(folder)
    with Image.open(path) as reread:
        assert torch.equal(calls[0]["pixel_values"], proc(reread, "caption en")["pixel_values"])


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """I;16 (16-bit PNG): 0..65535 becomes 0..255 (PIL's own convert clips everything above 255)."""
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I;16")
        rgb = to_rgb(image)
    np.testing.assert_array_equal(rgb[..., 0], [[0, 1, 128, 255]])
    assert (rgb == rgb[..., :1]).all()


def test_lab_is_a_colour_space_not_alpha():
    lab = Image.new("RGB", (2, 2), (200, 30, 30)).convert("LAB")
    np.testing.assert_allclose(to_rgb(lab).astype(int), np.asarray(lab.convert("RGB")).astype(int))


def test_answers_with_newlines_stay_on_one_line(folder, monkeypatch, capsys):
    monkeypatch.setattr(PaliGemmaProcessor, "decode", lambda self, ids, skip_special_tokens=True: "one\ntwo\\n\r3")
    answers = generate_cmd(args(folder, image=(str(folder / "img.png"),) * 2))
    assert answers == ["one\ntwo\\n\r3"] * 2  # the Python return value is the raw text
    path = folder / "img.png"
    assert capsys.readouterr().out == f"{path} | caption en | one\\ntwo\\\\n\\r3\n" * 2


def test_max_new_tokens_is_capped_at_the_context(short_context, monkeypatch, capsys):
    """V23b: a model that never stops is bounded by its context, with a note on stderr; a long
    generation says what it is doing first."""
    calls = record_generate(monkeypatch)
    capsys.readouterr()
    generate_cmd(args(short_context, image=(str(short_context / "x.png"),), max_new_tokens=1_000_000))
    prompt_len = calls[0]["input_ids"].shape[1]
    assert calls[0]["max_new_tokens"] == 300 - prompt_len
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"genlab: note: --max-new-tokens 1000000 capped at {300 - prompt_len}: the model's context is 300 "
        f"positions (text_config.max_position_embeddings) and the prompt takes {prompt_len}",
        f"genlab: generating up to {300 - prompt_len} new tokens for the image on cpu (it stops early "
        f"once every answer has ended)",
    ]


def test_a_prompt_that_fills_the_context(short_context, capsys):
    with pytest.raises(ConfigError, match="--prompt: the longest prompt takes .* fills the model's context of 300"):
        generate_cmd(args(short_context, image=(str(short_context / "x.png"),), prompt=("word " * 400,)))


def test_many_images_say_what_they_do(folder, capsys):
    capsys.readouterr()
    generate_cmd(args(folder, image=(str(folder / "img.png"),) * 17, max_new_tokens=1))
    captured = capsys.readouterr()
    assert captured.err == ("genlab: generating up to 1 new tokens for each of 17 images on cpu "
                            "(it stops early once every answer has ended)\n")
    assert len(captured.out.splitlines()) == 17


def test_processor_and_model_that_do_not_belong_together(folder, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    pre = json.loads((other / "preprocessor_config.json").read_text())
    pre.update(size={"height": 64, "width": 64}, image_seq_length=64)
    (other / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(FileFormatError, match="64-pixel images and 64 image tokens, but config.json's vision "
                                              "tower takes 32-pixel images"):
        generate_cmd(args(other, image=(str(folder / "img.png"),)))

    small = make_tiny_folder(tmp_path / "small", vocab_size=50)  # the tokenizer has 300 ids
    with pytest.raises(FileFormatError, match="text_config.vocab_size is 50: the tokenizer files and the weights"):
        generate_cmd(args(small, image=(str(folder / "img.png"),)))


def test_every_error_here_is_a_genlab_error():
    assert issubclass(ConfigError, GenlabError) and issubclass(FileFormatError, GenlabError)
