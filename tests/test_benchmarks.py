"""The benchmarks run and print their figures (not timed tests: only that they produce them, computed): the
training step (CPU tiny), the SD 2.x-v and SDXL rows (tiny models), class images/s, create against a copy, and
the GPU suite's plan with its GPU parts skipped."""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers_rounding import rate_fits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_speed  # noqa: E402

FIGURES = re.compile(r"^(floor|recipe|ours) tiny +\d+\.\d+ s/step +\d+\.\d+ samples/s peak +\d+\.\d+ GiB +\d+\.\d+x floor time")


def test_the_training_benchmark_measures_floor_recipe_and_ours_at_tiny_size(capsys):
    lines = train_speed.main(["--sizes", "tiny", "--steps", "1", "--warmup", "1", "--in-process"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("# ") and "torch " + torch.__version__ in printed[0] and "peft " in printed[0]
    rows = [line for line in lines if FIGURES.match(line)]
    assert [row.split()[0] for row in rows] == ["floor", "recipe", "ours"], lines
    assert "rank 4" in rows[2] and "64 px" in rows[2]
    assert any(re.match(r"^ours tiny: \d+\.\d+x the recipe's step time, \d+\.\d+x its peak memory$", line) for line in lines)


def test_the_gpu_mode_says_it_is_skipped_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_speed.main(["--mode", "gpu"]) == []
    assert "no CUDA GPU here; skipped" in capsys.readouterr().out


def test_the_gpu_suite_fits_its_8_minutes_and_skips_its_gpu_parts_without_a_gpu(capsys, monkeypatch):
    import gpu_suite

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_suite.main([]) == {}
    printed = capsys.readouterr().out
    for part in gpu_suite.DEFAULT_PARTS:
        assert f"{part}: no CUDA GPU here; skipped" in printed
    assert "files" not in gpu_suite.DEFAULT_PARTS and "files" not in printed  # CPU work: only when asked for
    assert "fp8loss" not in gpu_suite.DEFAULT_PARTS and "fp8loss" in gpu_suite.PARTS  # 4 minutes: when time is left
    # The whole command, estimated pessimistically from its step counts, stays under the 8 minutes.
    minutes = float(re.search(r"estimated at most (\d+\.\d) min", printed).group(1))
    assert minutes == round(gpu_suite.estimate_seconds(list(gpu_suite.DEFAULT_PARTS), 5, 2, 3, 1) / 60, 1) and minutes < 8
    more = gpu_suite.estimate_seconds(["train"], 50, 2, 3, 1) - gpu_suite.estimate_seconds(["train"], 5, 2, 3, 1)
    assert more == pytest.approx(gpu_suite.TRAIN_ROWS * 45 * gpu_suite.SD15_STEP_S)  # it follows the step counts
    # It counts the rows the parts run: the table and the fast path are all of the GPU rows between them.
    table, fast = train_speed.gpu_rows("table"), train_speed.gpu_rows("fast-path")
    assert (gpu_suite.TRAIN_ROWS, gpu_suite.FASTPATH_ROWS) == (len(table), len(fast))
    assert {r.name for r in table} | {r.name for r in fast} == {r.name for r in train_speed.gpu_rows()}
    assert [r.name for r in fast] == ["recipe r4, checkpointing", "ours r4, checkpointing",
                                      "ours r4, checkpointing, fast path"]
    assert not any(r.options.get("compile_unet") for r in table)


@pytest.mark.one_env
def test_the_sd2v_and_sdxl_rows_run_on_the_tiny_models(capsys):
    import family_speed

    lines = family_speed.main(["--tiny", "--steps", "1", "--warmup", "0"])
    rows = [line for line in lines if re.match(r"^(floor|ours) (sd2v|sdxl) tiny(, .+ preset)? +\d+\.\d+ s/step", line)]
    assert [" ".join(row.split()[:2]) for row in rows] == ["floor sd2v", "ours sd2v", "floor sdxl", "ours sdxl",
                                                           "ours sdxl"], lines
    assert "rank 4" in rows[1] and "64 px" in rows[3]
    # SDXL's preset as it applies on a CPU: rank 16, the text encoders frozen (their outputs cached), 64 px here.
    assert rows[4].startswith("ours sdxl tiny, 8 GB GPU (SDXL) preset") and "rank 16" in rows[4]
    assert "text encoder frozen" in rows[4] and "64 px" in rows[4]


def test_cache_text_encodes_each_prompt_once_as_the_encoders_do():
    """The SDXL preset row's "Cache Text Encoder Outputs": the trainer's TextCache holds what both encoders give
    (hidden states and the pooled embedding) for each prompt of the batch, which then carries the prompts."""
    import dataclasses

    import family_speed

    spec, resolution = family_speed.family_spec("sdxl", tiny=True)
    row = family_speed.family_rows(["sdxl"], tiny=True)[-1]
    params = dataclasses.replace(train_speed.row_params(row, resolution, cuda=False), resolution=resolution)
    assert params.cache_text_encoder_outputs and not params.train_text_encoder
    model = family_speed.build_model(spec, params, torch.device("cpu"))
    data = family_speed.family_batch(spec, 2, 8)
    cache = family_speed.cache_text(model, data, torch.device("cpu"))
    assert data["prompts"] == ["prompt 0", "prompt 1"] and sorted(cache.outputs) == data["prompts"]
    hidden, pooled = cache.lookup(data["prompts"], torch.device("cpu"))
    with torch.no_grad():
        expected_hidden, expected_pooled = model.info.family.encode_text(model.text_encoders, data, torch.device("cpu"))
    assert torch.equal(hidden, expected_hidden) and torch.equal(pooled, expected_pooled)
    assert pooled is not None and hidden.shape[:2] == (2, 77)


@pytest.mark.one_env
def test_the_class_image_benchmark_reports_the_measured_images_per_second(capsys):
    import class_images_speed

    lines = class_images_speed.main(["--batch-sizes", "2", "--images", "2", "--steps", "2", "--warmup", "0"])
    assert len(lines) == 1, lines
    count, seconds, rate = re.search(r"batch 2, float32 on cpu, 2 steps: (\d+) images in (\d+\.\d+) s = "
                                     r"(\d+\.\d+) images/s", lines[0]).groups()
    assert int(count) == 2 and rate_fits(2, float(seconds), float(rate), seconds_step=0.01, rate_step=0.01)


@pytest.mark.one_env
def test_the_create_benchmark_builds_a_seeded_checkpoint_and_measures_create_against_a_copy(tmp_path):
    import create_memory
    import full_size

    first, again, other = (tmp_path / "Stable-diffusion" / f"{name}.safetensors" for name in ("a", "b", "c"))
    for path, seed in ((first, 0), (again, 0), (other, 1)):
        path.parent.mkdir(parents=True, exist_ok=True)
        full_size.full_size_checkpoint(path, "tiny", torch.float16, seed)
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    job = create_memory.create_phase(tmp_path, first.name)
    assert (tmp_path / "lora_trainer" / "bench" / "unet").is_dir()
    copy = full_size.copy_file(first, tmp_path / "copy.safetensors")
    assert not (tmp_path / "copy.safetensors").exists()
    size_mb = first.stat().st_size / 2**20
    time_line, memory_line = full_size.verdict({**job, "process_seconds": 1.0}, [copy, copy], size_mb, "create tiny")
    ratio = float(re.search(r"= (\d+\.\d+)x the copy", time_line).group(1))
    assert ratio == pytest.approx(job["seconds"] / copy["seconds"], abs=0.01)
    assert ("met" if ratio <= 2 else "MISSED") in time_line
    assert f"{job['owned_mb'] / size_mb:.2f}x the" in memory_line


@pytest.mark.one_env
def test_every_gpu_row_runs_at_tiny_size_on_the_cpu():
    """A GPU is lent rarely and briefly: each row of the GPU table (but the fast path, which compiles for minutes)
    takes a step on the tiny model here, with its own options (fp16 and bf16 autocast, checkpointing, batch 4, a
    frozen text encoder, the presets as they apply on a CPU), so its code runs before a GPU is at hand."""
    import dataclasses

    ran = {}
    for row in train_speed.gpu_rows():
        if row.options.get("compile_unet"):
            continue
        result = train_speed.run_row(dataclasses.replace(row, size="tiny"), torch.device("cpu"), 1, 0)
        assert math.isfinite(result["loss"]) and result["seconds"] > 0, row.name
        ran[row.name] = result["params"]
    assert len(ran) == len(train_speed.gpu_rows()) - 1
    assert ran["ours r4, bf16"].mixed_precision == "bf16" and ran["ours r4, batch 4"].train_batch_size == 4
    assert not ran["ours r4, text encoder frozen"].train_text_encoder
    assert ran["ours 4 GB card preset"].base_weights == "fp8"  # stored in float8 on the CPU as well


def test_the_gpu_table_has_the_fast_path_beside_the_recipe():
    rows = {row.name: row for row in train_speed.gpu_rows()}
    fast = rows["ours r4, checkpointing, fast path"]
    params = train_speed.row_params(fast, 512, cuda=True)
    assert (params.compile_unet, params.gradient_checkpointing, params.mixed_precision, params.rank) == (True, True, "fp16", 4)
    recipe = rows["recipe r4, checkpointing"]

    def result(row, seconds):
        return dict(row=row, params=train_speed.row_params(row, 512, cuda=True), seconds=seconds, samples=2 / seconds,
                    peak=2**31, predicted=None, loss=0.1)

    lines = train_speed.report([result(recipe, 0.4), result(fast, 0.25)])
    assert "ours r4, checkpointing, fast path: 0.62x the recipe's step time, 1.00x its peak memory" in lines
    predicted = dict(result(fast, 0.25), predicted=int(2**31 * 1.05))
    assert "ours r4, checkpointing, fast path: peak reserved 2.000 GiB, predicted 2.100 GiB (+5.0%)" in \
        train_speed.report([predicted])
    # The presets run on CUDA held to the card they are for (issue 13: the 8 GB run must complete under 8 GiB).
    assert {r.name: r.cap_gib for r in train_speed.gpu_rows() if r.cap_gib} == {"ours 8 GB GPU preset": 8,
                                                                                "ours 4 GB card preset": 4}
    capped = dict(result(rows["ours 8 GB GPU preset"], 0.3), cap_gib=8)
    assert "completed with the allocator held to 8 GiB" in train_speed.report([capped])[0]
    fell_back = dict(result(fast, 0.25), note="FELL BACK TO EAGER")
    assert train_speed.report([fell_back])[0].split("  [")[0].endswith("FELL BACK TO EAGER")
    runs = [dict(seconds=s) for s in (0.5, 0.2, 0.3)]
    assert train_speed.median_run(runs)["seconds"] == 0.3


@pytest.mark.one_env
def test_the_merge_benchmark_merges_its_heavy_and_its_default_lora(tmp_path):
    """The two LoRAs adapt what they say (every Linear at rank 16; attention at rank 4, as Train does), and a
    merge phase of each writes a checkpoint that differs from the source exactly where its LoRA adapts."""
    import merge_memory
    from safetensors.torch import load_file

    checkpoint, _ = merge_memory.prepare(tmp_path, "fp16", 0, family="tiny")
    loras = {name: load_file(str(tmp_path / "Lora" / f"{name}.safetensors")) for name, *_ in merge_memory.LORAS.values()}
    heavy, default = loras[merge_memory.LORAS["heavy"][0]], loras[merge_memory.LORAS["default"][0]]
    assert {t.shape[0] for k, t in heavy.items() if k.endswith("lora_down.weight")} == {16}
    assert {t.shape[0] for k, t in default.items() if k.endswith("lora_down.weight")} == {4}
    attention = ("_to_q", "_to_k", "_to_v", "_to_out_0", "_q_proj", "_k_proj", "_v_proj", "_out_proj")
    default_modules = {k.split(".")[0] for k in default}
    assert default_modules and all(m.endswith(attention) for m in default_modules)
    assert default_modules < {k.split(".")[0] for k in heavy}  # every Linear: the feed-forwards too
    assert any("_ff_net_" in k for k in heavy) and any("_mlp_fc1" in k for k in heavy)
    source = load_file(str(checkpoint))
    for name, lora in loras.items():
        merged_into = {}
        real_unlink = Path.unlink

        def read_then_unlink(path, **kwargs):  # the phase removes what it merged: read it first
            if path.name.endswith("_lora.safetensors"):
                merged_into.update(load_file(str(path)))
            real_unlink(path, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Path, "unlink", read_then_unlink)
            figures = merge_memory.merge_phase(tmp_path, None, name)
        assert figures["seconds"] > 0 and figures["owned_mb"] >= 0
        changed = {k for k in source if not torch.equal(source[k], merged_into[k])}
        assert len(changed) == len({k.split(".")[0] for k in lora}), (name, sorted(changed)[:5])


def test_a_fast_path_step_that_fell_back_to_eager_says_so():
    from types import SimpleNamespace

    def step(data):
        return data
    step.loop = SimpleNamespace(compiled_unet=SimpleNamespace(active=False))
    assert train_speed.compiled_note(step).startswith("FELL BACK TO EAGER")
    step.loop.compiled_unet.active = True
    assert train_speed.compiled_note(step) == ""
    step.loop.compiled_unet = None  # an eager row
    assert train_speed.compiled_note(step) == ""


def test_random_weights_are_made_in_their_dtype_seeded_and_frozen():
    """No fp32 copy first (on a GPU its blocks would stay reserved and count in the row's peak)."""
    def made(seed):
        with torch.device("meta"):
            module = torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 8), "norm": torch.nn.LayerNorm(8)})
        return train_speed.materialise(module, torch.device("cpu"), torch.Generator().manual_seed(seed), torch.bfloat16)

    first, again, other = made(0), made(0), made(1)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in first.parameters())
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    assert not torch.equal(first["proj"].weight, other["proj"].weight)
    assert abs(float(first["norm"].weight.float().mean()) - 1.0) < 0.05  # norm weights around 1, others around 0


