"""The code paths a sharded prior takes (FSDP2), run with torch's own `fully_shard` over gloo on two CPU
processes: accelerate runs FSDP only on GPUs (with ACCELERATE_USE_CPU=1 an FSDP config silently becomes
DDP), so the EMA, the held-out evaluation and the gathered state dict are tested here directly."""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqar.ar import VocabLayout, build_prior
from vqar.tokens import TokenRows

LAYOUT = VocabLayout.create(codebook_size=25, tokens_per_image=16, grid=[4, 4], class_names=["a", "b"])


class Rows(TokenRows):
    """Held-out rows in memory, read as the memory-mapped ones are (`__getitems__`)."""

    def __init__(self, codes: torch.Tensor, labels: torch.Tensor):
        self.chunks, self.labels, self.captions, self.num_tokens = [codes.numpy()], labels.numpy(), None, None
        self.starts = torch.tensor([0, len(codes)]).numpy()


def _sharded_run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from vqar.training.optim import EMA
    from vqar.training.train_prior import evaluate_prior

    torch.manual_seed(0)
    model = build_prior(LAYOUT, size="tiny")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(1.0)  # a step: every weight + 1
    ema.update(model)  # shadow = (w + w + 1) / 2 = w + 0.5
    ema.copy_to(model)
    generator = torch.Generator().manual_seed(1)
    rows = Rows(torch.randint(0, 25, (13, 16), generator=generator), torch.randint(0, 2, (13,), generator=generator))
    reduce = lambda t: (dist.all_reduce(t), t)[1]  # noqa: E731
    metrics = evaluate_prior(model, LAYOUT, rows, batch_size=4, rank=rank, world_size=world, reduce=reduce)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        shifted = max((full[k] - (reference[k] + 0.5)).abs().max().item() for k in full)
        Path(out).write_text(json.dumps({"metrics": metrics, "shifted": shifted, "sharded": ema.sharded}))
    dist.barrier()  # tear gloo down together: a rank that leaves while its peer still talks can abort in C++
    dist.destroy_process_group()


def test_a_sharded_prior_averages_evaluates_and_saves_like_a_whole_one(tmp_path):
    out = tmp_path / "rank0.json"
    mp.spawn(_sharded_run, args=(2, 29562, str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["sharded"] and result["shifted"] < 1e-6  # each process averaged its shards; gathered whole
    torch.manual_seed(0)
    whole = build_prior(LAYOUT, size="tiny")
    with torch.no_grad():
        for p in whole.parameters():
            p.add_(0.5)
    from vqar.training.train_prior import evaluate_prior

    generator = torch.Generator().manual_seed(1)
    rows = Rows(torch.randint(0, 25, (13, 16), generator=generator), torch.randint(0, 2, (13,), generator=generator))
    expected = evaluate_prior(whole, LAYOUT, rows, batch_size=4)
    assert result["metrics"]["eval_tokens"] == expected["eval_tokens"] == 13 * 16  # uneven shares: 6 and 7 rows
    assert abs(result["metrics"]["bits_per_image"] - expected["bits_per_image"]) < 1e-3
