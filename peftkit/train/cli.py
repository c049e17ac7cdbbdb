"""The ``peftkit`` command line (also ``python -m peftkit``, ``accelerate launch -m peftkit``, ``torchrun -m peftkit``).

    peftkit train RECIPE [key=value ...] [--resume]
    peftkit validate RECIPE [key=value ...]
    peftkit merge ADAPTER --base MODEL --out DIR [--dtype bf16|fp16|fp32] [--qlora] [--quantize nf4]
    peftkit export ADAPTER --out DIR [--to peft|lora|gguf] [--base MODEL]
    peftkit info ADAPTER
    peftkit push RUN_OR_ADAPTER REPO [--private] [--message TEXT]
    peftkit methods
    peftkit plot RUN_DIR
    peftkit chat ADAPTER_OR_RUN [--base MODEL] [--prompt TEXT] [--system TEXT]
    peftkit eval RECIPE_OR_RUN [key=value ...] [--adapter DIR] [--no-generate]
    peftkit --version

Exit codes: 0 done; 2 bad input (one message, no traceback, nothing written); 1 stopped on a non-finite loss or
training state; 4 stopped by the divergence guard (training.divergence_guard); 3 a write failed (disk full,
read-only or I/O error: one message, temporary files removed);
128 + the signal number after SIGINT/SIGTERM (a checkpoint was written first).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import ConfigError, PeftkitError

EXIT_BAD_INPUT = 2
EXIT_NAN = 1
EXIT_WRITE_FAILED = 3
# OSErrors that mean "the file system refused a write", as opposed to a defect in peftkit.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}
EXIT_DIVERGED = 4  # = guard.EXIT_DIVERGED
MAX_MESSAGE = 4000  # characters of an error message printed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors also exit 2, in one line
        self.exit(EXIT_BAD_INPUT, f"peftkit: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="peftkit", description="Parameter-efficient fine-tuning of Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = commands.add_parser("train", help="train a recipe")
    train.add_argument("recipe", help="a YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", help="section.key=value (lists as [a,b])")
    train.add_argument("--resume", action="store_true", help="continue the latest checkpoint in training.output_dir")

    validate = commands.add_parser("validate", help="print the resolved recipe and check everything short of training")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")

    merge = commands.add_parser("merge", help="fold an adapter into its base model and save the full model")
    merge.add_argument("adapter",
                       help="an adapter folder (adapter_config.json + adapter_model.safetensors) or a Hub id")
    merge.add_argument("--base",
                       help="the base model (hub id, folder or pkg:...); default: the one the adapter records")
    merge.add_argument("--out", required=True, help="the folder for the merged model (from_pretrained loads it); "
                       "a new or empty folder")
    merge.add_argument("--force", action="store_true", help="write into an existing non-empty --out: its files of "
                       "the same names are replaced, every other file is kept")
    merge.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                       help="the dtype the merged weights are written in (the merge itself runs in fp32); default: "
                       "the base's own dtype, bf16 with --qlora")
    merge.add_argument("--qlora", action="store_true", help="the adapter trained on the base quantized to NF4 "
                       "(model.quantize: nf4): load the base that way, dequantize it and merge in fp32")
    merge.add_argument("--quantize", choices=["nf4"], default=None,
                       help="quantize the merged weights again (bitsandbytes NF4) before writing them")

    export = commands.add_parser("export", help="write an adapter as a standard PEFT checkpoint")
    export.add_argument("adapter")
    export.add_argument("--out", required=True, help="a new or empty folder (not the adapter's own)")
    export.add_argument("--force", action="store_true", help="write into an existing non-empty --out (files of the "
                        "same names are replaced, every other file is kept)")
    export.add_argument("--to", choices=["peft", "lora", "gguf"], default=None,
                        help="peft (default): PEFT's own format of the method (LoRA; HRA for HRA), a LoRA where PEFT "
                        "has none; lora: a plain PEFT LoRA for every method (vLLM, SGLang); gguf: a llama.cpp / "
                        "Ollama LoRA adapter (OUT/adapter.gguf)")
    export.add_argument("--format", choices=["peft", "lora", "gguf"], default=None, help="the former name of --to")
    export.add_argument("--base", help="the base model, needed to turn Hydra / ElaLoRA / HRA adapters into a LoRA "
                        "(a hub id, folder, pkg:..., or a .gguf file)")

    info = commands.add_parser("info", help="verify an adapter folder and describe it")
    info.add_argument("adapter", help="an adapter folder or a Hub id")

    push = commands.add_parser("push", help="upload an adapter (or a run's adapter/) to the Hugging Face Hub")
    push.add_argument("source", help="an adapter folder, or a `peftkit train` output folder holding adapter/")
    push.add_argument("repo", help="the Hub repository, e.g. me/my-adapter (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--message", help="the commit message")

    commands.add_parser("methods", help="list the registered methods")

    plot = commands.add_parser("plot", help="draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl")
    plot.add_argument("run_dir")

    chat = commands.add_parser("chat", help="talk to a trained adapter with its chat template (streams tokens)")
    chat.add_argument("adapter", help="a run folder (training.output_dir) or an adapter folder")
    chat.add_argument("--base", help="the base model; default: the run's recipe, else the one the adapter records")
    chat.add_argument("--prompt", help="one message: print the answer and exit (default: an interactive session)")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")

    evaluate = commands.add_parser("eval", help="evaluate a run (or a recipe's base model) on the recipe's eval set")
    evaluate.add_argument("recipe", help="a run folder (its recipe.yaml and adapter) or a YAML recipe")
    evaluate.add_argument("overrides", nargs="*", help="section.key=value")
    evaluate.add_argument("--adapter", help="an adapter folder to evaluate (default: the run's; none for a recipe)")
    evaluate.add_argument("--no-generate", action="store_true", help="skip exact match on generated answers")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `peftkit`: what it can do
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    status = None
    try:
        status = COMMANDS[args.command](args)
        return status
    except PeftkitError as exc:
        message = " ".join(str(exc).split("\n"))  # one line, whatever the message holds
        if len(message) > MAX_MESSAGE:  # a value echoed from a hostile file never floods the terminal
            message = message[:MAX_MESSAGE] + f" ... ({len(message) - MAX_MESSAGE:,} more characters)"
        print(f"peftkit: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        if _is_read_refusal(exc):
            print(f"peftkit: error: could not read {exc.filename}: {exc.strerror or exc} (errno {exc.errno}); nothing "
                  "was written. Make the file readable for this user (or point the recipe at a copy you can read), "
                  "then run the command again", file=sys.stderr)
            return EXIT_BAD_INPUT
        if exc.errno not in WRITE_ERRNOS:
            raise
        return _write_failed(args.command, exc.errno, exc.strerror or str(exc), exc.filename)
    except Exception as exc:
        # Writers outside Python's file API (safetensors' Rust serializer) report the OS error in their message.
        number = _wrapped_errno(exc)
        if number not in WRITE_ERRNOS:
            raise
        return _write_failed(args.command, number, os.strerror(number), None)
    finally:
        _close_process_group(finished=status == 0)


def _write_failed(command: str, number: int, reason: str, filename: str | None) -> int:
    where = f"{filename}: " if filename else ""
    print(f"peftkit: error: could not write: {where}{reason} (errno {number}); the files being written were removed "
          "and earlier checkpoints are intact. Free space or fix the folder's permissions, then run the command "
          f"again{' with --resume' if command == 'train' else ''}", file=sys.stderr)
    return EXIT_WRITE_FAILED


def _wrapped_errno(exc: BaseException) -> int | None:
    """The errno an exception carries: an OSError's, or the ``(os error N)`` of a Rust I/O error's message
    (safetensors), also through the chain of causes; None when it carries none."""
    import re

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        match = re.search(r"\(os error (\d+)\)", str(exc)[:2000])
        if match:
            return int(match.group(1))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _is_read_refusal(exc: OSError) -> bool:
    """An EACCES/EPERM on a file that exists and this user may not read: an input the user must fix (exit 2), not
    a refused write (exit 3). A refused write names a file being created or a folder that is readable."""
    name = exc.filename
    return (exc.errno in (errno.EACCES, errno.EPERM) and isinstance(name, (str, bytes, os.PathLike))
            and os.path.isfile(name) and not os.access(name, os.R_OK))


def _close_process_group(finished: bool = False) -> None:
    """Under torchrun / accelerate launch: leave the process group explicitly (a gloo group torn down by the
    interpreter's exit can hang a process). After a command that finished on this process, wait for the others
    first: a rank that destroys its gloo group while a peer is still talking to it can abort at exit ("terminate
    called without an active exception", seen once in CI on a finished 2-process run). After a failure, no barrier:
    a peer may never get there."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def cmd_train(args) -> int:
    from .loop import train
    from .recipe import load_recipe

    result = train(load_recipe(args.recipe, args.overrides), resume=args.resume)
    if result.status == "nan":
        return EXIT_NAN
    if result.status == "diverged":
        return EXIT_DIVERGED
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


def _check_out(out: Path, source: Path, force: bool, command: str) -> None:
    """--out must not be the source adapter's folder, nor a file, nor (without --force) a non-empty folder."""
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        where = "the adapter folder" if out.resolve() == source.resolve() else "inside the adapter folder"
        raise ConfigError(f"--out: {out} is {where} that {command} reads; writing there would replace or mix with "
                          "the adapter. Choose another folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give a folder (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not force:
        entries = sorted(p.name for p in out.iterdir())
        raise ConfigError(f"--out: {out} exists and is not empty ({', '.join(entries[:4])}"
                          f"{' ...' if len(entries) > 4 else ''}); "
                          f"choose a new folder, or pass --force to write the {command} output into it (files of the "
                          "same names are replaced, every other file is kept)")


def _publish(staging: Path, out: Path) -> None:
    """Move a complete staging folder to ``out``, all or nothing: a rename when ``out`` is new or empty; else
    every target is checked first (a name the output writes as a file must not be a folder of ``out``, nor a
    folder name a file), then each file is swapped in (an atomic replace) with the file it replaces kept aside
    until every swap succeeded; a failed swap puts every replaced file back. Files of ``out`` the output does
    not name are never touched."""
    from ..fileio import dir_mode, file_mode

    # The user's umask for everything written: mkdtemp gives 0700 and some writers 0600.
    for path in [staging, *staging.rglob("*")]:
        os.chmod(path, dir_mode() if path.is_dir() else file_mode())
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(staging, out)  # rename(2) replaces an empty folder atomically
        return
    entries = sorted(staging.rglob("*"))
    conflicts = []
    for source in entries:
        target = out / source.relative_to(staging)
        if not os.path.lexists(target):
            continue
        if source.is_dir() and (target.is_symlink() or not target.is_dir()):
            conflicts.append(f"{target} (a file where the output writes a folder)")
        elif not source.is_dir() and target.is_dir() and not target.is_symlink():
            conflicts.append(f"{target} (a folder where the output writes a file)")
    if conflicts:
        raise ConfigError(f"--out: {len(conflicts)} of the names the output writes are taken in {out}: "
                          f"{'; '.join(conflicts[:3])}"
                          f"{' ...' if len(conflicts) > 3 else ''}; nothing was written. Move them, or choose a new "
                          "folder")
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced.", suffix=".tmp", dir=out.parent))
    swapped: list[tuple[Path, Path | None]] = []  # (target, its previous file kept aside, or None: a new file)
    made: list[Path] = []
    try:
        for number, source in enumerate(entries):
            target = out / source.relative_to(staging)
            if source.is_dir():
                if not target.exists():
                    target.mkdir()
                    made.append(target)
                continue
            previous = None
            if os.path.lexists(target):
                previous = aside / str(number)
                try:
                    os.link(target, previous, follow_symlinks=False)  # the old file stays in place meanwhile
                except OSError:
                    shutil.copy2(target, previous, follow_symlinks=False)
            os.replace(source, target)
            swapped.append((target, previous))
    except BaseException:
        for target, previous in reversed(swapped):
            if previous is not None:
                os.replace(previous, target)
            else:
                target.unlink(missing_ok=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or load reports from transformers: a command's stderr is its own messages (an error is
    one line). The head a classification adapter brings is reported as newly initialised, which it is not."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def cmd_merge(args) -> int:
    with _quiet_transformers():
        return _merge(args)


def _merge(args) -> int:
    import torch

    import peftkit

    from .. import checkpoint, serving
    from .build import adapter_base_model

    adapter = _adapter_folder(args.adapter)
    out = Path(args.out)
    _check_out(out, adapter, args.force, "merge")
    checkpoint.describe(adapter)  # verify the files before loading anything big
    dtype = serving.dtype_from_name(args.dtype)
    load_options = serving.quantized_kwargs("nf4", torch.float32) if args.qlora else {"dtype": "auto"}
    model, base_path = adapter_base_model(adapter, args.base, **load_options)
    auto = type(model)
    peftkit.load(model, adapter)
    model, reference, merged = serving.merge_for_serving(model, dtype, args.quantize)
    written_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    out.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside --out (the same file system), so publishing it is a rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(staging)
        if args.quantize:
            # What a server loads: the merged folder quantized again, written before its first forward (bitsandbytes'
            # CPU kernel repacks a weight in place on the first one).
            del model
            requantized = auto.from_pretrained(staging, **serving.quantized_kwargs(args.quantize, written_dtype))
            for stale in staging.iterdir():
                stale.unlink()
            requantized.save_pretrained(staging)
            merged = serving.logits(requantized, serving.probe_batch(requantized))
        _copy_tokenizer(adapter, base_path, staging)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = serving.compare(merged, reference, written_dtype, args.quantize)
    print(f"peftkit: merged model written to {out}")
    print(f"peftkit: merge error, {report} (a probe batch of 4 x 64 random tokens)")
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
    with _quiet_transformers():
        return _export(args)


def _export(args) -> int:
    import peftkit

    from .. import checkpoint

    adapter = _adapter_folder(args.adapter)
    out = Path(args.out)
    _check_out(out, adapter, args.force, "export")
    checkpoint.describe(adapter)
    base = None
    if args.base:
        from .build import adapter_base_model

        base, _ = adapter_base_model(adapter, args.base)
    to = args.to or args.format or "peft"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        peftkit.export(adapter, staging, to, base_model=base)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"peftkit: {to} adapter written to {out}")
    return 0


def cmd_info(args) -> int:
    from .. import checkpoint

    adapter = _adapter_folder(args.adapter)
    summary = checkpoint.describe(adapter)
    ranks = sorted(set(summary["ranks"].values()))
    print(f"adapter:    {args.adapter if adapter != Path(args.adapter) else adapter.resolve()}")
    print(f"method:     {summary['method']} (format {summary['peft_type']})")
    print(f"rank:       r={summary['r']} alpha={summary['alpha']}; per-layer ranks {ranks or 'n/a'}")
    targets = summary["targets"]
    print(f"targets:    {', '.join(targets) if isinstance(targets, list) else targets} "
          f"({len(summary['ranks']) or summary['tensors']} modules)")
    print(f"size:       {summary['parameters']:,} parameters in {summary['tensors']} tensors, "
          f"{summary['bytes']:,} bytes")
    print(f"base model: {summary['base_model'] or 'not recorded'}")
    from ..serving import engines

    print(f"serve with: {engines(summary['peft_type'])}")
    if summary["sha256_verified"]:
        print("files:      verified (weights readable, sha256 matches the one the config recorded)")
    else:
        print("files:      weights readable; no sha256 recorded (not saved by peftkit), so not verified against the "
              "config")
    return 0


def _adapter_folder(ref: str) -> Path:
    """An adapter folder as given, or a Hub id resolved to its local snapshot (offline: the cache only)."""
    from ..resolve import resolve_folder

    return resolve_folder(ref, "adapter")


def cmd_push(args) -> int:
    from .. import checkpoint, hub
    from ..errors import ConfigError
    from .loop import ADAPTER_DIR

    source = Path(args.source)
    if not (source / checkpoint.CONFIG_NAME).is_file() and (source / ADAPTER_DIR / checkpoint.CONFIG_NAME).is_file():
        source = source / ADAPTER_DIR  # a run folder: its final adapter
    if not (source / checkpoint.CONFIG_NAME).is_file():
        raise ConfigError(f"push: {args.source} holds no {checkpoint.CONFIG_NAME} "
                          f"(nor {ADAPTER_DIR}/{checkpoint.CONFIG_NAME}); "
                          "pass an adapter folder or a `peftkit train` output folder")
    url = hub.push_folder(source, args.repo, private=args.private or None, commit_message=args.message)
    print(f"peftkit: pushed {source} to {args.repo} ({url})")
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


def cmd_chat(args) -> int:
    from .session import chat

    return chat(args.adapter, base=args.base, prompt=args.prompt, system=args.system,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature)


def cmd_eval(args) -> int:
    import json

    from .session import evaluate_run

    values = evaluate_run(args.recipe, args.overrides, adapter=args.adapter, generate=not args.no_generate)
    if args.json:
        print(json.dumps(values))
    else:
        for key, value in values.items():
            print(f"{key:<20} {value:.4f}")
    return 0


COMMANDS = {
    "train": cmd_train, "validate": cmd_validate, "merge": cmd_merge, "export": cmd_export, "info": cmd_info,
    "methods": cmd_methods, "plot": cmd_plot, "chat": cmd_chat, "eval": cmd_eval, "push": cmd_push,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
