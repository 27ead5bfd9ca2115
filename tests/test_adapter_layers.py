"""The adapter layers: the declared base, LoRA on every layer type against the real PEFT, the mixed-label batch.

Each PEFT comparison builds the same seeded base model twice, wraps one copy
with ``peft.get_peft_model`` and the other with ``inject_lora``, gives PEFT's
adapters non-zero B factors, copies PEFT's A and B into ours, and compares
outputs, ΔW and the merged weights. Everything runs on CPU in float32, in a
few seconds; timm and transformers models are built without downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cl_plugin.adapters import (
    AdapterLayer,
    LoRAConfig,
    LoRAConv1D,
    LoRAConv2d,
    LoRAEmbedding,
    LoRALinear,
    SharedSubspace,
    ShareConfig,
    forward_by_task,
    inject_lora,
    lora_delta,
    lora_layers,
    merge_lora,
    unload_lora,
    use_adapter,
    add_adapter,
)
from cl_plugin.errors import ConfigError, NoMatchingModulesError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

R, ALPHA = 2, 6.0  # scaling 3


# -- models --------------------------------------------------------------------------------------------
def linear_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=99, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, num_classes=5).eval()


CASES = {
    # name: (model factory, input, PEFT target_modules, our target_modules, our layer_types, output getter)
    "Linear": (linear_net, lambda: torch.randn(5, 6, generator=torch.Generator().manual_seed(1)), ["0", "2"], ["0", "2"], ("Linear",)),
    "Conv1D": (gpt2, lambda: torch.randint(0, 99, (3, 7), generator=torch.Generator().manual_seed(1)), ["c_attn", "c_proj", "c_fc"], ["c_attn", "c_proj", "c_fc"], ("Conv1D",)),
    "Embedding": (gpt2, lambda: torch.randint(0, 99, (3, 7), generator=torch.Generator().manual_seed(1)), ["wte"], ["wte"], ("Embedding",)),
    "Conv2d": (resnet, lambda: torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), ["conv1", "conv2", "downsample.0"], ["conv1", "conv2", "downsample.0"], ("Conv2d",)),
}
LAYER_CLASS = {"Linear": LoRALinear, "Conv1D": LoRAConv1D, "Embedding": LoRAEmbedding, "Conv2d": LoRAConv2d}


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def peft_factors(peft_model, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = peft_model.base_model.model.get_submodule(name)
    if "default" in layer.lora_embedding_A:
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def peft_and_ours(kind: str):
    """(PEFT model, our model, input): the same base, PEFT's factors (B made non-zero) copied into ours."""
    make, make_input, peft_targets, targets, layer_types = CASES[kind]
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=peft_targets, fan_in_fan_out=kind == "Conv1D")
    peft_model = peft.get_peft_model(make(), config).eval()
    ours = make()
    summary = inject_lora(ours, targets, r=R, alpha=ALPHA, layer_types=layer_types)
    assert summary.wrapped and all(isinstance(m, LAYER_CLASS[kind]) for m in lora_layers(ours).values())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            a, b = peft_factors(peft_model, name)
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            if kind == "Embedding":  # PEFT starts A at zero there
                a.copy_(torch.randn(a.shape, generator=g) * 0.1)
            layer.lora_A["default"].copy_(a)
            layer.lora_B["default"].copy_(b)
    return peft_model, ours, make_input()


@pytest.mark.parametrize("kind", list(CASES))
def test_outputs_delta_weights_and_merges_equal_peft(kind):
    peft_model, ours, x = peft_and_ours(kind)
    with torch.no_grad():
        expected, got = output(peft_model, x), output(ours, x)
        assert (got - expected).abs().max() < 1e-5, kind
        for name, layer in lora_layers(ours).items():
            delta = peft_model.base_model.model.get_submodule(name).get_delta_weight("default")
            assert layer.delta_weight().shape == layer.weight.shape
            torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-5, atol=1e-6)
        merged_peft = peft_model.merge_and_unload().state_dict()
        unload_lora(ours, merge=True)
        assert not lora_layers(ours)
        merged_ours = ours.state_dict()
    assert merged_ours.keys() == merged_peft.keys()
    for key, value in merged_ours.items():
        torch.testing.assert_close(value, merged_peft[key], rtol=1e-5, atol=1e-6)


def test_peft_initialisation_rules_hold_per_layer_type():
    net = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(2, 3, 3), nn.Embedding(5, 3))
    inject_lora(net, ["0", "1", "2"], r=2, layer_types=("Linear", "Conv2d", "Embedding"))
    for i in (0, 1):  # A Kaiming-uniform with bound 1/sqrt(fan_in), B zero
        fan_in = net[i].lora_A["default"][0].numel()
        assert 0 < net[i].lora_A["default"].abs().max() <= fan_in**-0.5
        assert torch.count_nonzero(net[i].lora_B["default"]) == 0
    assert torch.count_nonzero(net[2].lora_A["default"]) == 0  # Embedding: A zero, B normal
    assert torch.count_nonzero(net[2].lora_B["default"]) > 0
    assert net[1].lora_A["default"].shape == (2, 2, 3, 3) and net[1].lora_B["default"].shape == (3, 2, 1, 1)


