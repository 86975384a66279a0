"""Publishing to the Hugging Face Hub: the upload folders, their model cards, and the push.

A tokenizer's folder holds exactly what `from_pretrained` reads (config.json, model.safetensors,
visual_bpe.json when present) plus a README.md model card generated from a `vqar evaluate`
report: metadata (library `vqar`, pipeline tag, tags, license, data set, base model, the metrics
as model-index results), the report table, the sample grid and a loading snippet. A prior's
folder is the same with its own card — samples, class names, the ids a plain `transformers` user
needs and a snippet that generates without vqar — and a config that names its tokenizer by the
Hub id it is pushed beside. `dry_run` writes the folders and uploads nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers.hf_argparser import HfArg

from .evaluation import format_table
from .layouts import NEXT_SCALE, TokenLayout

WEIGHT_FILES = ("config.json", "model.safetensors", "generation_config.json", "visual_bpe.json")
TEXT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vqar_text.json")
CARD_METRICS = ("psnr", "ssim", "lpips", "rfid", "bits_per_image", "codebook_usage", "prior_bits_per_image")
PROVENANCE = "vqar_provenance.json"  # in a tokenizer folder: {"base_model": Hub id fine-tuned from, "source": ...}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class PushArgs:
    """Upload a tokenizer (and its prior) to the Hub with model cards, or only write the folders."""

    tokenizer: str = HfArg(help="a tokenizer folder (written by save_pretrained)")
    report: str = HfArg(help="a `vqar evaluate` output folder: the card's figures and samples")
    repo_id: str | None = HfArg(default=None, help="the Hub repo to create or update, e.g. me/photos-fsq")
    prior: str | None = HfArg(default=None, help="a prior folder: uploaded as REPO_ID-prior, naming the tokenizer")
    private: bool = HfArg(default=False, help="create the repos private")
    license: str | None = HfArg(default=None, help="the license the cards state (e.g. apache-2.0); none by default")
    dry_run: bool = HfArg(default=False, help="write the upload folders to --output and upload nothing")
    output: str = HfArg(default="outputs/push", help="where the upload folders are written")

    def __post_init__(self):
        if not self.dry_run and not self.repo_id:
            raise ValueError(
                "give --repo-id to upload (e.g. --repo-id me/my-tokenizer), or --dry-run to only write the folders"
            )


def is_hub_id(name: str | None) -> bool:
    """Whether a name is a Hub repo id ("owner/name") rather than a local path or a bundled source."""
    return bool(name) and HUB_ID.match(name) is not None and not Path(name).exists()


def _rounded(value: float) -> float:
    return float(f"{value:.4g}")


def _metadata(repo_id: str, pipeline_tag: str, tags: list[str], license: str | None, results: list, **extra):
    return ModelCardData(
        library_name="vqar",
        pipeline_tag=pipeline_tag,
        tags=tags,
        license=license,
        model_name=repo_id,
        eval_results=results or None,
        **extra,
    )


def tokenizer_card(
    repo_id: str, report: dict, config: dict, license: str | None = None, provenance: dict | None = None
) -> str:
    """README.md for a tokenizer repo, from a `vqar evaluate` report and the tokenizer's config."""
    kind, dataset, provenance = config["quantizer"]["kind"], report.get("data", ""), provenance or {}
    results = [
        EvalResult(
            task_type="image-to-image",
            task_name="image tokenization",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=name,
            metric_name=name,
            metric_value=_rounded(report[name]),
        )
        for name in CARD_METRICS
        if report.get(name) is not None
    ]
    base = provenance.get("base_model")
    data = _metadata(
        repo_id,
        "image-to-image",
        ["vqar", "image-tokenizer", kind, config.get("layout", "grid")],
        license,
        results,
        datasets=[dataset] if is_hub_id(dataset) else None,
        base_model=base if is_hub_id(base) else None,
    )
    layout = f"{report['tokens_per_image']} tokens ({config.get('layout', 'grid')} layout)"
    origin = f"\nConverted from `{provenance['source']}`.\n" if provenance.get("source") else ""
    body = f"""
# {repo_id}

A discrete image tokenizer for [vqar](https://github.com/vqar/vqar): {kind.upper()} bottleneck,
{layout} of {report["bits_per_image"] / report["tokens_per_image"]:.1f} bits each at {report["resolution"]} px.
{origin}
## Evaluation

{report["images"]} images of `{dataset}` at {report["resolution"]} px (`vqar evaluate`); JPEG and WebP at
the quality whose file size is closest to the tokenizer's rate.

{format_table(report)}

![originals, reconstructions, JPEG at the same rate](samples.png)

## Usage

```python
import torch
from vqar import VQTokenizer  # also registers it with transformers' AutoModel

tokenizer = VQTokenizer.from_pretrained("{repo_id}")
images = torch.rand(2, 3, {report["resolution"]}, {report["resolution"]}) * 2 - 1  # [B, 3, H, W] in [-1, 1]
indices = tokenizer.encode(images)
reconstructions = tokenizer.decode(indices)
```
"""
    return _card(data, body)


