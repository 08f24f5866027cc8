"""`adalabel` runs that start from a checkpoint, stop early or write files, each run as a real process on generated
files: a preempted job resumed with one command (without SLURM, and with Lightning's SLURM plugin on its requeue
signal), what a checkpoint fixes (`--model.*`, the data settings the model depends on, the recipe), `last.ckpt`,
predictions, too little data, and the cheap trial line of docs/recipes.md."""

import csv
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_adalabel import save_label_matrix
from lightning_adalabel.examples.cli import main
from lightning_adalabel.examples.recipes.text import FastTextClassifier, TextClassificationDataModule
from tests.examples.test_recipes import write_cifar10, write_text_csvs

REPO_ROOT = Path(__file__).resolve().parents[2]
PREEMPT_AT = "ADALABEL_TEST_PREEMPT_AT"  # the global step at which Preempt kills the run
PREEMPT_SIGNAL = "ADALABEL_TEST_PREEMPT_SIGNAL"  # a signal Preempt sends first (SLURM's SIGUSR1)
SLURM_JOB = {  # what srun sets for one task of job 4242 on one node; Lightning's SLURMEnvironment reads these
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "agnews-alr", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
}


class Preempt(pl.Callback):
    """Kills its own process with SIGKILL after the training step ``$ADALABEL_TEST_PREEMPT_AT``, as a preempted or
    timed-out job is killed; with ``$ADALABEL_TEST_PREEMPT_SIGNAL=SIGUSR1`` it first raises the signal that SLURM
    sends before the time limit (``#SBATCH --signal=SIGUSR1@90``), on which Lightning saves ``hpc_ckpt_<n>.ckpt``
    and calls ``scontrol requeue``."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if os.environ.get(PREEMPT_AT) == str(trainer.global_step):
            if os.environ.get(PREEMPT_SIGNAL):
                signal.raise_signal(getattr(signal, os.environ[PREEMPT_SIGNAL]))  # its Python handler runs here
            os.kill(os.getpid(), signal.SIGKILL)


def adalabel(args: List[str], cwd: Path, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``adalabel <args>`` in a new process; the repository is importable for the test callbacks."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    for name in (PREEMPT_AT, PREEMPT_SIGNAL, *SLURM_JOB):
        if env is None or name not in env:
            environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "lightning_adalabel.examples.cli", *args],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
    )


def adalabel_in_process(args: List[str], cwd: Path, monkeypatch, capsys) -> Tuple[int, str]:
    """``main(args)``, the function behind the ``adalabel`` command, in this process (no interpreter start): its
    exit status and the last line it printed on stderr."""
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    status = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, (err.splitlines() or [""])[-1]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def tiny_agnews(data: Path) -> List[str]:
    """The agnews recipe on the generated CSV files: a 4096-row hashing space, batches of 4, two steps an epoch."""
    return [
        "--config", "agnews", "--data.root", str(data / "ag_news_csv"),
        "--data.num_buckets", "4096", "--model.num_buckets", "4096", "--data.batch_size", "4",
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_text_csvs(root / "ag_news_csv", num_classes=4, num_fields=2, num_train=24, num_test=8)
    write_text_csvs(root / "yahoo_answers_csv", num_classes=10, num_fields=3, num_train=10, num_test=4)
    q = torch.tensor([[0.0, 0.5, 0.3, 0.2], [0.1, 0.0, 0.6, 0.3], [0.2, 0.2, 0.0, 0.6], [0.7, 0.2, 0.1, 0.0]])
    save_label_matrix(q, str(root / "q.csv"))
    return root


def resume_command(data: Path, run: str, *extra: str) -> List[str]:
    """The one command of a job that may be preempted: the same for its first start and every requeue."""
    return ["fit", *tiny_agnews(data), "--trainer.default_root_dir", run, "--ckpt_path", "last",
            "--trainer.callbacks+=tests.examples.test_cli_resume.Preempt", *extra]


# ---- a job preempted without SLURM, resumed with the same command ----------------------------------------------------


@pytest.fixture(scope="module")
def preempted_run(data, tmp_path_factory):
    """3 epochs of 2 steps at lr 0, so that val/acc never improves after epoch 0; killed after step 3 (in epoch 1),
    then the same command again, then once more with a larger max_epochs and batch size."""
    cwd = tmp_path_factory.mktemp("job")
    command = resume_command(data, "run", "--model.lr", "0.0", "--data.ngrams", "1", "--trainer.max_epochs", "3")
    first = adalabel(command, cwd, env={PREEMPT_AT: "3"})
    checkpoints = cwd / "run" / "lightning_logs" / "version_0" / "checkpoints"
    after_kill = {path.name: path.stat() for path in checkpoints.iterdir()}
    second = adalabel(command, cwd)
    after_resume = {path.name: path.stat() for path in checkpoints.iterdir()}
    last_after_resume = load(checkpoints / "last.ckpt")
    versions = sorted(path.name for path in (cwd / "run" / "lightning_logs").iterdir())
    longer = adalabel([*command, "--trainer.max_epochs", "4", "--data.batch_size", "2"], cwd)
    return {"cwd": cwd, "command": command, "first": first, "second": second, "longer": longer,
            "after_kill": after_kill, "after_resume": after_resume, "last_after_resume": last_after_resume,
            "versions": versions, "checkpoints": checkpoints}


@pytest.mark.slow
def test_first_start_of_the_resume_command_trains_from_scratch(preempted_run):
    first = preempted_run["first"]
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert "--ckpt_path last: no checkpoint under" in first.stderr
    assert "training starts from the beginning" in first.stderr


@pytest.mark.slow
def test_last_ckpt_of_the_same_state_as_the_best_is_one_file_not_a_copy(preempted_run):
    """Killed in epoch 1: last.ckpt holds epoch 0, the best epoch, and is a hard link to its file."""
    after_kill = preempted_run["after_kill"]
    (best,) = [name for name in after_kill if name.startswith("epoch000-")]
    assert sorted(after_kill) == sorted([best, "last.ckpt"])  # no leftover temporary file
    assert after_kill["last.ckpt"].st_ino == after_kill[best].st_ino and after_kill[best].st_nlink == 2


@pytest.mark.slow
def test_resume_command_continues_the_preempted_run_in_its_folder(preempted_run):
    second, checkpoints = preempted_run["second"], preempted_run["checkpoints"]
    assert second.returncode == 0, second.stderr[-3000:]
    last_ckpt = Path("run/lightning_logs/version_0/checkpoints/last.ckpt")
    assert f"adalabel: --ckpt_path last: {last_ckpt}, the newest checkpoint under" in second.stderr
    assert f"Restoring states from the checkpoint path at {last_ckpt}" in second.stderr
    assert preempted_run["versions"] == ["version_0"]
    last = preempted_run["last_after_resume"]
    assert (last["epoch"], last["global_step"]) == (2, 6)  # the 3 epochs of 2 steps, none lost or repeated


@pytest.mark.slow
def test_last_ckpt_is_the_latest_state_when_the_metric_does_not_improve(preempted_run):
    """lr 0: val/acc is the same every epoch, so the best checkpoint stays epoch 0's; last.ckpt still follows."""
    after_resume = preempted_run["after_resume"]
    (best,) = [name for name in after_resume if name != "last.ckpt"]
    assert best.startswith("epoch000-") and after_resume["last.ckpt"].st_ino != after_resume[best].st_ino
    assert load(preempted_run["checkpoints"] / best)["global_step"] == 2
    assert preempted_run["last_after_resume"]["global_step"] == 6


