"""Scaling out: submitit launchers, SLURM resources, preemption checkpoints, DDP equivalence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from src.codecs.loading import load_codec
from src.utils.checkpoints import read_checkpoint
from tests.conftest import tiny_args
from tests.helpers import REPO, run_script


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# ---- launcher configs -------------------------------------------------------------------------
def test_slurm_launcher_takes_nodes_tasks_gpus_cpus_memory_time_from_the_configs(compose_train):
    cfg = compose_train(
        "hydra/launcher=submitit_slurm",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "trainer.devices=8",
        "data.num_workers=4",
        "trainer.max_time=00:12:00:00",
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.cpus_per_task == 5  # 4 loader workers + the training process
    assert launcher.mem_gb == 8 * 32
    assert launcher.timeout_min == 12 * 60 + 10  # max_time + the margin for the last save
    # SLURM's warning signal is the one Lightning's SLURM environment requeues on.
    assert OmegaConf.to_container(launcher.additional_parameters, resolve=True) == {
        "signal": "USR1@120",
        "requeue": True,
    }
    assert str(cfg.hydra.sweep.dir).startswith(str(cfg.paths.log_dir))

    cpu = compose_train("hydra/launcher=submitit_slurm", "trainer=ddp_cpu", "trainer.max_time=null")
    assert (cpu.hydra.launcher.tasks_per_node, cpu.hydra.launcher.gpus_per_node) == (2, None)
    assert cpu.hydra.launcher.timeout_min == 24 * 60
    local = compose_train("hydra/launcher=submitit_local", "trainer=ddp_cpu")
    assert local.hydra.launcher._target_.endswith("LocalLauncher")
    assert local.hydra.launcher.tasks_per_node == 2


def test_slurm_launcher_refuses_devices_it_cannot_count(compose_train):
    cfg = compose_train("hydra/launcher=submitit_slurm", "trainer=ddp")  # devices=-1: all GPUs
    with pytest.raises(InterpolationResolutionError, match="set trainer.devices=N"):
        _ = cfg.hydra.launcher.tasks_per_node


def test_sbatch_script_asks_for_what_the_trainer_needs(compose_train, tmp_path, monkeypatch):
    """The sbatch file submitit would submit for one sweep point (built here; no sbatch runs)."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_train(
        "hydra/launcher=submitit_slurm",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "trainer.devices=4",
        "hydra.launcher.partition=gpu",
        "hydra.job.name=train",
    )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    # The hand-over the plugin does (hydra_submitit_launcher.submitit_launcher.launch).
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"),
        cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{k if k in generic else f"slurm_{k}": v for k, v in params.items()}
    )
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "x")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=128GB",
        "#SBATCH --time=1440",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
    ):
        assert line in script, script


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_point_ddp_sweep(tmp_path, sample_root):
    """One job per λ, each of two processes that Lightning joins into one DDP group."""
    proc = run_script(
        "train.py",
        [
            "-m",
            "hydra/launcher=submitit_local",
            "trainer=ddp_cpu",
            "model.lmbda=0.0018,0.0067",
            *tiny_args(tmp_path, sample_root),
            "trainer.max_steps=2",
        ],
    )
    _ok(proc)
    # One sweep directory: the jobs resolved the same time stamp as the launcher.
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    runs = sorted(sweep.glob("*_lmbda*"))
    assert [r.name.split("_lmbda")[1] for r in runs] == ["0.0018", "0.0067"]
    for run in runs:
        checkpoint = read_checkpoint(run / "checkpoints" / "last.ckpt")
        assert checkpoint["global_step"] == 2
        assert f"lmbda{checkpoint['hyper_parameters']['lmbda']}" in run.name
    jobs = [d for d in (sweep / ".submitit").iterdir() if d.name.isdigit()]  # also: "%j"
    assert len(jobs) == 2
    for job in jobs:
        (rank0,) = job.glob("*_0_log.out")
        (rank1,) = job.glob("*_1_log.out")
        assert "MEMBER: 1/2" in rank0.read_text() and "MEMBER: 2/2" in rank1.read_text()
        # Printed once per job, by rank zero.
        assert "effective batch size 4 = 2 per device × 2 device(s)" in rank0.read_text()
        assert "effective batch size" not in rank1.read_text()


# ---- preemption -------------------------------------------------------------------------------
def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(env or {}, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.2)


def _preemptible_args(tmp_path: Path, sample_root: Path, marker: Path) -> list[str]:
    return tiny_args(tmp_path, sample_root) + [
        "trainer.max_steps=1000",
        "trainer.val_check_interval=1000",
        "+callbacks.slow._target_=tests.scaling_helpers.SlowAfter",
        "+callbacks.slow.step=2",
        f"+callbacks.slow.marker={marker}",
    ]


def _resumed_args(tmp_path: Path, sample_root: Path, start: Path, steps: int) -> list[str]:
    return tiny_args(tmp_path, sample_root) + [
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=1",  # a last.ckpt at every step
        "+callbacks.start._target_=tests.scaling_helpers.RecordStart",
        f"+callbacks.start.path={start}",
    ]


