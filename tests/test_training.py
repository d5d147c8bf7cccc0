import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build, model_inputs
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from momos_hf import MoMosConfig, MoMosLinear, MoMosModel, get_momos_model
from momos_hf.train import schedule
from momos_hf.train.distill import TeacherTargets, finetune_to_teacher, teacher_targets
from momos_hf.train.schedule import (
    LATENT_FILE,
    MoMosCallback,
    ProjectionSchedule,
    _restore_latents,
    _save_latents,
    distillation_loss,
    hidden_state_loss,
    momos_state_digest,
)


def test_projected_mode_starts_dense_and_snaps_onto_the_mosaic():
    model = build("llama")
    inputs = model_inputs("llama")
    with torch.no_grad():
        dense = model(**inputs).logits
    mm = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=2, train_mode="projected"))
    layer = mm.base_model.model.layers[0].mlp.down_proj
    assert layer.latent.requires_grad and not layer.motifs.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(mm(**inputs).logits, dense)  # the latent weights are the dense ones
    mm.project()
    assert torch.equal(layer.latent, layer.mosaic_weight())
    assert len(torch.unique(layer.latent.reshape(-1, 4), dim=0)) <= 16


def test_ste_mode_uses_the_mosaic_and_trains_the_latent():
    mm = get_momos_model(build("gpt2"), MoMosConfig(k=16, s=4, kmeans_iters=2, train_mode="ste"))
    layer = mm.base_model.transformer.h[0].mlp.c_fc
    torch.testing.assert_close(layer.matrix(layer.motifs.dtype), layer.mosaic_weight())
    ids = model_inputs("gpt2")["input_ids"]
    mm(input_ids=ids, labels=ids).loss.backward()
    assert layer.latent.grad is not None and layer.latent.grad.abs().sum() > 0
    assert layer.motifs.grad is None
    before = momos_state_digest(mm)
    with torch.no_grad():
        layer.latent.add_(0.5 * torch.randn_like(layer.latent))
    mm.project()
    assert momos_state_digest(mm) != before


def test_checkpoints_never_hold_latent_weights(tmp_path):
    mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4, kmeans_iters=1, train_mode="ste"))
    mm.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.endswith(".latent")]


@pytest.mark.parametrize(
    "every, step, epoch_end, due",
    [(0, 5, False, False), (0, 5, True, True), (2, 4, False, True), (2, 3, False, False), (2, 4, True, False)],
)
def test_projection_schedule(every, step, epoch_end, due, monkeypatch):
    mm = get_momos_model(
        build("llama"), MoMosConfig(k=16, s=4, kmeans_iters=1, train_mode="projected", project_every=every)
    )
    steps = []
    monkeypatch.setattr(MoMosModel, "project", lambda self: steps.append(step))
    schedule = ProjectionSchedule(mm)
    assert (schedule.epoch_end(step) if epoch_end else schedule.step_end(step)) is due
    assert schedule.train_end(step) is not due  # the end projects unless that step just did
    assert len(steps) == 1


def test_motifs_mode_never_projects():
    mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4, kmeans_iters=1, project_every=1))
    schedule = ProjectionSchedule(mm)
    assert not (schedule.step_end(1) or schedule.epoch_end(1) or schedule.train_end(1))


