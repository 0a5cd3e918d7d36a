"""Can a command's models be had? Checked at the command's entry, before any work, so a launch with
models that cannot load stops at once with a reason instead of failing on a worker later.

A location is a local path, a Hugging Face hub id, an SSCD release name or URL, or (before
`flowcurate.models.tiny.resolve_models`) `tiny://NAME`. Offline (`HF_HUB_OFFLINE=1` or
`FLOWCURATE_OFFLINE=1`), a hub id or URL must already be in its cache; online, downloads happen when
the model loads. A path that looks like one (absolute, `./`, `~`) must exist either way.
"""

from __future__ import annotations

from pathlib import Path

from flowcurate.formats.config import TINY_SCHEME, Config
from flowcurate.models.sscd import OFFLINE_HINT, cached_path, offline, release_source, verified


class ModelUnavailable(ValueError):
    """A model a command needs cannot be had (missing path, or offline and not cached)."""


def _looks_like_path(location: str) -> bool:
    return location.startswith(("/", "./", "../", "~")) or Path(location).expanduser().exists()


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001  (not in the cache, whatever the library calls it)
        return False


def missing(cfg: Config, roles: tuple[str, ...]) -> list[str]:
    """`role = location (why)` for every model of `roles` (fields of `[models]`) that cannot be had."""
    m, out = cfg.models, []
    for role in roles:
        location = str(getattr(m, role))
        if location.startswith(TINY_SCHEME):
            continue  # built locally, offline
        if _looks_like_path(location):
            if not Path(location).expanduser().exists():
                out.append(f"{role} = {location} (no such file or folder)")
            continue
        if not offline():
            continue
        if role == "sscd":
            url, pinned = release_source(location)
            target = cached_path(url)
            if not (target.is_file() and verified(target, m.sscd_sha256 or pinned)):
                out.append(f"{role} = {location} (not downloaded yet, and downloads are off)")
        elif not _hub_cached(location, getattr(m, f"{role}_revision", None)):
            out.append(f"{role} = {location} (not in the Hugging Face cache, and downloads are off)")
    return out


def check_available(cfg: Config, roles: tuple[str, ...]) -> None:
    """Raise `ModelUnavailable` naming every model of `roles` that cannot be had, and what to do."""
    gone = missing(cfg, roles)
    if gone:
        raise ModelUnavailable(f"--config {cfg.source.removeprefix('preset:')}: models not available: "
                               f"{'; '.join(gone)}: {OFFLINE_HINT} (or a TOML config naming models that are here)")
