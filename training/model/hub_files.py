"""A model's files as transformers reads them, on disk, in the Hugging Face cache, or on the Hub.

transformers loads the shards that `model.safetensors.index.json` names, or else the one
`model.safetensors`; any other *.safetensors in the folder (Mistral's repositories ship a
`consolidated.safetensors` in another naming scheme beside the shards) is not part of the
model. The merge reads and downloads exactly these files, and a training run checks, before
it writes anything, that the model and data it names are cached or reachable on the Hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from training.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Besides the weights: what the merge needs of the base model.
CONFIG_FILES = ("config.json", "generation_config.json")
# A probe answers in well under a second when the Hub is up; longer means it is not reachable.
PROBE_TIMEOUT_S = 5.0


def index_shards(index_path: Path) -> list[str]:
    """The shard file names an index's weight map points to."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index_path}: not a safetensors index with a weight_map ({e})") from None
    if not shards or not all(isinstance(s, str) and s and "/" not in s for s in shards):
        raise UserError(f"{index_path}: weight_map must map tensor names to shard file names in its folder")
    return shards


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files transformers would load from `model_dir`, all of which must exist."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        files = [model_dir / name for name in index_shards(index)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{model_dir}: {SAFETENSORS_INDEX} names shards that are missing: {missing[:3]}")
        return files
    single = model_dir / SAFETENSORS_SINGLE
    if single.is_file():
        return [single]
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    pickled = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = (
        f" (other safetensors files, which transformers does not load: {others[:3]})"
        if others
        else f" (only pickled weights: {pickled[:3]})"
        if pickled
        else ""
    )
    raise UserError(f"{model_dir}: no {SAFETENSORS_SINGLE} and no {SAFETENSORS_INDEX}{hint}")


def download_model_files(repo_id: str, revision: str | None) -> Path:
    """The config and weight files of a Hub model (from the cache when there): the index first, then
    only the shards it names, or model.safetensors when the repository has no index."""
    try:
        index = Path(hf_hub_download(repo_id, SAFETENSORS_INDEX, revision=revision))
    except RemoteEntryNotFoundError:  # the Hub says there is none (offline, a missing index is an error)
        index = None
    files = files_to_download(index)
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files))


def files_to_download(index: Path | None) -> list[str]:
    """What of a Hub model to fetch: the config files and the index's shards, or model.safetensors."""
    weights = [SAFETENSORS_INDEX, *index_shards(index)] if index is not None else [SAFETENSORS_SINGLE]
    return [*CONFIG_FILES, *weights]


def cached_model_dir(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot of a Hub model when its config and every weight file are in the cache."""
    config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    try:
        weight_files(snapshot)
    except UserError:
        return None
    return snapshot


def dataset_cached(repo_id: str, revision: str | None) -> bool:
    """Whether the Hub cache holds a snapshot of this dataset (what `datasets` reads offline)."""
    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="dataset")
    snapshots = folder / "snapshots"
    if revision and not (folder / "refs" / revision).is_file() and not (snapshots / revision).is_dir():
        return False
    return snapshots.is_dir() and any(snapshots.iterdir())


@dataclass(frozen=True)
class Probe:
    ok: bool
    reachable: bool  # False: no answer from the Hub (network, DNS, proxy, timeout)
    reason: str = ""


def probe(repo_id: str, repo_type: str, revision: str | None, timeout: float = PROBE_TIMEOUT_S) -> Probe:
    """Ask the Hub once, without retries, whether the repository exists and this token may read it."""
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=timeout)
    except GatedRepoError:
        return Probe(False, True, "is gated: accept its terms on the Hub and set HF_TOKEN")
    except RevisionNotFoundError:
        return Probe(False, True, f"has no revision {revision!r}")
    except RepositoryNotFoundError:
        return Probe(False, True, "does not exist on the Hub, or is private (set HF_TOKEN)")
    except OfflineModeIsEnabled:
        return Probe(False, False, "HF_HUB_OFFLINE=1")
    except HfHubHTTPError as e:
        return Probe(False, True, f"the Hub answered {e}")
    except (httpx2.HTTPError, OSError) as e:
        return Probe(False, False, f"{constants.ENDPOINT} is unreachable ({type(e).__name__}: {e})")
    return Probe(True, True)


def hub_offline() -> bool:
    return constants.HF_HUB_OFFLINE


def hub_cache() -> str:
    return constants.HF_HUB_CACHE
