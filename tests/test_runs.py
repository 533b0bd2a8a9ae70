"""`python train.py` as a user runs it: sweeps, DDP on two CPU processes, kill-and-resume, warm starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from src.utils.checkpoints import read_checkpoint
from tests.conftest import tiny_args
from tests.helpers import REPO, run_script


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, sample_root) -> Path:
    """A two-point λ sweep, run once: its log directory."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    proc = run_script(
        "train.py",
        ["-m", "model.lmbda=0.0018,0.025", *tiny_args(tmp_path, sample_root), "logger=tensorboard"],
    )
    _ok(proc)
    return tmp_path / "logs"


def test_lambda_sweep_gives_one_directory_and_logger_run_per_lambda(sweep):
    runs = sorted((sweep / "train" / "multiruns").glob("*/*_lmbda*"))
    assert [r.name.split("_lmbda")[1] for r in runs] == ["0.0018", "0.025"]
    for run in runs:
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        hparams = read_checkpoint(run / "checkpoints" / "last.ckpt")["hyper_parameters"]
        assert f"{hparams['lmbda']}" in run.name


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path, sample_root):
    proc = run_script("train.py", ["trainer=ddp_cpu", *tiny_args(tmp_path, sample_root)])
    _ok(proc)
    ckpts = list((tmp_path / "logs").rglob("last.ckpt"))
    assert len(ckpts) == 1
    checkpoint = read_checkpoint(ckpts[0])
    assert checkpoint["global_step"] == 4
    assert (
        "world_size=2" in proc.stdout + proc.stderr
        or "Initializing distributed" in proc.stdout + proc.stderr
    )


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, sample_root):
    args = tiny_args(tmp_path, sample_root) + ["trainer.max_steps=8", "lr_schedule=step_decay"]
    killed = run_script(
        "train.py",
        args + ["+callbacks.die._target_=tests.helpers.DieAtStep", "+callbacks.die.step=5"],
    )
    assert killed.returncode == 17, killed.stderr[-2000:]
    saved = next((tmp_path / "logs").rglob("last.ckpt"))
    checkpoint = read_checkpoint(saved)
    assert checkpoint["global_step"] == 4

    dump = tmp_path / "start_state.pt"
    resumed = run_script(
        "train.py",
        args
        + [
            "resume=true",
            "+callbacks.dump._target_=tests.helpers.DumpStartState",
            f"+callbacks.dump.path={dump}",
        ],
    )
    _ok(resumed)
    start = torch.load(dump, weights_only=False)
    assert start["global_step"] == 4
    for restored, written in zip(start["optimizer_states"], checkpoint["optimizer_states"]):
        assert restored["param_groups"][0]["lr"] == written["param_groups"][0]["lr"]
        for key, value in written["state"].items():
            assert torch.equal(restored["state"][key]["exp_avg"], value["exp_avg"])
    finals = sorted((tmp_path / "logs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert read_checkpoint(finals[-1])["global_step"] == 8
    assert str(saved) in resumed.stdout + resumed.stderr


def test_warm_start_from_a_checkpoint_copies_weights_only(tmp_path, sample_root):
    first = run_script(
        "train.py", [*tiny_args(tmp_path, sample_root), "callbacks.progress_bar.interval=0"]
    )
    _ok(first)
    # output is not a terminal here: plain progress lines instead of an invisible Rich bar
    assert "training step: 4/4 (100 %)" in first.stdout and "validation at step" in first.stdout
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    dump = tmp_path / "start_state.pt"
    warm = run_script(
        "train.py",
        tiny_args(tmp_path / "b", sample_root)
        + [
            f"ckpt={ckpt}",
            "+callbacks.dump._target_=tests.helpers.DumpStartState",
            f"+callbacks.dump.path={dump}",
        ],
    )
    _ok(warm)
    assert torch.load(dump, weights_only=False)["global_step"] == 0
    assert f"initialised weights from {ckpt}" in warm.stdout + warm.stderr


def test_checkpoint_of_another_codec_is_refused(tmp_path, sample_root):
    first = run_script(
        "train.py", tiny_args(tmp_path, sample_root) + ["model=bmshj2018_factorized"]
    )
    _ok(first)
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    proc = run_script("train.py", tiny_args(tmp_path / "b", sample_root) + [f"ckpt={ckpt}"])
    assert proc.returncode == 2
    assert "holds a bmshj2018-factorized codec, this run builds bmshj2018-hyperprior" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.lmbdaa=0.01"], "lmbdaa"),
        (["ckpt=/nonexistent/last.ckpt"], "checkpoint /nonexistent/last.ckpt does not exist"),
        (["resume=true"], "resume=true found no checkpoints/last.ckpt"),
        (["model.metric=psnr"], "model.metric must be one of"),
    ],
)
def test_bad_arguments_give_one_clear_error(tmp_path, sample_root, args, message):
    proc = run_script("train.py", tiny_args(tmp_path, sample_root) + args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("train.py", ["model=bmshj2018"], "model=bmshj2018: no such option of 'model'"),
        ("evaluate.py", ["ckpt=x.ckpt", "data=kodk"], "data=kodk: no such option of 'data'"),
    ],
)
def test_a_mistyped_option_prints_one_line_with_the_group_options(script, args, expected):
    proc = run_script(script, args)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {expected}; choose one of: ")
    group = "model" if script == "train.py" else "data"
    options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
    assert line.endswith(", ".join(options))


