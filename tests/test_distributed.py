"""DDP on CPU processes (gloo) through accelerate launch: equivalence with one process, tracking, failures."""
import json
import time

import torch
from safetensors.torch import load_file

from launch_helpers import finished, launch


def adam_first_moments(out):
    """Adam's exp_avg of every D parameter from the run's final checkpoint (read with weights_only)."""
    (checkpoint,) = (out / "checkpoints").glob("step_*")
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


def d_params(out):
    return load_file(str(out / "model" / "discriminator.safetensors"))


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, mnist_root):
    """Same global batch (2 x 50 vs 1 x 100), D without BatchNorm or dropout: the same parameters after k steps."""
    common = ["--recipe", "supervised", "--num-labels", "1000", "--dropout", "0", "--d-batchnorm", "false",
              "--max-steps", "6", "--tracker", "none", "--data-root", mnist_root, "--lr", "1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = launch([*common, "--batch-size", "100", "--output-dir", one])
    r2 = launch([*common, "--batch-size", "50", "--output-dir", two], num_processes=2)
    assert finished(r1, one), r1.stderr[-3000:]
    assert finished(r2, two), r2.stderr[-3000:]
    m1, m2 = (json.loads((o / "metrics.json").read_text()) for o in (one, two))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    p1, p2 = d_params(one), d_params(two)
    assert p1.keys() == p2.keys()
    # Parameters, with a float tolerance scaled to Adam: each step moves a weight by up to lr = 1e-3 whatever
    # its gradient's size, so a weight whose gradient is ~0 can move differently on summation-order noise.
    # A wrong split of the global batch moves many weights by ~lr per step: far past these bounds.
    for key in p1:
        gap = (p1[key] - p2[key]).abs()
        assert gap.max() <= 3e-4 and gap.mean() <= 2e-6, (key, gap.max().item(), gap.mean().item())
    # Adam is blind to the scale of the gradient; its first moment is not: a loss normalised by the wrong
    # counts (e.g. per process instead of global) would differ here by a factor, not by float noise.
    moments1, moments2 = (adam_first_moments(o) for o in (one, two))
    assert len(moments1) == len(moments2) == len(p1)
    for a, b in zip(moments1, moments2):
        assert (a - b).norm() <= 1e-2 * a.norm(), ((a - b).norm().item(), a.norm().item())
    # every test image counted once on both: accuracies agree up to images whose logits tie within float error
    assert abs(m1["test_accuracy"] - m2["test_accuracy"]) <= 2e-4


def test_two_process_seed_run_tracks_offline_with_images(tmp_path, mnist_root):
    out = tmp_path / "ddp"
    env = {"WANDB_API_KEY": "", "WANDB_MODE": "", "HOME": str(tmp_path)}
    result = launch(["--max-steps", "4", "--batch-size", "32", "--tracker", "wandb", "--output-dir", out,
                     "--data-root", mnist_root], num_processes=2, env=env)
    assert finished(result, out), result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "exactly one W&B run: only the main process tracks"
    assert next(runs[0].glob("*.wandb")).stat().st_size > 0
    assert list((runs[0] / "files" / "media" / "images").glob("samples_*.png"))
    assert "offline" in result.stdout


def test_a_dying_rank_ends_the_whole_job(tmp_path, mnist_root):
    out = tmp_path / "dies"
    begun = time.monotonic()
    result = launch(["--max-steps", "50", "--batch-size", "16", "--tracker", "none", "--output-dir", out,
                     "--data-root", mnist_root, "--ddp-timeout", "60"], num_processes=2,
                    env={"SGAN_INJECT_FAILURE": "1:2"}, timeout=300)
    assert result.returncode != 0
    assert "injected failure on rank 1 at step 2" in result.stderr
    assert time.monotonic() - begun < 240
    assert not (out / "metrics.json").exists()


def _feature_matching_gradient(rank, world_size, init_file, features, result_file):
    """One process of the feature-matching check: its slice of the global batch, G's gradient after DDP."""
    import torch.distributed as dist

    from sgan.steps import StepSettings, generator_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same G and D on every process
        generator = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 6))
        plain_d = torch.nn.Linear(6, 3)
        plain_d.features = lambda x, layer=-1: torch.tanh(plain_d(x))  # a nonlinear feature map (one layer)
        real, z = features
        rows = slice(rank * len(z) // world_size, (rank + 1) * len(z) // world_size)
        settings = StepSettings("k-logit", 1.0, "all", True, True, 0.0, "torch")
        loss = generator_loss(plain_d, generator, z[rows], real[rows], settings)
        loss.backward()  # DDP averages G's gradients over the processes
        if rank == 0:
            torch.save({"loss": loss.detach(), "grad": [p.grad for p in generator.parameters()]}, result_file)
    finally:
        dist.destroy_process_group()


def test_feature_matching_under_ddp_matches_one_process(tmp_path):
    """Means over all processes: 2 processes with half the batch each give one process's loss and gradient."""
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(1)
    features = (torch.randn(8, 6, generator=generator) * 3, torch.randn(8, 4, generator=generator))
    results = {}
    for world_size in (1, 2):
        out = tmp_path / f"world{world_size}.pt"
        mp.spawn(_feature_matching_gradient, args=(world_size, tmp_path / f"init{world_size}", features, out),
                 nprocs=world_size)
        results[world_size] = torch.load(out)
    torch.testing.assert_close(results[2]["loss"], results[1]["loss"])
    for two, one in zip(results[2]["grad"], results[1]["grad"]):
        torch.testing.assert_close(two, one)
