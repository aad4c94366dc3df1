"""The vlm family's commands and demo hook (read by ``genlab.cli`` and ``genlab.demo``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genlab.commands import Command, Demo


@dataclass
class GenerateArgs:
    """Caption / answer images with a Hugging Face PaliGemma checkpoint folder, offline.

    Prints one line per image, ``path | prompt | answer``. Line breaks and backslashes inside a
    field are escaped (a newline shows as the two characters ``\\n``, a backslash as ``\\\\``), so
    every answer stays on its own line."""

    model: str  # folder with config.json, *.safetensors and tokenizer files (a genlab run's hf/ folder)
    image: tuple[str, ...]  # one or more image files (one prompt each, or one prompt for all)
    prompt: tuple[str, ...] = ("caption en",)
    max_new_tokens: int = 100  # >= 0; capped where the model's context (max_position_embeddings) ends
    do_sample: bool = False  # greedy unless set
    temperature: float = 1.0  # > 0; used with --do-sample
    top_k: int = 0  # keep the k most likely tokens when sampling; 0 = off
    top_p: float = 1.0  # in (0, 1]: keep the most likely tokens holding this much probability; 1 = off
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps; auto = cuda when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    threads: int = 0  # torch CPU threads; 0 = torch's default
    compile: bool = False  # torch.compile the decode step (seconds to compile; faster per token)


def generate_cmd(args: GenerateArgs) -> list[str]:
    """Load model + processor, run batched generation, print and return one answer per image.

    Every problem with the flags, the images or the model folder is a GenlabError naming the flag
    or the file, raised before any generation starts."""
    import sys
    from pathlib import Path

    import torch
    from PIL import Image

    from genlab.errors import ConfigError, FileFormatError
    from genlab.nn.sampling import check_sampling_args
    from genlab.train.distributed import device_problem, pick_device
    from genlab.vlm.generation import generate
    from genlab.vlm.hf_io import load_paligemma
    from genlab.vlm.processor import PaliGemmaProcessor, to_rgb

    # The flags first: nothing is read or loaded for a command that cannot run.
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    for flag, check in (("--temperature", (args.do_sample, args.temperature, 0, 1.0)),
                        ("--top-k", (False, 1.0, args.top_k, 1.0)), ("--top-p", (False, 1.0, 0, args.top_p))):
        try:
            check_sampling_args(*check)
        except ValueError as e:
            raise ConfigError(f"{flag}: {e}") from e
    problem = device_problem(args.device)
    if problem:
        raise ConfigError(f"--device {args.device}: {problem}")
    if not args.image:
        raise ConfigError("--image: give at least one image file")
    prompts = list(args.prompt)
    if len(prompts) == 1:
        prompts = prompts * len(args.image)
    if len(prompts) != len(args.image):
        raise ConfigError(f"--prompt: give one prompt, or one per image ({len(args.image)}), not {len(prompts)}")

    # Images are decoded here and made RGB by the processor's own to_rgb (transparency over white),
    # so the command sees exactly the pixels PaliGemmaProcessor gives the Python API.
    images = []
    for path in args.image:
        if Path(path).is_dir():
            raise ConfigError(f"--image {path}: is a folder, not an image file")
        if not Path(path).is_file():
            raise ConfigError(f"--image {path}: no such file")
        try:
            with Image.open(path) as image:
                image.load()
                images.append(to_rgb(image))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise FileFormatError(f"--image {path}: cannot read it as an image ({e})") from e

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, cfg = load_paligemma(args.model, dtype=dtype, device=device)
    processor = PaliGemmaProcessor.from_pretrained(args.model)
    folder = Path(args.model)
    if (processor.image_size, processor.num_image_tokens) != (cfg.vision.image_size, cfg.num_image_tokens):
        raise FileFormatError(
            f"{folder}: the processor files (preprocessor_config.json) give {processor.image_size}-pixel images "
            f"and {processor.num_image_tokens} image tokens, but config.json's vision tower takes "
            f"{cfg.vision.image_size}-pixel images ({cfg.num_image_tokens} patches)")
    try:
        batch = processor(images, prompts)
    except ConfigError as e:
        raise ConfigError(f"--prompt: {e}") from e
    ids, vocab = batch["input_ids"], cfg.text.vocab_size  # (B, P)
    used = set(ids[ids != processor.image_token_id].tolist()) | {processor.eos_token_id, processor.pad_token_id}
    if max(used) >= vocab:
        raise FileFormatError(f"{folder}: the tokenizer uses id {max(used)}, but config.json's text_config.vocab_size "
                              f"is {vocab}: the tokenizer files and the weights do not belong together")

    # The model's context bounds what can be generated; say so instead of decoding past it.
    max_new, prompt_len, context = args.max_new_tokens, ids.shape[1], cfg.text.max_position_embeddings
    if max_new > context - prompt_len:
        if context - prompt_len < 1:
            raise ConfigError(f"--prompt: the longest prompt takes {prompt_len} tokens (image tokens included), which "
                              f"fills the model's context of {context} positions (text_config.max_position_embeddings "
                              f"in {folder / 'config.json'}); nothing can be generated")
        max_new = context - prompt_len
        print(f"genlab: note: --max-new-tokens {args.max_new_tokens} capped at {max_new}: the model's context is "
              f"{context} positions (text_config.max_position_embeddings) and the prompt takes {prompt_len}",
              file=sys.stderr)
    if max_new > 256 or len(images) > 16:
        which = "the image" if len(images) == 1 else f"each of {len(images)} images"
        print(f"genlab: generating up to {max_new} new tokens for {which} on {device} "
              f"(it stops early once every answer has ended)", file=sys.stderr, flush=True)

    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                   max_new_tokens=max_new, do_sample=args.do_sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_token_id=processor.eos_token_id,
                   pad_token_id=processor.pad_token_id, generator=gen, token_type_ids=batch["token_type_ids"],
                   compile=args.compile)
    answers = [processor.decode(row) for row in out.tolist()]

    breaks = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits at

    def one_line(text: str) -> str:
        """Backslashes doubled, line breaks spelled out (\\n, \\r, \\x0b, \\u2028, ...)."""
        text = text.replace("\\", "\\\\")
        return "".join(ch.encode("unicode_escape").decode("ascii") if ch in breaks else ch for ch in text)

    for path, prompt, answer in zip(args.image, prompts, answers):
        print(f"{one_line(path)} | {one_line(prompt)} | {one_line(answer)}")
    return answers


@dataclass
class ScenesArgs:
    """Write a few shapes-world images (and their captions) to try `genlab vlm generate` on."""

    out: str = "shapes-images"  # folder for scene_000.png, ... and scenes.txt / scenes.json (their captions)
    n: int = 4
    image_size: int = 64
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 2

    def checks(self):
        from genlab.config import folder_problem, positive, seed_check
        from genlab.data.shapes import max_objects_that_fit

        yield from positive("n", "image_size", "min_objects", cfg=self)
        yield "n", self.n <= 100_000, "must be <= 100000 (images in one folder)"
        yield "image_size", self.image_size <= 4096, "must be <= 4096 (pixels a side)"
        yield "max_objects", self.max_objects >= self.min_objects, "must be >= --min-objects"
        fit = max_objects_that_fit()
        yield "max_objects", self.max_objects <= fit, f"must be <= {fit}: more objects do not fit in one scene"
        yield seed_check(cfg=self)
        yield "out", folder_problem(self.out) is None, folder_problem(self.out) or ""


def scenes_cmd(args: ScenesArgs) -> None:
    from genlab.config import validate
    from genlab.data.shapes import write_scene_images

    validate(args)
    paths = write_scene_images(args.out, args.n, args.image_size, args.seed, args.min_objects, args.max_objects)
    for p in paths:
        print(p)


COMMANDS = {
    "train": Command("genlab.vlm.recipes:train", "genlab.vlm.recipes:ShapesPaliGemmaConfig",
                     "train a tiny PaliGemma on the shapes world (captions or VQA)", train=True,
                     description="Train a tiny PaliGemma from scratch on the procedural shapes world.",
                     hint="(try: genlab vlm scenes --out imgs, then genlab vlm generate --model {run_dir}/hf "
                          "--image imgs/scene_000.png)"),
    "pretrain-siglip": Command("genlab.vlm.siglip_pretrain:train", "genlab.vlm.siglip_pretrain:SiglipPretrainConfig",
                               "stage 0 of BLIP-2: train a SigLIP vision tower against a frozen text encoder",
                               train=True,
                               description="Train a SigLIP vision tower on image-caption pairs with CLIP's softmax "
                                           "loss (default) or SigLIP's sigmoid loss against frozen sentence "
                                           "features of a pretrained text encoder (default all-MiniLM-L6-v2); "
                                           "export it as a Hugging Face SigLIP vision folder, vision/ in the run "
                                           "folder.",
                               hint="(stage 1: genlab qformer train --config qformer/shapes --vision {run_dir}/vision)"),
    "finetune": Command("genlab.vlm.vqa:finetune", "genlab.vlm.vqa:VQAFinetuneConfig",
                        "fine-tune a PaliGemma on VQA (CLEVR layout): full, LoRA or QLoRA", train=True,
                        description="Fine-tune a PaliGemma HF folder on visual question answering: full, "
                                    "LoRA (peft) or QLoRA (NF4 via bitsandbytes + peft).",
                        hint="(try: genlab vlm eval-vqa --model {run_dir}; the merged model is in {run_dir}/hf)"),
    "eval-vqa": Command("genlab.vlm.vqa:eval_vqa_cmd", "genlab.vlm.vqa:EvalVQAArgs",
                        "exact match per question family and ROUGE of a PaliGemma on a CLEVR split"),
    "generate": Command("genlab.vlm.cli:generate_cmd", "genlab.vlm.cli:GenerateArgs",
                        "caption / answer images with a local PaliGemma checkpoint"),
    "scenes": Command("genlab.vlm.cli:scenes_cmd", "genlab.vlm.cli:ScenesArgs",
                      "write a few shapes-world images to try `vlm generate` on"),
    "memory": Command("genlab.vlm.memory:memory_cmd", "genlab.vlm.memory:MemoryArgs",
                      "memory of full / LoRA / QLoRA fine-tuning: a table and a bar chart"),
}
DEMO = Demo("genlab.vlm.demo:demo", "genlab.vlm.demo:VLMDemoConfig")
