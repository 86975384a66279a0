"""Every inference command takes --device and --dtype: the best device by default, a clear refusal
for one that is not here, bf16 on the CPU, and quantizers kept in fp32."""

import pytest
import torch
from conftest import TINY_F2

from vqar import TokenizerConfig, VQTokenizer
from vqar.cli import main
from vqar.devices import resolve_device, resolve_dtype


def test_the_default_device_is_the_best_present_and_a_missing_one_is_named():
    assert resolve_device(None) == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible here"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="fp16 needs a GPU; on the CPU use bf16"):
        resolve_dtype("fp16", torch.device("cpu"))


def test_a_bf16_tokenizer_keeps_its_quantizer_in_fp32_and_gives_the_same_codes_mostly(photo_batch):
    tokenizer = VQTokenizer(TokenizerConfig(**{**TINY_F2, "resolution": 32})).eval()
    codes = tokenizer.encode(photo_batch)
    tokenizer.for_inference("cpu", torch.bfloat16)
    assert tokenizer.encoder.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in tokenizer.quantizer.parameters())
    in_bf16 = tokenizer.encode(photo_batch.bfloat16())
    assert in_bf16.shape == codes.shape and (in_bf16 == codes).float().mean() > 0.8


@pytest.mark.parametrize("command", ["tokenize", "evaluate", "generate", "convert"])
def test_every_inference_command_takes_device_and_dtype(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--device" in text and (command == "convert" or "--dtype" in text)


def test_tokenize_and_evaluate_run_in_bf16_on_the_cpu(tmp_path):
    VQTokenizer(TokenizerConfig(**TINY_F2)).save_pretrained(tmp_path / "tokenizer")
    options = ["--tokenizer", str(tmp_path / "tokenizer"), "--data", "digits", "--device", "cpu", "--dtype", "bf16"]
    main(["tokenize", *options, "--output", str(tmp_path / "tokens")])
    main(["evaluate", *options, "--output", str(tmp_path / "report"), "--holdout", "0.05"])
    assert (tmp_path / "tokens" / "vqar_tokens.json").is_file() and (tmp_path / "report" / "report.json").is_file()


def test_a_tokenizer_cast_for_inference_keeps_its_fingerprint():
    tokenizer = VQTokenizer(TokenizerConfig(**TINY_F2))
    before = tokenizer.fingerprint
    assert tokenizer.for_inference("cpu", torch.bfloat16).fingerprint == before
