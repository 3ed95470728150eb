"""Download HEST-Benchmark task folders from the Hugging Face Hub (gated dataset)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ID = "MahmoodLab/hest-bench"
#: task folder names of MahmoodLab/hest-bench (github.com/mahmoodlab/HEST bench_config/bench_config.yaml)
TASKS = ("IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "CCRCC", "LUNG", "LYMPH_IDC")
RETIRED_TASKS = ("HCC",)
#: names HEST's README table and tutorial table use (github.com/mahmoodlab/HEST README.md and
#: tutorials/4-Running-HEST-Benchmark.ipynb at afd42c3) for folders named otherwise; matched case-insensitively
TASK_ALIASES = {"luad": "LUNG", "lymph idc": "LYMPH_IDC", "idc-lymphnode": "LYMPH_IDC"}
#: fold counts a cited source confirms (data_manifests/hest_bench/<task>.yaml ``n_folds``); the split files on
#: disk decide, and a different count is reported
KNOWN_N_FOLDS = {"SKCM": 2}


def match_task(name: str, folders) -> str | None:
    """The folder among ``folders`` that task ``name`` designates: the same name, else the same name up to
    case (``ccRCC`` -> ``CCRCC``), else a README/tutorial alias (``LUAD`` -> ``LUNG``); ``None`` if none."""
    folders = list(folders)
    if name in folders:
        return name
    key = name.strip().casefold()
    for target in (key, TASK_ALIASES.get(key, "").casefold()):
        hits = [f for f in folders if f.casefold() == target]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ValueError(f"Task {name!r} matches several folders {hits}; pass the exact folder name.")
    return None


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
        Tasks to fetch (default: the 9 current tasks), by folder name or README name, any case (``"ccRCC"`` is
        the folder ``CCRCC``, ``"LUAD"`` is ``LUNG``). ``"HCC"`` (retired) may be asked for explicitly.
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
    known = (*TASKS, *RETIRED_TASKS)
    resolved = [match_task(t, known) for t in tasks]
    unknown = [t for t, r in zip(tasks, resolved) if r is None]
    if unknown:
        raise ValueError(f"Unknown HEST-Benchmark task(s) {unknown}; known tasks: {sorted(known)}.")
    tasks = list(dict.fromkeys(resolved))
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
