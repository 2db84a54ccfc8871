"""CPU benchmark: one training step of a decoder-only transformer (GPT), ours in NumPy vs PyTorch eager.

A step is forward, loss, backward and AdamW: transformer.lm_loss_forward / lm_loss_backward and
training.adam_step (weight decay 0.1 on matrices and tables only: training.weight_decay_mask) against the
same model built from torch modules (nn.Embedding * sqrt(D) + learned positions, pre-LN
nn.TransformerEncoderLayer with a causal mask, final nn.LayerNorm, tied head, F.cross_entropy,
torch.optim.AdamW with the same two groups), our float32 weights copied in, so the first losses agree.

For each configuration it prints the median time of several steps after a warm-up, the ratio ours/torch,
and each step's peak memory: for NumPy the tracemalloc peak during one step (every NumPy buffer is
traced), for torch the peak of the running sum of bytes torch's CPU allocator handed out and took back
during one step, op by op in time order (torch.profiler with profile_memory=True; tracemalloc cannot see
torch's allocator). Both count only what the step allocates on top of what existed before it. If ours is
slower, one step of ours is run under cProfile and the functions taking the most time are printed.

Both run with the same number of threads: NumPy's BLAS (OpenBLAS, or MKL) reads its thread count from the
environment once, when it loads, so the script sets OPENBLAS_NUM_THREADS / MKL_NUM_THREADS /
OMP_NUM_THREADS and re-executes itself if they differ; torch.set_num_threads gets the same number.

    python benchmarks/bench_transformer_step.py                 # small and medium, 1 thread, ~1 minute
    python benchmarks/bench_transformer_step.py --threads 2 --repeats 3 --configs small
"""
import argparse
import cProfile
import ctypes
import io
import itertools
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import training  # noqa: E402
import transformer  # noqa: E402

CONFIGS = {   # B sequences of T tokens per step; GPT-2's recipe: pre-LN, exact GELU, learned positions, tied
    "small": dict(B=8, T=64, V=512, D=128, n_heads=4, F=512, n_layers=2),
    "medium": dict(B=8, T=128, V=2048, D=256, n_heads=8, F=1024, n_layers=4),
}
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
LR, WEIGHT_DECAY = 3e-4, 0.1


# ----------------------------------------------------------------------------------------------------
# Our step and PyTorch's


def model_config(shape):
    return transformer.check_config({"kind": "decoder", "V": shape["V"], "D": shape["D"],
                                     "n_heads": shape["n_heads"], "F": shape["F"], "n_layers": shape["n_layers"],
                                     "max_len": shape["T"], "positions": "learned", "norm_first": True,
                                     "activation": "gelu", "tied": True})


def numpy_trainer(params, config, tokens, targets):
    """A function running one step of ours (forward, backward, AdamW) on state it keeps; returns the loss."""
    held = {"params": params, "adam": training.adam_init(params)}
    decay = training.weight_decay_mask(params)

    def step():
        loss, cache = transformer.lm_loss_forward(tokens, targets, held["params"], config)
        grads = transformer.lm_loss_backward(1.0, cache)
        held["params"], held["adam"] = training.adam_step(held["params"], grads, held["adam"], lr=LR,
                                                          weight_decay=WEIGHT_DECAY, decay=decay)
        return loss
    return step