# -- which layers are selected --------------------------------------------------------------------------
def test_default_layer_types_keep_a_vits_patch_embedding_out():
    def vit():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=3)

    plain = inject_lora(vit(), ["qkv", "proj", "fc1", "fc2"]).wrapped
    assert "patch_embed.proj" not in plain and len(plain) == 4
    with_convs = inject_lora(vit(), ["qkv", "proj", "fc1", "fc2"], layer_types=("Linear", "Conv2d")).wrapped
    assert with_convs == ("patch_embed.proj", *plain)


def test_unsupported_layers_are_refused_before_anything_changes():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, dilation=2), nn.Embedding(5, 3, max_norm=1.0))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ConfigError, match=r"LoRA on Conv2d '0' with groups=2 is not supported"):
        inject_lora(net, ["0", "1"], layer_types=("Conv2d",))
    with pytest.raises(ConfigError, match=r"dilation=\(2, 2\)"):
        inject_lora(net, ["1"], layer_types=("Conv2d",))
    with pytest.raises(ConfigError, match=r"max_norm=1.0"):
        inject_lora(net, ["2"], layer_types=("Embedding",))
    assert not lora_layers(net) and all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(NoMatchingModulesError, match=r"'0' \(Conv2d\)"):
        inject_lora(net, ["0"])  # a Conv2d needs layer_types=("Conv2d",)
    with pytest.raises(ConfigError, match=r"`layer_types` holds 'conv2d'.*Did you mean 'Conv2d'"):
        inject_lora(net, ["0"], layer_types=("conv2d",))


def test_config_is_the_one_place_of_validation_and_jsonargparse_fills_it():
    config = LoRAConfig(["qkv"], r=4, alpha=8, trainable=["head"], layer_types=["Linear", "Conv2d"])
    assert config.target_modules == ("qkv",) and config.trainable == ("head",) and config.layer_types == ("Linear", "Conv2d")
    assert config.replace(r=2).scaling == 4.0
    with pytest.raises(ConfigError, match=r"`r` must be an int >= 1, got 0"):
        config.replace(r=0)
    with pytest.raises(ConfigError, match=r"`target_modules` is required"):
        inject_lora(linear_net())
    with pytest.raises(ConfigError, match=r"inject_lora got `config` and \['r'\]"):
        inject_lora(linear_net(), config=LoRAConfig(["0"]), r=4)
    net = linear_net()
    assert inject_lora(net, config=LoRAConfig(["0"], r=3)).wrapped == ("0",) and net[0].r == 3
    with pytest.raises(ConfigError, match=r"`p`=9 must not exceed `k`=8"):
        ShareConfig(k=8, p=9)
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--lora", type=LoRAConfig)
    parser.add_argument("--share", type=ShareConfig)
    cfg = parser.parse_args(["--lora.target_modules=[qkv, proj]", "--lora.r=4", "--share.k=16", "--share.init=fresh"])
    built = getattr(parser, "instantiate", None)(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    assert built.lora == LoRAConfig(["qkv", "proj"], r=4) and built.share == ShareConfig(k=16, init="fresh")


# -- the base, from the declaration -----------------------------------------------------------------------
def test_every_layer_declares_its_per_adapter_tensors_and_loads_adapters_it_lacks():
    net = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(3, 2, 1), nn.Embedding(5, 4))
    inject_lora(net, ["0", "1", "2"], r=2, adapter_name="a", layer_types=("Linear", "Conv2d", "Embedding"))
    add_adapter(net, "b")
    for layer in lora_layers(net).values():
        assert isinstance(layer, AdapterLayer) and layer.adapter_layer_names == ("lora_A", "lora_B")
        assert layer.adapters == ("a", "b")
        assert set(layer.adapter_tensors("b")) == {"lora_A.b", "lora_B.b"}
    fresh = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(3, 2, 1), nn.Embedding(5, 4))
    inject_lora(fresh, ["0", "1", "2"], r=2, adapter_name="a", layer_types=("Linear", "Conv2d", "Embedding"))
    fresh.load_state_dict(net.state_dict())  # strict: adapter "b" is created on every layer type first
    for name, layer in lora_layers(fresh).items():
        for key, value in lora_layers(net)[name].adapter_tensors("b").items():
            assert torch.equal(layer.state_dict()[key], value)
    for layer in lora_layers(fresh).values():
        layer.delete_adapter("b")
    assert all(layer.adapters == ("a",) for layer in lora_layers(fresh).values())
    assert not any(k.endswith(".b") for k in fresh.state_dict())
    unload_lora(fresh)
    assert [type(m) for m in fresh] == [nn.Linear, nn.Conv2d, nn.Embedding]