def test_a_signal_leaves_a_checkpoint_the_run_resumes_from(tmp_path, sample_root):
    marker, start = tmp_path / "at_step", tmp_path / "start"
    proc = _start(_preemptible_args(tmp_path, sample_root, marker))
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, out[-3000:]
    (saved,) = (tmp_path / "logs").rglob("hpc_ckpt_*.ckpt")
    assert saved.name == "hpc_ckpt_1.ckpt"
    stopped_at = read_checkpoint(saved)["global_step"]
    assert stopped_at >= 2 and "stopped by SIGUSR1" in out
    codec = load_codec(saved)  # a coding-ready codec like every other checkpoint
    x = torch.rand(1, 3, 64, 64)
    assert codec.decompress(codec.compress(x)).shape == x.shape

    steps = stopped_at + 2
    resumed = run_script(
        "train.py", _resumed_args(tmp_path, sample_root, start, steps) + ["resume=true"]
    )
    _ok(resumed)
    assert int(start.read_text()) == stopped_at
    assert str(saved) in resumed.stdout + resumed.stderr
    finals = sorted((tmp_path / "logs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert read_checkpoint(finals[-1])["global_step"] == steps


@pytest.mark.slow
def test_slurm_requeue_saves_requeues_and_resumes_in_the_same_directory(tmp_path, sample_root):
    """SLURM as the process sees it (its variables, an `scontrol` that records the requeue)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    requeued = tmp_path / "requeued"
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {requeued}\n')
    scontrol.chmod(0o755)
    env = {
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    marker, start = tmp_path / "at_step", tmp_path / "start"
    proc = _start(_preemptible_args(tmp_path, sample_root, marker), env)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGUSR1)  # SLURM's time-limit warning: Lightning saves, requeues
    deadline = time.monotonic() + 120
    while not requeued.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert requeued.read_text().split() == ["requeue", "4242"]
    proc.send_signal(signal.SIGTERM)  # SLURM ends the requeued job: one more checkpoint, exit
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    run_dir = next((tmp_path / "logs").rglob("slurm-4242"))
    saved = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert [p.name for p in saved] == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    stopped_at = read_checkpoint(saved[-1])["global_step"]

    # The requeued job: the same command and job id, no resume= needed.
    resumed = _start(_resumed_args(tmp_path, sample_root, start, stopped_at + 2), env)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert int(start.read_text()) == stopped_at
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == stopped_at + 2
    assert len(list((tmp_path / "logs").rglob("slurm-*"))) == 1


# ---- DDP ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process_with_twice_the_batch(tmp_path, sample_root):
    """Same data, same quantisation noise: every step's loss and the val/loss agree to 1e-5
    (measured: 1e-7).

    The weights agree less tightly: Adam moves a weight by about ±lr whatever the size of its
    gradient, so where a gradient is near zero the last-bit differences of a reduction done in
    another order can flip the sign of an update. Most weights still agree to 1e-5 and none by
    more than 2·lr per step.
    """
    lr, steps = 1e-3, 4

    def run(name: str, *extra: str) -> dict:
        record = tmp_path / f"{name}.json"
        proc = run_script(
            "train.py",
            tiny_args(tmp_path / name, sample_root)
            + [
                "lr_schedule=constant",
                f"model.optimizer.lr={lr}",
                f"trainer.max_steps={steps}",
                "data._target_=tests.scaling_helpers.FixedPatches",
                "trainer.limit_val_batches=null",
                "trainer.val_check_interval=4",
                "+callbacks.noise._target_=tests.scaling_helpers.FixedQuantizationNoise",
                "+callbacks.record._target_=tests.scaling_helpers.RecordRun",
                f"+callbacks.record.path={record}",
                *extra,
            ],
        )
        _ok(proc)
        result = json.loads(record.read_text())
        result["weights"] = torch.load(record.with_suffix(".pt"), weights_only=True)
        result["log"] = proc.stdout + proc.stderr
        return result

    ddp = run("ddp", "trainer=ddp_cpu", "data.batch_size=2")
    single = run("single", "data.batch_size=4")
    assert "effective batch size 4 = 2 per device × 2 device(s)" in ddp["log"]
    assert "effective batch size 4 = 4 per device × 1 device(s)" in single["log"]
    assert len(ddp["losses"]) == len(single["losses"]) == steps
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5)
    # val/loss is a torchmetrics mean synchronised over the two ranks' halves of the val set.
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    total = differing = 0
    for key, value in single["weights"].items():
        if value.is_floating_point() and "_quantized_cdf" not in key:
            other = ddp["weights"][key]
            assert (other - value).abs().max() <= 2 * lr * steps, key
            differing += int((~torch.isclose(other, value, rtol=1e-3, atol=1e-5)).sum())
            total += value.numel()
    assert differing < 0.1 * total, (differing, total)
