"""Published tokenizers: checkpoints in each project's own format (built here from the key names
and shapes those projects write; no anchor code, no network) convert into vqar folders that load,
encode and decode; the published sizes give their presets; bad checkpoints are refused by name.
Numerical parity with the original code is benchmarks/convert_parity.py's."""

import json

import pytest
import torch

from vqar import TokenizerConfig, VQTokenizer
from vqar.convert import ConvertArgs, convert, infer_config, read_state_dict

PUBLISHED = {  # preset: (source, architecture of the checkpoint's generator below)
    "taming-vqgan-f16-1024": (
        "taming",
        dict(ch=128, mult=(1, 1, 2, 2, 4), blocks=2, attn=(4,), z=256, dim=256, K=1024),
    ),
    "taming-vqgan-f16-16384": (
        "taming",
        dict(ch=128, mult=(1, 1, 2, 2, 4), blocks=2, attn=(4,), z=256, dim=256, K=16384),
    ),
    "llamagen-vq16": ("llamagen", dict(ch=128, mult=(1, 1, 2, 2, 4), blocks=2, attn=(4,), z=256, dim=8, K=16384)),
    "llamagen-vq8": ("llamagen", dict(ch=128, mult=(1, 2, 2, 4), blocks=2, attn=(3,), z=256, dim=8, K=16384)),
    "open-magvit2-256-2p18": ("open-magvit2", dict(ch=128, mult=(1, 1, 2, 2, 4), blocks=4, z=18)),
    "ibq-256-2p14": ("ibq", dict(ch=128, mult=(1, 1, 2, 2, 4), blocks=4, attn=(4,), z=256, dim=256, K=16384)),
    "ibq-256-2p18": ("ibq", dict(ch=128, mult=(1, 1, 2, 2, 4), blocks=4, attn=(4,), z=256, dim=256, K=262144)),
}


class Tensors:
    """Builds a state dict in another project's naming: random tensors, or only shapes (`shapes_only`)."""

    def __init__(self, shapes_only: bool = False):
        self.state, self.shapes_only = {}, shapes_only

    def add(self, name: str, *shape: int) -> None:
        self.state[name] = torch.zeros(1).expand(*shape) if self.shapes_only else torch.randn(*shape) * 0.1

    def conv(self, name: str, out: int, inp: int, k: int, bias: bool = True) -> None:
        self.add(f"{name}.weight", out, inp, k, k)
        if bias:
            self.add(f"{name}.bias", out)

    def norm(self, name: str, c: int) -> None:
        self.add(f"{name}.weight", c)
        self.add(f"{name}.bias", c)

    def resnet(self, name: str, inp: int, out: int, bias: bool = True) -> None:
        self.norm(f"{name}.norm1", inp)
        self.conv(f"{name}.conv1", out, inp, 3, bias)
        self.norm(f"{name}.norm2", out)
        self.conv(f"{name}.conv2", out, out, 3, bias)
        if inp != out:
            self.conv(f"{name}.nin_shortcut", out, inp, 1, bias)

    def attention(self, name: str, c: int) -> None:
        self.norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            self.conv(f"{name}.{part}", c, c, 1)