def test_unload_gives_back_a_conv1d():
    model = gpt2()
    inject_lora(model, ["c_attn"])
    unload_lora(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_safe_merge_checks_before_writing():
    net = linear_net()
    inject_lora(net, ["0", "2"], r=2)
    with torch.no_grad():
        net[2].lora_B["default"].fill_(float("inf"))
    weights = {n: p.clone() for n, p in net.named_parameters()}
    with pytest.raises(Exception, match="NaN or infinite"):
        merge_lora(net)
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())
    assert all(layer.merged_adapter is None for layer in lora_layers(net).values())


# -- one mixed-label batch -----------------------------------------------------------------------------------
def per_label(model, x, labels):
    """The reference: one plain pass per label (base model for a label without an adapter)."""
    out = []
    for i, label in enumerate(labels):
        key = str(label) if str(label) in lora_layers(model)[next(iter(lora_layers(model)))].adapters else None
        with use_adapter(model, key), torch.no_grad():
            out.append(output(model, x[i : i + 1]))
    return torch.cat(out)


@pytest.mark.parametrize("kind", list(CASES))
def test_a_mixed_label_batch_is_one_pass_that_equals_per_label_passes(kind):
    make, make_input, _, targets, layer_types = CASES[kind]
    model = make()
    inject_lora(model, targets, r=R, alpha=ALPHA, adapter_name="0", layer_types=layer_types)
    add_adapter(model, 1, seed=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for key in ("0", "1"):
                for store in ("lora_A", "lora_B"):
                    t = getattr(layer, store)[key]
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    x = make_input()
    labels = ([1, 0, 7] * 2)[: x.shape[0]]  # label 7 has no adapter: the base model
    calls = []
    hook = next(iter(lora_layers(model).values())).register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        got = output_by_task(model, x, labels)
    hook.remove()
    assert len(calls) == 1, "one pass for the whole batch"
    expected = per_label(model, x, labels)
    assert (got - expected).abs().max() < 1e-5


def output_by_task(model, x, labels):
    if isinstance(model, transformers.PreTrainedModel):
        from cl_plugin.adapters.layer import forward_routed, labels_to_keys

        known = set(next(iter(lora_layers(model).values())).adapters)
        keys = [k if k in known else None for k in labels_to_keys(labels, x.shape[0])]
        return forward_routed(model, x, keys, call=lambda t: model(t).logits)
    return forward_by_task(model, x, labels)


def test_mixed_batch_through_share_layers_and_the_unknown_label_contract():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    share = SharedSubspace(k=4, p=2, init="fresh")
    share.inject(net, ["0", "2"])
    g = torch.Generator().manual_seed(0)
    for task in ("a", "b"):
        share.start_task(task)
        with torch.no_grad():
            for p in share.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        share.finish_task()
    x = torch.randn(4, 6, generator=g)
    with torch.no_grad():
        got = forward_by_task(net, x, ["b", "a", "zzz", "b"])
        reference = []
        for i, key in enumerate(["b", "a", None, "b"]):
            with use_adapter(net, key):
                reference.append(net(x[i : i + 1]))
    assert (got - torch.cat(reference)).abs().max() < 1e-5
    assert net[0].active_adapter == "b"  # the selection is back


def test_mixed_batch_refuses_what_it_cannot_do():
    class Reshaping(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):  # (B, 2, 4) -> (2B, 4): the layer sees another first dimension
            return self.fc(x.reshape(-1, 4)).reshape(x.shape[0], -1)

    model = Reshaping()
    inject_lora(model, ["fc"], adapter_name="0")
    add_adapter(model, "1")
    with pytest.raises(ConfigError, match=r"sees a first dimension of 6, not the batch of 3"):
        forward_by_task(model, torch.randn(3, 2, 4), [0, 1, 0])
    assert forward_by_task(model, torch.randn(3, 2, 4), 1).shape == (3, 8)  # one label: a plain pass
    net = linear_net()
    inject_lora(net, ["0"], adapter_name="0")
    add_adapter(net, "1")
    merge_lora(net)
    with pytest.raises(ConfigError, match=r"unmerge_lora\(model\) before a batch with several task labels"):
        forward_by_task(net, torch.randn(2, 6), [0, 1])
    with pytest.raises(ConfigError, match=r"Got 1 task labels for a batch of 2"):
        forward_by_task(net, torch.randn(2, 6), [0])


def test_the_mixed_batch_is_differentiable():
    net = linear_net()
    inject_lora(net, ["0", "2"], adapter_name="0")
    add_adapter(net, "1")
    for layer in lora_layers(net).values():
        layer.set_trainable(None)
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    with torch.no_grad():
        for layer in lora_layers(net).values():
            layer.lora_B["1"].normal_()
    x = torch.randn(4, 6, requires_grad=True)
    forward_by_task(net, x, [0, 1, 1, 0]).sum().backward()
    assert x.grad is not None and net[0].lora_A["1"].grad is not None and net[0].lora_A["0"].grad is not None
    assert lora_delta(net, "1")["0.weight"].shape == (8, 6)
