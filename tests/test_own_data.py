"""A new user's own data, through the `vqar` command: folders, parquet and saved datasets; one CLI
with clear one-line errors; a prior that knows its tokenizer; cards and files a Hub user expects."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_F2, run_without_vqar
from PIL import Image

from vqar import TokenizerConfig, VQTokenizer
from vqar.cli import main
from vqar.data import class_names, describe_source, load_source

TINY_TOKENIZER = json.dumps({k: v for k, v in TINY_F2.items() if k != "resolution"})


def vqar(*argv, expect: int = 0) -> tuple[str, str]:
    """Run `vqar ARGV` in this process as a user would; returns (stdout, stderr) and checks the exit status."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as exit:
            code = exit.code or 0
    assert code == expect, f"exit {code}, expected {expect}\n{out.getvalue()}\n{err.getvalue()}"
    return out.getvalue(), err.getvalue()


def write_images(folder: Path, count: int, size=(24, 20), mode="RGB", seed=0, fmt="PNG") -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        path = folder / f"img{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(pixels).convert(mode).save(path, format=fmt)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def nested_folder(tmp_path_factory) -> Path:
    """A user's folder: two class subfolders of PNG and JPEG, grey, RGB and RGBA, one truncated file."""
    root = tmp_path_factory.mktemp("own") / "pets"
    write_images(root / "cats", 14, mode="RGB")
    write_images(root / "cats" / "more", 6, mode="L", seed=1, fmt="JPEG")
    write_images(root / "dogs", 14, mode="RGBA", seed=2)
    good = root / "dogs" / "img000.png"
    (root / "dogs" / "broken.png").write_bytes(good.read_bytes()[:40])
    return root


# -- data sources -------------------------------------------------------------------------------


def test_a_folder_of_class_subfolders_is_labelled_by_subfolder_name(nested_folder):
    source = load_source(str(nested_folder))
    assert class_names(source) == ["cats", "dogs"]
    labels = dict(zip(source["image"], source["label"]))
    assert (
        labels[str(nested_folder / "cats" / "more" / "img000.jpg")] == 0
    )  # nested deeper: still its first-level class
    assert labels[str(nested_folder / "dogs" / "img003.png")] == 1