def taming_style(source: str, ch, mult, blocks, attn, z, dim, K, shapes_only=False) -> dict:
    """A taming-transformers / IBQ (Lightning `state_dict`) or LlamaGen (`model`) checkpoint."""
    t, L, llamagen = Tensors(shapes_only), len(mult), source == "llamagen"
    widths = [ch * m for m in mult]
    t.conv("encoder.conv_in", ch, 3, 3)
    block_in = ch
    for i, w in enumerate(widths):
        for j in range(blocks):
            t.resnet(f"encoder.conv_blocks.{i}.res.{j}" if llamagen else f"encoder.down.{i}.block.{j}", block_in, w)
            block_in = w
            if i in attn:
                t.attention(f"encoder.conv_blocks.{i}.attn.{j}" if llamagen else f"encoder.down.{i}.attn.{j}", w)
        if i < L - 1:
            t.conv(
                f"encoder.conv_blocks.{i}.downsample.conv" if llamagen else f"encoder.down.{i}.downsample.conv", w, w, 3
            )
    mid = ("mid.0", "mid.1", "mid.2") if llamagen else ("mid.block_1", "mid.attn_1", "mid.block_2")
    for part, c in (("encoder", widths[-1]), ("decoder", widths[-1])):
        t.resnet(f"{part}.{mid[0]}", c, c)
        t.attention(f"{part}.{mid[1]}", c)
        t.resnet(f"{part}.{mid[2]}", c, c)
    t.norm("encoder.norm_out", widths[-1])
    t.conv("encoder.conv_out", z, widths[-1], 3)
    t.conv("decoder.conv_in", widths[-1], z, 3)
    block_in = widths[-1]
    for n, i in enumerate(reversed(range(L))):  # LlamaGen numbers decoder levels as it runs them
        prefix = f"decoder.conv_blocks.{n}" if llamagen else f"decoder.up.{i}"
        for j in range(blocks + 1):
            t.resnet(f"{prefix}.{'res' if llamagen else 'block'}.{j}", block_in, widths[i])
            block_in = widths[i]
            if i in attn:
                t.attention(f"{prefix}.attn.{j}", widths[i])
        if i > 0:
            t.conv(f"{prefix}.upsample.conv", widths[i], widths[i], 3)
    t.norm("decoder.norm_out", widths[0])
    t.conv("decoder.conv_out", 3, widths[0], 3)
    t.conv("quant_conv", dim, z, 1)
    t.conv("post_quant_conv", z, dim, 1)
    t.add("quantize.embedding.weight", K, dim)
    if llamagen:
        t.add("quantize.codebook_used", 65536)
        return {"model": t.state, "steps": 1000}
    t.add("loss.discriminator.main.0.weight", 64, 3, 4, 4)  # the GAN and LPIPS travel along in Lightning files
    t.add("loss.perceptual_loss.lin0.model.1.weight", 1, 64, 1, 1)
    return {"state_dict": t.state, "global_step": 1000}


def magvit2(ch, mult, blocks, z, shapes_only=False, ema=True) -> dict:
    """An Open-MAGVIT2 Lightning checkpoint, with LitEma's shadow weights beside the trained ones."""
    t, L = Tensors(shapes_only), len(mult)
    widths = [ch * m for m in mult]
    t.conv("encoder.conv_in", ch, 3, 3, bias=False)
    block_in = ch
    for i, w in enumerate(widths):
        for j in range(blocks):
            t.resnet(f"encoder.down.{i}.block.{j}", block_in, w, bias=False)
            block_in = w
        if i < L - 1:
            t.conv(f"encoder.down.{i}.downsample", w, w, 3)
    for part in ("encoder", "decoder"):
        for j in range(blocks):
            t.resnet(f"{part}.mid_block.{j}", widths[-1], widths[-1], bias=False)
    t.norm("encoder.norm_out", widths[-1])
    t.conv("encoder.conv_out", z, widths[-1], 1)
    t.conv("decoder.conv_in", widths[-1], z, 3)
    block_in = widths[-1]
    for i in reversed(range(L)):
        t.add(f"decoder.adaptive.{i}.gamma.weight", block_in, z)
        t.add(f"decoder.adaptive.{i}.gamma.bias", block_in)
        t.add(f"decoder.adaptive.{i}.beta.weight", block_in, z)
        t.add(f"decoder.adaptive.{i}.beta.bias", block_in)
        for j in range(blocks):
            t.resnet(f"decoder.up.{i}.block.{j}", block_in, widths[i], bias=False)
            block_in = widths[i]
        if i > 0:
            t.conv(f"decoder.up.{i}.upsample.conv1", 4 * widths[i], widths[i], 3)
    t.norm("decoder.norm_out", widths[0])
    t.conv("decoder.conv_out", 3, widths[0], 3)
    if ema and not shapes_only:
        for name, value in list(t.state.items()):
            t.state[f"model_ema.{name.replace('.', '')}"] = value + 1.0  # other weights: the ones to convert
        t.state["model_ema.num_updates"] = torch.tensor(1000)
    t.add("loss.discriminator.main.0.weight", 64, 3, 4, 4)
    return {"state_dict": t.state}


TINY = dict(ch=32, mult=(1, 2), blocks=1, attn=(1,), z=8, dim=4, K=16)


def tiny_checkpoint(source: str, path):
    checkpoint = magvit2(32, (1, 2), 1, z=6) if source == "open-magvit2" else taming_style(source, **TINY)
    torch.save(checkpoint, path)
    return checkpoint


def fields(config: TokenizerConfig) -> dict:
    return {name: getattr(config, name) for name in TokenizerConfig.__annotations__}


