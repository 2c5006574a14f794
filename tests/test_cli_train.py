"""`train` on the command line: values, refusals that leave every saved file as it was, concept flags,
Ctrl-C, and the permissions of what a run writes."""
from __future__ import annotations

import hashlib
import os
import signal
import stat
from pathlib import Path

import pytest
from helpers_data import solid
from helpers_train import instance_pictures, private_models

from lora_trainer.cli import build_parser, main
from lora_trainer.cli import train as train_command
from lora_trainer.cli._concepts import concepts_from_args
from lora_trainer.config import CONCEPTS_FILE, PARAMS_FILE, Concept, ModelInfo, TrainingParams, save_concepts

FAST = ["--resolution", "32", "--no-hflip", "--seed", "0", "--device", "cpu"]


def saved_files(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under `root`: its mode and a hash of its bytes."""
    return {str(p.relative_to(root)): (p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def saved_model(created_sd1, tmp_path):
    """A private copy of the tiny model with its Parameters and Concepts saved, as after a first run."""
    models = private_models(created_sd1, tmp_path / "models")
    folder = models.model_dir("tiny")
    TrainingParams(resolution=32, max_train_steps=1, seed=0).save(folder / PARAMS_FILE)
    save_concepts([Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing",
                           class_prompt="a thing", num_class_images=0)], folder / CONCEPTS_FILE)
    return models


def test_a_negative_value_is_a_value_and_gets_the_range_error(saved_model, capsys):
    args = build_parser().parse_args(["train", "--model", "tiny", "--unet_learning_rate", "-1e-4",
                                      "--text_encoder_learning_rate", "-.5"])
    assert (args.unet_learning_rate, args.text_encoder_learning_rate) == (-1e-4, -0.5)

    before = saved_files(saved_model.working.parent)
    assert main(["train", "--models-dir", str(saved_model.working.parent), "--model", "tiny",
                 "--unet_learning_rate", "-1e-4", *FAST]) == 2
    error = one_error_line(capsys)
    assert "Lora UNET Learning Rate ('unet_learning_rate') must be at least 0" in error and "-0.0001" in error
    assert saved_files(saved_model.working.parent) == before


@pytest.mark.parametrize("flags, names", [
    (["--unet_learning_rate", "0", "--text_encoder_learning_rate", "0"],
     ["'unet_learning_rate'", "'text_encoder_learning_rate'"]),
    (["--unet_learning_rate", "0", "--no-train_text_encoder", "--text_encoder_learning_rate", "1e-4"],
     ["'unet_learning_rate'"]),
    (["--no-use_lora", "--learning_rate", "0"], ["'learning_rate'"]),
])
def test_a_run_that_can_change_nothing_is_refused_before_anything_is_written(saved_model, capsys, flags, names):
    before = saved_files(saved_model.working.parent)
    assert main(["train", "--models-dir", str(saved_model.working.parent), "--model", "tiny", *flags, *FAST]) == 2
    error = one_error_line(capsys)
    assert all(name in error for name in names) and "would change nothing" in error, error
    assert saved_files(saved_model.working.parent) == before


def test_one_trained_part_with_a_learning_rate_is_enough():
    from lora_trainer.train import check_trains_something

    check_trains_something(TrainingParams(unet_learning_rate=0.0, text_encoder_learning_rate=1e-4))
    check_trains_something(TrainingParams(unet_learning_rate=1e-4, text_encoder_learning_rate=0.0))


def broken_pictures(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"not a picture")
    (folder / "b.jpg").write_bytes(b"\xff\xd8 cut short")
    return folder


@pytest.mark.parametrize("case", ["unreadable pictures", "blank prompt, no captions", "blank class prompt"])
def test_a_refused_train_changes_no_saved_file(saved_model, tmp_path, capsys, case):
    models = saved_model.working.parent
    if case == "unreadable pictures":
        flags, names = ["--instance_data_dir", str(broken_pictures(tmp_path / "broken"))], ["can be read"]
    elif case == "blank prompt, no captions":
        solid(tmp_path / "uncaptioned" / "a.png")
        flags = ["--instance_data_dir", str(tmp_path / "uncaptioned"), "--instance_prompt", ""]
        names = ["Instance Prompt ('instance_prompt') is blank"]
    else:
        solid(tmp_path / "uncaptioned" / "a.png")  # a blank class prompt takes the captions: there are none
        flags = ["--instance_data_dir", str(tmp_path / "uncaptioned"), "--class_prompt", "", "--num_class_images", "2"]
        names = ["Class Prompt ('class_prompt') is blank"]
    before = saved_files(models)
    assert main(["train", "--models-dir", str(models), "--model", "tiny", "--max_train_steps", "3", *flags, *FAST]) == 2
    error = one_error_line(capsys)
    assert all(name in error for name in names), error
    assert saved_files(models) == before  # params.json and concepts_list.json as they were, no class pictures


def test_one_concept_flag_changes_that_field_of_the_saved_concept_only(tmp_path):
    first = Concept(instance_data_dir="/old", instance_prompt="scs thing", class_prompt="a thing",
                    class_data_dir="/classes", num_class_images=7, class_guidance_scale=5.5)
    second = Concept(instance_data_dir="/other", instance_prompt="xyz dog", num_class_images=3)
    save_concepts([first, second], tmp_path / CONCEPTS_FILE)

    args = build_parser().parse_args(["train", "--model", "tiny", "--instance_data_dir", "/new"])
    got = concepts_from_args(args, tmp_path)
    assert got == [Concept(**{**first.to_dict(), "instance_data_dir": "/new"}), second]

    args = build_parser().parse_args(["classimages", "--model", "tiny", "--num_class_images", "0"])
    assert concepts_from_args(args, tmp_path)[0] == Concept(**{**first.to_dict(), "num_class_images": 0})

    # Nothing saved: the flags are the whole concept.
    args = build_parser().parse_args(["train", "--model", "tiny", "--instance_data_dir", "/new"])
    assert concepts_from_args(args, tmp_path / "empty") == [Concept(instance_data_dir="/new")]


def test_prior_preservation_flag_keeps_a_saved_class_count(tmp_path):
    save_concepts([Concept(instance_data_dir="/old", num_class_images=7)], tmp_path / CONCEPTS_FILE)
    args = build_parser().parse_args(["train", "--model", "tiny", "--with_prior_preservation"])
    assert concepts_from_args(args, tmp_path)[0].num_class_images == 7


@pytest.mark.parametrize("presses", [1, 2])
def test_one_and_two_ctrl_c_both_save_and_exit_130(saved_model, capsys, monkeypatch, presses):
    """Ctrl-C is a real SIGINT to this process, sent from inside the step loop (as a terminal would)."""
    real_train = train_command.train

    def train_pressing_ctrl_c(*args, **kwargs):
        def report(progress):
            if progress.job == "train" and progress.step == 1 and progress.loss is not None:
                for _ in range(presses):
                    os.kill(os.getpid(), signal.SIGINT)
        return real_train(*args, **kwargs, report=report)

    monkeypatch.setattr(train_command, "train", train_pressing_ctrl_c)
    # What this process had (a shell starts a background job with SIGINT ignored, not the default handler).
    before = signal.getsignal(signal.SIGINT)
    code = main(["train", "--models-dir", str(saved_model.working.parent), "--model", "tiny",
                 "--max_train_steps", "50", *FAST])
    out, err = capsys.readouterr()
    assert code == 130, err
    info = ModelInfo.load(saved_model.model_dir("tiny") / "model_info.json")
    assert info.lifetime_steps == 1 and (saved_model.lora / info.latest_lora).is_file()
    assert out.strip().splitlines()[-1] == str(saved_model.lora / info.latest_lora)
    assert "Training cancelled" in err and "Traceback" not in err
    assert ("Still cancelling" in err) == (presses == 2)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_every_file_a_run_and_a_merge_write_has_the_same_permissions(saved_model, capsys):
    root = saved_model.working.parent
    before = saved_files(root)
    old = os.umask(0o022)
    try:
        assert main(["train", "--models-dir", str(root), "--model", "tiny", "--max_train_steps", "1", *FAST]) == 0
        assert main(["merge", "--models-dir", str(root), "--model", "tiny"]) == 0
    finally:
        os.umask(old)
    after = saved_files(root)
    written = {name: stat.S_IMODE(mode) for name, (mode, digest) in after.items() if before.get(name) != (mode, digest)}
    names = {Path(name).name for name in written}
    assert {"optimizer.safetensors", "lora.safetensors", "state.json", "model_info.json", "params.json",
            "tiny_1.safetensors", "tiny_1_lora.safetensors"} <= names, names
    assert set(written.values()) == {0o644}, written  # 0666 less the umask, as any program's files
