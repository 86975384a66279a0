"""LlamaGen's class-conditional GPTs in vqar: a checkpoint in LlamaGen's key layout converts, gives the
logits of LlamaGen's forward (written out here from the published formulas, no anchor code), samples
with every sampler, and is refused with both sides named when it does not fit."""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_F2, run_without_vqar

from vqar import TokenizerConfig, VQTokenizer
from vqar.ar import load_prior
from vqar.convert import ConvertArgs, convert
from vqar.generation import SamplingConfig, build_prompts, generate_ids, generate_images
from vqar.llamagen import Rope2D

WIDTH, LAYERS, HEADS, CODES, CLASSES, GRID = 32, 2, 4, 25, 3, 8  # TINY_F2: 25 codes, f2 -> 8x8 at 16 px


def llamagen_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random GPT under LlamaGen's names and shapes (wqkv stacked, an extra class row for CFG)."""
    g = torch.Generator().manual_seed(seed)
    hidden = 4 * WIDTH * 2 // 3
    hidden = hidden + (-hidden) % 16
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    state = {
        "tok_embeddings.weight": rand(CODES, WIDTH),
        "cls_embedding.embedding_table.weight": rand(CLASSES + 1, WIDTH),
        "norm.weight": 1 + rand(WIDTH),
        "output.weight": rand(CODES, WIDTH),
    }
    for i in range(LAYERS):
        state |= {
            f"layers.{i}.attention.wqkv.weight": rand(3 * WIDTH, WIDTH),
            f"layers.{i}.attention.wo.weight": rand(WIDTH, WIDTH),
            f"layers.{i}.feed_forward.w1.weight": rand(hidden, WIDTH),
            f"layers.{i}.feed_forward.w3.weight": rand(hidden, WIDTH),
            f"layers.{i}.feed_forward.w2.weight": rand(WIDTH, hidden),
            f"layers.{i}.attention_norm.weight": 1 + rand(WIDTH),
            f"layers.{i}.ffn_norm.weight": 1 + rand(WIDTH),
        }
    return state