def test_distillation_loss():
    logits = torch.randn(2, 5, 11)
    assert distillation_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, torch.randn(2, 5, 11), temperature=2.0) > 0.01
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    other = logits.clone()
    other[:, 2:] += 10 * torch.randn(2, 3, 11)
    assert distillation_loss(logits, other, mask=mask).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0), ValueError, "temperature"),
        (lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=math.nan), ValueError, "nan"),
        (lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=-1.0), ValueError, "positive"),
        (lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature="2"), ValueError, "positive"),
        (lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(1, 3)), ValueError, r"\(2, 3\) and \(1, 3\)"),
        (lambda: hidden_state_loss((), ()), ValueError, "same, non-empty, shapes"),
        (lambda: hidden_state_loss((torch.zeros(2),) * 2, (torch.zeros(2),)), ValueError, "same, non-empty"),
        (lambda: hidden_state_loss((torch.zeros(2, 4),), (torch.zeros(1, 4),)), ValueError, r"\(2, 4\)"),
    ],
)
def test_distillation_losses_refuse_bad_temperature_and_mismatched_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(steps=2.5), TypeError, "steps must be a whole number of steps, got 2.5"),
        (dict(steps=True), TypeError, "steps must be a whole number"),
        (dict(steps=0), ValueError, "at least one step"),
        (dict(steps=2, lr="1e-3"), TypeError, "learning rate must be a number"),
        (dict(steps=2, lr=math.nan), ValueError, "learning rate must be a positive number, got nan"),
        (dict(steps=2, lr=-1e-3), ValueError, "learning rate must be a positive number"),
        (dict(steps=2), ValueError, "0 windows"),
    ],
)
def test_finetune_to_teacher_refuses_bad_steps_learning_rates_and_empty_data(kwargs, error, message):
    with pytest.raises(error, match=message):
        finetune_to_teacher(torch.nn.Linear(2, 2), TeacherTargets([], [], []), **kwargs)


def test_teacher_targets_refuses_a_top_below_one_token():
    with pytest.raises(ValueError, match="top must be >= 1 token, got 0"):
        teacher_targets(torch.nn.Linear(2, 2), [], top=0)
    with pytest.raises(TypeError, match="top must be a whole number of tokens"):
        teacher_targets(torch.nn.Linear(2, 2), [], top=8.0)


def test_trainer_callback_projects_on_schedule(tmp_path, monkeypatch):
    mm = get_momos_model(
        build("llama"), MoMosConfig(k=16, s=4, kmeans_iters=1, train_mode="projected", project_every=2)
    )
    ids = model_inputs("llama", batch=8)["input_ids"]
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    projections = []
    original = MoMosModel.project
    monkeypatch.setattr(MoMosModel, "project", lambda self: projections.append(1) or original(self))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    Trainer(model=mm.base_model, args=args, train_dataset=dataset, callbacks=[MoMosCallback()]).train()
    assert len(projections) == 2  # steps 2 and 4; the end of training needs none after step 4's
    layer = mm.base_model.model.layers[1].self_attn.o_proj
    assert torch.equal(layer.latent, layer.mosaic_weight())


def test_trainer_checkpoints_and_save_model_are_compact_momos_checkpoints(tmp_path):
    mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4, kmeans_iters=1, train_mode="ste", project_every=2))
    dataset = [{"input_ids": row, "labels": row} for row in model_inputs("llama", batch=8)["input_ids"]]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(model=mm.base_model, args=args, train_dataset=dataset, callbacks=[MoMosCallback()])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    inputs = model_inputs("llama")
    with torch.no_grad():
        reference = mm(**inputs).logits
    for folder in (tmp_path / "run" / "checkpoint-4", tmp_path / "final"):
        with safe_open(folder / "model.safetensors", "pt") as f:
            assert not [key for key in f.keys() if key.endswith(".latent")]
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        assert isinstance(loaded.model.layers[0].mlp.up_proj, MoMosLinear)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, reference, rtol=0, atol=1e-5)
    assert (tmp_path / "run" / "checkpoint-2" / LATENT_FILE).is_file()  # the latent weights, beside the checkpoint


def trainer_run(output_dir, train_mode, project_every, resume=None):
    """Four steps of Trainer, two per epoch, a checkpoint every two."""
    mm = get_momos_model(
        build("llama"), MoMosConfig(k=16, s=4, kmeans_iters=1, train_mode=train_mode, project_every=project_every)
    )
    dataset = [{"input_ids": row, "labels": row} for row in model_inputs("llama", batch=8)["input_ids"]]
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    Trainer(model=mm.base_model, args=args, train_dataset=dataset, callbacks=[MoMosCallback()]).train(
        resume_from_checkpoint=resume
    )
    return mm


