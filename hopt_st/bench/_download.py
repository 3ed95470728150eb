"""Download HEST-Benchmark task folders from the Hugging Face Hub (gated dataset)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ID = "MahmoodLab/hest-bench"
TASKS = ("IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "CCRCC", "LUNG", "LYMPH_IDC")
RETIRED_TASKS = ("HCC",)


def download(
    root: str | os.PathLike,
    tasks: str | Sequence[str] | None = None,
    *,
    token: str | None = None,
    revision: str | None = None,
) -> Path:
    """Fetch the task folders of ``MahmoodLab/hest-bench`` into ``root`` (``root/<TASK>/...``).

    Parameters
    ----------
    root
        Destination folder; pass the same folder to :func:`hopt_st.bench.run`.
    tasks
        Tasks to fetch (default: the 9 current tasks). ``"HCC"`` (retired) may be asked for explicitly.
    token
        Hugging Face token; by default ``HF_TOKEN`` from the environment or the cached login (never logged).
    revision
        Dataset revision (commit) to pin.

    Returns
    -------
    pathlib.Path
        ``root``.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    tasks = list(TASKS) if tasks is None else ([tasks] if isinstance(tasks, str) else list(tasks))
    known = set(TASKS) | set(RETIRED_TASKS)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"Unknown HEST-Benchmark task(s) {unknown}; known tasks: {sorted(known)}.")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    token = token or os.environ.get("HF_TOKEN") or None
    logger.info("Downloading %s tasks %s into %s", REPO_ID, tasks, root)
    try:
        snapshot_download(
            repo_id=REPO_ID,
            repo_type="dataset",
            local_dir=str(root),
            allow_patterns=[f"{t}/*" for t in tasks],
            revision=revision,
            token=token,
        )
    except (GatedRepoError, RepositoryNotFoundError) as err:
        raise PermissionError(
            f"Access to the gated dataset {REPO_ID} was refused. Request access on "
            f"https://huggingface.co/datasets/{REPO_ID} with your Hugging Face account, then log in "
            "(`huggingface-cli login`) or set the HF_TOKEN environment variable, and retry."
        ) from err
    return root
