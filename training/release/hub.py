"""Publish an adapter or a merged model to the Hugging Face Hub, private by default.

The folder that is uploaded is built first, beside the run (outputs/<run>/upload/<what>/):
the model files, their records (run.json, merge.json, eval.json) and a generated model
card. When the Hub cannot be reached, that folder is still there, complete, to upload
later, and the command says so instead of failing somewhere in the upload.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from training.atomic import building_dir, remove_stale_partials
from training.errors import UserError
from training.release.model_card import build_card
from training.run_dir import MERGE_RECORD, RunDir
from training.run_lock import one_command_at_a_time
from training.storage import writing_into

log = logging.getLogger(__name__)

WHAT = ("adapter", "merged")


class HubUnreachable(UserError):
    """The upload folder is ready, but the Hub could not be reached."""


def build_upload_folder(run_dir: Path, what: str, repo_id: str) -> Path:
    layout = RunDir(run_dir)
    source = layout.artifact(what)
    if not source.is_dir():
        hint = "make train" if what == "adapter" else "make merge"
        raise UserError(f"{source}: nothing to publish yet ({hint} first)")
    run_file = layout.run_json
    if not run_file.is_file():
        raise UserError(f"{run_file}: the run record is missing; the model card is written from it")
    run = json.loads(run_file.read_text(encoding="utf-8"))
    merge = _read(source / MERGE_RECORD)
    evaluation = _read(layout.eval_json)
    target = layout.upload(what)
    # What a push killed while it copied left: a hidden copy of the model, as large as the model.
    remove_stale_partials(target.parent, target.name)
    made_upload = not target.parent.exists()
    try:
        # A full disk: the copies named the model file they read, the card and eval.json no file at all.
        with writing_into(target), building_dir(target, replace=True) as tmp:
            for item in source.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
            if evaluation is not None:
                (tmp / "eval.json").write_text(json.dumps(evaluation, indent=2, ensure_ascii=False) + "\n")
            build_card(what, repo_id, run, merge, evaluation).save(tmp / "README.md")
    except BaseException:
        # A failed push leaves nothing it made: its unfinished copy is gone, and so is the empty
        # upload/ it made for it (rmdir leaves one that another push has filled since).
        if made_upload:
            with contextlib.suppress(OSError):
                target.parent.rmdir()
        raise
    return target


def read_token(token_file: str | None) -> str:
    """The Hub token, from a file (a compose secret), never from the command line."""
    path = token_file or os.environ.get("HF_TOKEN_PATH")
    if path:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UserError(f"cannot read the Hub token from {path}: {e.strerror}") from None
        if not token:
            raise UserError(f"the Hub token file {path} is empty")
        return token

    token = get_token()
    if not token:
        raise UserError(
            "no Hugging Face token: pass --token-file PATH (a file holding the token), set HF_TOKEN_PATH, "
            "or log in with `hf auth login`"
        )
    return token


def default_repo_id(run_name: str, what: str) -> str:
    return f"{run_name}-lora" if what == "adapter" else run_name


def push(run_dir: Path, what: str, *, repo_id: str | None, private: bool, token_file: str | None) -> str:
    """Build the upload folder, then upload it. Returns the repository URL."""
    token = read_token(token_file)
    name = repo_id or default_repo_id(run_dir.name, what)
    # Held through the upload: a train --force or merge --force of the run replaced what it sends.
    with one_command_at_a_time(RunDir(run_dir), "push"):
        folder = build_upload_folder(run_dir, what, name)
        log.info("Upload folder ready: %s", folder)
        return _upload(HfApi(token=token), folder, name, what=what, run=run_dir.name, private=private)


def _upload(api: HfApi, folder: Path, name: str, *, what: str, run: str, private: bool) -> str:
    try:
        if "/" not in name:
            name = f"{api.whoami()['name']}/{name}"
        url = api.create_repo(name, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=folder, repo_id=name, commit_message=f"Upload {what} of run {run}")
    except HfHubHTTPError as e:
        raise UserError(f"the Hub refused the upload to {name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - offline mode, DNS, refused connections, timeouts
        raise HubUnreachable(
            f"could not connect to the Hugging Face Hub ({type(e).__name__}: {e}). Nothing was uploaded; "
            f"the folder to upload is ready at {folder}. Run the same command again when the Hub is "
            "reachable (unset HF_HUB_OFFLINE if it is set)."
        ) from None
    log.info("Published %s to %s (%s)", what, url, "private" if private else "public")
    return str(url)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