def prior_card(repo_id: str, tokenizer_repo: str, config: dict, metrics: dict, license: str | None = None) -> str:
    """README.md for a prior repo: a stock causal LM over the tokens of `tokenizer_repo`, usable
    with plain transformers (its config and generation_config say how)."""
    ids, layout = config["vqar_ids"], config["vqar_vocab"]
    tokens = TokenLayout.from_fields(layout["tokens_per_image"], layout.get("grid"), layout.get("scales"))
    results = [
        EvalResult(
            task_type="text-to-image"
            if ids.get("text")
            else "class-conditional-image-generation"
            if config["vqar_vocab"]["class_names"]
            else "unconditional-image-generation",
            dataset_type="tokens",
            dataset_name="held-out tokens",
            metric_type=name,
            metric_name=name,
            metric_value=_rounded(metrics[name]),
        )
        for name in ("bits_per_token", "bits_per_image")
        if metrics.get(name) is not None
    ]
    names = layout["class_names"]
    if ids.get("text"):
        return _text_prior_card(repo_id, tokenizer_repo, config, metrics, license, results, tokens)
    # the Hub has no class-conditional pipeline: only an unconditional prior takes that tag
    pipeline = None if names else "unconditional-image-generation"
    kind = "class-conditional-image-generation" if names else "unconditional-image-generation"
    tags = ["vqar", "image-generation", kind, "autoregressive", config.get("model_type", "llama")]
    data = _metadata(repo_id, pipeline, tags, license, results)
    condition = f'ids["classes"]["{names[0]}"]' if names else 'ids["null_class"]'
    classes = (
        f"Classes ({len(names)}), with their token ids: "
        + ", ".join(f"`{name}` = {ids['classes'][name]}" for name in names)
        if names
        else "Unconditional: the prompt is the null class, then begin-of-image."
    )
    bits = f"{metrics['bits_per_image']:.4g}" if metrics.get("bits_per_image") is not None else "n/a"
    decode = _decode_snippet(tokenizer_repo, tokens)
    bpe = (
        "\nIt models visual-BPE ids (`visual_bpe.json`): plain `generate` cannot keep each image to exactly one "
        "image's codes; sample with vqar.\n"
        if layout.get("num_bpe_tokens")
        else ""
    )
    if tokens.prior_order == NEXT_SCALE:
        bpe = (
            "\nIt predicts a whole scale per forward pass (next-scale prediction, VAR) under a block-causal "
            "attention mask: plain `generate` does not sample it; sample with vqar.\n"
        )
    body = f"""
# {repo_id}

An autoregressive prior over the tokens of the image tokenizer
[{tokenizer_repo}](https://huggingface.co/{tokenizer_repo}): {layout["tokens_per_image"]} codes per image
({tokens.describe()}) from a codebook of {layout["codebook_size"]}, trained with [vqar](https://github.com/vqar/vqar).
Held-out: {bits} bits per image.

![samples](samples.png)

{classes} Begin-of-image is {ids["boi"]}, the null class {ids["null_class"]}; a sequence is
`[condition, begin-of-image, codes]`.
{bpe}
## With plain transformers (no vqar needed)

```python
import torch, transformers
prior = transformers.AutoModelForCausalLM.from_pretrained("{repo_id}")
ids = prior.config.vqar_ids  # begin-of-image, the null class, one token per class by name
codes = prior.generate(torch.tensor([[{condition}, ids["boi"]]]))[:, 2:]  # generation_config: image codes only
```

{decode}

## With vqar

```python
from vqar.ar import load_prior
from vqar.generation import SamplingConfig, build_prompts, generate_images, load_tokenizer_for

prior, layout = load_prior("{repo_id}")
tokenizer = load_tokenizer_for("{repo_id}", layout)
images = generate_images(prior, tokenizer, layout, build_prompts(layout, num_images=4), SamplingConfig(seed=0))
```
"""
    return _card(data, body)


