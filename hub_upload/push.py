"""`push`: uploads a checked folder to the Hub in one commit, and `push_model` for a model in memory.

`push_folder` runs `check_folder` first and uploads nothing when it fails. Then `HfApi.create_repo(exist_ok=True,
private=...)`, `HfApi.create_branch(exist_ok=True)` when `revision` names a branch to commit to, and exactly one
`HfApi.create_commit` whose operations are the files the check approved (the allow-list, never a glob of the folder).
`upload_folder` is not used on purpose: without `hf_xet` it ends in the same `create_commit`, but with `hf_xet`
installed (the default of huggingface_hub 2) it streams through a pipeline that commits uploads older than five
minutes or larger than its batch budget in several "(part N)" commits, so a large model could land half-uploaded.
With `dry_run=True` every check runs and the plan is returned, without network.

The token comes from `token=` (`--token`), else `HF_TOKEN`, else the cached login (`hf auth login`). It is held in
memory only: never written, printed or logged.
"""

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from .card import card_repo_id, check_repo_id
from .check import DEFAULT_TIMEOUT, check_folder, format_size
from .errors import HubConnectionError, PrepareError, PushError
from .folder import DEFAULT_MAX_SHARD_SIZE, write_folder


@dataclass
class PushResult:
    """What `push_folder` did (or, with `dry_run`, would do)."""

    repo_id: str
    files: list[tuple[str, int]]
    commit_message: str
    private: bool
    revision: str | None
    create_pr: bool
    dry_run: bool
    token_source: str | None
    commit_url: str | None = None
    commit_sha: str | None = None
    pr_url: str | None = None
    warnings: list[str] = field(default_factory=list)
    auto_class: str = "AutoModelForSeq2SeqLM"  # `AutoModelForCausalLM` for a decoder-only folder

    def summary(self) -> str:
        visibility = "private if new" if self.private else "the namespace's default visibility if new"
        target = f"{self.repo_id} ({visibility})"
        branch = self.revision or "main"
        lines = [
            f"{'DRY RUN: would upload' if self.dry_run else 'uploaded'} {len(self.files)} files "
            f"({format_size(sum(size for _, size in self.files))}) to {target}, branch {branch}"
            f"{', as a pull request' if self.create_pr else ''}, in one commit: {self.commit_message!r}",
            *(f"  {path:<48} {format_size(size):>10}" for path, size in self.files),
            f"token: {self.token_source or 'none found (set HF_TOKEN, run `hf auth login`, or pass --token)'}",
        ]
        if self.dry_run:
            lines.append("nothing was sent: run again without --dry-run to upload")
        else:
            lines.append(f"commit: {self.commit_url}")
            if self.pr_url:
                lines.append(f"pull request: {self.pr_url}")
            lines += [
                "load exactly this commit with:",
                f'  {self.auto_class}.from_pretrained("{self.repo_id}", trust_remote_code=True, '
                f'revision="{self.commit_sha}")',
            ]
        return "\n".join(lines)


def default_commit_message(task_names) -> str:
    names = ", ".join(task_names[:6]) + (", …" if len(task_names) > 6 else "")
    return f"Upload ALTER model ({len(task_names)} tasks: {names})"


def token_source(token=None) -> str | None:
    """Where the token would come from (`--token`, `HF_TOKEN`, the cached login), without reading it or the network."""
    if token:
        return "--token"
    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN"
    if Path(constants.HF_TOKEN_PATH).is_file():
        return "cached login"
    return None


def resolve_token(token=None) -> str:
    """The token to push with (see the module docstring); raises `PushError` when there is none."""
    from huggingface_hub import get_token

    resolved = token or os.environ.get("HF_TOKEN") or get_token()
    if not resolved:
        raise PushError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token")
    return resolved


# Names of the transport errors of the HTTP clients huggingface_hub uses (httpx and its forks, requests, urllib3).
_NETWORK_ERROR_NAMES = {"TransportError", "NetworkError", "ConnectError", "ConnectTimeout", "TimeoutException",
                        "ProxyError", "ConnectionError", "ReadTimeout", "NewConnectionError", "MaxRetryError"}


def _first_line(error) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def describe_hub_failure(error, repo_id, step, created) -> str | None:
    """
    One line saying what happened to a Hub call (`step`, e.g. "creating the repository") and what to try, for a
    network, authentication or permission failure; `None` for any other exception. `created` says whether the
    repository already exists (then the line says that no commit was made).
    """
    after = ("the repository exists but nothing was committed to it" if created
             else "nothing was created or uploaded")
    if isinstance(error, OfflineModeIsEnabled):
        return f"{step} needs the network but HF_HUB_OFFLINE is set; unset it and run the command again ({after})"
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            return (f"{step}: the Hub refused the token (HTTP 401); check HF_TOKEN, `hf auth login` or --token, and "
                    f"that the token is still valid ({after})")
        if status == 403:
            return (f"{step}: permission denied for {repo_id} (HTTP 403); use a token with write access to the "
                    f"{repo_id.split('/')[0]!r} namespace, or push to a namespace you own ({after})")
        if status == 404:
            return (f"{step}: {repo_id} or the branch was not found (HTTP 404); check the repository id and "
                    f"--revision ({after})")
        return f"{step}: the Hub answered HTTP {status}: {_first_line(error)}; try again later ({after})"
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & _NETWORK_ERROR_NAMES or isinstance(error, (ConnectionError, TimeoutError)):
        return (f"{step}: could not reach the Hub ({_first_line(error)}); check the network connection or proxy "
                f"(HTTPS_PROXY) and run the same command again ({after})")
    return None


