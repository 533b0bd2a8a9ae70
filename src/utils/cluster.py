"""Running on clusters: SLURM resources from the trainer config, stable run directories, ranks.

Three things live here, each small:

- config resolvers (`slurm.*`, `run_stamp`) that turn the trainer and data configs into the
  resources a SLURM job asks for (`conf/hydra/launcher/submitit_slurm.yaml`), and name run
  directories by the SLURM job id so a requeued job finds its own directory again;
- `cluster_plugins`: Lightning's `SLURMEnvironment` with auto-requeue when the process runs
  under SLURM;
- `adopt_submitit_local_tasks`: the torch.distributed variables for the processes that the
  submitit *local* executor starts (one per device), so Lightning joins them instead of spawning.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import zlib
from datetime import datetime
from typing import Any

from omegaconf import ListConfig, OmegaConf

from src.errors import ConfigError

log = logging.getLogger(__name__)

# SLURM job names Lightning treats as interactive shells (not a batch job it manages).
INTERACTIVE_JOB_NAMES = ("bash", "interactive")
# Minutes added to `trainer.max_time` for the job's time limit: the last validation and save.
TIME_MARGIN_MIN = 10


def slurm_job_tag() -> str | None:
    """`slurm-<job id>` (`slurm-<array id>_<task>` in job arrays) inside a SLURM batch job, else None.

    A requeued job keeps its id, so this names the same directory before and after a requeue,
    and every task of a multi-node job agrees on it without talking to the others.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None or os.environ.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return None
    array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id is not None and task_id is not None:
        return f"slurm-{array_id}_{task_id}"
    return f"slurm-{job_id}"


def run_stamp(fmt: str) -> str:
    """The last component of a run directory: the SLURM job tag, else the current time."""
    return slurm_job_tag() or datetime.now().strftime(fmt)


def devices_per_node(devices: Any) -> int:
    """How many processes (one per device) a node runs, from `trainer.devices`.

    SLURM starts the processes, so the count must be known when the job is submitted: "auto"
    and -1 (every device of a machine not yet seen) are refused with the fix.
    """
    if isinstance(devices, list | tuple | ListConfig):
        count = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.strip().isdigit()):
        count = int(devices)
    else:
        count = -1
    if count < 1:
        raise ConfigError(
            f"trainer.devices={devices} cannot size a SLURM job: set trainer.devices=N, the number "
            "of GPUs per node (one task per GPU)"
        )
    return count


def gpus_per_node(accelerator: str, devices: Any) -> int | None:
    """GPUs to reserve per node: one per device unless the trainer runs on CPU."""
    if str(accelerator) == "cpu":
        return None
    return devices_per_node(devices)


def cpus_per_task(num_workers: Any) -> int:
    """CPU cores per process: its data loader workers plus the training process itself."""
    return max(0, int(num_workers or 0)) + 1


def mem_gb(tasks: Any, gb_per_task: Any) -> int:
    """Memory per node: `gb_per_task` for each of the node's tasks."""
    return int(tasks) * int(gb_per_task)


def timeout_min(max_time: Any, default_min: Any) -> int:
    """The job's time limit: `trainer.max_time` ("DD:HH:MM:SS") plus a margin, else the default."""
    if max_time in (None, "", "null"):
        return int(default_min)
    if isinstance(max_time, dict) or OmegaConf.is_dict(max_time):
        seconds = sum(
            float(max_time.get(unit, 0)) * factor
            for unit, factor in (("days", 86400), ("hours", 3600), ("minutes", 60), ("seconds", 1))
        )
    else:
        parts = str(max_time).split(":")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"trainer.max_time={max_time!r} is not DD:HH:MM:SS")
        days, hours, minutes, secs = (int(p) for p in parts)
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    return math.ceil(seconds / 60) + TIME_MARGIN_MIN


def register() -> None:
    """Register the resolvers above once per process, and quiet Hydra's schema-matching note.

    The launcher configs `conf/hydra/launcher/submitit_{slurm,local}.yaml` carry the same names
    as the plugin's: Hydra then validates them against the plugin's schema and says so in a
    deprecation warning. They are complete without the schema (they set `_target_` and every key
    they use), so the note is noise here.
    """
    resolvers = {
        "run_stamp": run_stamp,
        "slurm.tasks_per_node": devices_per_node,
        "slurm.gpus_per_node": gpus_per_node,
        "slurm.cpus_per_task": cpus_per_task,
        "slurm.mem_gb": mem_gb,
        "slurm.timeout_min": timeout_min,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            # Cached: a sweep's jobs and a requeued job reuse the submitting process's values.
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "run_stamp")
    warnings.filterwarnings(
        "ignore",
        message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore",
        category=UserWarning,
    )


def cluster_plugins(auto_requeue: bool) -> list[Any]:
    """Lightning's SLURM environment (ranks from SLURM, requeue on SIGUSR1) when under SLURM."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    log.info("SLURM job %s: auto-requeue %s", os.environ.get("SLURM_JOB_ID"), auto_requeue)
    return [SLURMEnvironment(auto_requeue=auto_requeue)]


def adopt_submitit_local_tasks(num_nodes: int) -> None:
    """Give the processes of a multi-task submitit *local* job their torch.distributed ranks.

    The local executor starts `tasks_per_node` processes itself (like `srun`), each running the
    whole task; with LOCAL_RANK and a shared port set, Lightning joins them into one DDP group
    instead of launching more. Does nothing elsewhere.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return
    tasks = int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1"))
    if tasks <= 1:
        return
    if num_nodes != 1:
        raise ConfigError(
            f"trainer.num_nodes={num_nodes} with hydra/launcher=submitit_local: the local "
            "launcher runs on this machine only (trainer.num_nodes=1)"
        )
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    rank = os.environ["SUBMITIT_LOCAL_GLOBALID"]
    job = os.environ["SUBMITIT_LOCAL_JOB_ID"]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + zlib.crc32(job.encode()) % 20000))
    os.environ.update(
        LOCAL_RANK=os.environ["SUBMITIT_LOCAL_LOCALID"],
        RANK=rank,
        NODE_RANK="0",
        WORLD_SIZE=str(tasks),
    )
    rank_zero_only.rank = int(rank)


def effective_batch_size(batch_size: int, devices: int, num_nodes: int, accumulate: int) -> int:
    """Images per optimiser step: per-device batch × devices × nodes × accumulated batches."""
    return int(batch_size) * int(devices) * int(num_nodes) * int(accumulate)
