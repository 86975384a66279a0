"""Tokenizing a dataset and training the prior: outputs, reuse, resume, plain-transformers loading."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tokenize_digits_with_tiny_tokenizer
from safetensors.torch import load_file

from vqar import VQTokenizer
from vqar.tokens import load_tokens
from vqar.training.checkpoints import complete_checkpoints
from vqar.training.encode_dataset import TokenizeArgs, tokenize_dataset
from vqar.training.recipes import TrainConfig, parse_recipe
from vqar.training.train_prior import PriorArgs, train_prior


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    return tokenize_digits_with_tiny_tokenizer(tmp_path_factory.mktemp("prior"))


def test_tokenized_dataset_has_tokens_labels_and_a_manifest(tokens_dir):
    dataset, manifest = load_tokens(tokens_dir)
    assert manifest.num_images == {"train": 1617, "eval": 180}
    assert manifest.tokens_per_image == 64 and manifest.codebook_size == 25 and manifest.grid == [8, 8]
    assert manifest.class_names == [str(d) for d in range(10)]
    row = dataset["train"][0]
    assert len(row["tokens"]) == 64 and 0 <= min(row["tokens"]) and max(row["tokens"]) < 25
    assert sorted(set(dataset["eval"]["label"])) == list(range(10))


def test_tokenize_reuses_what_is_written_and_redoes_it_for_another_tokenizer(tokens_dir, tmp_path):
    tokenizer = str(tokens_dir.parent / "tokenizer")
    before = (tokens_dir / "train").stat().st_mtime_ns
    args = TokenizeArgs(tokenizer=tokenizer, data="digits", output=str(tokens_dir))
    assert tokenize_dataset(args).to_dict() == json.loads((tokens_dir / "vqar_tokens.json").read_text())
    assert (tokens_dir / "train").stat().st_mtime_ns == before
    other = VQTokenizer.from_pretrained(tokenizer)
    torch.nn.init.normal_(other.encoder.conv_in.bias)  # other codes (a decoder change keeps them)
    other.save_pretrained(tmp_path / "other")
    copy = tmp_path / "tokens"
    shutil.copytree(tokens_dir, copy)
    manifest = tokenize_dataset(TokenizeArgs(tokenizer=str(tmp_path / "other"), data="digits", output=str(copy)))
    assert manifest.fingerprint != json.loads((tokens_dir / "vqar_tokens.json").read_text())["fingerprint"]


def test_tokenize_crops_gives_many_fixed_sequences_per_photograph(tokens_dir, tmp_path):
    # a few large photographs: each gives `crops` random crops (and flips), the same on every run
    tokenizer = str(tokens_dir.parent / "tokenizer")
    options = dict(tokenizer=tokenizer, data="photos", resolution=16, resize_to=64, eval_fraction=0.25)
    manifest = tokenize_dataset(TokenizeArgs(**options, crops=5, output=str(tmp_path / "a")))
    assert manifest.num_images == {"train": 30, "eval": 10} and manifest.grid == [8, 8]
    again = tokenize_dataset(TokenizeArgs(**options, crops=5, output=str(tmp_path / "b")))
    assert again.fingerprint == manifest.fingerprint
    first, second = load_tokens(tmp_path / "a")[0], load_tokens(tmp_path / "b")[0]
    assert first["train"]["tokens"] == second["train"]["tokens"]
    rows = first["train"]["tokens"]
    assert len({tuple(r) for r in rows[:6]} | {tuple(r) for r in rows[6:12]}) > 6  # other crops of the same photos
    single = tokenize_dataset(TokenizeArgs(**options, output=str(tmp_path / "c")))
    assert single.num_images == {"train": 6, "eval": 2} and single.fingerprint != manifest.fingerprint
    with pytest.raises(ValueError, match="crops must be >= 1"):
        tokenize_dataset(TokenizeArgs(**options, crops=0, output=str(tmp_path / "d")))


def prior_args(tokens_dir, output_dir, **overrides) -> list[str]:
    options = {
        "tokens": tokens_dir,
        "size": "tiny",
        "output_dir": output_dir,
        "max_steps": 4,
        "batch_size": 16,
        "log_with": "none",
        "eval_every": 0,
        "save_every": 0,
        "learning_rate": 3e-3,
        **overrides,
    }
    return [f"--{k}={v}" for k, v in options.items()]


def run(argv):
    return train_prior(*parse_recipe(argv, (PriorArgs, TrainConfig)))


def test_train_ar_reports_bits_and_saves_a_self_describing_prior(tokens_dir, tmp_path):
    metrics = run(prior_args(tokens_dir, tmp_path, max_steps=3))
    assert metrics["steps"] == 3 and 0 < metrics["bits_per_token"] < 10
    assert metrics["bits_per_image"] == pytest.approx(metrics["bits_per_token"] * 64)
    config = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 25 + 4 + 10
    tokenizer = config["vqar_vocab"]["tokenizer"]  # relative to the prior: the two folders can move together
    assert not Path(tokenizer).is_absolute()
    assert (tmp_path / "prior" / tokenizer).resolve() == (tokens_dir.parent / "tokenizer").resolve()


def test_unconditional_prior_has_no_class_tokens(tokens_dir, tmp_path):
    run(prior_args(tokens_dir, tmp_path, max_steps=1, conditional=False))
    config = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert config["vocab_size"] == 25 + 4 and config["vqar_vocab"]["class_names"] == []


def test_prior_resume_is_bit_identical(tokens_dir, tmp_path):
    options = dict(max_steps=6, save_every=3, keep_checkpoints=3, ema_decay=0.9, warmup_steps=2)
    run(prior_args(tokens_dir, tmp_path / "full", **options))
    assert [p.name for p in complete_checkpoints(tmp_path / "full")] == ["step-000003", "step-000006"]
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000003", resumed / "checkpoints" / "step-000003")
    run(prior_args(tokens_dir, resumed, resume="latest", **options))
    a, b = (load_file(d / "prior" / "model.safetensors") for d in (tmp_path / "full", resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_context_shorter_than_an_image_is_refused(tokens_dir, tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings=32 is shorter than one image's sequence \\(66"):
        run(prior_args(tokens_dir, tmp_path, prior='{"max_position_embeddings": 32}'))


def test_missing_tokens_folder_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `vqar tokenize` first"):
        run(prior_args(tmp_path / "nothing", tmp_path / "out"))


def test_train_bpe_on_tokens_shortens_sequences_and_round_trips(tokens_dir, tmp_path):
    from vqar.bpe import VisualBPE, train_bpe

    stats = train_bpe(tokens_dir, vocab_size=25 + 30, output=tmp_path)
    assert stats["merges"] == 30 and stats["eval_mean_tokens_after"] < 64
    bpe = VisualBPE.load(tmp_path)
    dataset, _ = load_tokens(tokens_dir)
    codes = torch.tensor(dataset["eval"]["tokens"]).reshape(-1, 8, 8)
    assert torch.equal(bpe.decode(bpe.encode(codes)), codes.reshape(len(codes), -1))


# -- fine-tuning a trained prior ----------------------------------------------------------------


def _class_folder(root: Path, classes: dict[str, list[int]]) -> Path:
    """An image folder: for each class, the bundled digits at the given indices."""
    from vqar.data import load_source, read_image

    digits = load_source("digits")
    for name, indices in classes.items():
        (root / name).mkdir(parents=True)
        for i in indices:
            read_image(digits[i]["image"]).save(root / name / f"{i:04d}.png")
    return root


def test_a_prior_fine_tuned_on_new_classes_keeps_its_own_and_learns_the_new_ones(tokens_dir, tmp_path):
    from vqar.ar import load_prior
    from vqar.generation import SamplingConfig, build_prompts, generate_images, load_tokenizer_for
    from vqar.training.train_prior import TokenBatches

    run(prior_args(tokens_dir, tmp_path / "base", max_steps=2))
    threes = [i for i in range(400) if i % 10 == 3]  # the digits dataset cycles through its classes
    folder = _class_folder(tmp_path / "images", {"3": threes, "star": [i + 1 for i in threes]})
    tokenizer = str(tokens_dir.parent / "tokenizer")
    tokenize_dataset(TokenizeArgs(tokenizer=tokenizer, data=str(folder), output=str(tmp_path / "new"), num_workers=0))
    base = tmp_path / "base" / "prior"
    run(prior_args(tmp_path / "new", tmp_path / "tuned", max_steps=3, init_from=base, batch_size=8))

    prior, layout = load_prior(str(tmp_path / "tuned" / "prior"))
    _, base_layout = load_prior(str(base))
    assert layout.ids.class_names == (*base_layout.ids.class_names, "star")
    assert prior.config.vocab_size == layout.ids.vocab_size == base_layout.ids.vocab_size + 1
    # the new tokens' labels land on the prior's own classes: "3" stays 3, "star" is appended
    rows = [{"tokens": torch.zeros(64, dtype=torch.long), "label": label} for label in (0, 1, -1)]
    labels = TokenBatches(layout, None, [layout.ids.class_index(n) for n in ("3", "star")])(rows)["labels"]
    assert labels.tolist() == [3, 10, -1]
    images = generate_images(
        prior,
        load_tokenizer_for(str(tmp_path / "tuned" / "prior"), layout),
        layout,
        build_prompts(layout, classes=["star", "7"]),
        SamplingConfig(seed=0, cfg_scale=2.0),
    )
    assert images.shape == (2, 3, 16, 16)


def test_fine_tuning_a_prior_on_another_tokenizers_codes_is_refused(tokens_dir, tmp_path):
    from conftest import TINY_F2

    from vqar import TokenizerConfig

    run(prior_args(tokens_dir, tmp_path / "base", max_steps=1))
    other = {**TINY_F2, "quantizer": {"kind": "fsq", "levels": [3, 3]}}
    VQTokenizer(TokenizerConfig(**other)).save_pretrained(tmp_path / "other")
    tokenize_dataset(TokenizeArgs(tokenizer=str(tmp_path / "other"), data="digits", output=str(tmp_path / "tokens")))
    with pytest.raises(ValueError, match="models 25 codes .* hold 9 .*other codebooks"):
        run(prior_args(tmp_path / "tokens", tmp_path / "tuned", init_from=tmp_path / "base" / "prior"))
