"""timm backbones in the image recipes (`--model.arch timm/<name>`), end to end through `adalabel fit` on tiny generated
data in the real on-disk formats, with small randomly initialised timm models: nothing is downloaded."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

# Set before timm imports huggingface_hub, which reads it once: no test may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# timm's tiny test models (test_resnet, test_vit, test_convnext, 0.2-0.4M parameters) exist from timm 1.0.10 on.
timm = pytest.importorskip("timm", minversion="1.0.10", reason='the test extra: pip install "lightning-adalabel[test]"')

from lightning_adalabel.examples.cli import main  # noqa: E402
from lightning_adalabel.examples.recipes import recipe_paths  # noqa: E402
from lightning_adalabel.examples.recipes.lightning_cli import run  # noqa: E402
from lightning_adalabel.examples.recipes.vision import build_image_model  # noqa: E402
from tests.examples.test_recipe_data_errors import CLOSED_PORT  # noqa: E402
from tests.examples.test_recipes import (  # noqa: E402
    REPO_ROOT,
    adalabel_callback,
    assert_trained_and_evaluated,
    cifar_args,
    metrics,
    quick_trainer_args,
    write_cifar10,
    write_cifar100,
    write_image_folder,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root)
    write_cifar100(root)
    write_image_folder(root / "imagenet")
    return root


def drop_path_rates(model: torch.nn.Module) -> List[float]:
    return [module.drop_prob for module in model.modules() if isinstance(module, timm.layers.DropPath)]


def test_cifar10_recipe_trains_a_timm_model_and_validates_its_checkpoint(data_root, tmp_path):
    args = [*cifar_args("cifar10", data_root, tmp_path), "--model.arch", "timm/test_resnet"]
    cli = run(["fit", *args])
    assert_trained_and_evaluated(metrics(cli))
    net = cli.model.net
    assert isinstance(net, timm.models.ResNet) and net.pretrained_cfg["architecture"] == "test_resnet"
    assert net.num_classes == 10 and net.get_classifier().out_features == 10
    callback = adalabel_callback(cli.trainer)
    assert callback.label_matrix.num_classes == 10 and callback.label_matrix.num_refreshes == 1
    uniform = (1 - torch.eye(10)) / 9  # Q's start; the refresh moved it with the timm model's wrong-class mass
    assert not torch.allclose(callback.label_matrix.matrix.cpu(), uniform)

    checkpoint = next(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    validated = run(["validate", *args, "--ckpt_path", str(checkpoint)])
    assert "val/acc" in metrics(validated)
    trained = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    for name, value in validated.model.state_dict().items():  # the timm weights came back from the checkpoint
        torch.testing.assert_close(value, trained[name], msg=name)


def test_timm_vit_with_model_kwargs_trains_on_mixup_batches(data_root, tmp_path):
    """`--model.model_kwargs` reaches timm.create_model: a ViT built for 32x32 CIFAR images, with stochastic depth."""
    cli = run([
        "fit", *cifar_args("cifar100", data_root, tmp_path), "--model.arch", "timm/test_vit",
        "--model.model_kwargs", "{img_size: 32, drop_path_rate: 0.1}", "--model.mixup_alpha", "0.2",
        "--adalabel.refresh_every_n_steps", "1",
    ])
    assert_trained_and_evaluated(metrics(cli))
    net = cli.model.net
    assert isinstance(net, timm.models.VisionTransformer) and net.patch_embed.img_size == (32, 32)
    assert max(drop_path_rates(net)) == pytest.approx(0.1)
    assert net.num_classes == 100
    assert adalabel_callback(cli.trainer).label_matrix.num_refreshes == 2  # after each of the 2 steps


def test_imagenet_convnext_recipe_trains_a_timm_convnext(data_root, tmp_path):
    """The shipped recipe (drop path 0.1, MixUp/CutMix, AdamW, lr scaled from a batch of 4096) on small crops, in one
    CPU process, with timm's 0.2M-parameter test ConvNeXt in place of ConvNeXt-T (28M parameters, too slow here)."""
    with open(recipe_paths()["imagenet_convnext"], encoding="utf-8") as file:
        model_args = yaml.safe_load(file)["model"]["init_args"]
    assert model_args["arch"] == "timm/convnext_tiny" and timm.is_model("convnext_tiny")
    cli = run([
        "fit", "--config", "imagenet_convnext", *quick_trainer_args(tmp_path), "--trainer.strategy", "auto",
        "--model.arch", "timm/test_convnext",
        "--trainer.precision", "32-true", "--model.num_classes", "3",
        "--data.train_root", str(data_root / "imagenet" / "train"),
        "--data.val_root", str(data_root / "imagenet" / "val"),
        "--data.batch_size", "2", "--data.num_workers", "0",
        "--data.train_crop_size", "32", "--data.val_resize_size", "36", "--data.val_crop_size", "32",
    ])
    assert_trained_and_evaluated(metrics(cli))
    net = cli.model.net
    assert isinstance(net, timm.models.ConvNeXt) and net.pretrained_cfg["architecture"] == "test_convnext"
    assert max(drop_path_rates(net)) == pytest.approx(0.1)
    assert cli.model.optimizer_name == "adamw" and cli.model.scaled_lr() == pytest.approx(4e-3 * 2 / 4096)
    assert cli.model.batch_mixing is not None
    callback = adalabel_callback(cli.trainer)
    assert callback.label_matrix.num_classes == 3 and callback.label_matrix.num_refreshes == 1


