"""Command line of `hub_upload`: `alter-hub prepare | check | push` (also `python -m hub_upload ...`).

    alter-hub prepare MODEL_DIR OUT_DIR --repo-id ORG/NAME --domain DOMAIN [--results FILE ...] [--routing-image PNG]
        [--base-model ID] [--datasets ID ...] [--task-dataset TASK=ID ...] [--license ID] [--language CODE ...]
        [--tokenizer DIR] [--revision-pin REV] [--max-shard-size 5GB] [--allow-missing-results] [--overwrite]
    alter-hub check OUT_DIR [--timeout SECONDS] [--python PATH]
    alter-hub push OUT_DIR ORG/NAME [--private] [--revision BRANCH] [--create-pr] [--commit-message MSG]
        [--commit-description TEXT] [--token TOKEN] [--dry-run] [--timeout SECONDS]
    alter-hub export-task MODEL_DIR TASK OUT_DIR [--stage1] [--overwrite]

Exit status: 0 on success; 2 for a user mistake (a bad option, path or repository id), with one `error:` line as
argparse prints; 1 when the folder is refused by its check (the message names each file at fault) or when the Hub
cannot be reached, refuses the token or denies the operation (one line: what happened, what to try). `--debug` shows
the traceback instead.
"""

import argparse
import json
import os
import sys

from huggingface_hub.errors import HfHubHTTPError

from .check import DEFAULT_TIMEOUT, check_folder
from .errors import FolderCheckError, HubConnectionError, HubUploadError, PushError, UnsafeFolderError
from .folder import DEFAULT_MAX_SHARD_SIZE, prepare_folder
from .push import push_folder


def _task_dataset(value):
    task, sep, dataset = value.partition("=")
    if not sep or not task or not dataset:
        raise argparse.ArgumentTypeError(f"{value!r} is not TASK=DATASET_ID")
    return task, dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alter-hub", description="Prepare, check and push ALTER models to the Hugging Face Hub."
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser(
        "prepare",
        help="build the Hub folder from a training run's output directory",
        description="Build the folder that goes to the Hub: model (safetensors), code files, tokenizer, model card "
        "and routing picture, from a training run's output directory.",
    )
    prepare.add_argument("model_dir", help="the training run's output directory (trainer.save_model's folder)")
    prepare.add_argument("out_dir", help="the new folder to write")
    prepare.add_argument(
        "--repo-id", required=True, help="the Hub repository the card's usage snippet loads (ORG/NAME)"
    )
    prepare.add_argument("--domain", required=True, help="the model's domain (a tag and a word of the card)")
    prepare.add_argument(
        "--results", nargs="+", metavar="FILE", help="evaluation JSON file(s); default: MODEL_DIR/*results*.json"
    )
    prepare.add_argument(
        "--routing-image", metavar="FILE", help="routing picture; default: MODEL_DIR/routing_heatmap.png"
    )
    prepare.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory when not MODEL_DIR")
    prepare.add_argument(
        "--base-model", metavar="ID", help="Hub id of the base model; default: the one the config records"
    )
    prepare.add_argument("--datasets", nargs="+", default=[], metavar="ID", help="Hub ids of the training datasets")
    prepare.add_argument(
        "--task-dataset",
        type=_task_dataset,
        action="append",
        default=[],
        metavar="TASK=ID",
        help="dataset id a task's model-index entry names (repeatable)",
    )
    prepare.add_argument("--license", default="apache-2.0", help="license id of the card (default: apache-2.0)")
    prepare.add_argument("--language", nargs="+", metavar="CODE", help="language code(s) of the card")
    prepare.add_argument(
        "--revision-pin",
        default="main",
        metavar="REV",
        help="the revision of the card's usage snippet (default: main; a commit sha once known)",
    )
    prepare.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"shard the weights above this size (default: {DEFAULT_MAX_SHARD_SIZE})",
    )
    prepare.add_argument(
        "--allow-missing-results", action="store_true", help="write a card without evaluation results"
    )
    prepare.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")

    check = commands.add_parser(
        "check",
        help="validate a folder and load it in a clean, isolated Python",
        description="Scan the folder (allow-list, pickles, credentials, links, local paths), check its files and "
        "card, and load it through the Auto classes with trust_remote_code=True in an isolated Python.",
    )
    check.add_argument("folder")
    check.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="seconds allowed for the isolated load")
    check.add_argument("--python", metavar="PATH", help="interpreter of the isolated load (default: this one)")

    push = commands.add_parser(
        "push",
        help="check a folder and upload it in one commit",
        description="Run check, then upload the approved files to the Hub in one commit. The token comes from "
        "--token, HF_TOKEN or the cached login (hf auth login) and is never written or printed.",
    )
    push.add_argument("folder")
    push.add_argument("repo_id", metavar="ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created when missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--commit-message", metavar="MSG")
    push.add_argument("--commit-description", metavar="TEXT")
    push.add_argument("--token", help="Hugging Face token (prefer HF_TOKEN: command lines are visible to others)")
    push.add_argument("--dry-run", action="store_true", help="run every check and list the files, without network")
    push.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="seconds allowed for the isolated load")
    export = commands.add_parser(
        "export-task",
        help="write one task as a plain checkpoint of the backbone's class (T5ForConditionalGeneration, "
        "LlamaForCausalLM, Qwen2ForCausalLM, ...; no remote code)",
        description="Merge one task's adapter into a wider FFN/MLP and write a folder of the backbone's own class "
        "(T5ForConditionalGeneration, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM) that "
        "loads without trust_remote_code and computes the task's stage-1 outputs, with the tokenizer, chat template "
        "and generation config; refuses, naming the reason, where the merge cannot be exact (adapter form or "
        "activation other than the FFN's, attention adapters, stage 2).",
    )
    export.add_argument("model_dir", help="the ALTER model folder")
    export.add_argument("task", help="the task to export (a name of config.task_names)")
    export.add_argument("out_dir", help="the new folder to write")
    export.add_argument("--stage1", action="store_true", help="export a stage-2 model's stage-1 computation")
    export.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    for command in (prepare, export, check, push):
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
    return parser


