"""Text prompts: captions in the data, one vocabulary of text ids and codes, every sampler, plain
transformers, the bundled `shapes` set and its detector, and what bad captions and prompts get."""

import io
import json
import logging
import tarfile
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_F2, run_without_vqar
from PIL import Image

from vqar import TokenizerConfig, VQTokenizer
from vqar.ar import VocabLayout, build_prior, from_language_model, load_prior
from vqar.cli import main
from vqar.data import describe_source, load_source
from vqar.generation import SamplingConfig, build_prompts, generate_ids
from vqar.shapes import (
    ATTRIBUTES,
    HELD_OUT,
    Scene,
    all_scenes,
    detect,
    detector_ceiling,
    prompt_following,
    shapes_dataset,
)
from vqar.text import TextTokenizer, load_text_tokenizer, text_vocab_size, train_bpe
from vqar.tokens import TokenRows, load_tokens
from vqar.training.train_prior import text_layout, training_sequences

CAPTIONS = [scene.caption(np.random.default_rng(i)) for i, scene in enumerate(all_scenes() * 3)]
BASE = VocabLayout.create(codebook_size=25, tokens_per_image=16, grid=[4, 4])
MIXED = ["a red circle on the left", "two blue squares", "", "On the right side: a single white triangle"]


def make_text_prior(base: VocabLayout = BASE, max_text_tokens: int = 12, seed: int = 0):
    raw = train_bpe(CAPTIONS)
    text = TextTokenizer.from_backend(raw, replace(base.ids, num_text_tokens=text_vocab_size(raw)), max_text_tokens)
    layout = text_layout(base, text)
    torch.manual_seed(seed)
    return build_prior(layout, size="tiny").eval(), layout, text


@pytest.fixture(scope="module")
def text_prior(tmp_path_factory):
    prior, layout, text = make_text_prior()
    folder = tmp_path_factory.mktemp("text") / "prior"
    prior.save_pretrained(folder)
    text.save(folder)
    return prior, layout, text, folder


def vqar(*argv, expect: int = 0) -> str:
    import contextlib

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as exit:
            code = exit.code or 0
    assert code == expect, f"exit {code}, expected {expect}\n{out.getvalue()}\n{err.getvalue()}"
    return out.getvalue() + err.getvalue()


# -- one vocabulary ---------------------------------------------------------------------------


def test_the_id_layout_round_trips_with_text_through_the_saved_prior(text_prior):
    prior, layout, text, folder = text_prior
    ids = layout.ids
    assert ids.first_text >= ids.image_vocab_size and ids.vocab_size == ids.first_text + ids.num_text_tokens
    loaded, loaded_layout = load_prior(str(folder))
    assert loaded_layout == layout and loaded.config.vocab_size == ids.vocab_size
    assert loaded.config.vqar_ids["text"] == [ids.first_text, ids.vocab_size]
    prompts = text.prompts(MIXED)
    again = load_text_tokenizer(folder, loaded_layout).prompts(MIXED)
    assert torch.equal(prompts, again)
    assert (prompts[:, -1] == ids.boi).all() and prompts[2].tolist() == [ids.pad] * (prompts.shape[1] - 1) + [ids.boi]
    caption = prompts[:, :-1]
    assert ((caption >= ids.first_text) | (caption == ids.pad)).all()
    codes = torch.randint(0, 25, (4, 4, 4))
    condition, images = layout.codec.from_sequence(layout.codec.text_sequence(prompts, codes))
    assert torch.equal(condition, prompts) and torch.equal(images, codes)


