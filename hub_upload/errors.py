"""Exceptions raised by `hub_upload`; each message names the offending file, key or value."""


class HubUploadError(Exception):
    """Base class of every error `hub_upload` raises on purpose (the command line prints it and exits with 1)."""


class PrepareError(HubUploadError):
    """The model directory, its evaluation results or the options given to `prepare` cannot make a Hub folder."""


class UnsafeFolderError(HubUploadError):
    """The folder holds something that must never be uploaded: pickles, credentials, stray files, outside links."""

    def __init__(self, findings):
        self.findings = list(findings)
        lines = "\n".join(f"  - {finding}" for finding in self.findings)
        super().__init__(f"refusing the folder, {len(self.findings)} problem(s):\n{lines}")


class FolderCheckError(HubUploadError):
    """The folder is safe but incomplete or inconsistent, or does not load in a clean Python."""

    def __init__(self, problems):
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"the folder failed its check, {len(self.problems)} problem(s):\n{lines}")


class PushError(HubUploadError):
    """The push cannot start: bad repository id or options, no token, or a card made for another repository."""


class HubConnectionError(HubUploadError):
    """The Hub could not be reached, refused the token, or denied the operation; the message says what happened and
    what to try, in one line. Nothing was committed (a push is one commit)."""
