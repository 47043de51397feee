"""The generator's DDP wrapping, checked on CPU with the gloo backend (2 processes)."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunetv2_voxshield.distributed import unwrap, wrap_ddp
from nnunetv2_voxshield.generator import NoiseGenerator

KWARGS = dict(dims=3, in_channels=1, features_per_stage=[4, 8], kernel_sizes=[[3, 3, 3]] * 2,
              strides=[[1, 1, 1], [2, 2, 2]])


def _inputs(rank):
    torch.manual_seed(100 + rank)
    return torch.randn(1, 1, 8, 8, 8)


def _worker(rank, world_size, init_file, out_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    torch.manual_seed(0)
    generator = wrap_ddp(NoiseGenerator(**KWARGS), torch.device('cpu'))
    generator(_inputs(rank)).square().mean().backward()
    grads = [p.grad.clone() for p in unwrap(generator).parameters()]
    if rank == 0:
        torch.save(grads, out_file)
    dist.destroy_process_group()


def test_ddp_generator_averages_gradients_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / 'init'), str(tmp_path / 'grads.pt')), nprocs=2, join=True)
    ddp_grads = torch.load(tmp_path / 'grads.pt')
    expected = None
    for rank in range(2):
        torch.manual_seed(0)
        g = NoiseGenerator(**KWARGS)
        g(_inputs(rank)).square().mean().backward()
        grads = [p.grad / 2 for p in g.parameters()]
        expected = grads if expected is None else [a + b for a, b in zip(expected, grads)]
    assert len(ddp_grads) == len(expected)
    for got, want in zip(ddp_grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_unwrap_returns_plain_modules_unchanged():
    g = NoiseGenerator(**KWARGS)
    assert unwrap(g) is g