def test_plain_transformers_generate_image_codes_only_from_the_prior_folder_without_vqar(text_prior):
    prior, layout, text, folder = text_prior
    script = textwrap.dedent(f"""
        import json, torch, transformers
        tokenizer = transformers.AutoTokenizer.from_pretrained({str(folder)!r})
        prior = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})
        inputs = tokenizer({MIXED[:2]!r}, return_tensors="pt", padding=True)
        plain = prior.generate(**inputs)[:, inputs["input_ids"].shape[1]:]
        guided = prior.generate(**inputs, guidance_scale=3.0)[:, inputs["input_ids"].shape[1]:]
        print(json.dumps({{"prompt": inputs["input_ids"].tolist(), "plain": plain.tolist(), "guided": guided.tolist(),
                          "vqar": "vqar" in sys.modules}}))
    """)
    stdout = run_without_vqar(script)
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["vqar"] is False
    assert out["prompt"] == text.prompts(MIXED[:2]).tolist()  # the same prompt ids as vqar's, left-padded
    for codes in (out["plain"], out["guided"]):
        codes = torch.tensor(codes)
        assert codes.shape == (2, 16) and 0 <= codes.min() and codes.max() < 25


def test_plain_guidance_from_the_last_prompt_id_is_vqars_empty_caption_guidance(text_prior):
    prior, layout, text, _ = text_prior
    inputs = text.prompts(MIXED[:1])
    sampling = SamplingConfig(temperature=0, cfg_scale=3.0)
    ours = generate_ids(prior, layout, inputs, sampling).flatten(1)
    theirs = prior.generate(inputs, guidance_scale=3.0, do_sample=False)[:, inputs.shape[1] :]
    assert torch.equal(ours, theirs)


# -- every sampler ------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_every_sampler_gives_generates_ids_greedily_for_text_prompts_of_mixed_lengths(text_prior, cfg_scale):
    prior, layout, text, _ = text_prior
    prompts = build_prompts(layout, texts=MIXED, text=text)
    options = dict(temperature=0, cfg_scale=cfg_scale)
    reference = generate_ids(prior, layout, prompts, SamplingConfig(sampler="generate", **options))
    assert reference.shape == (4, 4, 4)
    assert torch.equal(generate_ids(prior, layout, prompts, SamplingConfig(sampler="static", **options)), reference)
    for window in (3, 16):
        jacobi = SamplingConfig(sampler="jacobi", jacobi_window=window, **options)
        assert torch.equal(generate_ids(prior, layout, prompts, jacobi), reference), f"jacobi_window={window}"
    one_by_one = [generate_ids(prior, layout, build_prompts(layout, texts=[t], text=text), SamplingConfig(**options))
                  for t in MIXED]  # fmt: skip
    assert torch.equal(torch.cat(one_by_one), reference), "left padding changed what a prompt gives"


def test_a_negative_prompt_and_an_image_prefix_go_with_a_caption(text_prior):
    prior, layout, text, _ = text_prior
    prefix = torch.randint(0, 25, (1, 4))
    prompts = build_prompts(layout, texts=MIXED[:2], text=text, prefix=prefix)
    negative = text.prompts(["a green square at the bottom"] * 2)
    for sampler in ("generate", "static"):
        sampling = SamplingConfig(sampler=sampler, temperature=0, cfg_scale=2.0)
        codes = generate_ids(prior, layout, prompts, sampling, negative=negative)
        assert torch.equal(codes.flatten(1)[:, :4], prefix.expand(2, -1))
        if sampler == "generate":
            reference = codes
    assert torch.equal(codes, reference)
    empty = generate_ids(prior, layout, prompts, SamplingConfig(temperature=0, cfg_scale=2.0))
    assert not torch.equal(empty, reference), "the negative prompt changed nothing"


def test_a_next_scale_text_prior_gives_each_prompt_the_same_image_in_any_batch():
    base = VocabLayout.create(codebook_size=25, tokens_per_image=21, scales=[1, 2, 4])
    prior, layout, text = make_text_prior(base)
    sampling = SamplingConfig(temperature=0, cfg_scale=2.0)
    together = generate_ids(prior, layout, build_prompts(layout, texts=MIXED, text=text), sampling)
    assert together.shape == (4, 21)
    alone = [generate_ids(prior, layout, build_prompts(layout, texts=[t], text=text), sampling) for t in MIXED]
    assert torch.equal(torch.cat(alone), together)


# -- training -------------------------------------------------------------------------------------