def torch_state_dict(params, torch):
    """Our params tree under the names of the torch model below; torch's Linear weights are our W^T."""
    state = {"embed.weight": params["embed"], "pos": params["pos"], "b_out": params["b_out"],
             "norm.weight": params["dec_norm"]["gamma"], "norm.bias": params["dec_norm"]["beta"]}
    for i, layer in enumerate(params["decoder"]):
        a, ff = layer["attn"], layer["ff"]
        state.update({
            f"layers.{i}.self_attn.in_proj_weight": np.concatenate([a["W_q"].T, a["W_k"].T, a["W_v"].T]),
            f"layers.{i}.self_attn.in_proj_bias": np.concatenate([a["b_q"], a["b_k"], a["b_v"]]),
            f"layers.{i}.self_attn.out_proj.weight": a["W_o"].T, f"layers.{i}.self_attn.out_proj.bias": a["b_o"],
            f"layers.{i}.linear1.weight": ff["W_1"].T, f"layers.{i}.linear1.bias": ff["b_1"],
            f"layers.{i}.linear2.weight": ff["W_2"].T, f"layers.{i}.linear2.bias": ff["b_2"]})
        for n in (1, 2):
            state[f"layers.{i}.norm{n}.weight"] = layer[f"ln{n}"]["gamma"]
            state[f"layers.{i}.norm{n}.bias"] = layer[f"ln{n}"]["beta"]
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in state.items()}