def test_empty_data_folder_is_named(tmp_path, sample_root):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script(
        "train.py", tiny_args(tmp_path, sample_root) + ["data=folder", f"data.root={empty}"]
    )
    assert proc.returncode == 2
    assert f"no training images found under {empty}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_output_directory_is_named(tmp_path, sample_root):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory should be")
    proc = run_script(
        "train.py", tiny_args(tmp_path, sample_root) + [f"hydra.run.dir={blocked}/run"]
    )
    assert proc.returncode != 0
    assert str(blocked) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fast_dev_run_and_overfit_presets(tmp_path, sample_root):
    _ok(run_script("train.py", tiny_args(tmp_path, sample_root) + ["debug=fdr"]))
    _ok(
        run_script(
            "train.py", tiny_args(tmp_path, sample_root) + ["debug=overfit", "trainer.max_steps=3"]
        )
    )


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = run_script("train.py", ["--cfg", "job"])
    _ok(proc)
    assert "bmshj2018-hyperprior" in proc.stdout and "lmbda" in proc.stdout


def test_evaluate_draws_the_sweep_curve_against_classical_codecs(tmp_path, sweep, sample_root):
    args = [
        f"ckpt={sweep / 'train' / 'multiruns'}",
        f"data.root={sample_root}",
        f"paths.log_dir={tmp_path}/logs",
        f"baseline_cache={tmp_path}/cache",
        "baselines=[jpeg,webp,avif,jxl]",
        "baseline_qualities=[2,30,90]",
        "anchor=webp",
        "threads=1",
    ]
    proc = run_script("evaluate.py", args, timeout=600)
    _ok(proc)
    out = next((tmp_path / "logs" / "evaluate").rglob("rd.png")).parent
    assert out.joinpath("rd.png").stat().st_size > 1000
    curve = json.loads(out.joinpath("curve-bmshj2018-hyperprior.json").read_text())
    assert len(curve["results"]["bpp"]) == 2 and len(curve["results"]["psnr-rgb"]) == 2
    point = json.loads(next(out.glob("bmshj2018-hyperprior-*.json")).read_text())
    assert '"delta_psnr_vs_jpeg_db"' in json.dumps(point)
    for name in ("jpeg", "webp", "avif"):
        baseline = json.loads(out.joinpath(f"{name}.json").read_text())
        assert len(baseline["results"]["bpp"]) == 3 and len(baseline["images"]) == 3
    assert list((tmp_path / "cache").glob("*/webp.json"))
    rows = {r["curve"]: r for r in json.loads(out.joinpath("bd_rate.json").read_text())}
    assert rows["jpeg"]["anchor"] == "webp"  # every curve against the anchor, classical ones too
    assert {"psnr", "ms_ssim"} <= set(rows["jpeg"]) and rows["jpeg"]["psnr"]["value"] > 0
    assert "BD-rate against webp" in proc.stdout
    page = out.joinpath("report.html").read_text()  # two images side by side, all embedded
    assert page.count("<figure>") == 2 * (1 + 1 + 4) and "src='http" not in page
    assert "baseline jxl skipped" not in proc.stdout  # pillow-jxl-plugin, a dependency


def test_wandb_offline_run_logs_config_and_images(tmp_path, sample_root, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    proc = run_script(
        "train.py", tiny_args(tmp_path, sample_root) + ["logger=wandb", "tags=[smoke]"]
    )
    _ok(proc)
    runs = list((tmp_path / "logs").rglob("offline-run-*"))
    assert runs, proc.stdout[-2000:]
    assert list(runs[0].glob("files/media/images/val/reconstructions_*.png"))
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # config and metrics, offline
    assert b"lmbda" in record and b"bmshj2018-hyperprior" in record and b"val/psnr" in record


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, sample_root):
    _ok(run_script("train.py", tiny_args(tmp_path, sample_root) + ["trainer.precision=bf16-mixed"]))