def test_captions_are_dropped_to_the_empty_one_at_the_set_rate(text_prior):
    _, layout, text, _ = text_prior
    prompts = text.prompts(MIXED[:2] * 5000)
    batch = {"tokens": torch.randint(0, 25, (10_000, 16)), "text": prompts}
    torch.manual_seed(0)
    sequences = training_sequences(layout, batch, 0.0, caption_dropout=0.2)
    caption = sequences[:, : prompts.shape[1] - 1]
    dropped = (caption == layout.ids.pad).all(1).float().mean().item()
    assert abs(dropped - 0.2) < 0.015  # 10,000 draws: 4 standard deviations
    assert (sequences[:, prompts.shape[1] - 1] == layout.ids.boi).all()
    assert torch.equal(training_sequences(layout, batch, 0.0, caption_dropout=0.0)[:, : prompts.shape[1]], prompts)


def test_a_language_model_starts_a_text_prior_with_its_rows_moved_to_the_text_range(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = train_bpe(CAPTIONS, vocab_size=300)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path / "lm")
    original = LlamaForCausalLM.from_pretrained(tmp_path / "lm").get_input_embeddings().weight
    model, text, layout = from_language_model(str(tmp_path / "lm"), BASE, max_text_tokens=10)
    ids = layout.ids
    assert ids.first_text >= ids.image_vocab_size and model.config.vocab_size == ids.vocab_size
    moved = model.get_input_embeddings().weight[ids.first_text : ids.first_text + 300]
    assert torch.equal(moved, original)
    caption = "two red squares at the top"
    assert text.encode([caption])[0][:-1] == [i + ids.first_text for i in raw.encode(caption).ids]
    codes = generate_ids(model.eval(), layout, build_prompts(layout, texts=[caption], text=text), SamplingConfig())
    assert codes.shape == (1, 4, 4) and codes.max() < 25


def test_a_captioned_folder_trains_a_text_prior_that_vqar_generate_prompts(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, scene in enumerate(all_scenes()[:32]):
        render_name = f"{i:03d}.png"
        shapes_image = shapes_dataset(32, seed=5)[i]["image"]
        shapes_image.save(images / render_name)
        caption = scene.caption(np.random.default_rng(i)) + (" and then" * 40 if i % 4 == 0 else "")
        rows.append({"file_name": render_name, "caption": caption})  # every fourth one over the 64-token limit
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    VQTokenizer(TokenizerConfig(**{**TINY_F2, "resolution": 16})).save_pretrained(tmp_path / "tokenizer")
    said = vqar("tokenize", "--tokenizer", tmp_path / "tokenizer", "--data", images, "--output", tmp_path / "tokens")
    assert "32 captions" in said
    vqar("train-prior", "--tokens", tmp_path / "tokens", "--size", "tiny", "--max_steps", 2, "--batch_size", 8,
         "--log_with", "none", "--eval_every", 0, "--eval_samples", 0, "--output_dir", tmp_path / "run")  # fmt: skip
    prior_folder = tmp_path / "run" / "prior"
    assert (prior_folder / "tokenizer.json").is_file()
    _, layout = load_prior(str(prior_folder))
    assert layout.ids.uses_text and layout.ids.num_classes == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    long_ones = sum(" and then" in c for c in TokenRows(load_tokens(tmp_path / "tokens")[0]["train"]).caption_list())
    assert metrics["captions_cut"] == long_ones >= 1 and metrics["captions_with_bad_bytes"] == 0
    out = tmp_path / "samples"
    (tmp_path / "prompts.txt").write_text("a red circle on the left\n\ntwo blue squares at the top\n")
    vqar("generate", "--prior", prior_folder, "--prompts", tmp_path / "prompts.txt", "--prompt", "a white square",
         "--num_images", 2, "--cfg_scale", 2, "--negative_prompt", "a green circle", "--output", out)  # fmt: skip
    assert np.load(out / "codes.npy").shape == (6, 8, 8) and (out / "grid.png").is_file()
    said = vqar("generate", "--prior", prior_folder, "--class", "3", "--output", out, expect=1)
    assert "takes text prompts (--prompt), not classes" in said and "Traceback" not in said


# -- bad input ------------------------------------------------------------------------------------


def test_prompts_and_classes_are_refused_by_priors_that_take_the_other(tmp_path, text_prior):
    _, layout, text, folder = text_prior
    classes = VocabLayout.create(codebook_size=25, tokens_per_image=16, grid=[4, 4], class_names=list("ab"))
    with pytest.raises(ValueError, match=r"not text-conditional: it takes class names or indices \(a, b\)"):
        build_prompts(classes, texts=["a red circle"])
    with pytest.raises(ValueError, match="text-conditional: it takes text prompts"):
        build_prompts(layout, classes=[0], text=text)
    build_prior(classes, size="tiny").save_pretrained(tmp_path / "class-prior")
    said = vqar("generate", "--prior", tmp_path / "class-prior", "--prompt", "a red circle", "--codes_only",
                "--output", tmp_path / "out", expect=1)  # fmt: skip
    assert "takes classes (--class: a, b), not text prompts" in said and "Traceback" not in said
    said = vqar("generate", "--prior", folder, "--prompt", "a red circle", "--negative_prompt", "blue", "--codes_only",
                "--output", tmp_path / "out", expect=1)  # fmt: skip
    assert "give --cfg-scale above 1" in said


def test_long_captions_bad_bytes_and_emoji_are_tokenized_and_counted_never_refused(text_prior, caplog):
    _, layout, _, folder = text_prior
    text = load_text_tokenizer(folder, layout)
    with caplog.at_level(logging.WARNING, logger="vqar.text"):
        prompts = text.prompts(["red " * 100, "blue " * 100, b"red \xe9", "🙂 square", "\udcff"])
    assert prompts.shape[1] == text.text_length + 1 and (prompts[:, -1] == layout.ids.boi).all()
    assert text.truncated == 2 and text.replaced == 2
    assert sum("cut to" in r.message for r in caplog.records) == 1  # said once, counted always
    emoji = prompts[3][prompts[3] != layout.ids.pad][:-1]
    assert len(emoji) > 3 and (emoji >= layout.ids.first_text).all()  # byte-level: a token for every byte


def test_metadata_with_empty_captions_and_bytes_that_are_not_utf8_is_read(tmp_path, caplog):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    lines = [b'{"file_name": "0.png", "text": "caf\xe9"}', b'{"file_name": "1.png", "text": ""}',
             b'{"file_name": "2.png", "text": "plain"}']  # fmt: skip
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="vqar.data"):
        source = load_source(str(tmp_path))
    assert source["caption"] == ["caf\ufffd", "", "plain"]
    assert "1 byte sequence(s) that are not UTF-8" in caplog.text
    assert describe_source(source, "folder").endswith("2 captions")