def main(argv=None) -> int:
    """Runs the command line; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (UnsafeFolderError, FolderCheckError, HubConnectionError, HfHubHTTPError) as error:
        if args.debug:
            raise
        print(f"alter-hub {args.command}: error: {error}", file=sys.stderr)
        return 1
    except (HubUploadError, OSError, ValueError) as error:  # the user's options, paths or files
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"alter-hub {args.command}: error: {message}", file=sys.stderr)
        return 2


def _run(args) -> int:
    folder = getattr(args, "folder", None)
    if folder is not None and not os.path.isdir(folder):
        what = "does not exist" if not os.path.exists(folder) else "is not a folder"
        raise PushError(f"{folder} {what}: give the folder that `alter-hub prepare` wrote")
    if args.command == "prepare":
        prepared = prepare_folder(
            args.model_dir,
            args.out_dir,
            repo_id=args.repo_id,
            domain=args.domain,
            tokenizer_dir=args.tokenizer,
            results_files=args.results,
            routing_image=args.routing_image,
            base_model=args.base_model,
            datasets=args.datasets,
            task_datasets=dict(args.task_dataset),
            license=args.license,
            language=args.language,
            revision_pin=args.revision_pin,
            max_shard_size=args.max_shard_size,
            allow_missing_results=args.allow_missing_results,
            overwrite=args.overwrite,
        )
        print(f"wrote {prepared.path} ({len(prepared.files)} files): {', '.join(prepared.files)}")
        print(
            f"results: {', '.join(prepared.results.sources) or 'none'}; "
            f"routing picture: {prepared.routing_image or 'none'}"
        )
        for warning in prepared.warnings:
            print(f"warning: {warning}")
        print(f"next: alter-hub check {prepared.path}")
    elif args.command == "export-task":
        from .export_task import export_task

        out = export_task(args.model_dir, args.task, args.out_dir, stage1=args.stage1, overwrite=args.overwrite)
        architecture = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"][0]
        print(f"wrote {out}: task {args.task!r} as a plain {architecture} (no remote code)")
    elif args.command == "check":
        print(check_folder(args.folder, timeout=args.timeout, python=args.python).summary())
    else:
        result = push_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
            commit_description=args.commit_description,
            token=args.token,
            dry_run=args.dry_run,
            timeout=args.timeout,
        )
        for warning in result.warnings:
            print(f"warning: {warning}")
        print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
