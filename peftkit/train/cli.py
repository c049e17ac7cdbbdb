"""The ``peftkit`` command line (also ``python -m peftkit``, ``accelerate launch -m peftkit``, ``torchrun -m peftkit``).

    peftkit train RECIPE [key=value ...] [--resume]
    peftkit validate RECIPE [key=value ...]
    peftkit merge ADAPTER --base MODEL --out DIR
    peftkit export ADAPTER --out DIR [--format peft] [--base MODEL]
    peftkit info ADAPTER
    peftkit methods
    peftkit plot RUN_DIR

Exit codes: 0 done; 2 bad input (one message, no traceback, nothing written); 1 stopped on a non-finite loss;
128 + the signal number after SIGINT/SIGTERM (a checkpoint was written first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import PeftkitError
from ..validation import check_output_dir

EXIT_BAD_INPUT = 2
EXIT_NAN = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors also exit 2, in one line
        self.exit(EXIT_BAD_INPUT, f"peftkit: error: {message} (see peftkit {self.prog.split()[-1]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="peftkit", description="Parameter-efficient fine-tuning of Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a recipe")
    train.add_argument("recipe", help="a YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", help="section.key=value (lists as [a,b])")
    train.add_argument("--resume", action="store_true", help="continue the latest checkpoint in training.output_dir")

    validate = commands.add_parser("validate", help="print the resolved recipe and check everything short of training")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")

    merge = commands.add_parser("merge", help="fold an adapter into its base model and save the full model")
    merge.add_argument("adapter", help="an adapter folder (adapter_config.json + adapter_model.safetensors)")
    merge.add_argument("--base", help="the base model (hub id, folder or pkg:...); default: the one the adapter records")
    merge.add_argument("--out", required=True, help="the folder for the merged model (from_pretrained loads it)")

    export = commands.add_parser("export", help="write an adapter as a standard PEFT checkpoint")
    export.add_argument("adapter")
    export.add_argument("--out", required=True)
    export.add_argument("--format", default="peft", choices=["peft"])
    export.add_argument("--base", help="the base model, needed to turn Hydra / ElaLoRA adapters into a LoRA")

    info = commands.add_parser("info", help="verify an adapter folder and describe it")
    info.add_argument("adapter")

    commands.add_parser("methods", help="list the registered methods")

    plot = commands.add_parser("plot", help="draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl")
    plot.add_argument("run_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except PeftkitError as exc:
        message = " ".join(str(exc).split("\n"))  # one line, whatever the message holds
        print(f"peftkit: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under torchrun / accelerate launch: leave the process group explicitly (a gloo group torn down by the
    interpreter's exit can hang a process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_train(args) -> int:
    from .loop import train
    from .recipe import load_recipe

    result = train(load_recipe(args.recipe, args.overrides), resume=args.resume)
    if result.status == "nan":
        return EXIT_NAN
    if result.status == "interrupted":
        return 128 + int(result.signal_number)
    return 0


def cmd_validate(args) -> int:
    import peftkit

    from .loop import prepare
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run = prepare(recipe)
    if run.accelerator.is_main_process:
        print(recipe.dump(), end="")
        print(f"# ok: {len(run.examples.train)} train examples"
              f"{f', {len(run.examples.eval)} eval examples' if run.examples.eval else ''}; "
              f"{peftkit.trainable_parameters(run.model)}; {run.plan.batches_per_epoch} steps of "
              f"{recipe.training.batch_size * run.accelerator.num_processes} examples per epoch (before grad_accum)")
    return 0


def _model_for(adapter_dir: Path, base: str | None):
    """The base model an adapter belongs to, with the head class its recorded task type implies."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .. import checkpoint
    from ..errors import ConfigError
    from .build import resolve_model_ref

    config = checkpoint.read_config(adapter_dir)
    ref = base or config.get("base_model_name_or_path")
    if not ref:
        raise ConfigError(f"--base: {adapter_dir} records no base model; pass --base MODEL")
    auto = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification}.get(
        config.get("task_type"), AutoModel)
    path = resolve_model_ref(ref, "--base")
    try:
        return auto.from_pretrained(path), path
    except Exception as exc:
        raise ConfigError(f"--base: could not load '{ref}' ({str(exc).splitlines()[0] if str(exc) else exc})") from None


def cmd_merge(args) -> int:
    import peftkit

    from .. import checkpoint

    adapter = Path(args.adapter)
    check_output_dir(args.out, "--out")
    checkpoint.describe(adapter)  # verify the files before loading anything big
    model, base_path = _model_for(adapter, args.base)
    peftkit.load(model, adapter)
    model = peftkit.unwrap(model, merge=True)
    out = Path(args.out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        model.save_pretrained(staging)
        _copy_tokenizer(adapter, base_path, staging)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staging), out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"peftkit: merged model written to {out}")
    return 0


def _copy_tokenizer(adapter: Path, base_path: str, out: Path) -> None:
    from transformers import AutoTokenizer

    for source in (adapter, base_path):
        try:
            AutoTokenizer.from_pretrained(str(source)).save_pretrained(out)
            return
        except Exception:  # no tokenizer there: try the next source; a model folder without one is still valid
            continue


def cmd_export(args) -> int:
    import peftkit

    from .. import checkpoint

    adapter = Path(args.adapter)
    check_output_dir(args.out, "--out")
    checkpoint.describe(adapter)
    base = None
    if args.base:
        base, _ = _model_for(adapter, args.base)
    out = peftkit.export(adapter, args.out, format=args.format, base_model=base)
    print(f"peftkit: {args.format} adapter written to {out}")
    return 0


def cmd_info(args) -> int:
    from .. import checkpoint

    summary = checkpoint.describe(args.adapter)
    ranks = sorted(set(summary["ranks"].values()))
    print(f"adapter:    {Path(args.adapter).resolve()}")
    print(f"method:     {summary['method']} (format {summary['peft_type']})")
    print(f"rank:       r={summary['r']} alpha={summary['alpha']}; per-layer ranks {ranks or 'n/a'}")
    targets = summary["targets"]
    print(f"targets:    {', '.join(targets) if isinstance(targets, list) else targets} ({len(summary['ranks']) or summary['tensors']} modules)")
    print(f"size:       {summary['parameters']:,} parameters in {summary['tensors']} tensors, {summary['bytes']:,} bytes")
    print(f"base model: {summary['base_model'] or 'not recorded'}")
    print("files:      verified (weights readable, sha256 matches the config)")
    return 0


def cmd_methods(args) -> int:
    from .. import registry

    descriptions = registry.method_descriptions()
    width = max(map(len, descriptions), default=0)
    for name, text in descriptions.items():
        print(f"{name:<{width}}  {text}")
    return 0


def cmd_plot(args) -> int:
    from .metrics import plot

    print(f"peftkit: wrote {plot(args.run_dir)}")
    return 0


COMMANDS = {
    "train": cmd_train, "validate": cmd_validate, "merge": cmd_merge, "export": cmd_export, "info": cmd_info,
    "methods": cmd_methods, "plot": cmd_plot,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