def _hub_call(step, repo_id, created, function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except Exception as error:
        message = describe_hub_failure(error, repo_id, step, created)
        if message is None:
            raise
        raise HubConnectionError(message) from error


def push_folder(
    folder,
    repo_id,
    *,
    private=False,
    revision=None,
    create_pr=False,
    commit_message=None,
    commit_description=None,
    token=None,
    dry_run=False,
    timeout=DEFAULT_TIMEOUT,
    api=None,
) -> PushResult:
    """
    Checks `folder` (`check_folder`) and uploads the approved files to `repo_id` in one commit.

    Args:
        repo_id (`str`): `namespace/name`; must be the repository the card's usage snippet loads.
        private (`bool`): create the repository private; otherwise a new repository gets its namespace's default
            visibility (public unless the organization defaults to private). An existing repository keeps its own.
        revision (`str`, *optional*): the branch to commit to, created from main when missing. With `create_pr`,
            the existing branch the pull request targets.
        create_pr (`bool`): open a pull request with the commit instead of committing to the branch.
        commit_message, commit_description (`str`, *optional*): the commit's title and description.
        token (`str`, *optional*): see the module docstring.
        dry_run (`bool`): run every check and return the plan without any network call.
        api (`HfApi`, *optional*): the client to use, with its own token (defaults to `HfApi(token=...)`).
    """
    try:
        check_repo_id(repo_id)
    except PrepareError as error:
        raise PushError(str(error)) from None
    if revision is not None and (not revision.strip() or (revision.startswith("refs/pr/") and create_pr)):
        raise PushError(
            f"revision {revision!r} is not valid here: give a branch name (or 'refs/pr/N' without --create-pr)"
        )
    report = check_folder(folder, timeout=timeout)
    readme = (Path(folder) / "README.md").read_text(encoding="utf-8")
    card_target = card_repo_id(readme)
    if card_target != repo_id:
        raise PushError(
            f"README.md's usage snippet loads {card_target!r}, not {repo_id!r}; prepare the folder again with "
            f"--repo-id {repo_id}"
        )
    message = commit_message or default_commit_message(report.load["task_names"])
    result = PushResult(
        repo_id=repo_id,
        files=report.files,
        commit_message=message,
        private=bool(private),
        revision=revision,
        create_pr=bool(create_pr),
        dry_run=bool(dry_run),
        token_source=token_source(token),
        warnings=report.warnings,
        auto_class=report.load.get("auto_class", "AutoModelForSeq2SeqLM"),
    )
    if dry_run:
        return result

    if api is None:
        api = HfApi(token=resolve_token(token), library_name="alter-hub")
    # private=None, not False: without --private a new repository gets its namespace's default visibility.
    # Network, authentication and permission failures become one `HubConnectionError` line; the upload is one
    # commit, so a failure leaves nothing half-uploaded.
    repo_id = _hub_call("creating the repository", repo_id, False, api.create_repo, repo_id,
                        private=True if private else None, exist_ok=True, repo_type="model").repo_id
    if revision and not create_pr and not revision.startswith("refs/pr/"):
        _hub_call(f"creating branch {revision!r}", repo_id, True, api.create_branch, repo_id, branch=revision,
                  exist_ok=True, repo_type="model")
    folder = Path(folder).resolve()
    operations = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path)) for path, _ in report.files
    ]
    info = _hub_call(
        "uploading the commit",
        repo_id,
        True,
        api.create_commit,
        repo_id,
        operations,
        commit_message=message,
        commit_description=commit_description,
        repo_type="model",
        revision=revision,
        create_pr=bool(create_pr),
    )
    result.commit_url, result.commit_sha, result.pr_url = info.commit_url, info.oid, info.pr_url
    return result


def push_model(
    model,
    tokenizer,
    repo_id,
    *,
    domain,
    results=None,
    routing_image=None,
    base_model=None,
    datasets=(),
    task_datasets=None,
    license="apache-2.0",
    language=None,
    revision_pin="main",
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    private=False,
    revision=None,
    create_pr=False,
    commit_message=None,
    commit_description=None,
    token=None,
    dry_run=False,
    timeout=DEFAULT_TIMEOUT,
    api=None,
) -> PushResult:
    """
    Pushes an ALTER model, its tokenizer and its model card together, in one commit: writes them to a temporary
    folder (`write_folder`; `results` is an `EvalResults`), then `push_folder`. Unlike `model.push_to_hub(...)` and
    `tokenizer.push_to_hub(...)` (two commits and a generic card), the repository never holds a model without its
    tokenizer or card, and the folder is checked in a clean Python before anything is sent.
    """
    with tempfile.TemporaryDirectory(prefix="alter-hub-push-") as tmp:
        folder = Path(tmp) / repo_id.replace("/", "--")
        write_folder(
            model,
            tokenizer,
            folder,
            repo_id=repo_id,
            domain=domain,
            results=results,
            routing_image=routing_image,
            base_model=base_model,
            datasets=datasets,
            task_datasets=task_datasets,
            license=license,
            language=language,
            revision_pin=revision_pin,
            max_shard_size=max_shard_size,
        )
        return push_folder(
            folder,
            repo_id,
            private=private,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message,
            commit_description=commit_description,
            token=token,
            dry_run=dry_run,
            timeout=timeout,
            api=api,
        )


__all__ = [
    "PushResult",
    "default_commit_message",
    "describe_hub_failure",
    "push_folder",
    "push_model",
    "resolve_token",
    "token_source",
]