# -- what a conversion gives ----------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_a_published_architecture_converts_to_its_preset(preset):
    source, shape = PUBLISHED[preset]
    checkpoint = (
        magvit2(**shape, shapes_only=True)
        if source == "open-magvit2"
        else taming_style(source, **shape, shapes_only=True)
    )
    state = next(iter(v for k, v in checkpoint.items() if k in ("state_dict", "model")))
    state = {k: v for k, v in state.items() if not k.startswith(("loss.", "quantize.codebook_used"))}
    assert fields(infer_config(source, state)) == fields(VQTokenizer.from_preset(preset).config)


@pytest.mark.parametrize("source", ["taming", "llamagen", "open-magvit2", "ibq"])
def test_a_checkpoint_converts_into_a_folder_that_loads_encodes_and_decodes(source, tmp_path):
    checkpoint = tiny_checkpoint(source, tmp_path / "original.ckpt")
    folder = convert(
        ConvertArgs(
            source=source, checkpoint=str(tmp_path / "original.ckpt"), output=str(tmp_path / "out"), resolution=32
        )
    )
    tokenizer = VQTokenizer.from_pretrained(folder).eval()  # plain from_pretrained: nothing of the converter
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    indices = tokenizer.encode(images)
    assert indices.shape == (2, 16, 16)  # f2 at 32 px
    assert tokenizer.decode(indices).shape == (2, 3, 32, 32)
    state = next(v for k, v in checkpoint.items() if k in ("state_dict", "model"))
    ours = tokenizer.state_dict()
    provenance = json.loads((folder / "vqar_provenance.json").read_text())
    assert source in provenance["source"] and "original.ckpt" in provenance["source"]
    if source == "open-magvit2":  # the EMA weights, not the trained ones
        assert torch.equal(ours["decoder.conv_out.weight"], state["model_ema.decoderconv_outweight"])
        assert provenance["ema_weights"] and tokenizer.codebook_size == 2**6
    else:
        assert torch.equal(ours["decoder.conv_out.weight"], state["decoder.conv_out.weight"])
        theirs = "encoder.conv_blocks.1.attn.0" if source == "llamagen" else "encoder.down.1.attn.0"
        qkv = torch.cat([state[f"{theirs}.{p}.weight"] for p in "qkv"])
        assert torch.equal(ours["encoder.levels.1.1.qkv.weight"], qkv)  # separate q, k, v convs: one qkv conv
        assert torch.equal(ours["quantizer.inner.codebook"], state["quantize.embedding.weight"])
        assert tokenizer.codebook_size == 16
    assert provenance["dropped_training_tensors"] == (1 if source in ("llamagen", "open-magvit2") else 2)


def test_a_converted_llamagen_tokenizer_runs_through_every_command(tmp_path):
    from test_own_data import vqar

    torch.set_num_threads(1)
    tiny_checkpoint("llamagen", tmp_path / "vq_ds16_c2i.pt")
    vqar(
        "convert",
        "--from",
        "llamagen",
        "--checkpoint",
        tmp_path / "vq_ds16_c2i.pt",
        "--output",
        tmp_path / "tok",
        "--resolution",
        16,
    )
    vqar("tokenize", "--tokenizer", tmp_path / "tok", "--data", "digits", "--output", tmp_path / "tokens")
    vqar("train-bpe", "--tokens", tmp_path / "tokens", "--vocab-size", 20, "--output", tmp_path / "tok")
    vqar(
        "train-ar",
        "--tokens",
        tmp_path / "tokens",
        "--output_dir",
        tmp_path / "prior",
        "--max_steps",
        2,
        "--batch_size",
        8,
        "--size",
        "tiny",
        "--eval_samples",
        2,
    )
    out, _ = vqar("generate", "--prior", tmp_path / "prior" / "prior", "--class", 3, "--output", tmp_path / "gen")
    assert "wrote 1 images" in out
    vqar("evaluate", "--tokenizer", tmp_path / "tok", "--data", "digits", "--output", tmp_path / "report")
    vqar(
        "push",
        "--tokenizer",
        tmp_path / "tok",
        "--report",
        tmp_path / "report",
        "--prior",
        tmp_path / "prior" / "prior",
        "--dry-run",
        "--output",
        tmp_path / "push",
    )
    card = (tmp_path / "push" / "tokenizer" / "README.md").read_text()
    assert "Converted from `llamagen checkpoint vq_ds16_c2i.pt" in card


