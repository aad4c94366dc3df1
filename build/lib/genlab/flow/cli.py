"""The flow family's commands and demo hook (read by ``genlab.cli`` and ``genlab.demo``)."""

from genlab.commands import Command, Demo

COMMANDS = {
    "train": Command("genlab.flow.recipes:train", "genlab.flow.recipes:FlowConfig",
                     "train OT-CFM / I-CFM on 2-D data (resumable)", train=True,
                     description="Train a 2-D flow-matching model.",
                     hint="(try: genlab flow sample --run-dir {run_dir} --solver euler --steps 2)"),
    "sample": Command("genlab.flow.recipes:sample", "genlab.flow.recipes:SampleArgs",
                      "draw samples from a trained run with any ODE solver"),
    "eval": Command("genlab.flow.recipes:evaluate_run", "genlab.flow.recipes:EvalArgs",
                    "W2 / MMD vs NFE, NLL, straightness and pictures for a run"),
}
DEMO = Demo("genlab.flow.recipes:demo", "genlab.flow.recipes:FlowConfig")
