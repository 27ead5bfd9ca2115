"""LoRA files against the real HuggingFace PEFT: our export loads in PEFT, PEFT's loads in ours.

The model is a tiny BERT built from a random config (nothing is downloaded),
held by a LightningModule as ``self.model``, as in a user's script. Every
comparison is of logits on the same seeded inputs; everything runs on CPU in
seconds.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network; read when the hub is imported

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from lightning.pytorch import LightningModule  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from cl_plugin.adapters import inject_lora, load_lora, lora_delta, lora_layers, save_lora  # noqa: E402
from cl_plugin.errors import ConfigError, NoMatchingModulesError, StateDictMismatchError  # noqa: E402

SELF_ATTN = "bert.encoder.layer.{}.attention.self.{}"
QV = [SELF_ATTN.format(i, p) for i in (0, 1) for p in ("query", "value")]


# -- helpers ---------------------------------------------------------------------------------
class Classifier(LightningModule):
    """A LightningModule holding the network as ``self.model`` (module level: it pickles)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def make_bert(seed: int = 0) -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99, num_labels=3
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def bert_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 99, (3, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(**bert_inputs())
    return out if isinstance(out, torch.Tensor) else out.logits


def randomise(module: nn.Module, seed: int, names=("lora_A", "lora_B")) -> None:
    """Give every parameter whose name contains one of ``names`` seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapter changes the output: the check means something


def injected(seed: int = 0, mixed_ranks: bool = False, trainable=("classifier",)) -> tuple[Classifier, nn.Module]:
    """Our LightningModule with LoRA on query/value, and an untouched copy of its base network."""
    bert = make_bert(seed)
    fresh = copy.deepcopy(bert)
    module = Classifier(bert).eval()
    if mixed_ranks:
        inject_lora(module, ["query", "layer.0.attention.self.value"], r=4, alpha=8, trainable=list(trainable))
        inject_lora(module, ["layer.1.attention.self.value"], r=2, alpha=5, trainable=list(trainable))
    else:
        inject_lora(module, ["query", "value"], r=4, alpha=8, trainable=list(trainable))
    randomise(module, seed=3)
    return module, fresh


# -- export: PEFT loads what save_lora writes ----------------------------------------------------
@pytest.mark.parametrize("mixed_ranks", [False, True], ids=["one_rank", "rank_pattern"])
def test_peft_loads_our_export_exactly(tmp_path, mixed_ranks):
    module, fresh = injected(mixed_ranks=mixed_ranks)
    randomise(module, seed=4, names=("classifier",))  # the trained head: a module to save
    base_logits = logits(fresh)
    save_lora(module, tmp_path / "adapter")  # the LightningModule: its child `model` is what PEFT wraps
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert sorted(config["target_modules"]) == sorted(QV)
    assert config["modules_to_save"] == ["classifier"]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["base_model_name_or_path"] is None and config["task_type"] is None
    value1 = SELF_ATTN.format(1, "value").replace(".", r"\.")
    if mixed_ranks:
        assert config["rank_pattern"] == {value1: 2} and config["alpha_pattern"] == {value1: 5}
    else:
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    expected = {f"base_model.model.{n}.lora_{s}.weight" for n in QV for s in "AB"}
    assert keys == expected | {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}

    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert_same_logits(logits(module), logits(peft_model), base_logits)
    if mixed_ranks:
        assert peft_model.base_model.model.bert.encoder.layer[1].attention.self.value.r["default"] == 2


def test_export_with_explicit_base_model_and_task_type(tmp_path):
    module, fresh = injected(trainable=())  # the head stays frozen: SEQ_CLS saves it all the same
    base_logits = logits(fresh)
    save_lora(module, tmp_path / "a", base_model=module.model, task_type="SEQ_CLS", base_model_name_or_path="tiny-bert")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == "tiny-bert"
    assert config["modules_to_save"] == ["classifier"]  # PEFT adds it for SEQ_CLS and requires its tensors
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    assert type(peft_model).__name__ == "PeftModelForSequenceClassification"
    assert_same_logits(logits(module), logits(peft_model), base_logits)
    # The inner network passed directly gives the same files' names.
    save_lora(module.model, tmp_path / "b", modules_to_save=[])
    assert set(load_file(tmp_path / "b" / "adapter_model.safetensors")) == {
        f"base_model.model.{n}.lora_{s}.weight" for n in QV for s in "AB"
    }


# -- import: ours loads what PEFT writes -----------------------------------------------------------
@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_we_load_peft_adapters_exactly(tmp_path, task_type):
    base = make_bert()
    base_logits = logits(copy.deepcopy(base))
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        modules_to_save=None if task_type else ["classifier"],
        rank_pattern={"layer.1.attention.self.value": 2},
        task_type=task_type,
    )
    peft_model = peft.get_peft_model(base, config).eval()
    randomise(peft_model, seed=5)
    randomise(peft_model, seed=6, names=("modules_to_save.default",))
    peft_model.save_pretrained(tmp_path / "peft")
    expected = logits(peft_model)

    ours = Classifier(make_bert()).eval()
    inject_lora(ours, ["query", "layer.0.attention.self.value"], r=4, alpha=16, trainable=["classifier"])  # other alpha
    inject_lora(ours, ["layer.1.attention.self.value"], r=2, alpha=16, trainable=["classifier"])
    loaded = load_lora(ours, tmp_path / "peft")
    assert sorted(loaded) == sorted(f"model.{n}" for n in QV)
    assert_same_logits(logits(ours), expected, base_logits)


def test_our_export_round_trips_into_our_module(tmp_path):
    module, _ = injected(mixed_ranks=True)
    randomise(module, seed=7, names=("classifier",))
    save_lora(module, tmp_path / "adapter")
    other, _ = injected(seed=0, mixed_ranks=True)  # same base weights, other adapters, untouched head
    randomise(other, seed=8)
    load_lora(other, tmp_path / "adapter")
    torch.testing.assert_close(logits(other), logits(module), rtol=0, atol=0)
    for key, value in lora_delta(module).items():
        torch.testing.assert_close(lora_delta(other)[key], value, rtol=0, atol=0)


# -- errors ------------------------------------------------------------------------------------------
class TwoNetworks(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = make_bert(0)
        self.teacher = make_bert(1)


def test_save_lora_refuses_what_peft_cannot_load(tmp_path):
    two = TwoNetworks()
    inject_lora(two, ["query"], r=2)
    with pytest.raises(ConfigError, match=r"cannot tell which module of TwoNetworks.*'model', 'teacher'.*Pass `base_model=`"):
        save_lora(two, tmp_path / "x")
    with pytest.raises(ConfigError, match=r"'model.bert.encoder.layer.0.attention.self.query'.*lie outside `base_model` \('teacher'\)"):
        save_lora(two, tmp_path / "y", base_model=two.teacher)
    save_lora(two, tmp_path / "x", base_model=two)  # the LightningModule itself is what PEFT wraps
    keys = load_file(tmp_path / "x" / "adapter_model.safetensors")
    assert {k.split(".")[2] for k in keys} == {"model", "teacher"} and len(keys) == 8
    with pytest.raises(ConfigError, match=r"`base_model` \(Linear\) is not a submodule"):
        save_lora(two, tmp_path / "y", base_model=nn.Linear(2, 2))

    module, _ = injected()
    with pytest.raises(ConfigError, match=r"modules_to_save 'model.bert.encoder.layer.0.attention' contain or lie inside LoRA"):
        save_lora(module, tmp_path / "z", modules_to_save=["layer.0.attention"])
    with pytest.raises(NoMatchingModulesError, match=r"`modules_to_save` selects no module"):
        save_lora(module, tmp_path / "z", modules_to_save=["head"])
    with pytest.raises(ConfigError, match=r"`task_type` must be one of .* got 'SEQ_CLASS'. Did you mean 'SEQ_CLS'\?"):
        save_lora(module, tmp_path / "z", task_type="SEQ_CLASS")
    with pytest.raises(ConfigError, match=r"`task_type` belong to PEFT's directory form"):
        save_lora(module, tmp_path / "z.safetensors", task_type="SEQ_CLS")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"is a file; pass a directory"):
        save_lora(module, tmp_path / "file")
    assert not (tmp_path / "z").exists() and not (tmp_path / "y").exists()


def test_single_file_form_is_kept_and_takes_base_model(tmp_path):
    module, _ = injected()
    save_lora(module, tmp_path / "old.safetensors")
    assert all(k.startswith("base_model.model.model.bert.") for k in load_file(tmp_path / "old.safetensors"))
    save_lora(module, tmp_path / "inner.safetensors", base_model=module.model)
    assert all(k.startswith("base_model.model.bert.") for k in load_file(tmp_path / "inner.safetensors"))
    other, _ = injected()
    randomise(other, seed=9)
    assert len(load_lora(other, tmp_path / "inner.safetensors")) == 4
    torch.testing.assert_close(logits(other), logits(module), rtol=0, atol=0)


def test_load_lora_checks_modules_to_save_before_changing_anything(tmp_path):
    module, _ = injected()
    save_lora(module, tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    other, _ = injected(seed=0)
    randomise(other, seed=10)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    wrong = {**weights, "base_model.model.classifier.weight": torch.zeros(5, 32)}
    with pytest.raises(StateDictMismatchError, match=r"'classifier.weight' \(shape \(5, 32\) in the file, \(3, 32\) in the model\)"):
        load_lora(other, wrong, config=config)
    partial = {k: v for k, v in weights.items() if k != "base_model.model.classifier.bias"}
    with pytest.raises(StateDictMismatchError, match=r"'model.classifier' \(no 'bias' in the file\)"):
        load_lora(other, partial, config=config)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(lora_layers(other)) == 4


# -- other layer types: GPT-2's Conv1D and its embedding, a convolution ------------------------------------
def make_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=99, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def gpt2_logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 99, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gpt2_conv1d_and_embedding_adapters_cross_into_peft_and_back(tmp_path):
    base = make_gpt2()
    fresh = copy.deepcopy(base)
    inject_lora(base, ["c_attn", "c_proj", "c_fc", "wte"], r=4, alpha=8, layer_types=("Conv1D", "Embedding"))
    randomise(base, seed=11)
    save_lora(base, tmp_path / "gpt2", modules_to_save=[])
    config = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    keys = set(load_file(tmp_path / "gpt2" / "adapter_model.safetensors"))
    assert {"base_model.model.transformer.wte.lora_embedding_A", "base_model.model.transformer.wte.lora_embedding_B"} <= keys
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "gpt2").eval()
    torch.testing.assert_close(gpt2_logits(peft_model), gpt2_logits(base), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gpt2_logits(base), gpt2_logits(fresh), atol=1e-3)
    # ... and PEFT's own file of the same adapters loads back into a fresh model of ours.
    peft_model.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(fresh)
    inject_lora(ours, ["c_attn", "c_proj", "c_fc", "wte"], r=4, alpha=8, layer_types=("Conv1D", "Embedding"))
    assert len(load_lora(ours, tmp_path / "peft")) == len(lora_layers(base))
    torch.testing.assert_close(gpt2_logits(ours), gpt2_logits(base), rtol=0, atol=0)


def test_conv2d_adapters_cross_into_peft(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    fresh = copy.deepcopy(net)
    inject_lora(net, ["0", "2", "4"], r=2, alpha=4, layer_types=("Linear", "Conv2d"))
    randomise(net, seed=12)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    save_lora(net, tmp_path / "conv", modules_to_save=[])
    assert load_file(tmp_path / "conv" / "adapter_model.safetensors")["base_model.model.0.lora_A.weight"].shape == (2, 3, 3, 3)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "conv").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), net(x), rtol=1e-5, atol=1e-6)
    wrong = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 2))
    inject_lora(wrong, ["0", "2", "4"], r=2, alpha=4, layer_types=("Linear", "Conv2d"))
    with pytest.raises(StateDictMismatchError, match=r"'0' has lora_A \(2, 3, 3, 3\) .* the layer needs \(r, 3, 5, 5\)"):
        load_lora(wrong, tmp_path / "conv")
