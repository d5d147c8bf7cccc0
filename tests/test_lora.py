"""LoRA adapters (PEFT) on MoMos bases: Llama and GPT-2 (Conv1D) checkpoints loaded with `from_pretrained`, a
`MoMosModel` from `get_momos_model`; training, saving the adapter alone, reloading it, gradient checkpointing,
`Trainer`, and both merges."""

import pytest
import torch
from conftest import build, model_inputs
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.integrations.lora import MoMosLoraLinear, get_lora_model, load_lora, merge_lora
from momos_hf.layer import MoMosLayer, momos_layers


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    get_momos_model(build(request.param), MoMosConfig(k=16, s=4, scale=True)).save_pretrained(folder)
    return request.param, folder


def base_tensors(model):
    return {
        f"{name.replace('.base_layer', '')}.{key}": value.detach().clone()
        for name, layer in momos_layers(model).items()
        for key, value in (("motifs", layer.motifs), ("mosaic", layer.mosaic), ("scale", layer.scale))
    }


def train(model, inputs, steps=30, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_trains_saves_alone_and_reloads_onto_a_fresh_base(checkpoint, tmp_path):
    arch, folder = checkpoint
    base = AutoModelForCausalLM.from_pretrained(folder)
    before = base_tensors(base)
    model = get_lora_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    adapted = [m for m in model.modules() if isinstance(m, MoMosLoraLinear)]
    assert len(adapted) == len(momos_layers(base)) > 0  # "all-linear" reaches every MoMos matrix layer
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    inputs = model_inputs(arch, batch=4, length=16)
    losses = train(model, inputs)
    assert losses[-1] < losses[0] - 0.3  # from ln(96) = 4.56, the untrained tiny model
    after = base_tensors(base)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bit-identical

    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)  # nothing of the base
    reloaded = load_lora(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_lora_on_a_momos_model_with_gradient_checkpointing():
    torch.manual_seed(0)
    mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4))
    inputs = model_inputs("llama", batch=2, length=16)
    losses = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = get_lora_model(mm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        losses.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        model.unload()
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    for plain, checkpointed in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(plain, checkpointed)


def test_trainer_accepts_a_momos_base_with_adapters(checkpoint, tmp_path):
    arch, folder = checkpoint
    model = get_lora_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=4, target_modules="all-linear"))
    ids = model_inputs(arch, batch=8, length=16)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        tmp_path,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3


def test_merge_to_dense_is_exact_and_into_motifs_reports_its_error(checkpoint):
    arch, folder = checkpoint
    inputs = model_inputs(arch, batch=4, length=16)
    merged_logits = {}
    for into in ("dense", "motifs"):
        torch.manual_seed(0)
        model = get_lora_model(
            AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=4, target_modules="all-linear")
        )
        train(model, inputs, steps=5)
        model.eval()
        with torch.no_grad():
            adapted = model(**inputs).logits
        merged, errors = merge_lora(model, into=into)
        assert not any(isinstance(m, MoMosLoraLinear) for m in merged.modules())
        with torch.no_grad():
            merged_logits[into] = merged(**inputs).logits
        if into == "dense":
            assert not momos_layers(merged) and set(errors.values()) == {0.0}
            torch.testing.assert_close(merged_logits[into], adapted, rtol=1e-4, atol=1e-4)
        else:
            assert all(isinstance(m, MoMosLayer) for m in momos_layers(merged).values())
            assert errors and all(0 < e < 1 for e in errors.values())
    with pytest.raises(ValueError, match="into must be 'dense' or 'motifs'"):
        merge_lora(model, into="int4")


def test_unsupported_requests_fail_with_one_line(checkpoint):
    arch, folder = checkpoint
    with pytest.raises(ValueError, match="DoRA is not supported on MoMos layers"):
        get_lora_model(
            AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=4, target_modules="all-linear", use_dora=True)
        )
    with pytest.raises(ValueError, match="the model has no MoMos layers"):
        get_lora_model(build(arch), LoraConfig(r=4, target_modules="all-linear"))


def test_misplaced_and_damaged_adapters_are_refused_naming_the_problem(checkpoint, tmp_path):
    import shutil

    from safetensors.torch import save_file

    arch, folder = checkpoint
    model = get_lora_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="holds a MoMos checkpoint: save the adapter into a folder of its own"):
        model.save_pretrained(folder)
    assert not (folder / "adapter_config.json").exists() and not (folder / "adapter_model.safetensors").exists()
    good = tmp_path / "good"
    model.save_pretrained(good)
    with pytest.raises(ValueError, match="the model has no MoMos layers: load_lora puts adapters on a MoMos base"):
        load_lora(build(arch), good)
    with pytest.raises(ValueError, match="holds a MoMos checkpoint, not an adapter"):
        load_lora(AutoModelForCausalLM.from_pretrained(folder), folder)
    tensors = load_file(good / "adapter_model.safetensors")
    first_a = next(k for k in tensors if ".lora_A." in k)
    first_b = first_a.replace("lora_A", "lora_B")

    def edited(name, **changes):
        copy = tmp_path / name
        shutil.copytree(good, copy)
        weights = copy / "adapter_model.safetensors"
        if "tensors" in changes:
            save_file({k: v.contiguous() for k, v in changes["tensors"].items()}, weights)
        if "weight_bytes" in changes:
            weights.write_bytes(changes["weight_bytes"])
        if "config_text" in changes:
            (copy / "adapter_config.json").write_text(changes["config_text"])
        return copy

    nan = dict(tensors, **{first_a: torch.full_like(tensors[first_a], float("nan"))})
    cases = {
        "no_b": (edited("no_b", tensors={k: v for k, v in tensors.items() if k != first_b}), "has no lora_B weight"),
        "int64": (edited("int64", tensors=dict(tensors, **{first_a: tensors[first_a].long()})), "torch.int64"),
        "nan": (edited("nan", tensors=nan), "non-finite"),
        "shape": (edited("shape", tensors=dict(tensors, **{first_a: tensors[first_a][:, :-1]})), "has lora_A"),
        "cut": (edited("cut", weight_bytes=(good / "adapter_model.safetensors").read_bytes()[:-10]), "read whole"),
        "json": (edited("json", config_text="{not json"), "adapter_config.json is not a readable adapter config"),
    }
    for name, (adapter, message) in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            load_lora(AutoModelForCausalLM.from_pretrained(folder), adapter)
        assert name in str(info.value) and "\n" not in str(info.value)  # names the file, on one line