@pytest.mark.one_env
def test_the_peaks_are_predicted_in_worker_processes_as_in_this_one(capsys):
    """What the GPU rows print beside their measured peak: the prediction of training/peak.py, worked out in a
    spawned worker (the GPU measures meanwhile); one that fails says so and leaves the others."""
    rows = [train_speed.Row("ours tiny", "ours", dict(mixed_precision="fp16", gradient_checkpointing=True, rank=4),
                            "tiny")]
    jobs = train_speed.prediction_jobs(rows)
    jobs["broken"] = (None, jobs["ours tiny"][1])
    results = [dict(row=rows[0], predicted=None), dict(row=train_speed.Row("broken", "ours", {}), predicted=None)]
    train_speed.PredictedPeaks(jobs).fill(results)
    assert results[0]["predicted"] == train_speed.predicted_reserved(*jobs["ours tiny"]) > 0
    assert results[1]["predicted"] is None and "broken: the peak prediction failed" in capsys.readouterr().out


def test_a_capped_row_holds_the_allocator_to_its_card_and_lets_go_after_it(monkeypatch):
    """memory_cap on CUDA (its calls recorded here, where there is no GPU): the fraction of the card that is
    the cap while the row runs, 1.0 again after it, also when the row fails; nothing without a cap or a GPU."""
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: calls.append(f))
    cuda = torch.device("cuda")
    with train_speed.memory_cap(8, cuda):
        assert calls == [0.1]
    assert calls == [0.1, 1.0]
    with pytest.raises(RuntimeError), train_speed.memory_cap(4, cuda):
        raise RuntimeError("CUDA out of memory")
    assert calls == [0.1, 1.0, 0.05, 1.0]
    with train_speed.memory_cap(None, cuda), train_speed.memory_cap(8, torch.device("cpu")):
        pass
    assert len(calls) == 4
    import family_speed

    assert [r.cap_gib for r in family_speed.family_rows(["sdxl"], tiny=False)] == [None, None, 8]


@pytest.mark.one_env
def test_the_fp8_loss_benchmark_compares_the_same_run_with_and_without_float8_weights(tmp_path, capsys):
    """The 4 GB card's curve against the same steps with the base weights as they load: the runs differ only
    by the float8 storage (their losses are not the same), and each window's figure is its runs' mean."""
    import fp8_loss

    losses = fp8_loss.run_both(tmp_path, None, 6, 32, "cpu")
    assert len(losses["fp8"]) == len(losses["default"]) == 6 and losses["fp8"] != losses["default"]
    lines = fp8_loss.compare(losses, 3)
    first = sum(losses["fp8"][:3]) / 3, sum(losses["default"][:3]) / 3
    assert lines[0] == f"steps    1-   3: fp8 {first[0]:.5f}, default {first[1]:.5f}, {(first[0] - first[1]) / first[1]:+.2%}"
    worst = max(abs(sum(losses["fp8"][s:s + 3]) - sum(losses["default"][s:s + 3])) / sum(losses["default"][s:s + 3])
                for s in (0, 3))
    assert f"largest window difference {worst:.2%}" in lines[-1]
    assert lines[-1].endswith("met]" if worst <= 0.02 else "MISSED]")
