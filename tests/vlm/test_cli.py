"""`genlab vlm generate` on a tiny local checkpoint folder (weights + tokenizer), end to end."""

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.cli import main
from genlab.data.tokenizers import make_tiny_tokenizer
from genlab.vlm.generation import generate
from genlab.vlm.hf_io import save_paligemma
from genlab.vlm.paligemma import PaliGemma, PaliGemmaConfig
from genlab.vlm.processor import PaliGemmaProcessor
from tests.vlm.tiny_hf import tiny_hf_paligemma


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-paligemma")
    make_tiny_tokenizer(d, vocab_size=300, image_size=32, num_image_tokens=16)
    hf = tiny_hf_paligemma(version=1)
    cfg = PaliGemmaConfig.from_hf_dict(hf.config.to_dict())
    torch.manual_seed(0)
    model = PaliGemma(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    save_paligemma(model, cfg, d)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return d


def test_generate_matches_the_python_api(folder, capsys):
    torch.set_num_threads(1)
    imgs = [str(folder / "img0.png"), str(folder / "img1.png")]
    args = ["vlm", "generate", "--model", str(folder), "--image", *imgs, "--prompt", "caption en",
            "what is it", "--max-new-tokens", "6", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out

    from genlab.vlm.hf_io import load_paligemma

    model, _ = load_paligemma(folder)
    proc = PaliGemmaProcessor.from_pretrained(folder)
    batch = proc([Image.open(p).convert("RGB") for p in imgs], ["caption en", "what is it"])
    out = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=6,
                   token_type_ids=batch["token_type_ids"], eos_token_id=proc.eos_token_id,
                   pad_token_id=proc.pad_token_id)
    expected = [proc.decode(r) for r in out.tolist()]
    # printed one line per answer: backslashes doubled, newlines spelled out (this random model prints some)
    expected = [a.replace("\\", "\\\\").replace("\n", "\\n") for a in expected]
    assert out.shape[1] > 0
    assert printed == "".join(f"{p} | {q} | {a}\n" for p, q, a in zip(imgs, ["caption en", "what is it"], expected))


def test_missing_image_and_bad_prompt_count(folder, capsys):
    assert main(["vlm", "generate", "--model", str(folder), "--image", str(folder / "nope.png")]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert main(["vlm", "generate", "--model", str(folder), "--image", str(folder / "img0.png"),
                 "--prompt", "a", "b"]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["vlm", "generate", "--model", str(tmp_path / "none"), "--image", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_vlm_train_command_runs_and_resumes(tmp_path, capsys):
    run = tmp_path / "vlm"
    tiny = ["--run-dir", str(run), "--train.steps", "4", "--train.batch-size", "8", "--train.no-progress",
            "--train.checkpoint-every", "2", "--eval.n", "8", "--eval.grid", "4"]
    assert main(["vlm", "train", *tiny]) == 0
    assert (run / "hf" / "config.json").is_file() and (run / "examples.png").is_file()
    assert main(["vlm", "train", "--resume", str(run), "--train.steps", "6"]) == 0
    assert (run / "checkpoints" / "step_00000006").is_dir()
