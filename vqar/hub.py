"""Publishing to the Hugging Face Hub: the upload folder, its model card, and the push.

The folder holds exactly what `from_pretrained` reads (config.json, model.safetensors,
visual_bpe.json when present) plus a README.md model card generated from a `vqar evaluate`
report: metadata (library `vqar`, tags, data set, the metrics as model-index results), the
report table, the sample grid and a snippet that loads the model. `--dry-run` writes that folder
and uploads nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .evaluation import format_table

WEIGHT_FILES = ("config.json", "model.safetensors", "generation_config.json", "visual_bpe.json")
CARD_METRICS = ("psnr", "ssim", "lpips", "rfid", "bits_per_image", "codebook_usage", "prior_bits_per_image")


def tokenizer_card(repo_id: str, report: dict, config: dict) -> str:
    """README.md for a tokenizer repo, from a `vqar evaluate` report and the tokenizer's config."""
    kind = config["quantizer"]["kind"]
    dataset = report.get("data", "")
    results = [
        EvalResult(
            task_type="image-to-image",
            task_name="image tokenization",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=name,
            metric_name=name,
            metric_value=report[name],
        )
        for name in CARD_METRICS
        if report.get(name) is not None
    ]
    data = ModelCardData(
        library_name="vqar",
        tags=["vqar", "image-tokenizer", kind, config.get("layout", "grid")],
        datasets=[dataset] if "/" in dataset else None,
        model_name=repo_id,
        eval_results=results or None,
    )
    layout = f"{report['tokens_per_image']} tokens" + (" (1D)" if config.get("layout") == "1d" else " (grid)")
    body = f"""
# {repo_id}

A discrete image tokenizer trained with [vqar](https://github.com/vqar/vqar): {kind.upper()} bottleneck,
{layout} of {report["bits_per_image"] / report["tokens_per_image"]:.1f} bits each at {report["resolution"]} px.

## Evaluation

{report["images"]} images of `{dataset}` at {report["resolution"]} px (`vqar evaluate`); JPEG and WebP at
the quality whose file size is closest to the tokenizer's rate.

{format_table(report)}

![originals, reconstructions, JPEG at the same rate](samples.png)

## Usage

```python
from vqar import VQTokenizer  # also registers it with transformers' AutoModel

tokenizer = VQTokenizer.from_pretrained("{repo_id}")
indices = tokenizer.encode(images)   # images [B, 3, H, W] in [-1, 1]
images = tokenizer.decode(indices)
```
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body).content


def prior_card(repo_id: str, tokenizer_repo: str, metrics: dict) -> str:
    """README.md for a prior repo: a stock causal LM over the tokens of `tokenizer_repo`."""
    results = [
        EvalResult(
            task_type="unconditional-image-generation",
            dataset_type="tokens",
            dataset_name="held-out tokens",
            metric_type=name,
            metric_name=name,
            metric_value=metrics[name],
        )
        for name in ("bits_per_token", "bits_per_image")
        if metrics.get(name) is not None
    ]
    data = ModelCardData(
        library_name="vqar",
        tags=["vqar", "image-generation", "autoregressive"],
        base_model=tokenizer_repo,
        model_name=repo_id,
        eval_results=results or None,
    )
    body = f"""
# {repo_id}

An autoregressive prior over the tokens of [{tokenizer_repo}](https://huggingface.co/{tokenizer_repo}),
trained with [vqar](https://github.com/vqar/vqar). Held-out: {metrics.get("bits_per_image", float("nan")):.1f} bits per image.

```python
from vqar import VQTokenizer
from vqar.ar import load_prior
from vqar.generation import SamplingConfig, build_prompts, generate_images

prior, layout = load_prior("{repo_id}")
tokenizer = VQTokenizer.from_pretrained("{tokenizer_repo}")
images = generate_images(prior, tokenizer, layout, build_prompts(layout, num_images=4), SamplingConfig(seed=0))
```
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body).content


def stage(model_dir: str | Path, card: str, output: str | Path, extra: tuple[Path, ...] = ()) -> Path:
    """Write the exact folder that would be uploaded: model files, README.md, extra files."""
    model_dir, output = Path(model_dir), Path(output)
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir} holds no model.safetensors; give a folder written by save_pretrained")
    output.mkdir(parents=True, exist_ok=True)
    for name in WEIGHT_FILES:
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


def push(
    tokenizer_dir: str,
    repo_id: str,
    report_dir: str,
    private: bool = False,
    prior_dir: str | None = None,
    dry_run: bool = False,
    output: str | None = None,
) -> list[Path]:
    """Stage (and unless dry_run, upload) the tokenizer as `repo_id` and a prior as `repo_id`-prior."""
    report_path = Path(report_dir) / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found: run `vqar evaluate --output {report_dir}` first")
    report = json.loads(report_path.read_text())
    config = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    root = Path(output or "outputs/push")
    extras = (Path(report_dir) / "samples.png", report_path)
    folders = [stage(tokenizer_dir, tokenizer_card(repo_id, report, config), root / "tokenizer", extras)]
    if prior_dir:
        metrics_path = Path(prior_dir).parent / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        folders.append(stage(prior_dir, prior_card(f"{repo_id}-prior", repo_id, metrics), root / "prior"))
    if not dry_run:
        upload(folders[0], repo_id, private)
        if prior_dir:
            upload(folders[1], f"{repo_id}-prior", private)
    return folders
