"""Writing a save directory all-or-nothing: the files are written into a temporary sibling directory, which then
replaces the target. Files in an existing target that the new save does not own (a README, a loss curve, logs)
are carried over; its old weights and configs are not (a merged checkpoint next to a stale adapter_config.json
would load as an adapter). Until the final rename the previous output is untouched, and if anything fails in
between, the old directory is still there (as ``<dir>.old-<pid>`` at worst)."""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

# files a model save owns: replaced by a new save of any kind
OWNED_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                  "pytorch_model.bin.index.json", "adapter_model.*", "adapter_config.json", "config.json",
                  "generation_config.json", "*.gguf", "Modelfile")


def _owned(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in OWNED_PATTERNS)


@contextlib.contextmanager
def atomic_dir(target):
    """``with atomic_dir(path) as tmp: write into tmp`` -> ``path`` holds exactly what was written (plus the
    target's unowned files) once the block exits without error."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save directory {str(target)!r} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        os.replace(tmp, target)
        return
    backup = target.with_name(f"{target.name}.old-{os.getpid()}")
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(target, backup)
    os.replace(tmp, target)
    for item in backup.iterdir():
        if not _owned(item.name) and not (target / item.name).exists():
            os.replace(item, target / item.name)
    shutil.rmtree(backup, ignore_errors=True)