def test_a_flat_folder_has_no_labels(tmp_path):
    write_images(tmp_path, 3)
    assert "label" not in load_source(str(tmp_path)).column_names


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_labels_and_captions_come_from_metadata_files_as_datasets_reads_them(tmp_path, fmt, caplog):
    paths = write_images(tmp_path / "imgs", 7)
    rows = [
        {"file_name": f"imgs/{p.name}", "label": ["red", "blue"][i % 2], "text": f"shape {i}"}
        for i, p in enumerate(paths[:6])
    ]
    if fmt == "jsonl":
        (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    else:
        lines = [",".join(rows[0])] + [",".join(str(v) for v in r.values()) for r in rows]
        (tmp_path / "metadata.csv").write_text("\n".join(lines))
    with caplog.at_level("WARNING"):
        source = load_source(str(tmp_path))
    assert class_names(source) == ["blue", "red"] and source["label"][:2] == [1, 0]
    assert source["caption"][3] == "shape 3" and len(source) == 6
    assert "1 image file(s)" in caplog.text and "not named in its metadata" in caplog.text  # imgs/img006.png
    assert describe_source(source, "mine") == "mine: 6 images, 2 classes (blue: 3, red: 3), 6 captions"
    assert load_source(str(tmp_path), label_column="label").column_names == ["image", "label", "caption"]


def test_every_command_that_reads_images_says_what_it_read(tmp_path):
    VQTokenizer(TokenizerConfig(**TINY_F2)).save_pretrained(tmp_path / "tokenizer")
    out, _ = vqar("tokenize", "--tokenizer", tmp_path / "tokenizer", "--data", "digits", "--output", tmp_path / "t")
    assert "digits: 1,797 images, 10 classes (0: 178, 1: 182," in out


def test_a_classlabel_column_is_found_like_the_image_column(tmp_path):
    import datasets

    digits = load_source("digits").select(range(40)).cast_column("image", datasets.Image())
    digits.rename_columns({"image": "picture", "label": "category"}).to_parquet(str(tmp_path / "d.parquet"))
    source = load_source(str(tmp_path / "d.parquet"))
    assert source.column_names == ["image", "label"] and class_names(source) == [str(d) for d in range(10)]


def test_a_folder_written_by_save_to_disk_is_read_as_a_dataset(tmp_path):
    import datasets

    digits = load_source("digits").select(range(30)).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": digits, "test": digits.select(range(5))}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_source(str(tmp_path / "saved"))) == 30
    assert len(load_source(str(tmp_path / "saved"), split="test")) == 5
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits: \['test', 'train'\]"):
        load_source(str(tmp_path / "saved"), split="validation")


@pytest.mark.parametrize("source", ["./mydta", "data/images/mydta", "mydta.png", "/no/such/folder"])
def test_a_path_that_does_not_exist_says_so_and_never_asks_the_hub(source, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(FileNotFoundError, match=rf"data source '{source}' does not exist"):
        load_source(source)


def test_a_name_that_is_neither_here_nor_on_the_hub_is_one_clear_error():
    with pytest.raises(ValueError, match=r"'mydta' is not a local folder or file .* nor a dataset the Hub gave"):
        load_source("mydta")  # the tests run offline: the Hub cannot be reached


# -- one CLI, clear errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train-tokenizer", "--data", "mydta"], "'mydta' is not a local folder or file"),
        (["train-tokenizer", "--data", "./mydta"], "data source './mydta' does not exist"),
        (["train-tokenizer", "--data", "digits", "--resolution", "30"], "resolution 30 is not divisible by"),
        (["train-tokenizer", "no-such-recipe.yaml"], "recipe no-such-recipe.yaml does not exist"),
        (["generate", "--prior", "nowhere/prior", "--output", "x"], "nowhere/prior"),
        (["evaluate", "--tokenizer", "./no-tokenizer"], "no-tokenizer"),
        (["push", "--tokenizer", "t", "--report", "r"], "give --repo-id to upload"),
        (["generate", "--prior", "p", "--output", "o", "--prefix-image", "x.png"], "go together"),
    ],
)
def test_errors_a_user_causes_print_one_line_and_no_traceback(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, err = vqar(*argv, expect=1)
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and message in lines[0] and "Traceback" not in err, err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        main(["train-tokenizer", "--data", "./mydta", "--debug"])


@pytest.mark.parametrize(
    "command",
    ["train-tokenizer", "train-prior", "tokenize", "train-bpe", "generate", "evaluate", "push", "presets", "demo"],
)
def test_every_command_has_help_with_its_name_description_fields_and_defaults(command):
    out, _ = vqar(command, "--help")
    assert out.startswith(f"usage: vqar {command}")
    from vqar.cli import COMMANDS

    assert len(out.split("\n\n")) >= 2  # a description after the usage
    if command in ("train-tokenizer", "train-prior"):
        assert "--batch_size BATCH_SIZE, --batch-size BATCH_SIZE" in out and "examples per step and process" in out
        assert "(default: 16)" in out
    if command == "generate":
        assert "--cfg_scale CFG_SCALE, --cfg-scale CFG_SCALE" in out and "(default: 1.0)" in out and "--class" in out
    assert COMMANDS[command][1]


def test_version_top_level_help_and_unknown_commands():
    from vqar import __version__

    assert vqar("--version")[0].strip() == f"vqar {__version__}"
    top = vqar("--help")[0]
    assert "discrete-token image generation" in top and "train-prior" in top and "vqar generate --prior" in top
    assert "unknown command 'train-gpt'" in vqar("train-gpt", expect=2)[1]


def test_presets_lists_layout_codes_tokens_parameters_and_what_each_is():
    out, _ = vqar("presets")
    row = next(line for line in out.splitlines() if line.startswith("| fsq-cpu |"))
    assert "| grid | 1,000 | 64 at 32 px | 1.0M |" in row and "FSQ" in row
    assert "| titok-1d-cpu | 1d |" in out


# -- the four commands of the README, on a folder of one's own ----------------------------------


@pytest.fixture(scope="module")
def own_run(nested_folder, tmp_path_factory):
    """README's "Your own images": a tokenizer with no recipe file, tokens, a prior, samples."""
    runs = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    vqar(
        "train-tokenizer",
        "--data",
        nested_folder,
        "--output_dir",
        runs / "tokenizer",
        "--max_steps",
        2,
        "--batch_size",
        4,
        "--resolution",
        16,
        "--tokenizer",
        TINY_TOKENIZER,
        "--log_with",
        "none",
    )
    vqar(
        "tokenize",
        "--tokenizer",
        runs / "tokenizer" / "tokenizer",
        "--data",
        nested_folder,
        "--output",
        runs / "tokens",
    )
    vqar(
        "train-prior",
        "--tokens",
        runs / "tokens",
        "--output_dir",
        runs / "prior",
        "--max_steps",
        2,
        "--batch_size",
        4,
        "--size",
        "tiny",
        "--eval_samples",
        2,
    )
    return runs


def test_recipe_free_training_uses_cpu_defaults_and_no_lpips(own_run):
    recipe = (own_run / "tokenizer" / "recipe.yaml").read_text()
    assert "preset: fsq-cpu" in recipe and "perceptual_weight: 0.0" in recipe  # LPIPS off: its weights are not cached
    metrics = json.loads((own_run / "tokenizer" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["skipped_images"] == 1  # the truncated file, once


def test_the_prior_is_conditional_on_the_subfolders_and_generates_labelled_rows(own_run, tmp_path):
    config = json.loads((own_run / "prior" / "prior" / "config.json").read_text())
    assert config["vqar_vocab"]["class_names"] == ["cats", "dogs"]
    out, _ = vqar(
        "generate",
        "--prior",
        own_run / "prior" / "prior",
        "--class",
        "dogs",
        "cats",
        "--num-images",
        2,
        "--output",
        tmp_path / "gen",
    )
    assert "wrote 4 images" in out
    grid = np.asarray(Image.open(tmp_path / "gen" / "grid.png"))
    assert grid.shape[1] > 2 * 16 + 6  # a label margin left of the rows
    assert (grid[:, :10] < 128).any()  # dark text in it


def test_a_prior_refuses_a_tokenizer_with_other_weights_unless_told(own_run, tmp_path):
    tokenizer = VQTokenizer.from_pretrained(own_run / "tokenizer" / "tokenizer")
    with torch.no_grad():
        tokenizer.encoder.conv_in.bias.add_(0.5)  # same shape, other encoder weights: other codes
    tokenizer.save_pretrained(tmp_path / "other")
    prior = own_run / "prior" / "prior"
    _, err = vqar("generate", "--prior", prior, "--tokenizer", tmp_path / "other", "--output", tmp_path / "g", expect=1)
    assert "trained on another tokenizer" in err and "--allow-other-tokenizer" in err
    _, err = vqar(
        "evaluate",
        "--tokenizer",
        tmp_path / "other",
        "--prior",
        prior,
        "--data",
        "digits",
        "--output",
        tmp_path / "e",
        expect=1,
    )
    assert "trained on another tokenizer" in err
    with pytest.warns(UserWarning, match="trained on another tokenizer"):
        vqar(
            "generate",
            "--prior",
            prior,
            "--tokenizer",
            tmp_path / "other",
            "--allow-other-tokenizer",
            "--output",
            tmp_path / "g",
        )


def test_a_prior_and_its_tokenizer_moved_together_still_work_and_a_lost_one_is_named(own_run, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(own_run / "prior", moved / "prior")
    shutil.copytree(own_run / "tokenizer", moved / "tokenizer")
    vqar("generate", "--prior", moved / "prior" / "prior", "--output", tmp_path / "g", "--num-images", 1, "--class", 0)
    shutil.rmtree(moved / "tokenizer")
    _, err = vqar("generate", "--prior", moved / "prior" / "prior", "--output", tmp_path / "g", expect=1)
    assert "neither at" in err and str(moved / "tokenizer" / "tokenizer") in err and "--tokenizer" in err


def test_class_and_guidance_on_an_unconditional_prior_say_it_is_unconditional(own_run, tmp_path):
    vqar(
        "train-prior",
        "--tokens",
        own_run / "tokens",
        "--output_dir",
        tmp_path / "u",
        "--max_steps",
        1,
        "--batch_size",
        4,
        "--size",
        "tiny",
        "--conditional",
        "false",
        "--eval_samples",
        0,
    )
    for extra in (["--class", "cats"], ["--cfg-scale", "2"]):
        _, err = vqar("generate", "--prior", tmp_path / "u" / "prior", "--output", tmp_path / "g", *extra, expect=1)
        assert "is unconditional" in err


def test_prefix_completion_shows_the_source_and_the_boundary(own_run, nested_folder, tmp_path):
    vqar(
        "generate",
        "--prior",
        own_run / "prior" / "prior",
        "--class",
        "cats",
        "--num-images",
        2,
        "--prefix-image",
        nested_folder / "cats" / "img001.png",
        "--prefix-rows",
        3,
        "--output",
        tmp_path / "c",
    )
    grid = np.asarray(Image.open(tmp_path / "c" / "grid.png")).astype(int)
    assert grid.shape[1] >= 3 * 16  # the source, then two completions
    red = (grid[..., 0] > 200) & (grid[..., 1] < 60) & (grid[..., 2] < 60)
    assert red.sum(axis=1).max() >= 3 * 14  # a red line across all three: 3 token rows x f2 = pixel row 6


def test_tokenize_and_evaluate_prepare_images_as_training_evaluated_them(tmp_path):
    torch.set_num_threads(1)
    args = [
        "--data",
        "digits",
        "--resolution",
        16,
        "--resize_to",
        20,
        "--tokenizer",
        TINY_TOKENIZER,
        "--max_steps",
        2,
        "--batch_size",
        16,
        "--log_with",
        "none",
    ]
    vqar("train-tokenizer", *args, "--output_dir", tmp_path / "t")
    trained = json.loads((tmp_path / "t" / "metrics.json").read_text())
    vqar(
        "evaluate",
        "--tokenizer",
        tmp_path / "t" / "tokenizer",
        "--data",
        "digits",
        "--holdout",
        0.1,
        "--output",
        tmp_path / "e",
    )
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["psnr"] == pytest.approx(trained["psnr"], abs=1e-4) and report["images"] == trained["eval_images"]


# -- a prior for plain transformers; cards; quiet ---------------------------------------------


def test_a_prior_generates_with_plain_transformers_and_vqar_not_installed(own_run):
    script = textwrap.dedent(f"""
        import torch, transformers
        prior = transformers.AutoModelForCausalLM.from_pretrained({str(own_run / "prior" / "prior")!r})
        ids = prior.config.vqar_ids
        codes = prior.generate(torch.tensor([[ids["classes"]["dogs"], ids["boi"]]]))[:, 2:]
        print(list(codes.shape), int(codes.min()), int(codes.max()), "vqar" in sys.modules)
    """)
    stdout = run_without_vqar(script)
    shape, low, high, imported = stdout.split("]")[0] + "]", *stdout.split("]")[1].split()
    assert shape == "[1, 64]" and 0 <= int(low) and int(high) < 25 and imported == "False"


def test_save_best_keeps_the_best_held_out_weights_and_tensorboard_has_one_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(1)
    vqar(
        "train-tokenizer",
        "--data",
        "digits",
        "--resolution",
        16,
        "--tokenizer",
        TINY_TOKENIZER,
        "--max_steps",
        4,
        "--batch_size",
        16,
        "--eval_every",
        2,
        "--save_best",
        "true",
        "--output_dir",
        tmp_path,
    )
    best = json.loads((tmp_path / "best" / "metrics.json").read_text())
    final = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "best" / "tokenizer" / "model.safetensors").is_file()
    assert best["psnr"] == final["best"] and best["step"] == final["best_step"] in (2, 4)
    runs = [p for p in (tmp_path / "logs").rglob("*") if p.is_dir()]
    assert [p.name for p in runs] == ["tokenizer"]  # one run folder, no empty timestamped sub-runs
    events = EventAccumulator(str(runs[0]), size_guidance={"images": 0}).Reload()
    assert {"eval/psnr", "train/psnr", "loss/total"} <= set(events.Tags()["scalars"])
    assert "eval/originals_over_reconstructions" in events.Tags()["images"]
    assert len(events.Scalars("eval/psnr")) == 2  # at step 2, and the final evaluation


def test_the_prior_logs_its_samples_and_records_its_processes(own_run):
    metrics = json.loads((own_run / "prior" / "metrics.json").read_text())
    assert metrics["num_processes"] == 1 and metrics["weights_identical_across_ranks"] is True
    assert sorted((own_run / "prior" / "samples").glob("step-*.png"))


def test_push_dry_run_needs_no_repo_id_and_cards_are_what_a_hub_user_expects(own_run, nested_folder, tmp_path):
    import yaml

    vqar(
        "evaluate",
        "--tokenizer",
        own_run / "tokenizer" / "tokenizer",
        "--data",
        nested_folder,
        "--output",
        tmp_path / "report",
    )
    out, _ = vqar(
        "push",
        "--tokenizer",
        own_run / "tokenizer" / "tokenizer",
        "--report",
        tmp_path / "report",
        "--prior",
        own_run / "prior" / "prior",
        "--dry-run",
        "--output",
        tmp_path / "push",
    )
    tokenizer_card = (tmp_path / "push" / "tokenizer" / "README.md").read_text()
    meta = yaml.safe_load(tokenizer_card.split("---")[1])
    assert meta["pipeline_tag"] == "image-to-image" and "license" not in meta and "base_model" not in meta
    assert "datasets" not in meta  # a local folder is no Hub dataset id
    for metric in meta["model-index"][0]["results"][0]["metrics"]:
        assert len(f"{metric['value']:g}".replace(".", "").replace("-", "").lstrip("0")) <= 4
    prior_card = (tmp_path / "push" / "prior" / "README.md").read_text()
    assert "`cats` = " in prior_card and "transformers.AutoModelForCausalLM.from_pretrained" in prior_card
    assert (tmp_path / "push" / "prior" / "samples.png").is_file() and "base_model" not in prior_card.split("---")[1]
    staged = json.loads((tmp_path / "push" / "prior" / "config.json").read_text())
    assert staged["vqar_vocab"]["tokenizer"].startswith("YOUR-NAME/")  # named by the Hub id it is pushed beside
    vqar(
        "push",
        "--tokenizer",
        own_run / "tokenizer" / "tokenizer",
        "--report",
        tmp_path / "report",
        "--dry-run",
        "--license",
        "mit",
        "--output",
        tmp_path / "push2",
    )
    assert (
        yaml.safe_load((tmp_path / "push2" / "tokenizer" / "README.md").read_text().split("---")[1])["license"] == "mit"
    )


def test_commands_are_quiet_but_for_vqars_own_progress(own_run, tmp_path, capfd):
    printed = vqar("generate", "--prior", own_run / "prior" / "prior", "--class", "cats", "--output", tmp_path / "g")
    printed += vqar(
        "tokenize", "--tokenizer", own_run / "tokenizer" / "tokenizer", "--data", "digits", "--output", tmp_path / "t"
    )
    captured = capfd.readouterr()
    text = "".join(printed) + captured.out + captured.err
    assert "Loading weights" not in text and "Writing model shards" not in text and "Saving the dataset" not in text
    assert "tokenize train" in text  # vqar's own bar stays


def test_an_unknown_tokenizer_for_the_fingerprint_is_computed_from_config_and_weights(tmp_path):
    a = VQTokenizer(TokenizerConfig(**TINY_F2))
    a.save_pretrained(tmp_path / "a")
    b = VQTokenizer.from_pretrained(tmp_path / "a")
    assert a.fingerprint == b.fingerprint  # reloading changes nothing
    b.config.resize_to = 32  # how images are prepared is not what the codes mean
    assert a.fingerprint == b.fingerprint
    with torch.no_grad():
        b.encoder.conv_in.weight.mul_(1.01)
    assert a.fingerprint != b.fingerprint


def test_every_sampler_on_the_command_line_draws_the_same_greedy_images(own_run, tmp_path):
    grids = {}
    for sampler in ("static", "generate", "jacobi"):
        argv = ["generate", "--prior", own_run / "prior" / "prior", "--class", "dogs", "--temperature", 0]
        vqar(*argv, "--sampler", sampler, "--output", tmp_path / sampler)
        grids[sampler] = np.asarray(Image.open(tmp_path / sampler / "grid.png"))
    assert np.array_equal(grids["static"], grids["generate"]) and np.array_equal(grids["jacobi"], grids["generate"])
    _, err = vqar(
        "generate", "--prior", own_run / "prior" / "prior", "--sampler", "fast", "--output", tmp_path, expect=2
    )
    assert "fast" in err and "jacobi" in err


def test_every_snippet_of_the_model_cards_runs_as_written_against_the_hub(own_run, nested_folder, tmp_path):
    """Push a tokenizer and its class-conditional prior to a loopback Hub, then run each card's Python
    blocks, in order, in a fresh process, as a reader of the card would."""
    import os
    import re

    import yaml
    from hub_server import LoopbackHub

    vqar(
        "evaluate",
        "--tokenizer",
        own_run / "tokenizer" / "tokenizer",
        "--data",
        nested_folder,
        "--output",
        tmp_path / "r",
    )
    with LoopbackHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_test"}
        env |= {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
        push = [sys.executable, "-m", "vqar", "push", "--tokenizer", str(own_run / "tokenizer" / "tokenizer")]
        push += ["--report", str(tmp_path / "r"), "--prior", str(own_run / "prior" / "prior"), "--repo-id", "me/pets"]
        done = subprocess.run(push + ["--output", str(tmp_path / "push")], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        for repo in ("me/pets", "me/pets-prior"):
            card = hub.state.repos[repo]["README.md"].decode()
            meta = yaml.safe_load(card.split("---")[1])
            if repo.endswith("prior"):  # class-conditional: not the Hub's unconditional pipeline
                assert "pipeline_tag" not in meta and "class-conditional-image-generation" in meta["tags"]
            code = "\n".join(re.findall(r"```python\n(.*?)```", card, re.S))
            assert code.count("from_pretrained") >= 1
            run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
            assert run.returncode == 0, f"{repo}'s card:\n{code}\n{run.stderr[-2000:]}"


def test_lpips_that_was_not_asked_for_is_mentioned_once_in_a_short_line(tmp_path, caplog):
    out, err = vqar(
        "train-tokenizer", "--data", "digits", "--resolution", 16, "--max_steps", 1, "--output_dir", tmp_path,
        "--log_with", "none", "--eval_every", 0, "--tokenizer", TINY_TOKENIZER,
    )  # fmt: skip
    text = out + err + caplog.text
    assert text.count("vgg16") == 0 and text.count("LPIPS") == 1  # the one line of metrics.json
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["lpips"] is None and len(metrics["lpips_missing_reason"]) < 120


def test_a_resolution_off_the_tokenizers_factor_suggests_the_nearest_that_work(tmp_path):
    _, err = vqar("train-tokenizer", "--resolution", 62, "--output_dir", tmp_path, "--log_with", "none", expect=1)
    assert "resolution 62 is not divisible by the downsampling factor 4: use 60 or 64" in err
    assert len(err.strip().splitlines()) <= 2


def test_the_package_imports_from_the_folder_that_holds_the_clone(tmp_path):
    """`python -c "from vqar import ..."` one folder above a clone named vqar: the clone folder must not
    be taken for a namespace package (the Makefile installs in setuptools' compat editable mode)."""

    (tmp_path / "vqar").symlink_to(Path(__file__).resolve().parent.parent)
    code = "from vqar import VQTokenizer; print(VQTokenizer.__module__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]


def test_a_tokenizer_encodes_smaller_images_at_their_size_and_the_prior_decodes_at_its_grid(tmp_path):
    """A converted-style tokenizer at 32 px (f2: 16x16 tokens) on 16 px images: upsampling is said, with
    the --resolution that avoids it; with it, the grid (8x8) travels to the prior, which generates 16 px
    images, also completing a prefix image, with no refusal of its own tokenizer."""
    VQTokenizer(TokenizerConfig(**{**TINY_F2, "resolution": 32})).save_pretrained(tmp_path / "tokenizer")
    write_images(tmp_path / "small" / "a", 12, size=(16, 16))
    write_images(tmp_path / "small" / "b", 12, size=(16, 16), seed=1)
    common = ["--tokenizer", tmp_path / "tokenizer", "--data", tmp_path / "small", "--eval_fraction", 0.2]
    out, _ = vqar("tokenize", *common, "--output", tmp_path / "upsampled")
    assert "images are 16x16 (the first one), smaller than the 32 px they are cut to: they are upsampled" in out
    assert "--resolution 16 encodes them at their size (a 8 x 8 grid of tokens" in out
    out, _ = vqar("tokenize", *common, "--output", tmp_path / "tokens", "--resolution", 16)
    assert "upsampled" not in out
    assert json.loads((tmp_path / "tokens" / "vqar_tokens.json").read_text())["grid"] == [8, 8]
    vqar("train-prior", "--tokens", tmp_path / "tokens", "--size", "tiny", "--max_steps", 2, "--batch_size", 4,
         "--output_dir", tmp_path / "prior", "--log_with", "none", "--eval_every", 0)  # fmt: skip
    vqar("generate", "--prior", tmp_path / "prior" / "prior", "--output", tmp_path / "g", "--num-images", 2)
    assert Image.open(tmp_path / "g" / "0000.png").size == (16, 16)
    prefix = tmp_path / "small" / "a" / "img000.png"
    vqar("generate", "--prior", tmp_path / "prior" / "prior", "--output", tmp_path / "c", "--class", "a",
         "--prefix-image", prefix, "--prefix-rows", 3)  # fmt: skip
    assert Image.open(tmp_path / "c" / "0000.png").size == (16, 16)


def test_generate_writes_the_codes_and_needs_no_tokenizer_for_codes_only(own_run, tmp_path):
    prior = own_run / "prior" / "prior"
    vqar("generate", "--prior", prior, "--class", "cats", "--num-images", 3, "--output", tmp_path / "g")
    codes = np.load(tmp_path / "g" / "codes.npy")
    tokenizer = VQTokenizer.from_pretrained(own_run / "tokenizer" / "tokenizer").eval()
    assert codes.shape == (3, *tokenizer.token_shape) and np.issubdtype(codes.dtype, np.integer)
    decoded = tokenizer.decode(torch.from_numpy(codes)).clamp(-1, 1)
    png = np.asarray(Image.open(tmp_path / "g" / "0001.png"))
    assert np.abs(((decoded[1].permute(1, 2, 0) + 1) * 127.5).round().numpy() - png).max() <= 1
    alone = tmp_path / "alone" / "prior"
    shutil.copytree(prior, alone)  # its tokenizer is not beside it
    out, _ = vqar("generate", "--prior", alone, "--codes-only", "--class", "dogs", "--output", tmp_path / "c")
    assert "wrote codes.npy to" in out and not list((tmp_path / "c").glob("*.png"))
    assert np.load(tmp_path / "c" / "codes.npy").shape == (1, *tokenizer.token_shape)
    _, err = vqar("generate", "--prior", alone, "--class", "dogs", "--output", tmp_path / "d", expect=1)
    assert "pass its folder or Hub id with --tokenizer" in err