@pytest.mark.slow
def test_resume_may_train_longer_with_other_trainer_and_loader_options(preempted_run):
    longer = preempted_run["longer"]
    assert longer.returncode == 0, longer.stderr[-3000:]
    last = load(preempted_run["checkpoints"] / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (3, 8)


@pytest.mark.slow
def test_resume_refuses_command_line_model_values_that_differ_from_the_checkpoint(preempted_run, monkeypatch, capsys):
    command = [*preempted_run["command"], "--trainer.max_epochs", "9",
               "--model.lr", "0.5", "--model.schedule", "constant"]
    status, line = adalabel_in_process(command, preempted_run["cwd"], monkeypatch, capsys)
    assert status == 1 and line.startswith("adalabel: error: ")
    assert "--model.lr 0.5 (checkpoint: 0.0), --model.schedule constant (checkpoint: linear)" in line
    assert "remove --model.lr, --model.schedule" in line
    assert load(preempted_run["checkpoints"] / "last.ckpt")["global_step"] == 8  # nothing trained


@pytest.mark.slow
def test_testing_with_other_data_settings_than_the_checkpoint_is_refused(preempted_run, data, monkeypatch, capsys):
    """The model was trained on words only (--data.ngrams 1); the recipe's default adds bigrams."""
    checkpoint = preempted_run["checkpoints"] / "last.ckpt"
    status, line = adalabel_in_process(
        ["test", *tiny_agnews(data), "--ckpt_path", str(checkpoint)], preempted_run["cwd"], monkeypatch, capsys
    )
    assert status == 1 and line.startswith("adalabel: error: ")
    assert "--data.ngrams 2 from the configuration (checkpoint: 1)" in line and "pass --data.ngrams 1" in line


@pytest.mark.slow
def test_another_recipes_checkpoint_is_refused_with_the_runs_own_config(preempted_run, data, monkeypatch, capsys):
    """yahoo (10 classes) from agnews' checkpoint, with the fix that the class-count check suggests; and a CIFAR
    recipe from it (another model class)."""
    checkpoint = str(preempted_run["checkpoints"] / "last.ckpt")
    run_config = Path("run/lightning_logs/version_0/config.yaml")
    status, line = adalabel_in_process([
        "fit", "--config", "yahoo", "--data.root", str(data / "yahoo_answers_csv"), "--data.num_buckets", "4096",
        "--model.num_buckets", "4096", "--data.num_workers", "0", "--model.num_classes", "10",
        "--ckpt_path", checkpoint,
    ], preempted_run["cwd"], monkeypatch, capsys)
    assert status == 1 and line.startswith("adalabel: error: ")
    assert "--model.num_classes 10 (checkpoint: 4)" in line and "--data.num_classes 10 from the configuration" in line
    assert f"--config {run_config}, the run's own" in line
    status, line = adalabel_in_process(
        ["test", "--config", "cifar10", "--ckpt_path", checkpoint], preempted_run["cwd"], monkeypatch, capsys
    )
    assert status == 1
    assert line == (
        f"adalabel: error: {checkpoint} holds a model of class FastTextClassifier trained on"
        " TextClassificationDataModule data, but this configuration builds ImageClassifier with CIFAR10DataModule"
        f" data: run it with the configuration it was trained with (--config {run_config}, the run's own) or pass a"
        " checkpoint of this recipe."
    )


@pytest.mark.slow
def test_ckpt_path_last_of_validate_takes_the_runs_checkpoint_and_tells_the_replaced_yaml_values(
    preempted_run, data, monkeypatch, caplog, capfd
):
    """Without --model.lr 0.0, the recipe's lr 0.001 differs from the checkpoint's: the checkpoint's is used, and
    a line says so."""
    monkeypatch.chdir(preempted_run["cwd"])
    with caplog.at_level(logging.INFO):
        status = main(["validate", *tiny_agnews(data), "--data.ngrams", "1", "--trainer.default_root_dir", "run",
                       "--ckpt_path", "last"])
    output = caplog.text + capfd.readouterr().err
    assert status == 0, output
    checkpoint = Path("run/lightning_logs/version_0/checkpoints/last.ckpt")
    told = f"adalabel: the model's hyperparameters come from {checkpoint}: lr 0.0 (the configuration says 0.001)"
    assert told in output
    status = main(["test", *tiny_agnews(data), "--trainer.default_root_dir", "no_run", "--ckpt_path", "last"])
    assert status == 1
    assert capfd.readouterr().err.splitlines()[-1] == (
        f"adalabel: error: --ckpt_path last found no checkpoint under {preempted_run['cwd'] / 'no_run'} (last.ckpt of"
        " its runs, or hpc_ckpt_*.ckpt). Pass the --trainer.default_root_dir of the training run, or the path of a"
        " .ckpt file."
    )


# ---- a job requeued by SLURM, resumed from Lightning's hpc checkpoint ------------------------------------------------


@pytest.fixture(scope="module")
def requeued_job(data, tmp_path_factory):
    """Job 4242 (SLURM's variables, one task, no srun): at step 3 it gets SIGUSR1, Lightning saves hpc_ckpt_1.ckpt
    and calls `scontrol requeue 4242` (a script that records it), then the job is killed; the requeued job runs the
    same command. With `--adalabel.preset fixed` the label matrix stays the initial_matrix read from q.csv."""
    cwd = tmp_path_factory.mktemp("slurm")
    bin_dir = cwd / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {cwd / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    env = {**SLURM_JOB, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = resume_command(data, "run", "--trainer.max_epochs", "2", "--adalabel.preset", "fixed",
                             "--adalabel.initial_matrix", str(data / "q.csv"))
    first = adalabel(command, cwd, env={**env, PREEMPT_AT: "3", PREEMPT_SIGNAL: "SIGUSR1"})
    hpc_files = sorted(path.name for path in (cwd / "run").glob("hpc_ckpt_*.ckpt"))
    requeued = adalabel(command, cwd, env=env)
    return {"cwd": cwd, "first": first, "requeued": requeued, "hpc_files": hpc_files}


@pytest.mark.slow
def test_slurm_requeue_signal_saves_an_hpc_checkpoint_and_requeues_the_job(requeued_job):
    first, cwd = requeued_job["first"], requeued_job["cwd"]
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert requeued_job["hpc_files"] == ["hpc_ckpt_1.ckpt"]
    assert (cwd / "scontrol.log").read_text().split() == ["requeue", "4242"]


@pytest.mark.slow
def test_requeued_slurm_job_resumes_from_the_hpc_checkpoint_with_the_same_command(requeued_job, data):
    requeued, cwd = requeued_job["requeued"], requeued_job["cwd"]
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at run{os.sep}hpc_ckpt_1.ckpt" in requeued.stderr
    # Lightning's default logger names the version after the SLURM job: the requeued job continues in it.
    assert [path.name for path in (cwd / "run" / "lightning_logs").iterdir()] == ["version_4242"]
    last = load(cwd / "run" / "lightning_logs" / "version_4242" / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 4)
    (state,) = [value for key, value in last["callbacks"].items() if key.startswith("AdaLabel")]
    q = torch.tensor([[0.0, 0.5, 0.3, 0.2], [0.1, 0.0, 0.6, 0.3], [0.2, 0.2, 0.0, 0.6], [0.7, 0.2, 0.1, 0.0]])
    torch.testing.assert_close(state["label_matrix"]["matrix"], q)  # --adalabel.initial_matrix q.csv, as a path


# ---- predictions -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_writes_one_row_per_sample_with_the_models_top_classes(requeued_job, data):
    cwd = requeued_job["cwd"]
    checkpoint = cwd / "run" / "lightning_logs" / "version_4242" / "checkpoints" / "last.ckpt"
    result = adalabel(["predict", *tiny_agnews(data), "--trainer.default_root_dir", "predict_run",
                       "--adalabel.preset", "fixed", "--adalabel.initial_matrix", str(data / "q.csv"),
                       "--ckpt_path", str(checkpoint), "--predictions.top_k", "3"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (cwd / "predict_run").glob("lightning_logs/version_*/predictions.csv")
    assert f"adalabel: wrote the predictions of the predict set (8 rows) to {path.relative_to(cwd)}" in result.stderr
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["index", "top1", "p1", "top2", "p2", "top3", "p3"]
    written = torch.tensor([[float(value) for value in row] for row in rows[1:]])
    assert written[:, 0].tolist() == list(range(8))  # test.csv's rows, in order

    model = FastTextClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    data_module = TextClassificationDataModule(str(data / "ag_news_csv"), 4, num_buckets=4096, num_workers=0)
    data_module.setup("predict")
    inputs, _ = next(iter(DataLoader(data_module.test_set, batch_size=8, collate_fn=data_module.collate_fn)))
    with torch.no_grad():
        probabilities = model(inputs).softmax(dim=1)
    top = probabilities.topk(3, dim=1)
    assert written[:, 1].long().tolist() == top.indices[:, 0].tolist()
    torch.testing.assert_close(written[:, 2::2], top.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(written[:, 1::2].long(), top.indices)


# ---- runs that would do nothing, and mistakes on the command line ----------------------------------------------------


def test_too_little_training_data_is_an_error_not_a_silent_success(data, tmp_path, monkeypatch, capsys):
    """10 rows with batches of 16 and drop_last: no batch at all."""
    status, line = adalabel_in_process(
        ["fit", "--config", "yahoo", "--data.root", str(data / "yahoo_answers_csv"), "--data.num_buckets", "4096",
         "--model.num_buckets", "4096", "--data.num_workers", "0", "--data.batch_size", "16",
         "--trainer.accelerator", "cpu"], tmp_path, monkeypatch, capsys,
    )
    assert status == 1
    assert line == (
        f"adalabel: error: No training batch: the training set in {data / 'yahoo_answers_csv'} has 10 samples,"
        " fewer than one batch of 16, and the incomplete batch is dropped (drop_last), so nothing was trained and no"
        " checkpoint written. Pass --data.batch_size 10 or less, or give more training data."
    )
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.mark.parametrize("command", ["fit", "test", "predict", "label-issues"])
def test_a_checkpoint_cut_short_or_not_a_checkpoint_is_one_line(command, data, tmp_path, monkeypatch, capsys):
    """A checkpoint copy stopped midway is cut short; `--ckpt_path` may also name any other file. Both are told in one
    line with the file's name and what to pass instead, before anything is trained."""
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"weight": torch.randn(64, 64)}, "hyper_parameters": {}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a checkpoint\n")
    for path in (cut, garbage):
        status, line = adalabel_in_process([command, *tiny_agnews(data), "--ckpt_path", str(path)], tmp_path,
                                           monkeypatch, capsys)
        assert status == 1
        assert line.startswith(f"adalabel: error: --ckpt_path {path}: cannot be read as a checkpoint (")
        assert line.endswith("Pass a checkpoint that `adalabel fit` saved, whole (a copy stopped midway leaves a file"
                             " cut short); an earlier checkpoint of the run will do.")
    assert not list(tmp_path.glob("**/lightning_logs"))  # nothing trained, nothing logged


def test_data_options_without_a_recipe_say_to_pass_config_first(data, tmp_path, monkeypatch, capsys):
    status, line = adalabel_in_process(
        ["fit", "--data.root", str(data / "ag_news_csv"), "--config", "agnews"], tmp_path, monkeypatch, capsys
    )
    assert status == 2
    assert line == (
        "adalabel: error: --data.root sets an option of the recipe's data class, which comes from --config: pass"
        " --config <recipe name or YAML file> before the --model.* and --data.* options (list the recipes with"
        " `adalabel recipes`)"
    )


# ---- the cheap trial of docs/recipes.md: one tiny epoch, next to nothing written -------------------------------------


def bytes_written(folder: Path) -> int:
    """The bytes of the files under ``folder``, each file (inode) once."""
    sizes = {}
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            sizes[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(sizes.values())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["agnews", "cifar10"])
def test_trial_line_runs_one_tiny_epoch_and_writes_under_50_mb(recipe, data, tmp_path):
    """The recipe's own model sizes (agnews: a 2**20 x 64 embedding, 805 MB per checkpoint with AdamW's state)."""
    if recipe == "agnews":
        data_args = ["--data.root", str(data / "ag_news_csv")]
    else:
        data_args = ["--data.root", str(write_cifar10(tmp_path / "cifar")), "--data.check_integrity", "false"]
    run = tmp_path / "trial"
    run.mkdir()
    result = adalabel(["fit", "--config", recipe, *data_args, "--trainer.fast_dev_run", "2", "--data.batch_size", "4",
                       "--data.num_workers", "0", "--trainer.accelerator", "cpu"], run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Running in `fast_dev_run` mode: will run the requested loop using 2 batch(es)" in result.stderr
    assert not list(run.rglob("*.ckpt"))
    assert bytes_written(run) < 50 * 2**20
