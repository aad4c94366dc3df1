"""The flow family's commands and demo hook (read by ``genlab.cli`` and ``genlab.demo``)."""

from genlab.commands import Command, Demo

COMMANDS = {
    "train": Command("genlab.flow.recipes:train", "genlab.flow.recipes:FlowConfig",
                     "train a flow: OT-CFM / I-CFM on 2-D data, or a DiT on images (--config flow/digits)",
                     train=True,
                     description="Train a flow-matching model: 2-D data (the default recipe, toy2d) or images "
                                 "(recipe images: --config flow/digits, flow/cifar10, flow/imagefolder ...).",
                     hint="(try: genlab flow sample --checkpoint {run_dir})",
                     recipes=(("toy2d", "genlab.flow.recipes:train", "genlab.flow.recipes:FlowConfig"),
                              ("images", "genlab.flow.images:train", "genlab.flow.images:ImageFlowConfig"))),
    "sample": Command("genlab.flow.recipes:sample", "genlab.flow.recipes:SampleArgs",
                      "draw samples from a trained run (2-D or images; grids and samples.npz)"),
    "eval": Command("genlab.flow.recipes:evaluate_run", "genlab.flow.recipes:EvalArgs",
                    "evaluate a run: W2 / NLL (2-D); class accuracy per CFG scale, FD, NFE table (images)"),
    "vqvae": Command("genlab.flow.vqvae:train", "genlab.flow.vqvae:VQVAERunConfig",
                     "train a VQ-VAE on images (for latent flow matching)", train=True,
                     description="Train a VQ-VAE (EMA codebook, dead-code restarts) on images; its latents "
                                 "feed `genlab flow train --latent.vqvae RUN`.",
                     hint="(reconstructions: {run_dir}/reconstructions.png; latent flow: "
                          "genlab flow train --config flow/digits --latent.vqvae {run_dir})"),
}
DEMO = Demo("genlab.flow.recipes:demo", "genlab.flow.recipes:FlowDemoConfig")