def test_unknown_timm_model_is_told_in_one_line_with_close_names(data_root, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"did you mean timm/convnext_tiny\b"):
        build_image_model("timm/convnext_tiyn", num_classes=10)
    status = main(["fit", *cifar_args("cifar10", data_root, tmp_path), "--model.arch", "timm/resnet_18"])
    error = capsys.readouterr().err
    assert status == 1 and error.count("\n") == 1, error
    assert error.startswith("adalabel: error: 'resnet_18' is not a timm model; did you mean timm/resnet18")


def test_missing_timm_names_the_extra(monkeypatch, data_root, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as it does where timm is not installed
    with pytest.raises(ImportError, match=r'pip install "lightning-adalabel\[timm\]"'):
        build_image_model("timm/test_resnet", num_classes=10)
    status = main(["fit", *cifar_args("cifar10", data_root, tmp_path), "--model.arch", "timm/test_resnet"])
    error = capsys.readouterr().err
    assert status == 1 and error.count("\n") == 1, error
    assert 'needs timm, an optional dependency: pip install "lightning-adalabel[timm]"' in error


def test_model_kwargs_reach_torchvision_models_too():
    model = build_image_model("cifar_resnet18", num_classes=10, model_kwargs={"zero_init_residual": True})
    assert all(not block.bn2.weight.any() for block in model.modules() if hasattr(block, "bn2"))


def test_pretrained_needs_a_timm_arch():
    with pytest.raises(ValueError, match="--model.arch timm/resnet18"):
        build_image_model("cifar_resnet18", num_classes=10, pretrained=True)


# Run in a fresh interpreter (huggingface_hub reads its environment when imported) whose Hugging Face Hub is a closed
# local port (nothing leaves the machine) and whose cache holds the weights of test_resnet only, as a compute node
# without the network whose cache was filled on a login node: test_resnet is built from the cache, test_convnext's
# missing weights are told at once, and test_vit's under HF_HUB_OFFLINE (set as importing with HF_HUB_OFFLINE=1 does).
OFFLINE_SCENARIOS = """
import json, sys, torch
from huggingface_hub import constants
from lightning_adalabel.examples.recipes.vision import build_image_model
def last_line(name):
    try:
        build_image_model(name, num_classes=10, pretrained=True)
    except FileNotFoundError as error:
        return f"{type(error).__name__}: {error}", type(error.__cause__).__name__
torch.save(build_image_model("timm/test_resnet", num_classes=10, pretrained=True).state_dict(), sys.argv[1])
unreachable = last_line("timm/test_convnext")
constants.HF_HUB_OFFLINE = True
offline = last_line("timm/test_vit")
print(json.dumps({"unreachable": unreachable, "offline": offline}))
"""


@pytest.fixture(scope="module")
def offline_node(tmp_path_factory) -> Dict[str, Any]:
    """What ``OFFLINE_SCENARIOS`` built and said, with the cached weights it was given."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    root = tmp_path_factory.mktemp("offline_node")
    cached = timm.create_model("test_resnet").state_dict()  # "pretrained" weights: a random 1000-class test_resnet
    revision = "0" * 40
    repo = root / "hf_home" / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    safetensors_torch.save_file(cached, str(repo / "snapshots" / revision / "model.safetensors"))
    env = {name: value for name, value in os.environ.items()
           if "proxy" not in name.lower() and name != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(root / "hf_home"), HF_ENDPOINT=CLOSED_PORT, HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run([sys.executable, "-c", OFFLINE_SCENARIOS, str(root / "built.pt")], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"cached": cached, "built": torch.load(root / "built.pt"), "stderr": result.stderr,
            **json.loads(result.stdout.splitlines()[-1])}


@pytest.mark.slow  # a fresh interpreter that imports timm
def test_pretrained_weights_in_the_cache_load_at_once_where_the_hub_cannot_be_reached(offline_node):
    """timm loads the cached weights, all but the new 10-way classifier, without huggingface_hub's five retries
    (54 s on this machine where the Hub's name does not resolve)."""
    built, cached = offline_node["built"], offline_node["cached"]
    assert built["fc.weight"].shape[0] == 10
    for name, value in built.items():
        if not name.startswith("fc."):
            assert torch.equal(value, cached[name]), name
    assert "Retrying" not in offline_node["stderr"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["unreachable", "offline"])
def test_pretrained_weights_offline_and_not_cached_name_the_fix(offline_node, scenario):
    """`pretrained=True` really asks timm for the weights: offline (HF_HUB_OFFLINE), or where the Hub cannot be
    reached, without the weights in the cache, the model is not built and one line says what to do."""
    line, cause = offline_node[scenario]
    name, reason = {
        "unreachable": ("test_convnext", "the Hub cannot be reached (127.0.0.1:9: Connection refused)"),
        "offline": ("test_vit", "could not be downloaded (LocalEntryNotFoundError)"),
    }[scenario]
    assert line == (
        f"FileNotFoundError: The pretrained weights of timm/{name} are not in the Hugging Face cache and {reason}."
        " Run once with network access (the weights are then cached; see HF_HOME), or train from scratch with"
        " `--model.pretrained false`."
    )
    assert cause == "LocalEntryNotFoundError"  # huggingface_hub's error, kept as the cause