# -- checkpoints that are refused ------------------------------------------------------------


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_is_refused_naming_its_types_and_runs_nothing(tmp_path):
    checkpoint = taming_style("taming", **TINY)
    checkpoint["hyper_parameters"] = RunsCode(tmp_path / "pwned")
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(
        ValueError, match=r"needs arbitrary Python objects to load \((builtins|io)\.open\).*--trust-pickle"
    ):
        read_state_dict(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned").exists()


def test_trust_pickle_is_the_way_past(tmp_path):
    import datetime

    checkpoint = taming_style("taming", **TINY)
    checkpoint["saved"] = datetime.date(2024, 1, 1)  # harmless, but not a plain tensor or number
    torch.save(checkpoint, tmp_path / "dated.ckpt")
    with pytest.raises(ValueError, match="datetime.date"):
        read_state_dict(tmp_path / "dated.ckpt")
    assert "quant_conv.weight" in read_state_dict(tmp_path / "dated.ckpt", trust_pickle=True)


@pytest.mark.parametrize("trust", [False, True])
def test_a_file_that_is_no_checkpoint_says_what_it_is_not_and_never_asks_for_trust(tmp_path, trust):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x13\x37" + bytes(range(200)))
    with pytest.raises(ValueError, match="not a torch checkpoint: neither a zip archive .* nor a pickle") as error:
        read_state_dict(garbage, trust_pickle=trust)
    assert "trust-pickle" not in str(error.value)
    pickled = tmp_path / "broken-pickle.pt"
    pickled.write_bytes(b"\x80\x04" + bytes(range(100)))  # a pickle header, then nonsense
    with pytest.raises(ValueError) as error:
        read_state_dict(pickled, trust_pickle=trust)
    assert ("trust-pickle" in str(error.value)) != trust  # asked for only when it could help


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated", "damaged or truncated zip archive"),
        ("missing", r"lacks 1 tensor\(s\) this architecture needs: \['decoder.conv_out.bias'\]"),
        (
            "misshaped",
            r"tensor decoder.up.0.block.0.conv1.weight has shape \[32, 64, 1, 1\]; .* needs \[32, 64, 3, 3\]",
        ),
        ("unexpected", r"has 1 tensor\(s\) vqar does not know: \['decoder.extra.weight'\]"),
    ],
)
def test_a_bad_checkpoint_is_refused_by_name(damage, message, tmp_path):
    path = tmp_path / "original.ckpt"
    checkpoint = tiny_checkpoint("taming", path)
    state = checkpoint["state_dict"]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        if damage == "missing":
            del state["decoder.conv_out.bias"]
        elif damage == "misshaped":
            state["decoder.up.0.block.0.conv1.weight"] = torch.zeros(32, 64, 1, 1)
        else:
            state["decoder.extra.weight"] = torch.zeros(3)
        torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=message):
        convert(ConvertArgs(source="taming", checkpoint=str(path), output=str(tmp_path / "out"), resolution=32))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_checkpoint_of_another_project_is_named(tmp_path):
    tiny_checkpoint("open-magvit2", tmp_path / "magvit2.ckpt")
    with pytest.raises(
        ValueError, match=r"not a taming tokenizer checkpoint: it lacks \['quantize.embedding.weight'\]"
    ):
        convert(ConvertArgs(source="taming", checkpoint=str(tmp_path / "magvit2.ckpt"), output=str(tmp_path / "o")))


def test_vqars_own_quantizers_invert_exactly_and_train(tmp_path):
    from vqar.quantizers import build_quantizer

    for options, dim in [
        (dict(kind="vq", implementation="vqar", codebook_size=300, code_dim=4, use_cosine=True), 8),
        (dict(kind="ibq", codebook_size=300, code_dim=8, project=True), 8),
        (dict(kind="lfq", implementation="vqar", codebook_size=2**10), 10),
    ]:
        quantizer = build_quantizer(options, dim=dim)
        latents = torch.randn(2, 20, dim, requires_grad=True)
        out = quantizer.eval()(latents)
        assert torch.equal(quantizer.indices_to_codes(out.indices), out.quantized)  # indices -> codes -> same
        quantizer.train()(latents).loss.backward()
        assert latents.grad is not None and torch.isfinite(latents.grad).all()