def _shard(path, examples):
    with tarfile.open(path, "w") as tar:
        for name, data in examples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_webdataset_shards_give_images_labels_and_captions_in_order_streamed_or_not(tmp_path):
    for shard in range(3):
        examples = []
        for i in range(4):
            key = f"s{shard}/{i:04d}"
            examples += [(f"{key}.png", _png(10 * i)), (f"{key}.cls", str((shard + i) % 3).encode())]
            examples += [(f"{key}.txt", b"caf\xe9" if i == 1 else f"shard {shard} image {i}".encode())]
        _shard(tmp_path / f"train-{shard:06d}.tar", examples)
    source = load_source(str(tmp_path / "train-{000000..000002}.tar"))
    assert len(source) == 12 and source.features["label"].num_classes == 3
    assert source["label"][:4] == [0, 1, 2, 0] and source["caption"][:2] == ["shard 0 image 0", "caf\ufffd"]
    assert source[5]["image"]["path"].endswith("train-000001.tar:s1/0001.png")
    stream = load_source(str(tmp_path / "train-*.tar"), streaming=True)
    assert stream.n_shards == 3  # one per file: split across processes and workers
    assert [row["caption"] for row in stream] == source["caption"]
    with pytest.raises(FileNotFoundError, match="no tar shards match"):
        load_source(str(tmp_path / "missing-{000..002}.tar"))


# -- shapes and prompt following ----------------------------------------------------------------


