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
torch's allocator). Both count only what the step allocates on top of what existed before it.

Beside them, the floor: the matrix products of one step of ours (every `@`, recorded with their shapes,
strides and dtypes during one step) replayed alone, in NumPy and in torch, on arrays laid out the same way.
No implementation of this step can take less than its products, so ours/floor says how much of our time
is everything else (elementwise passes, reductions, Python), and the two floors say how much of torch's
lead is its BLAS. Then one step of ours runs under cProfile: the step's phases and the functions taking
the most time.

Both run with the same number of threads: threadpoolctl sets the BLAS pools of every library loaded (NumPy's
OpenBLAS, and torch's MKL if it has one), torch.set_num_threads its intra-op pool. With one thread (the
default) every time is the CPU time of this process (time.process_time), not the wall time: on a machine
shared with other work, the wall time counts the time others had the core, the CPU time only this step's
work (caches shared with the others still slow it a little). With more threads, the wall time.

    python benchmarks/bench_transformer_step.py                 # small and medium, 1 thread, ~1 minute
    python benchmarks/bench_transformer_step.py --threads 2 --repeats 3 --configs small
"""
import argparse
import cProfile
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
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import training  # noqa: E402
import transformer  # noqa: E402

CONFIGS = {   # B sequences of T tokens per step; GPT-2's recipe: pre-LN, exact GELU, learned positions, tied
    "small": dict(B=8, T=64, V=512, D=128, n_heads=4, F=512, n_layers=2),
    "medium": dict(B=8, T=128, V=2048, D=256, n_heads=8, F=1024, n_layers=4),
}
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

    def step():   # the next two lines are the only ones that follow transformer.py's signatures
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


def median_time(step, repeats, clock):
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        times.append(clock() - start)
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


class Recorded(np.ndarray):
    """An ndarray that notes the operands of every matrix product it takes part in.

    Every ufunc or NumPy function one of its operands is Recorded returns Recorded arrays, so the mark
    spreads from the parameters to everything computed from them; each np.matmul (`@`) appends
    ((shape, strides, dtype), (shape, strides, dtype)) of its two operands to Recorded.products."""
    products = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = [plain(x) for x in inputs]
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(plain(o) for o in out)
        if ufunc is np.matmul and method == "__call__":
            Recorded.products.append(tuple((x.shape, x.strides, x.dtype) for x in inputs[:2]))
        result = getattr(ufunc, method)(*inputs, **kwargs)
        return (out[0] if len(out) == 1 else out) if out is not None else marked(result)

    def __array_function__(self, func, types, args, kwargs):
        return marked(func._implementation(*plain(args), **plain(kwargs)))


def plain(tree):
    if isinstance(tree, Recorded):
        return tree.view(np.ndarray)
    if isinstance(tree, (list, tuple)):
        return type(tree)(plain(x) for x in tree)
    if isinstance(tree, dict):
        return {key: plain(value) for key, value in tree.items()}
    return tree


def marked(tree):
    if isinstance(tree, np.ndarray) and not isinstance(tree, Recorded):
        return tree.view(Recorded)
    if isinstance(tree, (list, tuple)):
        return type(tree)(marked(x) for x in tree)
    return tree


def record_products(params, config, tokens, targets):
    """The operands of every matrix product in one step of ours, in order (the step runs on Recorded params)."""
    Recorded.products = []
    numpy_trainer(training.tree_map(lambda p: p.view(Recorded), params), config, tokens, targets)()
    products, Recorded.products = Recorded.products, []
    return products


def product_flops(products):
    """2 m k n for each (..., m, k) @ (..., k, n), times the broadcast batch."""
    total = 0
    for (a_shape, _, _), (b_shape, _, _) in products:
        a_shape, b_shape = (1,) * (2 - len(a_shape)) + a_shape, b_shape + (1,) * (2 - len(b_shape))
        batch = math.prod(np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
        total += 2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]
    return total


def laid_out(shape, strides, dtype, rng):
    """A random array of this shape whose elements sit at these strides (views of one buffer, as in the step)."""
    itemsize = np.dtype(dtype).itemsize
    extent = 1 + sum((n - 1) * abs(stride) // itemsize for n, stride in zip(shape, strides))
    buffer = rng.standard_normal(extent).astype(dtype)
    return np.lib.stride_tricks.as_strided(buffer, shape, strides), buffer


def product_replays(products, torch):
    """step() functions that run the recorded products alone: in NumPy, and in torch on the same layouts."""
    rng = np.random.default_rng(0)
    pairs = [tuple(laid_out(*operand, rng) for operand in product) for product in products]
    numpy_pairs = [(a, b) for (a, _), (b, _) in pairs]

    def as_torch(array, buffer):
        itemsize = array.itemsize
        return torch.as_strided(torch.from_numpy(buffer), array.shape, [s // itemsize for s in array.strides])
    torch_pairs = [(as_torch(*a), as_torch(*b)) for a, b in pairs]

    def numpy_products():
        for a, b in numpy_pairs:
            a @ b

    def torch_products():
        for a, b in torch_pairs:
            torch.matmul(a, b)
    return numpy_products, torch_products


PHASES = ("lm_loss_forward", "lm_loss_backward", "adam_step", "activation_forward", "activation_backward",
          "layer_norm_forward", "layer_norm_backward", "multihead_forward", "multihead_backward")


def where_the_time_goes(step, n, clock):
    """cProfile of one step: the step's phases (cumulative, children included) and the n functions with
    the most time spent in themselves (a matrix product's time counts in the function that wrote the `@`)."""
    profiler = cProfile.Profile(clock)
    profiler.enable()
    step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats                       # (file, line, function): (calls, _, self, cumulative, _)
    total = sum(own for _, _, own, _, _ in stats.values())
    cumulative = {}
    for (_, _, function), (_, _, _, cumtime, _) in stats.items():
        if function in PHASES:
            cumulative[function] = cumulative.get(function, 0.0) + cumtime
    lines = [f"  profiled step: {1e3 * total:.0f} ms (cProfile adds a little)"]
    lines += [f"  {function:<22} {1e3 * cumulative[function]:>8.1f} ms {100 * cumulative[function] / total:>5.1f} %"
              for function in PHASES if function in cumulative]
    lines += ["", f"  {'self ms':>8} {'self %':>6} {'cum ms':>8} {'calls':>6}  function"]
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:n]
    for (path, line, function), (calls, _, own, cumtime, _) in top:
        where = f"{os.path.basename(path)}:{line} {function}" if line else function    # line 0: a C function
        lines.append(f"  {1e3 * own:>8.1f} {100 * own / total:>6.1f} {1e3 * cumtime:>8.1f} {calls:>6}  {where}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Reporting the machine


def blas_line():
    """Each BLAS pool loaded in this process (NumPy's, torch's) with the threads it will use."""
    return ", ".join(f"{pool['internal_api']} {pool.get('version')} ({pool['num_threads']} threads)"
                     for pool in threadpool_info() if pool["user_api"] == "blas")


def machine_line(torch):
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"# {model}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M %Z')}, load average {load}\n"
            f"# NumPy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} intra-op threads, "
            f"MKL {torch.backends.mkl.is_available()}); BLAS pools: {blas_line()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["small", "medium"])
    parser.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="functions listed in each profile")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("torch is not installed: nothing to compare against (pip install torch, CPU build). Skipping.")
        return
    threadpool_limits(limits=args.threads, user_api="blas")   # after importing torch: its BLAS pool too
    torch.set_num_threads(args.threads)
    clock, clock_name = (time.process_time, "CPU time") if args.threads == 1 else (time.perf_counter, "wall time")
    print(machine_line(torch))
    print(f"# one step = forward + loss + backward + AdamW, float32; {clock_name}, median of {args.repeats} after "
          f"{args.warmup} warm-up steps; peak = memory allocated during one step (NumPy: tracemalloc; torch: profiler);\n"
          f"# floor = only the step's matrix products, replayed in NumPy (np) and in torch (pt)")
    print(f"{'config':>7} {'B x T':>8} {'D':>4} {'L':>2} {'V':>5} {'params':>7} | {'ours ms':>8} {'torch ms':>9} "
          f"{'ours/torch':>10} | {'floor np':>8} {'pt ms':>6} {'ours/floor':>10} {'GFLOP':>6} | {'ours MiB':>8} "
          f"{'torch MiB':>9} | {'loss ours':>9} {'torch':>9}")
    profiles = []
    for name in args.configs:
        shape = CONFIGS[name]
        config = model_config(shape)
        rng = np.random.default_rng(0)
        params = transformer.init_transformer(config, rng, np.float32)
        tokens = rng.integers(0, shape["V"], size=(shape["B"], shape["T"]))
        targets = np.roll(tokens, -1, axis=1)                  # next token; the last one wraps, fine for timing
        products = record_products(params, config, tokens, targets)
        ours = numpy_trainer(params, config, tokens, targets)
        theirs = torch_trainer(params, config, tokens, targets, torch)
        floor_numpy, floor_torch = product_replays(products, torch)
        losses = ours(), theirs()                              # the first step: same weights, same loss
        assert math.isclose(*losses, rel_tol=1e-4), f"not the same model: losses {losses}"   # float32 rounding
        for _ in range(args.warmup - 1):
            ours(), theirs()
        floor_numpy(), floor_torch()                           # warm-up
        ours_s, torch_s = median_time(ours, args.repeats, clock), median_time(theirs, args.repeats, clock)
        floor_s, floor_torch_s = (median_time(floor_numpy, args.repeats, clock),
                                  median_time(floor_torch, args.repeats, clock))
        ours_mib, torch_mib = numpy_peak_bytes(ours) / 2**20, torch_peak_bytes(theirs, torch) / 2**20
        n_params = sum(p.size for p in training.tree_leaves(params))
        print(f"{name:>7} {shape['B']:>3} x {shape['T']:<4} {shape['D']:>4} {shape['n_layers']:>2} {shape['V']:>5} "
              f"{n_params / 1e6:>6.2f}M | {1e3 * ours_s:>8.1f} {1e3 * torch_s:>9.1f} {ours_s / torch_s:>10.2f} | "
              f"{1e3 * floor_s:>8.1f} {1e3 * floor_torch_s:>6.1f} {ours_s / floor_s:>10.2f} "
              f"{product_flops(products) / 1e9:>6.2f} | {ours_mib:>8.1f} {torch_mib:>9.1f} | "
              f"{losses[0]:>9.4f} {losses[1]:>9.4f}", flush=True)
        profiles.append((name, len(products), where_the_time_goes(ours, args.top, clock)))
    for name, n_products, profile in profiles:
        print(f"\nWhere one step of ours spends its time on '{name}' (cProfile; {n_products} matrix products, "
              f"the floor, run inside these functions):")
        print(profile)


if __name__ == "__main__":
    main()