def _decode_snippet(tokenizer_repo: str, tokens: TokenLayout) -> str:
    """A prior card's lines that decode the generated codes [1, L] with the tokenizer (reshaped to a grid's rows)."""
    shape = tokens.shape
    reshape = f".reshape(1, {', '.join(map(str, shape))})" if len(shape) > 1 else ""
    return f"""The codes decode to pixels with the tokenizer (vqar's):

```python
from vqar import VQTokenizer
images = VQTokenizer.from_pretrained("{tokenizer_repo}").decode(codes{reshape})  # [1, 3, H, W] in [-1, 1]
```"""


def _card(data: ModelCardData, body: str) -> str:
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body).content


def _text_prior_card(repo_id, tokenizer_repo, config, metrics, license, results, tokens) -> str:
    """A text-to-image prior's card: the prompt through `AutoTokenizer`, the codes through `generate`."""
    layout = config["vqar_vocab"]
    tags = ["vqar", "image-generation", "text-to-image", "autoregressive", config.get("model_type", "llama")]
    data = _metadata(repo_id, None, tags, license, results)
    bits = f"{metrics['bits_per_image']:.4g}" if metrics.get("bits_per_image") is not None else "n/a"
    decode = _decode_snippet(tokenizer_repo, tokens)
    body = f"""
# {repo_id}

A text-to-image autoregressive prior over the tokens of the image tokenizer
[{tokenizer_repo}](https://huggingface.co/{tokenizer_repo}): {layout["tokens_per_image"]} codes per image
({tokens.describe()}) from a codebook of {layout["codebook_size"]}, trained with [vqar](https://github.com/vqar/vqar).
Held-out: {bits} bits per image. One vocabulary holds the text tokens and the image codes: a sequence is
`[caption's text ids, begin-of-image, codes]`, and the empty caption (begin-of-image alone) is the
unconditional prompt of classifier-free guidance.

![samples](samples.png)

## With plain transformers (no vqar needed)

```python
import transformers
tokenizer = transformers.AutoTokenizer.from_pretrained("{repo_id}")  # the prompt: text ids, then begin-of-image
prior = transformers.AutoModelForCausalLM.from_pretrained("{repo_id}")
inputs = tokenizer(["a red circle on the left"], return_tensors="pt", padding=True)
codes = prior.generate(**inputs, guidance_scale=3.0)[:, inputs["input_ids"].shape[1]:]  # image codes only
```

`generation_config` suppresses every id that is not an image code and sets the number of new tokens.
Guidance contrasts each prompt with its last id, begin-of-image: the empty caption. To steer away
from a caption instead, pass `negative_prompt_ids=tokenizer(["blurry"], return_tensors="pt")["input_ids"]`.
{decode}

## With vqar

```python
from vqar.ar import load_prior
from vqar.generation import SamplingConfig, generate_images, load_tokenizer_for
from vqar.text import load_text_tokenizer

prior, layout = load_prior("{repo_id}")
tokenizer, text = load_tokenizer_for("{repo_id}", layout), load_text_tokenizer("{repo_id}", layout)
images = generate_images(prior, tokenizer, layout, ["a red circle on the left"], SamplingConfig(cfg_scale=3), text=text)
```
"""
    return _card(data, body)


