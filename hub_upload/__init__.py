"""Publishing ALTER models on the Hugging Face Hub: `prepare` a folder, `check` it in a clean Python, `push` it.

Command line: `alter-hub {prepare,check,push}` or `python -m hub_upload ...` (see `hub_upload.__main__`).
From Python: `prepare_folder`, `write_folder`, `check_folder`, `push_folder` and `push_model`.
"""

from .card import build_model_card, count_parameters, verify_model_card
from .check import CheckReport, check_folder
from .errors import FolderCheckError, HubConnectionError, HubUploadError, PrepareError, PushError, UnsafeFolderError
from .folder import PreparedFolder, prepare_folder, write_folder
from .push import PushResult, describe_hub_failure, push_folder, push_model
from .results import EvalResults, read_eval_results
from .safety import scan_folder


__all__ = [
    "CheckReport",
    "EvalResults",
    "FolderCheckError",
    "HubConnectionError",
    "HubUploadError",
    "PrepareError",
    "PreparedFolder",
    "PushError",
    "PushResult",
    "UnsafeFolderError",
    "build_model_card",
    "check_folder",
    "count_parameters",
    "describe_hub_failure",
    "prepare_folder",
    "push_folder",
    "push_model",
    "read_eval_results",
    "scan_folder",
    "verify_model_card",
    "write_folder",
]