def test_shapes_are_deterministic_from_the_seed_and_hold_out_their_combinations():
    first, again = shapes_dataset(60, seed=3), shapes_dataset.__wrapped__(60, seed=3)
    assert first["caption"] == again["caption"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first["image"], again["image"]))
    assert first["caption"] != shapes_dataset.__wrapped__(60, seed=4)["caption"]
    assert not {(c, s) for c, s in zip(first["colour"], first["shape"])} & HELD_OUT
    assert len(set(first["caption"])) > 40  # varied phrasings
    held = shapes_dataset.__wrapped__(12, seed=3, held_out=True)
    assert {(c, s) for c, s in zip(held["colour"], held["shape"])} <= HELD_OUT


def test_the_detector_reads_real_images_almost_always_and_blank_ones_as_nothing():
    ceiling = detector_ceiling(all_scenes() * 3, seed=1)
    assert min(ceiling[a] for a in ATTRIBUTES) >= 0.95, ceiling
    assert detect(torch.full((1, 3, 32, 32), -0.8))[0] == dict.fromkeys(ATTRIBUTES)
    scene = Scene("red", "square", "left", 1)
    assert detect(torch.zeros(1, 3, 32, 32) - 1)[0]["colour"] is None and scene.canonical_prompt() == (
        "a red square on the left"
    )


def test_prompt_following_scores_every_scale_and_group_beside_the_ceiling_and_chance(text_prior):
    prior, layout, text, _ = text_prior
    tokenizer = VQTokenizer(TokenizerConfig(**{**TINY_F2, "resolution": 8})).eval()  # [4, 4] codes -> 8 px
    rows = prompt_following(prior, tokenizer, layout, text, num_images=4, cfg_scales=(0.0, 2.0), batch_size=3)
    assert [(r["combinations"], r["cfg_scale"]) for r in rows] == [
        ("seen", 0.0), ("seen", 2.0), ("seen", None), ("held-out", 0.0), ("held-out", 2.0), ("held-out", None),
        ("any", None),
    ]  # fmt: skip
    assert all(0 <= r[a] <= 1 for r in rows for a in (*ATTRIBUTES, "all"))
    assert rows[-1]["colour"] == pytest.approx(1 / 6)


def test_the_text_prior_cards_plain_transformers_lines_run_as_written_without_vqar(text_prior, tmp_path):
    import re

    from vqar.hub import prior_card, stage

    _, _, _, folder = text_prior
    staged = tmp_path / "staged"
    config = json.loads((folder / "config.json").read_text())
    card = prior_card(str(staged), "me/shapes", config, {"bits_per_image": 80.0})
    stage(folder, card, staged)
    assert {p.name for p in staged.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "vqar_text.json"}
    assert "text-to-image" in card.split("---")[1]
    plain = re.findall(r"```python\n(.*?)```", card, re.S)[0]
    assert plain.count("\n") == 5  # the import and four lines
    printed = run_without_vqar(plain + "\nprint(list(codes.shape), int(codes.max()), 'vqar' in sys.modules)").split()
    assert printed[:2] == ["[1,", "16]"] and int(printed[2]) < 25
    assert printed[3] == "False"


def test_evaluate_generation_draws_a_text_priors_images_from_a_prompts_file(text_prior, tmp_path):
    _, _, _, folder = text_prior
    VQTokenizer(TokenizerConfig(**{**TINY_F2, "resolution": 8})).save_pretrained(tmp_path / "tokenizer")
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 4))
    program = torch.export.export(net, (torch.zeros(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, str(tmp_path / "features.pt2"))
    (tmp_path / "prompts.txt").write_text("a red circle on the left\n\ntwo blue squares at the top\n")
    command = ["evaluate-generation", "--prior", folder, "--tokenizer", tmp_path / "tokenizer", "--reference", "shapes",
               "--reference_images", 40, "--features", tmp_path / "features.pt2", "--num_images", 6, "--batch_size", 4,
               "--cfg_scales", "1,2", "--output", tmp_path / "out"]  # fmt: skip
    vqar(*command, "--prompts", tmp_path / "prompts.txt")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["cfg_scale"] for r in report["rows"]] == [1.0, 2.0] and all(r["num_images"] == 6 for r in report["rows"])
    said = vqar(*command, expect=1)
    assert "takes text prompts: give --prompts FILE" in said