def stage(model_dir: str | Path, card: str, output: str | Path, extra: tuple[Path, ...] = ()) -> Path:
    """Write the exact folder that would be uploaded: model files, README.md, extra files."""
    model_dir, output = Path(model_dir), Path(output)
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir} holds no model.safetensors; give a folder written by save_pretrained")
    output.mkdir(parents=True, exist_ok=True)
    for name in WEIGHT_FILES + TEXT_TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, output / name)
    for path in extra:
        if path.is_file():
            shutil.copy2(path, output / path.name)
    (output / "README.md").write_text(card)
    return output


def upload(folder: Path, repo_id: str, private: bool) -> str:
    """Create the repo if needed and upload the folder; a clear error when the Hub is unreachable."""
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload with vqar push")
    except Exception as error:  # connection refused, DNS, offline mode, HTTP errors: all say the same to the user
        raise ConnectionError(
            f"could not upload to the Hub ({api.endpoint}) as {repo_id}: {type(error).__name__}: {error}. "
            "Check the network and `hf auth login`, or write the folder with --dry-run --output DIR"
        ) from error
    return str(getattr(info, "commit_url", info))


def _stage_prior(prior_dir: Path, repo_id: str, tokenizer_repo: str, license: str | None, folder: Path) -> Path:
    """The prior's upload folder: its card, its newest sample grid, and a config naming the tokenizer by Hub id."""
    config = json.loads((prior_dir / "config.json").read_text())
    config["vqar_vocab"]["tokenizer"] = tokenizer_repo  # pushed together: a local path means nothing on the Hub
    metrics_path = prior_dir.parent / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    samples = sorted((prior_dir.parent / "samples").glob("step-*.png"))
    staged = stage(prior_dir, prior_card(repo_id, tokenizer_repo, config, metrics, license), folder)
    (staged / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if samples:
        shutil.copy2(samples[-1], staged / "samples.png")
    return staged


def push(
    tokenizer_dir: str,
    repo_id: str | None,
    report_dir: str,
    private: bool = False,
    prior_dir: str | None = None,
    dry_run: bool = False,
    output: str | None = None,
    license: str | None = None,
) -> list[Path]:
    """Stage (and unless dry_run, upload) the tokenizer as `repo_id` and a prior as `repo_id`-prior."""
    report_path = Path(report_dir) / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found: run `vqar evaluate --output {report_dir}` first")
    if not (Path(tokenizer_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"{tokenizer_dir} holds no config.json; give a tokenizer folder written by save_pretrained"
        )
    repo_id = repo_id or f"YOUR-NAME/{Path(tokenizer_dir).resolve().parent.name or 'tokenizer'}"  # dry runs only
    report = json.loads(report_path.read_text())
    config = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    provenance_path = Path(tokenizer_dir) / PROVENANCE
    provenance = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    root = Path(output or "outputs/push")
    extras = (Path(report_dir) / "samples.png", report_path)
    card = tokenizer_card(repo_id, report, config, license, provenance)
    folders = [stage(tokenizer_dir, card, root / "tokenizer", extras)]
    if prior_dir:
        folders.append(_stage_prior(Path(prior_dir), f"{repo_id}-prior", repo_id, license, root / "prior"))
    if not dry_run:
        upload(folders[0], repo_id, private)
        if prior_dir:
            upload(folders[1], f"{repo_id}-prior", private)
    return folders


def push_from_args(args: PushArgs) -> list[Path]:
    """`vqar push`: `push` with the command's arguments."""
    return push(
        args.tokenizer, args.repo_id, args.report, args.private, args.prior, args.dry_run, args.output, args.license
    )