def torch_trainer(params, config, tokens, targets, torch):
    """The same model and step in PyTorch eager; returns step() -> loss."""
    nn, F = torch.nn, torch.nn.functional
    D, V, T = config["D"], config["V"], tokens.shape[1]

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, D)
            self.pos = nn.Parameter(torch.zeros(config["max_len"], D))
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(D, config["n_heads"], config["F"], dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True) for _ in range(config["n_layers"]))
            self.norm = nn.LayerNorm(D)
            self.b_out = nn.Parameter(torch.zeros(V))

        def forward(self, ids):
            x = self.embed(ids) * math.sqrt(D) + self.pos[:T]          # (B, T, D) as embed_forward
            causal = nn.Transformer.generate_square_subsequent_mask(T)
            for layer in self.layers:                                  # is_causal lets torch use its causal SDPA
                x = layer(x, src_mask=causal, is_causal=True)
            return F.linear(self.norm(x), self.embed.weight, self.b_out)   # tied head (B, T, V)

    model = GPT()
    model.load_state_dict(torch_state_dict(params, torch))
    decayed = [p for p in model.parameters() if p.ndim >= 2]          # as training.weight_decay_mask
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": WEIGHT_DECAY},
                                   {"params": others, "weight_decay": 0.0}], lr=LR)
    t_tokens, t_targets = torch.from_numpy(tokens), torch.from_numpy(targets).reshape(-1)

    def step():
        loss = F.cross_entropy(model(t_tokens).reshape(-1, V), t_targets, ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


# ----------------------------------------------------------------------------------------------------
# Measuring


def median_time(step, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def numpy_peak_bytes(step):
    """tracemalloc's peak during one step, above what was allocated before it."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - before


def torch_peak_bytes(step, torch):
    """The peak of the running sum of bytes allocated minus freed by torch's CPU allocator during one step.

    Each profiler event carries the bytes its op allocated minus those it freed, not counting its children
    (self_cpu_memory_usage); summed in start-time order they trace the step's allocations op by op."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return max(itertools.accumulate((e.self_cpu_memory_usage for e in events), initial=0))


PHASES = ("lm_loss_forward", "lm_loss_backward", "adam_step", "activation_forward", "activation_backward",
          "layer_norm_forward", "layer_norm_backward", "multihead_forward", "multihead_backward")


def where_the_time_goes(step, n=12):
    """cProfile of one step: the step's phases (cumulative, children included) and the n functions with
    the most time spent in themselves."""
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    cumulative = {}
    for (_, _, function), (_, _, _, cumtime, _) in stats.stats.items():
        if function in PHASES:
            cumulative[function] = cumulative.get(function, 0.0) + cumtime
    lines = [f"  profiled step: {1e3 * total:.0f} ms (cProfile adds a little)"]
    lines += [f"  {function:<22} {1e3 * cumulative[function]:>8.1f} ms {100 * cumulative[function] / total:>5.1f} %"
              for function in PHASES if function in cumulative]
    text = io.StringIO()
    stats.stream = text
    stats.sort_stats("tottime").print_stats(n)
    printed = text.getvalue().splitlines()
    start = next(i for i, line in enumerate(printed) if line.lstrip().startswith("ncalls"))
    return "\n".join(lines + ["", *printed[start:start + n + 1]])


# ----------------------------------------------------------------------------------------------------
# Reporting the machine


def openblas_threads():
    """The thread count OpenBLAS (as loaded by NumPy) reports, or None when it cannot be asked."""
    try:
        with open("/proc/self/maps") as maps:                  # the shared libraries this process has loaded
            paths = {line.split()[-1] for line in maps if "openblas" in line.split()[-1].lower()}
    except OSError:                                            # not Linux
        return None
    for path in paths:
        library = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
            if hasattr(library, name):
                return getattr(library, name)()
    return None


def machine_line(torch):
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {}).get("name", "?")
    environment = ", ".join(f"{var}={os.environ.get(var)}" for var in THREAD_VARIABLES)
    return (f"# {model}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n"
            f"# NumPy {np.__version__} ({blas}, {openblas_threads()} threads reported), "
            f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads, "
            f"MKL {torch.backends.mkl.is_available()}), {environment}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["small", "medium"])
    parser.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("torch is not installed: nothing to compare against (pip install torch, CPU build). Skipping.")
        return
    if any(os.environ.get(var) != str(args.threads) for var in THREAD_VARIABLES):
        os.environ.update({var: str(args.threads) for var in THREAD_VARIABLES})   # read once, when BLAS loads
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(args.threads)
    print(machine_line(torch))
    print(f"# one step = forward + loss + backward + AdamW, float32; median of {args.repeats} after {args.warmup} "
          f"warm-up steps; peak = memory allocated during one step (NumPy: tracemalloc; torch: profiler)")
    print(f"{'config':>7} {'B x T':>8} {'D':>4} {'L':>2} {'V':>5} {'params':>7} | {'ours ms':>8} {'torch ms':>9} "
          f"{'ours/torch':>10} | {'ours MiB':>8} {'torch MiB':>9} | {'loss ours':>9} {'torch':>9}")
    slower = []
    for name in args.configs:
        shape = CONFIGS[name]
        config = model_config(shape)
        rng = np.random.default_rng(0)
        params = transformer.init_transformer(config, rng, np.float32)
        tokens = rng.integers(0, shape["V"], size=(shape["B"], shape["T"]))
        targets = np.roll(tokens, -1, axis=1)                  # next token; the last one wraps, fine for timing
        ours = numpy_trainer(params, config, tokens, targets)
        theirs = torch_trainer(params, config, tokens, targets, torch)
        losses = ours(), theirs()                              # the first step: same weights, same loss
        assert math.isclose(*losses, rel_tol=1e-4), f"not the same model: losses {losses}"   # float32 rounding
        for _ in range(args.warmup - 1):
            ours(), theirs()
        ours_s, torch_s = median_time(ours, args.repeats), median_time(theirs, args.repeats)
        ours_mib, torch_mib = numpy_peak_bytes(ours) / 2**20, torch_peak_bytes(theirs, torch) / 2**20
        n_params = sum(p.size for p in training.tree_leaves(params))
        print(f"{name:>7} {shape['B']:>3} x {shape['T']:<4} {shape['D']:>4} {shape['n_layers']:>2} {shape['V']:>5} "
              f"{n_params / 1e6:>6.2f}M | {1e3 * ours_s:>8.1f} {1e3 * torch_s:>9.1f} {ours_s / torch_s:>10.2f} | "
              f"{ours_mib:>8.1f} {torch_mib:>9.1f} | {losses[0]:>9.4f} {losses[1]:>9.4f}", flush=True)
        if ours_s > torch_s:
            slower.append((name, ours))
    for name, ours in slower:
        print(f"\nOurs is slower on '{name}'; where one step of ours spends its time (cProfile):")
        print(where_the_time_goes(ours))


if __name__ == "__main__":
    main()