@pytest.mark.slow
@pytest.mark.parametrize("train_mode, project_every", [("motifs", 2), ("projected", 3), ("ste", 2), ("ste", 0)])
def test_trainer_resume_ends_as_the_uninterrupted_run(tmp_path, train_mode, project_every):
    # checkpoint-2 is taken at a projection (every 2), between two (every 3: the latent weights hold the
    # training since), or at the end of epoch 1 before its end-of-epoch projection (0).
    straight = trainer_run(tmp_path / "straight", train_mode, project_every)
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")  # stopped there
    resumed = trainer_run(tmp_path / "resumed", train_mode, project_every, resume=True)
    expected, got = straight.base_model.state_dict(), resumed.base_model.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)
    for a, b in zip(straight.momos_layers().values(), resumed.momos_layers().values()):
        assert torch.equal(a.mosaic_weight(), b.mosaic_weight())
        assert (a.latent is None) == (train_mode == "motifs") and (a.latent is None or torch.equal(a.latent, b.latent))


def test_latent_weights_are_restored_only_from_their_own_whole_checkpoint(tmp_path, monkeypatch):
    mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4, kmeans_iters=1, train_mode="ste"))
    layer = mm.base_model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.latent.add_(0.01 * torch.randn_like(layer.latent))
    saved = layer.latent.detach().clone()
    _save_latents(mm.base_model, tmp_path, 6, 4, write=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATENT_FILE]  # written through a rename
    with torch.no_grad():
        layer.latent.zero_()
    assert _restore_latents(mm.base_model, tmp_path, 6) == 4 and torch.equal(layer.latent, saved)

    path, original = tmp_path / LATENT_FILE, (tmp_path / LATENT_FILE).read_bytes()
    flipped = bytearray(original)
    flipped[-3] ^= 0xFF
    for content, message in [
        (bytes(flipped), "is corrupted: its latent weights do not match their checksum"),
        (original[:-100], "truncated"),
    ]:
        path.write_bytes(content)
        with torch.no_grad():
            layer.latent.zero_()
        with pytest.raises(ValueError, match=message):
            _restore_latents(mm.base_model, tmp_path, 6)
        assert not layer.latent.any()  # nothing was loaded

    # Latent weights of another checkpoint (step, MoMos state) or none: they restart from the mosaic, with a warning.
    warnings = []
    monkeypatch.setattr(schedule.logger, "warning", warnings.append)
    path.write_bytes(original)
    assert _restore_latents(mm.base_model, tmp_path, 8) is None
    with torch.no_grad():
        layer.latent.zero_()
        layer.motifs.add_(1.0)
    assert _restore_latents(mm.base_model, tmp_path, 6) is None
    path.unlink()
    assert _restore_latents(mm.base_model, tmp_path, 6) is None
    assert len(warnings) == 3 and all("restart from the saved mosaic" in w for w in warnings)
    assert torch.equal(layer.latent, layer.mosaic_weight()) and "restart from the saved mosaic" in warnings[0]


def test_trainer_given_the_wrapper_is_refused(tmp_path):
    mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4, kmeans_iters=1))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="give Trainer the converted model, mm.base_model"):
        Trainer(model=mm, args=args, train_dataset=[], callbacks=[MoMosCallback()])


@pytest.mark.slow
def test_trainer_push_to_hub_is_refused_before_anything_is_uploaded(tmp_path):
    # Trainer creates the repository before any callback runs (Transformers' own step); the callback stops
    # it there, before the model or training_args.bin (which holds the token) could be uploaded.
    from hub_server import HubServer

    code = f"""
        import pytest
        from conftest import build
        from transformers import Trainer, TrainingArguments
        from momos_hf import MoMosConfig, get_momos_model
        from momos_hf.train.schedule import MoMosCallback

        mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4, kmeans_iters=1))
        args = TrainingArguments(output_dir=r"{tmp_path}", max_steps=1, report_to=[], use_cpu=True, push_to_hub=True,
                                 hub_model_id="me/x", hub_token="hf_secret")
        with pytest.raises(ValueError, match="Trainer's push_to_hub uploads its whole output folder"):
            Trainer(model=mm.base_model, args=args, train_dataset=[], callbacks=[MoMosCallback()])
        print("refused")
    """
    with HubServer() as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_OFFLINE": "0",
            "PYTHONPATH": os.path.dirname(__file__),
        }
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0 and "refused" in done.stdout, done.stderr[-3000:]
        assert not any(hub.state.repos.values())  # nothing was uploaded
