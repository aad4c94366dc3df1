"""The text family's commands and demo hook (read by ``genlab.cli`` and ``genlab.demo``)."""

from genlab.commands import Command, Demo

COMMANDS = {
    "train": Command("genlab.text.recipes:train", "genlab.text.recipes:TextConfig",
                     "train a masked-diffusion (MDLM) or autoregressive text model (resumable)", train=True,
                     description="Train an MDLM (or, with --config text/shakespeare-ar, the causal baseline) on a "
                                 "local corpus.",
                     hint="(try: genlab text sample --checkpoint {run_dir} --steps 64 --num-samples 2)"),
    "sample": Command("genlab.text.recipes:sample", "genlab.text.recipes:SampleArgs",
                      "draw text from a trained run with any sampler (prefix prompts, JSONL out)"),
    "eval": Command("genlab.text.recipes:evaluate_run", "genlab.text.recipes:EvalArgs",
                    "val NELBO, bits per token and per character of a trained run"),
    "bench": Command("genlab.text.bench:bench", "genlab.text.bench:BenchArgs",
                     "speed / quality table of the samplers: NFE, seconds, gen-PPL under an AR judge, entropy"),
}
DEMO = Demo("genlab.text.recipes:demo", "genlab.text.recipes:TextConfig")
