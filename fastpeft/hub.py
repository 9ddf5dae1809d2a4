"""Adapters on the Hugging Face Hub, through `huggingface_hub`: load by repo id, push, model card.

`resolve_adapter(model_id, ...)` turns a local folder or a Hub repo id (with `revision`, `subfolder`,
`token`, `cache_dir`, `local_files_only`; `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE` are honoured by
huggingface_hub itself) into a local folder holding adapter_config.json and the weights, as PEFT does:
files come from the local cache when they are there, and only the two adapter files are fetched.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from .config import CONFIG_NAME
from .io import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

MODEL_CARD_NAME = "README.md"
_HUB_KWARGS = ("revision", "subfolder", "token", "cache_dir", "local_files_only", "force_download")


def hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Hub options among `kwargs` (PEFT's from_pretrained / load_adapter keywords); others are refused."""
    unknown = sorted(k for k in kwargs if k not in _HUB_KWARGS and k not in _IGNORED_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; fastpeft's from_pretrained / load_adapter "
                        f"take {list(_HUB_KWARGS)} for the Hub")
    return {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}


# PEFT keywords with no meaning for fastpeft's loading (it always loads on the CPU, then copies in place)
_IGNORED_KWARGS = ("low_cpu_mem_usage", "torch_device", "autocast_adapter_dtype", "ephemeral_gpu_offload",
                   "use_safetensors", "key_mapping")


def resolve_adapter(model_id: str | os.PathLike, revision: str | None = None, subfolder: str | None = None,
                    token: bool | str | None = None, cache_dir: str | os.PathLike | None = None,
                    local_files_only: bool = False, force_download: bool = False) -> str:
    """A local folder with the adapter of `model_id` (a folder, or a Hub repo id fetched into the cache)."""
    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise ValueError(f"adapter path {local} is a file; pass the folder that holds {CONFIG_NAME}")
    if not _looks_like_repo_id(model_id):
        raise FileNotFoundError(f"adapter folder {local} does not exist (and {model_id!r} is not a Hub repo id)")
    try:
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on it
        raise ImportError(f"loading {model_id!r} from the Hub needs huggingface_hub (pip install huggingface_hub)") \
            from None
    common = dict(subfolder=subfolder or None, revision=revision, token=token,
                  cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
                  local_files_only=local_files_only, force_download=force_download,
                  library_name="fastpeft")
    where = f"{model_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "") + \
        (f" at revision {revision!r}" if revision else "")
    try:
        config_path = huggingface_hub.hf_hub_download(model_id, CONFIG_NAME, **common)
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(f"adapter {where}: {CONFIG_NAME} is not in the local Hub cache and the Hub cannot "
                                f"be reached (offline mode or local_files_only): {err}") from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"adapter {where} has no {CONFIG_NAME}") from None
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        try:
            weights = huggingface_hub.hf_hub_download(model_id, name, **common)
        except EntryNotFoundError:
            continue
        except LocalEntryNotFoundError:
            continue
        if os.path.dirname(weights) != os.path.dirname(config_path):  # pragma: no cover - one snapshot folder
            raise RuntimeError(f"adapter {where}: the config and the weights came from different cache folders")
        return os.path.dirname(config_path)
    raise FileNotFoundError(f"adapter {where} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} (in the Hub "
                            "or the local cache)")


def _looks_like_repo_id(model_id: str) -> bool:
    parts = model_id.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not model_id.startswith((".", "~")) and os.sep not in \
        model_id.replace("/", "") and not os.path.isabs(model_id)


# ---------------------------------------------------------------------------------------------- model card
def model_card_text(model: Any, existing: str | None = None) -> str:
    """A model card as PEFT writes one: metadata with library_name "peft" (the files are PEFT's), the base
    model and the PEFT method; the text of an `existing` card is kept."""
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(existing) if existing else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    config = model.peft_config[model.active_adapter]
    tags = set(card.data.get("tags") or [])
    tags.update({"fastpeft", config.peft_type.value.lower().replace("_", "-")})
    base = config.base_model_name_or_path
    if base:
        card.data["base_model"] = base
        tags.add(f"base_model:adapter:{base}")
    if _task(config) == "CAUSAL_LM":
        card.data["pipeline_tag"] = card.data.get("pipeline_tag") or "text-generation"
        tags.add("transformers")
    card.data["tags"] = sorted(tags)
    return str(card)


def _task(config: Any) -> str | None:
    t = config.task_type
    return getattr(t, "value", t)


# ---------------------------------------------------------------------------------------------- pushing
def push_to_hub(model: Any, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                selected_adapters: list[str] | None = None, commit_description: str | None = None) -> Any:
    """Save `model`'s adapters (save_pretrained's files plus README.md) and upload them as one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=selected_adapters)
        model.create_or_update_model_card(tmp)
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message or
                                 "Upload adapter (fastpeft)", commit_description=commit_description, token=token,
                                 revision=revision, create_pr=create_pr)
