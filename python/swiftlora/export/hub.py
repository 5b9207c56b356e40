"""``push_to_hub_gguf``: write the GGUF files (and Modelfile) locally, then upload them to a Hugging Face repo."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..distributed import on_main_process
from .gguf import save_pretrained_gguf


@on_main_process
def push_to_hub_gguf(model: Any, repo_id: str, tokenizer: Any = None,
                     quantization_method: str | list[str] = "fast_quantized", *, token: str | None = None,
                     private: bool | None = None, save_directory: str | os.PathLike | None = None,
                     commit_message: str = "Upload GGUF (swiftlora)", progress: bool = True,
                     **export_kwargs: Any) -> list[Path]:
    """Exports like :func:`save_pretrained_gguf` into ``save_directory`` (default: the repo name in the current
    directory; ``export_kwargs`` go to it too), creates ``repo_id`` if needed and uploads the files. Returns the
    local GGUF paths.

    Raises RuntimeError naming the local files when the Hub cannot be reached (offline, ``HF_HUB_OFFLINE=1``): the
    export itself is kept."""
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"push_to_hub_gguf: repo_id must look like 'user/name' or 'name', got {repo_id!r}")
    folder = Path(save_directory) if save_directory is not None else Path(repo_id.split("/")[-1])
    paths = save_pretrained_gguf(model, folder, tokenizer, quantization_method, progress=progress, **export_kwargs)
    files = list(paths) + [p for p in [folder / "Modelfile"] if p.is_file()]
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        for f in files:
            api.upload_file(path_or_fileobj=str(f), path_in_repo=f.name, repo_id=repo, commit_message=commit_message)
    except Exception as e:  # offline mode, no network, no token: all end here
        raise RuntimeError(f"push_to_hub_gguf: could not upload to the Hugging Face Hub repo {repo_id!r} "
                           f"({type(e).__name__}: {e}). The exported files are kept in {str(folder)!r}: "
                           f"{[f.name for f in files]}") from e
    return paths
