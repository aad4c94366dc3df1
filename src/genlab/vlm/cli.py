"""``genlab vlm ...`` commands, registered into the top-level command table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genlab.cli import register


@dataclass
class GenerateArgs:
    """Caption / answer images with a Hugging Face PaliGemma checkpoint folder, offline."""

    model: str  # folder with config.json, *.safetensors and tokenizer files
    image: tuple[str, ...]  # one or more image files (one prompt each, or one prompt for all)
    prompt: tuple[str, ...] = ("caption en",)
    max_new_tokens: int = 100
    do_sample: bool = False  # greedy unless set
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    threads: int = 0  # torch CPU threads; 0 = torch's default
    compile: bool = False  # torch.compile the decode step (seconds to compile; faster per token)


def generate_cmd(args: GenerateArgs) -> list[str]:
    """Load model + processor, run batched generation, print and return one answer per image."""
    import torch
    from PIL import Image

    from genlab.train.distributed import pick_device
    from genlab.vlm.generation import generate
    from genlab.vlm.hf_io import load_paligemma
    from genlab.vlm.processor import PaliGemmaProcessor

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    prompts = list(args.prompt)
    if len(prompts) == 1:
        prompts = prompts * len(args.image)
    if len(prompts) != len(args.image):
        raise ValueError(f"--prompt: give one prompt, or one per image ({len(args.image)}), not {len(prompts)}")
    images = []
    for path in args.image:
        try:
            images.append(Image.open(path).convert("RGB"))
        except (FileNotFoundError, OSError) as e:
            raise FileNotFoundError(f"--image {path}: cannot read it as an image ({e})") from e
    model, _ = load_paligemma(args.model, dtype=dtype, device=device)
    processor = PaliGemmaProcessor.from_pretrained(args.model)
    batch = processor(images, prompts)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                   max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_token_id=processor.eos_token_id,
                   pad_token_id=processor.pad_token_id, generator=gen, token_type_ids=batch["token_type_ids"],
                   compile=args.compile)
    answers = [processor.decode(row) for row in out.tolist()]
    for path, prompt, answer in zip(args.image, prompts, answers):
        print(f"{path} | {prompt} | {answer}")
    return answers


def _generate(argv: list[str]) -> None:
    import tyro

    generate_cmd(tyro.cli(GenerateArgs, args=argv, prog="genlab vlm generate"))


def _train(argv: list[str]) -> None:
    from genlab.cli import PRESET_HELP, is_main_process, split_resume
    from genlab.config import parse_cli
    from genlab.vlm.recipes import VLMTrainConfig, train

    argv, resume = split_resume(argv)
    cfg = parse_cli(VLMTrainConfig, argv, prog="genlab vlm train",
                    description="Train a tiny PaliGemma from scratch on the procedural shapes world. " + PRESET_HELP)
    run_dir = train(cfg, resume=resume is not None)
    if is_main_process():
        print(f"run folder: {run_dir}  (try: genlab vlm generate --model {run_dir}/hf --image IMG)")


register("vlm", "train", _train, "train a tiny PaliGemma on the shapes world (captions or VQA)")
register("vlm", "generate", _generate, "caption / answer images with a local PaliGemma checkpoint")
