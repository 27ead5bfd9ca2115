"""Every callback and the datamodule configured from a LightningCLI YAML file (examples/cli/)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cl_plugin.callbacks import ContinualEvaluation, LoRAAdapters, ModelMerging
from cl_plugin.callbacks.evaluation import default_predict

pytest.importorskip("jsonargparse")
EXAMPLES = Path(__file__).parent.parent / "examples" / "cli"


def load_example():
    spec = importlib.util.spec_from_file_location("cli_train", EXAMPLES / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(tmp_path, config, *overrides):
    args = ["--config", str(EXAMPLES / config), f"--trainer.default_root_dir={tmp_path}", *overrides]
    return load_example().main(args=args, run=False)


def callback(cli, kind):
    (found,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, kind)]
    return found


@pytest.mark.parametrize(
    "config, method, options",
    [("magmax.yaml", "magmax", {}), ("opcm.yaml", "opcm", {"alpha": 0.3}), ("ties.yaml", "ties", {"top_k": 0.2})],
)
def test_each_example_config_builds_the_merger_it_names(tmp_path, config, method, options):
    cli = build(tmp_path, config)
    merging = callback(cli, ModelMerging)
    assert merging.method == method and merging.method_options == options
    assert merging.merger.options() == ({**options} if method != "magmax" else {})
    assert callback(cli, ContinualEvaluation).compare == ["average"]
    assert cli.datamodule.benchmark_name == "split_digits" and cli.datamodule.n_experiences == 5
    assert cli.trainer.max_epochs == cli.datamodule.total_epochs


def test_an_option_given_on_the_command_line_reaches_the_merger(tmp_path):
    cli = build(tmp_path, "ties.yaml", "--trainer.callbacks.init_args.method_options.top_k=0.35")
    assert callback(cli, ModelMerging).merger.top_k == 0.35


def test_the_opcm_config_trains_the_stream_end_to_end(tmp_path):
    cli = build(tmp_path, "opcm.yaml", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    merging = callback(cli, ModelMerging)
    assert merging.merger.num_tasks == 5 and merging.merger.alpha == 0.3
    assert set(callback(cli, ContinualEvaluation).results) == {"sequential_finetuning", "opcm", "average"}


def test_lora_merge_options_and_a_predict_function_from_yaml(tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text(
        (EXAMPLES / "magmax.yaml").read_text().split("  callbacks:")[0]
        + f"""  callbacks:
    - class_path: cl_plugin.callbacks.LoRAAdapters
      init_args:
        target_modules: [net.1]
        trainable: [net.3]
        method: ties
        method_options:
          top_k: 0.4
    - class_path: cl_plugin.callbacks.ContinualEvaluation
      init_args:
        predict: cl_plugin.callbacks.evaluation.default_predict
"""
    )
    cli = load_example().main(args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)
    lora = callback(cli, LoRAAdapters)
    assert lora.method == "ties" and lora.merger.top_k == 0.4
    assert callback(cli, ContinualEvaluation).predict is default_predict