def freqs_cis_2d(grid: int, head_dim: int, base: float = 10000.0, cls: int = 1) -> torch.Tensor:
    """LlamaGen's `precompute_freqs_cis_2d`, from the paper's code as published: [cls + grid^2, d/2, 2]."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    freqs = torch.outer(torch.arange(grid), freqs)
    grid_freqs = torch.cat([freqs[:, None].expand(-1, grid, -1), freqs[None, :].expand(grid, -1, -1)], dim=-1)
    cache = torch.stack([grid_freqs.cos(), grid_freqs.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls, head_dim // 2, 2), cache])


def rotate_interleaved(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """LlamaGen's `apply_rotary_emb`: pairs (2k, 2k + 1) turned by freqs [S, d/2, 2]. x: [B, S, H, d]."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs[None, : x.shape[1], None]
    out = torch.stack(
        [pairs[..., 0] * f[..., 0] - pairs[..., 1] * f[..., 1], pairs[..., 1] * f[..., 0] + pairs[..., 0] * f[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


def llamagen_logits(state: dict, classes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """LlamaGen's Transformer.forward in eval mode, written out: [class, codes] -> logits [B, 1 + N, CODES]."""

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    h = torch.cat(
        [state["cls_embedding.embedding_table.weight"][classes][:, None], state["tok_embeddings.weight"][codes]], 1
    )
    B, S, _ = h.shape
    freqs, head_dim = freqs_cis_2d(GRID, WIDTH // HEADS)[:S], WIDTH // HEADS
    for i in range(LAYERS):
        x = rms(h, state[f"layers.{i}.attention_norm.weight"])
        q, k, v = (x @ state[f"layers.{i}.attention.wqkv.weight"].T).split(WIDTH, dim=-1)
        q, k, v = (t.view(B, S, HEADS, head_dim) for t in (q, k, v))
        q, k = rotate_interleaved(q, freqs), rotate_interleaved(k, freqs)
        attended = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        h = h + attended.transpose(1, 2).reshape(B, S, WIDTH) @ state[f"layers.{i}.attention.wo.weight"].T
        x = rms(h, state[f"layers.{i}.ffn_norm.weight"])
        gated = F.silu(x @ state[f"layers.{i}.feed_forward.w1.weight"].T) * (
            x @ state[f"layers.{i}.feed_forward.w3.weight"].T
        )
        h = h + gated @ state[f"layers.{i}.feed_forward.w2.weight"].T
    return rms(h, state["norm.weight"]) @ state["output.weight"].T


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamagen")
    VQTokenizer(TokenizerConfig(**TINY_F2)).save_pretrained(root / "tokenizer")
    state = llamagen_state()
    torch.save({"model": state, "steps": 100}, root / "c2i_T_16.pt")
    args = ConvertArgs(
        source="llamagen", checkpoint=str(root / "c2i_T_16.pt"), output=str(root / "prior"),
        tokenizer=str(root / "tokenizer"), image_size=16, heads=HEADS,
    )  # fmt: skip
    convert(args)
    return root, state


def test_the_2d_rope_is_the_published_formula_in_stock_llamas_half_layout():
    head_dim = WIDTH // HEADS
    config = type(
        "C", (), {"grid_size": GRID, "cls_token_num": 1, "hidden_size": WIDTH, "num_attention_heads": HEADS}
    )()
    config.rope_parameters = {"rope_theta": 10000.0}
    cos, sin = Rope2D(config)(torch.zeros(1), torch.arange(1 + GRID * GRID)[None])
    published = freqs_cis_2d(GRID, head_dim)  # [S, d/2, (cos, sin)]
    torch.testing.assert_close(cos[0, :, : head_dim // 2], published[..., 0])
    torch.testing.assert_close(sin[0, :, head_dim // 2 :], published[..., 1])
    assert (cos[0, 0] == 0).all() and (sin[0, 0] == 0).all()  # the class position: no rotation, q and k zeroed


def test_a_converted_gpt_gives_llamagens_logits(converted):
    root, state = converted
    prior, layout = load_prior(str(root / "prior"))
    assert type(prior).__name__ == "LlamaGenForCausalLM" and layout.codec.prompt_length == 1
    assert layout.ids.class_names == ("0", "1", "2") and layout.tokens.shape == (GRID, GRID)
    classes, codes = torch.tensor([0, 2]), torch.randint(0, CODES, (2, GRID * GRID - 1))
    expected = llamagen_logits(state, classes, codes)
    ids = torch.cat([layout.ids.class_token(classes)[:, None], codes], dim=1)
    with torch.no_grad():
        ours = prior(input_ids=ids).logits[..., :CODES]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    null = torch.full((1,), layout.ids.null_class)  # LlamaGen's extra class row is vqar's null class
    with torch.no_grad():
        unconditional = prior(input_ids=torch.cat([null[:, None], codes[:1]], 1)).logits[..., :CODES]
    torch.testing.assert_close(
        unconditional, llamagen_logits(state, torch.tensor([CLASSES]), codes[:1]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_every_sampler_draws_the_same_greedy_codes_from_a_converted_gpt(converted, cfg):
    root, _ = converted
    prior, layout = load_prior(str(root / "prior"))
    prompts = build_prompts(layout, classes=["0", "2"])
    codes = {
        sampler: generate_ids(prior, layout, prompts, SamplingConfig(temperature=0, cfg_scale=cfg, sampler=sampler))
        for sampler in ("static", "generate", "jacobi")
    }
    assert codes["static"].shape == (2, GRID, GRID)
    assert torch.equal(codes["static"], codes["generate"]) and torch.equal(codes["static"], codes["jacobi"])
    # greedy by hand: the argmax of the guided logits, token by token, without a cache
    sequence = layout.codec.prompt(layout.ids.class_token([0, 2]))
    for _ in range(GRID * GRID):
        unconditional = torch.cat([torch.full_like(sequence[:, :1], layout.ids.null_class), sequence[:, 1:]], 1)
        with torch.no_grad():
            logits = prior(input_ids=torch.cat([sequence, unconditional])).logits[:, -1, :CODES]
        cond, uncond = logits.chunk(2)
        guided = uncond + cfg * (cond - uncond) if cfg != 1 else cond
        sequence = torch.cat([sequence, guided.argmax(-1, keepdim=True)], 1)
    assert torch.equal(sequence[:, 1:].reshape(2, GRID, GRID), codes["static"])


def test_a_converted_gpt_decodes_through_its_tokenizer_and_completes_a_prefix(converted):
    root, _ = converted
    prior, layout = load_prior(str(root / "prior"))
    tokenizer = VQTokenizer.from_pretrained(root / "tokenizer")
    images = generate_images(prior, tokenizer, layout, build_prompts(layout, classes=["1"]), SamplingConfig(seed=0))
    assert images.shape == (1, 3, 16, 16)
    prefix = torch.randint(0, CODES, (1, 2, GRID))
    completed = generate_ids(prior, layout, build_prompts(layout, classes=["1"], prefix=prefix), SamplingConfig(seed=0))
    assert torch.equal(completed[:, :2], prefix)


def test_plain_transformers_loads_a_converted_gpt_with_its_own_code_and_no_vqar(converted):
    root, _ = converted
    code = textwrap.dedent(f"""
        import torch, transformers
        prior = transformers.AutoModelForCausalLM.from_pretrained({str(root / "prior")!r}, trust_remote_code=True)
        ids = prior.config.vqar_ids
        codes = prior.generate(torch.tensor([[ids["classes"]["1"]]]), do_sample=False)[:, 1:]
        print(codes.shape[1], int(codes.max()) < {CODES})
    """)
    assert run_without_vqar(code).split() == [str(GRID * GRID), "True"]


def test_bad_gpts_and_mismatched_tokenizers_are_refused_naming_both_sides(converted, tmp_path):
    root, state = converted
    base = dict(source="llamagen", output=str(tmp_path / "out"), tokenizer=str(root / "tokenizer"), heads=HEADS)
    path = tmp_path / "c2i.pt"
    torch.save({"model": state}, path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match="damaged or truncated"):
        convert(ConvertArgs(checkpoint=str(path), image_size=16, **base))
    foreign = {k: v for k, v in state.items() if not k.startswith("layers.1.feed_forward.w2")}
    torch.save({"model": foreign}, path)
    with pytest.raises(ValueError, match=r"not a whole LlamaGen GPT: it lacks \['layers.1.feed_forward.w2.weight'\]"):
        convert(ConvertArgs(checkpoint=str(path), image_size=16, **base))
    other_codes = VQTokenizer(TokenizerConfig(**{**TINY_F2, "quantizer": {"kind": "fsq", "levels": [4, 4]}}))
    other_codes.save_pretrained(tmp_path / "other")
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"models 25 codes, the tokenizer .*other has 16"):
        convert(ConvertArgs(checkpoint=str(path), image_size=16, **{**base, "tokenizer": str(tmp_path / "other")}))
    with pytest.raises(
        ValueError, match=r"models 12 x 12 codes \(24 px\), the tokenizer .* converted for 16 px \(8 x 8\)"
    ):
        convert(ConvertArgs(checkpoint=str(path), image_size=24, **base))


def test_a_converted_gpt_fine_tunes_on_new_tokens_with_their_classes_appended(converted, tmp_path):
    from vqar.training.encode_dataset import TokenizeArgs, tokenize_dataset
    from vqar.training.recipes import TrainConfig, parse_recipe
    from vqar.training.train_prior import PriorArgs, train_prior

    root, _ = converted
    tokens = tmp_path / "tokens"
    tokenize_dataset(TokenizeArgs(tokenizer=str(root / "tokenizer"), data="digits", output=str(tokens), num_workers=0))
    options = dict(tokens=tokens, init_from=root / "prior", output_dir=tmp_path / "tuned", max_steps=2, batch_size=8)
    options |= dict(log_with="none", eval_every=0, save_every=0, eval_samples=0)
    train_prior(*parse_recipe([f"--{k}={v}" for k, v in options.items()], (PriorArgs, TrainConfig)))

    prior, layout = load_prior(str(tmp_path / "tuned" / "prior"))
    _, base = load_prior(str(root / "prior"))
    assert layout.ids.num_classes == 10 and layout.ids.class_names[: base.ids.num_classes] == base.ids.class_names
    assert layout.begin_of_image == base.begin_of_image  # LlamaGen's sequences stay LlamaGen's
    prompts = build_prompts(layout, classes=["9", "0"])
    ids = generate_ids(prior, layout, prompts, SamplingConfig(seed=0, cfg_scale=4.0))
    assert ids.shape == (2, GRID, GRID) and int(ids.max()) < CODES
